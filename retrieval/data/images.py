"""Image loading with one clear error for every way a file can be bad."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageCms, ImageOps

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


def image_source(path: str | Path) -> Path | io.BytesIO:
    """What to open for an image path: the file itself, or, for a path through a tar
    shard (``shards/000001.tar/000123.jpg``, how webdataset collections name their
    images), that member's bytes.

    Raises:
        FileNotFoundError: the path is inside a tar shard that has no such member.
    """
    path = Path(path)
    if path.exists():
        return path
    for parent in path.parents:
        if parent.suffix == ".tar" and parent.is_file():
            with tarfile.open(parent, mode="r:") as tar:
                try:
                    member = tar.extractfile(path.relative_to(parent).as_posix())
                except KeyError:
                    member = None
                if member is None:
                    raise FileNotFoundError(path)
                return io.BytesIO(member.read())
    return path


def load_image(path: str | Path, roots: Iterable[str | Path] | None = None) -> Image.Image:
    """Reads an image as the annotator saw it: EXIF orientation applied, RGB, fully decoded.

    The one way the project opens a picture by path: embedding, the gallery and the
    server all come here (a webdataset member's bytes go to :func:`decode_image`).
    Decoding everything here (not lazily in a transform) makes a truncated or corrupt
    file fail at one place, with the file named.

    Args:
        path: the file (or a member path through a tar shard, :func:`image_source`).
        roots: the folders the path must resolve inside (:func:`outside_root`, the
            dataset's ``image_roots``), checked at the moment of reading; None for none.

    Raises:
        BadImageError: the file is missing, outside ``roots``, not an image, truncated or
            corrupt.
    """
    if roots is not None and (reason := outside_root(path, roots)) is not None:
        raise BadImageError(path, reason)
    try:
        source = image_source(path)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except (OSError, tarfile.TarError) as err:
        raise BadImageError(path, f"{type(err).__name__}: {err}") from None
    return decode_image(source, path)


def decode_image(source: str | Path | IO[bytes], path: str | Path) -> Image.Image:
    """``source`` (a file, or an image's bytes) decoded as :func:`load_image` reads a
    file: fully, EXIF orientation applied, 8-bit RGB by :func:`to_rgb8` (a 16-bit PNG
    keeps its grey levels instead of turning white).

    Raises:
        BadImageError: missing, not an image, truncated or corrupt (``path`` names it).
    """
    try:
        with Image.open(source) as image:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb8(upright)
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error...
        reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        raise BadImageError(path, reason) from err


_SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB, scaling deeper samples instead of clipping them.

    PIL's own ``convert("RGB")`` clips 16- and 32-bit samples at 255 (a 16-bit PNG comes
    out all white), so the rule for the deep grey modes is explicit here:

    - ``I;16``, ``I;16B``, ``I;16L``, ``I;16N`` (16-bit): ``value >> 8``.
    - ``I`` (32-bit integers): values within 0..65535 are 16-bit samples (PIL gives some
      16-bit files as ``I``): ``value >> 8``; any other range is stretched linearly from
      the image's own minimum and maximum to 0..255.
    - ``F`` (32-bit float): values within 0..1 are the float convention:
      ``round(value * 255)``; any other range is stretched linearly from the image's
      own minimum and maximum to 0..255 (NaN -> 0).
    - ``LAB``: converted to sRGB through a colour transform (ImageCms), not by
      reinterpreting the bands.
    - ``La`` / ``RGBa`` (premultiplied alpha): un-premultiplied first.
    - every other mode (``1``, ``L``, ``P``, ``PA``, ``LA``, ``RGBA``, ``CMYK``,
      ``YCbCr``, ``HSV``...): PIL's conversion; alpha is dropped, not composited, and a
      palette with transparency goes through RGBA.

    Raises:
        ValueError: a mode PIL cannot convert to RGB.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        grey = _grey8(np.asarray(image), mode)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "LAB":
        transform = ImageCms.buildTransform(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        converted = ImageCms.applyTransform(image, transform)
        assert converted is not None  # None only with inPlace=True
        return converted
    if mode == "La":
        return image.convert("LA").convert("RGB")
    if mode == "RGBa" or (mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")
    return image.convert("RGB")


def _grey8(values: np.ndarray, mode: str) -> np.ndarray:
    """A deep grey image's samples as uint8, by :func:`to_rgb8`'s rule for ``mode``."""
    if mode in _SIXTEEN_BIT:
        return (values.astype(np.uint16) >> 8).astype(np.uint8)
    data = values.astype(np.float64)
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if mode == "I" and lo >= 0 and hi <= 65535:
        return (values.astype(np.int64) >> 8).astype(np.uint8)
    if mode == "F" and lo >= 0 and hi <= 1:
        scaled = data * 255
    elif hi > lo:
        scaled = (data - lo) * (255 / (hi - lo))
    else:  # a constant image: its value where it fits in 0..255
        scaled = data
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


OUTSIDE_ROOT = "outside the image root"
"""The start of the reason given for a path that resolves outside its dataset's roots."""


def outside_root(path: str | Path, roots: Iterable[str | Path]) -> str | None:
    """Why ``path`` may not be read, or None when it resolves inside one of ``roots``.

    Both sides are resolved (``..`` and symlinks, :meth:`Path.resolve`), so neither an
    absolute ``file_name``, nor ``../``, nor a symlink pointing out of the root escapes.
    """
    real = Path(path).resolve()
    resolved = [Path(root).resolve() for root in roots]
    if any(real.is_relative_to(root) for root in resolved):
        return None
    where = " or ".join(str(root) for root in resolved)
    return f"{OUTSIDE_ROOT} {where} (resolves to {real})"


def outside_root_error(
    failures: Sequence[Mapping[str, Any]], listed_in: str | Path
) -> DataError | None:
    """The error for listed paths that leave the image root(s), or None when none does.

    Args:
        failures: records from :func:`find_missing_images`.
        listed_in: the annotation or list file naming the paths.
    """
    outside = [f for f in failures if str(f["reason"]).startswith(OUTSIDE_ROOT)]
    if not outside:
        return None
    shown = [f"  {f['path']}: {f['reason']}" for f in outside[:MISSING_LISTED]]
    more = len(outside) - len(shown)
    return DataError(
        "\n".join(
            [
                f"{len(outside)} image paths listed in {listed_in} lead outside the image "
                "root (absolute paths, '..' or symlinks):",
                *shown,
                *([f"  ... and {more} more"] if more else []),
                "Make the entries relative paths inside data.images, or set "
                "data.on_bad_image=skip to leave them out and list them in the run folder.",
            ]
        )
    )


MISSING_LISTED = 5
"""How many missing paths an error message lists before "... and N more"."""


def find_missing_images(
    paths: Mapping[int, Path], roots: Iterable[str | Path] | None = None
) -> list[dict[str, Any]]:
    """One ``dict(image_id, path, reason)`` per image whose file is absent or, when
    ``roots`` are given, resolves outside all of them (:func:`outside_root`), in the
    given order.

    Only ``os.path`` checks, no decoding: cheap enough to run over a whole split at
    construction, so a long run does not die at image 4,000.
    """
    root_list = None if roots is None else [Path(root).resolve() for root in roots]
    failures = []
    for image_id, path in paths.items():
        reason = None if root_list is None else outside_root(path, root_list)
        if reason is None and not os.path.isfile(path):
            reason = "file not found"
        if reason is not None:
            failures.append({"image_id": int(image_id), "path": str(path), "reason": reason})
    return failures


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
