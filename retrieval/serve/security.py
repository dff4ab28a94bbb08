"""The server's defences: loopback unless a token is set, the bearer token, and
uploads checked for size, type and pixel count before they are decoded."""

from __future__ import annotations

import io
import secrets
import warnings
from urllib.parse import parse_qs

from PIL import Image, UnidentifiedImageError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from retrieval.data.images import BadImageError, decode_image
from retrieval.errors import ConfigError
from retrieval.serve.errors import ApiError, problem

TOKEN_ENV = "RETRIEVAL_API_TOKEN"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
FORM_SLACK = 64 * 1024  # the form fields and multipart framing around an upload
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


MIN_TOKEN_LENGTH = 16
"""The shortest token accepted for a bind beyond loopback: a guessable one is no gate."""


def check_bind(host: str, token: str | None) -> None:
    """Refuses to listen beyond this machine without a real secret (at least
    :data:`MIN_TOKEN_LENGTH` characters, no whitespace): anyone who can reach the port
    could read every indexed image."""
    if host in LOOPBACK:
        return
    make = "python -c 'import secrets; print(secrets.token_urlsafe(24))'"
    if not token:
        raise ConfigError(
            f"--host {host} would let other machines search this index and read its images "
            f"without any authentication: set {TOKEN_ENV}=SOME_LONG_SECRET (clients then send "
            f"'Authorization: Bearer SOME_LONG_SECRET'; make one with {make}), or serve on "
            f"--host 127.0.0.1"
        )
    spaced = any(c.isspace() for c in token)
    if len(token) < MIN_TOKEN_LENGTH or spaced:
        raise ConfigError(
            f"{TOKEN_ENV} is {len(token)} characters{' holding whitespace' if spaced else ''}: "
            f"for --host {host} it must be a real secret of at least {MIN_TOKEN_LENGTH} "
            f"characters without whitespace; make one with {make}"
        )


def too_large(max_bytes: int) -> str:
    return f"upload is larger than {max_bytes / 2**20:g} MB (--max-upload-mb)"


class TokenGate:
    """ASGI middleware: every ``/api/*`` request needs ``Authorization: Bearer TOKEN``;
    ``/api/images/*`` also takes ``?token=TOKEN`` (an ``<img>`` tag sends no header).
    ``/``, ``/static``, ``/healthz`` and ``/docs`` stay open."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == "/api" or path.startswith("/api/")):
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "OPTIONS" or self.allowed(scope):
            await self.app(scope, receive, send)
            return
        response = problem(
            401,
            "missing or wrong API token: send the header 'Authorization: Bearer TOKEN' "
            f"(the server's {TOKEN_ENV}); image URLs may add ?token=TOKEN instead",
            {"WWW-Authenticate": "Bearer"},
        )
        await response(scope, receive, send)

    def allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer" and self.matches(given.strip()):
                    return True
        if scope["path"].startswith("/api/images/"):
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            return any(self.matches(given) for given in query.get("token", []))
        return False

    def matches(self, given: str) -> bool:
        return secrets.compare_digest(given.encode(), self.token.encode())


class BodyLimit:
    """ASGI middleware: refuses a request body over ``upload_bytes`` (plus room for the
    form fields) with a 413, by its ``Content-Length`` before reading it, or once a
    streamed (chunked) body passes it, so an oversize upload is never spooled to disk."""

    def __init__(self, app: ASGIApp, upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = upload_bytes + FORM_SLACK
        self.detail = too_large(upload_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await problem(413, self.detail)(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, self.detail)
            return message

        await self.app(scope, counted, send)


def read_upload(data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """An uploaded picture as RGB, upright (EXIF), after the checks: at most ``max_bytes``,
    a known image format, at most ``max_pixels`` by its header (so a small file that
    decodes to gigabytes is refused before it is decoded).

    Raises:
        ApiError: 413 too large (bytes or pixels), 400 not an image or damaged.
    """
    if len(data) > max_bytes:
        raise ApiError(413, too_large(max_bytes))
    if not data:
        raise ApiError(400, "the uploaded image file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise ApiError(
                    400,
                    f"upload is {image.format}, not one of {', '.join(sorted(IMAGE_FORMATS))}",
                )
            width, height = image.size
            if width * height > max_pixels:
                raise ApiError(
                    413,
                    f"uploaded image is {width} x {height} = {width * height:,} pixels; the "
                    f"limit is {max_pixels:,}: send a smaller picture",
                )
            return decode_image(io.BytesIO(data), "the upload")  # as every picture is read
    except BadImageError as err:
        if isinstance(
            err.__cause__, (Image.DecompressionBombError, Image.DecompressionBombWarning)
        ):
            raise ApiError(
                413, f"uploaded image decodes to more than {max_pixels:,} pixels"
            ) from None
        raise ApiError(400, f"uploaded image cannot be decoded: {err.reason}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(413, f"uploaded image decodes to more than {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise ApiError(400, "upload is not an image (JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ApiError(400, f"uploaded image cannot be decoded: {err}") from None
