"""Image loading with one clear error for every way a file can be bad."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageOps

BAD_IMAGE_FIX = (
    "fix or remove the file, or set data.on_bad_image=skip to leave it out "
    "and list it in the run folder"
)


class BadImageError(ValueError):
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
