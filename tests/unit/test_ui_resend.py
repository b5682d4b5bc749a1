"""The operator page re-sends a command that met a transient failure, with the same
Idempotency-Key: in headless Chromium (Debian `chromium` and `chromium-driver`, as
tests/integration/test_ui.py), against a scripted admin API on loopback (uvicorn in a thread,
no Ray). The page's own files are served as the Router serves them (`app.ui.operator_page`).

Promote first meets the ingress's own plain-text 500 (what HAProxy answers for a Router that
died under the request), then a 503 with `Retry-After: 0`, then succeeds: the page says it is
sending it again, ends with "promote: done", and all three sends carry one key. A 409 is not
re-sent. Every wait is bounded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from app.ui import operator_page
from tests.support.browser import chromium, wait

TOKEN = "test-admin-token-resend-0123456789"
WAIT_S = 20
STATUS = {
    "model": "recommender", "phase": "paused", "strategy": "canary", "candidate": "v2",
    "stable": "v1", "step_index": 1, "steps_total": 3, "weights": {"v1": 70.0, "v2": 30.0},
    "versions": {}, "verdicts": [], "generation": 3,
}  # fmt: skip


class AdminScript:
    """POST answers in order per command (the last one repeats); every POST's key is kept."""

    def __init__(self) -> None:
        self.answers: dict[str, list[Response]] = {}
        self.keys: dict[str, list[str | None]] = {}

    async def command(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        name = request.path_params["command"]
        self.keys.setdefault(name, []).append(request.headers.get("idempotency-key"))
        answers = self.answers.get(name) or [JSONResponse({"error": "no script"}, 404)]
        return answers.pop(0) if len(answers) > 1 else answers[0]


def _app(script: AdminScript) -> Starlette:
    async def status(request: Request) -> Response:
        return JSONResponse(STATUS)

    async def history(request: Request) -> Response:
        return JSONResponse({"events": []})

    async def router_status(request: Request) -> Response:
        return JSONResponse({})

    return Starlette(routes=[
        Route("/admin/rollout", status), Route("/admin/rollout/history", history),
        Route("/admin/rollout/{command}", script.command, methods=["POST"]),
        Route("/status", router_status), Mount("/ui", operator_page()),
    ])  # fmt: skip


@pytest.fixture(scope="module")
def page() -> Iterator[tuple[str, AdminScript]]:
    script = AdminScript()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app(script), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert time.monotonic() < deadline, "the scripted admin API did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", script
    finally:
        server.should_exit = True
        thread.join(WAIT_S)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium(WAIT_S) as driver:
        yield driver


def _wait(driver, condition, message: str) -> Any:
    return wait(driver, condition, message, WAIT_S, poll_s=0.05)


def _result(driver) -> str:
    return driver.execute_script("return document.getElementById('command-result').textContent")


def _send(driver, url: str, name: str) -> None:
    """Sign in (once), click `name`'s button and confirm it."""
    from selenium.webdriver.common.by import By

    if not driver.find_elements(By.CSS_SELECTOR, "#dashboard:not([hidden])"):
        driver.get(f"{url}/ui/")
        field = _wait(driver, lambda d: d.find_element(By.ID, "token"), "the token form")
        field.send_keys(TOKEN)
        driver.find_element(By.ID, "login-button").click()
    button = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, f'[data-command="{name}"]'),
                   f"the {name} button")  # fmt: skip
    _wait(driver, lambda d: button.is_enabled(), f"the {name} button enabled")
    button.click()
    dialog = driver.find_element(By.ID, "confirm")
    _wait(driver, lambda d: dialog.get_attribute("open") is not None, "the confirmation dialog")
    driver.find_element(By.ID, "confirm-ok").click()


def test_a_command_that_met_a_transient_failure_is_sent_again_with_its_key(page, browser):
    url, script = page
    script.answers["promote"] = [
        PlainTextResponse("Internal Server Error", status_code=500),  # HAProxy's own page
        JSONResponse({"error": "promote is not stored yet"}, 503, headers={"retry-after": "0"}),
        JSONResponse({**STATUS, "phase": "progressing", "step_index": 2}),
    ]
    _send(browser, url, "promote")
    seen: list[str] = []

    def done(driver) -> bool:
        text = _result(driver)
        if not seen or seen[-1] != text:
            seen.append(text)
        return text.startswith("promote: done")

    _wait(browser, done, "promote done after two re-sends")
    keys = script.keys["promote"]
    assert len(keys) == 3 and keys[0] and len(set(keys)) == 1, keys
    assert any("500 from the ingress; sending it again" in text for text in seen), seen


def test_a_refusal_is_not_sent_again_and_a_new_click_sends_a_new_key(page, browser):
    url, script = page
    script.answers["resume"] = [JSONResponse({"error": "the rollout is resumed already"}, 409)]
    _send(browser, url, "resume")
    _wait(browser, lambda d: "refused" in _result(d), "the refusal shown")
    assert "the rollout is resumed already" in _result(browser)
    assert len(script.keys["resume"]) == 1
    _send(browser, url, "resume")
    _wait(browser, lambda d: len(script.keys["resume"]) == 2, "the second click sent")
    first, second = script.keys["resume"]
    assert first and second and first != second


_BUTTONS_DISABLED = """
return Array.from(document.querySelectorAll("[data-command]")).every((b) => b.disabled);
"""


def test_every_button_waits_while_a_command_is_being_sent_again(page, browser):
    # A second click while the page re-sends would be a new command with a new key (a second
    # promote skips a step): the buttons stay disabled until the answer, then follow the phase.
    url, script = page
    script.answers["promote"] = [
        JSONResponse({"error": "the controller is restarting"}, 503, headers={"retry-after": "2"}),
        JSONResponse({**STATUS, "phase": "progressing"}),
    ]
    _send(browser, url, "promote")
    _wait(browser, lambda d: "sending it again in 2 s" in _result(d), "the re-send announced")
    assert browser.execute_script(_BUTTONS_DISABLED), "a button was enabled during the re-send"
    _wait(browser, lambda d: _result(d).startswith("promote: done"), "promote done")
    _wait(browser, lambda d: not d.execute_script(_BUTTONS_DISABLED), "the buttons back")
    assert len(script.keys["promote"]) >= 2 and len(set(script.keys["promote"][-2:])) == 1
