"""One evaluation run: the embed phase, then the score phase, sharing one retriever and
dataset. A rerun whose image embeddings would be identical (same retriever options,
same images) embeds nothing and re-scores the stored shards, so new prompts or
protocol options cost seconds.
"""

from __future__ import annotations

from omegaconf import DictConfig

from retrieval.engine.embedding import embed
from retrieval.engine.parts import build_parts
from retrieval.engine.scoring import RunResult, require_labels, score


def evaluate(cfg: DictConfig) -> RunResult | None:
    """Runs one evaluation; returns the result on global rank 0, None on other ranks."""
    require_labels(cfg)
    parts = build_parts(cfg)
    embedded = embed(cfg, parts)
    if not embedded.is_global_zero:
        return None
    return score(cfg, parts, embedded)
