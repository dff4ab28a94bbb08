"""The run layer: the embed phase (Lightning predict -> shards) and the score phase
(stored shards -> metrics -> report), and ``evaluate`` = embed then score.

``score`` needs no Lightning; names are imported on first use so that importing it
does not load Lightning either.
"""

from __future__ import annotations

import importlib
from typing import Any

_NAMES = {
    "embed": "retrieval.engine.embedding",
    "EmbedResult": "retrieval.engine.embedding",
    "score": "retrieval.engine.scoring",
    "RunResult": "retrieval.engine.scoring",
    "evaluate": "retrieval.engine.evaluation",
    "build_parts": "retrieval.engine.parts",
    "RunParts": "retrieval.engine.parts",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name not in _NAMES:
        raise AttributeError(f"module 'retrieval.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_NAMES[name]), name)
