"""Extraction progress in images (not batches), with images/s, on global rank 0."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch.utils.data import IterableDataset


class ImageProgress(Callback):
    """A rich progress bar counting this process's images; rank 0 shows it.

    Under DDP each rank embeds about ``1 / world_size`` of the images, so rank 0's bar
    shows its share and the whole job's rate is about ``world_size`` times its images/s.
    """

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.task: Any = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        total = _items(trainer.predict_dataloaders)
        world = trainer.world_size
        label = "embedding" if world == 1 else f"embedding (rank 0 of {world})"
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:.1f} img/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self.task = self.progress.add_task(label, total=total, rate=0.0)
        self.progress.start()

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.progress is None:
            return
        self.progress.advance(self.task, len(batch["image_ids"]) + len(batch["failures"]))
        task = self.progress.tasks[0]
        self.progress.update(self.task, rate=task.completed / max(task.elapsed or 0.0, 1e-9))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.on_predict_end(trainer, pl_module)


def _items(loader: Any) -> int | None:
    """How many items this process's loader yields: its sampler's length, or a streamed
    dataset's own count (``items_for_rank``); None when unknown."""
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset):
        count = getattr(dataset, "items_for_rank", None)
        return count(loader.num_workers) if callable(count) else None
    return len(loader.sampler) if loader is not None and hasattr(loader, "sampler") else None
