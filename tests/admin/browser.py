"""Headless Chromium for the dashboard tests: the Debian browser driven by Playwright.

Playwright's own browser download is never used (no ``playwright install``): the system
``chromium`` is launched through ``executable_path`` with flags that keep it off the network
(no background services, no QUIC, no component updates) so that the only traffic is to the
dashboard on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

#: Screenshots and other artefacts a person may want to look at after a run (gitignored).
TEST_OUTPUT = Path(__file__).resolve().parents[2] / "test-output" / "admin"


def chromium_path() -> str:
    """The system Chromium; the test fails (not skips) without it: ``make test`` installs it."""
    path = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("Debian chromium is not installed (make test installs it: apt chromium)")
    return path


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A fresh page in a headless system Chromium; the browser is closed afterwards."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def image_sizes(page: Page, selector: str) -> list[tuple[int, int]]:
    """(naturalWidth, naturalHeight) of every <img> matching ``selector``, once all loaded.

    Waits until each image finished loading (``complete``); a broken image is complete with
    natural size 0, so a failed render shows up as (0, 0) instead of a hang.
    """
    page.wait_for_function(
        "sel => Array.from(document.querySelectorAll(sel)).every(i => i.complete)", arg=selector
    )
    return [
        (int(w), int(h))
        for w, h in page.eval_on_selector_all(
            selector, "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])"
        )
    ]
