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


class ShardStore:
    """A folder of shards for one (dataset, retriever) embedding run."""

    def __init__(self, root: str | Path, dtype: str = "float16") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"store.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
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

    def shard_paths(self) -> list[Path]:
        return sorted(self.root.glob(f"*{SHARD_SUFFIX}"))

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
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            failures = json.loads((f.metadata() or {}).get("failures", "[]"))
        extras = {k[len("extras.") :]: v for k, v in tensors.items() if k.startswith("extras.")}
        reps = Representatives(
            tensors["embeddings"], tensors["mask"], tensors.get("boxes"), extras or None
        )
        return Shard(tensors["image_ids"].numpy(), reps, failures)

    def iter_shards(self) -> Iterator[Shard]:
        for path in self.shard_paths():
            yield self.read_shard(path)

    def record_checksums(self) -> None:
        """Stores each shard's sha256 in the manifest (run once all shards exist)."""
        self.write_manifest(
            shards={p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
                    for p in self.shard_paths()}
        )
