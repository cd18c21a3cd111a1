"""The web page in a real browser (Debian's chromium + chromium-driver through Selenium): generate an image on the
tiny checkpoint, watch progress and the result, find it in the history after a server restart, save a screenshot."""

import os
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from server_helpers import ROOT, free_port, start_server, stop_server

CHROMIUM = ("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
DRIVER = ("chromedriver", "/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
ARTIFACTS = Path(os.environ.get("LANCE_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts"))


def find_program(names):
    """The first of `names` found (a bare name on PATH, else a path), or None."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser():
    """(chromium, chromedriver) paths; a missing one fails the test (never skips it) with one line saying what to
    install."""
    paths = find_program(CHROMIUM), find_program(DRIVER)
    missing = [names[0] for names, p in zip((CHROMIUM, DRIVER), paths) if p is None]
    if missing:
        pytest.fail(f"the browser test needs Debian's packages chromium and chromium-driver, but "
                    f"{' and '.join(missing)} is not installed: apt-get install chromium chromium-driver "
                    f"(.ci/run installs them)", pytrace=False)
    return paths


@pytest.fixture
def launch_browser():
    """Starts headless chromium when the test calls it, so a missing browser fails the test itself."""
    drivers = []

    def launch():
        chromium, chromedriver = require_browser()
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1280,900"):
            options.add_argument(arg)
        driver = webdriver.Chrome(options=options, service=Service(chromedriver))
        drivers.append(driver)
        driver.set_page_load_timeout(30)
        return driver

    yield launch
    for driver in drivers:
        driver.quit()


# Records every text the status line shows (each mutation record, not the batched callbacks), so the test sees
# progress even when the tiny job is over in a blink.
WATCH_STATUS = """
window.statusLog = [];
const log = (records) => records.forEach((r) => r.addedNodes.forEach((n) => window.statusLog.push(n.textContent)));
new MutationObserver(log).observe(document.getElementById('status'), {childList: true});
"""

# Records, in order, each new picture of the preview element and each result added (the page previews every job).
WATCH_PREVIEW = """
window.shown = [];
new MutationObserver((rs) => rs.forEach((r) => { if (r.target.src) window.shown.push('preview'); }))
  .observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});
new MutationObserver((rs) => rs.forEach((r) => r.addedNodes.forEach(() => window.shown.push('result'))))
  .observe(document.getElementById('result'), {childList: true, subtree: true});
"""


def test_page_generates_an_image_and_keeps_it_in_history(upstream_root, tmp_path, launch_browser):
    browser = launch_browser()
    out, port = tmp_path / "served", free_port()
    proc, base = start_server(upstream_root, out, "--max-steps", "1000", port=port)
    try:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "aspect").find_elements(By.TAG_NAME, "option"))
        assert browser.find_element(By.ID, "aspect").text.split() == ["21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3",
                                                                      "9:16"]  # upstream app's aspect presets
        browser.find_element(By.ID, "prompt").send_keys("a lighthouse at dusk")
        for field, value in (("width", 32), ("height", 32), ("steps", 2), ("seed", 7)):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(str(value))
        browser.execute_script(WATCH_STATUS)
        browser.execute_script(WATCH_PREVIEW)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result img.output"))
        shown = browser.execute_script("return window.shown")
        assert "preview" in shown and shown.index("preview") < shown.index("result"), shown
        img = browser.find_element(By.CSS_SELECTOR, "#result img.output")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img))
        assert browser.execute_script("return arguments[0].naturalWidth", img) == 32
        log = browser.execute_script("return window.statusLog")
        assert any(s.startswith("Step 2 / 2") for s in log), log
        assert browser.find_element(By.ID, "status").text == "Done."
        assert browser.execute_script("return document.getElementById('progress').value") == 100
        wait.until(lambda d: not d.find_element(By.ID, "preview").is_displayed())  # the result replaces it

        steps = browser.find_element(By.ID, "steps")  # a long run, cancelled from the page mid-way
        steps.clear()
        steps.send_keys("1000")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Step"))
        browser.find_element(By.ID, "cancel").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "Cancelled.")
        assert 0 < browser.execute_script("return document.getElementById('progress').value") < 95
        steps.clear()
        steps.send_keys("2")
    finally:
        stop_server(proc)

    proc, base = start_server(upstream_root, out, port=port)  # a new process on the same output folder
    try:
        browser.refresh()
        wait = WebDriverWait(browser, 60)
        card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history .card.completed"))[0]
        assert "a lighthouse at dusk" in card.text and "t2i" in card.text
        assert browser.find_elements(By.CSS_SELECTOR, "#history .card.cancelled")
        wait.until(lambda d: card.find_elements(By.CSS_SELECTOR, ".media img"))
        card.find_element(By.CSS_SELECTOR, "button.reuse").click()
        assert browser.find_element(By.ID, "seed").get_attribute("value") == "7"
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a lighthouse at dusk"
        browser.find_element(By.ID, "generate").click()  # the reused settings run again on the new process
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#history .card.completed")) == 2
                   and d.find_elements(By.CSS_SELECTOR, "#result img.output"))
        assert browser.find_element(By.ID, "status").text == "Done."
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "server.png"
        assert browser.save_screenshot(str(shot))
        if os.environ.get("LANCE_UPDATE_SCREENSHOT"):
            shutil.copyfile(shot, ROOT / "docs" / "server.png")
    finally:
        stop_server(proc)


def test_a_missing_browser_fails_naming_the_debian_packages(monkeypatch):
    monkeypatch.setattr(f"{__name__}.DRIVER", ("no-such-chromedriver", "/nonexistent/chromedriver"))
    with pytest.raises(pytest.fail.Exception,
                       match=r"Debian's packages chromium and chromium-driver, but no-such-chromedriver is not "
                             r"installed: apt-get install chromium chromium-driver"):
        require_browser()
