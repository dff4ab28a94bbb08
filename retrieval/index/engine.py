"""The engine protocol: the small interface an index backend plugin implements.

An index is two parts. The shared front end (:class:`~retrieval.index.base.Backend`)
owns the representative table, stages and commits updates, maps image ids to table
positions, turns rows into hits and sizes the index; build, update and search use it
alone. The engine (:class:`Engine`, one per backend: exact, faiss, LanceDB, Milvus, a
plugin) holds the vector structure over the table's rows and answers with rows:

- ``build`` / ``load`` / ``save`` its structure (``own_files`` lists what it wrote);
- ``search`` (and, where the engine filters natively, ``search_in``) returns per query
  the best row of each of the top ``k`` images;
- ``add`` / ``remove`` follow the table's updates (``updatable`` engines only);
- ``tune`` chooses settings reaching a recall target (``approximate`` ones).

Options are typed, as FiftyOne's ``SimilarityConfig`` types a similarity backend's: an
engine declares a dataclass of :class:`EngineOptions` (``--option key=value`` fills
it; an unknown key is one :class:`ConfigError` naming it and the accepted ones), and
:meth:`EngineOptions.state` is what the index manifest stores so ``open`` rebuilds the
same options: the user's, plus what the engine chose or tuned (every option not None).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from torch import Tensor

from retrieval.errors import ConfigError, did_you_mean
from retrieval.index.kernels import RowHits, exact_search
from retrieval.index.table import RepTable

if TYPE_CHECKING:
    from typing import Self

    from retrieval.index.base import Backend


def state_field() -> Any:
    """A dataclass field for what the engine records, not what a user sets (faiss's
    segments, LanceDB's version): stored in :meth:`EngineOptions.state`, unset (None)
    until the engine sets it, and left out of :meth:`EngineOptions.settable`."""
    return dataclasses.field(default=None, metadata={"state": True})


def chosen(when_unset: str) -> Any:
    """A dataclass field a user may set, unset (None) by default: the engine chooses it
    then, as ``when_unset`` says (shown by ``retrieval list``, e.g. ``nprobe=<tuned>``)."""
    return dataclasses.field(default=None, metadata={"unset": when_unset})


@dataclasses.dataclass
class EngineOptions:
    """An engine's options (none here: an engine subclasses this as a dataclass)."""

    @classmethod
    def parse(cls, backend: str, options: Mapping[str, Any]) -> Self:
        """The options ``backend`` was given (``--option``, registered defaults, or a
        stored :meth:`state`); an unknown key is refused naming it and the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in known:
                accepted = ", ".join(known) if known else "none"
                raise ConfigError(
                    f"index backend {backend!r} has no option {key!r} (it accepts: "
                    f"{accepted}); drop --option {key}=...{did_you_mean(key, known)}"
                )
        return cls(**options)

    @classmethod
    def settable(cls) -> dict[str, Any]:
        """The options a user sets (``--option``), with their defaults (None: chosen by
        the engine)."""
        return {
            f.name: None if f.default is dataclasses.MISSING else f.default
            for f in dataclasses.fields(cls)
            if not f.metadata.get("state")
        }

    def shown(self) -> str:
        """The settable options as ``retrieval list`` shows them: ``key=value``, or
        ``key=<what the engine does when it is unset>`` (a plugin's unset option without
        a :func:`chosen` field: the bare key)."""
        unset = {f.name: f.metadata.get("unset") for f in dataclasses.fields(self)}
        parts = []
        for key in self.settable():
            value = getattr(self, key)
            if value is not None:
                parts.append(f"{key}={value}")
            else:
                parts.append(f"{key}=<{unset[key]}>" if unset[key] else key)
        return ", ".join(parts)

    def state(self) -> dict[str, Any]:
        """What the index manifest stores so ``open`` rebuilds these options: every
        option that is set (None is unset)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {key: value for key, value in values.items() if value is not None}


class Engine(ABC):
    """A vector structure over the front end's table rows, answering with rows.

    Capabilities, declared: ``approximate`` (its answers may miss images: the build
    tunes it and measures its recall against exact search), ``updatable`` (it
    implements :meth:`add` and :meth:`remove`; else an update says to rebuild),
    ``native_filter`` (it implements :meth:`search_in` in the engine; else a filtered
    search re-scores the allowed images' rows exactly).

    Args:
        backend: the front end it belongs to (its table, folder, size, device).
        options: its typed options.
    """

    Options: ClassVar[type[EngineOptions]] = EngineOptions
    updatable: ClassVar[bool] = False
    native_filter: ClassVar[bool] = False

    def __init__(self, backend: Backend, options: EngineOptions) -> None:
        self.backend = backend
        self.options = options

    @property
    def approximate(self) -> bool:
        """Whether its answers may miss top images (a property: it may depend on the
        options, as faiss's does on ``kind``)."""
        return False

    @property
    def folder(self) -> Path:
        return self.backend.folder

    @property
    def dim(self) -> int:
        return self.backend.dim

    @property
    def device(self) -> str:
        return self.backend.device

    @property
    def generation(self) -> int:
        return self.backend.generation

    @property
    def updating(self) -> bool:
        """Opened by an update (an engine may then accept what an unfinished one left)."""
        return self.backend.updating

    def require_table(self, allow_empty: bool = False) -> RepTable:
        """The front end's table (see :meth:`Backend.require_table`)."""
        return self.backend.require_table(allow_empty)

    @abstractmethod
    def build(self, progress: bool) -> None:
        """Builds the structure from the table's live rows."""

    def load(self) -> None:  # noqa: B027 - an optional hook: not every engine has files
        """Reads the saved structure back (the table is open)."""

    def save(self) -> None:  # noqa: B027 - an optional hook: not every engine has files
        """Writes the files of :attr:`generation` (after build or an update) under names
        no other generation uses, so the previous one stays readable."""

    @abstractmethod
    def search(self, queries: Tensor, k: int) -> list[RowHits]:
        """Per query ``[Q, D]``, the best row of each of the top ``k`` images, best first."""

    def search_in(self, queries: Tensor, k: int, images: np.ndarray) -> list[RowHits]:
        """:meth:`search` among the images at table positions ``images`` (ascending,
        live, non-empty) only; called for ``native_filter`` engines, which push the
        filter into their own search. This default (what the front end does for the
        others, and what a native one falls back to past its limits) re-scores their
        rows exactly from the fp16 table."""
        return exact_search(self.require_table(), queries, k, self.device, images=images)

    def maxsim(self, queries: Tensor, k: int, images: np.ndarray | None) -> RowHits | None:
        """A multi-vector query's top ``k`` images by MaxSim in one pass, where the engine
        scores every row itself (exact: over its resident copy); None (this default):
        the front end gathers each query vector's candidates and re-scores them exactly
        (:mod:`retrieval.index.multivector`)."""
        return None

    def add(self, rows: np.ndarray, progress: bool) -> None:
        """Indexes the table rows ``rows`` an update appended (ascending); ``updatable``
        engines implement it (the front end refuses updates to the others first)."""
        raise NotImplementedError(f"{type(self).__name__} declares updatable but no add()")

    def remove(self, rows: np.ndarray) -> None:
        """Stops returning the table rows ``rows`` of images an update removed (they stay
        in the table, tombstoned); ``updatable`` engines implement it."""
        raise NotImplementedError(f"{type(self).__name__} declares updatable but no remove()")

    def tune(  # noqa: B027 - an optional hook: exact engines have nothing to tune
        self, queries: Tensor, truth: list[np.ndarray], k: int, target: float
    ) -> None:
        """Chooses settings that reach ``target`` recall@k against exact image lists
        ``truth`` (table image positions), with :func:`~retrieval.index.tuning.tune_settings`."""

    @property
    def tunable(self) -> bool:
        """Whether it has settings to tune (it overrides :meth:`tune`)."""
        return type(self).tune is not Engine.tune

    def own_files(self) -> list[Path]:
        """The files it wrote for this generation (the table's are the front end's)."""
        return []

    def memory_bytes(self) -> int:
        """Bytes it holds in memory while searching, beyond the table's metadata."""
        return 0

    def disk_bytes(self) -> int:
        """Bytes it keeps on disk outside :meth:`own_files` (a folder it rewrites)."""
        return 0

    def close(self) -> None:  # noqa: B027 - an optional hook: most engines hold no session
        """Releases what it holds open (a client, an embedded server)."""
