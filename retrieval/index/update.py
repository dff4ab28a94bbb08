"""``retrieval index update INDEX``: an index follows its run as the collection changes.

The index's live images are compared with the run's now: images in the run's shards
(and live in its collection table, ``images.parquet``; every stored image for a
labelled run) but not in the index are added, images in the index that are no longer
there are removed. Their rows go through :meth:`Backend.commit`: the table's vectors are
appended and removed images tombstoned (their rows stay on disk until a rebuild, never
returned); faiss adds with ids and ``remove_ids``, LanceDB adds and deletes, Milvus
inserts and deletes. Recall is measured again on fresh held-out queries (seeded by the
generation; as many as a build holds out) with the search settings as tuned (a build
spends most of its time tuning them; ``retune=True`` tunes again on the other half of
the queries, as a build does); a backend exact by construction (exact, faiss flat)
records recall 1.0 unsearched. ``index.json`` records the new ``generation`` with a
``history`` entry (added, removed, seconds, recall). An approximate backend's structure
is not retrained (faiss IVF-PQ's lists, LanceDB's partitions): when the recall an
update records falls below the target, rebuild.

A run re-embedded with other settings (its fingerprint differs from the index's) or an
index built from another run is refused: rows of two embedding spaces cannot be mixed,
so the fix is a rebuild. An unchanged run is a no-op: nothing is written and the
generation stays as it was (:attr:`UpdateResult.changed` is False).

What is atomic: ``index.json`` is the single commit point, replaced by a rename. Every
other file an update writes has a name no earlier generation uses (``table.G.npz``,
``faiss.G.index``, LanceDB's new version), except ``vectors.f16``, which only grows past
the rows the previous generation records. So an update killed at any point leaves the
previous generation's manifest naming intact files, and the index opens and searches as
before; the next update overwrites the unfinished generation's files, truncates the
vectors' tail and (LanceDB) restores the recorded version before writing. The previous
generation's own files are deleted after the commit. Not atomic: a Milvus collection
(milvus-lite or a server) changes in place, so an update killed half-way leaves it
holding rows the manifest does not count; opening then fails naming the fix, and
rerunning ``retrieval index update`` repairs it (it deletes rows past the table's end
before inserting, and deletes are idempotent). One update at a time per index.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexFileError, differences
from retrieval.index.base import open_backend
from retrieval.index.build import measure, read_images, recall_queries, sizes
from retrieval.index.manifest import IndexFolder, IndexManifest, rebuild_command
from retrieval.store.lock import RunLock
from retrieval.store.run_folder import RunFolder
from retrieval.store.shards import ShardStore, open_run_store


@dataclass(frozen=True)
class UpdateResult:
    """What an update changed.

    Attributes:
        folder: the index folder.
        generation: the index's generation now (unchanged when nothing changed).
        added: images added.
        removed: images removed.
        added_representatives: table rows added.
        removed_representatives: table rows tombstoned.
        seconds: wall time of the update.
        recall: the recall now recorded (re-measured when anything changed).
        images: live images in the index now.
        rows, live_rows: table rows now, and those of live images (the rest are removed
            images' tombstones, skipped by every search until a rebuild compacts them).
    """

    folder: Path
    generation: int
    added: int = 0
    removed: int = 0
    added_representatives: int = 0
    removed_representatives: int = 0
    seconds: float = 0.0
    recall: dict[str, Any] = field(default_factory=dict)
    images: int = 0
    rows: int = 0
    live_rows: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)

    @property
    def tombstones(self) -> float:
        """Fraction of the table's rows that belong to removed images."""
        return 1 - self.live_rows / self.rows if self.rows else 0.0


def check_same_run(
    folder: Path, manifest: IndexManifest, store: ShardStore, run_dir: Path | None
) -> Path:
    """The run the index follows; refuses another run, or the run re-embedded with other
    settings, naming both and the rebuild command."""
    run = manifest.run_dir
    if run_dir is not None and Path(run_dir).resolve() != run.resolve():
        other = rebuild_command(Path(run_dir).resolve(), manifest.backend, folder)
        raise IndexFileError(
            f"index {folder} was built from run {run}, not {Path(run_dir).resolve()}: an "
            f"index follows the run it was built from. Update it without naming a run, or "
            f"index the other run: {other}"
        )
    now = store.read_manifest().get("fingerprint") or {}
    diff = differences(manifest.fingerprint, now)
    if diff:
        raise IndexFileError(
            f"index {folder} holds embeddings of retriever {manifest.retriever}; its "
            f"run {run} now holds embeddings of {now.get('retriever')} made with other "
            f"settings ({'; '.join(diff)}): the two cannot be mixed in one index. Rebuild "
            f"it: {IndexFolder(folder).rebuild_command(manifest)}"
        )
    return run


def update_index(
    folder: str | Path,
    progress: bool = True,
    device: str = "auto",
    run_dir: str | Path | None = None,
    retune: bool = False,
) -> UpdateResult:
    """Brings an index in line with its run's live images (see the module docstring).

    Args:
        folder: the index folder.
        progress: show progress bars.
        device: where exact scoring (recall's ground truth) runs.
        run_dir: the run the caller expects the index to follow; refused when the index
            was built from another (None: the run named in the index).
        retune: tune an approximate backend's search settings again on half the fresh
            queries, as a build does (slower); by default the settings stay and recall
            is measured with them.

    Returns:
        What changed, the generation now and the recall recorded.
    """
    folder = Path(folder)
    IndexFolder(folder).manifest()  # a clear error for a folder that is no index, before locking it
    with RunLock(
        folder, "INDEX", "another index update", "two updates of one index would mix their files"
    ):
        return _update(folder, progress, device, run_dir, retune)


def _update(
    folder: Path, progress: bool, device: str, run_dir: str | Path | None, retune: bool
) -> UpdateResult:
    start = time.perf_counter()
    index = IndexFolder(folder)
    manifest = index.manifest()
    store = open_run_store(manifest.run_dir)
    run = check_same_run(folder, manifest, store, Path(run_dir) if run_dir else None)
    generation = manifest.generation
    backend = open_backend(
        manifest.backend,
        folder,
        manifest.embed_dim,
        device,
        **{**manifest.backend_state, "generation": generation, "updating": True},
    )
    try:
        table = backend.require_table(allow_empty=True)
        wanted = RunFolder(run).indexable_ids()
        held = table.live_image_ids
        to_add = np.setdiff1d(wanted, held)
        to_remove = np.setdiff1d(held, wanted)
        if not len(to_add) and not len(to_remove):
            return UpdateResult(
                folder,
                generation,
                seconds=time.perf_counter() - start,
                recall=manifest.recall,
                images=manifest.images,
            )
        backend.require_updatable()
        old_files = set(backend.files())
        for tmp in folder.glob(".*.tmp"):  # an unfinished update's partial files
            tmp.unlink(missing_ok=True)
        backend.remove(to_remove)
        for ids, reps in read_images(store, to_add, progress):
            backend.add(ids, reps)
        added, removed = backend.commit(progress)
        table = backend.require_table(allow_empty=True)
        if table.num_live_rows == 0:
            raise IndexFileError(
                f"{run}: after this update no live image would have a representative to "
                f"index; the index is left at generation {generation}"
            )
        generation = backend.generation
        settings = dict(manifest.recall_settings)
        queries, source = recall_queries(run, table, settings["queries"], seed=generation)
        recall = measure(backend, queries, settings["k"], settings["target"], device, retune)
        if recall["queries"]:
            recall["source"] = source
        seconds = time.perf_counter() - start
        entry = {
            "generation": generation,
            "added": len(to_add),
            "removed": len(to_remove),
            "added_representatives": len(added),
            "removed_representatives": len(removed),
            "seconds": seconds,
            "recall": recall["value"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        new = dataclasses.replace(
            manifest,
            generation=generation,
            backend_state=backend.state(),
            recall=recall,
            recall_settings=settings,
            **sizes(backend, folder),
            updated=entry["time"],
            history=[*manifest.history, entry],
        )
        index.write_manifest(new)  # the commit: the new generation is the index now
        new_files = set(backend.files())
    finally:
        backend.close()
    for path in old_files - new_files:  # the previous generation's own files
        path.unlink(missing_ok=True)
    return UpdateResult(
        folder,
        generation,
        len(to_add),
        len(to_remove),
        len(added),
        len(removed),
        seconds,
        recall,
        new.images,
        table.num_rows,
        table.num_live_rows,
    )
