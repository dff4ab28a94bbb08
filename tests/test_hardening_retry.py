"""Issue 15, item 5: a skipped image does not stay skipped after it is fixed.

Each failure is stored with its file's identity (size + mtime_ns when it failed). The
next run treats a stored failure as done only while the file is unchanged and the policy
is ``skip``: a fixed file is embedded into a new shard (its old record no longer counts),
and ``data.on_bad_image=error`` retries every stored failure and stops on a still-bad one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retrieval.config import load_config
from retrieval.data.images import BadImageError
from retrieval.data.synthetic import make_synthetic_coco
from retrieval.engine import evaluate
from retrieval.representatives import Representatives
from retrieval.retrievers.clip import ClipRetriever
from retrieval.store import ShardStore

GOOD, BAD = 6, 2


@pytest.fixture
def bad_data(tmp_path: Path) -> tuple[Path, Path]:
    """6 good images plus 2 broken ones (ids 7 and 8); a fresh copy per test (the tests
    repair files)."""
    return make_synthetic_coco(tmp_path / "data", num_images=GOOD, seed=11, bad_images=BAD)


def _cfg(data: tuple[Path, Path], out: Path, policy: str):
    ann, images = data
    return load_config(
        "demo",
        [
            f"data.annotations={ann}",
            f"data.images={images}",
            f"run.output_dir={out}",
            f"data.on_bad_image={policy}",
            "run.progress=false",
            "loader.num_workers=0",
            "logger.wandb.mode=disabled",
        ],
    )


def _bad_files(data: tuple[Path, Path]) -> dict[int, Path]:
    ann, images = data
    listed = json.loads(ann.read_text())["images"]
    return {im["id"]: images / im["file_name"] for im in listed if im["id"] > GOOD}


def _skipped(metrics: dict) -> list[int]:
    return sorted(int(f["image_id"]) for f in metrics["skipped_images"])


def _count_encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patches the backbone to record how many images each call embeds."""
    calls: list[int] = []
    encode = ClipRetriever.encode_images

    def counting(self: ClipRetriever, pixels: torch.Tensor) -> Representatives:
        calls.append(len(pixels))
        return encode(self, pixels)

    monkeypatch.setattr(ClipRetriever, "encode_images", counting)
    return calls


def test_fixed_image_is_embedded_and_no_longer_listed(
    bad_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """skip lists both broken files; after one is replaced by a valid image the next run
    embeds exactly that image (into a new shard) and lists only the other one."""
    out = tmp_path / "run"
    first = evaluate(_cfg(bad_data, out, "skip"))
    assert _skipped(first.metrics) == [7, 8]
    assert first.metrics["images"] == GOOD
    stored = ShardStore(out / "embeddings")
    shards_before = set(stored.shard_paths())
    records = [f for shard in stored.iter_shards() for f in shard.failures]
    assert all(f["file"] and f["file"]["bytes"] >= 0 for f in records)  # identity kept

    fixed = _bad_files(bad_data)[7]
    Image.new("RGB", (40, 30), (200, 30, 90)).save(fixed, format="JPEG")
    calls = _count_encoded(monkeypatch)
    second = evaluate(_cfg(bad_data, out, "skip"))
    assert sum(calls) == 1
    assert second.embedded == 1
    assert _skipped(second.metrics) == [8]
    assert second.metrics["images"] == GOOD + 1
    assert 7 in np.load(out / "scores.npz")["image_ids"].tolist()
    new = set(stored.shard_paths()) - shards_before
    assert new
    assert all(p in set(stored.shard_paths()) for p in shards_before)
    embedded, failures = stored.contents()
    assert sorted(embedded.tolist()) == list(range(1, GOOD + 2))
    assert [f["image_id"] for f in failures] == [8]

    calls.clear()  # a third run has nothing left to do
    third = evaluate(_cfg(bad_data, out, "skip"))
    assert not calls
    assert not third.embedded
    assert _skipped(third.metrics) == [8]


def test_unchanged_broken_file_is_not_retried_under_skip(
    bad_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken file left as it was stays a recorded skip: nothing is embedded again and
    it is listed once, not once per run."""
    out = tmp_path / "run"
    evaluate(_cfg(bad_data, out, "skip"))
    calls = _count_encoded(monkeypatch)
    again = evaluate(_cfg(bad_data, out, "skip"))
    assert not calls
    assert not again.embedded
    assert _skipped(again.metrics) == [7, 8]


def test_changed_but_still_broken_file_is_listed_once(bad_data, tmp_path: Path) -> None:
    """A file replaced by another broken one is read again; it fails again and the newest
    record is the one listed (one entry per image, with the new file's reason)."""
    out = tmp_path / "run"
    evaluate(_cfg(bad_data, out, "skip"))
    _bad_files(bad_data)[8].write_bytes(b"still not an image, but longer than before")
    again = evaluate(_cfg(bad_data, out, "skip"))
    assert _skipped(again.metrics) == [7, 8]
    assert again.embedded == 0  # image 8 was read again and failed (its second record
    # below); 7 was not read
    store = ShardStore(out / "embeddings")
    records = [f for shard in store.iter_shards() for f in shard.failures]
    assert [f["image_id"] for f in records].count(8) == 2  # both kept on disk
    newest = next(f for f in store.contents()[1] if f["image_id"] == 8)
    assert newest["file"]["bytes"] == _bad_files(bad_data)[8].stat().st_size


def test_error_policy_retries_stored_failures(bad_data, tmp_path: Path) -> None:
    """A failure recorded under skip does not let a run under data.on_bad_image=error
    pass: the still-broken file is read again and stops the run with the named error."""
    out = tmp_path / "run"
    evaluate(_cfg(bad_data, out, "skip"))
    with pytest.raises(BadImageError, match="cannot read image"):
        evaluate(_cfg(bad_data, out, "error"))
    for path in _bad_files(bad_data).values():  # once both are fixed, error passes
        Image.new("RGB", (40, 30), (10, 200, 90)).save(path, format="JPEG")
    fixed = evaluate(_cfg(bad_data, out, "error"))
    assert fixed.embedded == BAD
    assert not _skipped(fixed.metrics)
    assert fixed.metrics["images"] == GOOD + BAD


def test_newest_failure_record_wins(tmp_path: Path) -> None:
    """Shards are never rewritten: of several records for one image the latest written
    counts, and none counts once a shard holds the image embedded."""
    store = ShardStore(tmp_path)
    empty = Representatives.empty()
    none = torch.zeros(0, dtype=torch.int64)

    def fail(image_id: int, reason: str) -> dict:
        return {"image_id": image_id, "path": "x.jpg", "reason": reason, "file": None}

    store.write_shard("rank001-00000", none, empty, [fail(1, "old"), fail(2, "old")])
    store.write_shard("rank000-00001", none, empty, [fail(1, "new")])
    reps = Representatives(torch.ones(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    store.write_shard("rank000-00002", torch.tensor([2]), reps, [])
    embedded, failures = store.contents()
    assert embedded.tolist() == [2]
    assert failures == [fail(1, "new")]
