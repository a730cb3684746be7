"""The kiosk page end to end in a real headless browser: Debian's chromium driven by Selenium through
chromedriver, against a safeclip-serve server the test starts on a free loopback port.

A person's steps: choose a picture, type a question, press Ask; the answer streams in; a flagged picture
shows the banner (category and the refusal). A follow-up question continues the conversation about the same
picture (the page sends the history; the answer equals the library's ``Chat`` on that history), the banner
of a flagged picture stays for the whole conversation, and Start over or a new picture begins a new one.
Oracle: the same bundle's Pipeline called directly (greedy, so the page must show exactly its text, in as many
pieces as it streams). Screenshots are kept as artefacts in
``$SAFECLIP_ARTIFACTS_DIR`` (default ``test-artifacts/`` at the repository root).

Each turn stands on the page once (earlier turns in the history, the latest below it: no answer twice after a
question and a follow-up), and the page fits a kiosk's screen: at 800x1280 portrait and 1280x800 landscape the
question box and the buttons stay in view after a flagged picture, an answer and a follow-up (screenshots
``kiosk-portrait.png`` and ``kiosk-landscape.png``).

Needs ``selenium`` and a chromium + chromedriver pair (``apt-get install chromium chromium-driver``); skips
with the reason when one is missing. ``SAFECLIP_CHROMIUM`` / ``SAFECLIP_CHROMEDRIVER`` name other binaries.
The driver is Debian's ``/usr/bin/chromedriver`` started directly, with ``SE_AVOID_STATS=true``: Selenium's
manager (which would download drivers and send usage statistics) must never run, and the fixture fails if it
is called.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import ServerThread  # noqa: E402

N = 12
ARTIFACTS = Path(os.environ.get("SAFECLIP_ARTIFACTS_DIR") or Path(__file__).resolve().parents[1] / "test-artifacts")


def _binary(env: str, *names: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env] if os.access(os.environ[env], os.X_OK) else None
    for n in names:
        found = shutil.which(n) or (n if os.path.isabs(n) and os.access(n, os.X_OK) else None)
        if found:
            return found
    return None


def _no_selenium_manager(*_a, **_k):
    raise AssertionError("Selenium's manager was called: it must not reach the network; use the system chromedriver")


@pytest.fixture(scope="module")
def browser():
    chromium = _binary("SAFECLIP_CHROMIUM", "chromium", "chromium-browser", "google-chrome")
    driver_bin = _binary("SAFECLIP_CHROMEDRIVER", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("no headless browser: install chromium and chromium-driver (Debian) to run the kiosk test")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1080,1920", "--force-device-scale-factor=1", "--lang=en-US"):
        opts.add_argument(a)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_AVOID_STATS", "true")
        mp.setattr(SeleniumManager, "binary_paths", _no_selenium_manager)
        d = webdriver.Chrome(service=Service(driver_bin), options=opts)
        d.set_page_load_timeout(30)
        yield d
        d.quit()


@pytest.fixture(scope="module")
def bundle(controlled_bundle):
    return controlled_bundle


@pytest.fixture(scope="module")
def kiosk(bundle):
    with ServerThread(create_app(Pipeline.load(bundle), policy="refuse", default_max_tokens=N)) as s:
        yield s


def _wait_done(d, timeout: float = 30) -> str:
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(d, timeout).until(lambda d: d.execute_script("return document.body.dataset.state")
                                    in ("done", "error"))
    return d.execute_script("return document.body.dataset.state")


def _ask(d, question: str, picture: Path | None, start_over: bool = True) -> dict:
    from selenium.webdriver.common.by import By
    if start_over:
        d.find_element(By.ID, "reset-button").click()
    if picture is not None:
        d.find_element(By.ID, "file-input").send_keys(str(picture))
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(d, 10).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    box = d.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    d.find_element(By.ID, "ask-button").click()
    state = _wait_done(d)
    return d.execute_script("""
        const a = document.getElementById('answer'), b = document.getElementById('banner');
        return {state: document.body.dataset.state, text: a.textContent, chunks: Number(a.dataset.chunks),
                finish: a.dataset.finish || null, banner: !b.hidden, category: b.dataset.category || null,
                bannerText: b.textContent.replace(/\\s+/g, ' '), error: document.getElementById('error').hidden ? null :
                document.getElementById('error').textContent,
                turns: Number(document.getElementById('history').dataset.turns),
                page: document.body.innerText};""") | {"state": state}


def _times_on_page(page: str, text: str) -> int:
    return page.count(text.strip())


def _layout(d) -> dict:
    """Where the controls a person needs are, in viewport pixels, and whether the page scrolls at all."""
    return d.execute_script("""
        const box = (id) => { const r = document.getElementById(id).getBoundingClientRect();
                              return [r.left, r.top, r.right, r.bottom]; };
        const ids = ['question', 'ask-button', 'reset-button', 'answer-card', 'banner'];
        const side = document.querySelector('.side'), main = document.querySelector('main');
        return {w: innerWidth, h: innerHeight, sw: document.documentElement.scrollWidth,
                main_scrolls: main.scrollHeight - main.clientHeight > 1,
                side_clipped: side.scrollHeight - side.clientHeight > 1 ? side.scrollHeight - side.clientHeight : 0,
                sh: document.documentElement.scrollHeight, boxes: Object.fromEntries(ids.map((i) => [i, box(i)]))};""")


def test_kiosk_page_end_to_end(browser, kiosk, bundle, test_images):
    oracle = Pipeline.load(bundle)
    d = browser
    d.get(kiosk.url + "/")
    assert d.title == "Ask about a picture"

    # a clean picture: the answer streams in, no banner
    got = _ask(d, "What is in the picture?", test_images / "blue.jpg")
    want = list(oracle.stream(str(test_images / "blue.jpg"), "What is in the picture?", max_new_tokens=N))
    assert got["state"] == "done" and not got["banner"] and got["error"] is None
    assert got["text"] == "".join(want) and got["chunks"] == len(want) and got["finish"] == "length"

    # a question without a picture: many pieces, shown in order
    got = _ask(d, "Hi", None)
    want = list(oracle.stream(None, "Hi", max_new_tokens=N))
    assert len(want) > 1 and got["chunks"] == len(want) and got["text"] == "".join(want)

    # a flagged picture: a calm banner with the category, and the refusal as the answer
    got = _ask(d, "What is in the picture?", test_images / "red.png")
    assert got["banner"] and got["category"] == "gun"
    assert "may show something sensitive" in got["bannerText"] and "something sensitive (gun)." in got["bannerText"]
    assert "will not describe it" in got["bannerText"]
    assert got["text"] == oracle.refusal_for("gun") and got["finish"] == "content_filter"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "kiosk-flagged.png"
    assert d.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000

    # nothing was fetched from anywhere but this server (the page must work offline)
    origins = d.execute_script("return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
    assert origins and set(origins) == {kiosk.url}


def test_kiosk_page_says_clearly_what_went_wrong(browser, kiosk, tmp_path):
    d = browser
    d.get(kiosk.url + "/")
    fake = tmp_path / "not-a-picture.png"
    fake.write_bytes(b"this is text, not a picture")
    from selenium.webdriver.common.by import By
    d.find_element(By.ID, "file-input").send_keys(str(fake))
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(d, 10).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "cannot be opened" in d.find_element(By.ID, "error").text
    d.find_element(By.ID, "ask-button").click()                      # empty question: asked to type one
    assert _wait_done(d) == "error" and "type a question" in d.find_element(By.ID, "error").text


def test_kiosk_follow_up_start_over_and_the_banner_for_the_whole_conversation(browser, bundle, test_images):
    from selenium.webdriver.common.by import By

    oracle = Pipeline.load(bundle)
    blue, red, q = test_images / "blue.jpg", test_images / "red.png", "What is in the picture?"
    with ServerThread(create_app(Pipeline.load(bundle), policy="instruct", default_max_tokens=N)) as s:
        d = browser
        d.get(s.url + "/")
        first = _ask(d, q, blue)
        assert first["state"] == "done" and first["turns"] == 1 and not first["banner"]
        # a follow-up about the same picture: the page sends the history, the answer is the conversation's
        got = _ask(d, "And the colours?", None, start_over=False)
        chat = oracle.chat()
        chat.set_history([(q, [blue.read_bytes()], first["text"])])
        want = list(chat.ask("And the colours?", max_new_tokens=N))
        assert got["state"] == "done" and got["turns"] == 2 and got["text"] == "".join(want)
        assert got["text"] != "".join(oracle.stream(None, "And the colours?", max_new_tokens=N))   # not stateless
        assert d.find_element(By.ID, "question").get_attribute("value") == ""
        # a new picture begins a new conversation: red is flagged, its banner stays through the follow-ups
        got = _ask(d, q, red, start_over=False)
        assert got["turns"] == 1 and got["banner"] and got["category"] == "gun"
        for i, follow in enumerate(["Why?", "Tell me more."]):
            got = _ask(d, follow, None, start_over=False)
            assert got["state"] == "done" and got["turns"] == 2 + i and got["banner"] and got["category"] == "gun"
        # Start over: no picture, no history, no banner; the next question is asked on its own
        d.find_element(By.ID, "reset-button").click()
        assert d.execute_script("return document.getElementById('history').dataset.turns") == "0"
        assert not d.find_element(By.ID, "banner").is_displayed()
        assert not d.find_element(By.ID, "preview").is_displayed()
        got = _ask(d, "Hi", None, start_over=False)
        assert got["turns"] == 1 and not got["banner"]
        assert got["text"] == "".join(oracle.stream(None, "Hi", max_new_tokens=N))


@pytest.mark.parametrize("shape, width, height", [("portrait", 800, 1280), ("landscape", 1280, 800)])
def test_kiosk_each_turn_once_and_the_controls_in_view(browser, bundle, test_images, shape, width, height):
    """A flagged picture, a question and a follow-up: every answer (and question) stands on the page once, and
    the question box, Ask and Start over are inside the window, which does not scroll; the answer card is in
    view below the banner. The screenshot is kept for a person to look at."""
    red, q, follow = test_images / "red.png", "What is in the picture?", "And the colours?"
    d = browser
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                             "deviceScaleFactor": 1, "mobile": False})
    try:
        with ServerThread(create_app(Pipeline.load(bundle), policy="instruct", default_max_tokens=N)) as s:
            d.get(s.url + "/")
            assert d.execute_script("return [innerWidth, innerHeight]") == [width, height]
            first = _ask(d, q, red)
            second = _ask(d, follow, None, start_over=False)
            assert first["banner"] and second["banner"] and second["turns"] == 2
            a1, a2 = first["text"].strip(), second["text"].strip()
            assert len(a1) >= 4 and len(a2) >= 4 and a1 not in a2 and a2 not in a1, (a1, a2)   # a fair test
            page = second["page"]
            assert _times_on_page(page, a1) == 1, page
            assert _times_on_page(page, a2) == 1, page
            assert _times_on_page(page, q) == 1 and _times_on_page(page, follow) == 1, page

            lay = _layout(d)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / f"kiosk-{shape}.png"
            assert d.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            w, h, boxes = lay["w"], lay["h"], lay["boxes"]
            assert lay["sw"] <= w and lay["sh"] <= h, lay              # the page itself never scrolls
            assert not lay["side_clipped"] and not lay["main_scrolls"], lay   # nothing cut, nothing to scroll
            for name in ("question", "ask-button", "reset-button", "banner"):
                left, top, right, bottom = boxes[name]
                assert right > left and bottom > top, (name, lay)
                assert 0 <= left and right <= w and 0 <= top and bottom <= h, (name, lay)
            left, top, right, bottom = boxes["answer-card"]
            assert top < h - 120 and bottom <= h and right <= w, lay   # the answer is on screen too
    finally:
        d.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
