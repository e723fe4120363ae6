"""The status page in a real headless browser: Debian's ``chromium`` and ``chromium-driver``, driven with
selenium (no browser or driver is downloaded at run time).

Loads ``/status`` at a laptop's width, follows the link to a CID, and takes screenshots at a laptop's and a
phone's width (kept under the test's temporary directory, and copied to ``$RCDS_SCREENSHOT_DIR`` if set).
Skips when chromium, its driver or selenium is missing, unless ``RCDS_REQUIRE_TOOLS=1`` (CI), where that
is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from server import RcdsServer, make_tarball

LAPTOP = (1366, 900)
PHONE = (390, 844)


def _require(what: str) -> None:
    message = (
        f"the browser test needs {what} (apt-get install -y chromium chromium-driver; pip install selenium)"
    )
    if os.environ.get("RCDS_REQUIRE_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def _tools() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    if browser is None:
        _require("chromium")
    if driver is None:
        _require("chromedriver")
    assert browser is not None and driver is not None
    return browser, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    binary, driver_path = _tools()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _require("selenium")
        raise
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(flag)
    # The driver is given: selenium's own manager would otherwise try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcdsServer]:
    srv = RcdsServer(tmp_path_factory.mktemp("srv"), top_config="").start()
    try:
        for i in range(6):
            files = {"run.sh": "#!/bin/sh\necho hi\n", f"src/mod{i}.py": "x = 1\n" * (200 * (i + 1))}
            assert srv.publish(f"myexp/code{i}", make_tarball(files)).text == "OK\n"
        assert srv.publish("myexp/broken", make_tarball({"/etc/passwd": "root\n"})).text == "OK\n"
        for i in range(6):
            srv.wait_state(f"myexp/code{i}")
        assert srv.wait_state("myexp/broken")["state"] == "failed"
        yield srv
    finally:
        srv.close()


def _save(driver: Any, name: str, tmp_path: Path) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), name
    assert path.stat().st_size > 5000  # a real picture, not an empty page
    target = os.environ.get("RCDS_SCREENSHOT_DIR")
    if target:
        shutil.copy(path, Path(target) / name)
    return path


def _fits(driver: Any) -> bool:
    """No sideways scrolling of the page itself (wide tables scroll inside their own box)."""
    return bool(driver.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1"))


def test_status_page_in_a_browser(browser: Any, server: RcdsServer, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.set_window_size(*LAPTOP)
    browser.get(f"{server.url}/")  # redirects to /status
    assert browser.current_url.endswith("/status")
    assert browser.title.startswith("rcds status")
    text = browser.find_element(By.TAG_NAME, "main").text
    assert "Repositories" in text and "Recent publishes" in text
    assert "rejected: " in text  # the failed publish, with its reason
    charts = browser.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) >= 4 and all(c.size["width"] > 250 and c.size["height"] > 50 for c in charts)
    assert _fits(browser)
    _save(browser, "status-laptop.png", tmp_path)

    browser.set_window_size(*PHONE)
    browser.get(f"{server.url}/status")
    assert _fits(browser), "the page must not scroll sideways on a phone"
    cards = browser.find_elements(By.CSS_SELECTOR, ".card")
    assert cards and all(c.size["width"] < PHONE[0] / 2 for c in cards)  # two per row
    _save(browser, "status-phone.png", tmp_path)

    browser.set_window_size(*LAPTOP)
    browser.get(f"{server.url}/status")
    browser.find_element(By.LINK_TEXT, "myexp/code3").click()
    assert "/status/cid?cid=myexp/code3" in browser.current_url
    facts = browser.find_element(By.CSS_SELECTOR, "dl.facts").text
    assert "published" in facts and "/cvmfs/" in facts and "expires" in facts
    tree = browser.find_element(By.ID, "tree").text
    assert tree.startswith("Tree (")
    body = browser.find_element(By.TAG_NAME, "main").text
    assert "src/mod3.py" in body and "run.sh" in body
    _save(browser, "status-cid.png", tmp_path)
    browser.set_window_size(*PHONE)
    browser.refresh()
    assert _fits(browser), "the CID page must not scroll sideways on a phone"
    _save(browser, "status-cid-phone.png", tmp_path)
    browser.set_window_size(*LAPTOP)
    browser.find_element(By.PARTIAL_LINK_TEXT, "status").click()
    assert browser.current_url.endswith("/status")
