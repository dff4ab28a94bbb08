"""One headless Chromium for the tests that drive a real browser (the search page, the
FiftyOne App): Debian's ``chromium`` + ``chromium-driver``, a fresh profile each time,
the viewport set exactly. Skipped, saying what to install, where they are missing."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
MISSING = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def needs_chromium(what: str) -> pytest.MarkDecorator:
    """Skips ``what`` (e.g. "the page tests") where the browser or its driver is missing."""
    return pytest.mark.skipif(
        bool(MISSING),
        reason=f"{what} drive a real browser: Debian's chromium and chromium-driver are "
        f"missing ({', '.join(MISSING)}); apt-get install chromium chromium-driver",
    )


@contextmanager
def chromium(window: tuple[int, int], wait_s: float, console: bool = False) -> Iterator[Any]:
    """A headless Chromium whose viewport is ``window`` (whatever the frame takes), pages
    given ``wait_s`` to load; ``console`` keeps the browser's console log readable."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--window-size={window[0]},{window[1]}"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        if console:
            options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        driver.set_page_load_timeout(wait_s)
        width, height = window
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
        try:
            yield driver
        finally:
            driver.quit()
