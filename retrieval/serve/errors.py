"""Every 4xx the API sends is ``{"detail": "one message"}``: the handlers that make it so.

FastAPI's own validation errors are a list of dicts and a library error would be a 500;
here a malformed request becomes one sentence naming the parameter, and a
:class:`~retrieval.errors.RetrievalError` (bad ``where``, empty query) a 400 with the
library's own message.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from retrieval.errors import RetrievalError


class ApiError(Exception):
    """A request the server refuses: the HTTP status and the message sent back."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def describe_validation(err: RequestValidationError) -> str:
    """FastAPI's error list as one sentence per problem: where, what, and the value sent."""
    parts = []
    for e in err.errors():
        where = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path", "form")]
        kind = e.get("loc", ("",))[0]
        name = ".".join(where) or "body"
        label = {"query": "query parameter", "path": "path parameter"}.get(str(kind), "field")
        message = str(e.get("msg", "invalid"))
        if e.get("type") == "missing":
            parts.append(f"{label} {name!r} is required")
        elif "input" in e and e.get("type") != "json_invalid":
            parts.append(f"{label} {name!r}: {message} (got {e['input']!r})")
        else:
            parts.append(f"{label} {name!r}: {message}")
    return "; ".join(parts) or "malformed request"


def install_handlers(app: FastAPI) -> None:
    """Routes :class:`ApiError`, validation errors, library errors and unknown paths to
    ``{"detail": ...}`` JSON."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return problem(err.status, err.detail, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return problem(422, describe_validation(err))

    @app.exception_handler(RetrievalError)
    async def library(request: Request, err: RetrievalError) -> JSONResponse:
        return problem(400, str(err))

    @app.exception_handler(HTTPException)
    async def http(request: Request, err: HTTPException) -> JSONResponse:
        detail = err.detail
        if err.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.url.path} (the API is listed at /docs)"
        elif err.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path} (see /docs)"
        return problem(err.status_code, str(detail), getattr(err, "headers", None))
