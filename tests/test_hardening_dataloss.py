"""Nothing the user wrote is lost (issue 24, items 1-3): a sweep's prepare step and the
scenes generator write only into a folder they created and marked as their own; an
index rebuild replaces only the files the project wrote; the run lock never follows a
symbolic link nor trips over a folder at its path."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from retrieval.cli import main
from retrieval.data.synthetic import (
    MARKER,
    ensure_synthetic,
    generation_state,
    make_synthetic_coco,
    scenes_options,
    write_synthetic_coco,
)
from retrieval.errors import ConfigError, StoreError
from retrieval.index import build_index, open_index
from retrieval.store.lock import LOCK, RunLock
from tests.test_search import make_run, queries


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> the sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def user_dataset(root: Path) -> Path:
    """A user's own COCO-format set: annotations.json and images/ with their files."""
    (root / "images").mkdir(parents=True)
    for k in range(3):
        (root / "images" / f"holiday_{k}.jpg").write_bytes(os.urandom(2000))
    (root / "annotations.json").write_text(json.dumps({"images": [], "annotations": []}))
    (root / "notes.txt").write_text("my labelling notes")
    return root


# -- 1. the scenes prepare step and the generator ---------------------------------------


def test_sweep_prepare_never_touches_a_users_dataset(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's reproduction: `retrieval sweep scenes data.annotations=DS/annotations.json
    data.images=DS/images` on a user's dataset is one error naming the folder, and every
    byte of it is as it was (it used to delete DS/images and overwrite the annotations)."""
    ds = user_dataset(tmp_path / "ds")
    before = snapshot(ds)
    args = [f"data.annotations={ds / 'annotations.json'}", f"data.images={ds / 'images'}"]
    for extra in ([], ["--dry-run"]):
        assert main(["sweep", "scenes", *args, f"out={tmp_path / 'out'}", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ")
        assert str(ds) in err
        assert "did not write" in err
        assert snapshot(ds) == before
    assert not (tmp_path / "out" / "runs").exists()


def test_prepare_refuses_images_that_are_not_beside_the_annotations(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """data.images elsewhere than DIR/images: the generated annotations would describe
    files in another folder; refused before anything is written."""
    photos = user_dataset(tmp_path / "photos") / "images"
    before = snapshot(photos)
    args = [f"data.annotations={tmp_path / 'new' / 'annotations.json'}", f"data.images={photos}"]
    assert main(["sweep", "scenes", *args, f"out={tmp_path / 'out'}"]) == 2
    assert "side by side" in capsys.readouterr().err
    assert snapshot(photos) == before
    assert not (tmp_path / "new").exists()


def test_dry_run_says_what_prepare_would_write_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--dry-run` on a missing folder names the folder it would generate, and creates
    nothing."""
    monkeypatch.setenv("COLUMNS", "200")
    data = tmp_path / "scenes"
    args = [f"data.annotations={data / 'annotations.json'}", f"data.images={data / 'images'}"]
    assert main(["sweep", "scenes", *args, f"out={tmp_path / 'out'}", "--dry-run"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"prepare scenes: would write annotations.json and images/ ({data})" in out
    assert not data.exists()


def test_generator_writes_only_into_its_own_folder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A new folder is generated and marked; the same options again write nothing; other
    options regenerate with a warning naming what changed, removing only the files the
    marker lists (a user's file dropped into images/ stays); a user's folder is refused
    byte for byte."""
    small, other = scenes_options("eval", num_images=3), scenes_options("eval", num_images=2)
    folder = tmp_path / "scenes"
    assert generation_state(folder, small).action == "new"
    ensure_synthetic(folder, small)
    marker = json.loads((folder / MARKER).read_text())
    assert marker["complete"]
    assert len(marker["files"]) == 4
    first = snapshot(folder)
    ensure_synthetic(folder, small)
    assert snapshot(folder) == first  # ready: untouched
    (folder / "images" / "mine.png").write_bytes(b"user bytes")
    with caplog.at_level("WARNING", logger="retrieval"):
        ensure_synthetic(folder, other)
    assert "num_images: stored 3, now 2" in caplog.text
    assert (folder / "images" / "mine.png").read_bytes() == b"user bytes"
    assert sorted(p.name for p in (folder / "images").iterdir()) == [
        "000000000001.jpg",
        "000000000002.jpg",
        "mine.png",
    ]
    ds = user_dataset(tmp_path / "ds")
    before = snapshot(ds)
    for write in (ensure_synthetic, write_synthetic_coco):
        with pytest.raises(ConfigError, match=rf"{ds} holds files the generator did not write"):
            write(ds, small)
    with pytest.raises(ConfigError, match="did not write"):
        make_synthetic_coco(ds, num_images=2)
    assert snapshot(ds) == before


def test_unmarked_folder_generated_with_the_same_options_is_reused(tmp_path: Path) -> None:
    """A scenes folder generated before folders were marked (no marker, annotations
    recording exactly these options) is reused as it is, and nothing is written."""
    options = scenes_options("eval", num_images=2)
    write_synthetic_coco(tmp_path / "old", options)
    (tmp_path / "old" / MARKER).unlink()
    before = snapshot(tmp_path / "old")
    assert generation_state(tmp_path / "old", options).action == "ready"
    ensure_synthetic(tmp_path / "old", options)
    assert snapshot(tmp_path / "old") == before
    with pytest.raises(ConfigError, match="did not write"):
        ensure_synthetic(tmp_path / "old", scenes_options("eval", num_images=3))


def test_generator_command_refuses_a_users_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`python -m retrieval.data.synthetic DS` on a user's folder: one error line, exit 2."""
    from retrieval.data.synthetic import main as generate

    ds = user_dataset(tmp_path / "ds")
    before = snapshot(ds)
    with pytest.raises(SystemExit) as stop:
        generate([str(ds), "--num-images", "2"])
    assert stop.value.code == 2
    assert "error: " in capsys.readouterr().err
    assert snapshot(ds) == before


# -- 2. an index rebuild keeps the user's files -----------------------------------------


def test_index_rebuild_keeps_the_users_files(tmp_path: Path) -> None:
    """A gallery page and a notes folder written into an index folder survive rebuilds
    (same backend, then another one), byte for byte; the old backend's files go, and the
    rebuilt index answers like a fresh build."""
    run = make_run(tmp_path / "run", [(range(40), 3)])
    out = build_index(run, "faiss-flat", tmp_path / "ix", "cpu", progress=False)
    (out / "gallery.html").write_text("<html>my gallery</html>")
    (out / "notes").mkdir()
    (out / "notes" / "todo.md").write_text("- check image 7")
    mine = {k: v for k, v in snapshot(out).items() if k.startswith(("gallery", "notes"))}
    build_index(run, "faiss-flat", out, "cpu", progress=False)
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
    build_index(run, "exact", out, "cpu", progress=False)
    names = {p.name for p in out.iterdir()}
    assert names == {"gallery.html", "notes", "index.json", "table.npz", "vectors.f16"}
    assert {k: v for k, v in snapshot(out).items() if k in mine} == mine
    fresh = build_index(run, "exact", tmp_path / "fresh", "cpu", progress=False)
    q = queries(3, seed=5)
    with open_index(out, "cpu") as a, open_index(fresh, "cpu") as b:
        ours = [[(h.image_id, h.score) for h in hits] for hits in a.search_vectors(q, 5)]
        assert ours == [[(h.image_id, h.score) for h in hits] for hits in b.search_vectors(q, 5)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


# -- 3. the run lock --------------------------------------------------------------------


def test_lock_never_follows_a_symlink_nor_opens_a_folder(tmp_path: Path) -> None:
    """RUN/.lock as a symbolic link to a user's file: refused with a message, the file
    unchanged (it used to be overwritten with the lock's JSON); as a folder or a pipe:
    the same message, not a traceback."""
    precious = tmp_path / "thesis.tex"
    precious.write_text("years of work")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).symlink_to(precious)
    with pytest.raises(StoreError, match=r"symbolic link.*not the lock file"):
        RunLock(run).acquire()
    assert precious.read_text() == "years of work"
    assert (run / LOCK).is_symlink()
    (run / LOCK).unlink()
    (run / LOCK).mkdir()
    with pytest.raises(StoreError, match="is a folder, not the lock file"):
        RunLock(run).acquire()
    (run / LOCK).rmdir()
    os.mkfifo(run / LOCK)
    with pytest.raises(StoreError, match="pipe"):
        RunLock(run).acquire()
    (run / LOCK).unlink()
    with RunLock(run):  # a plain file again: locked as usual
        assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()


def test_cli_embed_into_a_run_whose_lock_is_a_symlink(
    tmp_path: Path, capsys: pytest.CaptureFixture, synthetic_coco
) -> None:
    """Through the CLI: one `error:` line, exit 2, the linked file unchanged."""
    ann, images = synthetic_coco
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).symlink_to(precious)
    args = ["embed", "demo", f"data.annotations={ann}", f"data.images={images}"]
    args += [f"run.output_dir={run}", "logger.wandb.mode=disabled"]
    assert main(args) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert precious.read_text() == "keep"
