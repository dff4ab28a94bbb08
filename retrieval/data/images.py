"""Image loading with one clear error for every way a file can be bad."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from retrieval.errors import DataError

BAD_IMAGE_FIX = (
    "fix or remove the file, or set data.on_bad_image=skip to leave it out "
    "and list it in the run folder"
)


class BadImageError(DataError):
    """An image file that cannot be read: missing, not an image, truncated or corrupt.

    Attributes:
        path: the file.
        reason: what went wrong, in a few words (no path, no fix): the text a run
            folder lists for a skipped image.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}. To go on: {BAD_IMAGE_FIX}.")

    def __reduce__(self) -> tuple[type, tuple[Path, str]]:
        # DataLoader workers pickle exceptions; the default would pass only the message.
        return type(self), (self.path, self.reason)


def load_image(path: str | Path) -> Image.Image:
    """Reads an image as the annotator saw it: EXIF orientation applied, RGB, fully decoded.

    Decoding everything here (not lazily in a transform) makes a truncated or corrupt
    file fail at one place, with the file named.

    Raises:
        BadImageError: the file is missing, not an image, truncated or corrupt.
    """
    try:
        with Image.open(path) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return upright.convert("RGB")
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise BadImageError(path, reason) from err


MISSING_LISTED = 5
"""How many missing paths an error message lists before "... and N more"."""


def find_missing_images(paths: Mapping[int, Path]) -> list[dict[str, Any]]:
    """One ``dict(image_id, path, reason)`` per image whose file is absent, in the given order.

    Only ``os.path`` checks, no decoding: cheap enough to run over a whole split at
    construction, so a long run does not die at image 4,000.
    """
    return [
        {"image_id": int(image_id), "path": str(path), "reason": "file not found"}
        for image_id, path in paths.items()
        if not os.path.isfile(path)
    ]


def missing_images_error(
    failures: Sequence[Mapping[str, Any]], total: int, listed_in: str | Path, hint: str
) -> FileNotFoundError:
    """The error for files missing at construction: how many, the first few paths, the fix.

    Args:
        failures: records from :func:`find_missing_images`.
        total: images listed, to say "k of N".
        listed_in: the annotation file or folder that lists them.
        hint: what to check first (the config key telling where images live).
    """
    shown = [f"  {f['path']}" for f in failures[:MISSING_LISTED]]
    more = len(failures) - len(shown)
    return FileNotFoundError(
        "\n".join(
            [
                f"{len(failures)} of {total} images listed in {listed_in} are missing:",
                *shown,
                *([f"  ... and {more} more"] if more else []),
                f"{hint}, or: {BAD_IMAGE_FIX}.",
            ]
        )
    )
