"""Careless inputs to the unlabelled collections (issue 24, items 5, 10 and the list-file
part of 12): a typo'd webdataset brace range is refused before it is expanded; names that
are not UTF-8 (a folder's files, a tar's members) are left out, counted and listed, not a
pyarrow crash; a list file with a repeated column is one message. Hypothesis fuzzes the
brace counter against braceexpand itself and list files against the one-message rule."""

from __future__ import annotations

import io
import os
import resource
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from braceexpand import UnbalancedBracesError, braceexpand
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from retrieval.data.collection import NOT_UTF8, NOT_UTF8_REASON
from retrieval.data.folder import FolderDataset
from retrieval.data.listfile import ListDataset
from retrieval.data.webdataset import MAX_SHARDS, WebDataset, count_names, expand_shards
from retrieval.errors import ConfigError, DataError, RetrievalError


def jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (20, 24, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


# -- 5. brace ranges ---------------------------------------------------------------------


def test_typod_brace_range_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    """The issue's reproduction, `data.shards=shards/{000000..999999999}.tar` (a billion
    names; the process grew to 21 GB before the OOM killer): one ConfigError naming the
    count and the limit, at once and without the memory (the peak RSS grows by less
    than 50 MB)."""
    pattern = f"{tmp_path}/shards/{{000000..999999999}}.tar"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=rf"names 1,000,000,000 shards.*limit of {MAX_SHARDS:,}"):
        WebDataset(pattern, progress=False)
    assert time.perf_counter() - start < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB
    with pytest.raises(ConfigError, match="names 200,000 shards"):  # a product of groups
        expand_shards(f"{tmp_path}/{{0..999}}/{{0..199}}.tar")
    with pytest.raises(ConfigError, match="unbalanced braces"):
        expand_shards(f"{tmp_path}/{{0..9.tar")
    root, shards = expand_shards(f"{tmp_path}/a/{{0..2}}.tar::{tmp_path}/b/{{x,y}}.tar")
    assert root == tmp_path
    assert len(shards) == 5


PATTERN_CHARS = st.sampled_from(list("{},.ab019-\\") + ["..", "{0..", "{a..c}", "{1,2}"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(PATTERN_CHARS, max_size=10).map("".join))
def test_brace_count_equals_braceexpand(pattern: str) -> None:
    """Invariant: for every pattern braceexpand accepts, count_names (which never
    expands) equals the number of names braceexpand yields (the reference)."""
    try:
        names = list(braceexpand(pattern))
    except UnbalancedBracesError:
        return
    assert count_names(pattern) == len(names)


# -- 10. names that are not UTF-8 --------------------------------------------------------


def test_folder_names_not_utf8_are_left_out_counted_and_listed(tmp_path: Path) -> None:
    """A file and a folder whose names are Latin-1 bytes (`café.jpg`): the listing
    counts them under "names not UTF-8" and keeps them in failures_at_start (the run's
    skipped.csv) with the reason; the rest is listed as usual (this was a pyarrow
    UnicodeEncodeError)."""
    root = tmp_path / "photos"
    root.mkdir()
    (root / "good.jpg").write_bytes(jpeg(1))
    bad_file = os.path.join(os.fsencode(root), b"caf\xe9.jpg")
    with open(bad_file, "wb") as f:
        f.write(jpeg(2))
    bad_folder = os.path.join(os.fsencode(root), b"\xff")
    os.mkdir(bad_folder)
    with open(os.path.join(bad_folder, b"inner.jpg"), "wb") as f:
        f.write(jpeg(3))
    dataset = FolderDataset(str(root), run_dir=tmp_path / "run", progress=False)
    assert len(dataset.image_ids) == 1
    left_out = sorted(os.fsencode(f["path"]) for f in dataset.failures_at_start)
    assert left_out == sorted([bad_file, bad_folder])
    assert {f["reason"] for f in dataset.failures_at_start} == {NOT_UTF8_REASON}


def test_tar_member_names_not_utf8_are_left_out_counted_and_listed(tmp_path: Path) -> None:
    """A tar member named with Latin-1 bytes: left out, counted, listed with its shard;
    the shard's other samples are listed as usual."""
    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("000001.jpg", jpeg(1)), (os.fsdecode(b"caf\xe9.jpg"), jpeg(2))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dataset = WebDataset(str(shard), run_dir=tmp_path / "run", progress=False)
    assert len(dataset.image_ids) == 1
    [failure] = dataset.failures_at_start
    assert failure["reason"] == NOT_UTF8_REASON
    assert os.fsencode(failure["path"]) == os.fsencode(shard) + b"/caf\xe9.jpg"
    assert NOT_UTF8 == "names not UTF-8"


# -- 12. list files ----------------------------------------------------------------------


def test_list_file_with_two_path_columns_is_one_message(tmp_path: Path) -> None:
    """`path,path` in the header (a KeyError before): a DataError naming the column."""
    (tmp_path / "a.jpg").write_bytes(jpeg(1))
    listing = tmp_path / "list.csv"
    listing.write_text("path,path\na.jpg,a.jpg\n")
    with pytest.raises(DataError, match=r"column\(s\) 'path' appear more than once"):
        ListDataset(str(listing), progress=False)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.lists(st.sampled_from(["path", "label", "image_id", "x", "", "path "]), max_size=4),
    cells=st.lists(
        st.lists(st.sampled_from(["a.jpg", "b.jpg", "", "../a.jpg", "/etc/passwd", "é", '"']))
    ),
    raw=st.binary(max_size=40),
)
@example(header=[], cells=[], raw=b"\x80\n")  # a header that is not UTF-8
def test_any_list_file_is_a_collection_or_one_message(
    tmp_path_factory: pytest.TempPathFactory, header: list[str], cells: list[list[str]], raw: bytes
) -> None:
    """Invariant: whatever a CSV list file holds (any header, rows of any width, stray
    quotes, bytes that are not UTF-8), ListDataset builds a collection of existing
    files inside the list's folder or raises a RetrievalError; never another exception."""
    folder = tmp_path_factory.mktemp("list")
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(jpeg(len(name)))
    text = ",".join(header) + "\n" + "\n".join(",".join(row) for row in cells)
    listing = folder / "list.csv"
    listing.write_bytes(text.encode() + raw)
    try:
        dataset = ListDataset(str(listing), images=str(folder), progress=False)
    except RetrievalError:
        return
    for image_id in dataset.image_ids:
        assert dataset.image_path(int(image_id)).resolve().parent == folder.resolve()
