"""The MLflow UI (`make ui`) in headless Chromium: it lists the stage runs and compares two of them."""

from __future__ import annotations

import os
import shutil
import sys

import psutil
import pytest

from pipeline.search_workers import free_port
from tests.conftest import http_service, job_runners
from tests.test_report import two_stages  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        message = "the browser test needs Debian's chromium and chromium-driver: `make browser` installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def ui(two_stages):  # noqa: F811
    """`python -m pipeline.ui` on the two runs' store, on a free loopback port; its URL once it answers."""
    cfg, ids = two_stages
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with http_service([sys.executable, "-m", "pipeline.ui", f"tracking.uri={cfg.tracking.uri}",
                       f"tracking.ui_port={port}"], url) as process:
        yield url, ids, process


def wait_for_text(driver, *texts: str, timeout: float = 90) -> str:
    """The page's text once it shows all `texts` (the UI keeps polling, so there is no idle moment to wait for)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: all(t in d.find_element(By.TAG_NAME, "body").text for t in texts))
    return driver.find_element(By.TAG_NAME, "body").text


def test_the_ui_lists_the_stage_runs_and_compares_two(ui, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, ids, process = ui
    browser.get(f"{url}/#/experiments/1/runs")
    # the experiment (one per data set) opens on its training runs, not on MLflow's GenAI views; one row per
    # pipeline execution, whose stage runs unfold under it
    text = wait_for_text(browser, "fashion_mnist", "Training runs", "by hand exec-1", "3 matching runs")
    assert "baseline" not in text
    browser.find_element(By.CSS_SELECTOR, 'button[data-component-id*="runnamecellrenderer"]').click()
    wait_for_text(browser, "baseline", "cnn")
    browser.save_screenshot(str(tmp_path / "runs.png"))

    runs = ",".join(f'"{ids[stage]}"' for stage in ("baseline", "cnn"))
    browser.get(f'{url}/#/compare-runs?runs=[{runs}]&experiments=["1"]')
    text = wait_for_text(browser, "Comparing 2 Runs", "test_accuracy", "best_val_accuracy")
    browser.save_screenshot(str(tmp_path / "compare.png"))
    assert ids["baseline"] in text and ids["cnn"] in text and "Artifacts" in text
    port = int(url.rsplit(":", 1)[1])
    listening = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    assert listening == {"127.0.0.1"}  # the default binds loopback only: no one else on the network sees the runs
    # one web server, none of MLflow's GenAI job runners (their start costs 20 CPU-seconds, and answers 2-6 s later)
    assert job_runners(process) == []
