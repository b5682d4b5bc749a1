"""The operator page (`/ui/`) in a real browser: headless Debian Chromium driven by selenium
(chromium-driver), on loopback, against the test app during a canary with requests flowing.

The page loads without a token and asks for one; a wrong token is refused with a message; the
right one shows the versions, live numbers, gates, the timeline and the history; the page
fits a phone-width window; it draws region waves, webhook counters and the A/B lift curve
without a script error; a click on Abort (confirmed in the dialog) rolls the canary back, as
the admin API then says; Start (confirmed) starts the declared plan again and Promote full
(confirmed) sends the candidate all traffic; and a waves document posted to the admin API
shows as one row per region. Screenshots of the live page are written under the test's tmp
dir (and copied to $ROLLOUT_TEST_ARTIFACTS when set). Every wait is bounded.
"""

from __future__ import annotations

import copy
import os
import random
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.support import loadgen
from tests.support.browser import chromium, wait
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
    # The console (script errors, console.error) is read back by _script_errors.
    with chromium(WAIT_S, "--window-size=1200,1500", console=True) as driver:
        yield driver


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


def _at_phone_width(browser, artifacts=None, screenshot: str | None = None) -> None:
    """At 375 px the page must not scroll sideways (a screenshot there, if asked); the window
    goes back to 1200x1500 after."""
    browser.set_window_size(375, 800)
    try:
        _wait(browser, lambda d: d.execute_script("return window.innerWidth <= 375"), "375 px")
        width = browser.execute_script("return document.scrollingElement.scrollWidth")
        assert width <= 375, f"the page scrolls sideways at phone width: {width} px"
        if screenshot is not None:
            _screenshot(browser, artifacts, screenshot)
    finally:
        browser.set_window_size(1200, 1500)


def _wait(driver, condition, message: str):
    return wait(driver, condition, message, WAIT_S)


def _attr(driver, selector: str, name: str) -> str | None:
    """An attribute of the element `selector` finds, read in one step (no stale reference)."""
    return driver.execute_script(
        "const e = document.querySelector(arguments[0]); return e && e.getAttribute(arguments[1]);",
        selector, name,
    )  # fmt: skip


# Each version row's request rate as the page shows it, read in one step.
_VERSION_RATES = """
const rows = document.querySelectorAll("#versions tbody tr[data-version]");
return Object.fromEntries(Array.from(rows).map((r) => [r.dataset.version,
                                                      r.querySelector(".rps").textContent]));
"""


def _assert_one_row_per_version(driver) -> None:
    shown = driver.execute_script(
        "return Array.from(document.querySelectorAll('#versions tbody tr[data-version]'))"
        ".map((r) => r.dataset.version);"
    )
    assert shown and len(shown) == len(set(shown)), f"versions table rows: {shown}"


# Each region row as the page shows it, read in one step: region, state, wave, text.
_REGION_ROWS = """
return Array.from(document.querySelectorAll("#waves li.region")).map((li) => ({
  region: li.dataset.region,
  state: li.querySelector(".region-state").textContent,
  wave: li.closest(".wave").dataset.wave,
  text: li.textContent,
}));
"""


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


def _script_errors(driver) -> list[dict]:
    """The console's SEVERE entries since the last read, other than failed requests (a 401 or
    409 answer is logged by the browser as a network error; the page handles those)."""
    return [e for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and e.get("source") != "network"]  # fmt: skip


def _command(driver, name: str, confirm_says: str) -> None:
    """Click a command's button and confirm it in the dialog."""
    from selenium.webdriver.common.by import By

    button = driver.find_element(By.CSS_SELECTOR, f'[data-command="{name}"]')
    _wait(driver, lambda d: button.is_enabled(), f"the {name} button enabled")
    button.click()
    dialog = driver.find_element(By.ID, "confirm")
    _wait(driver, lambda d: dialog.get_attribute("open") is not None, "the confirmation dialog")
    assert confirm_says in _text(driver, "#confirm-text")
    assert _text(driver, "#confirm-ok") == button.text
    driver.find_element(By.ID, "confirm-ok").click()


def _enabled(driver) -> set[str]:
    from selenium.webdriver.common.by import By

    buttons = driver.find_elements(By.CSS_SELECTOR, "[data-command]")
    assert len(buttons) == 6, [b.get_attribute("data-command") for b in buttons]
    return {b.get_attribute("data-command") for b in buttons if b.is_enabled()}


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
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    cluster, _ = canary
    _sign_in(browser, f"{cluster.url}/ui/", TOKEN)

    seen = {}

    def live_rows(driver):
        # Read in one step: the page redraws the rows on every poll.
        seen.update(rows=driver.execute_script(_VERSION_RATES), error=_text(driver, "#error"))
        rates = {v: _number(text) for v, text in seen["rows"].items()}
        if set(rates) != {"v1", "v2"}:
            return False
        return all(rate is not None and rate > 0 for rate in rates.values()) and rates

    try:
        rates = _wait(browser, live_rows, "both versions with a request rate over 0")
    except TimeoutException:
        versions = _admin(cluster).get("versions")
        pytest.fail(f"no request rate over 0 for both versions on the page: it shows {seen}; "
                    f"the admin API says {versions}")  # fmt: skip
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

    _at_phone_width(browser, artifacts, "operator-page-phone.png")


# Wraps the page's fetch: the status it reads gets these keys where the controller sent none
# (missing, null or empty), so the page draws every section whatever this controller reports.
_ADD_TO_STATUS = """
const extra = arguments[0];
const original = window.fetch.bind(window);
window.fetch = async (url, init) => {
  const response = await original(url, init);
  if ((init && init.method) !== "GET" || !String(url).endsWith("/admin/rollout") || !response.ok) {
    return response;
  }
  const body = await response.json();
  for (const [key, value] of Object.entries(extra)) {
    const have = body[key];
    if (have === undefined || have === null || (Array.isArray(have) && !have.length)) {
      body[key] = value;
    }
  }
  return new Response(JSON.stringify(body),
                      {status: response.status, headers: {"content-type": "application/json"}});
};
"""


def _waves(now: float, first: dict, second: dict) -> dict:
    """A waves document as the orchestrator publishes it (`status["waves"]` adds the
    controller's `received_at`): two waves of one region each."""
    return {"name": "recommender-v2", "published_at": now, "on_failure": "halt",
            "phase": "running", "current_wave": 1,
            "waves": [{"index": 0, "state": "succeeded", "bake_until": None, "regions": [first]},
                      {"index": 1, "state": "running", "bake_until": None, "regions": [second]}]}  # fmt: skip


US_EAST = {"region": "us-east-1", "state": "succeeded", "phase": "succeeded", "step": "done",
           "weights": {"v2": 100.0}, "reason": None}  # fmt: skip
EU_WEST = {"region": "eu-west-1", "state": "running", "phase": "paused",
           "step": "2/3: wait for promote", "weights": {"v1": 70.0, "v2": 30.0},
           "reason": "waiting for an operator to promote"}  # fmt: skip


def test_the_page_draws_regions_notifications_and_the_lift_curve(canary, browser, artifacts):
    """Every new section at once, from the status the page reads (with what this controller
    does not report added to it in the browser): no script error in the console, and the
    page still fits a phone."""
    from selenium.webdriver.common.by import By

    cluster, _ = canary
    _sign_in(browser, f"{cluster.url}/ui/", TOKEN)
    _wait(browser, lambda d: _text(d, "#phase") == "paused", "the paused canary on the page")
    _script_errors(browser)  # what came before (the wrong token's 401s) is not this test's
    now = time.time()
    series = [{"t": now - 300 + 10 * i, "lift": 0.02 + 0.004 * (i % 3),
               "low": 0.02 - 0.3 / (i + 2), "high": 0.02 + 0.3 / (i + 2),
               "verdict": "better" if i >= 20 else None} for i in range(30)]  # fmt: skip
    series[3] = {"t": now - 270, "lift": None, "low": None, "high": None, "verdict": None}
    extra = {
        "ab_series": series,
        "notifications": {
            "ops-slack": {"queued": 9, "sent": 6, "failed": 2, "dropped": 0, "retries": 4,
                          "last_error": "HTTP 503 from the webhook", "pending": 1},
            "audit": {"queued": 8, "sent": 8, "failed": 0, "dropped": 0, "retries": 0,
                      "last_error": None, "pending": 0},
        },
        "waves": {**_waves(now, US_EAST, EU_WEST), "received_at": now},
    }  # fmt: skip
    browser.execute_script(_ADD_TO_STATUS, extra)

    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#ab-chart path.lift-line"),
          "the lift curve")  # fmt: skip
    assert browser.find_elements(By.CSS_SELECTOR, "#ab-chart path.lift-band")
    assert browser.find_elements(By.CSS_SELECTOR, "#ab-chart line.zero")
    assert "better" in _text(browser, "#ab-chart .lift-verdict")
    _wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#waves li.region")) == 2,
          "two region rows")  # fmt: skip
    assert "as of" in _text(browser, "#waves-age") and "stale" not in _text(browser, "#waves-age")
    slack = '#notifications tr[data-webhook="ops-slack"]'
    assert _text(browser, f"{slack} .failed") == "2"
    assert "bad" in _attr(browser, f"{slack} .failed", "class").split()
    assert "bad" not in _attr(browser, '#notifications tr[data-webhook="audit"] .failed', "class")
    assert "HTTP 503 from the webhook" in _text(browser, "#notifications")
    # The existing sections are all still drawn.
    assert _text(browser, '#versions tr[data-version="v2"] .share') == "30%"
    assert _attr(browser, "#error", "hidden") is not None
    path = _screenshot(browser, artifacts, "operator-page-sections.png")
    assert path.stat().st_size > 10_000

    _at_phone_width(browser)
    time.sleep(2)  # a redraw or two more at each width; anything thrown is in the console
    errors = _script_errors(browser)
    assert not errors, errors
    assert _attr(browser, "#error", "hidden") is not None
    browser.refresh()  # the page's own fetch again, for the tests that follow


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
    # An ended rollout takes only start: the page greys the others out (the API says 409).
    _wait(browser, lambda d: _enabled(d) == {"start"}, "only start enabled")
    events = cluster.client.get("/admin/rollout/history", headers=ADMIN).json()["events"]
    assert events[-1]["to_phase"] == "aborted" and "operator-page" in events[-1]["reason"]
    _screenshot(browser, artifacts, "operator-page-aborted.png")


def test_start_and_promote_full_from_the_page(canary, browser, artifacts):
    """After the abort, Start (confirmed) runs the declared plan again: the canary at 30%,
    waiting for promote; then Promote full (confirmed) sends the candidate all traffic."""
    cluster, _ = canary
    _sign_in(browser, f"{cluster.url}/ui/", TOKEN)
    _wait(browser, lambda d: _text(d, "#phase") == "aborted", "the aborted canary on the page")
    _command(browser, "start", "declared plan")

    def restarted():
        status = _admin(cluster)
        return status["phase"] == "paused" and status["weights"].get("v2") == 30 and status

    wait_for_condition(restarted, timeout_s=60, message="the plan started again, paused at 30%")
    events = cluster.client.get("/admin/rollout/history", headers=ADMIN).json()["events"]
    assert "start" in events[0]["reason"] and "operator-page" in events[0]["reason"]
    _wait(browser, lambda d: _text(d, "#phase") == "paused", "the page showing paused")
    # Paused: everything but start and pause (resume too: the state machine takes it in
    # `paused`, and answers a wait for promote with a 409 that says "use promote").
    _wait(browser, lambda d: _enabled(d) == {"promote", "promote-full", "resume", "abort"},
          "the commands of a paused rollout enabled")  # fmt: skip

    _command(browser, "promote-full", "all traffic")

    def promoted():
        status = _admin(cluster)
        return (status["phase"] in ("promoting", "succeeded")
                and status["weights"].get("v2") == 100 and status)  # fmt: skip

    status = wait_for_condition(promoted, timeout_s=WAIT_S, message="v2 at 100%")
    assert status["weights"].get("v1", 0) == 0
    _wait(browser, lambda d: "promote-full: done" in _text(d, "#command-result"),
          "the command's result")  # fmt: skip
    _wait(browser, lambda d: _text(d, '#versions tr[data-version="v2"] .share') == "100%",
          "the page showing v2 at 100%")  # fmt: skip
    _assert_one_row_per_version(browser)
    events = cluster.client.get("/admin/rollout/history", headers=ADMIN).json()["events"]
    assert any("promote_full" in e["reason"] and "operator-page" in e["reason"] for e in events)
    _screenshot(browser, artifacts, "operator-page-promoted.png")


def test_region_waves_show_one_row_per_region(canary, browser, artifacts):
    """A waves document posted to the admin API (`POST /admin/waves`, what the waves
    orchestrator publishes) is on the page: one row per region, grouped by wave, with its
    name and state."""

    cluster, _ = canary
    document = _waves(time.time(), US_EAST, EU_WEST)
    posted = cluster.client.post("/admin/waves", json=document, headers=ADMIN)
    assert posted.is_success, f"POST /admin/waves: {posted.status_code} {posted.text[:300]}"
    wait_for_condition(lambda: (_admin(cluster).get("waves") or {}).get("name") == document["name"],
                       timeout_s=WAIT_S, message="the waves in GET /admin/rollout")  # fmt: skip
    _sign_in(browser, f"{cluster.url}/ui/", TOKEN)
    shown = _wait(browser, lambda d: len(rows := d.execute_script(_REGION_ROWS)) == 2 and rows,
                  "two region rows")  # fmt: skip
    rows = {r["region"]: r for r in shown}
    assert set(rows) == {"us-east-1", "eu-west-1"}
    assert {name: r["state"] for name, r in rows.items()} == {
        "us-east-1": "succeeded", "eu-west-1": "running"}  # fmt: skip
    assert [rows["us-east-1"]["wave"], rows["eu-west-1"]["wave"]] == ["0", "1"]
    assert "waiting for an operator" in rows["eu-west-1"]["text"]
    assert "as of" in _text(browser, "#waves-age")
    _assert_one_row_per_version(browser)  # the rollout has ended: v2 is stable and candidate
    path = _screenshot(browser, artifacts, "operator-page-regions.png")
    assert path.stat().st_size > 10_000
