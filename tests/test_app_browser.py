"""End to end: the real ``streamlit run`` server of ``sae-cafe view`` on 127.0.0.1, every page loaded in headless
Chromium (Debian's chromium + chromium-driver through selenium), checked for its main element and no error,
and saved as a screenshot in ``docs/screenshots/``."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
# (file name of the screenshot, URL path, the page's title)
PAGES = [("home", "", "sae-cafe viewer"), ("latent_browser", "Latent_browser", "Latent browser"),
         ("image_explorer", "Image_explorer", "Image explorer"), ("concept_graph", "Concept_graph", "Concept graph"),
         ("metrics", "Metrics", "Metrics")]

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and DRIVER.exists()),
    reason="needs Debian's Chromium and its driver: `apt-get install chromium chromium-driver` "
           "(/usr/bin/chromium and /usr/bin/chromedriver); CI installs them")
# the element that shows a page rendered its content: (CSS selector, how many)
MAIN = {"home": ('[data-testid="stDataFrame"]', 1),
        "latent_browser": ('[data-testid="stImage"] img', 3),  # the table, then a card's exemplar triplet
        "image_explorer": ('[data-testid="stImage"] img', 1),
        "concept_graph": (".js-plotly-plot", 2),  # the class graph and at least one case study
        "metrics": (".js-plotly-plot", 2)}  # insertion and deletion curves
selenium = pytest.importorskip("selenium", reason="pip install selenium (the [test] extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from app.cli import command
    from app.sample import build_sample_run

    root = tmp_path_factory.mktemp("viewer_e2e")
    build_sample_run(root, "tiny")
    port = free_port()
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "w+")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(command(root, port=port), stdout=log, stderr=subprocess.STDOUT,
                            cwd=Path(__file__).resolve().parents[1], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                pytest.fail(f"streamlit did not start (exit {proc.poll()}):\n{log.read()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--no-first-run", "--window-size=1400,1800",
              f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def settle(driver, timeout: float = 150) -> None:
    """Wait until the script run finished (no running indicator for a moment)."""
    from selenium.webdriver.common.by import By

    deadline, quiet = time.time() + timeout, 0
    while time.time() < deadline and quiet < 3:
        running = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stStatusWidget"]')
        quiet = 0 if running else quiet + 1
        time.sleep(0.7)


def check_page(driver, title: str, main: str | None = None, count: int = 1) -> str:
    """Wait for the page title and its main element (``count`` matches of the CSS selector ``main``), then
    for the run to finish; assert no exception or error box and return the page text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 150).until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "h1"), title))
    if main:
        WebDriverWait(driver, 150).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, main)) >= count)
    settle(driver)
    errors = driver.find_elements(By.CSS_SELECTOR, '[data-testid="stException"], [data-testid="stAlertContentError"]')
    body = driver.find_element(By.TAG_NAME, "body").text
    assert not errors, [e.text[:500] for e in errors]
    assert "Traceback" not in body and "Error:" not in body, body[:2000]
    return body


def card_title(driver) -> str:
    from selenium.webdriver.common.by import By

    return next((h.text for h in driver.find_elements(By.TAG_NAME, "h3") if h.text.startswith("Latent ")), "")


def click_other_node(driver) -> None:
    """Click the nodes of the main graph (plotly selection → rerun) until the concept card changes."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    before = card_title(driver)
    assert before, "the concept graph page shows no card"
    plot = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0]
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", plot)
    points = plot.find_elements(By.CSS_SELECTOR, ".scatterlayer .trace")[-1].find_elements(By.CSS_SELECTOR,
                                                                                           "path.point")
    assert points, "no node markers in the graph"
    for i in range(len(points)):
        pt = driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")[0].find_elements(
            By.CSS_SELECTOR, ".scatterlayer .trace")[-1].find_elements(By.CSS_SELECTOR, "path.point")[i]
        ActionChains(driver).move_to_element(pt).click().perform()
        time.sleep(1.5)
        settle(driver, 60)
        after = card_title(driver)
        if after and after != before:
            return
    pytest.fail(f"clicking graph nodes never changed the card (still {before!r})")


@pytest.mark.slow
def test_every_page_renders_in_chromium(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    SHOTS.mkdir(parents=True, exist_ok=True)
    for name, path, title in PAGES:
        browser.get(f"{server}/{path}")
        main, count = MAIN[name]
        body = check_page(browser, title, main, count)
        if name == "home":
            assert "Run tiny" in body.replace("`", "")
        elif name == "image_explorer":
            button = next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text.startswith("Run "))
            button.click()
            WebDriverWait(browser, 240).until(lambda d: "Latents active on this image" in
                                              d.find_element(By.TAG_NAME, "body").text)
            body = check_page(browser, title, '[data-testid="stImage"] img', 4)
            assert "Prediction" in body
        elif name == "concept_graph":
            click_other_node(browser)
        elif name == "metrics":
            assert "Saliency benchmark" in body and "CAFE" in body
        time.sleep(1.0)  # let images and plots paint
        out = SHOTS / f"{name}.png"
        assert browser.save_screenshot(str(out)), out
        assert out.stat().st_size > 10_000
