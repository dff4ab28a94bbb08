"""The FastAPI application: the routers of :mod:`retrieval.serve.routes` over the served
indexes, with the token, limits and CORS around them (docs/serve.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from retrieval.serve.docs import install_docs
from retrieval.serve.errors import install_handlers
from retrieval.serve.routes import images, search, service
from retrieval.serve.security import BodyLimit, TokenGate
from retrieval.serve.served import ServedIndex
from retrieval.serve.settings import ServeSettings


def create_app(served: Mapping[str, ServedIndex], settings: ServeSettings) -> FastAPI:
    """The API over ``served`` (name -> loaded index), with the page at ``/``. The routes
    reach both through ``app.state`` (:mod:`retrieval.serve.deps`)."""

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
    app.state.served = served
    app.state.settings = settings
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
    for routes in (service, search, images):
        app.include_router(routes.router)
    if settings.static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=settings.static_dir), name="static")
    return app
