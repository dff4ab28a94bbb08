"""Data steps a sweep may name (``prepare:``): make its data before planning reads it.

Only data that can be made here: the scenes benchmark's generated evaluation set. Real
datasets are the user's (``retrieval data check`` says what is missing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from omegaconf import DictConfig

from retrieval.errors import ConfigError, did_you_mean


def scenes(cfgs: Sequence[DictConfig]) -> None:
    """Generates the held-out scenes (``scenes`` preset) where the runs' annotations
    point (``<dir>/annotations.json`` + ``<dir>/images``), unless already there."""
    from retrieval.data.synthetic import ensure_synthetic, scenes_options

    for folder in sorted({Path(str(cfg.data.annotations)).parent for cfg in cfgs}):
        ensure_synthetic(folder, scenes_options("eval"))


STEPS: dict[str, Callable[[Sequence[DictConfig]], None]] = {"scenes": scenes}


def prepare(name: str, cfgs: Sequence[DictConfig]) -> None:
    """Runs the named data step over the sweep's run configs."""
    if name not in STEPS:
        raise ConfigError(
            f"prepare: unknown data step {name!r}.{did_you_mean(name, list(STEPS))} "
            f"Known: {', '.join(STEPS)} (or none)"
        )
    STEPS[name](cfgs)
