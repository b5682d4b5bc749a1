"""Headless Debian Chromium driven by selenium (Debian `chromium` and `chromium-driver`), for
the operator page's tests: `chromium()` starts one (a test fails, not skips, without the
packages: .ci/run installs them), `wait()` polls a condition with a bound."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

__all__ = ["chromium", "wait"]


@contextmanager
def chromium(timeout_s: float, *extra_args: str, console: bool = False) -> Iterator[Any]:
    """A headless Chromium; `console`: keep the browser console for `driver.get_log`."""
    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail("chromium or chromedriver not found: install the Debian packages `chromium` "
                    "and `chromium-driver` (.ci/run does)")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                *extra_args):  # fmt: skip
        options.add_argument(arg)
    if console:
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(timeout_s)
    driver.set_script_timeout(timeout_s)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, condition: Callable[[Any], Any], message: str, timeout_s: float,
         poll_s: float = 0.2) -> Any:  # fmt: skip
    """`condition(driver)`'s first truthy value within `timeout_s` (the page redraws its rows on
    every poll: an element found a moment ago may be gone, which is retried, not an error)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    waiter = WebDriverWait(driver, timeout_s, poll_frequency=poll_s,
                           ignored_exceptions=(StaleElementReferenceException,))  # fmt: skip
    return waiter.until(condition, message)
