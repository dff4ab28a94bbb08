"""Embedding store: representatives on disk as safetensors shards, keyed by image id.

Each shard holds a batch of images (``image_ids``, ``embeddings [n, R, D]`` in fp16 by
default, ``mask``, ``boxes`` and any ``extras``) plus, in its metadata, the images that
could not be read. Shards are written whole or not at all (:mod:`retrieval.store.atomic`),
so a killed run never leaves a half-written shard behind. ``manifest.json`` records what
made them. :meth:`ShardStore.scan_ids` is the one pass that reads which images the shards
hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors import SafetensorError, safe_open

from retrieval.errors import ConfigError, MissingFileError, StoreError
from retrieval.store.atomic import partial_glob, write_atomic

if TYPE_CHECKING:  # torch is imported by what embeds or scores, not by what only reads
    import torch

    from retrieval.representatives import Representatives

SHARD_SUFFIX = ".safetensors"
MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
VERIFY = ("fast", "full")

log = logging.getLogger("retrieval")


@dataclass(frozen=True)
class ShardIds:
    """What one shard holds, read without its representatives."""

    path: Path
    image_ids: np.ndarray
    failures: list[dict[str, Any]]
    written_ns: int


@dataclass
class Shard:
    """One shard read back: the images it holds and their representatives."""

    image_ids: np.ndarray
    reps: Representatives
    failures: list[dict[str, Any]]


def damaged_shard(path: Path, why: str) -> StoreError:
    """The error for a shard that cannot be used as it is: names it and the fix."""
    return StoreError(
        f"shard {path} {why}. Delete that shard to re-embed its images (run the same "
        f"`retrieval embed`/`eval` again: resume embeds only the images it held)"
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardReader:
    """Reads a shard lazily: its ids at once, representatives by row range (no full load).

    Scoring streams through a shard in chunks this way, so a shard larger than the
    scoring memory budget (OWL-ViT: thousands of boxes per image) never sits in memory.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:  # truncated, empty or foreign files: a named error, not a traceback
            file = safe_open(str(path), framework="numpy")
            self.image_ids: np.ndarray = file.get_tensor("image_ids")
            metadata = file.metadata() or {}
            failures = json.loads(metadata.get("failures", "[]"))
            written_ns = int(metadata.get("written_ns", "0"))
            shape = file.get_slice("embeddings").get_shape()
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
            raise damaged_shard(path, f"cannot be read ({e})") from e
        if not isinstance(failures, list) or len(shape) < 2:
            raise damaged_shard(path, "is not a shard this project wrote")
        if not all(isinstance(f, dict) and "image_id" in f for f in failures):
            raise damaged_shard(path, "has failure records this project did not write")
        #: when the shard was written (0: before shards recorded it); orders failure records
        self.written_ns = written_ns
        self._file: safe_open | None = file  # None once the with block is left
        self._torch_file: safe_open | None = None  # opened by the first rows()
        self.failures: list[dict[str, Any]] = failures
        self.num_images, self.num_reps = int(shape[0]), int(shape[1])

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file = self._torch_file = None

    def arrays(self, start: int, stop: int, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The stored arrays ``keys`` (those present) of images ``start:stop``, read as
        NumPy: what a reader that needs no torch uses (export)."""
        file = self._open_file()
        stored = set(file.keys())  # safe_open has keys() but no `in`
        return {key: file.get_slice(key)[start:stop] for key in keys if key in stored}

    def rows(self, start: int, stop: int) -> Representatives:
        """The representatives of images ``start:stop`` of this shard."""
        from retrieval.representatives import Representatives

        self._open_file()
        if self._torch_file is None:  # extras may be any torch dtype (bf16): read as torch
            self._torch_file = safe_open(str(self.path), framework="pt")
        file = self._torch_file
        keys = set(file.keys())

        def get(key: str) -> torch.Tensor:
            return file.get_slice(key)[start:stop]

        extras = {k[len("extras.") :]: get(k) for k in keys if k.startswith("extras.")}
        return Representatives(
            get("embeddings"),
            get("mask"),
            get("boxes") if "boxes" in keys else None,
            extras or None,
        )

    def _open_file(self) -> safe_open:
        if self._file is None:
            raise ValueError(f"{self.path}: shard reader used after its with block closed it")
        return self._file


class ShardStore:
    """A folder of shards for one (dataset, retriever) embedding run."""

    def __init__(self, root: str | Path, dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise ConfigError(f"store.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        self.root = Path(root)
        self.dtype = dtype

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def read_manifest(self) -> dict[str, Any]:
        """``manifest.json`` (empty when there is none yet).

        Raises:
            StoreError: it is not a JSON object (truncated, edited, written by another tool).
        """
        path = self.manifest_path
        if not path.exists():
            return {}
        try:
            manifest = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            manifest = e
        if not isinstance(manifest, dict):
            why = manifest if isinstance(manifest, Exception) else type(manifest).__name__
            raise StoreError(
                f"{path} is not a manifest this project wrote (a JSON object expected; got "
                f"{why}). The shards beside it cannot be matched to their settings: restore "
                f"that file, or delete {self.root} to re-embed"
            )
        return manifest

    def write_manifest(self, **fields: Any) -> None:
        """Updates ``manifest.json`` atomically with ``fields``."""
        manifest = {**self.read_manifest(), **fields}
        self.root.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
        write_atomic(self.manifest_path, lambda tmp: tmp.write_text(text))

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return {"float16": torch.float16, "float32": torch.float32}[self.dtype]

    @property
    def itemsize(self) -> int:
        return np.dtype(self.dtype).itemsize

    def shard_paths(self, prefix: str = "") -> list[Path]:
        return sorted(self.root.glob(f"{prefix}*{SHARD_SUFFIX}"))

    def remove_partial_files(self) -> None:
        """Deletes temporary files a killed writer left behind (never complete shards)."""
        for tmp in self.root.glob(partial_glob(f"*{SHARD_SUFFIX}")):
            tmp.unlink(missing_ok=True)

    def scan_ids(self, skip_damaged: bool = False) -> Iterator[ShardIds]:
        """Each shard's image ids and failure records, in name order: the one loop over
        the shards that every question about which images are stored is answered from.

        Args:
            skip_damaged: pass over a shard that cannot be read (a staleness note has
                nothing to say about it; the update or export that reads it names it).

        Raises:
            StoreError: a shard cannot be read (unless ``skip_damaged``).
        """
        for path in self.shard_paths():
            try:
                with ShardReader(path) as shard:
                    ids = ShardIds(path, shard.image_ids, shard.failures, shard.written_ns)
            except StoreError:
                if skip_damaged:
                    continue
                raise
            yield ids

    def stored_ids(self, skip_damaged: bool = False) -> np.ndarray:
        """Ids of the embedded images, ascending and unique."""
        ids = [np.asarray(s.image_ids, np.int64) for s in self.scan_ids(skip_damaged)]
        return np.unique(np.concatenate([np.zeros(0, np.int64), *ids]))

    def locate(self) -> dict[int, tuple[Path, int]]:
        """Where each embedded image is: its shard and row there."""
        return {
            int(i): (s.path, row)
            for s in self.scan_ids()
            for row, i in enumerate(s.image_ids.tolist())
        }

    def accounted_ids(self) -> np.ndarray:
        """Ids of every image the shards account for (embedded or recorded as unreadable)."""
        ids = [np.zeros(0, np.int64)]
        for shard in self.scan_ids():
            ids.append(shard.image_ids)
            ids.append(np.array([f["image_id"] for f in shard.failures], dtype=np.int64))
        return np.concatenate(ids)

    def contents(self) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The ids of every embedded image (one entry per shard row), and the failure
        records that still count: one per image id, the newest (by when its shard was
        written, then by name), and none for an image that a shard holds embedded (a
        retried image that now reads). Shards are never rewritten: a later shard's record
        supersedes an earlier one's."""
        ids = [np.zeros(0, np.int64)]
        records: list[tuple[tuple[int, str], list[dict[str, Any]]]] = []
        for shard in self.scan_ids():
            ids.append(shard.image_ids)
            records.append(((shard.written_ns, shard.path.name), shard.failures))
        embedded = np.concatenate(ids)
        latest: dict[int, dict[str, Any]] = {}
        for _, failures in sorted(records, key=lambda r: r[0]):
            for failure in failures:
                latest[int(failure["image_id"])] = failure
        done = set(embedded.tolist())
        return embedded, [f for i, f in latest.items() if i not in done]

    def write_shard(
        self,
        name: str,
        image_ids: torch.Tensor,
        reps: Representatives,
        failures: list[dict[str, Any]] | None = None,
    ) -> Path:
        """Writes one shard atomically (temporary file, then rename).

        ``failures``: one ``dict(image_id, path, reason, file)`` per image that could not
        be read, ``file`` the path's identity when it failed (``file_identity``), so a
        later run retries it once the file changed. Its metadata records when it was
        written, which orders the failure records of different shards (newest wins)."""
        import torch
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        dtype = self.torch_dtype
        tensors = {
            "image_ids": image_ids.to(torch.int64).cpu().contiguous(),
            "embeddings": reps.embeddings.to(dtype).cpu().contiguous(),
            "mask": reps.mask.cpu().contiguous(),
        }
        if reps.boxes is not None:
            tensors["boxes"] = reps.boxes.float().cpu().contiguous()
        for key, value in (reps.extras or {}).items():
            tensors[f"extras.{key}"] = value.cpu().contiguous()
        path = self.root / f"{name}{SHARD_SUFFIX}"
        metadata = {"failures": json.dumps(failures or []), "written_ns": str(time.time_ns())}
        return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @staticmethod
    def read_shard(path: Path) -> Shard:
        """Reads a whole shard into memory."""
        with ShardReader(path) as reader:
            return Shard(reader.image_ids, reader.rows(0, reader.num_images), reader.failures)

    def iter_shards(self) -> Iterator[Shard]:
        for path in self.shard_paths():
            yield self.read_shard(path)

    def record_checksums(self) -> None:
        """Stores each shard's sha256, size and mtime in the manifest (run once all shards
        exist). A shard recorded before with the same size and mtime is not hashed again
        (it was verified when this run reused it)."""
        before = self.read_manifest().get("shards")
        before = before if isinstance(before, dict) else {}
        shards = {}
        for path in self.shard_paths():
            stat = path.stat()
            entry = before.get(path.name)
            if not (isinstance(entry, dict) and _same_stat(entry, stat) and entry.get("sha256")):
                entry = {"sha256": sha256(path)}
            shards[path.name] = {**entry, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self.write_manifest(shards=shards)

    def check_shards(self, verify: str = "fast") -> tuple[list[str], list[str]]:
        """The shards the manifest lists that are gone, and those whose bytes changed.

        ``fast`` hashes only a shard whose size or mtime differ from the recorded ones;
        ``full`` hashes every one. Shards the manifest does not list (written after the
        last checksums, by a run that was killed) are not judged here.
        """
        if verify not in VERIFY:
            raise ConfigError(f"run.verify={verify!r} is not one of {', '.join(VERIFY)}")
        listed = self.read_manifest().get("shards")
        missing, altered = [], []
        for name, entry in (listed if isinstance(listed, dict) else {}).items():
            path = self.root / name
            if not path.is_file():
                missing.append(name)
                continue
            if not isinstance(entry, dict) or "sha256" not in entry:
                continue  # nothing recorded to compare with
            changed = verify == "full" or not _same_stat(entry, path.stat())
            if changed and sha256(path) != entry["sha256"]:
                altered.append(name)
        return sorted(missing), sorted(altered)

    def verify(self, verify: str = "fast", allow_missing: bool = False) -> None:
        """Refuses shards whose bytes differ from the checksums the manifest recorded
        (and, unless ``allow_missing``, listed shards that are gone).

        Raises:
            StoreError: naming each such shard and the fix.
        """
        missing, altered = self.check_shards(verify)
        if altered:
            raise StoreError(
                f"{self.root}: shard(s) {', '.join(altered)} changed since they were written "
                f"(sha256 differs from {self.manifest_path}). Delete those shards to re-embed "
                f"their images (run the same `retrieval embed`/`eval` again: resume embeds "
                f"only them)"
            )
        if missing and not allow_missing:
            raise StoreError(
                f"{self.root}: shard(s) {', '.join(missing)} listed in {self.manifest_path} "
                f"are missing, so their images would be left out silently. Run the same "
                f"`retrieval embed`/`eval` again to re-embed them, then retry"
            )


def _same_stat(entry: dict[str, Any], stat: os.stat_result) -> bool:
    return entry.get("bytes") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns


def open_run_store(run_dir: str | Path, verify: str = "fast") -> ShardStore:
    """A run folder's embedding store, checked to hold shards and their fingerprint, and
    every shard its manifest lists to be there and unaltered (what index build, index
    update and export read: they never use what is left of a damaged run).

    Raises:
        MissingFileError: no such folder.
        StoreError: the folder is not a run folder (no shards), its manifest is gone, or
            a listed shard is missing or altered.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run folder not found: {run_dir} (made by `retrieval eval`)")
    store = ShardStore(run_dir / "embeddings")
    if not store.shard_paths():
        store.verify(verify)  # a run whose listed shards are all gone is named as such
        raise StoreError(
            f"{run_dir} is not a run folder: it holds no embeddings ({store.root}/*.safetensors); "
            f"pass the run.output_dir of a `retrieval eval` or `retrieval embed` run"
        )
    if not store.read_manifest().get("fingerprint"):
        raise StoreError(
            f"{store.manifest_path} is missing or has no fingerprint: the shards cannot be "
            f"matched to a retriever; embed the collection into a new run.output_dir"
        )
    store.verify(verify)
    return store


def read_cache(path: Path) -> dict[str, Any] | None:
    """A ``torch.save``d dict cache, or None (with a warning) when it cannot be used."""
    import torch

    if not path.exists():
        return None
    try:
        cached = torch.load(path, weights_only=True)
    except Exception as e:  # any unreadable file: truncated, empty, refused pickle
        why = (str(e).splitlines() or [type(e).__name__])[0][:200]
        log.warning("%s cannot be read (%s); rebuilding it", path, why)
        return None
    if not isinstance(cached, dict):
        log.warning("%s is not a cache this project wrote; rebuilding it", path)
        return None
    return cached
