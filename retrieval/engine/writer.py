"""Prediction writer: each process appends its predictions to its own shards."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from retrieval.representatives import Representatives
from retrieval.store.shards import ShardStore


class ShardWriter(BasePredictionWriter):
    """Buffers predictions and writes a shard every ``shard_size`` images or ``shard_mb``.

    Shards are named ``rank<global rank>-<index>``, so processes never write the same
    file, and a resumed run continues the numbering after the shards already there. A
    crash keeps every shard already flushed (and an exception flushes the buffer on the
    way out), so nothing computed is lost; a SIGKILL loses only the buffered images,
    which the next run embeds again.
    """

    def __init__(self, store: ShardStore, shard_size: int = 1024, shard_mb: float = 512) -> None:
        super().__init__(write_interval="batch")
        self.store = store
        self.shard_size = shard_size
        self.shard_bytes = shard_mb * 2**20
        self._ids: list[torch.Tensor] = []
        self._reps: list[Representatives] = []
        self._failures: list[dict[str, Any]] = []
        self._buffered = 0
        self._buffered_bytes = 0
        self._index = 0
        self._rank = 0
        self.images_written = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank
        mine = self.store.shard_paths(prefix=f"rank{self._rank:03d}-")
        self._index = 1 + max((int(p.stem.rsplit("-", 1)[1]) for p in mine), default=-1)

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._failures += prediction["failures"]
        if prediction["reps"] is not None:
            self._ids.append(prediction["image_ids"])
            self._reps.append(prediction["reps"].to(dtype=self.store.torch_dtype))
            self._buffered += len(prediction["image_ids"])
            emb = prediction["reps"].embeddings
            self._buffered_bytes += emb.numel() * self.store.itemsize
        if self._buffered >= self.shard_size or self._buffered_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered images (and failures) as one shard."""
        if not self._ids and not self._failures:
            return
        if self._ids:
            ids = torch.cat(self._ids)
            reps = Representatives.concat(self._reps)
        else:  # only failures: an empty shard still records them
            ids = torch.zeros(0, dtype=torch.int64)
            reps = Representatives.empty()
        self.store.write_shard(f"rank{self._rank:03d}-{self._index:05d}", ids, reps, self._failures)
        self.images_written += len(ids)
        self._index += 1
        self._ids, self._reps, self._failures = [], [], []
        self._buffered = self._buffered_bytes = 0

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush()
        trainer.strategy.barrier("shards-written")  # rank 0 scores only after every rank

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.flush()
