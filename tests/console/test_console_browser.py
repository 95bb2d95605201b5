"""The console in a real headless Chromium against a real server with API keys (see conftest)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from insession.query import QueryError

from .conftest import Console

expect = pytest.importorskip("playwright.sync_api", reason="Playwright is missing: run scripts/setup_browser.sh").expect

PAGES = {  # page -> text its main content shows once its data arrived
    "overview": "log offset",
    "shopper": "Ranking",
    "features": "CREATE FEATURE top_categories_15d",
    "query": "lane: analytics",
    "models": "val_ndcg10",
    "cluster": "No replicated log is configured",
}


def traffic(console: Console, seconds: float) -> None:
    """Events and rank requests for `seconds` from shoppers t0..t8 (no other test looks at them)."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
        event = {"user_id": f"t{n % 9}", "item_id": f"i{n * 7 % 48}", "action": "view", "ts": int(time.time() * 1000)}
        assert console.post("/v1/events", [event], key="loader").status_code == 200
        assert console.post("/v1/rank", {"user_id": f"t{n % 9}", "k": 10}, key="viewer").status_code == 200
        time.sleep(0.02)


def login(page: Any, console: Console, path: str, key: str = "admin") -> None:
    page.goto(console.url + path)
    page.get_by_label("API key", exact=True).fill(console.keys[key])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_selector("#main", state="visible")


def test_every_page_loads_from_the_server_alone_without_console_errors(
    console: Console, page: Any, screenshots: Path
) -> None:
    """Each page shows its data with an admin key; no console error; no request leaves the server (no CDN)."""
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    login(page, console, "/console/overview")
    for name, text in PAGES.items():
        path = f"/console/{name}" + ("?user=u0" if name == "shopper" else "")
        page.goto(console.url + path)
        if name == "query":
            page.get_by_role("button", name="Run").click()
        page.get_by_text(text).first.wait_for(timeout=15_000)
        if name == "overview":
            expect(page.locator("#t-mem")).not_to_have_text("–")
            traffic(console, 4.0)  # a few points on the charts
            time.sleep(1.5)
        if name == "models":
            page.wait_for_selector("#curve-card", state="visible")
        page.screenshot(path=str(screenshots / f"console_{name}.png"), full_page=True)
    assert page.errors == []
    foreign = [u for u in requests if not u.startswith((console.url, "data:", "blob:"))]
    assert foreign == []
    assert any(u.endswith("/console/static/uPlot.iife.min.js") for u in requests)


def test_the_overview_follows_the_server_live(console: Console, page: Any) -> None:
    """Rank requests and events made through the API show on the open overview without a reload."""
    login(page, console, "/console/overview", key="viewer")
    expect(page.locator("#t-mem")).not_to_have_text("–")
    ranks = int(page.locator("#t-ranks").inner_text().replace(",", ""))
    for _ in range(3):
        assert console.post("/v1/rank", {"user_id": "t1", "k": 5}, key="viewer").status_code == 200
    expect(page.locator("#t-ranks")).to_have_text(f"{ranks + 3:,}", timeout=5_000)
    assert console.post("/v1/events", [{"user_id": "t1", "item_id": "i1", "action": "view",
                                        "ts": int(time.time() * 1000)}], key="loader").status_code == 200
    expect(page.locator("#t-ingest")).to_have_text(re.compile(r"^(?!0$)[\d.,]+$"), timeout=5_000)  # > 0 events/s


def test_without_a_key_the_pages_ask_for_one(console: Console, page: Any) -> None:
    page.goto(console.url + "/console/shopper?user=u0")
    page.get_by_role("heading", name="API key required").wait_for()
    assert page.locator("#main").is_hidden()
    page.get_by_label("API key", exact=True).fill("isk_not-a-key")
    page.get_by_role("button", name="Log in").click()
    page.get_by_text("That key was not accepted.").wait_for()
    assert page.locator("#main").is_hidden()
    page.get_by_label("API key", exact=True).fill(console.keys["viewer"])
    page.get_by_role("button", name="Log in").click()
    page.locator("#ranking tbody tr[data-item]").first.wait_for()
    assert "viewer (serve)" in page.locator("#who").inner_text()


def test_an_ingest_only_key_is_told_it_cannot_read(console: Console, page: Any) -> None:
    login(page, console, "/console/overview", key="loader")
    page.get_by_text("the console needs serve, analytics or admin").wait_for()


def test_typing_a_user_id_shows_the_ranking_with_its_reasons(console: Console, page: Any) -> None:
    login(page, console, "/console/shopper", key="viewer")
    page.get_by_label("User id").fill("u0")
    page.get_by_role("button", name="Show").click()
    rows = page.locator("#ranking tbody tr[data-item]")
    rows.first.wait_for()
    assert rows.count() == 10
    assert "model v2" in page.locator("#rank-meta").inner_text()
    assert page.locator("#rank-fallback").is_hidden()
    first = rows.first.locator("td")
    gate = float(first.nth(3).inner_text())  # cells after the item header: #, category, score, gate, ...
    assert 0.0 < gate < 1.0
    assert first.nth(4).locator("li").count() >= 1  # attended history events
    assert first.nth(5).locator("li").count() >= 1  # attended session events
    first.nth(6).locator("summary").click()
    assert "item_count_28d" in first.nth(6).inner_text()  # the counters the head read
    assert page.locator("#session li[data-item]").count() == 4
    names = page.locator("#features tbody th").all_inner_texts()
    assert {"history_seq", "session_seq", "top_categories_15d", "session_length"} <= {n.split(" ")[0] for n in names}


def test_an_event_posted_through_the_api_shows_on_the_open_shopper_page_within_a_second(
    console: Console, page: Any
) -> None:
    login(page, console, "/console/shopper?user=u3", key="viewer")
    page.locator("#ranking tbody tr").first.wait_for()
    before = page.locator("#session li[data-item]").count()
    event = {"user_id": "u3", "item_id": "i30", "action": "add_to_cart", "ts": int(time.time() * 1000)}
    start = time.monotonic()
    assert console.post("/v1/events", event, key="loader").status_code == 200
    page.locator("#session li[data-item='i30']").first.wait_for(timeout=1_000)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0
    assert page.locator("#session li[data-item]").count() == before + 1
    assert page.locator("#session li").first.get_attribute("data-item") == "i30"  # newest first


def test_a_query_runs_explains_and_shows_an_error_with_its_position(console: Console, page: Any) -> None:
    login(page, console, "/console/query", key="admin")
    sql = page.get_by_label("SQL")
    sql.fill("SELECT user_id, count(*) AS n FROM events WHERE user_id = :user GROUP BY user_id")
    page.get_by_label("Parameters (JSON object)").fill('{"user": "u1"}')
    page.get_by_role("button", name="Run").click()
    page.get_by_text("lane: analytics").wait_for()
    assert page.locator("#result tbody tr").all_inner_texts() == ["u1\t12"]
    page.get_by_role("button", name="Explain").click()
    page.locator("#result thead th", has_text="plan").wait_for()
    assert "analytics" in page.locator("#result tbody").inner_text()
    sql.fill("SELECT user_id\nFROM events WHERE nope = 1")
    page.get_by_label("Parameters (JSON object)").fill("{}")
    page.get_by_role("button", name="Run").click()
    error = page.locator("#query-error")
    error.wait_for()
    text = error.inner_text()
    assert "400" in text and "nope" in text
    assert "line 2, column" in text and "^" in text


def test_a_full_analytics_queue_gets_a_clear_message(console: Console, page: Any) -> None:
    """The server's 429 body (as the analytics lane writes it) is shown as a retry message."""
    refused = QueryError("the analytics lane is full (1 running, 0 waiting); retry in 2s", 429,
                         code="overloaded", retry_after_s=2)
    login(page, console, "/console/query", key="admin")
    page.route("**/v1/query", lambda route: route.fulfill(status=429, headers={"Retry-After": "2"},
                                                          json=refused.to_dict()))
    page.get_by_role("button", name="Run").click()
    page.get_by_text("The analytics lane is busy (429: its queue is full). Try again in 2 s.").wait_for()


def test_a_serve_key_cannot_reload_a_model(console: Console, page: Any) -> None:
    login(page, console, "/console/models", key="viewer")
    load = page.locator("tr[data-version='v1'] button.reload")
    load.wait_for()
    assert load.is_disabled()
    page.get_by_text("Reloading a model needs an admin key.").wait_for()
    status = page.evaluate(
        """async () => (await fetch('/v1/admin/reload', {method: 'POST', body: '{"version": "v1"}',
             headers: {'X-API-Key': sessionStorage.getItem('insession.apiKey')}})).status"""
    )
    assert status == 403
    model = httpx.get(console.url + "/v1/admin/model", headers={"X-API-Key": console.keys["admin"]}).json()
    assert model["version"] == "v2"


def test_an_admin_reloads_a_model_from_the_models_page(console: Console, page: Any) -> None:
    login(page, console, "/console/models", key="admin")
    try:
        page.locator("tr[data-version='v1'] button.reload").click()
        page.get_by_text("now serving v1").wait_for(timeout=30_000)
        expect(page.locator("tr[data-version='v1'] td").first).to_have_text("serving")
        model = httpx.get(console.url + "/v1/admin/model", headers={"X-API-Key": console.keys["admin"]}).json()
        assert model["version"] == "v1"
    finally:
        assert console.post("/v1/admin/reload", {"version": "v2"}).status_code == 200


def test_every_page_fits_a_phone(console: Console, browser: Any, screenshots: Path) -> None:
    """At 390 px no page scrolls sideways (wide tables scroll inside their card)."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    try:
        page = context.new_page()
        login(page, console, "/console/shopper?user=u0", key="viewer")
        page.locator("#ranking tbody tr[data-item]").first.wait_for()
        page.screenshot(path=str(screenshots / "console_shopper_phone.png"), full_page=False)
        wide = {}
        for name in PAGES:
            page.goto(console.url + f"/console/{name}")
            page.locator("#main").wait_for()
            time.sleep(1.5)  # the data arrived and was laid out (the live pages never go network-idle)
            wide[name] = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert wide == dict.fromkeys(PAGES, 0)
    finally:
        context.close()


def test_the_controls_are_reachable_with_the_keyboard(console: Console, page: Any) -> None:
    """Tab reaches the page links and the labelled user-id field; Enter submits it."""
    login(page, console, "/console/shopper", key="viewer")
    page.goto(console.url + "/console/shopper")  # the key stays in the tab; Tab starts from the top
    page.locator("#main").wait_for()
    focused = []
    while len(focused) < 15 and (not focused or focused[-1] != "user-id"):
        page.keyboard.press("Tab")
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
    assert {"Overview", "Models", "user-id"} <= set(focused)
    page.keyboard.type("u0")
    page.keyboard.press("Enter")
    page.locator("#ranking tbody tr[data-item]").first.wait_for()
