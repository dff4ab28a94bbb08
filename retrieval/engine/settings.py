"""The config sections the engine reads, typed: the schema's own dataclasses
(:mod:`retrieval.config`), built once from a validated config. An engine function takes
the sections it reads, so it names them, and no default is written twice (the
schema holds every one: nothing here reads a key with ``.get(key, default)``).

Lightning-free (the score phase uses it).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from retrieval.config import (
    LoaderConfig,
    ProtocolConfig,
    RunConfig,
    ScoreConfig,
    StoreConfig,
    TextConfig,
    TrainerConfig,
)


@dataclass(frozen=True)
class RunSettings:
    """The fixed sections of a run's config (``data`` and ``retriever`` are derived from
    the chosen components' signatures and stay mappings)."""

    run: RunConfig
    trainer: TrainerConfig
    loader: LoaderConfig
    store: StoreConfig
    score: ScoreConfig
    text: TextConfig
    protocol: ProtocolConfig

    @classmethod
    def of(cls, cfg: DictConfig) -> RunSettings:
        """The sections of ``cfg`` (``load_config``'s) as their schema dataclasses."""
        sections: dict[str, Any] = {}
        for name, kind in typing.get_type_hints(cls).items():
            node = OmegaConf.merge(OmegaConf.structured(kind), cfg[name])
            sections[name] = OmegaConf.to_object(node)
        return cls(**sections)
