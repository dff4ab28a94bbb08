"""The search page of ``retrieval serve`` in a real headless Chromium against a real server
(tests/serve_server.py: uvicorn on a loopback port over two tiny built indexes): the
indexes are listed, a text search shows the JSON API's hits in the same order with each
matched region drawn where its box says, clicking a region searches by example, the
heatmap toggle swaps the pictures, an uploaded picture is searched, hostile text is
shown as text, the API's errors are shown, and a token is asked for once.

Needs Debian's ``chromium`` and ``chromium-driver`` (CI installs them); skipped, saying
so, where they are missing. The screenshot of a result page is saved under pytest's tmp
path (its path is printed; ``pytest -s`` shows it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from chromium import chromium, needs_chromium
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait
from serve_server import start_server, write_vector_run

from retrieval.store import ShardStore

pytestmark = needs_chromium("the page tests")

WINDOW = (1000, 700)
WAIT_S = 30
TOKEN = "page-t0ken"
PWNED = "window.__pwned = 1"
HOSTILE = f'<script>alert(1)</script> "><img src=x onerror="{PWNED}">'


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the session, with a fresh profile."""
    with chromium(WINDOW, WAIT_S, console=True) as driver:
        yield driver


# ------------------------------------------------------------------ helpers


def api(url: str, path: str, method: str = "GET", **kwargs: Any) -> dict:
    response = httpx.request(method, f"{url}{path}", timeout=60, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def wait(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(
        condition, f"waiting for {what}"
    )


def by_id(driver: Any, element_id: str) -> Any:
    return driver.find_element("id", element_id)


def answered(driver: Any) -> int:
    """How many searches the page has answered (results or an error)."""
    return int(driver.execute_script("return document.body.dataset.answered || '0'"))


def open_page(driver: Any, url: str, index: str | None = None) -> None:
    """Loads the page fresh and picks ``index`` in the picker."""
    driver.get(url + "/")
    wait(driver, lambda d: d.execute_script("return document.body.dataset.ready"), "the page")
    if index is not None:
        Select(by_id(driver, "index")).select_by_value(index)


def after(driver: Any, action: Callable[[], None], what: str) -> None:
    """Runs ``action`` (one that starts a search) and waits for the page's answer."""
    seen = answered(driver)
    action()
    wait(driver, lambda d: answered(d) > seen, what)


def search(driver: Any, text: str, top: int | None = None, where: str | None = None) -> None:
    """Types the query (and top / filter) into the page, submits, waits for the answer."""
    for element_id, value in (("top", top), ("where", where)):
        if value is not None:
            by_id(driver, element_id).clear()
            by_id(driver, element_id).send_keys(str(value))
    by_id(driver, "query").clear()
    by_id(driver, "query").send_keys(text)
    after(driver, by_id(driver, "search").click, f"the answer to {text!r}")


def status(driver: Any) -> str:
    return by_id(driver, "status").text


def cards(driver: Any) -> list[Any]:
    return driver.find_elements("css selector", "#results .card")


def card_ids(driver: Any) -> list[int]:
    return [int(c.get_attribute("data-image-id")) for c in cards(driver)]


def sources(driver: Any) -> list[str]:
    return [i.get_attribute("src") for i in driver.find_elements("css selector", "#results img")]


def pictures_loaded(driver: Any) -> bool:
    return driver.execute_script(
        "const all = [...document.querySelectorAll('#results img')];"
        "return all.length > 0 && all.every(i => i.complete && i.naturalWidth > 0)"
    )


def assert_nothing_injected(driver: Any) -> None:
    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert.dismiss()
    assert driver.execute_script("return window.__pwned") is None
    injected = "img[src='x'], img[onerror], script:not([src])"
    assert driver.execute_script(f"return document.querySelectorAll({injected!r}).length") == 0


# ------------------------------------------------------------------ tests


def test_page_lists_the_indexes(browser: Any, served_index: str) -> None:
    open_page(browser, served_index)
    listed = api(served_index, "/api/indexes")["indexes"]
    options = browser.find_elements("css selector", "#index option")
    assert [o.get_attribute("value") for o in options] == [ix["name"] for ix in listed]
    for option, ix in zip(options, listed, strict=True):
        label = option.text
        assert f"{ix['images']} images" in label
        assert f"generation {ix['generation']}" in label
        assert ("recall" in label) or ("exact" in label)
    for ix in listed:  # the filter field and the warning follow the picked index
        open_page(browser, served_index, ix["name"])
        assert by_id(browser, "random-warning").is_displayed() == ix["random_weights"]
        info = by_id(browser, "index-info").text
        assert ix["retriever"]["name"] in info
        if ix["backend"] == "faiss" and ix["recall"]["method"].startswith("exact"):
            assert " faiss (exact) " in info  # a flat faiss index answers exactly
        columns = [c for c in ix["metadata_columns"] if c != "image_id"]
        where = by_id(browser, "where")
        assert where.is_displayed() == bool(columns), ix["name"]
        assert all(c in where.get_attribute("placeholder") for c in columns)
    assert any(c != "image_id" for ix in listed for c in ix["metadata_columns"])


def test_results_match_the_api_with_region_boxes(browser: Any, served_index: str) -> None:
    open_page(browser, served_index, "vectors")
    query, top = "a red circle", 12
    search(browser, query, top=top)
    expected = api(served_index, "/api/search", params={"q": query, "top": top, "index": "vectors"})
    hits = expected["hits"]
    assert len(hits) == top
    assert card_ids(browser) == [h["image_id"] for h in hits]
    assert f"{top} results" in status(browser)
    assert query in status(browser)
    wait(browser, pictures_loaded, "the thumbnails")
    for card, hit in zip(cards(browser), hits, strict=True):
        caption = card.find_element("css selector", "figcaption").text
        assert f"#{hit['rank']}" in caption
        assert f"score {hit['score']:.4f}" in caption
        name = card.find_element("css selector", ".file")
        assert hit["file_name"] in name.get_attribute("title")
        assert name.text == "/".join(Path(hit["path"]).parts[-2:])  # whole, with its folder
        overlay = card.find_element("css selector", ".box").rect
        img = card.find_element("css selector", "img").rect
        x0, y0, x1, y1 = hit["box"]
        assert overlay["x"] - img["x"] == pytest.approx(x0 * img["width"], abs=1.5)
        assert overlay["y"] - img["y"] == pytest.approx(y0 * img["height"], abs=1.5)
        assert overlay["width"] == pytest.approx((x1 - x0) * img["width"], abs=1.5)
        assert overlay["height"] == pytest.approx((y1 - y0) * img["height"], abs=1.5)


def test_clicking_a_region_searches_by_example(browser: Any, served_index: str) -> None:
    open_page(browser, served_index, "vectors")
    search(browser, "a blue square", top=10)
    card = cards(browser)[3]
    image_id, rep = int(card.get_attribute("data-image-id")), card.get_attribute("data-rep")
    after(browser, card.find_element("css selector", ".box").click, "the search by example")
    said = status(browser)
    assert said.startswith("search by example")
    assert f"region {rep} of image {image_id}" in said
    ids = card_ids(browser)
    assert ids[0] == image_id
    assert len(ids) == 10
    body = {"index": "vectors", "top": 10, "image_id": image_id, "rep_index": int(rep)}
    assert ids == [
        h["image_id"] for h in api(served_index, "/api/search", "POST", json=body)["hits"]
    ]


def test_similar_searches_like_the_whole_image(browser: Any, served_index: str) -> None:
    """The card's "similar" button asks for more like the whole image (no ``rep_index``:
    the multi-vector query); the page shows the API's hits for it, the image first."""
    open_page(browser, served_index, "vectors")
    search(browser, "a blue square", top=10)
    card = cards(browser)[4]
    image_id = int(card.get_attribute("data-image-id"))
    after(browser, card.find_element("css selector", "button.more").click, "the similar search")
    said = status(browser)
    assert said.startswith(f"search by example: image {image_id}")
    ids = card_ids(browser)
    assert ids[0] == image_id
    body = {"index": "vectors", "top": 10, "image_id": image_id}
    assert ids == [
        h["image_id"] for h in api(served_index, "/api/search", "POST", json=body)["hits"]
    ]


def drag(driver: Any, img: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    """Presses at ``start`` on the picture (fractions of its width and height), moves to
    ``end`` and releases, as a mouse does."""
    w, h = img.rect["width"], img.rect["height"]
    x0, y0 = start[0] * w - w / 2, start[1] * h - h / 2  # offsets from the centre
    chain = ActionChains(driver).move_to_element_with_offset(img, x0, y0).click_and_hold()
    chain.move_by_offset((end[0] - start[0]) * w / 2, (end[1] - start[1]) * h / 2)
    chain.move_by_offset((end[0] - start[0]) * w / 2, (end[1] - start[1]) * h / 2)
    chain.release().perform()


def drawn_box(card: Any) -> list[float]:
    """The drawn box shown on a result card, as fractions (``xyxy``) of its picture."""
    mark = card.find_element("css selector", ".drawn").rect
    shown = card.find_element("css selector", "img").rect
    return [
        (mark["x"] - shown["x"]) / shown["width"],
        (mark["y"] - shown["y"]) / shown["height"],
        (mark["x"] + mark["width"] - shown["x"]) / shown["width"],
        (mark["y"] + mark["height"] - shown["y"]) / shown["height"],
    ]


def test_drawing_a_region_searches_for_it(browser: Any, served_index: str) -> None:
    """Dragging a box around an object on any result searches for it (the image's cells
    under the box): that image ranks first, its card shows the drawn box where it was
    drawn, the text box is cleared, and the hits are the API's for the same box."""
    open_page(browser, served_index, "vectors")
    search(browser, "a red circle", top=12)
    wait(browser, pictures_loaded, "the thumbnails")
    card = cards(browser)[7]
    image_id = int(card.get_attribute("data-image-id"))
    img = card.find_element("css selector", "img")
    after(browser, lambda: drag(browser, img, (0.28, 0.3), (0.47, 0.46)), "the drawn search")
    said = status(browser)
    assert said.startswith("search by drawn region on "), said
    assert by_id(browser, "query").get_attribute("value") == ""
    ids = card_ids(browser)
    assert ids[0] == image_id
    assert len(ids) == 12
    box = drawn_box(cards(browser)[0])
    assert box == pytest.approx([0.28, 0.3, 0.47, 0.46], abs=0.03)
    assert not cards(browser)[1].find_elements("css selector", ".drawn")
    body = {"index": "vectors", "top": 12, "image_id": image_id, "box": box}
    assert ids == [
        h["image_id"] for h in api(served_index, "/api/search", "POST", json=body)["hits"]
    ]


def test_api_docs_render_with_no_outside_request(browser: Any, served_index: str) -> None:
    """/docs (Swagger UI) renders its operations with every https request blocked, and
    every resource it loaded came from the server itself."""
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["https://*"]})
    try:
        browser.get(f"{served_index}/docs")
        wait(
            browser,
            lambda d: d.find_elements("css selector", ".opblock-summary-path"),
            "Swagger UI's operations",
        )
        paths = [e.text for e in browser.find_elements("css selector", ".opblock-summary-path")]
        assert any("/api/search" in p for p in paths), paths
        loaded = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert loaded
        assert all(u.startswith(served_index) for u in loaded), loaded
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})


def test_compound_query_syntax(browser: Any, served_index: str) -> None:
    open_page(browser, served_index, "vectors")
    search(browser, "a red circle +a tree -a blue t-shirt", top=8)
    assert status(browser).startswith("compound query “a red circle” + “a tree” − “a blue t-shirt”")
    body = {"index": "vectors", "top": 8, "positive": ["a red circle", "a tree"]}
    body["negative"] = ["a blue t-shirt"]
    expected = api(served_index, "/api/search", "POST", json=body)["hits"]
    assert card_ids(browser) == [h["image_id"] for h in expected]
    search(browser, "-a bicycle")  # nothing to find: said before asking the server
    assert "needs a phrase to find" in by_id(browser, "error").text


def test_heatmap_toggle_swaps_the_pictures(browser: Any, served_index: str) -> None:
    open_page(browser, served_index, "dense")
    search(browser, "a green triangle", top=6)
    plain = sources(browser)
    assert len(plain) == 6
    assert not any("/heatmap" in s for s in plain)
    by_id(browser, "heatmap").click()
    heat = [s.replace("?size=", "/heatmap?q=a+green+triangle&size=") for s in plain]
    wait(browser, lambda d: sources(d) == heat, "the pictures to be swapped for heatmaps")
    wait(browser, pictures_loaded, "the heatmaps")
    fell_back = browser.find_elements("css selector", ".card.no-heatmap")
    assert not fell_back, [c.get_attribute("title") for c in fell_back] + browser.get_log("browser")
    by_id(browser, "heatmap").click()
    assert sources(browser) == plain


def test_search_by_uploaded_picture(browser: Any, served_index: str) -> None:
    open_page(browser, served_index, "vectors")
    search(browser, "a dog", top=5)
    picture = Path(
        api(served_index, "/api/search", params={"q": "a dog", "index": "vectors"})["hits"][0][
            "path"
        ]
    )
    after(browser, lambda: by_id(browser, "file").send_keys(str(picture)), "the upload's answer")
    assert status(browser).startswith(f"search by picture: {picture.name}")
    assert by_id(browser, "query").get_attribute("value") == ""  # no longer the text's results
    form = {"index": "vectors", "top": "5"}
    with picture.open("rb") as f:
        files = {"image": (picture.name, f, "image/jpeg")}
        hits = api(served_index, "/api/search", "POST", data=form, files=files)["hits"]
    assert card_ids(browser) == [h["image_id"] for h in hits]


def test_hostile_text_is_shown_as_text(browser: Any, served_index: str) -> None:
    open_page(browser, served_index, "dense")
    search(browser, HOSTILE, top=4)
    assert HOSTILE in status(browser)
    assert len(cards(browser)) == 4
    assert_nothing_injected(browser)


def test_the_apis_errors_are_shown(browser: Any, served_index: str) -> None:
    open_page(browser, served_index, "vectors")
    for where in ("no_such_column = 1", f"camera = '{HOSTILE}' AND )"):
        search(browser, "a red circle", where=where)
        error = by_id(browser, "error")
        assert error.is_displayed()
        assert status(browser) == ""
        response = httpx.get(
            f"{served_index}/api/search",
            params={"q": "a red circle", "index": "vectors", "where": where},
            timeout=60,
        )
        assert 400 <= response.status_code < 500
        assert error.text == response.json()["detail"]
    assert HOSTILE in error.text
    assert error.text.startswith("bad filter expression")
    assert "--where" not in error.text  # the page's word is "filter"
    assert_nothing_injected(browser)
    search(browser, "a red circle", where="camera = 'front'")  # the error goes away
    assert not by_id(browser, "error").is_displayed()
    assert len(cards(browser)) == 12


@pytest.fixture(scope="module")
def guarded(
    serve_indexes: dict[str, Path], dense_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A second server, with a token, over ``vectors`` and ``whole``: plain CLIP, one
    whole-image vector per image (no cells, so no heatmaps)."""
    from retrieval.index import build_index

    root = tmp_path_factory.mktemp("page")
    fingerprint = ShardStore(dense_run / "embeddings").read_manifest()["fingerprint"]
    images = Path(fingerprint["data"]["images"])
    run = write_vector_run(
        dense_run, root / "whole_run", np.arange(1, 25), 3, images, grid=1, whole_image_clip=True
    )
    whole = build_index(run, "exact", root / "whole", "cpu", progress=False)
    with start_server({"vectors": serve_indexes["vectors"], "whole": whole}, token=TOKEN) as url:
        yield url


@pytest.mark.slow  # a second server
def test_a_token_is_asked_for_once(browser: Any, guarded: str) -> None:
    browser.get(guarded + "/")  # another origin (port): no token stored for it yet
    field = wait(
        browser, lambda d: by_id(d, "token-form").is_displayed() and by_id(d, "token"), "the form"
    )
    field.send_keys("wrong", Keys.ENTER)
    wait(browser, lambda d: "refused" in status(d), "the refusal")
    by_id(browser, "token").send_keys(TOKEN, Keys.ENTER)
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready"), "the page")
    assert not by_id(browser, "token-form").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('retrieval.token')") == TOKEN
    Select(by_id(browser, "index")).select_by_value("vectors")
    search(browser, "a red circle", top=3)
    wait(browser, pictures_loaded, "the thumbnails, fetched with the token")
    assert len(sources(browser)) == 3
    assert all(f"token={TOKEN}" in s for s in sources(browser))
    browser.refresh()  # kept for the session: not asked again
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready"), "reload")
    assert not by_id(browser, "token-form").is_displayed()


@pytest.mark.slow
def test_no_heatmaps_is_said_once(browser: Any, guarded: str) -> None:
    browser.get(guarded + "/")
    browser.execute_script(f"sessionStorage.setItem('retrieval.token', {TOKEN!r})")
    open_page(browser, guarded, "whole")
    search(browser, "a red circle", top=4)
    by_id(browser, "heatmap").click()
    error = wait(browser, lambda d: by_id(d, "error").is_displayed() and by_id(d, "error"), "it")
    assert error.text.startswith("no heatmaps: ")
    assert "whole" in error.text
    assert not by_id(browser, "heatmap").is_selected()
    assert not any("/heatmap" in s for s in sources(browser))
    wait(browser, pictures_loaded, "the pictures")


def test_screenshot(browser: Any, served_index: str, tmp_path: Path) -> None:
    open_page(browser, served_index, "dense")
    search(browser, "a red circle", top=12)
    wait(browser, pictures_loaded, "the thumbnails")
    out = tmp_path / "serve_page.png"
    assert browser.save_screenshot(str(out))
    assert out.stat().st_size > 10_000
    print(f"screenshot of the search page: {out}")
