"""The chat page at `/` in a real headless Chromium (Selenium, with the system's chromium and chromedriver: install
them with `bash tools/browser.sh`): a question typed into the page is answered, streamed piece by piece, with the
API's greedy answer; a second question is answered with the first in its history. Saves a screenshot to the test's
tmp folder and to out/web_chat.png."""
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
webdriver = pytest.importorskip("selenium.webdriver")

from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import QA, Server, trained_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER),
                                reason="no chromium/chromedriver installed: run `bash tools/browser.sh` (as root)")

# Counts the DOM changes of the answers: a streamed answer is written many times, a buffered one once.
COUNT_UPDATES = """
window.updates = 0;
new MutationObserver((records) => {
  for (const r of records) if (r.target.closest && r.target.closest('.message.assistant')) window.updates++;
}).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("web")
    s = Server(trained_checkpoint(folder / "tiny.pth"), folder / "server.log")
    try:
        yield s.wait()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=900,640"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def send(driver, question: str) -> str:
    """Type `question`, press Enter, wait for the streamed answer to finish; returns the newest answer's text."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant")) > before)
    wait.until(lambda d: d.find_element(By.ID, "chat").get_attribute("data-state") == "idle")
    assert not driver.find_elements(By.CSS_SELECTOR, ".message.error")
    return driver.find_elements(By.CSS_SELECTOR, ".message.assistant .content")[-1].text


def test_the_page_streams_the_greedy_answer_and_keeps_history(server, browser, tmp_path):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    first, second = "Where does Nora live?", "Tell me a short story."
    api_first = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": first}],
                                               temperature=0, max_tokens=64).choices[0].message.content
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": api_first},
               {"role": "user", "content": second}]
    api_second = client.chat.completions.create(model="tiny", messages=history, temperature=0,
                                                max_tokens=64).choices[0].message.content
    assert api_first == QA[first]

    browser.get(server.url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "model").text == "model: tiny")
    for field, value in (("temperature", "0"), ("max-tokens", "64")):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.execute_script(COUNT_UPDATES)
    assert send(browser, first) == api_first
    updates = browser.execute_script("return window.updates")
    assert updates > 5, f"the answer was written {updates} times: it should arrive piece by piece"
    assert send(browser, second) == api_second
    prompts = [int(n) for n in re.findall(r"(\d+) prompt \+ \d+ completion tokens", server.text())]
    assert len(prompts) == 4 and prompts[2:] == prompts[:2], prompts  # the page sent what the API calls sent

    shot = tmp_path / "web_chat.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 5000
    (ROOT / "out").mkdir(exist_ok=True)
    shutil.copy(shot, ROOT / "out" / "web_chat.png")
