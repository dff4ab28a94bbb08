"""Shards round-trip exactly, and chunked exact scoring equals one big computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.representatives import Representatives
from retrieval.retrievers.base import max_cosine
from retrieval.store import ShardStore, score_store


def _reps(b: int, r: int, d: int, seed: int) -> Representatives:
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(b, r, d, generator=g), dim=-1)
    mask = torch.rand(b, r, generator=g) > 0.3
    mask[:, 0] = True
    boxes = torch.rand(b, r, 4, generator=g)
    return Representatives(emb, mask, boxes)


def test_shard_round_trip_fp32(tmp_path: Path) -> None:
    """What is written (fp32) is read back bit for bit, failures included, no temp files."""
    store = ShardStore(tmp_path, dtype="float32")
    reps = _reps(5, 4, 8, 0)
    failures = [{"image_id": 9, "path": "x.jpg", "reason": "truncated"}]
    store.write_shard("rank000-00000", torch.arange(5), reps, failures)
    shard = store.read_shard(store.shard_paths()[0])
    assert np.array_equal(shard.image_ids, np.arange(5))
    assert torch.equal(shard.reps.embeddings, reps.embeddings)
    assert torch.equal(shard.reps.mask, reps.mask)
    assert torch.equal(shard.reps.boxes, reps.boxes)
    assert shard.failures == failures
    assert [p.name for p in tmp_path.iterdir()] == ["rank000-00000.safetensors"]


def test_fp16_store_rounds_embeddings_only(tmp_path: Path) -> None:
    """The default fp16 store keeps embeddings within fp16 rounding, mask exactly."""
    store = ShardStore(tmp_path)
    reps = _reps(3, 2, 16, 1)
    store.write_shard("a", torch.arange(3), reps)
    shard = store.read_shard(store.shard_paths()[0])
    assert shard.reps.embeddings.dtype == torch.float16
    torch.testing.assert_close(shard.reps.embeddings.float(), reps.embeddings, atol=1e-3, rtol=0)
    assert torch.equal(shard.reps.mask, reps.mask)


def test_chunked_scoring_equals_direct_max_cosine(tmp_path: Path) -> None:
    """Scores over several shards with different R, in a tiny memory budget (one image
    per chunk), equal max_cosine on all representatives at once, sorted by image id."""
    store = ShardStore(tmp_path, dtype="float32")
    parts = [_reps(4, 3, 8, 2), _reps(3, 5, 8, 3)]
    ids = [torch.tensor([7, 1, 5, 3]), torch.tensor([2, 6, 4])]
    for i, (part, pid) in enumerate(zip(parts, ids, strict=True)):
        store.write_shard(f"s{i}", pid, part)
    text = F.normalize(torch.randn(6, 8), dim=-1)
    tiny = score_store(store, text, max_cosine, "cpu", max_memory_gb=1e-9)
    big = score_store(store, text, max_cosine, "cpu", max_memory_gb=4)

    all_reps = Representatives.concat(parts)
    order = torch.cat(ids).argsort()
    expected = max_cosine(text, all_reps)[:, order].numpy()
    assert np.array_equal(tiny.image_ids, np.arange(1, 8))
    np.testing.assert_allclose(tiny.scores, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tiny.scores, big.scores)  # chunking never changes a bit
    assert list(tiny.reps_per_image) == all_reps.counts[order].tolist()


def test_max_cosine_matches_numpy_loop() -> None:
    """max_cosine == a NumPy loop taking the max over each image's valid reps."""
    reps = _reps(4, 6, 5, 4)
    text = F.normalize(torch.randn(3, 5), dim=-1)
    got = max_cosine(text, reps).numpy()
    emb, mask, t = reps.embeddings.numpy(), reps.mask.numpy(), text.numpy()
    for q in range(3):
        for b in range(4):
            assert np.isclose(
                got[q, b], max(t[q] @ emb[b, r] for r in range(6) if mask[b, r]), atol=1e-6
            )


def test_concat_pads_with_invalid_reps() -> None:
    """concat pads smaller R with masked-out rows and keeps every valid one."""
    a, b = _reps(2, 2, 4, 5), _reps(1, 5, 4, 6)
    c = Representatives.concat([a, b])
    assert c.embeddings.shape == (3, 5, 4)
    assert not c.mask[:2, 2:].any()
    assert torch.equal(c.counts, torch.cat([a.counts, b.counts]))
