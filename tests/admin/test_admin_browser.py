"""The dashboard in a real headless Chromium, on a node that really received and scored a series.

The queue page lists the series, a click opens its page, the log p(x) plot and the thumbnails
are real rendered images (the right number of them), a review action updates the page, the
models page's counts and ``/metrics``; screenshots go to ``test-output/admin/``.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page

from tests.admin.browser import TEST_OUTPUT, chromium_page, image_sizes
from tests.admin.web import ScoredNode, http

pytestmark = pytest.mark.e2e


def _login(page: Page, node: ScoredNode) -> None:
    page.goto(f"{node.base_url}/queue")
    # The token is configured: the browser first gets the login form (HTTP 401).
    page.fill("input[name=name]", "dr-bob")
    page.fill("input[name=token]", node.token)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/queue$"))


def test_queue_series_page_images_and_review_in_chromium(scored_node: ScoredNode) -> None:
    TEST_OUTPUT.mkdir(parents=True, exist_ok=True)
    with chromium_page() as page:
        _login(page, scored_node)

        row = page.locator(f"tr.series-row[data-series-uid='{scored_node.series_uid}']")
        assert row.count() == 1
        assert "done" in row.inner_text()
        done = page.locator("#status-counts a[data-status=done] b").inner_text()
        assert done == str(len(scored_node.sent_series))
        page.screenshot(path=str(TEST_OUTPUT / "queue.png"), full_page=True)

        # The queue refreshes itself: a mark left in the page's window is gone once the page
        # has reloaded on its own (no script of ours navigates), with the filters kept.
        page.goto(f"{scored_node.base_url}/queue?status=done&refresh=2")
        page.evaluate("window.__beforeRefresh = true")
        page.wait_for_function("window.__beforeRefresh === undefined", timeout=15_000)
        page.wait_for_load_state()
        assert page.url.endswith("/queue?status=done&refresh=2")
        row = page.locator(f"tr.series-row[data-series-uid='{scored_node.series_uid}']")
        assert row.count() == 1

        row.locator("td.uid a").click()
        page.wait_for_url(re.compile(rf".*/series/{re.escape(scored_node.series_uid)}$"))

        plot = image_sizes(page, "#score-plot")
        assert plot == [(800, 320)]
        flagged = image_sizes(page, "img.thumb-flagged")
        normal = image_sizes(page, "img.thumb-normal")
        assert len(flagged) == min(scored_node.flagged, 12)
        assert len(normal) == min(scored_node.normal, 4)
        assert all(w > 0 and h > 0 for w, h in flagged + normal)

        # Review: the tiny test model's verdicts mean little, so the reviewer judges what it
        # said; a flagged series can be called a false alarm, a normal one a missed artifact.
        action, label = ("false_alarm", "false alarm") if scored_node.abnormal else (
            "missed", "missed artifact")
        page.fill("#note", "reviewed in the browser test")
        page.click(f"#action-{action}")
        page.wait_for_selector(f"tr.action-row[data-action={action}]")
        logged = page.locator("tr.action-row").first.inner_text()
        assert "dr-bob" in logged and label in logged
        assert "reviewed in the browser test" in logged
        # The page after the action is complete again: plot and thumbnails reloaded.
        assert image_sizes(page, "#score-plot") == [(800, 320)]
        assert len(image_sizes(page, "img.thumb")) == len(flagged) + len(normal)
        page.screenshot(path=str(TEST_OUTPUT / "series.png"), full_page=True)

        page.click("#nav-models")
        stat = page.locator(f"tr.model-stat[data-model='{scored_node.model}']")
        expected = "1" if scored_node.abnormal else "0"
        missed = "0" if scored_node.abnormal else "1"
        assert stat.locator("td.false-alarms").inner_text() == expected
        assert stat.locator("td.missed").inner_text() == missed
        page.screenshot(path=str(TEST_OUTPUT / "models.png"), full_page=True)

        page.click("#nav-deliveries")
        outbox = page.locator("#outbox tbody").inner_text()
        # One SR per series (and a KOS where flagged), each sent to the Orthanc PACS.
        assert outbox.count("SR") >= len(scored_node.sent_series) and "sent" in outbox
        page.screenshot(path=str(TEST_OUTPUT / "deliveries.png"), full_page=True)

        page.click("#nav-associations")
        assoc = page.locator("#associations tbody").inner_text()
        assert assoc.count("SCANNER1") == len(scored_node.sent_series) and "released" in assoc
        page.screenshot(path=str(TEST_OUTPUT / "associations.png"), full_page=True)

        page.click("#nav-senders")
        # One calling AE, two scanners: the synthetic series names no station, the real
        # Siemens series its own (Station Name MRC35389, a TrioTim).
        synthetic = page.locator("tr.sender[data-aet='SCANNER1'][data-station='']")
        siemens = page.locator("tr.sender[data-aet='SCANNER1'][data-station='MRC35389']")
        assert siemens.locator("td.scanner").inner_text() == "SIEMENS TrioTim"
        assert len(scored_node.sent_series) == 2
        assert [row.locator("td.scored").inner_text() for row in (synthetic, siemens)] == [
            "1", "1"]
        assert synthetic.locator("td.false-alarms").inner_text() == expected
        page.screenshot(path=str(TEST_OUTPUT / "senders.png"), full_page=True)

    assert (TEST_OUTPUT / "series.png").stat().st_size > 10_000
    metrics = http(f"{scored_node.base_url}/metrics",
                   headers={"Authorization": f"Bearer {scored_node.token}"}).text
    assert f'vaenode_false_alarms_total{{model="{scored_node.model}"}} {expected}.0' in metrics
    assert f'vaenode_missed_total{{model="{scored_node.model}"}} {missed}.0' in metrics
