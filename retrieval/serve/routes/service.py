"""The service's own routes: health, the served indexes, counters and the search page."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from retrieval.serve.deps import Served, Settings
from retrieval.serve.errors import ApiError
from retrieval.serve.schemas import IndexesOut

router = APIRouter()


@router.get("/healthz", tags=["service"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/api/indexes", response_model=IndexesOut, tags=["service"])
async def indexes(served: Served) -> dict[str, Any]:
    """The served indexes: backend, retriever, size, recall, filterable columns."""
    for item in served.values():
        await item.current()
    return {"indexes": [item.info() for item in served.values()]}


@router.get("/api/stats", tags=["service"])
async def stats(served: Served) -> dict[str, Any]:
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


@router.get("/", include_in_schema=False)
async def home(settings: Settings) -> FileResponse:
    page = settings.static_dir / "index.html"
    if not page.is_file():
        raise ApiError(404, f"the search page is not installed ({page} is missing)")
    return FileResponse(page)
