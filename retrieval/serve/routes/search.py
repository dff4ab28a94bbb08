"""Search: ``GET /api/search`` (a text query) and ``POST /api/search``, whose body is one
of four query kinds, each answered by its own handler: a compound text query, a stored
region (``image_id`` + ``rep_index``) or a drawn one (``image_id`` + ``box``), as JSON,
and an uploaded picture, as multipart. :func:`json_kind` tells the JSON kinds apart by
the field only that kind has (the public API: docs/serve.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from retrieval.serve.deps import (
    Served,
    Settings,
    answer,
    check_text,
    check_where,
    in_worker,
    parse,
    pick,
)
from retrieval.serve.errors import ApiError
from retrieval.serve.queries import NON_FINITE, Job, compound, first
from retrieval.serve.schemas import (
    ERRORS,
    MAX_TOP,
    CompoundQuery,
    ExampleQuery,
    Filters,
    RegionQuery,
    SearchOut,
)
from retrieval.serve.security import read_upload
from retrieval.serve.served import ServedIndex
from retrieval.serve.settings import ServeSettings

FLOAT32_MAX = 3.4e38
POST_BODY = {
    "requestBody": {
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        CompoundQuery.model_json_schema(),
                        ExampleQuery.model_json_schema(),
                        RegionQuery.model_json_schema(),
                    ]
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "index": {"type": "string"},
                        "top": {"type": "integer", "default": 50},
                        "where": {"type": "string"},
                    },
                }
            },
        },
        "required": True,
    }
}

router = APIRouter(tags=["search"])


@router.get("/api/search", responses={200: {"model": SearchOut}, **ERRORS})
async def search_text(
    served: Served,
    settings: Settings,
    q: str = Query(description="what to find, e.g. 'a stroller'"),
    top: int = Query(50, ge=1, le=MAX_TOP),
    index: str | None = Query(None, description="index name (optional with one index)"),
    where: str | None = Query(None, description="metadata filter"),
) -> JSONResponse:
    """Top images of a text query: the same hits as ``open_index(folder).search``."""
    begin = time.perf_counter()
    item = pick(served, index)
    text = check_text(settings, q, "q")
    job = Job([text], first, top=top, where=await check_where(settings, item, where))
    return await answer(item, job, {"q": q, "where": job.where}, begin)


@router.post(
    "/api/search", responses={200: {"model": SearchOut}, **ERRORS}, openapi_extra=POST_BODY
)
async def search_post(request: Request, served: Served, settings: Settings) -> JSONResponse:
    """A compound text query, an indexed image (``image_id``: more like this), a stored
    region (``image_id`` + ``rep_index``), a drawn one (``image_id`` + ``box``) or an
    uploaded picture (multipart field ``image``)."""
    begin = time.perf_counter()
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await search_upload(request, served, settings, begin)
    if kind != "application/json":
        raise ApiError(
            415,
            f"POST /api/search takes application/json (a compound or example query) or "
            f"multipart/form-data (an image upload), not {kind or 'no content type'!r}",
        )
    try:
        body = await request.json()
    except ValueError as err:
        raise ApiError(422, f"the body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise ApiError(422, "the body must be a JSON object (see /docs)")
    model, handler = json_kind(body)
    query = parse(model, body)
    return await handler(query, pick(served, query.index), settings, begin)


async def search_compound(
    body: CompoundQuery, item: ServedIndex, settings: ServeSettings, begin: float
) -> JSONResponse:
    """Positive texts (weighted) minus negative ones: :func:`~retrieval.serve.queries.compound`."""
    texts = body.positive + body.negative
    if len(texts) > settings.max_texts:
        raise ApiError(
            422, f"{len(texts)} texts; a compound query takes at most {settings.max_texts}"
        )
    for i, text in enumerate(body.positive):
        check_text(settings, text, f"positive[{i}]")
    for i, text in enumerate(body.negative):
        check_text(settings, text, f"negative[{i}]")
    if body.weights is not None and len(body.weights) != len(body.positive):
        raise ApiError(
            422,
            f"weights has {len(body.weights)} values for "
            f"{len(body.positive)} positive texts: give one per text",
        )
    if body.weights is not None and not sum(abs(w) for w in body.weights) < FLOAT32_MAX:
        raise ApiError(422, NON_FINITE)  # Σ|w_i| bounds every component (unit texts)
    job = Job(
        texts,
        compound(len(body.positive), body.weights, body.negative_weight),
        top=body.top,
        where=await check_where(settings, item, body.where),
    )
    echo = body.model_dump(exclude={"index", "top"})
    return await answer(item, job, echo, begin)


async def search_example(
    body: ExampleQuery, item: ServedIndex, settings: ServeSettings, begin: float
) -> JSONResponse:
    """An indexed image's stored representatives as a multi-vector (MaxSim) query, or one
    of them (``rep_index``) as the query vector."""
    try:
        if body.rep_index is None:
            vector = item.index.stored_vectors(body.image_id)
        else:  # one vector: batched with the other one-vector queries
            vector = item.index.representative(body.image_id, body.rep_index)[0]
    except LookupError as err:
        raise ApiError(404, f"{err} (index {item.name!r})") from None
    job = Job(vector=vector, top=body.top, where=await check_where(settings, item, body.where))
    echo = {"image_id": body.image_id, "rep_index": body.rep_index, "where": job.where}
    return await answer(item, job, echo, begin)


async def search_region(
    body: RegionQuery, item: ServedIndex, settings: ServeSettings, begin: float
) -> JSONResponse:
    """A box drawn on an indexed image: its cells under the box, else its crop encoded."""
    where = await check_where(settings, item, body.where)
    vector = await in_worker(item, item.images.region_vector, body.image_id, body.box)
    job = Job(vector=vector, top=body.top, where=where)
    echo = {"image_id": body.image_id, "box": list(body.box), "where": where}
    return await answer(item, job, echo, begin)


async def search_upload(
    request: Request, served: Served, settings: ServeSettings, begin: float
) -> JSONResponse:
    """An uploaded picture: its representatives as the run's retriever encodes them."""
    limit = settings.max_upload_bytes
    form = await request.form(max_files=1, max_fields=8)
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ApiError(422, "form field 'image' is required and must be a file")
    fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
    body = parse(Filters, fields)
    item = pick(served, body.index)
    data = await upload.read(limit + 1)
    image = await run_in_threadpool(read_upload, data, limit, settings.max_pixels)
    loop = asyncio.get_running_loop()
    vector = await loop.run_in_executor(item.executor, item.encode_picture, image)
    job = Job(vector=vector, top=body.top, where=await check_where(settings, item, body.where))
    echo = {
        "image": upload.filename,
        "size_bytes": len(data),
        "width": image.width,
        "height": image.height,
        "where": job.where,
    }
    return await answer(item, job, echo, begin)


Handler = Callable[[Any, ServedIndex, ServeSettings, float], Awaitable[JSONResponse]]


def json_kind(body: dict) -> tuple[type[Filters], Handler]:
    """The JSON query kind of ``body`` and its handler, by the field only that kind has:
    ``box`` a drawn region, ``image_id`` / ``rep_index`` an indexed image or one of its
    stored regions, ``positive`` a compound query; none of them is a 422 naming them."""
    if "box" in body:
        return RegionQuery, search_region
    if "image_id" in body or "rep_index" in body:
        return ExampleQuery, search_example
    if "positive" in body:
        return CompoundQuery, search_compound
    raise ApiError(
        422,
        "the body needs 'positive' (texts), 'image_id' (more like an indexed image; "
        "with 'rep_index', like one of its stored regions) or 'image_id' and 'box' "
        "(a drawn region) (see /docs)",
    )
