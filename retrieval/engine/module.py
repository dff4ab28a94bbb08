"""The LightningModule of the embed phase: batches of pixels in, representatives out."""

from __future__ import annotations

from typing import Any

import lightning as L

from retrieval.data.images import BadImageError
from retrieval.retrievers.base import Retriever


class EmbedModule(L.LightningModule):
    """Wraps a retriever for ``trainer.predict``; knows nothing about storage or metrics.

    Args:
        retriever: any registered retriever.
        on_bad_image: ``error`` raises on the first unreadable image of a batch (in the
            main process, so the message names the file); ``skip`` passes it on to be
            listed in the run folder.
    """

    def __init__(self, retriever: Retriever, on_bad_image: str = "error") -> None:
        super().__init__()
        self.retriever = retriever
        self.on_bad_image = on_bad_image

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        failures = batch["failures"]
        if failures and self.on_bad_image == "error":
            first = failures[0]
            raise BadImageError(first["path"], first["reason"])
        reps = None
        if batch["pixels"] is not None:
            reps = self.retriever.encode_images(batch["pixels"]).to("cpu")
        return {"image_ids": batch["image_ids"].cpu(), "reps": reps, "failures": failures}
