"""Without the fiftyone extra: ``retrieval export --format fiftyone`` says how to install
it (one error line, exit status 2), and the other export formats never import FiftyOne.
Runs everywhere (FiftyOne is made uninstallable in a fresh process)."""

from __future__ import annotations

from pathlib import Path

import pytest
from probe import run_blocked

pytestmark = pytest.mark.slow  # two fresh interpreters importing torch


def test_export_without_fiftyone(dense_run: Path, tmp_path: Path) -> None:
    """The fiftyone format stops with the install command and no traceback; the parquet
    format still exports and never imports fiftyone; --name without --format fiftyone
    (and OUT with it) is refused naming the right form."""
    probe = run_blocked(
        ("fiftyone",), "export", str(dense_run), "--format", "fiftyone", "--name", "x"
    )
    assert (probe.status, probe.loaded) == (2, [])
    assert "pip install '.[fiftyone]'" in probe.stderr
    assert "Traceback" not in probe.stderr
    out = tmp_path / "reps.parquet"
    probe = run_blocked(
        ("fiftyone",), "export", str(dense_run), "--format", "parquet", str(out), "--no-progress"
    )
    assert (probe.status, probe.loaded, probe.attempts) == (0, [], []), probe.stderr
    assert out.stat().st_size > 0, probe.stderr
    from retrieval.cli import main

    assert main(["export", str(dense_run), "--format", "parquet", str(out), "--name", "x"]) == 2
    assert main(["export", str(dense_run), "--format", "fiftyone", str(out), "--name", "x"]) == 2
