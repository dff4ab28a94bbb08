"""One hit, one shape: the record every surface writes for a retrieved image.

``retrieval search --json``, the HTTP API (``/api/search``), the Python :class:`Hit`
(:meth:`Hit.record`), the gallery and ``retrieval export`` name the same fields the
same way, so a script written against one reads the others:

- ``rank``: 1 for the best hit;
- ``image_id``: the run's stable image id;
- ``score``: the max cosine of the query over the image's representatives;
- ``rep_index``: the representative (slot) that gave the score;
- ``box``: that representative's box ``[x0, y0, x1, y1]`` in 0..1 of the image's width
  and height, or null when the retriever gives no boxes;
- ``path``: the image file (absolute), or null when it cannot be found;
- ``file_name``: the file's name (the last part of ``path``), or null.

An export row is an image's representative rather than a hit: it carries the same
``image_id``, ``path``, ``file_name``, ``rep_index`` and ``box`` (no rank or score)
plus the embedding and the collection's metadata columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from typing_extensions import TypedDict  # pydantic reads it on Python 3.11 (the API)

Box = tuple[float, float, float, float]


class HitRecord(TypedDict):
    """A hit as JSON (see the module docstring for each field)."""

    rank: int
    image_id: int
    score: float
    rep_index: int
    box: list[float] | None
    path: str | None
    file_name: str | None


HIT_FIELDS: tuple[str, ...] = tuple(HitRecord.__annotations__)
#: the fields an export row shares with a hit (a representative: no rank, no score)
ROW_FIELDS: tuple[str, ...] = ("image_id", "path", "file_name", "rep_index", "box")


def file_fields(path: str | Path | None) -> tuple[str | None, str | None]:
    """``(path, file_name)`` of an image file (both None when it is unknown)."""
    if path is None:
        return None, None
    path = Path(path)
    return str(path), path.name


class Hit(NamedTuple):
    """One retrieved image: its score and the representative that gave it."""

    image_id: int
    score: float
    rep_index: int
    box: Box | None

    def record(self, rank: int, path: str | Path | None) -> HitRecord:
        """This hit in the shape every surface writes (module docstring)."""
        file, name = file_fields(path)
        return HitRecord(
            rank=rank,
            image_id=int(self.image_id),
            score=float(self.score),
            rep_index=int(self.rep_index),
            box=None if self.box is None else [float(v) for v in self.box],
            path=file,
            file_name=name,
        )
