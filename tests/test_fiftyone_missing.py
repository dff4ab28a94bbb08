"""Without the fiftyone extra: ``retrieval export --format fiftyone`` says how to install
it (one error line, exit status 2), and the other export formats never import FiftyOne.
Runs everywhere (FiftyOne is made uninstallable in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two fresh interpreters importing torch

# Runs the CLI with fiftyone made uninstallable; prints the status and whether it loaded
PROBE = """
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "fiftyone":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
from retrieval.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "loaded": "fiftyone" in sys.modules}))
"""


def _run(*argv: str) -> tuple[dict[str, object], str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_export_without_fiftyone(dense_run: Path, tmp_path: Path) -> None:
    """The fiftyone format stops with the install command and no traceback; the parquet
    format still exports and never imports fiftyone; --name without --format fiftyone
    (and OUT with it) is refused naming the right form."""
    report, stderr = _run("export", str(dense_run), "--format", "fiftyone", "--name", "x")
    assert report == {"status": 2, "loaded": False}
    assert "pip install '.[fiftyone]'" in stderr
    assert "Traceback" not in stderr
    out = tmp_path / "reps.parquet"
    report, stderr = _run(
        "export", str(dense_run), "--format", "parquet", str(out), "--no-progress"
    )
    assert report == {"status": 0, "loaded": False}, stderr
    assert out.stat().st_size > 0, stderr
    from retrieval.cli import main

    assert main(["export", str(dense_run), "--format", "parquet", str(out), "--name", "x"]) == 2
    assert main(["export", str(dense_run), "--format", "fiftyone", str(out), "--name", "x"]) == 2
