"""The chat page in a real headless browser (Debian's chromium driven by selenium): type, send, see the reply
stream in, reset. Skips, saying why, where chromium or its driver is not installed (.ci/run installs them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install 'azgpt[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_helpers import running_server, template_model  # noqa: E402

from azgpt.data.chat import Message  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium + chromedriver here "
                       "(apt-get install chromium chromium-driver)"),
]
MESSAGE = "Salam! Şəkidə hava necədir? İlk sualım budur."


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=900,640", "--lang=az"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_page_sends_a_message_and_shows_the_streamed_reply(tiny_run, browser) -> None:
    model = template_model(tiny_run.ckpt)
    with running_server(model) as server:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: "tiny-chat" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("16")
        browser.find_element(By.ID, "seed").send_keys("4")
        browser.find_element(By.ID, "input").send_keys(MESSAGE)
        browser.find_element(By.ID, "send").click()
        reply = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant.done"))[0]
        user = browser.find_element(By.CSS_SELECTOR, ".message.user")
        assert user.text == MESSAGE  # Azerbaijani letters arrive and show unchanged
        ids, _ = model.chat_prompt([Message("user", MESSAGE)], max_tokens=16)
        own = model.generator.generate(ids, max_new_tokens=16, temperature=0.8, seed=4, top_p=0.95)
        shown = browser.execute_script("return arguments[0].textContent", reply)
        assert shown == own and shown  # the model's own reply, streamed in whole
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        if os.environ.get("AZGPT_SCREENSHOT"):
            Path(os.environ["AZGPT_SCREENSHOT"]).write_bytes(browser.get_screenshot_as_png())
        browser.find_element(By.ID, "reset").click()
        assert browser.find_elements(By.CSS_SELECTOR, ".message") == []
