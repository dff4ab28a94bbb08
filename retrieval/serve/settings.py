"""What a server is started with: limits, the token, CORS and batching (CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServeSettings:
    """Options of ``retrieval serve``.

    Attributes:
        token: every ``/api/*`` request must carry ``Authorization: Bearer TOKEN``
            (None: no authentication, loopback only).
        cors_origin: the one browser origin allowed to call the API from another site
            (None: CORS off).
        max_upload_bytes: largest image upload (413 past it).
        max_pixels: largest uploaded image in pixels, checked from its header before it
            is decoded (decompression bombs).
        max_query_chars: longest query text (and ``where`` is 4x this).
        max_texts: most texts in one compound query (positive + negative).
        max_batch: most queries one model call and one search call take.
        batch_wait_ms: how long the first query of a batch waits for others.
        static_dir: the search page's folder (``/`` and ``/static``).
    """

    token: str | None = None
    cors_origin: str | None = None
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_query_chars: int = 500
    max_texts: int = 16
    max_batch: int = 64
    batch_wait_ms: float = 2.0
    static_dir: Path = STATIC_DIR

    @property
    def max_where_chars(self) -> int:
        return 4 * self.max_query_chars
