"""What every route shares: the served indexes and settings (FastAPI dependencies, read
from ``app.state``, where :func:`~retrieval.serve.app.create_app` puts them; ``async`` so
FastAPI calls them on the event loop, not in its thread pool), the index a request
names, the checks every query kind makes, and the search answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from retrieval.serve.errors import ApiError, describe_validation
from retrieval.serve.queries import Answer, Job
from retrieval.serve.served import ServedIndex
from retrieval.serve.settings import ServeSettings

M = TypeVar("M", bound=BaseModel)


async def served_indexes(request: Request) -> Mapping[str, ServedIndex]:
    """The indexes this server holds (name -> loaded index)."""
    served: Mapping[str, ServedIndex] = request.app.state.served
    return served


async def serve_settings(request: Request) -> ServeSettings:
    """The server's limits and options."""
    settings: ServeSettings = request.app.state.settings
    return settings


Served = Annotated[Mapping[str, ServedIndex], Depends(served_indexes)]
Settings = Annotated[ServeSettings, Depends(serve_settings)]


def pick(served: Mapping[str, ServedIndex], name: str | None) -> ServedIndex:
    """The index ``name`` (optional when one is served): 404 unknown, 422 ambiguous.
    Called in the handler, after FastAPI checked the request's parameters, so a request
    with a bad parameter and an unknown index gets the parameter's 422 first."""
    if name is None:
        if len(served) == 1:
            return next(iter(served.values()))
        raise ApiError(422, f"several indexes are served ({', '.join(served)}): pass index=NAME")
    if name not in served:
        raise ApiError(404, f"unknown index {name!r}; served: {', '.join(served)}")
    return served[name]


def check_text(settings: ServeSettings, text: str, what: str) -> str:
    """``text``, unless it is blank or longer than ``max_query_chars`` (422)."""
    if not text.strip():
        raise ApiError(422, f"{what} is empty: send some text, e.g. 'a stroller'")
    if len(text) > settings.max_query_chars:
        raise ApiError(
            422, f"{what} is {len(text)} characters; the limit is {settings.max_query_chars}"
        )
    return text


async def check_where(settings: ServeSettings, item: ServedIndex, where: str | None) -> str | None:
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


async def in_worker(item: ServedIndex, function: Callable[..., Any], *args: Any) -> Any:
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


def parse(model: type[M], data: dict) -> M:
    """``data`` as ``model``, or a 422 naming each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ApiError(422, describe_validation(RequestValidationError(err.errors()))) from None
