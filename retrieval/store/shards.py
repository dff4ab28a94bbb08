"""Embedding store: representatives on disk as safetensors shards, keyed by image id.

Each shard holds a batch of images (``image_ids``, ``embeddings [n, R, D]`` in fp16 by
default, ``mask``, ``boxes`` and any ``extras``) plus, in its metadata, the images that
could not be read. Shards are written under a temporary name and renamed, so a killed
run never leaves a half-written shard behind. ``manifest.json`` records what made them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from retrieval.errors import ConfigError, MissingFileError, StoreError
from retrieval.representatives import Representatives

SHARD_SUFFIX = ".safetensors"
MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass
class Shard:
    """One shard read back: the images it holds and their representatives."""

    image_ids: np.ndarray
    reps: Representatives
    failures: list[dict[str, Any]]


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
        file = safe_open(str(path), framework="pt")
        self._file: safe_open | None = file  # None once the with block is left
        self.image_ids: np.ndarray = file.get_tensor("image_ids").numpy()
        self.failures: list[dict[str, Any]] = json.loads(
            (file.metadata() or {}).get("failures", "[]")
        )
        shape = file.get_slice("embeddings").get_shape()
        self.num_images, self.num_reps = int(shape[0]), int(shape[1])

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file = None

    def rows(self, start: int, stop: int) -> Representatives:
        """The representatives of images ``start:stop`` of this shard."""
        file = self._file
        if file is None:
            raise ValueError(f"{self.path}: shard reader used after its with block closed it")
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
        if not self.manifest_path.exists():
            return {}
        return json.loads(self.manifest_path.read_text())

    def write_manifest(self, **fields: Any) -> None:
        """Updates ``manifest.json`` atomically with ``fields``."""
        manifest = {**self.read_manifest(), **fields}
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.manifest_path)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    def shard_paths(self, prefix: str = "") -> list[Path]:
        return sorted(self.root.glob(f"{prefix}*{SHARD_SUFFIX}"))

    def remove_partial_files(self) -> None:
        """Deletes temporary files a killed writer left behind (never complete shards)."""
        for tmp in self.root.glob(f".*{SHARD_SUFFIX}.tmp"):
            tmp.unlink(missing_ok=True)

    def accounted_ids(self) -> np.ndarray:
        """Ids of every image the shards account for (embedded or recorded as unreadable)."""
        ids = [np.zeros(0, np.int64)]
        for path in self.shard_paths():
            with ShardReader(path) as shard:
                ids.append(shard.image_ids)
                ids.append(np.array([f["image_id"] for f in shard.failures], dtype=np.int64))
        return np.concatenate(ids)

    def write_shard(
        self,
        name: str,
        image_ids: torch.Tensor,
        reps: Representatives,
        failures: list[dict[str, Any]] | None = None,
    ) -> Path:
        """Writes one shard atomically (temporary file, then rename)."""
        self.root.mkdir(parents=True, exist_ok=True)
        dtype = DTYPES[self.dtype]
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
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"failures": json.dumps(failures or [])})
        os.replace(tmp, path)
        return path

    @staticmethod
    def read_shard(path: Path) -> Shard:
        """Reads a whole shard into memory."""
        with ShardReader(path) as reader:
            return Shard(reader.image_ids, reader.rows(0, reader.num_images), reader.failures)

    def iter_shards(self) -> Iterator[Shard]:
        for path in self.shard_paths():
            yield self.read_shard(path)

    def record_checksums(self) -> None:
        """Stores each shard's sha256 in the manifest (run once all shards exist)."""
        self.write_manifest(
            shards={
                p.name: {"sha256": sha256(p), "bytes": p.stat().st_size} for p in self.shard_paths()
            }
        )


def open_run_store(run_dir: str | Path) -> ShardStore:
    """A run folder's embedding store, checked to hold shards and their fingerprint (what
    index build, index update and export read).

    Raises:
        MissingFileError: no such folder.
        StoreError: the folder is not a run folder (no shards) or its manifest is gone.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run folder not found: {run_dir} (made by `retrieval eval`)")
    store = ShardStore(run_dir / "embeddings")
    if not store.shard_paths():
        raise StoreError(
            f"{run_dir} is not a run folder: it holds no embeddings ({store.root}/*.safetensors); "
            f"pass the run.output_dir of a `retrieval eval` or `retrieval embed` run"
        )
    if not store.read_manifest().get("fingerprint"):
        raise StoreError(
            f"{store.manifest_path} is missing or has no fingerprint: the shards cannot be "
            f"matched to a retriever; embed the collection into a new run.output_dir"
        )
    return store
