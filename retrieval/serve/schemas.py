"""Request bodies and response shapes of the API (validation, and the /docs page)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from retrieval.index.hits import HitRecord

MAX_TOP = 1000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # image ids are int64 everywhere
ImageId = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX, description="an image id")]


class Filters(BaseModel):
    """Fields every POST search takes."""

    model_config = ConfigDict(extra="forbid")
    index: str | None = Field(None, description="index name (optional when one is served)")
    top: int = Field(50, ge=1, le=MAX_TOP, description="images to return")
    where: str | None = Field(None, description='metadata filter, e.g. "width >= 1024"')


class CompoundQuery(Filters):
    """Positive texts (weighted) minus negative ones: see docs/serve.md for the formula."""

    positive: list[str] = Field(min_length=1, description="texts the images should show")
    negative: list[str] = Field(default_factory=list, description="texts they should not")
    weights: list[Annotated[float, Field(allow_inf_nan=False)]] | None = Field(
        None, description="one weight per positive text (default 1 each)"
    )
    negative_weight: float | None = Field(
        None, ge=0, le=10, allow_inf_nan=False, description="λ: how hard negatives push away"
    )


class ExampleQuery(Filters):
    """More like this: an indexed image as a multi-vector query (MaxSim of its stored
    representatives), or, with ``rep_index``, its stored representative alone (a region)."""

    image_id: ImageId
    rep_index: int | None = Field(
        None, ge=0, le=INT64_MAX, description="one stored region; omit for the whole image"
    )


class RegionQuery(Filters):
    """A region drawn on an indexed image: the query is the normalised mean of the
    image's Dense-CLIP cells under ``box``, each weighted by the share of it the box
    covers (an index without cells encodes the crop instead); see docs/serve.md."""

    image_id: ImageId
    box: tuple[
        Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)],
        Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)],
        Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)],
        Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)],
    ] = Field(description="x0, y0, x1, y1 in 0..1 of the image's width and height")


class HitOut(HitRecord):
    """A hit: the one hit shape (:mod:`retrieval.index.hits`: rank, image_id, score,
    rep_index, box as x0, y0, x1, y1 in 0..1 or null, path, file_name) plus the URL of
    the image on this server."""

    image_url: str


class SearchOut(BaseModel):
    index: str
    query: dict[str, Any]
    top: int
    took_ms: float
    recall: dict[str, Any]
    hits: list[HitOut]


class IndexOut(BaseModel):
    name: str
    backend: str
    retriever: dict[str, Any]
    images: int
    representatives: int
    embed_dim: int
    recall: dict[str, Any]
    generation: int
    metadata_columns: list[str]
    random_weights: bool


class IndexesOut(BaseModel):
    indexes: list[IndexOut]


class Problem(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Problem} for code in (400, 401, 403, 404, 413, 422)
}
