"""The chat app end to end: ``python app.py`` on a free local port, driven by a real headless Chromium.

Needs Debian's ``chromium`` and the ``playwright`` package (no Playwright browser download); skipped with
the reason when either is missing. Set ``MLX_EVE_DOCS_SCREENSHOT=1`` to also refresh ``docs/app.png``.
"""

import os
import re
import shutil
import time
import unicodedata
from pathlib import Path

import pytest
from bundled_image import IMAGE, README_ANSWER, README_QUESTION
from test_app_server import running_app

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_TOKENS = 24
WAIT_MS = 120_000

pytest.importorskip("gradio", reason="the app needs gradio: pip install 'mlx-eve[app]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright: pip install playwright")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")


# --- The right answer ----------------------------------------------------------------------------------------
# The page must show what the demo model itself answers. The expectation is computed here, in-process, with
# the library's greedy stream_generate on the same image, question and settings, so the check stays valid
# for whatever BUNDLED_MODEL is; tests/test_demo_model.py checks those answers against the image itself.


def expected_answer(model, processor, conversation, image, max_tokens: int = MAX_TOKENS) -> str:
    from mlx_eve import generate

    return generate(model, processor, conversation, image=image, max_tokens=max_tokens)


def same_answer(shown: str, expected: str) -> bool:
    """The chat renders Markdown (and drops control characters), so compare letters and digits only."""

    def letters(text: str) -> str:
        return "".join(c for c in unicodedata.normalize("NFC", text) if c.isalnum())

    return letters(shown) == letters(expected)


# --- The app and the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """``python app.py --port N`` with the bundled demo model; Ctrl-C at the end must quit it cleanly (exit 130)."""
    with running_app(tmp_path_factory.mktemp("app")) as app:
        yield app.url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    # Playwright's driver (node) and Chromium fail to start threads with OpenBLAS preloaded into them.
    preload = os.environ.pop("LD_PRELOAD", None)
    try:
        playwright = sync_api.sync_playwright().start()
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    context = playwright.chromium.launch_persistent_context(
        str(tmp_path_factory.mktemp("chromium-profile")),
        executable_path=CHROMIUM,
        headless=True,
        args=CHROMIUM_ARGS,
        viewport={"width": 1100, "height": 1000},
        env={k: v for k, v in os.environ.items() if k != "LD_PRELOAD"},
    )
    context.set_default_timeout(WAIT_MS)
    yield context
    context.close()
    playwright.stop()


@pytest.fixture
def page(browser, app_url):
    page = browser.new_page()
    page.goto(app_url)
    page.wait_for_selector("#chat-input textarea")
    yield page
    page.close()


@pytest.fixture(scope="module")
def demo_model():
    from mlx_eve import load
    from mlx_eve.demo import BUNDLED_MODEL

    return load(str(BUNDLED_MODEL))


def set_max_tokens(page, value: int) -> None:
    page.locator("#settings > button").first.click()
    field, slider = page.get_by_label("number input for Max tokens"), page.get_by_label("range slider for Max tokens")
    # The slider follows the field once the page has taken the value; a question sent before would not have it. A
    # value typed while the page is still starting can be lost: it is typed again until the slider shows it.
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        field.fill(str(value))
        field.press("Enter")
        try:
            sync_api.expect(slider).to_have_value(str(value), timeout=5000)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def ask(page, question: str, image=None) -> str:
    """Send a message like a user (optionally with a file), wait for the whole answer, return its text."""
    answers = page.locator("#chat [data-testid='bot']")
    before = answers.count()
    if image is not None:
        page.locator("#chat-input input[type=file]").set_input_files(str(image))
        page.locator("#chat-input [aria-label='File thumbnail']").wait_for()
    page.locator("#chat-input textarea").fill(question)
    page.locator("#chat-input textarea").press("Enter")
    sync_api.expect(answers).to_have_count(before + 1, timeout=WAIT_MS)
    # The input comes back once the answer is complete.
    sync_api.expect(page.locator("#chat-input textarea")).to_be_enabled(timeout=WAIT_MS)
    return answers.last.inner_text()


def footer(page) -> dict:
    text = page.locator("#stats").inner_text()
    match = re.search(
        r"Image tokens: (\d+|none)(?: \((processed|reused from cache)\))? · "
        r"Prompt tokens: (\d+) \((\d+) processed, (\d+) reused from cache\) · Prompt: [\d.]+ tokens/s · "
        r"Generation: (\d+) tokens, [\d.]+ tokens/s · Peak memory: [\d.]+ GB",
        text,
    )
    assert match, text
    image, image_state, total, processed, reused, generated = match.groups()
    return {
        "image_tokens": 0 if image == "none" else int(image),
        "image": image_state,
        "total": int(total),
        "processed": int(processed),
        "reused": int(reused),
        "generated": int(generated),
    }


def test_ask_about_an_image_then_follow_up(page, demo_model, tmp_path):
    from mlx_eve.chat import ChatSession

    model, processor = demo_model
    # The README's question, which the demo model answers correctly (tests/test_demo_model.py).
    first, follow_up = README_QUESTION, "What color is the square?"
    set_max_tokens(page, MAX_TOKENS)

    shown = ask(page, first, IMAGE)
    expected = expected_answer(model, processor, first, IMAGE)
    assert same_answer(shown, expected) and same_answer(shown, README_ANSWER), (shown, expected)
    # The same turns in-process, to read the footer against.
    session = ChatSession(model, processor, IMAGE)
    turn_1 = list(session.stream(first, max_tokens=MAX_TOKENS))[-1]
    turn_2 = list(session.stream(follow_up, max_tokens=MAX_TOKENS))[-1]
    stats = footer(page)
    assert stats["image"] == "processed" and stats["image_tokens"] == turn_1.image_tokens > 0
    assert stats["processed"] == stats["total"] == turn_1.prompt_tokens and stats["reused"] == 0
    assert stats["generated"] == turn_1.generation_tokens

    shown_2 = ask(page, follow_up)
    conversation = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": expected},
        {"role": "user", "content": follow_up},
    ]
    expected_2 = expected_answer(model, processor, conversation, IMAGE)
    assert same_answer(shown_2, expected_2), (shown_2, expected_2)
    stats = footer(page)
    # The image and the first turn came from the KV cache: only the new tokens were processed.
    assert stats["image"] == "reused from cache" and stats["image_tokens"] == turn_1.image_tokens
    assert stats["reused"] == turn_2.reused_tokens >= turn_1.prompt_tokens
    assert stats["processed"] == turn_2.prompt_tokens == stats["total"] - stats["reused"]
    assert stats["total"] == processor(conversation, IMAGE).input_ids.size

    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    if os.environ.get("MLX_EVE_DOCS_SCREENSHOT"):
        page.locator("#settings > button").first.click()  # folded again, as a user first sees it
        page.evaluate("window.scrollTo(0, 0)")
        (ROOT / "docs").mkdir(exist_ok=True)
        page.screenshot(path=str(ROOT / "docs" / "app.png"))


def test_bad_upload_is_reported_in_the_chat_and_the_app_keeps_working(page, demo_model, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    set_max_tokens(page, 4)

    shown = ask(page, "What is in this photo?", broken)
    assert "Could not read image broken.jpg" in shown
    assert "📎 broken.jpg" in page.locator("#chat [data-testid='user']").first.inner_text()

    shown = ask(page, "Hello, can you hear me?")
    assert same_answer(shown, expected_answer(*demo_model, "Hello, can you hear me?", None, max_tokens=4)), shown
    stats = footer(page)
    assert stats["image_tokens"] == 0 and stats["reused"] == 0 and 1 <= stats["generated"] <= 4

    page.locator("#new-chat").click()
    sync_api.expect(page.locator("#chat [data-testid='bot']")).to_have_count(0)
    sync_api.expect(page.locator("#stats")).to_have_text("Statistics of the last answer appear here.")


def test_an_example_is_answered_with_the_default_settings(page, demo_model):
    from mlx_eve.chat_app import TEXT_EXAMPLE

    # Settings is never opened here: its default values must reach the model all the same.
    page.locator("#examples").get_by_text(TEXT_EXAMPLE).click()
    sync_api.expect(page.locator("#chat-input textarea")).to_have_value(TEXT_EXAMPLE)
    shown = ask(page, TEXT_EXAMPLE)
    assert same_answer(shown, expected_answer(*demo_model, TEXT_EXAMPLE, None, max_tokens=256)), shown
    assert footer(page)["image_tokens"] == 0
