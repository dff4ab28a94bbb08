"""An index folder's manifest (``index.json``) and how far its run has moved on, read
without torch: ``retrieval index info`` and the staleness notes of ``search`` and
``serve`` need no model and no backend.

An index follows its run by ``retrieval index update``; until then it answers from the
images it was built (or last updated) with. :func:`run_changes` compares the index's
live images (its table file) with the run's now (ids stored in its shards and, for an
unlabelled run, live in ``images.parquet``): the images an update would add and remove.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexFileError, MissingFileError

FORMAT = 1
VECTORS = "vectors.f16"
META = "table.npz"
MANIFEST = "index.json"
SHARD_SUFFIX = ".safetensors"


def generation_name(name: str, generation: int) -> str:
    """The file ``name`` of generation ``generation``: ``name`` itself for generation 0
    (so index folders from before updates open unchanged), ``stem.G.suffix`` after it."""
    if generation == 0:
        return name
    stem, dot, suffix = name.partition(".")
    return f"{stem}.{generation}{dot}{suffix}"


def rebuild_command(run: Path | str, manifest: dict[str, Any], folder: Path) -> str:
    """The command that rebuilds the index in ``folder`` as it was built (its run and
    backend), ready to paste (paths quoted for a shell)."""
    words = ["retrieval", "index", "build", str(run), "--backend", manifest["backend"]]
    return f"`{shlex.join([*words, '--out', str(folder)])}`"


def corrupt(path: Path, why: str) -> IndexFileError:
    """The error for a damaged index file, naming it and the rebuild command (with the
    index folder: the nearest parent holding the manifest; with its run and backend when
    the manifest still reads)."""
    folder = next((p for p in path.parents if (p / MANIFEST).exists()), path.parent)
    command = f"`retrieval index build RUN_DIR --backend BACKEND --out {folder}`"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        command = rebuild_command(manifest["run"], manifest, folder)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # the manifest itself is what is damaged: the placeholders stay
    return IndexFileError(f"index file {path} is corrupt ({why}); rebuild the index with {command}")


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """``index.json`` of an index folder, or a clear error saying how to make one."""
    folder = Path(folder)
    path = folder / MANIFEST
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
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise corrupt(path, f"not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise corrupt(path, f"not an index manifest of format {FORMAT}")
    for name, size in manifest.get("files", {}).items():
        file = folder / name
        if not file.exists():
            raise corrupt(file, "file missing")
        now = file.stat().st_size
        # the vectors file is append-only: bytes past the recorded size are an unfinished
        # update's, which the table ignores
        if now != size and not (name == VECTORS and now > size):
            raise corrupt(file, f"{now} bytes, the manifest says {size}")
    return manifest


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


def index_image_ids(folder: Path, manifest: dict[str, Any]) -> np.ndarray:
    """The live image ids in the index's table at the generation ``manifest`` names."""
    path = folder / generation_name(META, int(manifest.get("generation", 0)))
    try:
        with np.load(path) as meta:
            ids = meta["image_ids"]
            removed = meta["removed"].astype(bool) if "removed" in meta.files else None
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise corrupt(path, f"not a readable table: {err}") from None
    return np.unique(ids if removed is None else ids[~removed])


def run_image_ids(run: Path) -> np.ndarray:
    """Ids an index of ``run`` should hold: stored in its shards and live in its
    collection table (every stored image when it has none: a labelled run)."""
    from safetensors import safe_open

    from retrieval.data.collection import live_image_ids

    ids = [np.zeros(0, np.int64)]
    for path in sorted((run / "embeddings").glob(f"*{SHARD_SUFFIX}")):
        try:
            with safe_open(str(path), framework="numpy") as shard:
                ids.append(np.asarray(shard.get_tensor("image_ids"), np.int64))
        except Exception:  # a damaged shard is the update's to name
            continue
    stored = np.unique(np.concatenate(ids))
    live = live_image_ids(run)
    return stored if live is None else np.intersect1d(stored, live)


def run_changes(folder: str | Path, manifest: dict[str, Any] | None = None) -> RunChanges:
    """How the run of the index in ``folder`` moved on since the index's generation."""
    folder = Path(folder)
    manifest = read_manifest(folder) if manifest is None else manifest
    run = Path(manifest["run"])
    held = index_image_ids(folder, manifest)
    wanted = run_image_ids(run)
    return RunChanges(
        folder=folder,
        run=run,
        added=len(np.setdiff1d(wanted, held)),
        removed=len(np.setdiff1d(held, wanted)),
    )


INDEXES = "indexes.json"  # in a run folder: the index folders built from it


def record_index(run: str | Path, folder: str | Path) -> None:
    """Notes in the run folder that ``folder`` indexes it, so that ``retrieval index
    update RUN`` finds every index of the run, wherever it was built (written by rename:
    a reader sees the old list or the new one)."""
    run, folder = Path(run), Path(folder).resolve()
    known = [str(p) for p in _recorded(run)]
    if str(folder) in known:
        return
    path = run / INDEXES
    tmp = path.with_name(f".{INDEXES}.tmp")
    tmp.write_text(json.dumps(sorted([*known, str(folder)]), indent=1) + "\n")
    tmp.replace(path)


def _recorded(run: Path) -> list[Path]:
    try:
        listed = json.loads((run / INDEXES).read_text())
    except (OSError, ValueError):
        return []
    return [Path(p) for p in listed if isinstance(p, str)] if isinstance(listed, list) else []


def run_indexes(run: str | Path) -> list[Path]:
    """The index folders of ``run``: those recorded in its ``indexes.json`` and those in
    its default place ``RUN/index/*``, each still an index whose manifest names this run."""
    run = Path(run)
    found: dict[Path, None] = {}
    default = sorted(p for p in (run / "index").glob("*") if (p / MANIFEST).is_file())
    for folder in [*_recorded(run), *default]:
        try:
            built_from = Path(read_manifest(folder)["run"])
        except (IndexFileError, MissingFileError, KeyError):
            continue
        if built_from.resolve() == run.resolve():
            found.setdefault(folder.resolve())
    return list(found)
