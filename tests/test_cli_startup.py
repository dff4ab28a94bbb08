"""The command line's first seconds (issue 28.2, 28.10): the commands that run no model
import no torch, the lazy package names are the real ones, ``retrieval list``'s stored
table is what the registries say, output is plain unless ``-v``, and a failed run leaves
no empty folder behind. Import checks run in a fresh interpreter (this one has torch)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retrieval
import retrieval.data
import retrieval.index
import retrieval.store
from retrieval.cli import build_parser, main

HEAVY = ("torch", "open_clip", "timm", "transformers", "lightning", "wandb", "matplotlib")
PROBE = """
import json, sys
from retrieval.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps([m for m in {heavy!r} if m in sys.modules]), file=sys.stderr)
"""


def imported_by(*argv: str) -> list[str]:
    """The heavy packages ``retrieval ARGV`` imports, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return json.loads(done.stderr.strip().splitlines()[-1])


def commands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.fixture(scope="module")
def index_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fake_runs import random_reps, write_collection

    from retrieval.index import build_index
    from retrieval.store import ShardStore

    run = tmp_path_factory.mktemp("startup_run")
    ids = np.arange(40)
    ShardStore(run / "embeddings").write_shard(
        "rank000-00000", torch.from_numpy(ids), random_reps(40, 3, seed=0, dim=8)
    )
    ShardStore(run / "embeddings").write_manifest(fingerprint={"retriever": {"name": "fake"}})
    write_collection(run, ids, np.zeros(40, bool))
    return build_index(run, "exact", run / "index" / "exact", device="cpu", progress=False)


@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in commands()), ["list"]])
def test_help_and_list_import_no_torch(argv: list[str]) -> None:
    """`retrieval --help`, every `COMMAND --help` and `retrieval list` leave torch (and
    open_clip, Lightning, wandb, matplotlib) out of sys.modules."""
    assert imported_by(*argv) == []


def test_index_info_imports_no_torch(index_folder: Path) -> None:
    """`retrieval index info` reads the manifest, the index's table and the run's shard
    ids without torch, and prints the summary (not the manifest) with the run's state."""
    assert imported_by("index", "info", str(index_folder)) == []
    done = subprocess.run(
        [sys.executable, "-m", "retrieval.cli", "index", "info", str(index_folder)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "holds      40 images" in done.stdout
    assert "up to date with its run" in done.stdout


def test_export_imports_no_torch(index_folder: Path, tmp_path: Path) -> None:
    """`retrieval export` of a collection run reads its shards as NumPy: no torch, and
    the parquet it writes holds one row per valid slot of the shard read through torch."""
    import pyarrow.parquet as pq

    from retrieval.store import ShardStore

    run, out = index_folder.parent.parent, tmp_path / "reps.parquet"
    assert imported_by("export", str(run), "--format", "parquet", str(out)) == []
    (shard,) = ShardStore(run / "embeddings").iter_shards()
    assert pq.read_metadata(out).num_rows == int(shard.reps.mask.sum())


@pytest.mark.parametrize("package", [retrieval, retrieval.data, retrieval.index, retrieval.store])
def test_lazy_names_are_the_defining_modules(package) -> None:
    """Every public name of a lazy package resolves to the object its module defines."""
    for name in package.__all__:
        value = getattr(package, name)
        if name != "__version__":
            assert value.__name__ == name, (package.__name__, name)
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        package.nope  # noqa: B018


def test_search_name_is_the_function_not_the_module() -> None:
    """`retrieval.index.search` is the function even though a submodule has its name."""
    module = sys.modules["retrieval.index.search"]
    assert callable(retrieval.index.search)
    assert retrieval.index.search is module.search


def test_list_table_is_what_the_registries_say() -> None:
    """The table `retrieval list` prints without importing torch equals the options the
    built-in factories' signatures give (rewrite it with listing.write_builtin_options)."""
    from retrieval.cli.listing import BUILTIN_OPTIONS, live_options

    assert json.loads(BUILTIN_OPTIONS.read_text()) == live_options(builtin_only=True)


def test_index_build_help_names_embed_and_eval(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["index", "build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "`retrieval embed`" in text
    assert "`retrieval eval`" in text


def test_failed_run_leaves_no_empty_folder(tmp_path: Path) -> None:
    """An embed that fails on bad input removes the folders it created (only empty
    ones); a folder that was there before, and its files, stay."""
    argv = ["embed", "photos", f"data.images={tmp_path / 'missing'}", "retriever=clip_tiny"]
    assert main([*argv, f"run.output_dir={tmp_path / 'new' / 'run'}"]) == 2
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "old"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    assert main([*argv, f"run.output_dir={kept / 'run'}"]) == 2
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_output_is_plain_unless_verbose(tmp_path: Path) -> None:
    """An embed prints each line once, without Lightning's banner, its LitLogger advert
    or deprecation warnings; `retrieval -v` shows the banner, once."""
    from PIL import Image

    images = tmp_path / "pics"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 48), (40 * i, 90, 200)).save(images / f"p{i}.jpg")

    def embed(*flags: str, out: str) -> list[str]:
        argv = [
            *flags,
            "embed",
            "photos",
            f"data.images={images}",
            f"run.output_dir={tmp_path / out}",
            "retriever.backbone=RN-tiny",
            "retriever.pretrained=null",
            "retriever.resolution=64",
            "loader.num_workers=0",
            "logger.wandb.mode=disabled",
            "run.progress=false",
        ]
        done = subprocess.run(
            [sys.executable, "-m", "retrieval.cli", *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        return (done.stdout + done.stderr).splitlines()

    quiet = embed(out="a")
    text = "\n".join(quiet)
    for noise in ("LitLogger", "GPU available", "deprecated", "FutureWarning"):
        assert noise not in text
    assert any("3 images embedded" in line for line in quiet), text
    lines = [line for line in quiet if line.strip()]
    assert len(lines) == len(set(lines))
    loud = embed("-v", out="b")
    assert sum("GPU available" in line for line in loud) == 1


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(["int64", "int32", "uint8", "bool"]),
    chunks=st.lists(st.lists(st.integers(0, 2**31 - 1), max_size=40), min_size=1, max_size=4),
    start=st.integers(0, 50),
)
def test_column_numpy_equals_pyarrows_to_numpy(
    kind: str, chunks: list[list[int]], start: int
) -> None:
    """column_numpy (read from the buffers, so no pandas) equals pyarrow's own to_numpy
    for chunked and sliced (offset) integer and boolean columns."""
    import pyarrow as pa

    from retrieval.data.collection import column_numpy

    if kind == "bool":
        arrays = [pa.array([v % 2 == 1 for v in c], pa.bool_()) for c in chunks]
    else:
        mod = 256 if kind == "uint8" else 2**31
        arrays = [pa.array([v % mod for v in c], kind) for c in chunks]
    table = pa.table({"x": pa.chunked_array(arrays, arrays[0].type)})
    table = table.slice(min(start, table.num_rows))
    got = column_numpy(table, "x")
    want = table.column("x").to_numpy()
    assert got.dtype == want.dtype
    assert np.array_equal(got, want)
