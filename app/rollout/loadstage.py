"""The load stage's pure parts: the pacing schedule, what a replay recorded, and its verdict.

A plan's `load_stage` (`plan.LoadStage`) replays a captured traffic sample against the
candidate before it takes any user weight. The controller (`deployments/controller.py`)
drives the replay as a background task that calls the candidate's deployment handle
directly, past the routers, so nothing it sends is user traffic or gate evidence; it also
reads and decodes the sample (`app/rollout` does not import `app/serving`). What is pure
lives here:

* `send_offsets` — when each request is due (open loop: the schedule never waits for
  answers; a full `concurrency` makes the sender late, which the throughput gate sees);
* `LoadRecorder` — every request's send time, latency and outcome, its live progress, and
  `verdict`: the three gates judged over the hold, as a `LoadResult` the state machine
  consumes (`machine.step(..., load=...)`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from app.rollout.plan import LoadStage

__all__ = [
    "LOAD_GATES",
    "REPLAY_GATE",
    "SAMPLE_GATE",
    "LoadRecorder",
    "LoadResult",
    "percentile",
    "rate_at",
    "send_offsets",
    "stage_failure",
]

# The gate names the load stage's readings carry (in events, status and the
# rollout_gate_failures metric): distinct from the live Gates' names.
P99_GATE = "load_stage.max_p99_ms"
ERROR_GATE = "load_stage.max_error_rate"
THROUGHPUT_GATE = "load_stage.min_throughput_ratio"
SAMPLE_GATE = "load_stage.sample"  # nothing to replay: no sample, unreadable, empty
REPLAY_GATE = "load_stage.replay"  # the replay could not run (no handle, a bug)
LOAD_GATES = (P99_GATE, ERROR_GATE, THROUGHPUT_GATE, SAMPLE_GATE, REPLAY_GATE)


def rate_at(offset_s: float, target_rps: float, ramp_s: float) -> float:
    """The scheduled rate `offset_s` into the stage: linear from 0 to target over ramp_s."""
    if ramp_s <= 0 or offset_s >= ramp_s:
        return target_rps
    return target_rps * max(0.0, offset_s) / ramp_s


def send_offsets(target_rps: float, ramp_s: float, hold_s: float) -> Iterator[float]:
    """Seconds from the stage's start at which each request is due, in order, up to
    ramp_s + hold_s: the k-th request goes when the integral of `rate_at` reaches k.

    During the ramp the integral is target * t^2 / (2 ramp), so request k is due at
    sqrt(2 k ramp / target); after it, one every 1/target seconds."""
    end = ramp_s + hold_s
    ramp_requests = target_rps * ramp_s / 2.0
    k = 1
    while True:
        if k <= ramp_requests:
            offset = math.sqrt(2.0 * k * ramp_s / target_rps)
        else:
            offset = ramp_s + (k - ramp_requests) / target_rps
        if offset >= end:
            return
        yield offset
        k += 1


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank q-quantile (0 < q <= 1) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class LoadResult:
    """A finished load stage, as the state machine consumes it: passed, or the gates that
    failed; `readings` (gate -> status, value, threshold, reason) go into the event."""

    passed: bool
    readings: dict[str, dict[str, Any]]
    summary: str  # one line for the event's reason

    @property
    def failed(self) -> list[str]:
        return [g for g, r in self.readings.items() if r.get("status") == "failed"]


def stage_failure(reason: str, gate: str = SAMPLE_GATE) -> LoadResult:
    """The result of a load stage that could not replay (by default: nothing to replay). A
    load stage fails closed: no verdict on the candidate's capacity is no pass."""
    reading = {"status": "failed", "value": None, "threshold": None, "reason": reason}
    return LoadResult(False, {gate: reading}, reason)


@dataclass
class LoadRecorder:
    """What one replay sent and got back, in seconds from its start."""

    target_rps: float
    ramp_s: float
    hold_s: float
    sent: int = 0
    in_flight: int = 0
    # (sent at, answered at, latency ms, ok) of every answered or failed request
    done: list[tuple[float, float, float, bool]] = field(default_factory=list)

    @property
    def end_s(self) -> float:
        return self.ramp_s + self.hold_s

    def on_send(self) -> None:
        self.sent += 1
        self.in_flight += 1

    def on_done(self, sent_at: float, done_at: float, latency_ms: float, ok: bool) -> None:
        self.in_flight -= 1
        self.done.append((sent_at, done_at, latency_ms, ok))

    def _hold(self) -> list[tuple[float, float, float, bool]]:
        return [d for d in self.done if d[0] >= self.ramp_s]

    def progress(self, offset_s: float, window_s: float = 5.0) -> dict[str, Any]:
        """Live figures for status: where the stage is, the scheduled and achieved rates (the
        latter over the last `window_s`), the p99 and errors so far."""
        lo = max(0.0, offset_s - window_s)
        answered = sum(1 for d in self.done if lo <= d[1] <= offset_s and d[3])
        span = offset_s - lo
        latencies = [d[2] for d in self.done]
        return {
            "stage": "ramp" if offset_s < self.ramp_s else "hold",
            "elapsed_s": round(offset_s, 1),
            "target_rps": round(self.target_rps, 2),
            "current_rps": round(rate_at(offset_s, self.target_rps, self.ramp_s), 2),
            "achieved_rps": round(answered / span, 2) if span > 0 else 0.0,
            "sent": self.sent,
            "in_flight": self.in_flight,
            "errors": sum(1 for d in self.done if not d[3]),
            "p99_ms": _round(percentile(latencies, 0.99)),
        }

    def verdict(self, stage: LoadStage) -> LoadResult:
        """The gates over the hold: the p99 and error rate of the requests sent in it, and
        the answered requests per second in it over the target rate."""
        hold = self._hold()
        requests = len(hold)
        errors = sum(1 for d in hold if not d[3])
        p99 = percentile([d[2] for d in hold], 0.99)
        answered = sum(1 for d in self.done if d[3] and self.ramp_s <= d[1] <= self.end_s)
        achieved = answered / self.hold_s
        readings: dict[str, dict[str, Any]] = {}
        if stage.max_p99_ms is not None:
            limit = stage.max_p99_ms
            bad = p99 is None or p99 > limit
            shown = "none answered" if p99 is None else f"{p99:.1f} ms"
            readings[P99_GATE] = _reading(bad, _round(p99), limit,
                                          f"p99 {shown} {'>' if bad else '<='} {limit:g} ms "
                                          f"over {requests} requests in the hold")  # fmt: skip
        if stage.max_error_rate is not None:
            limit = stage.max_error_rate
            rate = errors / requests if requests else None
            bad = rate is None or rate > limit
            shown = "no requests" if rate is None else f"{rate:.4f} ({errors}/{requests})"
            readings[ERROR_GATE] = _reading(
                bad, rate, limit, f"error rate {shown} {'>' if bad else '<='} {limit:g}"
            )
        if stage.min_throughput_ratio is not None:
            limit = stage.min_throughput_ratio
            ratio = achieved / self.target_rps
            bad = ratio < limit
            readings[THROUGHPUT_GATE] = _reading(
                bad, round(ratio, 4), limit,
                f"{achieved:.2f} rps answered of {self.target_rps:.2f} target "
                f"(ratio {ratio:.3f} {'<' if bad else '>='} {limit:g})",
            )  # fmt: skip
        passed = all(r["status"] == "passed" for r in readings.values())
        shown_p99 = "-" if p99 is None else f"{p99:.1f} ms"
        summary = (f"{achieved:.1f} rps of {self.target_rps:.1f} target, p99 {shown_p99}, "
                   f"{errors}/{requests} errors in the {self.hold_s:g}s hold")  # fmt: skip
        return LoadResult(passed, readings, summary)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _reading(failed: bool, value: float | None, threshold: float, reason: str) -> dict[str, Any]:
    return {
        "status": "failed" if failed else "passed",
        "value": value,
        "threshold": threshold,
        "reason": reason,
    }
