"""Debian's headless Chromium driven by chromedriver through selenium, for the tests that need a real browser
(the SDK test, the console's). Without chromium or chromedriver the test is skipped, saying what to install."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = ("chromium", "/usr/bin/chromium")
CHROMEDRIVER = ("chromedriver", "/usr/bin/chromedriver")
INSTALL_BROWSER = "apt-get install -y chromium chromium-driver"


def _which(names: tuple[str, str]) -> str | None:
    return shutil.which(names[0]) or (names[1] if Path(names[1]).exists() else None)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium session (a selenium WebDriver), or a skip that names what is missing."""
    binary, chromedriver = _which(CHROMIUM), _which(CHROMEDRIVER)
    if binary is None or chromedriver is None:
        missing = " and ".join(n for n, p in (("chromium", binary), ("chromedriver", chromedriver)) if p is None)
        pytest.skip(f"{missing} not found: the browser test drives Debian's headless Chromium ({INSTALL_BROWSER})")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})  # console, network
    with tempfile.TemporaryDirectory(prefix="sps-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        try:
            driver.set_page_load_timeout(30)
            yield driver
        finally:
            driver.quit()
