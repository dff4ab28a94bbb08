"""One evaluation run: the embed phase, then the score phase, sharing one retriever and
dataset. A rerun whose image embeddings would be identical (same retriever options,
same images) embeds nothing and re-scores the stored shards, so new prompts or
protocol options cost seconds.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from retrieval.engine.embedding import embed, global_rank
from retrieval.engine.parts import build_parts
from retrieval.engine.scoring import RunResult, require_labels, score
from retrieval.store.lock import RunLock


def evaluate(cfg: DictConfig) -> RunResult | None:
    """Runs one evaluation; returns the result on global rank 0, None on other ranks.

    Global rank 0 holds the run folder's lock from before the model is built until the
    results are written, so a second run into the same folder stops at once.
    """
    require_labels(cfg)
    if global_rank() != 0:
        embed(cfg, build_parts(cfg))
        return None
    with RunLock(Path(cfg.run.output_dir)):
        parts = build_parts(cfg)
        embedded = embed(cfg, parts, locked=True)
        return score(cfg, parts, embedded)
