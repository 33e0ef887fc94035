"""``/docs``: Swagger UI from the installed swagger-ui-bundle, rendering /openapi.json, loading nothing from elsewhere.

The browser test opens the page in Debian's headless Chromium against the app under real uvicorn and reads, from
Chromium's own network log, every request the page made: all of them must go to the app's origin, and the page must
show every documented operation without a console error (a request refused by the Content-Security-Policy shows
there).
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from starlette.testclient import TestClient
from swagger_ui_bundle import swagger_ui_path

from service.http.openapi.docs import assets
from tests.conftest import LiveServer
from tests.http.test_openapi import documented


def test_docs_redirects_to_the_page_which_loads_only_its_own_files(client: TestClient) -> None:
    moved = client.get("/docs", follow_redirects=False)
    assert moved.status_code == 307 and moved.headers["location"] == "docs/"
    page = client.get("/docs/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "http" not in csp
    loaded = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert loaded and all(u.startswith("./") for u in loaded), loaded
    assert 'url: "../openapi.json"' in page.text and "validatorUrl: null" in page.text
    for url in loaded:
        name = url.removeprefix("./")
        resp = client.get(f"/docs/{name}")
        assert resp.status_code == 200 and resp.content == (swagger_ui_path / name).read_bytes(), name
    assert {u.removeprefix("./") for u in loaded} == assets()


def test_only_the_files_the_page_loads_are_served(client: TestClient) -> None:
    for name in ("index.html", "swagger-initializer.js", "index.j2", "swagger-ui.js.map", "..%2Findex.j2"):
        resp = client.get(f"/docs/{name}")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", name


def _requests(driver: Any) -> list[str]:
    """Every URL the page asked for, from Chromium's DevTools network log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = orjson.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_the_page_renders_every_operation_loading_nothing_remote(browser: Any, live_server: LiveServer) -> None:
    from selenium.webdriver.common.by import By

    browser.get(f"{live_server.url}/docs")
    expected = len(documented())
    deadline = time.monotonic() + 30
    while len(browser.find_elements(By.CSS_SELECTOR, ".opblock")) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(browser.find_elements(By.CSS_SELECTOR, ".opblock")) == expected
    assert "segment-persona-sync" in browser.find_element(By.CSS_SELECTOR, ".info .title").text
    urls = _requests(browser)
    assert any(u.endswith("/openapi.json") for u in urls) and any(u.endswith("swagger-ui-bundle.js") for u in urls)
    origin = urlsplit(live_server.url).netloc
    web = [urlsplit(u) for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")]  # not chrome://
    elsewhere = [u.geturl() for u in web if u.netloc != origin]
    assert elsewhere == []
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
