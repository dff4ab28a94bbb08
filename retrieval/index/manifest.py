"""An index folder and its typed manifest (``index.json``), and how far its run has moved
on, read without torch: ``retrieval index info`` and the staleness notes of ``search``
and ``serve`` need no model and no backend.

:class:`IndexManifest` holds the fields ``index.json`` holds; :meth:`IndexFolder.manifest`
validates them on read (one :class:`IndexFileError` naming the file and the key) and
:meth:`IndexFolder.write_manifest` writes them whole or not at all. An index follows its
run by ``retrieval index update``; until then it answers from the images it was built
(or last updated) with. :func:`run_changes` compares the index's live images (its table
file) with the run's now (:meth:`RunFolder.indexable_ids`): the images an update would
add and remove.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import numpy as np

from retrieval.errors import IndexFileError, MissingFileError
from retrieval.store.atomic import write_atomic
from retrieval.store.run_folder import INDEXES as INDEXES
from retrieval.store.run_folder import RunFolder

FORMAT = 2
"""Format 1 (before ``retrieval index update``) lacked the update fields; no release wrote
it, so it is refused with the rebuild command rather than read."""
VECTORS = "vectors.f16"
META = "table.npz"
MANIFEST = "index.json"
CONFIG = "config.yaml"  # the run's config, copied: text queries need only the index


def generation_name(name: str, generation: int) -> str:
    """The file ``name`` of generation ``generation``: ``name`` itself for generation 0,
    ``stem.G.suffix`` after it."""
    if generation == 0:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}.{generation}{dot}{suffix}"


def rebuild_command(run: Path | str, backend: str, folder: Path) -> str:
    """The command that rebuilds the index in ``folder`` as it was built (its run and
    backend), ready to paste (paths quoted for a shell)."""
    words = ["retrieval", "index", "build", str(run), "--backend", backend]
    return f"`{shlex.join([*words, '--out', str(folder)])}`"


def corrupt(path: Path, why: str) -> IndexFileError:
    """The error for a damaged index file, naming it and the rebuild command (with the
    index folder: the nearest parent holding the manifest; with its run and backend when
    the manifest still names them)."""
    folder = next((p for p in path.parents if (p / MANIFEST).exists()), path.parent)
    command = f"`retrieval index build RUN_DIR --backend BACKEND --out {folder}`"
    try:
        raw = json.loads((folder / MANIFEST).read_text())
        command = rebuild_command(raw["run"], raw["backend"], folder)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # the manifest itself is what is damaged: the placeholders stay
    return IndexFileError(f"index file {path} is corrupt ({why}); rebuild the index with {command}")


@dataclass
class IndexManifest:
    """What ``index.json`` records about an index (the keys of the file, one each).

    Attributes:
        format: :data:`FORMAT`.
        code_version: the ``retrieval`` version that built it.
        run: the run folder it was built from (absolute).
        fingerprint: the run's embedding fingerprint at build time.
        retriever: the fingerprint's retriever (name and settings).
        embed_dim: embedding size ``D``.
        backend: the registered backend name.
        backend_state: the backend's persisted settings (tuned knobs, segments).
        approximate: whether searches may miss images exact search would return.
        score_rule: how an image's score is made from its representatives'.
        generation: updates since the build (0: as built).
        recall: recall@K against exact search (``k``, ``value``, ``method``, ...).
        recall_settings: K, target and query count recall is measured with.
        build_seconds: wall time of the build.
        images, representatives, removed_representatives: the table's live images, their
            rows, and rows of removed images (until a rebuild).
        disk_bytes_per_image, memory_bytes_per_image: the index's cost per live image.
        files: bytes of each file the index wrote, by path inside the folder.
        created: when it was built; updated: when it was last updated (None: never).
        history: one entry per update (added, removed, seconds, recall, time).
    """

    format: int
    code_version: str
    run: str
    fingerprint: dict[str, Any]
    retriever: dict[str, Any]
    embed_dim: int
    backend: str
    backend_state: dict[str, Any]
    approximate: bool
    score_rule: str
    generation: int
    recall: dict[str, Any]
    recall_settings: dict[str, Any]
    build_seconds: float
    images: int
    representatives: int
    removed_representatives: int
    disk_bytes_per_image: float
    memory_bytes_per_image: float
    files: dict[str, int]
    created: str
    history: list[dict[str, Any]]
    updated: str | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.run)

    def to_json(self) -> dict[str, Any]:
        """The manifest as ``index.json`` holds it (no ``updated`` before an update)."""
        data = dataclasses.asdict(self)
        if data["updated"] is None:
            del data["updated"]
        return data

    @classmethod
    def from_json(cls, data: Any, path: Path) -> IndexManifest:
        """The manifest of ``data`` (``index.json`` read as JSON from ``path``), each key
        checked against its type.

        Raises:
            IndexFileError: not a manifest, an older format (names the rebuild), or a key
                missing or of the wrong type (names the file and the key).
        """
        if not isinstance(data, dict):
            raise corrupt(path, f"not an index manifest: a JSON {type(data).__name__}")
        found = data.get("format")
        if isinstance(found, int) and not isinstance(found, bool) and found != FORMAT:
            command = rebuild_command(
                data.get("run", "RUN_DIR"), data.get("backend", "BACKEND"), path.parent
            )
            raise IndexFileError(
                f"index {path.parent} is in index format {found} ({path}), which this version "
                f"no longer reads (it reads format {FORMAT}); rebuild it with {command}"
            )
        hints = get_type_hints(cls)
        for field in dataclasses.fields(cls):
            if field.name not in data:
                if field.default is dataclasses.MISSING:
                    raise corrupt(path, f"key {field.name!r} missing")
                continue
            if not _is(data[field.name], hints[field.name]):
                raise corrupt(
                    path,
                    f"key {field.name!r} is {json.dumps(data[field.name])[:60]}, not "
                    f"{_describe(hints[field.name])}",
                )
        for key, kind in RECALL_KEYS.items():
            if not _is(data["recall"].get(key), kind):
                raise corrupt(path, f"key 'recall.{key}' missing or not {_describe(kind)}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


RECALL_KEYS: dict[str, Any] = {"k": int, "value": float, "method": str}
"""What every reader of ``recall`` needs (the rest depends on how it was measured)."""


def _is(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type ``hint`` (containers: their own type only)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_is(value, arg) for arg in get_args(hint))
    if origin is not None:
        return isinstance(value, origin)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in get_args(hint))
    kind = origin or hint
    return {dict: "an object", list: "a list", str: "text", bool: "true or false"}.get(
        kind, "null" if kind is type(None) else f"a number ({kind.__name__})"
    )


@dataclass(frozen=True)
class IndexFolder:
    """The files of the index folder ``path`` (``retrieval index build`` output)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    def manifest(self) -> IndexManifest:
        """``index.json``, validated, with every file it lists checked to be there at its
        recorded size; or a clear error saying how to make or rebuild one.

        Raises:
            MissingFileError: no such folder.
            IndexFileError: not an index, an older format, or a damaged one.
        """
        folder, path = self.path, self.manifest_path
        if not folder.is_dir():
            raise MissingFileError(
                f"index folder not found: {folder}; pass a folder made by `retrieval index build`"
            )
        if not path.exists():
            raise IndexFileError(
                f"{folder} is not an index (no {MANIFEST}); build one with "
                f"`retrieval index build RUN_DIR --out {folder}`"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise corrupt(path, f"not valid JSON: {err}") from None
        manifest = IndexManifest.from_json(data, path)
        for name, size in manifest.files.items():
            file = folder / name
            if not file.exists():
                raise corrupt(file, "file missing")
            now = file.stat().st_size
            # the vectors file is append-only: bytes past the recorded size are an unfinished
            # update's, which the table ignores
            if now != size and not (name == VECTORS and now > size):
                raise corrupt(file, f"{now} bytes, the manifest says {size}")
        return manifest

    def write_manifest(self, manifest: IndexManifest) -> None:
        """Writes ``index.json`` whole or not at all: an update's commit point."""
        text = json.dumps(manifest.to_json(), indent=2, default=str)
        write_atomic(self.manifest_path, lambda tmp: tmp.write_text(text))

    def is_index(self) -> bool:
        """Whether this is an index folder this project wrote: its ``index.json`` is a
        manifest of this :data:`FORMAT`, or of an earlier one naming its backend, run and
        fingerprint (refused when opened, but a rebuild may replace it); not merely a
        file of that name."""
        return self._raw() is not None

    def recorded_files(self) -> dict[str, int]:
        """The files ``index.json`` lists (none when this is no index folder)."""
        raw = self._raw()
        files = None if raw is None else raw.get("files")
        return files if isinstance(files, dict) else {}

    def _raw(self) -> dict[str, Any] | None:
        """``index.json`` as JSON when :meth:`is_index`, else None."""
        path = self.manifest_path
        if self.path.is_symlink() or path.is_symlink() or not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):  # unreadable, not JSON, not UTF-8
            return None
        if not isinstance(raw, dict):
            return None
        found = raw.get("format")
        if isinstance(found, int) and not isinstance(found, bool) and 0 < found < FORMAT:
            return raw if all(k in raw for k in ("backend", "run", "fingerprint")) else None
        try:
            IndexManifest.from_json(raw, path)
        except ValueError:  # not a manifest of this format
            return None
        return raw

    def stamp(self) -> tuple[int, int]:
        """``index.json``'s (mtime, size): an update rewrites it last, when it commits."""
        stat = self.manifest_path.stat()
        return stat.st_mtime_ns, stat.st_size

    def rebuild_command(self, manifest: IndexManifest) -> str:
        """The command that rebuilds this index from its run with its backend."""
        return rebuild_command(manifest.run, manifest.backend, self.path)

    def image_ids(self, manifest: IndexManifest) -> np.ndarray:
        """The live image ids in the index's table at the generation ``manifest`` names."""
        path = self.path / generation_name(META, manifest.generation)
        try:
            with np.load(path) as meta:
                ids = meta["image_ids"]
                removed = meta["removed"].astype(bool) if "removed" in meta.files else None
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise corrupt(path, f"not a readable table: {err}") from None
        return np.unique(ids if removed is None else ids[~removed])


def read_manifest(folder: str | Path) -> IndexManifest:
    """``index.json`` of an index folder (:meth:`IndexFolder.manifest`)."""
    return IndexFolder(Path(folder)).manifest()


@dataclass(frozen=True)
class RunChanges:
    """Images the run holds that the index does not (``added``) and images the index
    still returns that the run no longer holds (``removed``)."""

    folder: Path
    run: Path
    added: int
    removed: int

    @property
    def stale(self) -> bool:
        return bool(self.added or self.removed)

    def note(self) -> str:
        """One line for the user: what changed and the command that catches up."""
        return (
            f"index {self.folder} is behind its run {self.run}: {self.added} images added "
            f"and {self.removed} removed since its last build or update (it still returns "
            f"the removed ones); update it: `retrieval index update {self.run}`"
        )


def run_changes(folder: str | Path, manifest: IndexManifest | None = None) -> RunChanges:
    """How the run of the index in ``folder`` moved on since the index's generation."""
    index = IndexFolder(Path(folder))
    manifest = index.manifest() if manifest is None else manifest
    run = manifest.run_dir
    held = index.image_ids(manifest)
    wanted = RunFolder(run).indexable_ids(skip_damaged=True)  # a damaged shard: the update's
    folder = index.path
    return RunChanges(
        folder=folder,
        run=run,
        added=len(np.setdiff1d(wanted, held)),
        removed=len(np.setdiff1d(held, wanted)),
    )


def record_index(run: str | Path, folder: str | Path) -> None:
    """Notes in the run folder that ``folder`` indexes it (:meth:`RunFolder.record_index`)."""
    RunFolder(Path(run)).record_index(folder)


def run_indexes(run: str | Path) -> list[Path]:
    """The index folders of ``run``: those recorded in its ``indexes.json`` and those in
    its default place ``RUN/index/*``, each still an index whose manifest names this run."""
    run = Path(run)
    found: dict[Path, None] = {}
    default = sorted(p for p in (run / "index").glob("*") if (p / MANIFEST).is_file())
    for folder in [*RunFolder(run).recorded_indexes(), *default]:
        try:
            built_from = read_manifest(folder).run_dir
        except (IndexFileError, MissingFileError):
            continue
        if built_from.resolve() == run.resolve():
            found.setdefault(folder.resolve())
    return list(found)
