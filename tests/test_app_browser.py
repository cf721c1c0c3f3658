"""End to end: the real ``streamlit run`` server of ``sae-cafe view`` on 127.0.0.1, every page loaded in headless
Chromium (Debian's chromium + chromium-driver through selenium; server and browser from ``app.browser``),
checked for its main element and no error, and saved as a screenshot in ``docs/screenshots/``."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from app.browser import browser as chromium_browser
from app.browser import button, check_page, free_port, settle, unavailable, viewer  # noqa: F401 (re-exported)

SHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
# (file name of the screenshot, URL path, the page's title)
PAGES = [("home", "", "sae-cafe viewer"), ("latent_browser", "Latent_browser", "Latent browser"),
         ("image_explorer", "Image_explorer", "Image explorer"), ("concept_graph", "Concept_graph", "Concept graph"),
         ("metrics", "Metrics", "Metrics")]

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=f"{unavailable()}; CI installs them")
# the element that shows a page rendered its content: (CSS selector, how many)
MAIN = {"home": ('[data-testid="stDataFrame"]', 1),
        "latent_browser": ('[data-testid="stImage"] img', 3),  # the table, then a card's exemplar triplet
        "image_explorer": ('[data-testid="stImage"] img', 1),
        "concept_graph": (".js-plotly-plot", 2),  # the class graph and at least one case study
        "metrics": (".js-plotly-plot", 2)}  # insertion and deletion curves


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from app.sample import build_sample_run

    root = tmp_path_factory.mktemp("viewer_e2e")
    build_sample_run(root, "tiny")
    with viewer(root, tmp_path_factory.mktemp("log") / "streamlit.log") as s:
        yield s.url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium_browser(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


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
            button(browser, "Run ").click()  # waited for: see app.browser.button
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
