"""Fixtures of the recipes' tests: a headless Chromium driven by Playwright, for the pages."""

import pytest
from servers import CHROMIUM_ARGS, find_chromium

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None


@pytest.fixture(scope="module")
def browser():
    """Skips, saying why, when Playwright or a Chromium executable is missing."""
    if sync_playwright is None:
        pytest.skip("no browser: Playwright for Python is not installed (pip install playwright)")
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no browser: install Debian's chromium package or set CHROMIUM_PATH")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, timeout=60_000)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context()
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
