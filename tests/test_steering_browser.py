"""The web page's steering controls in a real browser: a negative prompt and the "enhance" toggle go with the job,
the enhanced prompt (from a local stub endpoint) is shown with the result and in the history, and "reuse settings"
brings both controls back."""

import pytest
from openai_stub import ChatStub
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_server_browser import launch_browser  # noqa: F401  (the fixture)

from lance_mlx import enhance as E
from server_helpers import start_server, stop_server

REVISED = "A wide view shows a lighthouse on a cliff at dusk, waves breaking below."


@pytest.fixture
def browser(launch_browser):  # noqa: F811
    return launch_browser()


@pytest.fixture
def endpoint(monkeypatch):
    with ChatStub(REVISED) as stub:
        monkeypatch.setenv(E.ENV_BASE_URL, stub.url)  # the server process inherits them
        monkeypatch.setenv(E.ENV_MODEL, "stub")
        yield stub


def test_page_negative_prompt_and_enhancement(upstream_root, tmp_path, browser, endpoint):  # noqa: F811
    proc, base = start_server(upstream_root, tmp_path / "served")
    try:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "aspect").find_elements(By.TAG_NAME, "option"))
        browser.find_element(By.ID, "prompt").send_keys("a lighthouse")
        browser.find_element(By.ID, "negative_prompt").send_keys("fog")
        browser.find_element(By.ID, "enhance_prompt").click()
        for field, value in (("width", 32), ("height", 32), ("steps", 1)):
            el = browser.find_element(By.ID, field)
            el.clear()
            el.send_keys(str(value))
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#result img.output"))
        assert browser.find_element(By.CSS_SELECTOR, "#result .revised").text == "Enhanced prompt: " + REVISED
        assert "a lighthouse" in endpoint.last_text
        card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#history .card.completed"))[0]
        assert REVISED in card.find_element(By.CSS_SELECTOR, ".revised").text
        assert '"negative_prompt": "fog"' in card.find_element(By.TAG_NAME, "pre").get_attribute("textContent")

        browser.find_element(By.ID, "negative_prompt").clear()
        browser.find_element(By.ID, "enhance_prompt").click()
        assert not browser.find_element(By.ID, "enhance_prompt").is_selected()
        card.find_element(By.CSS_SELECTOR, "button.reuse").click()
        assert browser.find_element(By.ID, "negative_prompt").get_attribute("value") == "fog"
        assert browser.find_element(By.ID, "enhance_prompt").is_selected()
        assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a lighthouse"
    finally:
        stop_server(proc)
