"""``webdataset``: images in local tar shards, streamed, no labels, ids stable as shards
are added.

``data.shards`` names the shards: a brace pattern (``shards/{000000..000099}.tar``,
expanded as webdataset does, once counted: at most :data:`MAX_SHARDS` names), a glob
(``shards/*.tar``), or several joined by ``::``. Listing them reads tar headers only. A
sample's identity is its shard (relative to the pattern's fixed folder, the collection
root) and its ``__key__``, kept in the run's collection table
(:mod:`retrieval.data.collection`) as the path ``<shard>/<member>``
(``000001.tar/000123.jpg``: the member is the sample's image), with the member's size
and tar-header mtime; so a sample keeps its id as shards are added, exactly as a file
of ``folder`` does.

The dataset is a torch ``IterableDataset``: it decodes images straight from the tar
streams, split over DDP ranks and DataLoader workers so that every image is read by
exactly one of them (:meth:`WebDataset.plan`).
"""

from __future__ import annotations

import io
import logging
import os
import re
import string
import tarfile
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from retrieval.data.base import (
    ImageDataset,
    OnBadImage,
    Transform,
    pil_to_uint8_tensor,
    register_dataset,
)
from retrieval.data.collection import NOT_UTF8, NOT_UTF8_REASON, Collection, image_size, is_utf8
from retrieval.data.images import BadImageError, decode_image
from retrieval.errors import ConfigError, DataError, MissingFileError

log = logging.getLogger("retrieval")

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp"})
"""A sample's image: the first member whose extension (any case) is one of these."""
HEADER_BYTES = 1 << 20
"""How much of a new member is read to learn its width and height (never decoded)."""
_WILDCARDS = "{*?[$"
_SHOWN = 3


MAX_SHARDS = 100_000
"""The most shard names ``data.shards`` may expand to (a typo'd range such as
``{000000..999999999}`` names a billion): counted before anything is expanded."""
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")  # braceexpand's own
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_LETTERS = string.ascii_uppercase + string.ascii_lowercase  # braceexpand's letter order


def count_names(pattern: str) -> int:
    """How many names ``braceexpand`` (webdataset's expander) makes of ``pattern``,
    counted without expanding it: its parser's walk (``{a,b}`` alternatives, ``{0..9}``
    / ``{a..z}`` / ``{0..10..2}`` ranges, nesting, ``\\`` escapes), with each part's
    count in place of its names. Unbalanced braces count as text (braceexpand then
    refuses them)."""
    total, start, depth, pos = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if depth == 0:
                start = pos
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                expr = pattern[start + 1 : pos]
                part = _count_expression(expr)
                total *= count_names(expr) if part is None else part
        pos += 1
    return total


def _count_expression(expr: str) -> int | None:
    """A brace group's count: a range's length, the sum over its alternatives, or None
    when it is neither (braceexpand keeps the braces as text)."""
    for regex in (_INT_RANGE, _CHAR_RANGE):
        ranged = regex.match(expr)
        if ranged:
            low, high, step = ranged.groups()
            if regex is _CHAR_RANGE:
                low, high = str(_LETTERS.index(low)), str(_LETTERS.index(high))
            return abs(int(high) - int(low)) // ((int(step) or 1) if step else 1) + 1
    counts, start, depth, pos = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            counts.append(count_names(expr[start:pos]))
            start = pos + 1
        pos += 1
    if depth != 0 or not counts:
        return None
    return sum(counts) + count_names(expr[start:])


def expand_shards(pattern: str) -> tuple[Path, list[Path]]:
    """The collection root and the shard files ``pattern`` names, in order, each once.

    Braces are expanded as webdataset does (``::`` lists, ``{a..b}`` ranges, ``${WDS_*}``
    variables), only after counting the names (at most :data:`MAX_SHARDS`),
    then each result that holds ``*``, ``?`` or ``[`` is globbed (sorted). The root is
    the folder before the first wildcard (the common folder of several patterns), so a
    shard's name relative to it does not change as the range or the glob grows. Names
    that match no file are kept (the listing reports them).

    Raises:
        ConfigError: the pattern names more than :data:`MAX_SHARDS` shards.
    """
    import glob

    from braceexpand import braceexpand
    from webdataset.shardlists import envsubst

    parts = []
    for part in pattern.split("::"):
        for _ in range(10):  # webdataset's expand_urls: variables may name variables
            part, last = envsubst(part), part
            if part == last:
                break
        parts.append(part)
    counts = [count_names(part) for part in parts]
    if sum(counts) > MAX_SHARDS:
        raise ConfigError(
            f"data.shards={pattern} names {sum(counts):,} shards, over the limit of "
            f"{MAX_SHARDS:,} (MAX_SHARDS in retrieval/data/webdataset.py): is a brace range "
            f"mistyped? Check its bounds (e.g. {{000000..000099}}), or split the collection "
            f"into several runs"
        )
    roots = []
    for part in pattern.split("::"):
        cut = min((k for k, c in enumerate(part) if c in _WILDCARDS), default=len(part))
        roots.append(os.path.abspath(os.path.dirname(os.path.expanduser(part[:cut])) or "."))
    root = Path(os.path.commonpath(roots))
    shards: list[Path] = []
    seen: set[str] = set()
    for part in parts:
        try:  # counted above: what braceexpand builds in memory is bounded
            urls = braceexpand(part)
        except ValueError:  # braceexpand's UnbalancedBracesError
            raise ConfigError(
                f"data.shards={pattern}: unbalanced braces in {part!r}; a range is written "
                f"{{000000..000099}} and alternatives {{a,b}} (\\{{ for a literal brace)"
            ) from None
        for url in urls:
            url = os.path.expanduser(url)
            names = sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url]
            for name in names:
                path = os.path.abspath(name)
                if path not in seen:
                    seen.add(path)
                    shards.append(Path(path))
            if len(shards) > MAX_SHARDS:
                raise ConfigError(
                    f"data.shards={pattern} matches more than {MAX_SHARDS:,} shards (the "
                    f"limit, MAX_SHARDS in retrieval/data/webdataset.py): narrow the glob, "
                    f"or split the collection into several runs"
                )
    return root, shards


@dataclass
class ShardListing:
    """The samples of a list of tar shards, in shard then tar order, and what was left out.

    One entry per sample in ``shard`` (index into :attr:`names`), ``members`` (the image
    member's name in its tar), ``offsets`` (of its data in the tar), ``sizes`` (its bytes
    in the file: the header's size, or fewer when the shard is cut through it) and
    ``mtimes`` (ns, from the tar header).
    """

    names: list[str]  # each shard relative to the root, '/'-separated
    shard: array = field(default_factory=lambda: array("i"))
    members: list[str] = field(default_factory=list)
    offsets: array = field(default_factory=lambda: array("q"))
    sizes: array = field(default_factory=lambda: array("q"))
    mtimes: array = field(default_factory=lambda: array("q"))
    skipped: Counter[str] = field(default_factory=Counter)
    cut: dict[int, str] = field(default_factory=dict)  # shard index -> how it ends
    unreadable: dict[int, str] = field(default_factory=dict)  # shard index -> why
    not_utf8: list[str] = field(default_factory=list)  # members left out for their name

    def paths(self) -> list[str]:
        """Each sample's identity, the collection table's ``path``: ``<shard>/<member>``."""
        return [f"{self.names[s]}/{m}" for s, m in zip(self.shard, self.members, strict=True)]

    def summary(self) -> str:
        """``N images in S shards, M skipped (k hidden, j not images[, ...])``."""
        reasons = {"hidden": 0, "not images": 0, **dict(sorted(self.skipped.items()))}
        parts = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        bad = f", {len(self.unreadable)} unreadable" if self.unreadable else ""
        return (
            f"{len(self.members)} images in {len(self.names)} shards{bad}, "
            f"{sum(self.skipped.values())} members skipped ({parts})"
        )


def list_shards(root: Path, shards: list[Path], progress: bool = True) -> ShardListing:
    """Every image sample of ``shards``, from their tar headers alone (nothing decoded).

    A regular member is a sample's image when webdataset's key split
    (``base_plus_ext``) gives an extension in :data:`IMAGE_EXTENSIONS`; the first such
    member of a key is the sample's, later ones of the same key are skipped and counted,
    as are hidden members (a path part starting with ``.``), members whose names are not
    UTF-8 (kept in :attr:`ShardListing.not_utf8`) and every other file. A shard
    cut short keeps the samples before the cut (one cut through is listed with the bytes
    it has, and fails when embedded); one that cannot be opened as a tar is recorded in
    :attr:`ShardListing.unreadable`.
    """
    from webdataset.tariterators import base_plus_ext

    names = [os.path.relpath(path, root).replace(os.sep, "/") for path in shards]
    listing = ShardListing(names)
    skipped = listing.skipped
    bar = _ShardBar(f"listing {len(shards)} tar shards", len(shards), progress)
    for index, path in enumerate(shards):
        if not is_utf8(names[index]):  # the collection table holds UTF-8 text
            listing.unreadable[index] = NOT_UTF8_REASON
            bar.step()
            continue
        try:
            file_size = path.stat().st_size
            with tarfile.open(path, mode="r:") as tar:
                keys: set[str] = set()
                while True:
                    try:
                        info = tar.next()
                    except tarfile.ReadError as err:
                        listing.cut[index] = f"{err}"
                        break
                    if info is None:
                        if file_size < tar.offset + 2 * tarfile.BLOCKSIZE:
                            listing.cut[index] = "no end-of-archive blocks"
                        break
                    if not info.isreg():
                        continue
                    if any(p.startswith(".") for p in info.name.split("/") if p != "."):
                        skipped["hidden"] += 1
                        continue
                    if not is_utf8(info.name):
                        skipped[NOT_UTF8] += 1
                        listing.not_utf8.append(f"{path}/{info.name}")
                        continue
                    key, ext = base_plus_ext(info.name)
                    if key is None or ext.lower() not in IMAGE_EXTENSIONS:
                        skipped["not images"] += 1
                        continue
                    if key in keys:
                        skipped["second images of a key"] += 1
                        continue
                    keys.add(key)
                    listing.shard.append(index)
                    listing.members.append(info.name)
                    listing.offsets.append(info.offset_data)
                    listing.sizes.append(min(info.size, max(0, file_size - info.offset_data)))
                    listing.mtimes.append(int(info.mtime * 1_000_000_000))
        except FileNotFoundError:
            listing.unreadable[index] = "shard not found"
        except (tarfile.TarError, OSError) as err:
            listing.unreadable[index] = f"not an uncompressed tar file ({err})"
        bar.step()
    bar.close()
    return listing


@register_dataset("webdataset")
class WebDataset(ImageDataset, IterableDataset):
    """Every image sample of local tar shards as an unlabelled collection, streamed.

    Ids come from the run's collection table ``<run_dir>/images.parquet`` (see the
    module docstring): an unchanged sample keeps its id, new ones (a new shard, a new
    key) get new ones, vanished ones are marked removed; :attr:`image_ids` are the live
    ids. Iterating yields ``dict(image_id, pixels, error, path)`` items, as
    ``ImageDataset.__getitem__`` does, for the ids of :meth:`restrict` (default: all),
    this process's share only (:meth:`plan`). A sample that cannot be decoded, or that a
    cut-short shard does not hold in full, is reported under ``on_bad_image`` with the
    shard in its path and reason.

    ``len()`` is deliberately undefined: each DataLoader worker yields its own share, so
    a length would make Lightning stop after ``ceil(len / batch_size)`` batches and drop
    the workers' partial batches. :meth:`items_for_rank` gives the count instead.

    Args:
        shards: the tar shards (config ``data.shards``): a brace pattern, a glob, or
            several joined by ``::``; ``~`` expanded. Uncompressed tars only.
        transform: PIL image -> tensor, normally the retriever's ``image_transform``.
        on_bad_image: ``error`` stops at a missing or unreadable shard (when listing) and
            at an undecodable or cut-off sample (when embedding); ``skip`` (the default
            for a collection) leaves them out and lists them in the run folder's
            ``skipped.csv`` (config ``data.on_bad_image``).
        max_images: keep only the first N live ids (ascending), for quick runs.
        run_dir: the run folder holding the collection table (``run.output_dir``); None
            assigns ids in memory only.
        progress: show a progress bar over the shards while listing (``run.progress``).
    """

    CONFIG_OPTIONS = {"run_dir": "run.output_dir", "progress": "run.progress"}
    # the table maps ids to samples, so growing the range or glob re-uses stored shards
    LABEL_ONLY_OPTIONS = ImageDataset.LABEL_ONLY_OPTIONS | {"shards", "run_dir"}
    dataset_name = "webdataset"

    def __init__(
        self,
        shards: str,
        transform: Transform | None = None,
        on_bad_image: OnBadImage = "skip",
        max_images: int | None = None,
        run_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        root, paths = expand_shards(shards)
        super().__init__(root, transform, on_bad_image, max_images)
        if not paths:
            raise MissingFileError(
                f"data.shards={shards} matches no file; give local tar shards as a brace "
                f"pattern (shards/{{000000..000099}}.tar) or a glob (shards/*.tar)"
            )
        listing = list_shards(root, paths, progress)
        log.info("%s: %s", shards, listing.summary())
        self.failures_at_start: list[dict[str, Any]] = [
            {"image_id": None, "path": str(paths[k]), "reason": reason}
            for k, reason in listing.unreadable.items()
        ]
        if self.failures_at_start:
            self._report_unreadable(shards, len(paths), on_bad_image)
        self.failures_at_start += [
            {"image_id": None, "path": member, "reason": NOT_UTF8_REASON}
            for member in listing.not_utf8
        ]
        for k, how in listing.cut.items():
            log.warning(
                "tar shard %s is cut short (%s): its samples before the cut are embedded, "
                "one cut through is reported as unreadable, any after the cut are unknown. "
                "Re-create the shard and rerun: repaired samples get new ids.",
                paths[k], how,
            )  # fmt: skip
        if not listing.members:
            raise DataError(
                f"no images in data.shards={shards}: {listing.summary()}. Each sample needs "
                f"a member named KEY.{{{','.join(sorted(IMAGE_EXTENSIONS))}}} (any case)"
            )
        import pyarrow as pa
        import pyarrow.compute as pc

        files = pa.table(
            {
                "path": pa.array(listing.paths(), pa.string()),
                "size_bytes": np.frombuffer(listing.sizes, np.int64),
                "mtime_ns": np.frombuffer(listing.mtimes, np.int64),
            }
        )
        self.shard_paths = paths
        self.shard_names = listing.names
        self._shard = np.frombuffer(listing.shard, np.int32)
        self._members = listing.members
        self._offsets = np.frombuffer(listing.offsets, np.int64)
        self._sizes = np.frombuffer(listing.sizes, np.int64)
        with _MemberSizes(self) as read_size:
            self.collection = Collection(files, root, run_dir, progress, read_size)
        table = self.collection.table
        live = table.filter(pc.invert(table.column("removed")))
        rows = pc.index_in(files.column("path"), value_set=live.column("path"))
        self._row_ids = live.column("image_id").to_numpy()[rows.to_numpy()]  # per sample
        self._by_id = np.argsort(self._row_ids)
        self.image_ids: np.ndarray = self.collection.live_ids[:max_images]
        self._rows = np.flatnonzero(np.isin(self._row_ids, self.image_ids))
        self._dist: tuple[int, int] | None = None

    def _report_unreadable(self, shards: str, total: int, on_bad_image: str) -> None:
        failures = self.failures_at_start
        shown = [f"  {f['path']}: {f['reason']}" for f in failures[:_SHOWN]]
        more = [f"  ... and {len(failures) - _SHOWN} more"] if len(failures) > _SHOWN else []
        message = "\n".join(
            [f"{len(failures)} of {total} shards of data.shards={shards} cannot be read:"]
            + shown
            + more
        )
        if on_bad_image == "error":
            missing = all(f["reason"] == "shard not found" for f in failures)
            raise (MissingFileError if missing else DataError)(
                f"{message}\nFix data.shards or the files, or set data.on_bad_image=skip to "
                f"leave them out."
            )
        log.warning("%s\nLeft out (data.on_bad_image=skip).", message)

    # ids ------------------------------------------------------------------------------
    def image_path(self, image_id: int) -> Path:
        """``<root>/<shard>/<member>`` of any id the collection table holds (a name, not
        a file: the image is a member of the shard)."""
        return self.collection.image_path(image_id)

    def restrict(self, image_ids: np.ndarray) -> None:
        """Iterate over these ids only (the engine passes the ids still to embed).

        Raises:
            ValueError: an id is not one of :attr:`image_ids`.
        """
        ids = np.unique(np.asarray(image_ids, np.int64))
        unknown = ids[~np.isin(ids, self.image_ids)]
        if len(unknown):
            raise ValueError(f"image ids {unknown[:_SHOWN].tolist()} are not in this dataset")
        self._rows = np.flatnonzero(np.isin(self._row_ids, ids))

    # splitting ------------------------------------------------------------------------
    def plan(self, consumer: int, consumers: int) -> np.ndarray:
        """The samples (listing rows, in shard then tar order) that reader ``consumer`` of
        ``consumers`` yields; readers are ``rank * workers + worker``.

        Whole shards round-robin when there are at least as many shards (holding samples
        to yield) as readers, so each reads only its shards; otherwise sample ``k`` of the
        ids to yield goes to reader ``k % consumers`` (each reads the shards, decoding
        only its own samples). Either way every sample goes to exactly one reader.
        """
        rows = self._rows
        shard = self._shard[rows]
        present = np.unique(shard)
        if len(present) >= consumers:
            return rows[np.isin(shard, present[consumer::consumers])]
        return rows[consumer::consumers]

    def _rank_world(self) -> tuple[int, int]:
        """``(rank, world size)``: torch.distributed when initialised (also in a forked
        DataLoader worker), the value captured when pickled for a spawned worker, else
        the ``RANK`` / ``WORLD_SIZE`` environment (1 process)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        if self._dist is not None:
            return self._dist
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_dist"] = self._rank_world()  # a spawned worker has no process group
        return state

    def items_for_rank(self, num_workers: int = 0) -> int:
        """How many items this process's DataLoader yields with ``num_workers`` workers
        (its progress bar's total)."""
        rank, world = self._rank_world()
        workers = max(num_workers, 1)
        return sum(len(self.plan(rank * workers + w, world * workers)) for w in range(workers))

    def __len__(self) -> int:
        raise TypeError(
            "a streamed webdataset has no len(): use len(dataset.image_ids) for the "
            "collection, items_for_rank(num_workers) for this process's share"
        )

    # reading --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world = self._rank_world()
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        rows = self.plan(rank * workers + worker, world * workers)
        if not len(rows):
            return
        shard = self._shard[rows]
        starts = np.flatnonzero(np.diff(shard, prepend=-1))  # rows are grouped by shard
        for start, end in zip(starts, [*starts[1:], len(rows)], strict=True):
            yield from self._stream(int(shard[start]), rows[start:end])

    def _stream(self, shard: int, rows: np.ndarray) -> Iterator[dict[str, Any]]:
        """The items of ``rows`` (all in ``shard``) in tar order, decoded from the tar
        stream; those the stream does not reach (a cut, a changed shard) as failures."""
        from webdataset.tariterators import tar_file_iterator

        wanted = {self._members[r]: int(r) for r in rows}
        name = self.shard_names[shard]
        reason = f"not found in tar shard {name} (it changed since it was listed)"
        try:
            file = open(self.shard_paths[shard], "rb")  # noqa: SIM115 - closed below
        except OSError as err:
            reason = f"tar shard {name} cannot be opened ({type(err).__name__}: {err})"
        else:
            with file:
                samples = tar_file_iterator(file, skip_meta=None, select_files=wanted.__contains__)
                while wanted:
                    try:
                        sample = next(samples)
                    except StopIteration:
                        break
                    except (tarfile.TarError, OSError, EOFError) as err:
                        detail = str(err).split(" @ ")[0]  # webdataset appends the stream
                        reason = f"tar shard {name} is cut short ({detail}) before this sample"
                        break
                    row = wanted.pop(sample["fname"], None)
                    if row is not None:
                        yield self._item(row, sample["data"])
        for row in wanted.values():
            yield self._bad(row, reason)

    def _path(self, row: int) -> str:
        return str(self.images_dir / self.shard_names[self._shard[row]] / self._members[row])

    def _item(self, row: int, data: bytes) -> dict[str, Any]:
        path = self._path(row)
        try:
            image = _decode(data, path)
        except BadImageError as err:
            return self._bad(row, err.reason)
        pixels = self.transform(image) if self.transform is not None else pil_to_uint8_tensor(image)
        return {"image_id": int(self._row_ids[row]), "pixels": pixels, "error": None, "path": path}

    def _bad(self, row: int, reason: str) -> dict[str, Any]:
        path = self._path(row)
        if self.on_bad_image == "error":
            raise BadImageError(path, reason)
        return {"image_id": int(self._row_ids[row]), "pixels": None, "error": reason, "path": path}

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The item of ``image_ids[index]``, read by seeking to its member (random access
        for a notebook; the embed phase streams instead)."""
        image_id = int(self.image_ids[index])
        row = int(self._by_id[np.searchsorted(self._row_ids, image_id, sorter=self._by_id)])
        try:
            with open(self.shard_paths[self._shard[row]], "rb") as file:
                file.seek(int(self._offsets[row]))
                data = file.read(int(self._sizes[row]))
        except OSError as err:
            return self._bad(row, f"tar shard cannot be read ({type(err).__name__}: {err})")
        return self._item(row, data)


def _decode(data: bytes, path: str) -> Image.Image:
    """A member's image exactly as :func:`retrieval.data.images.load_image` reads a file
    (the same :func:`~retrieval.data.images.decode_image`: a 16-bit PNG stays grey).

    Raises:
        BadImageError: not an image, truncated or corrupt (``path`` names the member).
    """
    return decode_image(io.BytesIO(data), path)


class _MemberSizes:
    """The collection's size reader: a new sample's width and height from the first
    :data:`HEADER_BYTES` of its member (header only), one shard file open at a time
    (paths arrive sorted, so a shard's samples come together)."""

    def __init__(self, dataset: WebDataset) -> None:
        self.dataset = dataset
        self.shard_of = {name: k for k, name in enumerate(dataset.shard_names)}
        self.current = -1
        self.rows: dict[str, int] = {}
        self.file: io.BufferedReader | None = None

    def __enter__(self) -> _MemberSizes:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()

    def __call__(self, path: str) -> tuple[int, int] | None:
        data = self.dataset
        cut = path.find("/")
        while cut >= 0 and path[:cut] not in self.shard_of:
            cut = path.find("/", cut + 1)
        if cut < 0:
            return None
        shard = self.shard_of[path[:cut]]
        if shard != self.current:
            if self.file is not None:
                self.file.close()
                self.file = None
            self.current = shard
            rows = np.flatnonzero(data._shard == shard)
            self.rows = {data._members[r]: int(r) for r in rows}
            try:
                self.file = open(data.shard_paths[shard], "rb")  # noqa: SIM115 - see __exit__
            except OSError:
                return None
        row = self.rows.get(path[cut + 1 :])
        if row is None or self.file is None:
            return None
        try:
            self.file.seek(int(data._offsets[row]))
            head = self.file.read(min(int(data._sizes[row]), HEADER_BYTES))
        except OSError:
            return None
        return image_size(io.BytesIO(head))


class _ShardBar:
    """A transient progress bar over shards (listing reads every tar header)."""

    def __init__(self, description: str, total: int, enabled: bool) -> None:
        self._bar: Any = None
        if enabled and total > 1:
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
