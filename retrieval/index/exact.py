"""``exact``: chunked matrix products over the memory-mapped fp16 table, CPU or GPU.

No approximation: every representative is scored, each image keeps its max (and the
first representative reaching it, as ``argmax_representative`` does). It is the default
and the reference every approximate backend's recall is measured against. One query at
a time on a CPU, faiss's fp16 flat codes are faster (results/bench/search_cpu.md):
``faiss`` is the exact choice for interactive search on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from retrieval.index.base import register_backend
from retrieval.index.engine import Engine, EngineOptions, chosen
from retrieval.index.kernels import RowHits, exact_search, maxsim_search
from retrieval.store.scoring import resolve_device

MAX_MEMORY_GB = 4.0  # the vectors stay resident up to this size (fp16 on a GPU, fp32 on a CPU)


@dataclass
class ExactOptions(EngineOptions):
    """``max_memory_gb``: the most the resident copy of the vectors may take (default
    ``MAX_MEMORY_GB``); past it they are streamed from the table by chunk."""

    max_memory_gb: float | None = chosen(f"{MAX_MEMORY_GB:g} GB")


@register_backend("exact")
class ExactBackend(Engine):
    """Brute force over every representative, the vectors kept resident when they fit
    ``max_memory_gb``: fp16 on a GPU, fp32 on a CPU (converting fp16 on a CPU costs
    more than the product itself), otherwise streamed from the table by chunk."""

    Options = ExactOptions
    options: ExactOptions
    updatable = True
    native_filter = True
    _vectors: Tensor | None = None  # the resident copy, made at the first search

    def build(self, progress: bool) -> None:
        """Nothing to build: the table is the index."""

    def add(self, rows: np.ndarray, progress: bool) -> None:
        """The table is the index: only the resident copy is dropped (read again)."""
        self._vectors = None

    def remove(self, rows: np.ndarray) -> None:
        """Removed images are masked by the table's tombstones."""

    def _resident_dtype(self) -> torch.dtype | None:
        """The dtype the vectors stay in memory as, or None when they do not fit."""
        dtype = torch.float16 if resolve_device(self.device).type == "cuda" else torch.float32
        nbytes = self.require_table().vectors.size * dtype.itemsize
        limit = self.options.max_memory_gb
        limit = MAX_MEMORY_GB if limit is None else limit
        return None if nbytes > limit * 1024**3 else dtype

    def _resident(self) -> Tensor | None:
        dtype = self._resident_dtype()
        if dtype is not None and self._vectors is None:
            self._vectors = torch.from_numpy(np.array(self.require_table().vectors)).to(
                resolve_device(self.device), dtype
            )
        return None if dtype is None else self._vectors

    def search(self, queries: Tensor, k: int) -> list[RowHits]:
        return exact_search(self.require_table(), queries, k, self.device, self._resident())

    def search_in(self, queries: Tensor, k: int, images: np.ndarray) -> list[RowHits]:
        """The allowed images' rows alone, or the table with the rest masked."""
        table = self.require_table()
        return exact_search(table, queries, k, self.device, self._resident(), images)

    def maxsim(self, queries: Tensor, k: int, images: np.ndarray | None) -> RowHits:
        """A multi-vector query's exact top ``k`` (:func:`maxsim_search`), resident."""
        table = self.require_table()
        return maxsim_search(table, queries, k, self.device, self._resident(), images)

    def memory_bytes(self) -> int:
        """Every vector is read by every query: the resident copy (or the table) counts."""
        dtype = self._resident_dtype()
        return self.require_table().vectors.size * (2 if dtype is None else dtype.itemsize)
