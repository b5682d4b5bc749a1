"""Gate verdicts: one tick's `Observation` judged against a plan's `Gates`.

`evaluate_gates` runs the metric gates (error rate, its increase over stable, latency ratios,
shadow agreement, Prometheus) and `evaluate_lift_gates` the A/B lift gates on feedback outcomes.
A verdict is PASSED, FAILED, PENDING (not enough evidence yet) or SKIPPED (no baseline, gate off).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, cast

from app.observability.stats import VersionStats
from app.rollout.abtest import (
    ArmStats,
    Conclusion,
    Verdict,
)
from app.rollout.plan import FAIL_FAST, MIN_REQUESTS, Gates


@dataclass(frozen=True)
class Observation:
    """What the controller saw since the current step started: the input of one tick."""

    stats: Mapping[str, VersionStats] = field(default_factory=dict)
    shadow_agreement: float | None = None  # mean top-k overlap of shadow vs primary answers
    prometheus_value: float | None = None  # the value of gates.prometheus_query
    prometheus_available: bool = False  # False: not queried or unreachable: prometheus_on_error
    prometheus_errors: int = 0  # queries in a row that gave no reading
    # Feedback outcomes since the rollout started (not per step: the sequential test runs over
    # the whole experiment): outcome name -> version -> ArmStats.
    outcomes: Mapping[str, Mapping[str, ArmStats]] = field(default_factory=dict)
    # Whether the candidate has a running replica (Serve's view); None: not known (not looked
    # up, or the lookup failed). Drives the plan's progress_deadline_s, not a gate.
    candidate_ready: bool | None = None

    def for_version(self, version: str) -> VersionStats:
        return self.stats.get(version) or VersionStats()

    def outcome_arm(self, outcome: str, version: str) -> ArmStats | None:
        """`version`'s arm of `outcome`: empty if only other versions have one, None if no
        version has any feedback of that outcome yet."""
        by_version = self.outcomes.get(outcome)
        if not by_version:
            return None
        arm = by_version.get(version)
        return arm if arm is not None else ArmStats(next(iter(by_version.values())).kind)


class GateStatus(str, Enum):
    """A gate's verdict on one tick. Only FAILED acts; PENDING blocks an analysis from ending."""

    PASSED = "passed"
    FAILED = "failed"
    PENDING = "pending"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class GateVerdict:
    """One gate on one tick; `gate` is the Gates field that sets its threshold."""

    gate: str
    status: GateStatus
    value: float | None
    threshold: float | None
    reason: str
    detail: Mapping[str, Any] = field(default_factory=dict)  # lift gates: conclusion, interval

    def reading(self) -> dict[str, Any]:
        """JSON-safe form, as stored in Event.gates."""
        return {
            "status": self.status.value,
            "value": self.value,
            "threshold": self.threshold,
            "reason": self.reason,
            **self.detail,
        }


def _verdict(
    gate: str, value: float | None, threshold: float, failed: bool, reason: str
) -> GateVerdict:
    status = GateStatus.FAILED if failed else GateStatus.PASSED
    return GateVerdict(gate, status, value, threshold, reason)


def _error_rate(stats: VersionStats) -> str:
    return f"{stats.errors}/{stats.requests}"


def _judge_error_rate(gates: Gates, cand: VersionStats, base: VersionStats, obs: Observation):
    threshold = cast(float, gates.max_error_rate)  # judged only when set (evaluate_gates)
    rate = cand.error_rate or 0.0
    op = ">" if rate > threshold else "<="
    reason = f"candidate error rate {rate:.4f} ({_error_rate(cand)}) {op} {threshold:g}"
    return _verdict("max_error_rate", rate, threshold, rate > threshold, reason)


def _judge_error_rate_increase(gates, cand, base, obs):
    threshold = gates.max_error_rate_increase
    if not base.requests:
        return GateVerdict(
            "max_error_rate_increase", GateStatus.SKIPPED, None, threshold,
            "no stable requests in the window to compare with",
        )  # fmt: skip
    increase = (cand.error_rate or 0.0) - (base.error_rate or 0.0)
    op = ">" if increase > threshold else "<="
    reason = (
        f"candidate error rate minus stable {increase:+.4f} (candidate {_error_rate(cand)}, "
        f"stable {_error_rate(base)}) {op} {threshold:g}"
    )
    return _verdict("max_error_rate_increase", increase, threshold, increase > threshold, reason)


def _latency_judge(gate: str, attr: str, label: str):
    def judge(gates, cand, base, obs):
        threshold = getattr(gates, gate)
        ours, theirs = getattr(cand, attr), getattr(base, attr)
        if ours is None:
            return GateVerdict(gate, GateStatus.PENDING, None, threshold, f"no candidate {label}")
        if theirs is None or theirs <= 0:
            return GateVerdict(
                gate, GateStatus.SKIPPED, None, threshold, f"no stable {label} to compare with"
            )
        ratio = ours / theirs
        op = ">" if ratio > threshold else "<="
        reason = (
            f"candidate {label} / stable {label} = {ratio:.3f} ({ours:g} ms / {theirs:g} ms) "
            f"{op} {threshold:g}"
        )
        return _verdict(gate, ratio, threshold, ratio > threshold, reason)

    return judge


def _judge_shadow(gates, cand, base, obs):
    threshold = gates.min_shadow_agreement
    value = obs.shadow_agreement
    if value is None or math.isnan(value):
        return GateVerdict(
            "min_shadow_agreement", GateStatus.PENDING, None, threshold,
            "no shadow comparisons yet",
        )  # fmt: skip
    op = "<" if value < threshold else ">="
    reason = f"shadow top-k agreement {value:.4f} {op} {threshold:g}"
    return _verdict("min_shadow_agreement", value, threshold, value < threshold, reason)


def _judge_prometheus(gates, cand, base, obs):
    threshold = gates.prometheus_max
    if not obs.prometheus_available:
        # Fail closed by default (Argo Rollouts' consecutiveErrorLimit): an unreadable metric
        # is not a passing one.
        unread = f"prometheus unavailable; {gates.prometheus_query!r} not evaluated"
        on_error, errors = gates.prometheus_on_error, obs.prometheus_errors
        if on_error == "skip":
            return GateVerdict("prometheus_max", GateStatus.SKIPPED, None, threshold, unread)
        if errors < gates.prometheus_error_limit:
            reason = f"{unread} ({errors} of {gates.prometheus_error_limit} failed queries before prometheus_on_error: {on_error})"
            return GateVerdict("prometheus_max", GateStatus.PENDING, None, threshold, reason)
        if on_error == "fail":
            reason = f"{unread} in {errors} queries in a row (prometheus_on_error: fail)"
            return GateVerdict("prometheus_max", GateStatus.FAILED, None, threshold, reason)
        reason = f"{unread} in {errors} queries in a row (prometheus_on_error: pause: no analysis passes without it)"
        return GateVerdict("prometheus_max", GateStatus.PENDING, None, threshold, reason)
    value = obs.prometheus_value
    if value is None or math.isnan(value):
        return GateVerdict(
            "prometheus_max", GateStatus.PENDING, None, threshold,
            f"no value for {gates.prometheus_query!r} yet",
        )  # fmt: skip
    op = ">" if value > threshold else "<="
    reason = f"{gates.prometheus_query} = {value:g} {op} {threshold:g}"
    return _verdict("prometheus_max", value, threshold, value > threshold, reason)


# (gate, judge): the gate is on when its Gates field is set; evaluated in this order.
_JUDGES = (
    ("max_error_rate", _judge_error_rate),
    ("max_error_rate_increase", _judge_error_rate_increase),
    ("max_p99_latency_ratio", _latency_judge("max_p99_latency_ratio", "p99_ms", "p99")),
    ("max_p50_latency_ratio", _latency_judge("max_p50_latency_ratio", "p50_ms", "p50")),
    ("min_shadow_agreement", _judge_shadow),
    ("prometheus_max", _judge_prometheus),
)


def evaluate_gates(
    gates: Gates, observation: Observation, *, candidate: str, stable: str
) -> tuple[GateVerdict, ...]:
    """Every configured gate's verdict on one observation (no side effects).

    The first verdict is always `min_requests` (passed once the candidate has enough requests
    in the window); then fail-fast, then the gates in Gates' field order. Below min_requests a
    gate that could judge is reported PENDING with its reading, so status pages show the trend.
    """
    cand = observation.for_version(candidate)
    base = observation.for_version(stable)
    enough = cand.requests >= gates.min_requests
    verdicts = [
        GateVerdict(
            MIN_REQUESTS,
            GateStatus.PASSED if enough else GateStatus.PENDING,
            float(cand.requests),
            float(gates.min_requests),
            f"{cand.requests} of {gates.min_requests} candidate requests in this step",
        )
    ]
    if gates.fail_fast_error_rate is not None:
        threshold = gates.fail_fast_error_rate
        if cand.requests < gates.fail_fast_min_requests:
            verdicts.append(
                GateVerdict(
                    FAIL_FAST,
                    GateStatus.PENDING,
                    None,
                    threshold,
                    f"{cand.requests} of {gates.fail_fast_min_requests} candidate requests",
                )  # fmt: skip
            )
        else:
            rate = cand.error_rate or 0.0
            op = ">" if rate > threshold else "<="
            reason = f"candidate error rate {rate:.4f} ({_error_rate(cand)}) {op} {threshold:g}"
            verdicts.append(_verdict(FAIL_FAST, rate, threshold, rate > threshold, reason))
    for gate, judge in _JUDGES:
        if getattr(gates, gate) is None:
            continue
        verdict = judge(gates, cand, base, observation)
        if not enough and verdict.status in (GateStatus.PASSED, GateStatus.FAILED):
            verdict = replace(
                verdict,
                status=GateStatus.PENDING,
                reason=f"waiting for min_requests ({cand.requests} of {gates.min_requests}); "
                f"reading: {verdict.reason}",
            )
        verdicts.append(verdict)
    return tuple(verdicts)


LIFT_GATES = ("improvement", "non_inferiority")
_LIFT_STATUS = {
    Conclusion.BETTER: GateStatus.PASSED,
    Conclusion.WORSE: GateStatus.FAILED,
    Conclusion.NOT_YET_KNOWN: GateStatus.PENDING,
}


def _on_scale(value: float | None, scale: str) -> str:
    if value is None or not math.isfinite(value):
        return "?" if value is None else ("+inf" if value > 0 else "-inf")
    return f"{value:+.1%}" if scale == "relative" else f"{value:+.4g}"


def _lift_reason(
    outcome: str, verdict: Verdict, conclusion: Conclusion, bar: str, level: float
) -> str:
    said = {
        Conclusion.BETTER: f"better than {bar}",
        Conclusion.WORSE: f"worse than {bar}",
        Conclusion.NOT_YET_KNOWN: f"not yet known against {bar}",
    }[conclusion]
    if verdict.looks == 0:
        if verdict.ended:
            said += " (the test reached its horizon before any look counted)"
        return f"{outcome}: {said}; {verdict.reason}"
    cuped = ""
    if verdict.cuped_variance_factor is not None:
        cuped = (
            f", CUPED theta {verdict.cuped_theta or 0.0:.3g}, variance "
            f"x{verdict.cuped_variance_factor:.3g}"
        )
    mc, ms = verdict.candidate_mean, verdict.control_mean
    kind = "always-valid" if verdict.boundary == "mixture" else "horizon-bounded"
    interval = f"{level:.0%} {kind} interval"
    if verdict.stop_alpha is not None:  # one-sided bounds, each at its own level
        interval = f"{kind} bounds ({level:.0%} lower, {1 - verdict.stop_alpha:.0%} upper)"
    horizon = ""
    if verdict.information_time is not None:
        horizon = f", t={verdict.information_time:.2f} of {verdict.horizon_samples_per_arm}/arm"
        if verdict.ended and conclusion is Conclusion.NOT_YET_KNOWN:
            said += " (the test reached its horizon and ended without a call)"
    return (
        f"{outcome}: lift {_on_scale(verdict.lift, verdict.scale)}, "
        f"{interval} [{_on_scale(verdict.low, verdict.scale)}, "
        f"{_on_scale(verdict.high, verdict.scale)}]; candidate {mc:.4g} (n={verdict.candidate_samples}), "
        f"stable {ms:.4g} (n={verdict.control_samples}){horizon}{cuped}: {said}"
    )


def evaluate_lift_gates(
    gates: Gates,
    observation: Observation,
    previous: Mapping[str, Mapping[str, Any]],
    *,
    candidate: str,
    stable: str,
) -> tuple[tuple[GateVerdict, ...], dict[str, dict[str, Any]]]:
    """The improvement and non-inferiority gates' verdicts on this tick's feedback, and the
    sequential tests' state to pass as `previous` next tick (gate -> Verdict.reading()).

    Not held back by min_requests: each test has its own min_samples_per_arm. Pure."""
    verdicts: list[GateVerdict] = []
    state: dict[str, dict[str, Any]] = {}
    for name in LIFT_GATES:
        gate = getattr(gates, name)
        if gate is None:
            continue
        bar_value = gate.min_lift if name == "improvement" else -gate.margin
        bar = _on_scale(bar_value, gate.scale)
        cand = observation.outcome_arm(gate.outcome, candidate)
        base = observation.outcome_arm(gate.outcome, stable)
        if cand is None or base is None:
            verdicts.append(GateVerdict(
                name, GateStatus.PENDING, None, bar_value,
                f"{gate.outcome}: no feedback yet (POST /v2/models/<model>/feedback)",
                {"conclusion": Conclusion.NOT_YET_KNOWN.value, "outcome": gate.outcome},
            ))  # fmt: skip
            if name in previous:
                state[name] = dict(previous[name])
            continue
        test = gate.sequential_test()
        before = Verdict.from_reading(dict(previous[name])) if name in previous else None
        if before is not None and (
            before.ended or (before.candidate_samples, before.control_samples) == (cand.n, base.n)
        ):
            # No new outcome: the same look (and the state stays equal). Or a horizon test
            # that ended: its verdict is final, also after a restart whose restored outcomes
            # are behind it (a new test from there would look past the horizon).
            verdict = before
        else:
            try:
                verdict = test.evaluate(cand, base, before)
            except ValueError:  # a previous look that no longer fits (fewer samples): restart
                verdict = test.evaluate(cand, base, None)
        conclusion = gate.judge(verdict)
        state[name] = verdict.reading()
        detail = {
            "conclusion": conclusion.value,
            "outcome": gate.outcome,
            "scale": verdict.scale,
            "lift": state[name]["lift"],
            "low": state[name]["low"],
            "high": state[name]["high"],
            "confidence": gate.confidence,
            "directions": gate.directions,
            "stop_confidence": gate.stop_confidence,
            "mde": gate.mde,
            "min_samples_per_arm": gate.min_samples_per_arm,
            "p_value": verdict.p_value,
            # CUPED: theta and the factor the variance was multiplied by (null: not applied)
            "cuped": gate.cuped,
            "cuped_theta": verdict.cuped_theta,
            "cuped_variance_factor": verdict.cuped_variance_factor,
            # horizon: the cap, how far the test is towards it (n_eff / N) and whether it ended
            "boundary": verdict.boundary,
            "horizon_samples_per_arm": verdict.horizon_samples_per_arm,
            "information_time": verdict.information_time,
            "ended": verdict.ended,
            "candidate": {"n": cand.n, "mean": cand.mean},
            "stable": {"n": base.n, "mean": base.mean},
        }
        verdicts.append(GateVerdict(
            name, _LIFT_STATUS[conclusion], verdict.lift, bar_value,
            _lift_reason(gate.outcome, verdict, conclusion, bar, gate.confidence), detail,
        ))  # fmt: skip
    return tuple(verdicts), state
