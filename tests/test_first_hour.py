"""A new user's first hour, scripted (issue 28): the README's "search your own photos"
commands, run as written, in order, on a generated folder of pictures that has what a
real one has (nested folders, odd names, a hidden file, a non-image, one truncated JPEG
and a metadata CSV), with a tiny random-weight model in place of RN50x64. Between the
two embeds, photos are added and deleted, as the README says.

Checked along the way: the corrupt file is skipped and listed in ``skipped.csv``; every
hit names an existing file of the folder; the compound query and the filter (metadata
column and ``LIKE`` on the path) hold; the export carries the metadata columns; ``index
info`` says the index is behind its run and ``index update RUN`` catches up (the deleted
photo is never returned again); ``serve`` answers the API with the CLI's hits; the page
in Chromium shows them. With ``FIRST_HOUR_LOG=FILE`` the commands and their output are
written there (the README's transcript comes from it).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from serve_server import free_port
from test_serve_page import (
    after,
    browser,  # noqa: F401 - the page tests' Chromium, as a fixture
    by_id,
    card_ids,
    cards,
    drag,
    drawn_box,
    open_page,
    pictures_loaded,
    search,
    sources,
    status,
    wait,
)

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TINY = [
    "retriever.backbone=RN-tiny",
    "retriever.pretrained=null",
    "retriever.resolution=128",
    "loader.num_workers=0",
    "logger.wandb.mode=disabled",
]
SHAPES = {"circle": "ellipse", "square": "rectangle"}
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}
# relative path -> (colour, shape, camera): nested folders and odd names
PHOTOS = {
    "trips/2023/IMG 0001 (copy).JPG": ("red", "circle", "front"),
    "trips/2023/beach-day_02.jpeg": ("blue", "square", "front"),
    "trips/2024/café ü.png": ("red", "square", "back"),
    "Family Pics/#weird[1].jpg": ("green", "circle", "front"),
    "Family Pics/deep/er/photo.webp": ("red", "circle", "back"),
    "top level.jpg": ("blue", "circle", "front"),
    "trips/2023/ring.jpg": ("red", "ring", "front"),
}
ADDED = {"trips/2024/new one.jpg": ("red", "circle", "front")}
DELETED = "top level.jpg"


def draw(path: Path, colour: str, shape: str, seed: int) -> None:
    """A photo-like picture: a textured background and one coloured shape."""
    image = Image.effect_noise((160, 120), 40 + seed).convert("RGB")
    pen = ImageDraw.Draw(image)
    box = (30 + seed % 20, 20, 110 + seed % 20, 100)
    if shape == "ring":
        pen.ellipse(box, outline=COLOURS[colour], width=8)
    else:
        getattr(pen, SHAPES[shape])(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def make_folder(home: Path) -> Path:
    photos = home / "photos"
    for seed, (name, (colour, shape, _)) in enumerate(PHOTOS.items()):
        draw(photos / name, colour, shape, seed)
    (photos / ".hidden.jpg").write_bytes((photos / "top level.jpg").read_bytes())
    (photos / "notes.txt").write_text("not a picture")
    good = (photos / "trips/2023/ring.jpg").read_bytes()
    (photos / "trips/broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    write_metadata(photos, PHOTOS)
    return photos


def write_metadata(photos: Path, rows: dict[str, tuple[str, str, str]]) -> None:
    with open(photos / "meta.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["path", "camera", "subject"])
        for name, (colour, shape, camera) in rows.items():
            out.writerow([name, camera, f"{colour} {shape}"])


def readme_commands() -> tuple[list[str], list[str]]:
    """The README block after the first-hour marker: the commands before and after the
    "photos added and deleted" comment."""
    text = README.read_text()
    block = text.split("<!-- first-hour:", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    before, after = block.split("# later: photos added and deleted\n")
    return [c for c in before.splitlines() if c.strip()], [c for c in after.splitlines() if c]


class Session:
    """Runs README lines as a user's shell would, in ``home`` (also $HOME, for ``~``)."""

    def __init__(self, home: Path) -> None:
        self.home = home
        bin_dir = Path(sys.executable).parent
        self.env = {
            **os.environ,
            "HOME": str(home),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "COLUMNS": "300",
            "HF_HUB_OFFLINE": "1",
            "WANDB_MODE": "disabled",
        }
        self.log: list[str] = []

    def argv(self, line: str) -> list[str]:
        words = shlex.split(line.split("  #")[0].replace("~", str(self.home)))
        assert words[0] == "retrieval"
        if words[1] == "embed":
            words += TINY
        return [sys.executable, "-m", "retrieval.cli", *words[1:]]

    def run(self, line: str) -> str:
        done = subprocess.run(
            self.argv(line),
            cwd=self.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = done.stdout + done.stderr
        self.log.append(f"$ {line}\n{output}")
        assert done.returncode == 0, f"{line}\n{output}"
        return output


def paths_of(hits: list[dict]) -> list[str]:
    return [h["path"] for h in hits]


@pytest.mark.slow
def test_first_hour(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    home = tmp_path / "home"
    photos = make_folder(home)
    before, after = readme_commands()
    user = Session(home)
    outputs = [user.run(line) for line in before]

    embed_out = outputs[0]
    skipped = home / "runs/photos/skipped.csv"
    assert skipped.exists()
    assert "broken.jpg" in skipped.read_text()
    assert "skipped.csv" in embed_out
    assert "LitLogger" not in embed_out
    assert "GPU available" not in embed_out
    run_images = pq.read_table(home / "runs/photos/images.parquet").to_pydict()
    listed = set(run_images["path"])
    assert listed == {*PHOTOS, "trips/broken.jpg"}  # hidden file and non-images not listed

    # plain search: a table naming files of the folder
    assert "file" in outputs[2]
    assert any(name in outputs[2] for name in ("IMG 0001", "café"))
    # compound search: the one hit shape, every file real
    hits = json.loads((home / "hits.json").read_text())["hits"]
    assert hits
    assert all(Path(h["path"]).is_file() for h in hits)
    assert "broken.jpg" not in {h["file_name"] for h in hits}  # skipped: never indexed
    assert all(h["file_name"] == Path(h["path"]).name for h in hits)
    # the filter: camera = 'front' AND path LIKE 'trips/%'
    shown = {name for name in PHOTOS if str(photos / name) in outputs[4]}
    assert shown == {p for p, (_, _, cam) in PHOTOS.items() if cam == "front" and "trips/" in p}
    # export: the metadata columns ride along
    exported = pq.read_table(home / "photos.parquet").to_pandas()
    assert {"camera", "subject", "file_name", "path"} <= set(exported.columns)
    assert set(exported.camera) == {"front", "back"}

    # photos added and deleted
    for name, (colour, shape, _) in ADDED.items():
        draw(photos / name, colour, shape, seed=99)
    (photos / DELETED).unlink()
    write_metadata(photos, {**{k: v for k, v in PHOTOS.items() if k != DELETED}, **ADDED})
    embed_again = user.run(after[0])
    assert "1 images embedded now" in " ".join(embed_again.split())
    info = " ".join(user.run(after[1]).split())
    assert "1 images added and 1 removed" in info
    assert "retrieval index update" in info
    user.run(after[2])
    assert "up to date with its run" in user.run(after[1])

    # serve: the API answers with the CLI's hits; the page shows them
    serve = user.argv(after[3])
    port = free_port()
    server = subprocess.Popen(
        [*serve, "--port", str(port)],
        cwd=home,
        env=user.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(url, server)
        answer = httpx.get(f"{url}/api/search", params={"q": "a red circle", "top": 50}).json()
        api_paths = paths_of(answer["hits"])
        assert str(photos / DELETED) not in api_paths
        assert str(photos / next(iter(ADDED))) in api_paths
        out = home / "api_vs_cli.json"
        user.run(f'retrieval search runs/photos/index/exact "a red circle" --top 50 --json {out}')
        cli_hits = json.loads(out.read_text())["hits"]
        assert [h["image_id"] for h in cli_hits] == [h["image_id"] for h in answer["hits"]]
        for api_hit, cli_hit in zip(answer["hits"], cli_hits, strict=True):
            assert api_hit["score"] == pytest.approx(cli_hit["score"], abs=1e-5)
            assert api_hit["box"] == pytest.approx(cli_hit["box"], abs=1e-6)
            same = ("rank", "image_id", "rep_index", "path", "file_name")
            assert [api_hit[k] for k in same] == [cli_hit[k] for k in same]
        page_shows(request, url, [h["image_id"] for h in answer["hits"]])
    finally:
        server.terminate()
        server.wait(timeout=30)
        user.log.append(f"$ {after[3]}\n{server.stdout.read() if server.stdout else ''}")
        if os.environ.get("FIRST_HOUR_LOG"):
            text = "\n".join(user.log).replace(str(home), "~")
            Path(os.environ["FIRST_HOUR_LOG"]).write_text(text)


def wait_for(url: str, server: subprocess.Popen) -> None:
    import time

    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stdout.read() if server.stdout else ""
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError(f"retrieval serve did not answer at {url}")


def page_shows(request: pytest.FixtureRequest, url: str, ids: list[int]) -> None:
    """The page in headless Chromium: a text search shows the API's hits in order, with
    their pictures loaded; the heatmap toggle (on by default for a Cluster-CLIP index, no
    build option) swaps every picture for its heatmap; a box dragged on the last result
    searches for it, shown on that image's card (skipped, saying so, without chromium)."""
    missing = [p for p in ("chromium", "chromedriver") if not shutil.which(p)]
    if missing:
        pytest.skip(f"the page part needs Debian's chromium and chromium-driver ({missing})")
    driver = request.getfixturevalue("browser")
    open_page(driver, url)
    search(driver, "a red circle", top=50)
    assert card_ids(driver) == ids
    wait(driver, pictures_loaded, "the hits' pictures")

    plain = sources(driver)
    by_id(driver, "heatmap").click()
    wait(driver, lambda d: all("/heatmap?" in s for s in sources(d)), "the heatmaps")
    wait(driver, pictures_loaded, "the heatmaps to load")
    fell_back = driver.find_elements("css selector", ".card.no-heatmap")
    assert not fell_back, [c.get_attribute("title") for c in fell_back]
    by_id(driver, "heatmap").click()
    wait(driver, lambda d: sources(d) == plain, "the plain pictures back")

    last = cards(driver)[-1]
    drawn_on = int(last.get_attribute("data-image-id"))
    img = last.find_element("css selector", "img")
    after(driver, lambda: drag(driver, img, (0.2, 0.2), (0.8, 0.8)), "the drawn search")
    assert status(driver).startswith("search by drawn region on "), status(driver)
    # with random weights every region looks alike, so the rank is not asserted here
    # (test_serve_page's drawn-region test is): the page asked for the drawn box, the
    # drawn-on image's card shows it, and the hits are the API's for that box
    (card,) = [c for c in cards(driver) if int(c.get_attribute("data-image-id")) == drawn_on]
    box = drawn_box(card)
    assert box == pytest.approx([0.2, 0.2, 0.8, 0.8], abs=0.03)
    body = {"top": 50, "image_id": drawn_on, "box": box}
    answer = httpx.post(f"{url}/api/search", json=body).json()
    assert card_ids(driver) == [h["image_id"] for h in answer["hits"]]
