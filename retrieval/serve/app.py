"""The FastAPI application: routes over the served indexes (docs/serve.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from retrieval.serve.docs import install_docs
from retrieval.serve.errors import ApiError, describe_validation, install_handlers
from retrieval.serve.queries import NON_FINITE, Answer, Job, compound, first, representative
from retrieval.serve.schemas import (
    ERRORS,
    INT64_MAX,
    INT64_MIN,
    MAX_TOP,
    CompoundQuery,
    ExampleQuery,
    Filters,
    IndexesOut,
    RegionQuery,
    SearchOut,
)
from retrieval.serve.security import BodyLimit, TokenGate, read_upload
from retrieval.serve.served import ServedIndex
from retrieval.serve.settings import ServeSettings

IMAGE_SIZE = Query(None, ge=16, le=2048, description="fit into size x size pixels")
IMAGE_ID = Path(ge=INT64_MIN, le=INT64_MAX, description="an id of the index's images")
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


def create_app(served: Mapping[str, ServedIndex], settings: ServeSettings) -> FastAPI:
    """The API over ``served`` (name -> loaded index), with the page at ``/``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for item in served.values():
            item.batcher.start()
        yield
        for item in served.values():
            await item.batcher.stop()
            item.close()

    app = FastAPI(
        title="retrieval",
        summary="Object-centric open-vocabulary image search over built indexes",
        lifespan=lifespan,
        docs_url=None,  # install_docs: Swagger UI from local files, not a CDN
        redoc_url=None,
    )
    install_handlers(app)
    install_docs(app)
    app.add_middleware(BodyLimit, upload_bytes=settings.max_upload_bytes)
    if settings.token:
        app.add_middleware(TokenGate, token=settings.token)
    if settings.cors_origin:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[settings.cors_origin],
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    def pick(name: str | None) -> ServedIndex:
        if name is None:
            if len(served) == 1:
                return next(iter(served.values()))
            raise ApiError(
                422, f"several indexes are served ({', '.join(served)}): pass index=NAME"
            )
        if name not in served:
            raise ApiError(404, f"unknown index {name!r}; served: {', '.join(served)}")
        return served[name]

    def check_text(text: str, what: str) -> str:
        if not text.strip():
            raise ApiError(422, f"{what} is empty: send some text, e.g. 'a stroller'")
        if len(text) > settings.max_query_chars:
            raise ApiError(
                422, f"{what} is {len(text)} characters; the limit is {settings.max_query_chars}"
            )
        return text

    async def check_where(item: ServedIndex, where: str | None) -> str | None:
        """The filter, checked whole (length, syntax, columns) before its query joins a
        batch: a bad one is this request's 400 alone."""
        if where is not None and len(where) > settings.max_where_chars:
            raise ApiError(
                422,
                f"the filter (where) is {len(where)} characters; the limit is "
                f"{settings.max_where_chars}",
            )
        if where:
            await run_in_threadpool(item.check_where, where)
        return where or None

    async def in_worker(item: ServedIndex, function: Any, *args: Any) -> Any:
        """``function(*args)`` in the index's worker thread (the model runs one call at a
        time there), after picking up a committed index update."""
        await item.current()
        return await asyncio.get_running_loop().run_in_executor(item.executor, function, *args)

    async def answer(item: ServedIndex, job: Job, query: dict, begin: float) -> JSONResponse:
        """The search response (built here: FastAPI's encoder would walk every hit again)."""
        result: Answer = await item.batcher.submit(job)
        hits = item.hits_json(result.hits)
        return JSONResponse(
            {
                "index": item.name,
                "query": query,
                "top": item.index.capped_top(job.top) if job.top is not None else None,
                "took_ms": 1000 * (time.perf_counter() - begin),
                "recall": item.index.recall,
                "hits": hits,
            }
        )

    @app.get("/healthz", tags=["service"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/indexes", response_model=IndexesOut, tags=["service"])
    async def indexes() -> dict[str, Any]:
        """The served indexes: backend, retriever, size, recall, filterable columns."""
        for item in served.values():
            await item.current()
        return {"indexes": [item.info() for item in served.values()]}

    @app.get("/api/stats", tags=["service"])
    async def stats() -> dict[str, Any]:
        """Model calls (text batches + image encodes), queries and searches so far."""
        per = {
            name: vars(item.counters) | {"batches": item.batcher.batches}
            for name, item in served.items()
        }
        totals = {
            key: sum(p[key] for p in per.values())
            for key in ("model_calls", "queries", "searches", "batches")
        }
        return {**totals, "indexes": per}

    @app.get("/api/search", responses={200: {"model": SearchOut}, **ERRORS}, tags=["search"])
    async def search_text(
        q: str = Query(description="what to find, e.g. 'a stroller'"),
        top: int = Query(50, ge=1, le=MAX_TOP),
        index: str | None = Query(None, description="index name (optional with one index)"),
        where: str | None = Query(None, description="metadata filter"),
    ) -> JSONResponse:
        """Top images of a text query: the same hits as ``open_index(folder).search``."""
        begin = time.perf_counter()
        item = pick(index)
        job = Job([check_text(q, "q")], first, top=top, where=await check_where(item, where))
        return await answer(item, job, {"q": q, "where": job.where}, begin)

    @app.post(
        "/api/search",
        responses={200: {"model": SearchOut}, **ERRORS},
        openapi_extra=POST_BODY,
        tags=["search"],
    )
    async def search_post(request: Request) -> JSONResponse:
        """A compound text query, a stored region (``image_id`` + ``rep_index``) or an
        uploaded picture (multipart field ``image``)."""
        begin = time.perf_counter()
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            return await search_upload(request, begin)
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
        if "box" in body:
            return await search_region(parse(RegionQuery, body), begin)
        if "image_id" in body or "rep_index" in body:
            return await search_example(parse(ExampleQuery, body), begin)
        if "positive" not in body:
            raise ApiError(
                422,
                "the body needs 'positive' (texts), 'image_id' and 'rep_index' (a stored "
                "region) or 'image_id' and 'box' (a drawn region) (see /docs)",
            )
        return await search_compound(parse(CompoundQuery, body), begin)

    async def search_compound(body: CompoundQuery, begin: float) -> JSONResponse:
        item = pick(body.index)
        texts = body.positive + body.negative
        if len(texts) > settings.max_texts:
            raise ApiError(
                422, f"{len(texts)} texts; a compound query takes at most {settings.max_texts}"
            )
        for i, text in enumerate(body.positive):
            check_text(text, f"positive[{i}]")
        for i, text in enumerate(body.negative):
            check_text(text, f"negative[{i}]")
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
            where=await check_where(item, body.where),
        )
        echo = body.model_dump(exclude={"index", "top"})
        return await answer(item, job, echo, begin)

    async def search_example(body: ExampleQuery, begin: float) -> JSONResponse:
        item = pick(body.index)
        try:
            vector = representative(item.index, body.image_id, body.rep_index)[0]
        except LookupError as err:
            raise ApiError(404, f"{err} (index {item.name!r})") from None
        job = Job(vector=vector, top=body.top, where=await check_where(item, body.where))
        echo = {"image_id": body.image_id, "rep_index": body.rep_index, "where": job.where}
        return await answer(item, job, echo, begin)

    async def search_region(body: RegionQuery, begin: float) -> JSONResponse:
        item = pick(body.index)
        where = await check_where(item, body.where)
        vector = await in_worker(item, item.images.region_vector, body.image_id, body.box)
        job = Job(vector=vector, top=body.top, where=where)
        echo = {"image_id": body.image_id, "box": list(body.box), "where": where}
        return await answer(item, job, echo, begin)

    async def search_upload(request: Request, begin: float) -> JSONResponse:
        limit = settings.max_upload_bytes
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "form field 'image' is required and must be a file")
        fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
        body = parse(Filters, fields)
        item = pick(body.index)
        data = await upload.read(limit + 1)
        image = await run_in_threadpool(read_upload, data, limit, settings.max_pixels)
        loop = asyncio.get_running_loop()
        vector = await loop.run_in_executor(item.executor, item.encode_picture, image)
        job = Job(vector=vector, top=body.top, where=await check_where(item, body.where))
        echo = {
            "image": upload.filename,
            "size_bytes": len(data),
            "width": image.width,
            "height": image.height,
            "where": job.where,
        }
        return await answer(item, job, echo, begin)

    @app.get(
        "/api/images/{index}/{image_id}",
        tags=["images"],
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
    )
    async def image(
        index: str,
        image_id: int = IMAGE_ID,
        size: int | None = IMAGE_SIZE,
        rep: int | None = Query(None, ge=0, description="draw this representative's box"),
    ) -> Response:
        """The image (JPEG), by id only, resized and with a representative's box if asked."""
        item = pick(index)
        await item.current()
        data = await run_in_threadpool(item.images.photo, image_id, size, rep)
        return Response(data, media_type="image/jpeg", headers=PRIVATE)

    @app.get(
        "/api/images/{index}/{image_id}/heatmap",
        tags=["images"],
        responses={200: {"content": {"image/png": {}}}, **ERRORS},
    )
    async def heatmap(
        index: str,
        image_id: int = IMAGE_ID,
        q: str = Query(description="the query whose cosine per cell is drawn"),
        size: int | None = IMAGE_SIZE,
    ) -> Response:
        """PNG of the query's cosine with each of the image's cells, a translucent colour
        layer over the photo (blue low, red high, scaled to this image's range, stated by
        the bar along its bottom edge), on any Dense-/Cluster-CLIP index."""
        item = pick(index)
        await item.current()
        item.images.path(image_id)  # an unknown id fails before the model runs
        result: Answer = await item.batcher.submit(Job([check_text(q, "q")], first))
        data = await in_worker(item, item.images.heatmap, image_id, result.vector, size)
        return Response(data, media_type="image/png", headers=PRIVATE)

    page = settings.static_dir / "index.html"

    @app.get("/", include_in_schema=False)
    async def home() -> FileResponse:
        if not page.is_file():
            raise ApiError(404, f"the search page is not installed ({page} is missing)")
        return FileResponse(page)

    if settings.static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=settings.static_dir), name="static")
    return app


PRIVATE = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}


def parse(model: type[Filters], data: dict) -> Any:
    """``data`` as ``model``, or a 422 naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ApiError(422, describe_validation(RequestValidationError(err.errors()))) from None
