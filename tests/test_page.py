"""The page at `/`, driven in a real headless Chromium (the distribution's package, through Selenium and the
system chromedriver: nothing downloaded at run time) against a live server with a tiny model and an
API key: the whole journey a person takes. Screenshots of each step go to $PAGE_SCREENSHOTS (default:
the test's tmp dir)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import LiveServer, wait_until

pytestmark = pytest.mark.slow  # a real uvicorn server, a training process and a browser

KEY = "page-test-key"
STEPS = 12  # max_steps set in the page's "More" section; with PROGRESS_INTERVAL_S=0 one progress event each


def whatsapp_chat(exchanges: int = 30) -> str:
    """An Android WhatsApp export: a system line, then Andriy and Olena K taking turns, a minute apart."""
    lines = ["12/31/23, 9:00 PM - Messages and calls are end-to-end encrypted. Tap to learn more."]
    for i in range(exchanges):
        minute = f"{i % 60:02d}"
        lines.append(f"1/13/24, 10:{minute} AM - Andriy: question number {i}, how is it going?")
        lines.append(f"1/13/24, 10:{minute} AM - Olena K: answer {i}: all good, thanks 😊")
    return "\n".join(lines) + "\n"


def browser_or_skip() -> tuple[str, str]:
    """The system Chromium and chromedriver; without them the test skips, except under CI (CI=true) where it fails."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None)
    problem = None
    try:
        import selenium  # noqa: F401
    except ImportError:
        problem = "selenium is not installed (pip install -r requirements.txt)"
    if not (chromium and driver):
        problem = "no system Chromium and chromedriver: apt-get install chromium chromium-driver (Debian packages)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the browser test must run under CI: {problem}")
        pytest.skip(problem)
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, driver_path = browser_or_skip()
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1000",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


class Page:
    """The page in the browser, with the few moves the journey needs."""

    def __init__(self, driver, shots: Path):
        self.driver, self.shots, self.count = driver, shots, 0

    def __call__(self, css: str):
        from selenium.webdriver.common.by import By
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def all(self, css: str):
        from selenium.webdriver.common.by import By
        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self(css).text

    def wait_text(self, css: str, needle: str, timeout: float = 60) -> str:
        return wait_until(lambda: needle in self.text(css) and self.text(css), timeout, f"{needle!r} in {css}", 0.1)

    def chart_points(self) -> int:
        """Points of the training loss chart (read in one go: the chart is redrawn at each event)."""
        return self.driver.execute_script(
            "const line = document.querySelector('#loss-chart polyline');"
            "return line ? line.getAttribute('points').trim().split(/ +/).length : 0")

    def shot(self, name: str) -> None:
        """The whole page, beyond the window's height."""
        self.count += 1
        png = self.driver.execute_cdp_cmd("Page.captureScreenshot", {"captureBeyondViewport": True, "fromSurface": True})
        (self.shots / f"{self.count:02d}-{name}.png").write_bytes(base64.b64decode(png["data"]))


def test_the_whole_journey_in_a_browser(browser, env, tmp_path):
    shots = Path(os.environ.get("PAGE_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    server = LiveServer({**env, "API_KEY": KEY, "PROGRESS_INTERVAL_S": "0", "EVAL_GENERATIONS": "2", "CHECKPOINT_STEPS": "1",
                         "GENERATION_MAX_NEW_TOKENS": "8"}, tmp_path / "server.log")
    export = tmp_path / "WhatsApp Chat with Andriy.txt"
    export.write_text(whatsapp_chat(), encoding="utf-8")
    page = Page(browser, shots)
    try:
        from selenium.webdriver.common.keys import Keys
        from selenium.webdriver.support.ui import Select

        # The page and its files need no key, hold no data, and load nothing from elsewhere.
        r = httpx.get(server.url + "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in r.headers["content-security-policy"]
        assert "http" not in r.text.replace('xmlns="http://www.w3.org/2000/svg"', "")  # no external URL (nor a CDN)
        for asset in ("app.js", "style.css", "favicon.svg"):
            assert httpx.get(f"{server.url}/static/{asset}").status_code == 200
        assert httpx.get(server.url + "/docs").status_code == 200  # still reachable, and linked from the page

        browser.get(server.url + "/")
        # Without the key the API answers 401, and the page says what to do.
        page.wait_text("#banner", "needs an API key")
        page.wait_text("#speakers-msg", "missing or wrong API key")
        assert page("a[href='/docs']")
        page.shot("no-key")
        page("#api-key").send_keys(KEY, Keys.ENTER)  # the keyboard alone
        wait_until(lambda: not page("#banner").is_displayed(), 10, "the banner to go")
        page.wait_text("#speakers", "No speakers yet")
        assert browser.execute_script("return sessionStorage.getItem('persona-lora.api-key')") == KEY
        assert browser.execute_script("return localStorage.length") == 0  # the key is kept for the session only
        page.shot("key-entered")

        # Import: inspect shows format and participants with counts; pick one; the report comes back.
        page("#export-file").send_keys(str(export))
        page.wait_text("#inspect-msg", "a whatsapp export")
        options = wait_until(lambda: [o.text for o in page.all("#persona-options label")], 10, "participants")
        assert sorted(options) == ["Andriy (30 messages)", "Olena K (30 messages)"]
        assert "whatsapp" in page.text("#inspect-summary")
        page("#persona-options input[value='Olena K']").click()
        page.shot("inspected")
        page("#import-submit").click()
        report = page.wait_text("#import-report", "Successfully saved messages for Olena K")
        assert "30 new" in report and "What cleaning did" in report
        row = page.wait_text("#speakers-table tbody", "Olena K")
        assert "30" in row and "none" in row  # messages, no adapter yet
        page.shot("imported")

        # A long training: cancel it, resume it from its checkpoint (the chart goes on), cancel again.
        assert Select(page("#train-speaker")).first_selected_option.text == "Olena K"
        page("#train-form summary").click()
        max_steps = page("#train-form input[name=max_steps]")
        max_steps.send_keys("100000")
        page("#train-start").click()
        wait_until(lambda: (m := re.search(r"step (\d+) of", page.text("#job-status"))) and int(m[1]) >= 3, 120,
                   f"step 3 of the long training (last seen: {page.text('#job-status')!r})")
        page("#job-cancel").click()
        page.wait_text("#job-status", "cancelled", 60)
        assert "Training was cancelled" in page.text("#job-error")
        wait_until(lambda: page("#job-resume").is_displayed(), 10, "the resume button")
        page.shot("cancelled")
        before = page.chart_points()
        page("#job-resume").click()
        wait_until(lambda: page.chart_points() >= before + 2, 120,
                   "the resumed job's progress")
        assert "running" in page.text("#job-status")
        page("#job-cancel").click()
        page.wait_text("#job-status", "cancelled", 60)

        # Train with an override from the "More" section; watch the progress reach 100% and the chart grow.
        max_steps.clear()
        max_steps.send_keys(str(STEPS))
        page("#train-form input[name=batch_tokens]").send_keys("0")
        page("#train-start").click()
        seen = set()

        def done():
            seen.add(page("#job-progress").get_attribute("value"))
            return "succeeded" in page.text("#job-status")

        wait_until(done, 300, "training to succeed in the page", 0.05)
        status = page.text("#job-status")
        assert "100%" in status and f"step {STEPS} of {STEPS}" in status, status
        assert page("#job-progress").get_attribute("value") == "1"
        assert page.chart_points() == STEPS  # one point per progress event of the stream
        assert not page("#job-cancel").is_displayed() and page.text("#job-error") == ""
        page.shot("trained")

        # The evaluation opens by itself: held-out losses as a chart, style, replies beside the true ones.
        out = page.wait_text("#eval-out", "Replies beside the true ones", 120)
        assert len(page.all("#eval-out svg rect")) >= 2  # base and adapter held-out loss
        assert "Style" in out and "True" in out and "Adapter" in out
        true_replies = [d.text for d in page.all("#eval-out .replies dd:nth-of-type(1)")]
        assert true_replies and all(t.startswith("answer ") for t in true_replies), true_replies
        wait_until(lambda: page.all("#eval-out img.plot"), 20, "the loss plot")
        summary = page.wait_text("#speakers-table tbody", "→")  # base → adapter held-out loss in the list
        assert "trained" in summary
        page.shot("evaluation")

        # Chat with the persona, streamed: the reply grows in pieces as the chunks arrive.
        Select(page("#chat-model")).select_by_value("Olena K")
        page("#chat-form summary").click()
        page("#chat-form input[name=max_tokens]").send_keys("16")
        page("#chat-form input[name=seed]").send_keys("1")
        page("#chat-form input[name=temperature]").send_keys("1")
        browser.execute_script("""
            window.pieces = 0;
            new MutationObserver((records) => { window.pieces += records.length; })
              .observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});""")
        page("#chat-input").send_keys("Hi Olena, how are you? Is 17 all good?", Keys.ENTER)
        wait_until(lambda: page.all("#chat-log li.assistant") and page("#chat-send").is_enabled(), 120, "the reply to end")
        reply = page.text("#chat-log li.assistant")
        assert reply.startswith("Olena K:") and len(reply) > len("Olena K:"), reply
        # What memory recalled for the reply, collapsed under it: her line that shares the rare word "17".
        from selenium.webdriver.common.by import By

        recalled = page("#chat-log li.assistant details.recalled")
        assert recalled.text == "Recalled 1 of their message" and not recalled.get_attribute("open")
        recalled.find_element(By.TAG_NAME, "summary").click()
        assert recalled.find_element(By.TAG_NAME, "li").text == "answer 17: all good, thanks 😊"
        assert "30 · 30 in memory" in page.text("#speakers-table tbody")
        assert browser.execute_script("return window.pieces") >= 3, "the reply did not stream in pieces"
        assert page.text("#chat-msg") in ("", "The reply was cut at the token limit (Max tokens).")
        page.shot("chat")

        # A phone-width screen: nothing wider than the screen.
        browser.set_window_size(390, 844)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.shot("phone")
        browser.set_window_size(1280, 1000)

        # Every control is labelled and every button named (keyboard and screen readers).
        unlabelled = browser.execute_script("""
            return [...document.querySelectorAll('input, select, textarea')].filter(e => !e.labels.length).map(e => e.id || e.name)
              .concat([...document.querySelectorAll('button')].filter(b => !(b.getAttribute('aria-label') || b.textContent.trim())).map(b => b.id));""")
        assert unlabelled == []

        # Delete, after confirming.
        page("#speakers-table button[aria-label='Delete Olena K']").click()
        alert = browser.switch_to.alert
        assert "Olena K" in alert.text
        alert.accept()
        page.wait_text("#speakers-msg", "Deleted the data of Olena K")
        page.wait_text("#speakers", "No speakers yet")
        page.shot("deleted")

        # The browser's requests went through the origin check: same-origin POSTs passed; none refused.
        log = (tmp_path / "server.log").read_text()
        assert "path=/upload-file status=200" in log and "path=/train status=202" in log and "/resume status=202" in log
        assert "status=403" not in log
        errors = [e["message"] for e in browser.get_log("browser")
                  if e["level"] == "SEVERE" and "status of 401" not in e["message"]]
        assert errors == []  # no script error, no Content-Security-Policy violation

        # The server goes away: the page says so.
        server.stop()
        page.wait_text("#banner", "cannot be reached", 20)
        assert "unreachable" in page.text("#server-status")
        page.shot("unreachable")
    finally:
        server.stop()


def test_the_page_on_a_phone_opens_on_the_last_persona_and_says_when_an_adapter_is_worse(browser, env, tmp_path):
    """No API key on the server: the key box stays collapsed. Two personas (their adapter folders written here:
    this test is about the page, not training): chat opens on the one trained last, the worse one says so in
    the Speakers list and its evaluation, and at 360 px every control is within the screen."""
    server = LiveServer(env, tmp_path / "server.log")
    output = Path(env["OUTPUT_DIR"])
    worse = ("the adapter's held-out loss is worse than the base model's (3.464 → 4.163): it predicts this person's "
             "unseen replies less well than no training at all; train on more data, for fewer epochs or with a lower learning rate")
    for name, trained, losses in (("Ann", "2026-01-02T10:00:00+00:00", (3.464, 4.163)), ("Bob", "2026-01-01T10:00:00+00:00", (4.0, 3.0))):
        dialog = [{"speaker": "Q", "content": "how are you?"}, {"speaker": name, "content": f"fine, {name} here"}]
        assert httpx.post(server.url + "/upload-text", json={"dialog": dialog, "speaker": name}).status_code == 200
        (output / name).mkdir(parents=True)
        held = {"base": {"loss": losses[0], "perplexity": 1.0}, "adapter": {"loss": losses[1], "perplexity": 1.0}, "loss_reduction": 0}
        (output / name / "eval.json").write_text(json.dumps({
            "speaker": name, "created_at": trained, "base_weights": "float32", "held_out_samples": 2, "held_out": held,
            "warnings": [worse] if losses[1] > losses[0] else []}), encoding="utf-8")
        (output / name / "training_info.json").write_text(json.dumps({"speaker": name, "created_at": trained}), encoding="utf-8")
    page = Page(browser, tmp_path)
    try:
        from selenium.webdriver.support.ui import Select

        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 360, "height": 780, "deviceScaleFactor": 2, "mobile": True})
        browser.get(server.url + "/")
        rows = page.wait_text("#speakers-table tbody", "worse than the base model")
        assert "3.464 → 4.163: worse than the base model" in rows and "4 → 3" in rows and rows.count("worse") == 1
        wait_until(lambda: Select(page("#chat-model")).first_selected_option.text == "Ann", 10, "chat on Ann, trained last")
        assert not page("#key-box").get_attribute("open") and not page("#api-key").is_displayed()  # no key needed: collapsed
        assert page("#key-summary").is_displayed()
        page("#eval-form button[type=submit]").click()
        page.wait_text("#eval-out", f"Warning: {worse}.")
        page.shot("phone-360")
        width, overflow = browser.execute_script("""
            const w = window.innerWidth;
            const out = [...document.querySelectorAll('button, input, select, textarea, summary, a:not(.skip), th, td')]
              .map(e => [e, e.getBoundingClientRect()]).filter(([e, r]) => r.width > 0 && (r.left < -1 || r.right > w + 1))
              .map(([e, r]) => `${e.tagName}#${e.id} ${e.textContent.trim().slice(0, 30)} ${r.left}..${r.right}`);
            return [w, document.documentElement.scrollWidth > w ? ['the page scrolls sideways', ...out] : out];""")
        assert width == 360 and overflow == []
        delete = page("#speakers-table button[aria-label='Delete Ann']")
        assert delete.is_displayed() and delete.rect["x"] + delete.rect["width"] <= 360
    finally:
        server.stop()
