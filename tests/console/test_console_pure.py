"""The console's pure parts: the session cookie and CSRF tokens, chart geometry, Markdown sanitising."""

from __future__ import annotations

import pytest

from service.http import session
from service.spec import charts, markdown

KEY = session.session_key("admin-token")


def test_a_session_verifies_until_it_expires_and_not_when_altered() -> None:
    cookie = session.issue(KEY, 1000, ttl=60)
    found = session.verify(KEY, cookie, 1059)
    assert found is not None and found.expires == 1060
    assert session.verify(KEY, cookie, 1060) is None  # expired
    assert session.verify(session.session_key("another-token"), cookie, 1000) is None  # token rotated
    expires, nonce, sig = cookie.split(".")
    assert session.verify(KEY, f"{int(expires) + 3600}.{nonce}.{sig}", 1000) is None  # expiry pushed back
    assert session.verify(KEY, f"{expires}.{nonce}x.{sig}", 1000) is None
    for junk in (None, "", "x", "..", "1.2.3", "a" * 500):
        assert session.verify(KEY, junk, 1000) is None
    assert "admin-token" not in cookie


def test_csrf_tokens_are_bound_to_their_session() -> None:
    one = session.verify(KEY, session.issue(KEY, 1000), 1000)
    two = session.verify(KEY, session.issue(KEY, 1000), 1000)
    assert one is not None and two is not None and one.nonce != two.nonce
    token = session.csrf_token(KEY, one)
    assert session.csrf_ok(KEY, one, token)
    assert not session.csrf_ok(KEY, two, token)
    assert not session.csrf_ok(KEY, one, None) and not session.csrf_ok(KEY, one, "") \
        and not session.csrf_ok(KEY, one, token + "x")
    assert not session.csrf_ok(session.session_key("another-token"), one, token)


@pytest.mark.parametrize("value,ceiling", [(0, 1), (0.3, 0.5), (1, 1), (1.01, 2), (7, 10), (12, 20), (4900, 5000)])
def test_nice_ceilings(value: float, ceiling: float) -> None:
    assert charts.nice_ceiling(value) == pytest.approx(ceiling)


def test_stacked_bars_stack_each_column_and_scale_to_the_tallest() -> None:
    columns = [{"accepted": 120, "rejected": 60}, {}, {"accepted": 300}]
    chart = charts.stacked_bars(columns, ("accepted", "rejected"), ["a", "b", "c"], width=300, height=130,
                                scale=60, unit="/s")
    assert chart.peak == 5.0  # 300 a minute is 5/s
    bottom = chart.plot_bottom
    first = [b for b in chart.bars if b.title.startswith("a:")]
    assert [b.series for b in first] == ["accepted", "rejected"]
    assert first[0].y + first[0].height == pytest.approx(bottom)  # the first series sits on the axis
    assert first[1].y + first[1].height == pytest.approx(first[0].y)  # the next on top of it
    tallest = [b for b in chart.bars if b.title.startswith("c:")][0]
    assert tallest.y == pytest.approx(chart.y_ticks[-1].at) and tallest.title == "c: 5/s accepted"
    assert first[0].height == pytest.approx(tallest.height * 2 / 5)
    assert not [b for b in chart.bars if b.title.startswith("b:")]
    assert [t.label for t in chart.y_ticks] == ["0", "1.25", "2.5", "3.75", "5"]


def test_shares_make_a_hundred_percent_in_order() -> None:
    parts = charts.shares({"web": 3, "mobile": 0, "email": 1}, ("web", "mobile", "email"))
    assert [(p.series, p.start_pct, p.width_pct, p.share_pct) for p in parts] == [
        ("web", 0.0, 75.0, 75.0), ("email", 75.0, 25.0, 25.0)]
    assert charts.shares({"web": 0}, ("web",)) == ()


def test_markdown_keeps_formatting_and_drops_what_could_run() -> None:
    html = markdown.to_html("## Mix\n\n**Web** leads. <script>alert(1)</script> <img src=x onerror=alert(1)>\n\n"
                            "[ok](https://mavera.io) [bad](javascript:alert(1)) [data](data:text/html,x) "
                            "![pixel](https://tracker.example/p.gif)\n\n- one\n- two")
    assert "<h2>Mix</h2>" in html and "<strong>Web</strong>" in html and "<li>one</li>" in html
    assert "<script" not in html and "<img" not in html and "&lt;script&gt;" in html
    assert '<a href="https://mavera.io">ok</a>' in html
    assert "javascript:" not in html.replace("[bad](javascript:alert(1))", "") and 'href="data:' not in html
