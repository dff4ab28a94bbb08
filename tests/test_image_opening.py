"""One image-loading function everywhere, and the image-root check wherever a picture is
opened (issue 24 items 6 and 7): a 16-bit PNG decodes to the same 8-bit grey (``>> 8``,
not PIL's clip to white) from a folder, a webdataset tar shard and the gallery; a file
swapped for a symlink out of the image root after indexing is refused by the gallery
(a placeholder tile saying why) as by the embed phase."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.data.images import BadImageError, load_image
from retrieval.data.webdataset import WebDataset
from retrieval.index.base import Hit
from retrieval.report.drawing import GalleryItem, match_panel


def sixteen_bit_png(path: Path) -> np.ndarray:
    """A 16-bit grey PNG of a gradient (every sample above 255); returns the samples."""
    values = (np.arange(40 * 30, dtype=np.uint32).reshape(30, 40) * 50 + 300).astype(np.uint16)
    Image.frombytes("I;16", (40, 30), values.astype("<u2").tobytes()).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    return values


def test_a_16_bit_png_is_grey_from_a_folder_and_from_a_tar_shard(tmp_path: Path) -> None:
    """The folder's load_image and the webdataset's decoder give the same pixels, each
    the 16-bit value >> 8 (PIL's convert('RGB') would give 255 everywhere)."""
    values = sixteen_bit_png(tmp_path / "deep.png")
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)
    from_file = np.asarray(load_image(tmp_path / "deep.png"))
    np.testing.assert_array_equal(from_file, expected)
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000000.tar", "w") as tar:
        data = (tmp_path / "deep.png").read_bytes()
        info = tarfile.TarInfo("sample0.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    dataset = WebDataset(str(shards / "000000.tar"), run_dir=tmp_path / "run", progress=False)
    (item,) = list(dataset)
    pixels = item["pixels"].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(pixels, expected)
    assert pixels.max() < 255


def test_the_gallery_draws_a_16_bit_png_grey(tmp_path: Path) -> None:
    """The gallery's picture is load_image's, resized: not white."""
    values = sixteen_bit_png(tmp_path / "deep.png")
    hit = Hit(1, 0.5, -1, None)
    panel = np.asarray(match_panel(GalleryItem(1, hit, tmp_path / "deep.png"), side=40))
    assert panel.shape == (30, 40, 3)
    np.testing.assert_allclose(panel[..., 0], values >> 8, atol=2)  # LANCZOS at scale 1


def test_a_symlink_out_of_the_root_is_refused_when_shown(tmp_path: Path) -> None:
    """A file replaced by a symlink leading out of the image root: load_image with the
    dataset's roots refuses it (the embed phase's check), and the gallery draws the
    grey placeholder instead of the outside picture."""
    root, outside = tmp_path / "images", tmp_path / "secret.png"
    root.mkdir()
    Image.new("RGB", (40, 30), (250, 10, 10)).save(outside)
    Image.new("RGB", (40, 30), (10, 250, 10)).save(root / "a.png")
    assert load_image(root / "a.png", roots=[root]).getpixel((5, 5)) == (10, 250, 10)
    (root / "a.png").unlink()
    (root / "a.png").symlink_to(outside)
    with pytest.raises(BadImageError, match="outside the image root"):
        load_image(root / "a.png", roots=[root])
    item = GalleryItem(1, Hit(1, 0.5, -1, None), root / "a.png", roots=(root,))
    panel = np.asarray(match_panel(item, side=40))
    red = (panel[..., 0] > 200) & (panel[..., 1] < 60)
    assert not red.any()  # the outside picture is not drawn
    assert (np.abs(panel.astype(int) - 90) < 40).mean() > 0.5  # the grey placeholder
