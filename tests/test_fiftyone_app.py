"""The FiftyOne App (its real server, on a loopback port) in a real headless Chromium shows
a view sorted by this project's index, right after ``retrieval export --index``: the App
lists the brain run as a prompt-capable similarity index, and its grid shows the sorted
samples. The screenshot is saved as docs/screenshots/fiftyone.png when
``FIFTYONE_SCREENSHOT`` names a path (else under pytest's tmp path).

Skipped, saying why, where the fiftyone extra or Debian's chromium + chromium-driver
are missing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from chromium import chromium, needs_chromium
from fiftyone_fixtures import fiftyone_db, free_port, needs_fiftyone  # noqa: F401
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from retrieval.cli import main
from retrieval.index import build_index, open_index

pytestmark = [
    needs_fiftyone,
    needs_chromium("the App test"),
    pytest.mark.slow,  # the App's server and its page in Chromium on two shared cores
]
WINDOW = (1280, 800)
WAIT_S = 180
PROMPT = "a red square"
K = 6
# the view bar's words: its stage names are text, its parameters inputs
VIEW_BAR = """return [...document.querySelectorAll('input, div, span')].map(
  e => e.tagName === 'INPUT' ? e.value : e.childElementCount ? '' : e.textContent.trim())"""
BRAIN_RUNS = """query($name: String!) { dataset(name: $name) {
  brainMethods { key config { cls type patchesField supportsPrompts } } } }"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(WINDOW, WAIT_S) as driver:
        yield driver


def test_the_app_shows_the_sorted_view(
    fiftyone_db: str,  # noqa: F811 - the fixture imported above
    browser: Any,
    dense_run: Path,
    tmp_path: Path,
) -> None:
    """After ``retrieval export RUN --format fiftyone --name NAME --index INDEX``, the
    App's server lists the brain run (a similarity config supporting prompts over the
    representatives), and the page shows the view ``sort_by_similarity`` made: the App
    reports its K samples under the SortBySimilarity stage and draws its grid. That
    view's images are ``retrieval search``'s top K in order."""
    import fiftyone as fo

    index = build_index(dense_run, "exact", tmp_path / "index", "cpu", progress=False)
    argv = ["export", str(dense_run), "--format", "fiftyone", "--name", "app", "--index"]
    assert main([*argv, str(index), "--no-progress"]) == 0
    dataset = fo.load_dataset("app")
    view = dataset.sort_by_similarity(PROMPT, k=K, brain_key="retrieval")
    hits = open_index(index, "cpu").search(PROMPT, top=K)
    assert view.values("image_id") == [h.image_id for h in hits]

    port = free_port()
    session = fo.launch_app(view, port=port, address="127.0.0.1", remote=True, auto=False)
    try:
        base = f"http://127.0.0.1:{port}"
        reply = httpx.post(
            f"{base}/graphql", json={"query": BRAIN_RUNS, "variables": {"name": "app"}}, timeout=60
        ).json()
        runs = reply["data"]["dataset"]["brainMethods"]
        assert [r["key"] for r in runs] == ["retrieval"]
        config = runs[0]["config"]
        # the App's similarity operator lists runs of type similarity or whose class name
        # says similarity (its server types only SimilarityConfig itself: issubclass's
        # arguments are swapped in fiftyone 1.22.1's server/query.py)
        assert config["type"] == "similarity" or "similarity" in config["cls"].lower()
        assert config["supportsPrompts"]
        assert config["patchesField"] == "representatives"
        assert config["cls"].endswith("RetrievalSimilarityConfig")

        browser.get(base)
        wait = WebDriverWait(browser, WAIT_S)
        wait.until(lambda d: f"{K} samples" in d.find_element(By.TAG_NAME, "body").text)
        wait.until(lambda d: {"SortBySimilarity", PROMPT} <= set(d.execute_script(VIEW_BAR)))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "canvas")) >= 1)
        for button in browser.find_elements(By.XPATH, "//button[normalize-space()='Dismiss']"):
            button.click()  # FiftyOne's advertisement over the grid
        time.sleep(5)  # the grid's pictures load after the count
        shot = Path(os.environ.get("FIFTYONE_SCREENSHOT") or tmp_path / "fiftyone.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
    finally:
        session.close()
