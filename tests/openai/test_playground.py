"""The playground page in headless Debian Chromium (Playwright, no downloaded browser)."""
import tempfile

import pytest
from playwright.sync_api import expect, sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def page(base_url):
    with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
        ctx = p.chromium.launch_persistent_context(
            profile, executable_path="/usr/bin/chromium", headless=True, args=ARGS,
            viewport={"width": 1280, "height": 900})
        pg = ctx.new_page()
        outside = []
        pg.on("request", lambda r: outside.append(r.url) if not (r.url.startswith(base_url) or r.url.startswith("data:")) else None)
        pg.goto(base_url + "/")
        yield pg
        assert not outside, f"the page fetched from elsewhere: {outside}"
        ctx.close()


def test_chat_streams_an_answer(page, api_key, fixture_dir, out_dir):
    page.get_by_label("API key").fill(api_key)
    page.get_by_label("API key").press("Tab")
    expect(page.locator("#model")).to_contain_text("Model:", timeout=30_000)
    page.get_by_label("Image (PNG or JPEG, optional)").set_input_files(str(fixture_dir / "square.png"))
    page.get_by_label("Question").fill("What is in this picture?")
    page.get_by_label("Max tokens").fill("24")
    page.get_by_role("button", name="Ask").click()
    expect(page.locator("#chat-status")).to_contain_text("Done", timeout=60_000)
    turns = page.locator("#thread > li")
    expect(turns).to_have_count(1)
    answer = turns.nth(0).locator(".a").inner_text()
    assert answer.strip(), "a streamed answer appeared"
    assert page.evaluate("sessionStorage.getItem('janus-api-key')") == api_key
    # A follow-up continues the conversation: the server answers the earlier turn from its
    # prefix cache, and the turn shows its time to first token and cached tokens.
    page.get_by_label("Question (follow-ups continue the conversation)").fill("And what colours are in it?")
    page.get_by_role("button", name="Ask").click()
    expect(turns).to_have_count(2)
    expect(turns.nth(1).locator(".meta")).to_contain_text("cached", timeout=60_000)
    first, second = (turns.nth(i).locator(".meta") for i in range(2))
    assert int(second.get_attribute("data-prompt")) > int(first.get_attribute("data-prompt")), "turn 2 resends turn 1"
    assert int(second.get_attribute("data-cached")) >= int(first.get_attribute("data-prompt")) - 1, "turn 1 came from the cache"
    assert "first token" in second.inner_text()
    assert turns.nth(1).locator(".q img").count() == 0, "the image belongs to turn 1"
    page.screenshot(path=str(out_dir / "playground-chat.png"), full_page=True)
    page.get_by_role("button", name="New conversation").click()
    expect(turns).to_have_count(0)


def test_generation_shows_previews_then_images(page, out_dir):
    # Count previews as they are shown (they are replaced by the final images).
    page.evaluate("""() => {
        window.__previews = 0;
        new MutationObserver((ms) => { for (const m of ms) {
            if (m.target.tagName === 'IMG' && m.target.classList.contains('preview') && m.attributeName === 'src') window.__previews++;
        }}).observe(document.getElementById('images'), {subtree: true, attributes: true});
    }""")
    page.get_by_label("Prompt").fill("a red apple on a wooden table")
    page.get_by_label("Number of images").fill("2")
    page.get_by_label("Seed").fill("7")
    page.get_by_label("CFG weight").fill("5")
    page.get_by_role("button", name="Generate").click()
    try:
        page.wait_for_selector("#images img.preview", timeout=60_000)
        page.screenshot(path=str(out_dir / "playground-preview.png"), full_page=True)
    except Exception:
        pass  # the tiny model may finish between two polls; the counter below still checks
    expect(page.locator("#gen-status")).to_contain_text("Done: 2 images", timeout=120_000)
    assert page.evaluate("window.__previews") >= 2, "previews were shown before the images"
    finals = page.locator("#images img.final")
    expect(finals).to_have_count(2)
    sizes = page.evaluate("Array.from(document.querySelectorAll('#images img.final')).map(i => [i.naturalWidth, i.naturalHeight])")
    assert sizes == [[384, 384], [384, 384]]
    assert page.evaluate("document.getElementById('progress').value === document.getElementById('progress').max")
    page.screenshot(path=str(out_dir / "playground-generate.png"), full_page=True)
