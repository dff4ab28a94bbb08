"""A real Milvus server for the milvus backend's tests: PyPI ``milvus`` 2.3.5.

One standalone server (embedded etcd, local storage, rocksmq) per test session, started
into a temporary folder and stopped at the end. Every component advertises 127.0.0.1,
so they talk over loopback only (2.3 still listens on every interface: its listen
address is not configurable), and the embedded etcd gets its own free ports from an
etcd config file (2379/2380 otherwise, taken by any other Milvus on the machine). The
wrapper picks free ports (the next one when a default is taken); they are read back and
kept for restarts, bound with ``SO_REUSEADDR`` so a port in TIME_WAIT after a stop is
reused. Readiness is the server's own ``/healthz`` on its metrics port. Authorization
is on, so a wrong token is refused as it would be in production.

Import the fixture into a test module: ``from milvus_server import milvus_server``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROLES = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord", "dataNode")
TOKEN = "root:Milvus"  # the default root user (authorization is on)
START_S = 120.0  # a first start unpacks ~250 MB; later ones take seconds


class MilvusTestServer:
    """One Milvus server in ``base``: :meth:`start`, :meth:`stop`, :meth:`restart`.

    Attributes:
        uri: the proxy's address, ``http://127.0.0.1:PORT``.
        token: the token it accepts.
        ports: every port it listens on, by the wrapper's name.
    """

    def __init__(self, base: Path) -> None:
        from milvus import MilvusServer, MilvusServerConfig

        class LoopbackConfig(MilvusServerConfig):  # type: ignore[misc]
            def try_bind_port(self, port: int) -> socket.socket | None:
                """The wrapper's probe, but with SO_REUSEADDR as the server binds: a
                port in TIME_WAIT after a stop is free again."""
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                except OSError:
                    sock.close()
                    return None
                return sock

        self.base = base
        config = LoopbackConfig(data_dir=str(base))
        config.set("authorization_enabled", True)
        config.resolve_all_listen_ports()  # free ports, held while choosing the next
        self.ports: dict[str, int] = {key: config.get(key) for key in config.listen_ports}
        peer, held = config.resolve_port(2380)
        config.cleanup_listen_ports()
        held.close()
        self.ports["etcd_peer_port"] = peer
        config.update(**{k: v for k, v in self.ports.items() if k != "etcd_peer_port"})
        etcd = base / "etcd.yaml"
        base.mkdir(parents=True, exist_ok=True)
        etcd.write_text(self._etcd_config(self.ports["etcd_port"], peer))
        # the wrapper only rewrites keys its template has: give it etcd's config path
        config.template_text = config.template_text.replace(
            "  use:\n    embed: true", f"  use:\n    embed: true\n  config:\n    path: {etcd}"
        )
        self.server: Any = MilvusServer(config, wait_for_started=False)
        for role in ROLES:
            config.set(f"{role}.ip", "127.0.0.1")
        self.uri = f"http://127.0.0.1:{self.ports['proxy_port']}"
        self.token = TOKEN

    @staticmethod
    def _etcd_config(client: int, peer: int) -> str:
        return (
            "name: default\n"
            f"listen-client-urls: http://127.0.0.1:{client}\n"
            f"advertise-client-urls: http://127.0.0.1:{client}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer}\n"
        )

    @property
    def pid(self) -> int | None:
        proc = self.server.server_proc
        return None if proc is None else int(proc.pid)

    @property
    def health_url(self) -> str:
        return f"http://127.0.0.1:{self.server.webservice_port}/healthz"

    def start(self) -> None:
        """Starts the server and waits until ``/healthz`` says OK (or fails naming its
        log when it exits or does not get there in ``START_S``)."""
        self.server.start()
        self.ports["metrics_port"] = int(self.server.webservice_port)
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.server.server_proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"milvus exited at start; see {self.base / 'logs'}")
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(self.health_url, timeout=2) as answer,
            ):
                if b"OK" in answer.read():
                    return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"milvus not healthy in {START_S:g} s; see {self.base / 'logs'}")

    def stop(self) -> None:
        """Stops the server as a crash would (SIGKILL: what a test needs is the server
        gone; its data is what it had persisted)."""
        proc = self.server.server_proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        self.server.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def sockets(self, state: str) -> list[list[str]]:
        """``ss -tnp state STATE`` rows of this server's process (its TCP sockets)."""
        done = subprocess.run(
            ["ss", "-tnpH", "state", state], capture_output=True, text=True, check=True
        )
        return [line.split() for line in done.stdout.splitlines() if f"pid={self.pid}," in line]


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusTestServer]:
    """A running Milvus 2.3.5 server for the session (skipped without ``milvus``)."""
    pytest.importorskip(
        "milvus", reason="the `milvus` package (a Milvus 2.3.5 server, in [dev]) is missing"
    )
    base = tmp_path_factory.mktemp("milvus_server")
    server = MilvusTestServer(base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
