"""The web page at `/`, in a real headless Chromium (Debian's `chromium`, driven by Playwright): a typed
request is routed, the answering domain is shown, and the text streams in."""
import os
import shutil

import pytest

from tests.test_serve_app import API_KEY, app, keyed_app, live_server  # noqa: F401  (the served two-domain model)

CHROMIUM = os.environ.get("EXPANDLM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; "
                                "`make test` installs it when run as root)")


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:  # one Playwright a process: a second inside it is refused
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def page(app, browser):  # noqa: F811
    with live_server(app) as url:
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.goto(url + "/")
        yield page
        page.close()


def test_a_typed_request_is_routed_and_its_text_streams_in(page, tmp_path):
    page.fill("#request", "give me a recipe for banana bread")
    page.fill("#max_tokens", "60")
    page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
    assert page.text_content("#domain") == "recipes"
    assert "% sure" in page.text_content("#confidence")
    text = page.text_content("#output")
    assert text.startswith("Banana Bread") and len(text) > len("Banana Bread")
    page.screenshot(path=os.environ.get("EXPANDLM_SCREENSHOT", str(tmp_path / "page.png")), full_page=True)


def test_a_chosen_domain_answers_without_routing(page):
    page.select_option("#model", "expand_paths/stories")
    page.fill("#request", "a story about a dog")
    page.fill("#max_tokens", "60")  # the nano model's context is 128 tokens
    page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
    assert page.text_content("#domain") == "expand_paths/stories"
    assert page.text_content("#output").startswith("Once upon a time, there was a dog.")


def test_behind_an_api_key_the_page_asks_for_it_and_sends_it(keyed_app, browser):  # noqa: F811
    with live_server(keyed_app) as url:
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('status').textContent.includes('needs an API key')")
        assert page.is_visible("#api_key") and page.locator("#model option").count() == 1
        page.fill("#api_key", "wrong")
        page.dispatch_event("#api_key", "change")
        page.wait_for_function("document.getElementById('status').textContent.includes('not this server')")
        page.fill("#api_key", API_KEY)
        page.dispatch_event("#api_key", "change")
        page.wait_for_function("document.querySelectorAll('#model option').length > 1")
        page.fill("#request", "a story about a dog")
        page.fill("#max_tokens", "20")
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60_000)
        assert page.text_content("#output")
        page.close()


def test_without_an_api_key_the_page_shows_no_key_field(page):
    assert not page.is_visible("#api_key")
