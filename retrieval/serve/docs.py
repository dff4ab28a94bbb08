"""``/docs``: the API reference (Swagger UI) served from files on this machine.

FastAPI's own ``/docs`` loads Swagger UI's script and style from a CDN, so offline it is
a blank page. The ``swagger-ui-bundle-v2`` package (PyPI; the ``serve`` extra) ships
Swagger UI 5 (which renders FastAPI's OpenAPI 3.1) as static files: they are mounted at
``/docs/assets`` and the page names only them, and a local favicon, so the reference
renders with no outside request.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def swagger_files() -> Path:
    """The folder of Swagger UI's files (``swagger-ui-bundle.js``, ``swagger-ui.css``)."""
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


def install_docs(app: FastAPI) -> None:
    """Adds ``/docs`` (Swagger UI over ``app.openapi_url``) and its local assets."""
    app.mount(ASSETS, StaticFiles(directory=swagger_files()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title}: API reference",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
