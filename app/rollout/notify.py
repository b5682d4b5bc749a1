"""Rollout notifications: every decision the controller takes, posted to webhooks.

The controller hands each new history event (`Event.to_dict()`) to `Notifier.notify`, which
formats it for every configured webhook and queues it; a background task per webhook posts
the queue in order. Nothing here may slow a tick down or fail it:

* `notify` is synchronous and cheap (a few dicts, an append): it never does I/O and never
  waits. The posting happens in an asyncio task on the controller's event loop.
* Each webhook has its own bounded queue (`max_queue`): when a receiver is down for long, the
  oldest messages go first and are counted (`dropped`), so memory stays bounded and the latest
  state of the rollout is what arrives when the receiver comes back.
* A failed post (a transport error, a timeout, 408, 429 or 5xx) is retried with exponential
  backoff (`backoff_initial_s`, doubling, at most `backoff_max_s`; a longer `Retry-After` is
  honoured up to the same cap) up to `max_attempts`; other 4xx answers are not retried (the
  request itself is wrong). One webhook that fails never delays another's messages.
* Secrets stay out of the config and the logs: the webhook URL (a Slack incoming-webhook URL
  is a credential) and the optional bearer token are read from files (`url_file`,
  `token_file`) when a message is sent, so a rotated secret is picked up without a redeploy.
  Logs name the webhook by its `name`, never by its URL.

Event kinds (`event` in the JSON body): `declared` (a `rollout start` command queued a
rollout), `started`, `step` (a weight change or a finished wait), `paused` (by an operator, a
wait for promote, or an inconclusive analysis), `resumed`, `promoted` (traffic switched to the
candidate, or an operator's promote), `rolled_back` (with `failed_gates`: the gates that
failed, i.e. "gate failed"; empty when the progress deadline rolled it back), `succeeded`,
`aborted`. Every message carries the event's reason and the gate readings that decided it.

Two formats: `json` (the event as a flat JSON object, for your own receivers) and `slack`
(Slack's incoming-webhook body: `text` as the fallback line, and an attachment coloured by
outcome holding Block Kit `blocks` with the reason and one field per gate; Mattermost and
Rocket.Chat take the same body).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import ConfigDict, Field, model_validator

from app.config import StrictModel

__all__ = [
    "EVENT_KINDS",
    "NotificationSettings",
    "Notifier",
    "WebhookSettings",
    "backoff_s",
    "event_kind",
    "json_message",
    "slack_message",
]

logger = logging.getLogger("ray.serve")

EventKind = Literal[
    "declared", "started", "step", "paused", "resumed", "promoted", "rolled_back", "succeeded",
    "aborted",
]  # fmt: skip
EVENT_KINDS: tuple[str, ...] = EventKind.__args__  # type: ignore[attr-defined]
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Slack shows at most 10 fields in a section; more gates are summed up in one line.
SLACK_MAX_FIELDS = 10
COLORS = {"rolled_back": "#c62828", "aborted": "#ef6c00", "succeeded": "#2e7d32",
          "promoted": "#1565c0", "paused": "#6a1b9a"}  # fmt: skip
ICONS = {"rolled_back": ":rotating_light:", "aborted": ":octagonal_sign:",
         "succeeded": ":white_check_mark:", "promoted": ":rocket:", "paused": ":pause_button:",
         "started": ":arrow_forward:"}  # fmt: skip


class WebhookSettings(StrictModel):
    """One receiver of rollout notifications."""

    # A refused config is shown in status and logs: its errors must not echo a secret back.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    name: str = Field(
        min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="What logs and counters call this webhook (its URL is a secret and never "
        "logged).",
    )  # fmt: skip
    url_file: str = Field(
        min_length=1,
        description="Path of a file holding the webhook URL (http or https), read when a "
        "message is sent. The URL is never written in the config itself.",
    )
    token_file: str | None = Field(
        default=None,
        description="Path of a file holding a bearer token sent as `Authorization: Bearer ...`; "
        "null: no Authorization header.",
    )
    format: Literal["json", "slack"] = Field(
        default="json", description="`json`: the event as a JSON object; `slack`: Slack's "
        "incoming-webhook body (text, attachments with blocks)."
    )  # fmt: skip
    events: tuple[EventKind, ...] | None = Field(
        default=None, description="Event kinds to send; null: all of them."
    )
    timeout_s: float = Field(
        default=5.0, gt=0, le=60, description="Seconds one post may take before it is retried."
    )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            inline = sorted(k for k in ("url", "token", "headers") if k in data)
            if inline:
                raise ValueError(
                    f"{', '.join(inline)} must not be written in the config (secrets): put the "
                    "URL in a file named by url_file, the token in one named by token_file"
                )
        return data


class NotificationSettings(StrictModel):
    """The RolloutController's `notifications` (user_config): where rollout events go."""

    webhooks: tuple[WebhookSettings, ...] = Field(
        default=(), description="Receivers; each gets every event it asks for, in order."
    )
    max_queue: int = Field(
        default=1000, ge=1, le=100_000,
        description="Messages held per webhook while it is slow or down; when full, the "
        "oldest is dropped (and counted).",
    )  # fmt: skip
    max_attempts: int = Field(
        default=6, ge=1, le=20, description="Tries per message, the first one included."
    )
    backoff_initial_s: float = Field(
        default=0.5, gt=0, le=60, description="Wait before the first retry; doubles each retry."
    )
    backoff_max_s: float = Field(
        default=30.0, gt=0, le=600, description="Longest wait between two tries."
    )

    @model_validator(mode="after")
    def _unique_names(self) -> NotificationSettings:
        names = [w.name for w in self.webhooks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"webhook names must be unique, got {duplicates} more than once")
        return self

    @model_validator(mode="after")
    def _backoff_order(self) -> NotificationSettings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be greater than or equal to "
                f"backoff_initial_s ({self.backoff_initial_s})"
            )
        return self


# -- what an event is --------------------------------------------------------------------------


def _failed_gates(event: Mapping[str, Any]) -> list[str]:
    gates = event.get("gates") or {}
    return sorted(
        g for g, r in gates.items() if isinstance(r, Mapping) and r.get("status") == "failed"
    )


def event_kind(event: Mapping[str, Any]) -> str:
    """The notification kind of one `Event.to_dict()` (see the module docstring)."""
    before, after = str(event.get("from_phase")), str(event.get("to_phase"))
    reason = str(event.get("reason", ""))
    if after in ("rolled_back", "aborted", "succeeded") and before != after:
        return after
    if after == "idle":
        return "declared"
    if before == "idle":
        return "started"
    if after == "promoting" and before != "promoting":
        return "promoted"
    if reason.startswith(("command promote", "command promote_full")):
        return "promoted"
    if after == "paused" and before != "paused":
        return "paused"
    if before == "paused" and after != "paused":
        return "resumed"
    return "step"


def _iso(seconds: Any) -> str | None:
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return None
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat(timespec="milliseconds")


def json_message(event: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """The generic JSON body: the event, its kind, and which rollout it belongs to."""
    return {
        "kind": "rollout_event",
        "event": event_kind(event),
        **context,
        "from_phase": event.get("from_phase"),
        "phase": event.get("to_phase"),
        "step_index": event.get("step_index"),
        "weight": event.get("weight"),
        "reason": event.get("reason"),
        "failed_gates": _failed_gates(event),
        "gates": dict(event.get("gates") or {}),
        "time": _iso(event.get("time_s")),
        "time_s": event.get("time_s"),
    }


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:.4g}"


def _gate_line(gate: str, reading: Mapping[str, Any]) -> str:
    status = str(reading.get("status", "?"))
    mark = {"failed": ":x:", "passed": ":heavy_check_mark:"}.get(status, ":hourglass:")
    return (f"{mark} *{gate}*: {status}, {_number(reading.get('value'))} "
            f"(limit {_number(reading.get('threshold'))})")  # fmt: skip


def slack_message(event: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """Slack's incoming-webhook body: a plain `text` line (notifications, clients without
    blocks) and one attachment, coloured by outcome, with the reason and the gate readings."""
    kind = event_kind(event)
    model, candidate = context.get("model", "?"), context.get("candidate", "?")
    stable = context.get("stable", "?")
    weight = event.get("weight")
    failed = _failed_gates(event)
    headline = (f"{ICONS.get(kind, ':information_source:')} {model}: {kind.replace('_', ' ')} "
                f"— {candidate} at {_number(weight)}% (stable {stable})")  # fmt: skip
    if failed:
        headline += f"; failed gates: {', '.join(failed)}"
    reason = str(event.get("reason") or "")
    gates = [(g, r) for g, r in (event.get("gates") or {}).items() if isinstance(r, Mapping)]
    # Failed gates first: with many gates the ones that decided it must be shown.
    gates.sort(key=lambda item: (item[1].get("status") != "failed", item[0]))
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{headline}*\n{reason}"}},
    ]
    if gates:
        shown = gates[:SLACK_MAX_FIELDS]
        blocks.append({"type": "section", "fields": [
            {"type": "mrkdwn", "text": _gate_line(g, r)} for g, r in shown]})  # fmt: skip
        if len(gates) > len(shown):
            blocks.append({"type": "context", "elements": [
                {"type": "mrkdwn", "text": f"and {len(gates) - len(shown)} more gates"}]})  # fmt: skip
    facts = [f"strategy {context.get('strategy', '?')}", f"step {event.get('step_index')}",
             f"phase {event.get('from_phase')} → {event.get('to_phase')}",
             f"plan {context.get('plan', '?')}", _iso(event.get("time_s")) or "?"]  # fmt: skip
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(facts)}]})
    return {
        "text": f"{headline}: {reason}",
        "attachments": [{"color": COLORS.get(kind, "#9e9e9e"), "fallback": reason,
                         "blocks": blocks}],
    }  # fmt: skip


FORMATS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]] = {
    "json": json_message,
    "slack": slack_message,
}


def backoff_s(
    retry: int, initial_s: float, max_s: float, retry_after_s: float | None = None
) -> float:
    """The wait before retry number `retry` (1 for the first): initial, doubling, capped at
    max_s; a receiver's longer Retry-After is honoured up to the same cap."""
    wait = min(max_s, initial_s * 2 ** (retry - 1))
    if retry_after_s is not None and retry_after_s > wait:
        wait = min(max_s, retry_after_s)
    return wait


def _retry_after(response: httpx.Response) -> float | None:
    try:
        value = float(response.headers.get("retry-after", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _read_secret(path: str, what: str) -> str:
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"the {what} file {path} is empty")
    return value


def _quiet_httpx() -> None:
    """httpx logs every request's URL at INFO, and a webhook URL is a secret: keep its logger
    at WARNING unless someone chose a level for it on purpose."""
    httpx_logger = logging.getLogger("httpx")
    if httpx_logger.level == logging.NOTSET:
        httpx_logger.setLevel(logging.WARNING)


# -- delivery ----------------------------------------------------------------------------------


@dataclass
class ChannelStats:
    """Counters of one webhook, for status and tests."""

    queued: int = 0  # accepted into the queue
    sent: int = 0  # delivered (a 2xx answer)
    failed: int = 0  # given up on: out of attempts, or a 4xx that is not retried
    dropped: int = 0  # pushed out of a full queue before they were sent
    retries: int = 0  # tries after the first
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"queued": self.queued, "sent": self.sent, "failed": self.failed,
                "dropped": self.dropped, "retries": self.retries, "last_error": self.last_error}  # fmt: skip


@dataclass
class _Channel:
    webhook: WebhookSettings
    queue: deque[dict[str, Any]]
    stats: ChannelStats = field(default_factory=ChannelStats)
    task: asyncio.Task[None] | None = None  # posting the queue; None or done: idle


class Notifier:
    """Formats rollout events and posts them to the configured webhooks in the background.

    `sleep` is passed in so tests see the backoff without waiting for it; `transport` lets a
    test or an embedding app hand httpx its own transport (None: httpx's default)."""

    def __init__(
        self,
        model: str,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.model = model
        self.settings = NotificationSettings()
        self._sleep = sleep
        self._transport = transport
        self._channels: list[_Channel] = []

    def configure(self, settings: NotificationSettings | None) -> None:
        """Take a new declaration. Unchanged settings keep their queues; changed ones start
        afresh (what was still queued for the old webhooks is dropped and counted)."""
        settings = settings or NotificationSettings()
        if settings == self.settings:
            return
        for channel in self._channels:
            channel.stats.dropped += len(channel.queue)
            channel.queue.clear()
            if channel.task is not None:
                channel.task.cancel()
        self.settings = settings
        if settings.webhooks:
            _quiet_httpx()
        self._channels = [_Channel(w, deque(maxlen=settings.max_queue)) for w in settings.webhooks]

    def notify(
        self,
        events: Iterable[Mapping[str, Any]],
        *,
        candidate: str,
        stable: str,
        strategy: str,
        plan: str,
        generation: int | None = None,
    ) -> None:
        """Queue `events` (`Event.to_dict()`) for every webhook that wants them. Never blocks,
        never raises for a full queue; outside a running event loop it only queues."""
        if not self._channels:
            return
        context = {"model": self.model, "candidate": candidate, "stable": stable,
                   "strategy": strategy, "plan": plan, "generation": generation}  # fmt: skip
        for event in events:
            kind = event_kind(event)
            for channel in self._channels:
                wanted = channel.webhook.events
                if wanted is not None and kind not in wanted:
                    continue
                if len(channel.queue) == channel.queue.maxlen:
                    channel.stats.dropped += 1  # the deque drops the oldest on append
                channel.queue.append(FORMATS[channel.webhook.format](event, context))
                channel.stats.queued += 1
        self._wake()

    def stats(self) -> dict[str, dict[str, Any]]:
        """Per webhook name: queued, sent, failed, dropped, retries, last_error, pending."""
        return {c.webhook.name: {**c.stats.to_dict(), "pending": len(c.queue)}
                for c in self._channels}  # fmt: skip

    async def drain(self) -> None:
        """Wait until every queue is empty and nothing is in flight (tests, shutdown)."""
        while True:
            self._wake()
            tasks = [c.task for c in self._channels if c.task is not None and not c.task.done()]
            if not tasks:
                return
            await asyncio.gather(*tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for channel in self._channels:
            if channel.task is not None:
                channel.task.cancel()
        tasks = [c.task for c in self._channels if c.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _wake(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop: the messages wait for the next notify on one
        for channel in self._channels:
            if channel.queue and (channel.task is None or channel.task.done()):
                channel.task = loop.create_task(self._run(channel))

    async def _run(self, channel: _Channel) -> None:
        """Post the channel's queue, oldest first, until it is empty."""
        timeout = httpx.Timeout(channel.webhook.timeout_s)
        async with httpx.AsyncClient(timeout=timeout, transport=self._transport) as client:
            while channel.queue:
                message = channel.queue.popleft()
                try:
                    await self._deliver(client, channel, message)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bad URL or a bug must not kill the channel
                    channel.stats.failed += 1
                    channel.stats.last_error = type(exc).__name__
                    # The type only: the message of an invalid-URL error holds the URL.
                    logger.error("notifications: webhook %s: dropped a message on %s",
                                 channel.webhook.name, type(exc).__name__)  # fmt: skip

    async def _deliver(
        self, client: httpx.AsyncClient, channel: _Channel, message: dict[str, Any]
    ) -> None:
        settings, webhook, stats = self.settings, channel.webhook, channel.stats
        for attempt in range(1, settings.max_attempts + 1):
            retry_after: float | None = None
            try:
                url, headers = await asyncio.to_thread(self._target, webhook)
                response = await client.post(url, json=message, headers=headers)
                if 200 <= response.status_code < 300:
                    stats.sent += 1
                    return
                error = f"HTTP {response.status_code}"
                if response.status_code not in RETRY_STATUSES:
                    stats.failed += 1
                    stats.last_error = error
                    logger.error("notifications: webhook %s refused a %s message: %s (not "
                                 "retried)", webhook.name, message.get("event", "rollout"), error)  # fmt: skip
                    return
                retry_after = _retry_after(response)
            except ValueError as exc:  # a secret file that cannot be read: retried, it may appear
                error = str(exc)
            except httpx.HTTPError as exc:  # the URL is in the exception's request: not logged
                error = type(exc).__name__
            stats.last_error = error
            if attempt == settings.max_attempts:
                break
            wait = backoff_s(attempt, settings.backoff_initial_s, settings.backoff_max_s,
                             retry_after)  # fmt: skip
            logger.warning("notifications: webhook %s: %s; retry %d in %.1fs", webhook.name,
                           error, attempt, wait)  # fmt: skip
            stats.retries += 1
            await self._sleep(wait)
        stats.failed += 1
        logger.error("notifications: webhook %s: gave up on a message after %d attempts (%s)",
                     webhook.name, settings.max_attempts, stats.last_error)  # fmt: skip

    @staticmethod
    def _target(webhook: WebhookSettings) -> tuple[str, dict[str, str]]:
        """The URL and headers, from the secret files (read on every send: rotation)."""
        url = _read_secret(webhook.url_file, "webhook URL")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"the webhook URL in {webhook.url_file} is not an http(s) URL")
        headers = {"user-agent": "ray-rollout-notifier"}
        if webhook.token_file is not None:
            headers["authorization"] = "Bearer " + _read_secret(webhook.token_file, "token")
        return url, headers
