"""``retrieval serve INDEX [INDEX ...]``: the indexes behind an HTTP API and a search page
(docs/serve.md). Loads every index and its model once, then runs uvicorn."""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path

from retrieval.errors import ConfigError

# Idle keep-alive connections are closed after this long. Above the clients' own reuse
# limits (httpx: 5 s, uvicorn's default too), so a client never sends on a connection the
# server is closing at that instant (a ReadError under load; nginx's default is 75 s).
KEEP_ALIVE_S = 75


def parse_indexes(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after its folder) -> name -> folder; a name used
    twice is refused (requests could not tell the indexes apart)."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        folder = Path(path if sep else spec)
        name = name if sep else folder.resolve().name
        if not name or "/" in name:
            raise ConfigError(f"index {spec!r}: give it as PATH or NAME=PATH (NAME without '/')")
        if name in named:
            raise ConfigError(
                f"two indexes are named {name!r} ({named[name]} and {folder}): name them, "
                f"e.g. {name}-a={named[name]} {name}-b={folder}"
            )
        named[name] = folder
    return named


def check_port(host: str, port: int) -> None:
    """Refuses a port outside 1..65535, or one this host cannot listen on now (taken by
    another server, or privileged), by binding it once and letting go.

    Raises:
        ConfigError: names the port and the fix.
    """
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: a TCP port is 1..65535 (default 8000)")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise ConfigError(f"--host {host}: not an address of this machine ({err})") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as err:
            why = {
                errno.EADDRINUSE: "another process is listening on it",
                errno.EACCES: "ports below 1024 need administrator rights",
                errno.EADDRNOTAVAIL: f"{host} is not an address of this machine",
            }.get(err.errno or 0, err.strerror or str(err))
            raise ConfigError(
                f"--port {port} on {host}: cannot listen ({why}); choose another --port (e.g. "
                f"--port {port + 1 if port < 65535 else 8000}) or stop that process (`ss -ltnp "
                f"'sport = :{port}'` names it)"
            ) from None


def _serve(args: argparse.Namespace) -> int:
    from retrieval.devices import check_device
    from retrieval.serve.security import TOKEN_ENV, check_bind

    token = os.environ.get(TOKEN_ENV) or None
    check_bind(args.host, token)
    check_port(args.host, args.port)  # before the model loads: a taken port fails at once
    check_device(args.device, "--device")
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb {args.max_upload_mb}: give a positive size")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: give at least 1")
    folders = parse_indexes(args.index)
    try:
        import torch
        import uvicorn

        from retrieval.serve import ServeSettings, create_app
        from retrieval.serve.served import ServedIndex
    except ImportError as err:
        raise ConfigError(
            f"retrieval serve needs FastAPI and uvicorn ({err.name} is missing): "
            f"pip install 'object-retrieval[serve]'"
        ) from None
    settings = ServeSettings(
        token=token,
        cors_origin=args.cors_origin,
        max_upload_bytes=int(args.max_upload_mb * 2**20),
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
    )
    # one core stays with the event loop, which parses requests and fills the batches
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) - 1))
    served = {}
    for name, folder in folders.items():
        item = ServedIndex(name, folder, args.device, args.max_batch, args.batch_wait_ms)
        print(f"{name}: {item.index.describe()}", flush=True)
        changes = item.index.run_changes()
        if changes.stale:
            print(f"note: {changes.note()}", flush=True)
        served[name] = item
    host = f"[{args.host}]" if ":" in args.host else args.host
    auth = "token required" if token else "no token (loopback only)"
    print(f"serving {len(served)} index(es) at http://{host}:{args.port}/ ({auth})", flush=True)
    uvicorn.run(
        create_app(served, settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.log_level == "debug",
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``serve INDEX [INDEX ...]``."""
    serve = subparsers.add_parser("serve", help="search indexes over HTTP (API + page)")
    serve.add_argument(
        "index", nargs="+", help="index folder, or NAME=FOLDER (default name: the folder's)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    serve.add_argument(
        "--cors-origin", help="allow this one browser origin (e.g. https://app.example.org)"
    )
    serve.add_argument(
        "--max-upload-mb", type=float, default=10.0, help="largest image upload (default 10)"
    )
    serve.add_argument(
        "--max-batch", type=int, default=64, help="most queries per model call (default 64)"
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="how long a query waits for others to share its model call (default 2)",
    )
    serve.add_argument(
        "--threads",
        type=int,
        help="torch threads for encoding and exact search (default: the CPUs less one, "
        "which stays with the HTTP event loop)",
    )
    serve.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level; debug also logs every request",
    )
    serve.set_defaults(func=_serve)
