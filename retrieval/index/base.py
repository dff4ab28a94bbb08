"""The backend interface: ``add(image_ids, reps)``, ``finish()``, ``search(q, k)``.

An image's score is the max cosine over its representatives, so a backend either groups
natively or fetches the top representatives and groups them by image (over-fetch). Every
backend answers a query with table rows, the best-matching representative of each top
image; the base class turns rows into :class:`Hit` (image id, score, representative
index, box). Backends register under a name with :func:`register_backend`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from retrieval.errors import ConfigError, IndexFileError
from retrieval.index.table import RepTable, TableWriter
from retrieval.representatives import Representatives

RowHits = tuple[np.ndarray, np.ndarray]  # (table rows, scores), best first


class Hit(NamedTuple):
    """One retrieved image: its score and the representative that gave it."""

    image_id: int
    score: float
    rep_index: int
    box: tuple[float, float, float, float] | None


class Backend(ABC):
    """A vector index over a :class:`RepTable`, answering top images by max cosine.

    Args:
        folder: where the table and the backend's own files live.
        dim: embedding size ``D``.
        device: ``auto``, ``cpu`` or ``cuda[:i]`` where the backend computes on torch.
        options: backend-specific settings (see each backend); tuned values included.
    """

    name: str = ""
    approximate: ClassVar[bool] = False

    def __init__(self, folder: str | Path, dim: int, device: str = "auto", **options: Any) -> None:
        self.folder = Path(folder)
        self.dim = dim
        self.device = device
        self.options = options
        self.table: RepTable | None = None
        self._writer: TableWriter | None = None

    def add(self, image_ids: np.ndarray | Tensor, reps: Representatives) -> None:
        """Adds a batch of images with their representatives (before :meth:`finish`)."""
        if self.table is not None:
            raise IndexFileError(f"index {self.folder} is finished: build a new one to add")
        if self._writer is None:
            self._writer = TableWriter(self.folder, self.dim)
        self._writer.append(image_ids, reps)

    def finish(self, progress: bool = False) -> None:
        """Seals the table and builds the backend's structure from it."""
        if self._writer is None:
            self._writer = TableWriter(self.folder, self.dim)
        self.table = self._writer.close()
        self._writer = None
        self.build(progress)

    @classmethod
    def open(cls, folder: str | Path, dim: int, device: str = "auto", **options: Any) -> Backend:
        """Opens a finished index (its table and the backend's own files)."""
        backend = cls(folder, dim, device, **options)
        backend.table = RepTable.open(backend.folder, dim)
        backend.load()
        return backend

    def search(self, queries: Tensor | np.ndarray, k: int) -> list[list[Hit]]:
        """Top ``k`` images of each query ``[Q, D]`` (or one ``[D]``), best first."""
        q = torch.as_tensor(queries).float()
        q = q.unsqueeze(0) if q.ndim == 1 else q
        self.require_table()
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise IndexFileError(
                f"query embedding size {tuple(q.shape)[-1]} does not match this index's "
                f"{self.dim}: queries must come from the retriever that made the index"
            )
        if k < 1:
            raise ConfigError(f"top k must be at least 1, got {k}: ask for --top 1 or more")
        return [self.hits(rows, scores) for rows, scores in self.search_rows(q, k)]

    def require_table(self) -> RepTable:
        if self.table is None:
            raise IndexFileError(f"index {self.folder} is not finished: call finish() first")
        if self.table.num_rows == 0:
            raise IndexFileError(
                f"index {self.folder} is empty (no image has a valid representative): "
                f"nothing to search; build it from a run that holds embeddings"
            )
        return self.table

    def hits(self, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
        table = self.require_table()
        out: list[Hit] = []
        for row, score in zip(rows.tolist(), scores.tolist(), strict=True):
            box: tuple[float, float, float, float] | None = None
            if table.boxes is not None:
                x0, y0, x1, y1 = (float(v) for v in table.boxes[row])  # xyxy
                box = (x0, y0, x1, y1)
            out.append(
                Hit(
                    int(table.image_ids[table.owner[row]]), float(score), int(table.slots[row]), box
                )
            )
        return out

    def state(self) -> dict[str, Any]:
        """Options to store in the index manifest so :meth:`open` rebuilds this backend."""
        return dict(self.options)

    def tune(  # noqa: B027 - an optional hook: exact backends have nothing to tune
        self, queries: Tensor, truth: list[np.ndarray], k: int, target: float
    ) -> None:
        """Chooses settings that reach ``target`` recall@k against exact image lists
        ``truth`` (table image positions); exact backends need none. Approximate ones
        say what to try and how to measure it to :func:`~retrieval.index.tuning.tune_settings`."""

    def files(self) -> list[Path]:
        """Files this index consists of (the table's and the backend's own)."""
        return self.require_table().files() + self.own_files()

    def own_files(self) -> list[Path]:
        return []

    def disk_bytes(self) -> int:
        """Bytes this index takes on disk."""
        return sum(p.stat().st_size for p in self.files())

    def close(self) -> None:  # noqa: B027 - an optional hook: most backends hold no session
        """Releases what the backend holds open (a client, an embedded server)."""

    def memory_bytes(self) -> int:
        """Bytes resident in memory while searching (memory-mapped vectors not counted)."""
        return self.require_table().meta_bytes()

    @abstractmethod
    def build(self, progress: bool) -> None:
        """Builds (and saves) the backend's structure from :attr:`table`."""

    def load(self) -> None:  # noqa: B027 - an optional hook: not every backend has files
        """Loads the backend's saved structure (after :attr:`table` is set)."""

    @abstractmethod
    def search_rows(self, queries: Tensor, k: int) -> list[RowHits]:
        """Per query, the best row of each of the top ``k`` images, best first."""


def first_per_image(rows: np.ndarray, scores: np.ndarray, owner: np.ndarray, k: int) -> RowHits:
    """Groups representatives (best first) by image: each image's first row, top ``k``.

    With exact scores and rows sorted best first, an image's first row is its max, so the
    first ``k`` distinct images are the exact top ``k`` whenever ``k`` distinct images occur.
    """
    valid = rows >= 0
    rows, scores = rows[valid], scores[valid]
    _, first = np.unique(owner[rows], return_index=True)
    first = np.sort(first)[:k]
    return rows[first], scores[first]
