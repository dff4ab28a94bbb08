"""Embedding shards on disk and exact scoring over them."""

from retrieval.store.scoring import ScoreResult, score_store
from retrieval.store.shards import Shard, ShardStore

__all__ = ["ScoreResult", "Shard", "ShardStore", "score_store"]
