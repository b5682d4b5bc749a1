"""The operator page (`/ui/`) in a real browser: headless Debian Chromium driven by selenium
(chromium-driver), on loopback, against the test app during a canary with requests flowing.

The page loads without a token and asks for one; a wrong token is refused with a message; the
right one shows the versions, live numbers, gates, the timeline and the history; the page
fits a phone-width window; and a click on Abort (confirmed in the dialog) rolls the canary
back, as the admin API then says. A screenshot of the live page is written under the test's
tmp dir (and copied to $ROLLOUT_TEST_ARTIFACTS when set). Every wait is bounded.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
from pathlib import Path

import httpx
import pytest

from tests.support import loadgen
from tests.support.serving import APP, forget_rollouts, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-ui-0123456789abcdef"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
BODY = infer_body(["user loves science fiction films"], ["space opera", "cooking show"])
# The canary waits at 30% for an operator (`pause_s: null`): the page has time to show it.
PLAN = {
    "strategy": "canary", "candidate": "v2", "stable": "v1",
    "canary": {"steps": [{"set_weight": 30}, {"pause_s": None}, {"set_weight": 100}]},
    "gates": {"min_requests": 10, "fail_fast_min_requests": 5, "max_p99_latency_ratio": None},
}  # fmt: skip
WAIT_S = 30  # the longest any one browser wait may take


def _infer(client: httpx.Client, rng: random.Random, index: int) -> str | None:
    r = client.post(f"/v2/models/{APP}/infer", json=BODY,
                    headers={"x-user-id": f"user-{rng.randrange(100_000)}"})  # fmt: skip
    return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"


def _admin(cluster) -> dict:
    return cluster.client.get("/admin/rollout", headers=ADMIN).json()


@pytest.fixture(scope="module")
def canary(cluster, tiny_models, tmp_path_factory):
    """v1 stable, v2 a canary paused at 30% by its plan, and a small background load."""
    tmp = tmp_path_factory.mktemp("ui")
    token_file = tmp / "admin_token"
    token_file.write_text(TOKEN + "\n")
    versions = [
        model_config(tmp, tmp, "v1", tiny_models["a"]),
        model_config(tmp, tmp, "v2", tiny_models["b"]),
    ]
    config = serve_config(versions, {"v1": 100}, public_status=False)
    config["applications"][0]["runtime_env"] = {
        "env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": str(token_file)}
    }
    forget_rollouts()
    token_before, cluster.admin_token = cluster.admin_token, TOKEN
    declared = copy.deepcopy(config)
    declared["applications"][0]["deployments"].append(
        {"name": "RolloutController", "user_config": {"plan": PLAN, "tick_interval_s": 0.25}}
    )
    cluster.serve_deploy(declared, tmp)
    cluster.wait_running()
    with loadgen.Load(cluster.url, _infer, clients=2) as load:
        wait_for_condition(lambda: _admin(cluster).get("phase") == "paused", timeout_s=60,
                           message="the canary paused at 30%")  # fmt: skip
        yield cluster, load
    cluster.admin_token = token_before
    assert not load.errors, load.errors[:5]


@pytest.fixture(scope="module")
def browser(canary):
    chromium = shutil.which("chromium")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("chromium or chromedriver not found: install the Debian packages `chromium` "
                    "and `chromium-driver` (.ci/run does)")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--window-size=1200,1500"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-artifacts")


def _screenshot(driver, artifacts: Path, name: str) -> Path:
    """Save a screenshot under the test's tmp dir, and copy it to $ROLLOUT_TEST_ARTIFACTS."""
    path = artifacts / name
    assert driver.save_screenshot(str(path)), f"no screenshot written to {path}"
    target = os.environ.get("ROLLOUT_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(condition, message)


def _text(driver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector).text


def _sign_in(driver, url: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    driver.execute_script("sessionStorage.clear()")
    driver.get(url)
    field = _wait(driver, lambda d: d.find_element(By.ID, "token"), "the token form")
    _wait(driver, lambda d: field.is_displayed(), "the token form shown")
    field.send_keys(token)
    driver.find_element(By.ID, "login-button").click()


def _number(text: str) -> float | None:
    try:
        return float(text.strip().rstrip("%").split()[0])
    except (ValueError, IndexError):
        return None


def test_a_wrong_token_is_refused_with_a_message(canary, browser):
    cluster, _ = canary
    _sign_in(browser, f"{cluster.url}/ui/", "not-the-admin-token-at-all")
    _wait(browser, lambda d: "401" in _text(d, "#login-error"), "the refusal message")
    assert "Refused" in _text(browser, "#login-error")
    assert browser.execute_script("return sessionStorage.length") == 0  # the bad token is gone
    assert not _text(browser, "#dashboard")  # hidden
    assert "token" not in browser.current_url


def test_the_page_shows_the_canary_live(canary, browser, artifacts):
    from selenium.webdriver.common.by import By

    cluster, _ = canary
    _sign_in(browser, f"{cluster.url}/ui/", TOKEN)

    def live_rows(driver):
        rows = driver.find_elements(By.CSS_SELECTOR, "#versions tbody tr[data-version]")
        cells = {r.get_attribute("data-version"): r for r in rows}
        if set(cells) != {"v1", "v2"}:
            return False
        rates = {v: _number(r.find_element(By.CSS_SELECTOR, ".rps").text) for v, r in cells.items()}
        return all(rate is not None and rate > 0 for rate in rates.values()) and rates

    rates = _wait(browser, live_rows, "both versions with a request rate over 0")
    assert rates
    assert _text(browser, "#phase") == "paused"
    assert _text(browser, "#model") == APP
    assert _text(browser, '#versions tr[data-version="v2"] .share') == "30%"
    assert _text(browser, '#versions tr[data-version="v1"] .share') == "70%"
    assert _text(browser, '#versions tr[data-version="v2"] .errors') == "0.0%"
    assert "ms" in _text(browser, '#versions tr[data-version="v2"] .p99')
    _wait(browser, lambda d: "max_error_rate" in _text(d, "#gates"), "the error-rate gate")
    verdicts = browser.find_elements(By.CSS_SELECTOR, "#gates .verdict")
    assert verdicts and {v.text.lower() for v in verdicts} <= {"passed", "pending", "failed"}
    _wait(browser, lambda d: d.execute_script(
        "return document.querySelectorAll('#charts path.series').length >= 2"), "the timeline")  # fmt: skip
    assert "progressing" in _text(browser, "#events")
    assert _text(browser, "#live") == "live"
    assert "token" not in browser.current_url.lower()
    assert browser.execute_script("return document.cookie") == ""
    path = _screenshot(browser, artifacts, "operator-page.png")
    assert path.stat().st_size > 10_000

    browser.set_window_size(375, 800)
    try:
        _wait(browser, lambda d: d.execute_script("return window.innerWidth <= 375"), "375 px")
        width = browser.execute_script("return document.scrollingElement.scrollWidth")
        assert width <= 375, f"the page scrolls sideways at phone width: {width} px"
        _screenshot(browser, artifacts, "operator-page-phone.png")
    finally:
        browser.set_window_size(1200, 1500)


def test_abort_from_the_page_rolls_the_canary_back(canary, browser, artifacts):
    from selenium.webdriver.common.by import By

    cluster, _ = canary
    if not browser.find_elements(By.CSS_SELECTOR, "#dashboard:not([hidden])"):
        _sign_in(browser, f"{cluster.url}/ui/", TOKEN)
    _wait(browser, lambda d: _text(d, "#phase") == "paused", "the paused canary on the page")
    browser.find_element(By.CSS_SELECTOR, '[data-command="abort"]').click()
    dialog = browser.find_element(By.ID, "confirm")
    _wait(browser, lambda d: dialog.get_attribute("open") is not None, "the confirmation dialog")
    assert "stable" in _text(browser, "#confirm-text")
    browser.find_element(By.ID, "confirm-ok").click()

    def rolled_back():
        status = _admin(cluster)
        return status["phase"] == "aborted" and status["weights"].get("v2") == 0 and status

    status = wait_for_condition(rolled_back, timeout_s=WAIT_S, message="the canary aborted")
    assert status["weights"]["v1"] == 100
    _wait(browser, lambda d: _text(d, "#phase") == "aborted", "the page showing aborted")
    _wait(browser, lambda d: "done" in _text(d, "#command-result"), "the command's result")
    # An ended rollout takes no more commands: the page greys them out (the API says 409).
    buttons = browser.find_elements(By.CSS_SELECTOR, "[data-command]")
    assert len(buttons) == 4 and not any(b.is_enabled() for b in buttons)
    events = cluster.client.get("/admin/rollout/history", headers=ADMIN).json()["events"]
    assert events[-1]["to_phase"] == "aborted" and "operator-page" in events[-1]["reason"]
    _screenshot(browser, artifacts, "operator-page-aborted.png")
