"""Output paths (issue 24, item 11): every writer (export OUT, index build --out, search
--json / --gallery / --sheet, compare --out) checks its path with the one shared check
before any work, so a path under a file, in /proc, at a folder where a file goes, or
without permission is one `error:` line naming the option (exit 2), not an OSError traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from retrieval.cli import main
from retrieval.errors import ConfigError
from retrieval.index import build_index
from retrieval.outputs import check_output
from tests.test_search import make_run


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A file to write under, a folder where a file goes, a folder without permission."""
    (tmp_path / "notes.txt").write_text("keep")
    (tmp_path / "folder").mkdir()
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return {
        "under a file": tmp_path / "notes.txt" / "out",
        "in /proc": Path("/proc/self/out"),
        "folder": tmp_path / "folder",
        "locked": locked / "out",
        "long": tmp_path / ("x" * 300),
    }


def test_check_output_names_each_problem(places: dict[str, Path]) -> None:
    """Invariant: each unwritable path is refused with its reason; a writable new path
    (missing parents included) and an existing file are accepted; nothing is created."""
    reasons = {
        "under a file": "is a file",
        "in /proc": "kernel file system",
        "folder": "is a folder; give a file name",
        "long": "too long",
    }
    if os.geteuid() != 0:  # root writes anywhere
        reasons["locked"] = "no permission"
    for place, reason in reasons.items():
        with pytest.raises(ConfigError, match=f"--json .*{reason}.*choose another --json"):
            check_output(places[place], "--json")
    base = places["folder"].parent
    assert check_output(base / "new" / "deeper" / "hits.json", "--json")
    assert not (base / "new").exists()
    assert check_output(base / "notes.txt", "--json") == base / "notes.txt"
    assert check_output(places["folder"], "OUT", "folder") == places["folder"]
    with pytest.raises(ConfigError, match="is a file; give a folder"):
        check_output(base / "notes.txt", "OUT", "folder")


@pytest.mark.parametrize("place", ["under a file", "in /proc", "folder"])
def test_every_writer_gives_one_message(
    place: str, places: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's reproductions, through the CLI: `export` (parquet) to the path,
    `index build --out`, `search --json`, `--gallery` and `--sheet`, `compare --out`:
    exit 2 and one `error:` line naming the option, for each; the file in the way is untouched."""
    run = make_run(tmp_path / "run", [(range(8), 2)])
    index = build_index(run, "exact", tmp_path / "ix", "cpu", progress=False)
    target = str(places[place])
    commands = [
        (["export", str(run), "--format", "parquet", target], "OUT"),
        (["index", "build", str(run), "--out", target, "--no-progress"], "--out"),
        (["search", str(index), "a cat", "--json", target], "--json"),
        (["search", str(index), "a cat", "--gallery", target], "--gallery"),
        (["search", str(index), "a cat", "--sheet", target], "--sheet"),
        (["compare", str(run), "--out", target], "--out"),
    ]
    for argv, key in commands:
        if key == "--out" and place == "folder":
            continue  # an empty folder is a fine --out (index build's and compare's)
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"error: {key} "), err
        assert err.count("\n") == 1, err
    assert (tmp_path / "notes.txt").read_text() == "keep"
