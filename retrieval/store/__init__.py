"""Embedding shards on disk and exact scoring over them.

The names load on first use (:mod:`retrieval.lazy`): reading a shard's arrays
(:meth:`~retrieval.store.shards.ShardReader.arrays`, what export uses) needs no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retrieval.lazy import lazy_exports

if TYPE_CHECKING:
    from retrieval.store.scoring import ScoreResult, score_store
    from retrieval.store.shards import Shard, ShardStore

__all__ = ["ScoreResult", "Shard", "ShardStore", "score_store"]

__getattr__, __dir__ = lazy_exports(
    __name__,
    globals(),
    {
        "ScoreResult": "retrieval.store.scoring",
        "Shard": "retrieval.store.shards",
        "ShardStore": "retrieval.store.shards",
        "score_store": "retrieval.store.scoring",
    },
)
