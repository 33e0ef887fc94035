"""The console over HTTP (no browser needed): the session, CSRF, escaping, bad input and Redis outages.

Real app, real Redis (the suite's), real RQ worker processes for the jobs; nothing mocked."""

from __future__ import annotations

import time
from html.parser import HTMLParser

import orjson
import pytest
import redis
from rq import Queue
from starlette.testclient import TestClient

from service.config import Settings
from service.http.app import create_app
from service.http.session import COOKIE, issue, session_key
from service.spec.keys import Keys
from service.state.queue import QUEUE_NAME
from service.state.store import SyncStore
from tests.conftest import ADMIN_TOKEN, free_port
from tests.console.conftest import csrf_of, login, send
from tests.helpers import NOW
from tests.http.test_admin_replay import work

PAGES = ["/console", "/console/clusters", "/console/profiles", "/console/profiles?id=email:x@example.com",
         "/console/operations", "/console/operations/dead-letters/1-0"]
ACTIONS = ["/console/logout", "/console/operations/dead-letters/1-0/replay",
           "/console/operations/dead-letters/1-0/delete", "/console/operations/jobs/job-1/requeue",
           "/console/operations/jobs/requeue"]
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
RECENT = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW / 1000 - 3600))
HOSTILE = "<script>alert('pwned')</script>"


class Links(HTMLParser):
    """Every link and form target of a page, and whether it has a script anywhere."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.scripts = 0
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script" or any(name.startswith("on") for name, _ in attrs)
        self.targets += [v or "" for name, v in attrs if name in ("href", "action", "src", "formaction")]


def test_disabled_without_admin_token(redis_url: str) -> None:
    with TestClient(create_app(Settings(), redis_url, ""), raise_server_exceptions=False) as c:
        for path in [*PAGES, "/console/login"]:
            resp = c.get(path, follow_redirects=False)
            assert resp.status_code == 403 and "console is disabled" in resp.text and "ADMIN_TOKEN" in resp.text
        assert c.post("/console/login", data={"token": ""}).status_code == 403
        assert c.post("/console/operations/jobs/requeue", data={}).status_code == 403


def test_no_page_or_action_works_without_a_valid_session(app_client: TestClient, r: redis.Redis) -> None:
    SyncStore(r, Settings()).dead_letters("default", [("bad", b'{"type":"identify"}')], "webhook")
    for path in PAGES:
        resp = app_client.get(path, follow_redirects=False)
        assert resp.status_code == 303 and resp.headers["location"].startswith("/console/login?next=%2Fconsole"), path
    for path in ACTIONS[1:]:
        assert app_client.post(path, data={"csrf": "x"}).status_code == 403, path
    key = session_key(ADMIN_TOKEN)
    for cookie in ("forged.value.sig", issue(key, int(time.time()) - 13 * 3600),
                   issue(session_key("an-old-token"), int(time.time()))):
        app_client.cookies.set(COOKIE, cookie)
        assert app_client.get("/console", follow_redirects=False).status_code == 303
    assert r.xlen(Keys("default").dead_letters) == 1


def test_login_gives_a_strict_httponly_cookie_and_the_token_never_reaches_a_page(app_client: TestClient) -> None:
    wrong = app_client.post("/console/login", data={"token": "guess"})
    assert wrong.status_code == 401 and "not the admin token" in wrong.text and "guess" not in wrong.text
    resp = app_client.post("/console/login", data={"token": ADMIN_TOKEN, "next": "//evil.example/x"},
                           follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"] == "/console"  # never off-site
    cookie = resp.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/console" in cookie and "Max-Age=43200" in cookie and ADMIN_TOKEN not in cookie
    for path in PAGES:
        page = app_client.get(path)
        assert ADMIN_TOKEN not in page.text, path
    csrf = csrf_of(app_client.get("/console").text)
    out = app_client.post("/console/logout", data={"csrf": csrf}, follow_redirects=False)
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
    assert app_client.get("/console", follow_redirects=False).status_code == 303


def test_every_page_sends_a_policy_without_script_and_no_script(app_client: TestClient) -> None:
    login(app_client)
    for path in [*PAGES[:5], "/console/login"]:
        resp = app_client.get(path)
        csp = resp.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
        assert "script-src" not in csp  # falls back to default-src 'none': no script at all
        assert resp.headers["x-frame-options"] == "DENY" and resp.headers["cache-control"] == "no-store"
        assert Links(resp.text).scripts == 0, path


def test_actions_need_this_sessions_csrf_token_and_our_origin(app_client: TestClient, settings: Settings,
                                                             redis_url: str, r: redis.Redis) -> None:
    SyncStore(r, Settings()).dead_letters("default", [("bad", b'{"type":"identify"}')], "webhook")
    entry = r.xrange(Keys("default").dead_letters)[0][0].decode()
    delete = f"/console/operations/dead-letters/{entry}/delete"
    with TestClient(create_app(settings, redis_url, redis_url)) as other:
        foreign = login(other)  # another session's token
    csrf = login(app_client)
    assert foreign != csrf
    for form, headers in (({}, {}), ({"csrf": ""}, {}), ({"csrf": foreign}, {}),
                          ({"csrf": csrf}, {"Origin": "https://evil.example"}),
                          ({"csrf": csrf}, {"Origin": "http://[x"})):  # not even a URL: refused, not a 500
        resp = app_client.post(delete, data=form, headers=headers)
        assert resp.status_code == 403 and "not from this session" in resp.text
    login_from_nowhere = app_client.post("/console/login", data={"token": "x"}, headers={"Origin": "http://[x"},
                                         follow_redirects=False)
    assert login_from_nowhere.status_code == 401  # the login page again, as for a wrong token
    assert r.xlen(Keys("default").dead_letters) == 1
    assert app_client.get(delete).status_code == 405  # never by GET
    done = app_client.post(delete, data={"csrf": csrf}, headers={"Origin": "http://testserver"})
    assert done.status_code == 200 and f"Dead letter {entry} deleted" in done.text
    assert r.xlen(Keys("default").dead_letters) == 0


def hostile_events() -> list[dict]:
    return [
        {"type": "identify", "userId": "javascript:alert(1)", "messageId": "x1", "timestamp": RECENT,
         "traits": {"email": "mallory@example.com", "nickname": HOSTILE, "homepage": "javascript:alert(2)",
                    f"{HOSTILE}": 1}},
        {"type": "track", "userId": "javascript:alert(1)", "messageId": "x2", "timestamp": RECENT,
         "event": "<img src=x onerror=alert(3)>", "properties": {"revenue": 1}},
    ]


def test_values_from_events_are_rendered_as_text(app_client: TestClient, r: redis.Redis) -> None:
    send(app_client, *hostile_events())
    SyncStore(r, Settings()).dead_letters("default", [(f"reason {HOSTILE}", orjson.dumps(
        {"type": "track", "event": HOSTILE}))], "webhook")
    r.hset(Keys("default").narrative, mapping={"state": "synced", "content": f"**Web** {HOSTILE} "
                                               "[click](javascript:alert(4)) [docs](https://mavera.io)"})
    login(app_client)
    entry = r.xrange(Keys("default").dead_letters)[0][0].decode()
    pages = {p: app_client.get(p) for p in ("/console/profiles?id=email:mallory@example.com", "/console/operations",
                                            f"/console/operations/dead-letters/{entry}", "/console/clusters")}
    profile = pages["/console/profiles?id=email:mallory@example.com"].text
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in profile  # the trait value, as text
    assert "&lt;img src=x onerror=alert(3)&gt;" in profile  # the event name
    assert "javascript:alert(2)" in profile  # shown, as text
    assert "<strong>Web</strong>" in pages["/console/clusters"].text and 'href="https://mavera.io"' in \
        pages["/console/clusters"].text
    for path, resp in pages.items():
        assert resp.status_code == 200, path
        assert "<script>" not in resp.text and "<img" not in resp.text, path
        links = Links(resp.text)
        assert links.scripts == 0
        for target in links.targets:  # every link is ours (or the narrative's https one), never javascript:
            assert target.startswith(("/console", "#", "https://mavera.io")), (path, target)
    assert "user_id%3Ajavascript%3Aalert%281%29" in profile  # the identifier's link: a query value of ours


def test_bad_input_gets_a_4xx_page(app_client: TestClient, r: redis.Redis) -> None:
    csrf = login(app_client)
    for path, status in [("/console?space=%7Bbad", 400), ("/console/profiles?id=no-colon", 400),
                         ("/console/profiles?id=email:nobody@example.com", 404),
                         ("/console/profiles?id=email:" + "x" * 1001, 400),
                         ("/console/operations?since=last+tuesday", 400), ("/console/operations?source=mail", 400),
                         ("/console/operations?before=abc", 400), ("/console/operations/dead-letters/abc", 400),
                         ("/console/operations/dead-letters/1-1", 404), ("/console/no-such-page", 404)]:
        resp = app_client.get(path)
        assert resp.status_code == status and "<h1>" in resp.text, (path, resp.status_code)
    wrong_method = app_client.delete("/console/operations")  # a page, with the methods it takes
    assert wrong_method.status_code == 405 and "<h1>" in wrong_method.text and "GET" in wrong_method.headers["allow"]
    assert app_client.get("/no-such-page").json()["error"]["code"] == "not_found"  # APIs keep their JSON
    for path, status in [("/console/operations/dead-letters/1-1/replay", 404),
                         ("/console/operations/dead-letters/1-1/delete", 404),
                         ("/console/operations/dead-letters/zz/delete", 400),
                         ("/console/operations/jobs/no-such-job/requeue", 404),
                         ("/console/operations/jobs/bad!id/requeue", 400)]:
        assert app_client.post(path, data={"csrf": csrf}).status_code == status, path
    big = app_client.post("/console/operations/jobs/requeue", content=b"csrf=" + b"x" * 20000,
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert big.status_code == 413


def test_redis_down_is_a_503_page(settings: Settings) -> None:
    down = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    with TestClient(create_app(settings, down, down), raise_server_exceptions=False) as c:
        login_page = c.post("/console/login", data={"token": ADMIN_TOKEN}, follow_redirects=False)
        assert login_page.status_code == 303  # logging in needs no Redis
        for path in ("/console", "/console/clusters", "/console/profiles?id=email:a@example.com",
                     "/console/operations"):
            resp = c.get(path)
            assert resp.status_code == 503 and "Redis is unavailable" in resp.text, path
            assert resp.headers["retry-after"] == "5"


def test_overview_shows_the_status_figures_and_never_scans(app_client: TestClient, r: redis.Redis) -> None:
    send(app_client, *[{"type": "identify", "userId": f"u{i}", "messageId": f"m{i}", "timestamp": RECENT,
                        "traits": {"email": f"u{i}@example.com"}} for i in range(7)])
    send(app_client, {"type": "identify", "userId": "u0", "messageId": "m0", "timestamp": RECENT})  # a duplicate
    SyncStore(r, Settings()).dead_letters("default", [("bad", b"{}")] * 3, "webhook")
    login(app_client)
    deadline = time.monotonic() + 10
    while (status := app_client.get("/admin/status", headers=ADMIN).json())["spaces"][0]["events"]["last_hour"][
            "accepted"] < 7:  # the web process writes its counts about once a second
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r.config_resetstat()
    page = app_client.get("/console").text
    row = status["spaces"][0]
    assert row["events"]["last_hour"] == {"accepted": 7, "duplicate": 1, "rejected": 0, "suppressed": 0}
    assert '<th scope="row">accepted</th><td>7</td><td>7</td>' in page.replace("\n", "")
    assert '<th scope="row">duplicate</th><td>1</td><td>1</td>' in page.replace("\n", "")
    assert 'id="dead-letters"><a href="/console/operations?space=default">3</a>' in page
    assert 'id="redis-memory">' in page and "Syncing (not paused)" in page
    r.hset(Keys("default").personas, "high_value", orjson.dumps({"state": "outbox"}))  # workers without a key
    assert "<strong>Outbox mode</strong>" in app_client.get("/console").text
    r.hdel(Keys("default").personas, "high_value")
    assert page.count('class="s-accepted"') >= 2  # a bar for the minute, and the legend
    commands = {k.removeprefix("cmdstat_") for k in r.info("commandstats")}
    assert commands and not commands & {"scan", "keys", "hscan", "sscan", "zscan"}, commands


def test_a_dead_letter_nested_too_deep_to_lay_out_is_shown_as_it_came(app_client: TestClient, r: redis.Redis) -> None:
    body = b"[" * 5000 + b"]" * 5000
    SyncStore(r, Settings()).dead_letters("default", [("nested too deep", body)], "webhook")
    entry = r.xrange(Keys("default").dead_letters)[0][0].decode()
    login(app_client)
    page = app_client.get(f"/console/operations/dead-letters/{entry}")
    assert page.status_code == 200 and "[[[[" in page.text


def test_replaying_a_dead_letter_from_the_console_applies_it(app_client: TestClient, r: redis.Redis) -> None:
    """A dead letter whose event applies now (the refusal's cause fixed), replayed with one click, run by a real
    worker, then gone and on the profile."""
    event = {"type": "identify", "userId": "late", "messageId": "dl-1", "timestamp": RECENT,
             "traits": {"email": "late@example.com", "plan": "pro"}}
    SyncStore(r, Settings()).dead_letters("default", [("Redis OOM (since fixed)", orjson.dumps(event))], "webhook")
    entry = r.xrange(Keys("default").dead_letters)[0][0].decode()
    csrf = login(app_client)
    queued = app_client.post(f"/console/operations/dead-letters/{entry}/replay", data={"csrf": csrf})
    assert queued.status_code == 200 and f"Replay of dead letter {entry} queued" in queued.text
    work(r)
    page = app_client.get("/console/operations").text
    assert "No dead letters" in page and "applied 1" in page
    profile = app_client.get("/console/profiles?id=email:late@example.com").text
    assert 'data-trait="plan"><th scope="row">plan</th><td class="value">pro</td>' in profile


def test_failed_jobs_are_listed_and_requeued(app_client: TestClient, r: redis.Redis) -> None:
    queue = Queue(QUEUE_NAME, connection=r)
    queue.enqueue("no.such.module.function", "default")
    work(r)
    [failed] = queue.failed_job_registry.get_job_ids()
    csrf = login(app_client)
    page = app_client.get("/console/operations").text
    assert f'data-job="{failed}"' in page and "no.such.module" in page.split(f'data-job="{failed}"')[1][:600]
    done = app_client.post(f"/console/operations/jobs/{failed}/requeue", data={"csrf": csrf})
    assert done.status_code == 200 and f"Job {failed} queued again" in done.text
    assert failed in queue.get_job_ids() and not queue.failed_job_registry.get_job_ids()


@pytest.mark.parametrize("width", [1280, 390])
def test_pages_render_at_both_widths_without_a_browser(width: int) -> None:
    """The style sheet has a narrow layout (the browser tests look at it; here: that it is served and has it)."""
    from service.http.console import stylesheet

    css = stylesheet().decode()
    assert "@media (max-width: 760px)" in css and "overflow-x: auto" in css
    assert ":focus-visible" in css  # keyboard focus is visible


def test_operations_show_a_rebuild_as_it_goes_and_a_stopped_one(app_client: TestClient, r: redis.Redis) -> None:
    """A rebuild run by the command shows on the Operations page with its events; one whose record stopped moving
    is said to have been stopped, with what to run."""
    from service.state.rebuild import rebuild

    send(app_client, *({"type": "identify", "userId": f"rb{i}", "messageId": f"rb-{i}", "timestamp": RECENT}
                       for i in range(12)))
    result = rebuild(r, Settings(), "default")
    csrf = login(app_client)
    assert csrf
    page = app_client.get("/console/operations").text
    assert 'data-rebuild="state" class="">done' in page
    assert f'data-rebuild="events">{result["events"]:,}<' in page and "switched to generation g1:" in page
    key = Keys("default").rebuild_status
    r.hset(key, mapping={"state": "running", "updated_ms": str(int(time.time() * 1000) - 300_000)})
    stalled = app_client.get("/console/operations").text
    assert "running, but its record last moved 5 min ago: its command was stopped" in stalled
    assert "persona-sync rebuild --space default" in stalled
