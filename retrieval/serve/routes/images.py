"""Pictures by image id: the file (resized, a representative's box drawn) and the
query's heatmap over the image's cells (:mod:`retrieval.serve.images` draws them)."""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Response
from starlette.concurrency import run_in_threadpool

from retrieval.serve.deps import Served, Settings, check_text, in_worker, pick
from retrieval.serve.queries import Answer, Job, first
from retrieval.serve.schemas import ERRORS, INT64_MAX, INT64_MIN

IMAGE_SIZE = Query(None, ge=16, le=2048, description="fit into size x size pixels")
IMAGE_ID = Path(ge=INT64_MIN, le=INT64_MAX, description="an id of the index's images")
PRIVATE = {"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"}

router = APIRouter(tags=["images"])


@router.get(
    "/api/images/{index}/{image_id}",
    responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
)
async def image(
    served: Served,
    index: str,
    image_id: int = IMAGE_ID,
    size: int | None = IMAGE_SIZE,
    rep: int | None = Query(None, ge=0, description="draw this representative's box"),
) -> Response:
    """The image (JPEG), by id only, resized and with a representative's box if asked."""
    item = pick(served, index)
    await item.current()
    data = await run_in_threadpool(item.images.photo, image_id, size, rep)
    return Response(data, media_type="image/jpeg", headers=PRIVATE)


@router.get(
    "/api/images/{index}/{image_id}/heatmap",
    responses={200: {"content": {"image/png": {}}}, **ERRORS},
)
async def heatmap(
    served: Served,
    settings: Settings,
    index: str,
    image_id: int = IMAGE_ID,
    q: str = Query(description="the query whose cosine per cell is drawn"),
    size: int | None = IMAGE_SIZE,
) -> Response:
    """PNG of the query's cosine with each of the image's cells, a translucent colour
    layer over the photo (blue low, red high, scaled to this image's range, stated by
    the bar along its bottom edge), on any Dense-/Cluster-CLIP index."""
    item = pick(served, index)
    await item.current()
    item.images.path(image_id)  # an unknown id fails before the model runs
    result: Answer = await item.batcher.submit(Job([check_text(settings, q, "q")], first))
    data = await in_worker(item, item.images.heatmap, image_id, result.vector, size)
    return Response(data, media_type="image/png", headers=PRIVATE)
