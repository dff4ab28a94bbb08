"""Opening an index and answering text queries with the run's own retriever.

The text encoder is rebuilt from the ``config.yaml`` stored with the index (seeded like
the run, so even a random-weight pipeline check encodes text as the run did) and checked
against the fingerprint the index was built from: a query embedded by another retriever
would return confident nonsense, so it is refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import ConfigError, DataError, IndexFileError, differences
from retrieval.index.hits import Hit
from retrieval.index.manifest import IndexFolder, IndexManifest, RunChanges, run_changes
from retrieval.store.run_folder import COLLECTION_FILE

if TYPE_CHECKING:
    import pyarrow as pa
    from omegaconf import DictConfig
    from PIL import Image
    from torch import Tensor

    from retrieval.index.base import Backend
    from retrieval.retrievers.base import Retriever


class NotIndexedError(LookupError):
    """The index holds no live image of that id."""


def check_query(query: object) -> str:
    """``query`` if it is text with something in it; else a :class:`ConfigError`."""
    if not isinstance(query, str) or not query.strip():
        raise ConfigError(f'query {query!r} is empty: search for some text, e.g. "a stroller"')
    return query


class SearchIndex:
    """A built index, opened for search.

    Args:
        folder: the index folder (``retrieval index build`` output).
        device: where exact scoring runs and the text encoder lives.
    """

    def __init__(self, folder: str | Path, device: str = "auto") -> None:
        self.folder = Path(folder)
        self._files = IndexFolder(self.folder)
        self.manifest: IndexManifest = self._files.manifest()
        self._opened = self._files.stamp()
        self.device = device
        self._check_run_unchanged()
        self.backend: Backend = self._open_backend(self.manifest)
        self._retriever: Retriever | None = None
        self._cfg: DictConfig | None = None
        self._metadata: pa.Table | None = None

    @property
    def embed_dim(self) -> int:
        return self.manifest.embed_dim

    @property
    def generation(self) -> int:
        """How many updates the index has had since its build (0: as built)."""
        return self.manifest.generation

    @property
    def run_dir(self) -> Path:
        return self.manifest.run_dir

    @property
    def recall(self) -> dict[str, Any]:
        return self.manifest.recall

    def describe(self) -> str:
        """One line: what the index is and the recall it was built with."""
        m, r = self.manifest, self.recall
        how = r["method"] if not r.get("queries") else f"{r['queries']} held-out queries"
        generation = f", generation {self.generation}" if self.generation else ""
        return (
            f"{m.backend} index of {m.images} images ({m.representatives} "
            f"representatives, {m.retriever.get('name')}, D={m.embed_dim}) from "
            f"{m.run}{generation}; recall@{r['k']} vs exact {r['value']:.3f} ({how})"
        )

    def run_changes(self) -> RunChanges:
        """How far the run has moved on from this index's generation (images an
        ``retrieval index update`` would add and remove)."""
        return run_changes(self.folder, self.manifest)

    def _check_run_unchanged(self) -> None:
        """Refuses an index whose run was re-embedded with other settings since."""
        from retrieval.store.shards import ShardStore

        store = ShardStore(self.run_dir / "embeddings")
        now = store.read_manifest().get("fingerprint")
        diff = differences(self.manifest.fingerprint, now) if now is not None else []
        if diff:
            raise IndexFileError(
                f"{self.run_dir} was re-embedded with other settings after index "
                f"{self.folder} was built ({'; '.join(diff)}); rebuild it: `retrieval index "
                f"build {self.run_dir} --backend {self.manifest.backend} --out {self.folder}`"
            )

    @property
    def config(self) -> DictConfig:
        """The run's configuration (stored with the index)."""
        if self._cfg is None:
            from retrieval.config import load_stored_config

            path = self._files.config
            if not path.exists():
                raise IndexFileError(
                    f"{path} is missing: text queries need the run's config to rebuild its "
                    f"retriever; search with vectors (search_vectors) or rebuild the index"
                )
            self._cfg = load_stored_config(path)
        return self._cfg

    def retriever(self) -> Retriever:
        """The run's retriever, built and seeded as the run built it, checked against the
        fingerprint the index was made from."""
        if self._retriever is None:
            from retrieval.factory import build_retriever
            from retrieval.store.scoring import resolve_device

            cfg = self.config
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                retriever = build_retriever(cfg)
            self.check_retriever(retriever, cfg.retriever.name)
            self._retriever = retriever.eval().to(resolve_device(self.device))
        return self._retriever

    def check_retriever(self, retriever: Any, name: str) -> None:
        """Raises unless ``retriever`` made this index's embeddings (same fingerprint)."""
        built = {"name": name, **retriever.describe()}
        stored = self.manifest.retriever
        if differences(stored, built) or retriever.embed_dim != self.embed_dim:
            raise IndexFileError(
                f"index {self.folder} holds embeddings of retriever {stored} "
                f"(D={self.embed_dim}); the query encoder is {built} "
                f"(D={retriever.embed_dim}). Query it with the retriever that built it, or "
                f"build an index from a run of this retriever"
            )

    @property
    def num_images(self) -> int:
        """Live images in the index: the most a search can return."""
        return len(self.backend.require_table(allow_empty=True).live_images)

    def capped_top(self, top: int) -> int:
        """``top`` capped at :attr:`num_images` (an engine asked for a billion results
        allocates for them, or aborts); refused below 1."""
        if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
            raise ConfigError(f"top={top!r}: ask for at least 1 image (e.g. --top 50)")
        return min(int(top), max(self.num_images, 1))

    def embed(self, texts: list[str], prompts: str | None = None) -> Tensor:
        """``[Q, D]`` query embeddings with the run's prompt ensemble (``text.prompts``)."""
        from retrieval.text import embed_queries

        for text in texts:
            check_query(text)
        cfg = self.config
        retriever = self.retriever()
        return embed_queries(
            retriever.encode_text, texts, prompts or cfg.text.prompts, cfg.text.batch_size
        ).cpu()

    def metadata(self) -> pa.Table:
        """The columns a ``where`` filter can use, one row per live image: the run's
        collection table (``images.parquet``: ``image_id``, ``path``, ``size_bytes``,
        ``mtime_ns``, ``width``, ``height`` and its metadata columns; removed ids left
        out) for an unlabelled run, else ``image_id`` alone (a labelled run has no
        metadata table). Read once per opened index."""
        if self._metadata is None:
            import pyarrow as pa
            import pyarrow.compute as pc

            from retrieval.data.collection import read_collection

            table = read_collection(self.run_dir)
            if table is None:
                ids = self.backend.require_table(allow_empty=True).live_image_ids
                table = pa.table({"image_id": pa.array(np.sort(ids), pa.int64())})
            else:
                table = table.filter(pc.invert(table.column("removed"))).drop_columns("removed")
            self._metadata = table
        return self._metadata

    def allowed_ids(self, where: str) -> np.ndarray:
        """Ids (ascending) of the live images whose metadata matches ``where`` (see
        :mod:`retrieval.index.filters`), evaluated once by pyarrow.

        Raises:
            ConfigError: a bad expression, an unknown column (the message lists the
                columns; a labelled run offers ``image_id`` only) or a type mismatch.
        """
        from retrieval.index.filters import allowed_ids

        metadata = self.metadata()
        try:
            return allowed_ids(metadata, where)
        except ConfigError as err:
            if metadata.num_columns == 1:  # image_id alone: say why there is no more
                raise ConfigError(
                    f"{err}\n(index {self.folder} has no metadata columns: its run "
                    f"{self.run_dir} has no {COLLECTION_FILE}, so only image_id can be "
                    f"filtered on)"
                ) from None
            raise

    def search_vectors(
        self, queries: Tensor | np.ndarray, top: int = 50, where: str | None = None
    ) -> list[list[Hit]]:
        """Top images of each query embedding ``[Q, D]``; with ``where`` (e.g.
        ``"camera = 'CAM_FRONT' AND width >= 1024"``), among the images whose metadata
        matches it (evaluated once for all the queries)."""
        top = self.capped_top(top)
        allowed = None if where is None else self.allowed_ids(where)
        return self.backend.search(queries, top, allowed)

    def search(
        self, query: str, top: int = 50, prompts: str | None = None, where: str | None = None
    ) -> list[Hit]:
        """Top images for one text query, best first (among those matching ``where``)."""
        check_query(query)
        self.capped_top(top)  # a bad --top fails before the model loads
        if where is not None:
            self.allowed_ids(where)  # a bad filter fails before the model loads
        return self.search_vectors(self.embed([query], prompts), top, where)[0]

    def search_multivector(
        self, queries: Tensor | np.ndarray, top: int = 50, where: str | None = None
    ) -> list[Hit]:
        """Top images of one multi-vector query ``[m, D]`` (a picture's representatives)
        by Chamfer / MaxSim: the mean over the query vectors of each one's max cosine over
        an image's representatives (:mod:`retrieval.index.multivector`); a hit names the
        image's representative of the best single match."""
        from retrieval.index.multivector import check_queries, multivector_rows

        top = self.capped_top(top)
        q = check_queries(queries, self.embed_dim)
        self.backend.require_table()
        images = None
        if where is not None:
            images = self.backend.positions_of(self.allowed_ids(where))
            if not len(images):
                return []
        return self.backend.hits(*multivector_rows(self.backend, q, top, images))

    def picture_queries(self, picture: str | Path | Image.Image) -> Tensor:
        """The representatives ``[R, D]`` (unit rows) the index's retriever makes of a
        picture (a file or a PIL image), as the embed phase made an indexed image's."""
        import torch
        from PIL import Image

        from retrieval.data.images import BadImageError, load_image, to_rgb8

        if isinstance(picture, Image.Image):
            image = to_rgb8(picture)
        else:
            try:
                image = load_image(picture)
            except BadImageError as err:
                raise DataError(
                    f"cannot read the query picture {err.path}: {err.reason}; pass an "
                    f"image file (JPEG, PNG, ...)"
                ) from None
        retriever = self.retriever()
        with torch.no_grad():
            pixels = retriever.image_transform(image)[None].to(retriever.device)
            reps = retriever.encode_images(pixels)
        return reps.embeddings[0][reps.mask[0]].float().cpu()

    def stored_queries(self, image_id: int, rep_index: int | None = None) -> Tensor:
        """:meth:`stored_vectors`, for the CLI and Python callers.

        Raises:
            ConfigError: the index has no such live image, or the image no such
                representative (the message lists the ones it has).
        """
        try:
            return self.stored_vectors(image_id, rep_index)
        except NotIndexedError:
            raise ConfigError(
                f"image {image_id} is not in index {self.folder}: pass the id of an indexed "
                f"image (a search's hits name them)"
            ) from None
        except LookupError as err:  # no such representative: the message lists them
            raise ConfigError(str(err)) from None

    def stored_vectors(self, image_id: int, rep_index: int | None = None) -> Tensor:
        """An indexed image's stored representatives ``[R, D]`` ("more like this"), or
        its representative ``rep_index`` alone (a region, ``[1, D]``).

        Raises:
            LookupError: no such live image, or the image has no such representative
                (the message, fit for a client, lists the ones it has).
        """
        rows = self._image_rows(image_id, rep_index)
        table = self.backend.require_table(allow_empty=True)
        return table.float_rows(rows)

    def _image_rows(self, image_id: int, rep_index: int | None) -> np.ndarray:
        """The table rows of a live image (of its representative ``rep_index`` alone).

        Raises:
            NotIndexedError: no such live image.
            LookupError: no such representative of it.
        """
        table = self.backend.require_table(allow_empty=True)
        where = self.backend.positions_of(np.array([image_id]))
        if not len(where):
            raise NotIndexedError(f"image {image_id} is not in this index")
        rows = table.rows_of(where[-1:])
        if rep_index is None:
            return rows
        slots = table.slots[rows]
        match = rows[slots == rep_index][:1]
        if not len(match):
            raise LookupError(
                f"image {image_id} has no representative {rep_index}; its representatives "
                f"are {', '.join(map(str, slots.tolist()))}"
            )
        return match

    def live_image_ids(self) -> np.ndarray:
        """Ids of the images a search can return now (the current generation's)."""
        return self.backend.require_table(allow_empty=True).live_image_ids

    def representative(
        self, image_id: int, rep_index: int
    ) -> tuple[Tensor, tuple[float, float, float, float] | None]:
        """The stored vector ``[D]`` of representative ``rep_index`` of a live image, and
        its box (normalised xyxy, None where the run stored none).

        Raises:
            LookupError: no such live image, or the image has no such representative (the
                message lists the ones it has).
        """
        table = self.backend.require_table(allow_empty=True)
        row = int(self._image_rows(image_id, rep_index)[0])
        box = None
        if table.boxes is not None:
            x0, y0, x1, y1 = (float(v) for v in table.boxes[row])
            box = (x0, y0, x1, y1)
        return table.float_rows(row), box

    def image_files(
        self, image_ids: list[int]
    ) -> tuple[dict[int, Path | None], tuple[Path, ...] | None]:
        """The files of ``image_ids`` (None each the run cannot name) and the folders they
        must resolve inside (:class:`~retrieval.store.run_images.RunImages`, with the
        config stored with the index, else the run's). The folders are the roots the
        dataset checks at embed time, so a file swapped for a symlink out of them after
        indexing is refused when shown too."""
        from retrieval.store.run_images import RunImages

        cfg = self.config if self._files.config.exists() else None  # else the run's
        images = RunImages.open(self.run_dir, cfg)
        return images.paths(image_ids), images.roots

    def search_picture(
        self, picture: str | Path | Image.Image, top: int = 50, where: str | None = None
    ) -> list[Hit]:
        """Top images like a picture (a file or a PIL image): :meth:`search_multivector`
        of its :meth:`picture_queries`; an indexed image's own file ranks it first."""
        self.capped_top(top)  # a bad --top or filter fails before the model loads
        if where is not None:
            self.allowed_ids(where)
        return self.search_multivector(self.picture_queries(picture), top, where)

    def search_like(
        self,
        image_id: int,
        rep_index: int | None = None,
        top: int = 50,
        where: str | None = None,
    ) -> list[Hit]:
        """Top images like an indexed one ("more like this": MaxSim of its stored
        representatives; it ranks itself first), or like one of its regions
        (``rep_index``: that representative's max cosine, as a text query's)."""
        return self.search_multivector(self.stored_queries(image_id, rep_index), top, where)

    def refresh(self) -> bool:
        """Follows ``retrieval index update``: when the folder's ``index.json`` changed since
        this index was opened, reopens the backend at the generation it names (the model
        and config stay loaded) and returns True. A long-lived process (``retrieval
        serve``) calls it before searching, so a removed image is never returned and a
        new one is, right after the update commits."""
        stamp = self._files.stamp()
        if stamp == self._opened:
            return False
        manifest = self._files.manifest()
        backend = self._open_backend(manifest)
        old, self.backend, self.manifest = self.backend, backend, manifest
        self._metadata, self._opened = None, stamp
        old.close()
        return True

    def _open_backend(self, manifest: IndexManifest) -> Backend:
        """The backend at the generation ``manifest`` names, with its recorded settings."""
        from retrieval.index.base import open_backend

        return open_backend(
            manifest.backend,
            self.folder,
            manifest.embed_dim,
            self.device,
            **{**manifest.backend_state, "generation": manifest.generation},
        )

    def close(self) -> None:
        """Releases the backend's client or embedded engine (milvus, lancedb)."""
        self.backend.close()

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_index(folder: str | Path, device: str = "auto") -> SearchIndex:
    """Opens an index folder for search (clear errors for a missing or corrupt one)."""
    return SearchIndex(folder, device)


def search(
    index: str | Path | SearchIndex, query: str, top: int = 50, where: str | None = None
) -> list[Hit]:
    """Top ``top`` images of ``query`` in ``index``: ``Hit(image_id, score, rep_index, box)``
    (among the images whose metadata matches ``where``, when given)."""
    index = index if isinstance(index, SearchIndex) else open_index(index)
    return index.search(query, top, where=where)
