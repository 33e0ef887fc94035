"""The real analytics.js (@segment/analytics-next, pinned in tests/sdk/package-lock.json) in a real headless Chromium,
on a page served from another origin, sending to our app under real uvicorn: only ``analytics._cdn`` points at us,
everything else — where events go, the write key in the body — comes from our settings endpoint.

Needs node/npm (to install the pinned library into tests/sdk/node_modules with ``npm ci``, once) and Debian's
chromium and chromium-driver; without them these tests are skipped, saying what to install.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from service.config import Settings
from service.http.app import create_app
from service.spec.keys import Keys
from tests.conftest import PROFILE_TOKEN, WRITE_KEY, LiveServer
from tests.helpers import find

SDK_DIR = Path(__file__).resolve().parents[1] / "sdk"
PACKAGE = "@segment/analytics-next"
BUNDLE = SDK_DIR / "node_modules" / PACKAGE / "dist" / "umd" / "standalone.js"


def _locked_version() -> str:
    lock = orjson.loads((SDK_DIR / "package-lock.json").read_bytes())
    return str(lock["packages"][f"node_modules/{PACKAGE}"]["version"])


@pytest.fixture(scope="module")
def bundle() -> Path:
    """analytics-next's standalone bundle, as its CDN serves analytics.min.js: installed from the lock file."""
    installed = SDK_DIR / "node_modules" / PACKAGE / "package.json"
    if BUNDLE.exists() and installed.exists() and orjson.loads(installed.read_bytes())["version"] == _locked_version():
        return BUNDLE
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        pytest.skip("node/npm not found: the browser test installs @segment/analytics-next with `npm ci` "
                    "(Debian: apt-get install -y nodejs npm)")
    out = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=SDK_DIR,
                         capture_output=True, text=True, timeout=300)
    if out.returncode != 0 or not BUNDLE.exists():
        pytest.skip(f"`npm ci` in tests/sdk failed (is the npm registry reachable?): {out.stderr.strip()[-500:]}")
    return BUNDLE


class PageServer:
    """A customer's site on another origin: one HTML page per path, and the library as its CDN would serve it."""

    def __init__(self, bundle: Path) -> None:
        pages: dict[str, bytes] = {}
        self.pages = pages
        script = bundle.read_bytes()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?")[0]
                body, kind = (script, "text/javascript") if path == "/analytics.js" else (pages.get(path), "text/html")
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def snippet_page(write_key: str, cdn: str, calls: str, load_options: dict[str, Any] | None = None) -> bytes:
    """What Segment's snippet leaves behind before the library loads (a queue of calls in ``window.analytics``,
    ``_writeKey``, ``_cdn``, ``_loadOptions``; src/browser/standalone-analytics.ts reads them), then the library."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>shop</title>
<script>
  var analytics = window.analytics = [];
  ["page", "identify", "track", "group", "alias", "screen", "reset", "ready", "on"].forEach(function (m) {{
    analytics[m] = function () {{
      analytics.push([m].concat(Array.prototype.slice.call(arguments)));
      return analytics;
    }};
  }});
  analytics._writeKey = {orjson.dumps(write_key).decode()};
  analytics._cdn = {orjson.dumps(cdn).decode()};
  analytics._loadOptions = {orjson.dumps(load_options or {}).decode()};
  {calls}
</script>
<script src="/analytics.js"></script>
</head><body><h1>shop</h1></body></html>""".encode()


class Recorder:
    """Our app, with every request it receives noted (method, path, headers, body): what the library really sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        entry: dict[str, Any] = {"method": scope["method"], "path": scope["path"], "body": b"", "status": None,
                                 "headers": {k.decode().lower(): v.decode() for k, v in scope["headers"]}}
        self.requests.append(entry)

        async def tap() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                entry["body"] += message.get("body", b"")
            return dict(message)

        async def status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                entry["status"] = message["status"]
                entry["response_headers"] = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            await send(message)

        await self.app(scope, tap, status)


@pytest.fixture
def site(bundle: Path, redis_url: str) -> Iterator[tuple[PageServer, LiveServer, Recorder]]:
    with PageServer(bundle) as pages:
        settings = Settings(write_keys={WRITE_KEY: "default"}, profile_api_token=PROFILE_TOKEN,
                            cors_allow_origins=(pages.origin,))  # only the shop's origin, not *
        recorder = Recorder(create_app(settings, redis_url, ""))
        with LiveServer(recorder) as app:
            yield pages, app, recorder


def logged(r: redis.Redis) -> list[dict[str, Any]]:
    return [orjson.loads(f[b"e"]) for _, f in r.xrange(Keys("default").log)]


def wait_for(check: Callable[[], bool], driver: Any, recorder: Recorder, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            console = [f"{e['level']} {e['message']}" for e in driver.get_log("browser")]
            seen = [(q["method"], q["path"], q["status"]) for q in recorder.requests]
            pytest.fail(f"the events did not arrive within {seconds}s; requests {seen}; console {console}")
        time.sleep(0.1)


def answered(recorder: Recorder) -> bool:
    """Every POST so far has had its answer started: the events are in Redis before the answer goes out, so a
    check of the state alone can come a moment before the answer's status is recorded."""
    return all(q["status"] is not None for q in recorder.requests if q["method"] == "POST")


CALLS = """analytics.page("Pricing");
  analytics.identify("browser-user", {email: "Browser.User@Example.com", plan: "pro"});
  analytics.track("Signed Up", {source: "pricing-page"});"""


def test_analytics_js_in_chromium_lands_on_the_profile(browser: Any, site: Any, r: redis.Redis) -> None:
    pages, app, recorder = site
    pages.pages["/pricing"] = snippet_page(WRITE_KEY, app.url, CALLS)
    browser.get(f"{pages.origin}/pricing")

    def arrived() -> bool:
        p = find(r, "user_id", "browser-user")
        return p is not None and "web" in p.activity and {e.get("type") for e in logged(r)} >= {"page", "track"} \
            and answered(recorder)

    wait_for(arrived, browser, recorder)
    profile = find(r, "user_id", "browser-user")
    assert profile is not None and find(r, "email", "browser.user@example.com") == profile
    assert profile.trait_values()["plan"] == "pro" and set(profile.activity) == {"web"}
    traits = httpx.get(f"{app.url}/v1/spaces/default/collections/users/profiles/user_id:browser-user/traits",
                       auth=(PROFILE_TOKEN, "")).json()["traits"]
    assert traits == {"email": "Browser.User@Example.com", "plan": "pro"}
    [track] = [e for e in logged(r) if e["type"] == "track"]
    assert track["event"] == "Signed Up" and track["properties"] == {"source": "pricing-page"}
    assert track["userId"] == "browser-user" and track["context"]["library"]["name"] == "analytics.js"

    # what the library did on the wire: settings from us, a preflight, then one text/plain POST per call
    calls = [(q["method"], q["path"]) for q in recorder.requests]
    assert calls[0] == ("GET", f"/v1/projects/{WRITE_KEY}/settings")
    posts = [q for q in recorder.requests if q["method"] == "POST"]
    assert sorted(q["path"] for q in posts) == ["/v1/i", "/v1/p", "/v1/t"]
    for q in posts:
        assert q["status"] == 200 and q["headers"]["content-type"].startswith("text/plain")
        assert q["headers"]["origin"] == pages.origin
        assert q["response_headers"]["access-control-allow-origin"] == pages.origin
        assert orjson.loads(q["body"])["writeKey"] == WRITE_KEY  # the apiKey our settings gave it
        assert "access-control-allow-credentials" not in q["response_headers"]
    preflights = [q for q in recorder.requests if q["method"] == "OPTIONS"]
    assert preflights and all(q["status"] == 204 for q in preflights)


def test_analytics_js_batching_posts_to_v1_b(browser: Any, site: Any, r: redis.Redis) -> None:
    pages, app, recorder = site
    batching = {"integrations": {"Segment.io": {"deliveryStrategy": {"strategy": "batching",
                                                                     "config": {"size": 3, "timeout": 200}}}}}
    pages.pages["/batched"] = snippet_page(WRITE_KEY, app.url, CALLS, batching)
    browser.get(f"{pages.origin}/batched")
    wait_for(lambda: len(logged(r)) >= 3 and answered(recorder), browser, recorder)
    [batch] = [q for q in recorder.requests if q["method"] == "POST"]
    assert batch["path"] == "/v1/b" and batch["status"] == 200
    body = orjson.loads(batch["body"])
    assert list(body) == ["writeKey", "batch", "sentAt"] and body["writeKey"] == WRITE_KEY
    assert [e["type"] for e in body["batch"]] == ["page", "identify", "track"]
    assert all("sentAt" not in e and "timestamp" in e for e in body["batch"])  # one sentAt per batch
    profile = find(r, "user_id", "browser-user")
    assert profile is not None and profile.trait_values()["plan"] == "pro" and set(profile.activity) == {"web"}
