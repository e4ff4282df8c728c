"""The HTML page of ``rclip visualize --html`` in a real headless Chromium: thumbnails open the full pictures (relative
links), and the score slider and the class filter change what the page shows, in the page itself.

Needs Chromium, its driver and selenium (Debian: ``apt-get install chromium chromium-driver``; ``pip install
selenium``, in the ``dev`` extra); skipped when any is missing, run wherever they are installed (CI included).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage")


@pytest.fixture()
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    binary = next((b for b in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if b),
                  None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("no Chromium and chromedriver on this machine")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # An explicit driver: selenium never tries to download one.
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def test_slider_and_class_filter_work_in_the_page(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    rng = np.random.default_rng(0)
    for name in ("one", "two"):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    out = tmp_path / "vis"
    res = CliRunner().invoke(cli, ["visualize", str(tmp_path / "one.png"), str(tmp_path / "two.png"),
                                   "--variant", "tiny", "--out", str(out), "--html",
                                   "--score-thresh", "0", "--set", "zeroshot.score_thresh=0",
                                   "--set", "input.min_size=128"])
    assert res.exit_code == 0, res.output
    dets = json.loads((out / "detections.json").read_text())["detections"]
    browser.get((out / "index.html").as_uri())

    # thumbnails link to the full pictures beside the page, by relative paths
    links = browser.find_elements(By.CSS_SELECTOR, "figure a")
    assert [a.get_dom_attribute("href") for a in links] == ["one.png", "two.png"]
    assert all((out / a.get_dom_attribute("href")).is_file() for a in links)
    assert "RANDOM WEIGHTS" in browser.find_element(By.CSS_SELECTOR, ".notice").text

    boxes = browser.find_elements(By.CSS_SELECTOR, "svg g[data-score]")
    assert len(boxes) == len(dets) > 3  # the page draws every detection; the controls choose

    def shown() -> list[tuple[str, float]]:
        """The boxes the browser renders now (a hidden element has no layout boxes), in one round trip."""
        rendered = browser.execute_script(
            "return [...document.querySelectorAll('svg g[data-score]')].filter(g => g.getClientRects().length > 0)"
            ".map(g => [g.dataset.name, parseFloat(g.dataset.score)]);")
        return [(n, s) for n, s in rendered]

    slider = browser.find_element(By.ID, "thresh")
    slider.send_keys(Keys.HOME)  # score >= 0: every box
    assert len(shown()) == len(boxes) and browser.find_element(By.ID, "thresh-value").text == "0.00"
    scores = sorted(s for _, s in shown())
    step = int(scores[0] * 100) + 1  # the first slider position above the lowest score
    assert scores[-1] >= step / 100, scores  # random weights spread the 80 classes' scores over several steps
    while round(float(slider.get_property("value")) * 100) < step:  # the keyboard, as a user moves it
        slider.send_keys(Keys.ARROW_RIGHT)
    t = float(slider.get_property("value"))
    assert 0 < len(shown()) < len(boxes) and all(s >= t for _, s in shown())
    assert sum(s >= t for s in scores) == len(shown())
    assert browser.find_element(By.ID, "thresh-value").text == f"{t:.2f}"
    slider.send_keys(Keys.END)  # score >= 1: nothing
    assert shown() == []

    slider.send_keys(Keys.HOME)
    names = sorted({n for n, _ in shown()})
    Select(browser.find_element(By.ID, "cls")).select_by_value(names[0])
    assert shown() and {n for n, _ in shown()} == {names[0]}
    listed = browser.execute_script("return [...document.querySelectorAll('li[data-score]')]"
                                    ".filter(li => li.getClientRects().length > 0).map(li => li.textContent);")
    assert listed and all(text.startswith(names[0]) for text in listed)  # the caption list follows the filter
    Select(browser.find_element(By.ID, "cls")).select_by_value("")
    assert len(shown()) == len(boxes)
