"""The funnel explorer page in a real headless Chromium (Debian's ``/usr/bin/chromium``, driven by
Playwright).

A real server over the small trained cascade serves ``/explorer``; the test types a user id, clicks Explore
and checks that the page shows every stage with the right counts, the served list the JSON endpoint returns,
and a bad user id's 422 message. Nothing may be fetched from anywhere but the server (the page is self-contained).

Skipped, with the reason, without the browser (``apt-get install chromium``; ``make test`` installs it when
run as root) or without the ``playwright`` package (the ``test`` extra). Playwright never downloads a browser
here: it launches ``FUNNELREC_CHROMIUM`` (default ``/usr/bin/chromium``).

``FUNNELREC_WRITE_SCREENSHOT=1`` also saves the page as ``docs/explorer.png`` (the screenshot in
docs/serving.md); tests never write to docs/ otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from cascade_fixtures import cascade_env  # noqa: F401

from funnelrec.serving.app import ServiceConfig, create_app
from funnelrec.serving.cascade_backend import CascadeBackend
from funnelrec.serving.server import background_server

CHROMIUM = os.environ.get("FUNNELREC_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; `make test` installs it when "
                f"run as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright package is missing (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def site(cascade_env, tmp_path_factory):
    backend = CascadeBackend(cascade_env.parts.cascade({"name": "test-bundle"}))
    cfg = ServiceConfig(log_dir=str(tmp_path_factory.mktemp("explorer_log")), fsync=False)
    with background_server(create_app(backend, cfg)) as url:
        yield url


@pytest.fixture(scope="module")
def page(site):
    """A Chromium page on ``/explorer``; requests to any other host are aborted and recorded."""
    host = urlparse(site).netloc
    foreign: list[str] = []
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 900})
            pg.set_default_timeout(30_000)

            def gate(route):
                url = route.request.url
                if urlparse(url).netloc == host or url.startswith("data:"):
                    return route.continue_()
                foreign.append(url)
                return route.abort()

            pg.route("**/*", gate)
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.goto(f"{site}/explorer")
            pg.foreign, pg.js_errors = foreign, errors
            yield pg
        finally:
            browser.close()


def _explore(pg, user: str, time_ms: str = "", tab: str = "") -> str:
    pg.fill("#user-id", user)
    pg.fill("#time-ms", time_ms)
    pg.fill("#tab", tab)
    pg.click("#explore")
    pg.wait_for_function("document.body.dataset.state === 'ready' || document.body.dataset.state === 'error'")
    return pg.evaluate("document.body.dataset.state")


def test_the_page_shows_every_stage_and_the_served_list(cascade_env, site, page):
    r = cascade_env.requests.row(0, named=True)
    body = {"user_id": r["user_id"], "time_ms": r["time_ms"], "context": {"tab": r["tab"]}}
    expected = httpx.post(f"{site}/explore", json=body, timeout=30).json()
    served = httpx.post(f"{site}/recommend", json=body, timeout=30).json()
    assert _explore(page, str(r["user_id"]), str(r["time_ms"]), str(r["tab"])) == "ready"

    # funnel summary: every stage with its candidates
    for f in expected["funnel"]:
        row = page.locator(f'#funnel .funnel-row[data-stage="{f["stage"]}"]')
        assert row.locator(".size").inner_text() == str(f["size"]) == row.get_attribute("data-size")
        assert served["sizes"][f["stage"]] == f["size"]
    # one table per stage: its size in the header, one row per listed candidate, served rows highlighted
    for st in expected["stages"]:
        sec = page.locator(f"#stage-{st['name']}")
        assert sec.get_attribute("data-size") == str(st["size"])
        assert sec.locator(".meta").inner_text().startswith(f"{st['size']} candidates")
        assert sec.locator("tbody tr").count() == st["shown"] == len(st["rows"])
        if st["name"] != "rerank":
            assert sec.locator("tbody tr.served").count() == sum(1 for x in st["rows"] if x["final_rank"])
    # the final list: the JSON endpoint's items, which are /recommend's
    ids = [int(x) for x in page.locator("#stage-rerank tbody td.id").all_inner_texts()]
    final = [x["item_id"] for x in expected["stages"][-1]["rows"]]
    assert ids == final == [x["item_id"] for x in served["items"]]
    assert page.locator("#history-table tbody tr").count() == expected["history"]["length"] > 0
    tags = page.locator("#stage-rerank thead th").all_inner_texts()
    assert {"duration s", "tag", "author"} <= set(tags)
    # "show all" reveals the rows beyond the preview
    retrieval = page.locator("#stage-retrieval")
    hidden = retrieval.locator("tbody tr:not(:visible)").count()
    assert hidden > 0
    retrieval.locator("button.toggle").click()
    assert retrieval.locator("tbody tr:not(:visible)").count() == 0
    if os.environ.get("FUNNELREC_WRITE_SCREENSHOT") == "1":
        retrieval.locator("button.toggle").click()  # back to the preview: a shorter page
        page.mouse.move(0, 0)  # no hover highlight in the picture
        page.screenshot(path=str(REPO / "docs" / "explorer.png"), full_page=True)
    assert page.foreign == [] and page.js_errors == []


@pytest.mark.parametrize("user, message", [("-3", "greater than or equal to 0"), ("abc", "valid integer")])
def test_a_bad_user_id_shows_the_422_message(site, page, user, message):
    sent = int(user) if user.lstrip("-").isdigit() else user
    expected = httpx.post(f"{site}/explore", json={"user_id": sent})
    assert expected.status_code == 422
    assert _explore(page, user) == "error"
    text = page.locator("#error").inner_text()
    assert "422" in text and expected.json()["message"] in text and message in text and "user_id" in text
    assert not page.locator("#results").is_visible()
    assert page.foreign == [] and page.js_errors == []
