"""The console in a real headless Chromium (Debian's chromium and chromium-driver; skipped, saying so, without
them), against the app under a real uvicorn, a real Redis and real worker processes.

Screenshots of every page at 1280 and 390 px wide are saved under the test's temporary folder (printed; run
pytest with ``-s`` to see it) for a reviewer to look at.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from service.config import Settings
from service.http.app import create_app
from service.spec.keys import Keys
from service.state.store import SyncStore
from tests.conftest import ADMIN_TOKEN, SECRET, LiveServer
from tests.console.conftest import signed
from tests.console.test_console_http import HOSTILE, RECENT, hostile_events
from tests.helpers import find
from tests.http.test_admin_replay import work

WIDTHS = (1280, 390)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEBOUNCE = "0.2s"


def population() -> list[dict]:
    """Customers of every cluster (traits and orders), and one profile merged from two."""
    events: list[dict] = []
    plans = [("hv", 6, 900, 0.05), ("gr", 5, 300, 0.2), ("ar", 4, 80, 0.7), ("nw", 3, 20, 0.3)]
    for prefix, n, ltv, churn in plans:
        for i in range(n):
            uid = f"{prefix}-{i}"
            events.append({"type": "identify", "userId": uid, "messageId": f"{uid}-id", "timestamp": RECENT,
                           "traits": {"email": f"{uid}@example.com", "ltv": ltv + 10 * i, "churn_risk": churn,
                                      "plan": "pro" if prefix == "hv" else "free"}})
            for k in range(1 + i % 3):
                events.append({"type": "track", "userId": uid, "event": "Order Completed",
                               "messageId": f"{uid}-o{k}", "timestamp": RECENT,
                               "context": {"channel": ["browser", "mobile"][(i + k) % 2]},
                               "properties": {"order_id": f"{uid}-o{k}", "revenue": 20 + 15 * k + i,
                                              "products": [{"category": ["books", "toys", "tech"][k % 3]}]}})
            for k in range(i % 3):  # email engagement: the email channel
                events.append({"type": "track", "userId": uid, "event": "Email Opened", "messageId": f"{uid}-e{k}",
                               "timestamp": RECENT})
    events += [  # two profiles, then an event that names both: merged into the older one
        {"type": "identify", "userId": "merged-user", "messageId": "mg-1", "timestamp": RECENT,
         "traits": {"plan": "pro"}},
        {"type": "identify", "anonymousId": "anon-merged", "messageId": "mg-2", "timestamp": RECENT,
         "traits": {"email": "Merged.Person@Example.com", "ltv": 120}},
        {"type": "track", "userId": "merged-user", "anonymousId": "anon-merged", "event": "Signed In",
         "messageId": "mg-3", "timestamp": RECENT, "context": {"channel": "mobile"}},
    ]
    return events + hostile_events()


@pytest.fixture
def stack(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[LiveServer]:
    monkeypatch.setenv("REDIS_URL", redis_url)
    settings = Settings(shared_secrets=(SECRET,), admin_token=ADMIN_TOKEN, refresh_debounce=0.2)
    with LiveServer(create_app(settings, redis_url, redis_url)) as server:
        yield server


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = tmp_path / "console-screenshots"
    folder.mkdir()
    print(f"\nconsole screenshots: {folder}")
    return folder


def screenshot(driver: Any, folder: Path, name: str) -> None:
    """The whole page at each width (a phone's 390 px, with touch, then a laptop's 1280 px)."""
    for width in WIDTHS:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": 800, "deviceScaleFactor": 1, "mobile": width < 600})
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": min(int(height), 6000), "deviceScaleFactor": 1, "mobile": width < 600})
        assert driver.execute_script("return document.documentElement.scrollWidth") <= width + 1, \
            f"{name} scrolls sideways at {width} px"
        driver.save_screenshot(str(folder / f"{name}-{width}.png"))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def arrive(driver: Any, url: str, seconds: float = 10) -> None:
    """Wait for a navigation (a form sent with Enter returns before the next page has loaded)."""
    deadline = time.monotonic() + seconds
    while driver.current_url != url or driver.execute_script("return document.readyState") != "complete":
        assert time.monotonic() < deadline, f"at {driver.current_url}, not {url}: {driver.page_source[:2000]}"
        time.sleep(0.05)


def navigate(driver: Any, act: Any, seconds: float = 15) -> None:
    """Do ``act`` (a click, Enter in a form) and wait until the next page has replaced this one and loaded: a
    click can return before the browser has even left the page, on a busy machine."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    act()
    WebDriverWait(driver, seconds).until(expected_conditions.staleness_of(old))
    WebDriverWait(driver, seconds).until(lambda d: d.execute_script("return document.readyState") == "complete")


def every_control_is_labelled(driver: Any) -> None:
    from selenium.webdriver.common.by import By

    for control in driver.find_elements(By.CSS_SELECTOR, "input:not([type=hidden]), select, button"):
        named = control.get_attribute("aria-label") or control.text.strip()
        if not named and control.get_attribute("id"):
            named = " ".join(label.text for label in driver.find_elements(
                By.CSS_SELECTOR, f"label[for='{control.get_attribute('id')}']"))
        assert named.strip(), f"an unlabelled control: {control.get_attribute('outerHTML')[:200]}"


def test_the_console_in_chromium(browser: Any, stack: LiveServer, r: redis.Redis, shots: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys as Key

    for event in population():
        body = orjson.dumps(event)
        assert httpx.post(f"{stack.url}/segment", content=body, headers=signed(body)).status_code == 200
    late = {"type": "identify", "userId": "late", "messageId": "dl-1", "timestamp": RECENT,
            "traits": {"email": "late@example.com", "plan": "enterprise"}}
    SyncStore(r, Settings()).dead_letters("default", [("Redis OOM (since fixed)", orjson.dumps(late))], "webhook")
    work(r, REFRESH_DEBOUNCE=DEBOUNCE)  # the refresh (clusters, KPI cards) and the persona sync (outbox)
    api = httpx.get(f"{stack.url}/api/clusters", headers=ADMIN).json()["clusters"]
    assert {c["cluster"] for c in api} == {"high_value", "growth", "at_risk", "new"}

    # log in, by keyboard: the login page first, whatever page was asked for
    browser.get(f"{stack.url}/console/clusters")
    assert browser.current_url.startswith(f"{stack.url}/console/login")
    screenshot(browser, shots, "login")
    field = browser.find_element(By.ID, "token")
    assert browser.switch_to.active_element == field  # focused on arrival
    navigate(browser, lambda: field.send_keys(ADMIN_TOKEN, Key.ENTER))
    arrive(browser, f"{stack.url}/console/clusters")
    assert ADMIN_TOKEN not in browser.page_source
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: no script reads the session

    # cluster cards: the figures of GET /api/clusters
    for doc in api:
        card = browser.find_element(By.CSS_SELECTOR, f"[data-cluster='{doc['cluster']}']")
        kpi = doc["kpi"]

        def shown(name: str, card: Any = card) -> str:
            return str(card.find_element(By.CSS_SELECTOR, f"[data-kpi='{name}']").text)

        assert shown("n_customers") == f"{kpi['n_customers']:,}"
        assert shown("avg_spend") == f"{kpi['avg_spend']:,.2f}"
        assert shown("median_spend") == f"{kpi['median_spend']:,.2f}"
        assert shown("avg_frequency") == f"{kpi['avg_frequency']:,.2f}"
        assert shown("share_of_revenue_pct") == f"{kpi['share_of_revenue_pct']:.1f} %"
        assert shown("top_categories") == (kpi["top_categories"] or "—")
        assert shown("insight") == kpi["insight"]
        assert card.find_element(By.CSS_SELECTOR, "[data-persona='state']").text  # outbox, without a Mavera key
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr[data-pattern] svg.share rect")) >= 2  # channel mixes
    every_control_is_labelled(browser)
    screenshot(browser, shots, "clusters")

    # overview: one click away, answers with the counters
    navigate(browser, lambda: browser.find_element(By.LINK_TEXT, "Overview").click())
    assert browser.find_element(By.ID, "profiles").text == f"{len(find_all_profiles(r)):,}"
    assert browser.find_element(By.ID, "dead-letters").text == "1"
    every_control_is_labelled(browser)
    screenshot(browser, shots, "overview")

    # a merged profile, found by its email (typed as a person would: mixed case)
    navigate(browser, lambda: browser.find_element(By.LINK_TEXT, "Profiles").click())
    box = browser.find_element(By.ID, "lookup-id")
    navigate(browser, lambda: box.send_keys("email:Merged.Person@Example.com", Key.ENTER))
    merged = find(r, "email", "merged.person@example.com")
    assert merged is not None and merged.merged_from
    assert browser.find_element(By.ID, "profile-id").text == merged.id
    assert set(merged.merged_from) <= set(browser.find_element(By.ID, "merged-from").text.split())
    identifiers = browser.find_element(By.ID, "identifiers").text
    assert "merged-user" in identifiers and "anon-merged" in identifiers
    every_control_is_labelled(browser)
    screenshot(browser, shots, "profile")

    # a script-injection attempt, rendered as text and never run
    box = browser.find_element(By.ID, "lookup-id")
    box.clear()
    navigate(browser, lambda: box.send_keys("email:mallory@example.com", Key.ENTER))
    cell = browser.find_element(By.CSS_SELECTOR, "tr[data-trait='nickname'] td.value")
    assert cell.text == HOSTILE
    assert browser.find_element(By.CSS_SELECTOR, "tr[data-trait='homepage'] td.value").text == "javascript:alert(2)"
    assert "<img src=x onerror=alert(3)>" in browser.find_element(By.ID, "events").text
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 (reading it is the check)
    for link in browser.find_elements(By.CSS_SELECTOR, "a[href]"):
        assert not link.get_attribute("href").lower().startswith("javascript:")
    screenshot(browser, shots, "profile-hostile")

    # replay a dead letter with one click; a worker applies it; it is gone and on the profile
    navigate(browser, lambda: browser.find_element(By.LINK_TEXT, "Operations").click())
    [entry] = [e.decode() for e, _ in r.xrange(Keys("default").dead_letters)]
    every_control_is_labelled(browser)
    screenshot(browser, shots, "operations")
    replay = browser.find_element(By.CSS_SELECTOR, f"tr[data-entry='{entry}'] button[aria-label='Replay dead "
                                                   f"letter {entry}']")
    navigate(browser, replay.click)
    assert f"Replay of dead letter {entry} queued" in browser.find_element(By.ID, "message").text
    work(r, REFRESH_DEBOUNCE=DEBOUNCE)
    navigate(browser, browser.refresh)
    assert "No dead letters" in browser.find_element(By.ID, "dead-letters").text
    assert "applied 1" in browser.find_element(By.ID, "jobs").text
    screenshot(browser, shots, "operations-after-replay")
    navigate(browser, lambda: browser.find_element(By.LINK_TEXT, "Profiles").click())
    late_box = browser.find_element(By.ID, "lookup-id")
    navigate(browser, lambda: late_box.send_keys("email:late@example.com", Key.ENTER))
    assert browser.find_element(By.CSS_SELECTOR, "tr[data-trait='plan'] td.value").text == "enterprise"

    # the first Tab reaches the skip link; logging out ends the session
    browser.find_element(By.TAG_NAME, "body").send_keys(Key.TAB)
    assert browser.switch_to.active_element.text == "Skip to content"
    navigate(browser, browser.find_element(By.XPATH, "//button[text()='Log out']").click)
    assert browser.current_url.startswith(f"{stack.url}/console/login")
    browser.get(f"{stack.url}/console")
    assert browser.current_url.startswith(f"{stack.url}/console/login")


def find_all_profiles(r: redis.Redis) -> list[str]:
    """Live profiles as the last refresh counted them (what the overview shows)."""
    return [k.decode() for k in r.hkeys(Keys("default").contributions)]
