"""Text search over a real run folder, and the gallery that explains its hits."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from retrieval.aggregate import grid_cell_boxes, representatives_from_labels
from retrieval.index import Hit, build_index, open_index
from retrieval.report.drawing import GalleryItem, cell_maps, panels
from retrieval.report.gallery import explain, write_gallery
from retrieval.representatives import Representatives


@pytest.fixture(scope="module")
def dense_index(dense_run: Path):
    return open_index(build_index(dense_run, "exact", device="cpu", progress=False), "cpu")


def test_text_search_returns_what_eval_scored(dense_run: Path, dense_index) -> None:
    """Searching a category's query text through the index (retriever rebuilt from the
    run's config.yaml, same seed and prompts) ranks and scores every image exactly as
    the evaluation did (scores.npz, ties by ascending image id)."""
    saved = np.load(dense_run / "scores.npz")
    key = json.loads(torch.load(dense_run / "text_embeddings.pt", weights_only=True)["key"])
    for q, text in enumerate(key["queries"][:3]):
        hits = dense_index.search(text, top=len(saved["image_ids"]))
        order = np.lexsort((saved["image_ids"], -saved["scores"][q]))
        assert [h.image_id for h in hits] == saved["image_ids"][order].tolist()
        np.testing.assert_allclose([h.score for h in hits], saved["scores"][q][order], atol=1e-5)


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def test_gallery_html_and_sheet_render(dense_index, tmp_path: Path) -> None:
    """The HTML is a complete page with one decodable embedded picture per hit (match +
    heatmap panels, so twice as wide as tall for square images); the PNG sheet opens."""
    import base64
    import io

    hits = dense_index.search("square", top=5)
    written = write_gallery(dense_index, "square", hits, tmp_path / "g.html", tmp_path / "g.png")
    page = written["html"].read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    parser = _Images()
    parser.feed(page)
    assert len(parser.sources) == len(hits) == 5
    for src in parser.sources:
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.width > image.height  # heatmap panel beside the matched image
    sheet = Image.open(written["sheet"])
    assert sheet.format == "PNG"
    assert sheet.width >= 2 * 240
    assert sheet.height > 240


def test_dense_cells_give_a_heatmap() -> None:
    """Dense-CLIP representatives on a 3 x 3 grid (plus a whole-image one) give the
    query's cosine per cell in raster order, and no cluster mask."""
    emb = F.normalize(torch.randn(1, 10, 8), dim=-1)
    boxes = torch.cat([grid_cell_boxes((3, 3)), torch.tensor([[0.0, 0, 1, 1]])]).unsqueeze(0)
    query = F.normalize(torch.randn(8), dim=0)
    members, heat = cell_maps(query, Representatives.dense(emb, boxes), 4)
    assert members is None
    np.testing.assert_allclose(heat, (emb[0, :9] @ query).reshape(3, 3).numpy(), atol=1e-6)


def test_cluster_members_give_mask_and_heatmap() -> None:
    """Cluster-CLIP representatives with stored members: the matched one's cells form the
    mask, and every cell's heat is its cluster's cosine."""
    cells = F.normalize(torch.randn(1, 16, 8), dim=-1)
    labels = torch.tensor([[0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]])
    reps = representatives_from_labels(cells, labels, grid_cell_boxes((4, 4)))
    query = F.normalize(torch.randn(8), dim=0)
    members, heat = cell_maps(query, reps, 1)
    assert members.tolist() == (labels[0] == 1).reshape(4, 4).tolist()
    sims = reps.embeddings[0] @ query
    np.testing.assert_allclose(heat, sims[labels[0]].reshape(4, 4).numpy(), atol=1e-6)


def test_global_embedding_has_no_cells() -> None:
    """One whole-image embedding (CLIP): nothing to map, the panel is the image alone."""
    reps = Representatives.dense(
        F.normalize(torch.randn(1, 1, 8), dim=-1), torch.tensor([[[0.0, 0, 1, 1]]])
    )
    assert cell_maps(F.normalize(torch.randn(8), dim=0), reps, 0) == (None, None)


def test_missing_image_file_draws_a_placeholder(tmp_path: Path) -> None:
    """A hit whose file is gone still renders (a grey tile saying so), never a crash."""
    item = GalleryItem(1, Hit(5, 0.3, 0, (0.1, 0.1, 0.5, 0.5)), tmp_path / "gone.jpg")
    tile = panels(item)
    assert tile.size[0] > 0
    assert tile.getpixel((1, 1)) == (90, 90, 90)


def test_explain_reads_the_run(dense_index) -> None:
    """Gallery items carry the dataset's file path and the run's cell heatmap."""
    hits = dense_index.search("circle", top=2)
    items = explain(dense_index, dense_index.embed(["circle"])[0], hits)
    assert all(i.path is not None and i.path.exists() for i in items)
    assert all(i.heatmap is not None and i.heatmap.shape == (4, 4) for i in items)


def test_cli_builds_and_searches(dense_run: Path, tmp_path: Path, capsys) -> None:
    """`index build` then `search ... --sheet` through the subcommands the lead CLI
    registers: prints the recall the index was built with, the hits and the sheet path,
    and writes the hits as JSON (the API's answer, with each image's file);
    an approximate index searched for more than the K its recall was measured at says
    so; a recall target given as a percentage is refused."""

    from retrieval.cli import build_parser

    parser = build_parser()

    def run(*argv: str) -> str:
        args = parser.parse_args(list(argv))
        assert args.func(args) == 0
        return capsys.readouterr().out

    out = tmp_path / "ix"
    built = run(
        "index",
        "build",
        str(dense_run),
        "--backend",
        "faiss-flat",
        "--out",
        str(out),
        "--no-progress",
    )
    assert "recall@" in built
    assert "bytes/image" in built
    assert json.loads(run("index", "info", str(out), "--json"))["backend"] == "faiss-flat"
    found = run(
        "search",
        str(out),
        "circle",
        "--top",
        "3",
        "--sheet",
        str(tmp_path / "s.png"),
        "--json",
        str(tmp_path / "hits.json"),
    )
    assert "recall@" in found
    assert "top 3" in found
    assert Image.open(tmp_path / "s.png").width > 0
    record = json.loads((tmp_path / "hits.json").read_text())
    index = open_index(out, "cpu")
    expected = index.search("circle", top=3)
    assert [h["image_id"] for h in record["hits"]] == [h.image_id for h in expected]
    assert all(Path(h["path"]).is_file() for h in record["hits"])
    assert record["recall"] == index.recall
    assert record["hits"][0]["rank"] == 1
    ivfpq = tmp_path / "ivfpq"
    run(
        "index",
        "build",
        str(dense_run),
        "--backend",
        "faiss-ivfpq",
        "--out",
        str(ivfpq),
        "--recall-k",
        "3",
        "--no-progress",
    )
    assert "recall was measured for the top 3" in run("search", str(ivfpq), "circle", "--top", "5")
    with pytest.raises(ValueError, match="the target is a fraction in"):
        run("index", "build", str(dense_run), "--recall-target", "95", "--out", str(ivfpq))


def test_heat_overlay_is_translucent_smooth_and_scaled(tmp_path: Path) -> None:
    """The heat panel keeps the photo readable (its stripes survive under the colour:
    column-to-column changes correlate with the photo's), is interpolated (a hard step
    between cells becomes a ramp: no jump between neighbouring pixels like a mosaic's),
    and carries a colour bar of the map's colours, low to high, under the picture."""
    import matplotlib

    from retrieval.report.drawing import BAR_H, HEAT_MAP, heat_panel
    from retrieval.report.gallery import legend

    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::4] = stripes[:, 1::4] = 255  # 2-pixel white stripes every 4
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    step = np.array([[0.1, 0.4], [0.1, 0.4]])  # a hard step between the two cell columns
    item = GalleryItem(1, Hit(1, 0.4, 0, None), tmp_path / "stripes.png", heatmap=step)
    panel = np.asarray(heat_panel(item, side=64), dtype=float)
    assert panel.shape == (64 + BAR_H, 64, 3)
    picture = panel[:64]
    grey = picture.mean(axis=2)
    photo_grey = stripes.mean(axis=2).astype(float)
    readable = np.corrcoef(np.diff(grey, axis=1).ravel(), np.diff(photo_grey, axis=1).ravel())
    assert readable[0, 1] > 0.9
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "grey.png")
    flat = GalleryItem(1, Hit(1, 0.4, 0, None), tmp_path / "grey.png", heatmap=step)
    layer = np.asarray(heat_panel(flat, side=64), dtype=float)[:64]
    assert np.abs(np.diff(layer, axis=1)).max() < 30  # a ramp, not a mosaic's jump
    assert np.abs(layer[:, -1] - layer[:, 0]).max() > 60  # yet low and high differ
    bar = panel[64:, :, :][-1]  # the bar's bottom row, below its labels
    colours = matplotlib.colormaps[HEAT_MAP](np.linspace(0, 1, 64))[:, :3] * 255
    middle = slice(20, 44)
    np.testing.assert_allclose(bar[middle], colours[middle], atol=3)
    text = legend([item])
    assert "cosine similarity with each cell" in text
    assert "Cyan" not in text
    assert "Cyan" in legend([GalleryItem(1, item.hit, None, members=np.ones((2, 2), bool))])


def test_heatmaps_without_stored_cells_come_from_one_backbone_pass(
    dense_run: Path, tmp_path: Path
) -> None:
    """A run that stored no cells (one pooled vector per image, as Cluster-CLIP stores
    cluster means) still gets a heatmap per hit: the query's cosine with the cells of
    the retriever's own encode_dense of the picture (open_clip's forward pass)."""
    from serve_server import write_vector_run

    from retrieval.data.images import load_image
    from retrieval.store import ShardStore

    images = Path(
        ShardStore(dense_run / "embeddings").read_manifest()["fingerprint"]["data"]["images"]
    )
    run = write_vector_run(dense_run, tmp_path / "run", np.arange(1, 25), 5, images, grid=1)
    index = open_index(build_index(run, "exact", tmp_path / "ix", "cpu", progress=False), "cpu")
    query = index.embed(["a red square"])[0]
    hits = index.search_vectors(query[None], 3)[0]
    items = explain(index, query, hits)
    retriever = index.retriever()
    for item in items:
        assert item.path is not None
        assert item.heatmap is not None
        with torch.no_grad():
            out = retriever.encode_dense(retriever.image_transform(load_image(item.path))[None])
        cells = out.embeddings[0].reshape(*out.grid, -1)
        np.testing.assert_allclose(item.heatmap, (cells @ query).numpy(), atol=1e-5)
