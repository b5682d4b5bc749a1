"""Rollout notifications (app/rollout/notify.py) against a real HTTP receiver on 127.0.0.1.

No mock of httpx: the Notifier posts over a real socket to a `http.server` in a thread, which
answers what each test scripts (statuses, Retry-After, a hang). Only the backoff's sleep is
passed in, so the waits are recorded instead of waited.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.rollout.notify import (
    NotificationSettings,
    Notifier,
    backoff_s,
    event_kind,
    json_message,
    slack_message,
)
from app.rollout.plan import ControllerUserConfig
from tests.support.webhooks import WebhookReceiver as Receiver

T0 = 1_765_000_000.0
CONTEXT = {"candidate": "v2", "stable": "v1", "strategy": "canary", "plan": "d2999d4d"}
READINGS = {
    "max_error_rate": {"status": "failed", "value": 0.6, "threshold": 0.05,
                       "reason": "error rate 6/10 > 0.05"},
    "max_p99_latency_ratio": {"status": "passed", "value": 1.1, "threshold": 1.5,
                              "reason": "p99 1.1x stable <= 1.5x"},
}  # fmt: skip


def event(frm: str, to: str, reason: str, *, step: int = 0, weight: float = 10.0,
          gates: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """An `Event.to_dict()` as app/rollout/machine.py writes it."""
    return {"time_s": T0 + step, "from_phase": frm, "to_phase": to, "step_index": step,
            "weight": weight, "reason": reason, "gates": gates or {}}  # fmt: skip


ROLLED_BACK = event("progressing", "rolled_back",
                    "rolled back: gate max_error_rate failed: error rate 6/10 > 0.05",
                    step=2, weight=0.0, gates=READINGS)  # fmt: skip


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def secret(tmp_path: Path, name: str, value: str) -> str:
    path = tmp_path / name
    path.write_text(value + "\n")
    return str(path)


class Sleeps:
    """The backoff's sleep, recorded (and yielding to the loop) instead of waited."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def notifier(settings: dict[str, Any], sleeps: Sleeps | None = None) -> Notifier:
    n = Notifier("recommender", sleep=sleeps or Sleeps())
    n.configure(NotificationSettings.model_validate(settings))
    return n


def send(n: Notifier, events: list[dict[str, Any]]) -> None:
    async def go() -> None:
        n.notify(events, **CONTEXT)
        await n.drain()
        await n.aclose()

    asyncio.run(go())


# -- kinds and formats ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ev", "kind"),
    [
        (event("idle", "idle", "command start (alice)"), "declared"),
        (event("idle", "progressing", "started: canary rollout of v2 (stable v1), plan x"), "started"),
        (event("progressing", "progressing", "step 1/4: set_weight 10%"), "step"),
        (event("progressing", "paused", "command pause (bob)"), "paused"),
        (event("progressing", "paused", "step 3/4: analysis inconclusive: ..."), "paused"),
        (event("paused", "progressing", "command resume"), "resumed"),
        (event("progressing", "promoting", "step 4/5: switch to 100%"), "promoted"),
        (event("paused", "progressing", "command promote (carol)"), "promoted"),
        (ROLLED_BACK, "rolled_back"),
        (event("progressing", "aborted", "aborted: command abort"), "aborted"),
        (event("promoting", "succeeded", "succeeded: v2 is stable"), "succeeded"),
    ],
)  # fmt: skip
def test_event_kinds(ev, kind):
    assert event_kind(ev) == kind


def test_json_message_carries_the_reason_and_the_gate_readings():
    body = json_message(ROLLED_BACK, {"model": "recommender", **CONTEXT})
    assert body["event"] == "rolled_back" and body["model"] == "recommender"
    assert body["candidate"] == "v2" and body["stable"] == "v1" and body["plan"] == "d2999d4d"
    assert body["reason"].startswith("rolled back: gate max_error_rate failed")
    assert body["failed_gates"] == ["max_error_rate"]  # "gate failed"
    assert body["gates"]["max_error_rate"]["value"] == 0.6
    assert body["phase"] == "rolled_back" and body["weight"] == 0.0
    assert body["time"].startswith("2025-12-06T")
    json.dumps(body)  # JSON-safe


def test_slack_message_is_a_slack_incoming_webhook_body():
    body = slack_message(ROLLED_BACK, {"model": "recommender", **CONTEXT})
    assert "rolled back" in body["text"] and "max_error_rate" in body["text"]
    attachment = body["attachments"][0]
    assert attachment["color"] == "#c62828"
    blocks = attachment["blocks"]
    assert all(b["type"] in ("section", "context") for b in blocks)
    assert "error rate 6/10 > 0.05" in blocks[0]["text"]["text"]  # the reason
    fields = [f["text"] for f in blocks[1]["fields"]]
    assert fields[0].startswith(":x: *max_error_rate*: failed, 0.6 (limit 0.05)")  # failed first
    assert "max_p99_latency_ratio" in fields[1]


def test_slack_shows_at_most_ten_gate_fields():
    gates = {f"gate{i:02d}": {"status": "passed", "value": i, "threshold": 1} for i in range(13)}
    body = slack_message(event("progressing", "progressing", "step", gates=gates), CONTEXT)
    blocks = body["attachments"][0]["blocks"]
    assert len(blocks[1]["fields"]) == 10
    assert "and 3 more gates" in blocks[2]["elements"][0]["text"]


# -- delivery to a real receiver -------------------------------------------------------------------


def test_both_formats_reach_a_real_receiver_with_the_token_from_a_file(receiver, tmp_path):
    n = notifier({"webhooks": [
        {"name": "ops-json", "url_file": secret(tmp_path, "json-url", receiver.url + "/json"),
         "token_file": secret(tmp_path, "token", "s3cret-token")},
        {"name": "ops-slack", "format": "slack",
         "url_file": secret(tmp_path, "slack-url", receiver.url + "/slack")},
    ]})  # fmt: skip
    started = event("idle", "progressing", "started: canary rollout of v2 (stable v1), plan x")
    send(n, [started, ROLLED_BACK])
    assert [b["event"] for b in receiver.bodies("/json")] == ["started", "rolled_back"]
    slack = receiver.bodies("/slack")
    assert len(slack) == 2 and "rolled back" in slack[1]["text"]
    assert slack[1]["attachments"][0]["blocks"]
    auth = {r["path"]: r["headers"].get("authorization") for r in receiver.requests}
    assert auth == {"/json": "Bearer s3cret-token", "/slack": None}
    assert n.stats()["ops-json"]["sent"] == 2 and n.stats()["ops-slack"]["sent"] == 2


def test_retries_with_exponential_backoff_until_delivered(receiver, tmp_path):
    receiver.script = [(503, {}), (502, {}), (500, {})]
    sleeps = Sleeps()
    n = notifier({"backoff_initial_s": 0.5, "backoff_max_s": 30, "webhooks": [
        {"name": "w", "url_file": secret(tmp_path, "url", receiver.url)}]}, sleeps)  # fmt: skip
    send(n, [ROLLED_BACK])
    assert sleeps.waits == [0.5, 1.0, 2.0]  # doubling
    assert len(receiver.requests) == 4  # the same message each time
    assert all(b == receiver.bodies()[0] for b in receiver.bodies())
    assert n.stats()["w"] | {"last_error": None} == {
        "queued": 1, "sent": 1, "failed": 0, "dropped": 0, "retries": 3, "pending": 0,
        "last_error": None}  # fmt: skip


def test_backoff_is_capped_and_honours_retry_after():
    assert [backoff_s(i, 0.5, 4.0) for i in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff_s(1, 0.5, 30.0, retry_after_s=3.0) == 3.0
    assert backoff_s(1, 0.5, 30.0, retry_after_s=300.0) == 30.0
    assert backoff_s(3, 0.5, 30.0, retry_after_s=0.1) == 2.0


def test_a_429_with_retry_after_waits_that_long(receiver, tmp_path):
    receiver.script = [(429, {"Retry-After": "3"})]
    sleeps = Sleeps()
    n = notifier({"webhooks": [{"name": "w", "url_file": secret(tmp_path, "u", receiver.url)}]},
                 sleeps)  # fmt: skip
    send(n, [ROLLED_BACK])
    assert sleeps.waits == [3.0] and n.stats()["w"]["sent"] == 1


def test_gives_up_after_max_attempts_and_never_retries_a_4xx(receiver, tmp_path):
    receiver.script = [(500, {}), (500, {}), (500, {}), (400, {})]
    sleeps = Sleeps()
    n = notifier({"max_attempts": 3, "webhooks": [
        {"name": "w", "url_file": secret(tmp_path, "u", receiver.url)}]}, sleeps)  # fmt: skip
    third = event("progressing", "progressing", "step 3", step=3)
    send(n, [ROLLED_BACK, event("progressing", "progressing", "step 2", step=2), third])
    # 3 tries for the first (500s), 1 for the second (400: the request is wrong), 1 for the third.
    assert [b["step_index"] for b in receiver.bodies()] == [2, 2, 2, 2, 3]
    assert sleeps.waits == [0.5, 1.0]
    stats = n.stats()["w"]
    assert (stats["sent"], stats["failed"], stats["retries"]) == (1, 2, 2)
    assert stats["last_error"] == "HTTP 400"


def test_a_full_queue_drops_the_oldest_and_counts_them(receiver, tmp_path):
    n = notifier({"max_queue": 3, "webhooks": [
        {"name": "w", "url_file": secret(tmp_path, "u", receiver.url)}]})  # fmt: skip
    events = [event("progressing", "progressing", f"step {i}", step=i) for i in range(5)]
    n.notify(events, **CONTEXT)  # no event loop runs here: all five wait in the queue
    assert n.stats()["w"]["pending"] == 3 and n.stats()["w"]["dropped"] == 2

    async def deliver() -> None:
        await n.drain()
        await n.aclose()

    asyncio.run(deliver())
    assert [b["step_index"] for b in receiver.bodies()] == [2, 3, 4]  # the newest kept, in order
    assert n.stats()["w"]["sent"] == 3


def test_notify_returns_at_once_while_the_receiver_hangs(receiver, tmp_path):
    """The tick's call queues and returns; the post waits in a background task."""
    receiver.release.clear()  # the receiver holds every request until released
    n = notifier({"webhooks": [{"name": "w", "url_file": secret(tmp_path, "u", receiver.url)}]})

    async def go() -> tuple[dict[str, Any], bool]:
        n.notify([ROLLED_BACK], **CONTEXT)
        n.notify([event("rolled_back", "rolled_back", "again", step=3)], **CONTEXT)
        while not receiver.arrived.is_set():  # the first post is in flight ...
            await asyncio.sleep(0.01)
        during = n.stats()["w"]  # ... and notify came back long before it was answered
        answered = bool(receiver.requests) and receiver.release.is_set()
        receiver.release.set()
        await n.drain()
        await n.aclose()
        return during, answered

    during, answered = asyncio.run(go())
    assert during["sent"] == 0 and during["queued"] == 2 and not answered
    assert n.stats()["w"]["sent"] == 2


def test_secrets_come_from_files_are_reread_and_never_logged(receiver, tmp_path, caplog):
    url_file = secret(tmp_path, "url", receiver.url + "/hook-SECRETPATH-1")
    token_file = secret(tmp_path, "token", "TOKEN-SECRET-1")
    receiver.script = [(500, {})]
    n = notifier({"webhooks": [{"name": "w", "url_file": url_file, "token_file": token_file}]})
    with caplog.at_level(logging.DEBUG):
        send(n, [ROLLED_BACK])
        # Rotated: the next message goes to the new URL with the new token, no redeploy.
        secret(tmp_path, "url", receiver.url + "/hook-SECRETPATH-2")
        secret(tmp_path, "token", "TOKEN-SECRET-2")
        send(n, [event("rolled_back", "rolled_back", "again", step=3)])
    assert [r["path"] for r in receiver.requests] == ["/hook-SECRETPATH-1"] * 2 + [
        "/hook-SECRETPATH-2"]  # fmt: skip
    assert receiver.requests[-1]["headers"]["authorization"] == "Bearer TOKEN-SECRET-2"
    assert "retry 1" in caplog.text  # the failure was logged ...
    assert "SECRETPATH" not in caplog.text and "TOKEN-SECRET" not in caplog.text  # ... not them


def test_a_missing_secret_file_is_a_logged_failure_not_a_crash(tmp_path, caplog):
    sleeps = Sleeps()
    n = notifier({"max_attempts": 2, "webhooks": [
        {"name": "w", "url_file": str(tmp_path / "absent")}]}, sleeps)  # fmt: skip
    send(n, [ROLLED_BACK])
    stats = n.stats()["w"]
    assert stats["failed"] == 1 and "cannot read the webhook URL file" in stats["last_error"]


def test_event_filter_per_webhook(receiver, tmp_path):
    n = notifier({"webhooks": [{"name": "w", "events": ["rolled_back", "succeeded"],
                                "url_file": secret(tmp_path, "u", receiver.url)}]})  # fmt: skip
    send(n, [event("idle", "progressing", "started: x"), ROLLED_BACK])
    assert [b["event"] for b in receiver.bodies()] == ["rolled_back"]


def test_no_webhooks_no_work():
    n = Notifier("recommender")
    n.configure(None)
    n.notify([ROLLED_BACK], **CONTEXT)
    assert n.stats() == {}


# -- the config ----------------------------------------------------------------------------------


def test_controller_user_config_takes_notifications():
    declared = ControllerUserConfig.model_validate({"notifications": {"webhooks": [
        {"name": "slack", "format": "slack", "url_file": "/etc/rollout/slack-url"}]}})  # fmt: skip
    assert declared.notifications.webhooks[0].format == "slack"
    assert ControllerUserConfig.model_validate({"notifications": None}).notifications.webhooks == ()


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({"name": "w", "url": "https://hooks.example/T000/SECRET"}, "must not be written"),
        ({"name": "w", "url_file": "/u", "token": "SECRET"}, "must not be written"),
        ({"name": "w", "url_file": "/u", "events": ["exploded"]}, "events"),
        ({"name": "w", "url_file": "/u", "format": "teams"}, "format"),
        ({"name": "no spaces", "url_file": "/u"}, "name"),
    ],
)
def test_bad_webhooks_are_refused_without_echoing_secrets(webhook, message):
    with pytest.raises(ValueError, match=message) as caught:
        ControllerUserConfig.model_validate({"notifications": {"webhooks": [webhook]}})
    assert "SECRET" not in str(caught.value)


def test_names_unique_and_backoff_ordered():
    with pytest.raises(ValueError, match="unique"):
        NotificationSettings.model_validate({"webhooks": [{"name": "a", "url_file": "/u"}] * 2})
    with pytest.raises(ValueError, match=r"backoff_max_s \(1.0\) must be greater"):
        NotificationSettings.model_validate({"backoff_initial_s": 2, "backoff_max_s": 1})


def test_an_invalid_url_is_dropped_without_logging_it(tmp_path, caplog):
    n = notifier({"webhooks": [
        {"name": "w", "url_file": secret(tmp_path, "u", "http://host:abc/SECRET")}]})  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        send(n, [ROLLED_BACK])
    assert n.stats()["w"]["failed"] == 1
    assert "dropped a message" in caplog.text and "SECRET" not in caplog.text
