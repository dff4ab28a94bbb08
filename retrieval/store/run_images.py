"""Which file each image id of a run is: the one map that search hits (``--json``, the
gallery, the service) and exports name their files by.

An unlabelled run answers from its collection table (:class:`ImageFiles`: read as
stored, no rescan); a labelled run from its dataset, opened from the run's config (a
COCO-format set names its files by id). A dataset that cannot be opened leaves every
file unknown, with one warning: the hits and rows are still written, their paths null.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import MissingFileError, RetrievalError
from retrieval.store.run_folder import ImageFiles, RunFolder

if TYPE_CHECKING:
    import pyarrow as pa
    from omegaconf import DictConfig

log = logging.getLogger("retrieval")


class RunImages:
    """The files of a run's image ids (see the module docstring).

    Attributes:
        table: the collection table's map (an unlabelled run), else None.
        dataset: the labelled dataset that names the files, else None.
        roots: the folders the files must resolve inside when shown (the dataset's
            ``image_roots``, or the collection's images root), None where the dataset
            reads any path (a ``folder`` follows the user's own symlinks; a ``list``
            without ``data.images`` names files anywhere).
    """

    def __init__(
        self,
        table: ImageFiles | None = None,
        dataset: Any = None,
        roots: tuple[Path, ...] | None = None,
    ) -> None:
        self.table, self.dataset, self.roots = table, dataset, roots

    @classmethod
    def open(cls, run_dir: str | Path, cfg: DictConfig | None = None) -> RunImages:
        """The map of the run in ``run_dir``; ``cfg`` is its config (read from the run's
        ``config.yaml`` when None and needed).

        Raises:
            StoreError: the run's collection table cannot be read.
        """
        run = RunFolder(Path(run_dir))
        table = run.image_files
        if table is not None:
            data = cfg.data if cfg is not None else {}
            name = data.get("name")
            free = name == "folder" or (name == "list" and not data.get("images"))
            return cls(table, roots=None if free or table.root is None else (table.root,))
        try:
            from retrieval.config import load_stored_config
            from retrieval.factory import build_dataset

            if cfg is None:
                if not run.config.exists():
                    raise MissingFileError(f"{run.config} not found")
                cfg = load_stored_config(run.config)
            cfg = cfg.copy()
            cfg.data.on_bad_image = "skip"  # a missing image file still has a path
            dataset = build_dataset(cfg, transform=None)
        except (RetrievalError, OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning(
                "%s: image paths left empty: the run's dataset cannot be opened (%s)",
                run.root,
                err,
            )
            return cls()
        roots = getattr(dataset, "image_roots", None)
        return cls(dataset=dataset, roots=None if roots is None else tuple(map(Path, roots)))

    def files(self, image_ids: np.ndarray) -> pa.Array:
        """One file per id, as text (null where the run cannot name it)."""
        import pyarrow as pa

        if self.table is not None:
            return self.table.files(image_ids)
        return pa.array([self._dataset_file(int(i)) for i in image_ids], pa.string())

    def paths(self, image_ids: list[int]) -> dict[int, Path | None]:
        """Each id's file (None where the run cannot name it)."""
        files = self.files(np.array(image_ids, np.int64)).to_pylist()
        return {i: None if f is None else Path(f) for i, f in zip(image_ids, files, strict=True)}

    def _dataset_file(self, image_id: int) -> str | None:
        if self.dataset is None:
            return None
        try:
            return str(self.dataset.image_path(image_id))
        except (KeyError, IndexError):
            return None
