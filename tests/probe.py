"""``retrieval ARGV`` in a fresh interpreter with some packages made uninstallable: which
of them got loaded and which module tried to import them (what an import-hygiene test
asserts; a test's own interpreter has long imported everything)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

# Blocks top-level packages ``BLOCKED`` (argv[1], comma-separated), recording the importer.
PROBE = """
import json, sys
BLOCKED, attempts = tuple(sys.argv[1].split(",")), []
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            frame = sys._getframe(1)
            skip = ("importlib", "_frozen")
            while frame and frame.f_globals.get("__name__", "").startswith(skip):
                frame = frame.f_back
            attempts.append([name, frame.f_globals.get("__name__", "?") if frame else "?"])
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
from retrieval.cli import main
status = main(sys.argv[2:])
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(BLOCKED))
print(json.dumps({"status": status, "loaded": loaded, "attempts": attempts}))
"""


@dataclass
class Probe:
    status: int
    loaded: list[str]  # blocked packages found in sys.modules at the end
    attempts: list[list[str]]  # [package, importing module] per blocked import tried
    stderr: str

    def ours(self) -> list[list[str]]:
        """The blocked imports tried by a module of this project."""
        return [a for a in self.attempts if a[1].split(".")[0] == "retrieval"]


def run_blocked(blocked: tuple[str, ...], *argv: str, timeout: float = 300) -> Probe:
    """Runs ``retrieval ARGV`` with ``blocked`` uninstallable (HF hub offline)."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(blocked), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = done.stdout.strip().splitlines()
    assert lines, f"the probe printed nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
    report = json.loads(lines[-1])
    return Probe(report["status"], report["loaded"], report["attempts"], done.stderr)
