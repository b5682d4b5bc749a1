"""Rollout plans and the state machine that executes them, one reconcile tick at a time.

A rollout is data (Argo Rollouts' idea): a `RolloutPlan` declares the strategy, the two
versions, the steps and the gates. `RolloutPlan.expand` turns any strategy into one flat list
of concrete steps, so the state machine knows only five step kinds:

    SetWeight(set_weight)       move the candidate's share of public traffic (instant)
    Hold(duration_s, analyze)   keep the weight for duration_s; with analyze, the gates must
                                all have passed (with min_requests) when the time is up
    WaitForPromote()            stop until an operator sends `promote`
    Switch(weight=100)          the final move to 100% (phase PROMOTING; instant)
    ScaleDown(delay_s)          keep the old version warm for delay_s, then finish

`step(state, observation, now) -> Decision` is the one reconcile function. The controller
calls it every tick (~250 ms) with the per-version stats gathered since
`state.window_started_at`; it recomputes everything from its inputs, never reads a clock,
returns early while the current step is unfinished, and is safe to repeat: the same inputs
always give the same `Decision`. Operator commands go through `apply_command`.

    IDLE ─tick─> PROGRESSING ─steps done─> PROMOTING ─scale-down done─> SUCCEEDED
                  │    ▲                      │
      pause, wait │    │ resume,              │
      for promote,│    │ promote              │
    inconclusive  ▼    │                      │
                 PAUSED┘                      │
    a gate fails in any live phase ───────────┴──> ROLLED_BACK   (candidate 0%)
    command abort in any live phase ───────────────> ABORTED       (candidate 0%)

SUCCEEDED, ROLLED_BACK and ABORTED are terminal and absorbing: `step` returns them unchanged
and every command raises. A new rollout is a new `RolloutState.start`.

Choices worth knowing (each one is the reason for some code below):

* **Gates judge in every live phase**, not only at the end of an analysis hold: a failing gate
  during a timed pause, a wait for promote, a user pause or a blue-green scale-down rolls back
  on that very tick. Only the *completion* of an analysis hold needs every gate decided.
* **fail_fast_error_rate** ignores min_requests (it needs only `fail_fast_min_requests`, 10 by
  default), which is what rolls a broken candidate back within one tick of the evidence.
* **The stats window restarts with every step** (`window_started_at`): min_requests is per step,
  and an analysis judges the weight it analyses. Stats gathered during a pause stay in the
  window: the weight did not change, so the evidence is as good.
* **Pause time does not count against a hold.** A 60 s analysis paused after 20 s needs 40 s
  more after `resume` (`hold_excluded_s` keeps the paused seconds out of the timer). Gates are
  still judged while paused.
* **An analysis that ends with a gate still pending is inconclusive** (too little traffic, no
  shadow comparisons, Prometheus returned nothing): the rollout goes PAUSED (not by the user),
  as Argo does, so it is visible rather than stuck. `resume` runs the hold timer again while
  the stats window keeps accumulating; `promote` accepts the step without a verdict.
* **Relative gates need a baseline.** With no stable requests (or no stable latency), the
  error-rate-increase and latency-ratio gates are `skipped`, so holds at 100% still finish;
  the absolute gates keep judging.
* **Commands change state at once** (abort sets 0% in the returned state, promote applies the
  next weights); call `step` right after to publish the traffic without waiting for a tick.
* **`generation` counts traffic changes**: it goes up by one whenever the traffic this rollout
  asks for (weights, stable version, shadow percent) changes, so routers can drop stale
  pushes. Pass the previous rollout's generation to `start` to keep it monotonic.
* **`now` is epoch seconds** (time.time() in the controller): the persisted state carries
  absolute times, and a controller replica restarted on another node must agree with them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from app.abtest import (
    ArmStats,
    Conclusion,
    ImprovementGate,
    NonInferiorityGate,
    Verdict,
)
from app.config import NAME_PATTERN, ShadowRule, TrafficConfig, config_hash

__all__ = [
    "MAX_HISTORY_EVENTS",
    "STATE_SCHEMA",
    "Analysis",
    "BlueGreenPlan",
    "CanaryPlan",
    "CanaryStep",
    "Command",
    "Decision",
    "Event",
    "GateStatus",
    "GateVerdict",
    "Gates",
    "Hold",
    "LinearPlan",
    "Observation",
    "Pause",
    "Phase",
    "RolloutPlan",
    "RolloutState",
    "ScaleDown",
    "SetWeight",
    "Step",
    "Switch",
    "VersionStats",
    "WaitForPromote",
    "apply_command",
    "evaluate_gates",
    "evaluate_lift_gates",
    "step",
]

# Bumped when the persisted layout of RolloutState.to_dict() changes incompatibly.
STATE_SCHEMA = 1
# Commands can be repeated without limit (pause, resume, pause...); the most recent events are
# what an operator needs, so older ones go first.
MAX_HISTORY_EVENTS = 1000

FAIL_FAST = "fail_fast_error_rate"
MIN_REQUESTS = "min_requests"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# -- the plan --------------------------------------------------------------------------------


class Gates(_Strict):
    """What the candidate must show to move on; any gate that fails rolls the rollout back.

    A gate set to null is off. Below `min_requests` candidate requests in the current step's
    window every gate but fail-fast is pending: too little evidence to judge either way."""

    min_requests: int = Field(
        default=100, ge=1, description="Candidate requests per step before the gates judge."
    )
    max_error_rate: float | None = Field(
        default=0.05, ge=0, le=1, description="Highest candidate error rate (errors / requests)."
    )
    max_error_rate_increase: float | None = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Highest candidate error rate minus the stable version's, in the same window.",
    )
    max_p99_latency_ratio: float | None = Field(
        default=1.5, gt=0, description="Highest candidate p99 latency / stable p99 latency."
    )
    max_p50_latency_ratio: float | None = Field(
        default=None, gt=0, description="Highest candidate p50 latency / stable p50 latency."
    )
    min_shadow_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Lowest top-k overlap between the candidate's shadow answers and primary's.",
    )
    prometheus_query: str | None = Field(
        default=None,
        min_length=1,
        description=(
            "A PromQL query the controller evaluates; its value must stay at or below "
            "prometheus_max. If Prometheus is unavailable the gate is skipped, not failed."
        ),
    )
    prometheus_max: float | None = Field(
        default=None, description="Highest acceptable value of prometheus_query."
    )
    fail_fast_error_rate: float | None = Field(
        default=0.5,
        gt=0,
        le=1,
        description=(
            "Roll back at once, even below min_requests, when the candidate's error rate over "
            "at least fail_fast_min_requests requests exceeds this."
        ),
    )
    fail_fast_min_requests: int = Field(
        default=10, ge=1, description="Candidate requests the fail-fast check needs."
    )
    improvement: ImprovementGate | None = Field(
        default=None,
        description=(
            "Judge a feedback outcome with the sequential test: passes once the candidate is "
            "surely better by min_lift, fails (rolls back) once it surely cannot be."
        ),
    )
    non_inferiority: NonInferiorityGate | None = Field(
        default=None,
        description=(
            "Judge a feedback outcome: passes once the candidate is surely not worse by more "
            "than margin, fails (rolls back) once it surely is."
        ),
    )

    @model_validator(mode="after")
    def _prometheus_query_and_max_together(self) -> Gates:
        if (self.prometheus_query is None) != (self.prometheus_max is None):
            raise ValueError(
                f"prometheus_query ({self.prometheus_query!r}) and prometheus_max "
                f"({self.prometheus_max!r}) must be set together"
            )
        return self

    @model_validator(mode="after")
    def _fail_fast_above_max_error_rate(self) -> Gates:
        if (
            self.fail_fast_error_rate is not None
            and self.max_error_rate is not None
            and self.fail_fast_error_rate < self.max_error_rate
        ):
            raise ValueError(
                f"fail_fast_error_rate ({self.fail_fast_error_rate}) must be greater than or "
                f"equal to max_error_rate ({self.max_error_rate}): fail-fast is the coarse check "
                "that does not wait for min_requests"
            )
        return self


class SetWeight(_Strict):
    """Canary step `- set_weight: 25`: the candidate's percent of public traffic."""

    set_weight: float = Field(ge=0, le=100, description="Candidate's percent of traffic.")

    def describe(self) -> str:
        return f"set_weight {self.set_weight:g}%"


class Pause(_Strict):
    """Canary step `- pause_s: 30` (hold 30 s) or `- pause_s: null` (until `rollout promote`).

    Gates still judge during a pause; it just does not require them to pass."""

    pause_s: float | None = Field(
        gt=0, description="Seconds to hold the current weight; null waits for promote."
    )


class Analysis(_Strict):
    """Canary step `- analysis_s: 60`: hold the weight for 60 s, then require every gate to
    have passed with at least min_requests candidate requests in the step."""

    analysis_s: float = Field(gt=0, description="Seconds to hold and analyse the current weight.")


def _canary_step_kind(value: Any) -> str | None:
    """Which canary step a YAML mapping is: the first step key it holds."""
    if isinstance(value, Mapping):
        for key in ("set_weight", "pause_s", "analysis_s"):
            if key in value:
                return key
        return None
    return {SetWeight: "set_weight", Pause: "pause_s", Analysis: "analysis_s"}.get(type(value))


CanaryStep = Annotated[
    Union[  # noqa: UP007 - Tag needs the Union spelled out for the discriminator
        Annotated[SetWeight, Tag("set_weight")],
        Annotated[Pause, Tag("pause_s")],
        Annotated[Analysis, Tag("analysis_s")],
    ],
    Discriminator(
        _canary_step_kind,
        custom_error_type="canary_step",
        custom_error_message=(
            "a canary step is a mapping with one of: set_weight, pause_s, analysis_s"
        ),
    ),
]


class CanaryPlan(_Strict):
    """Explicit steps, Argo style: weights, pauses and analysis holds in order."""

    steps: list[CanaryStep] = Field(
        min_length=1, description="Steps in order; set_weight values must not decrease."
    )

    @model_validator(mode="after")
    def _weights_non_decreasing(self) -> CanaryPlan:
        previous: tuple[int, float] | None = None
        for index, item in enumerate(self.steps):
            if not isinstance(item, SetWeight):
                continue
            if previous is not None and item.set_weight < previous[1]:
                raise ValueError(
                    f"steps[{index}].set_weight ({item.set_weight:g}) must be greater than or "
                    f"equal to steps[{previous[0]}].set_weight ({previous[1]:g}): a canary only "
                    "moves forward (abort to go back)"
                )
            previous = (index, item.set_weight)
        return self


class BlueGreenPlan(_Strict):
    """Preview the candidate with no public traffic, then switch everything at once."""

    preview_s: float = Field(
        ge=0,
        description=(
            "Seconds the candidate runs at 0% public traffic before analysis; pinned and "
            "shadow requests reach it and the gates judge them."
        ),
    )
    shadow_percent: float = Field(
        default=0.0, ge=0, le=100, description="Percent of requests mirrored to the candidate."
    )
    analysis_s: float = Field(
        ge=0, description="Seconds of analysis, still at 0% public, that must pass the gates."
    )
    scale_down_delay_s: float = Field(
        default=30.0,
        ge=0,
        description="Seconds the old version stays warm after the switch (rollback target).",
    )


class LinearPlan(_Strict):
    """Equal increments: step_percent more traffic every interval_s, analysed each time."""

    step_percent: float = Field(gt=0, le=100, description="Percent added per step.")
    interval_s: float = Field(gt=0, description="Seconds of analysis at each weight.")


class Hold(_Strict):
    """Expanded step: keep the weight for duration_s; with analyze, gates must pass at the end."""

    duration_s: float = Field(gt=0, description="Seconds to hold, not counting paused time.")
    analyze: bool = Field(description="Require every gate to pass when the time is up.")
    label: str = Field(default="hold", description="What the plan called it (for status).")

    def describe(self) -> str:
        return f"{self.label} {self.duration_s:g}s"


class WaitForPromote(_Strict):
    """Expanded step: wait (PAUSED) until an operator promotes."""

    def describe(self) -> str:
        return "wait for promote"


class Switch(_Strict):
    """Expanded step: the final move of all traffic to the candidate (phase PROMOTING)."""

    weight: float = Field(default=100.0, description="Candidate's percent after the switch.")

    def describe(self) -> str:
        return f"switch to {self.weight:g}%"


class ScaleDown(_Strict):
    """Expanded step: keep the old version warm for delay_s after the switch, then finish."""

    delay_s: float = Field(ge=0, description="Seconds before the old version is retired.")

    def describe(self) -> str:
        return f"scale down after {self.delay_s:g}s"


Step = Union[SetWeight, Hold, WaitForPromote, Switch, ScaleDown]  # noqa: UP007


class RolloutPlan(_Strict):
    """One rollout: move traffic from `stable` to `candidate` by `strategy`, judged by `gates`.

    Exactly the block named by `strategy` is present (`canary`, `blue_green` or `linear`):

        strategy: canary            # or:  strategy: blue_green      strategy: linear
        candidate: v2               #      blue_green:               linear:
        stable: v1                  #        preview_s: 60             step_percent: 20
        canary:                     #        shadow_percent: 10        interval_s: 120
          steps:                    #        analysis_s: 300         bake_s: 30
            - set_weight: 5         #        scale_down_delay_s: 30
            - analysis_s: 60        # hold 60 s; gates must pass with min_requests
            - pause_s: 30           # hold 30 s (gates still judge)
            - set_weight: 50
            - pause_s: null         # wait for `rollout promote`
        gates: {min_requests: 200, max_error_rate: 0.02}
        auto_promote: true
    """

    strategy: Literal["canary", "blue_green", "linear"] = Field(
        description="How traffic moves; names the block that configures it."
    )
    candidate: str = Field(pattern=NAME_PATTERN, description="The version being rolled out.")
    stable: str = Field(pattern=NAME_PATTERN, description="The version serving today.")
    canary: CanaryPlan | None = Field(default=None, description="Steps for strategy canary.")
    blue_green: BlueGreenPlan | None = Field(
        default=None, description="Settings for strategy blue_green."
    )
    linear: LinearPlan | None = Field(default=None, description="Settings for strategy linear.")
    gates: Gates = Field(default_factory=Gates, description="What the candidate must show.")
    bake_s: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Linear only: seconds at each new weight before its analysis starts; the bake's "
            "stats are left out of the analysis window (caches and autoscaling settle)."
        ),
    )
    auto_promote: bool = Field(
        default=True,
        description=(
            "Finish by itself after the last step (100%, candidate becomes stable); false "
            "waits for `rollout promote` after the last step."
        ),
    )

    @model_validator(mode="after")
    def _candidate_is_not_stable(self) -> RolloutPlan:
        if self.candidate == self.stable:
            raise ValueError(
                f"candidate ({self.candidate!r}) must differ from stable ({self.stable!r})"
            )
        return self

    @model_validator(mode="after")
    def _block_matches_strategy(self) -> RolloutPlan:
        given = [name for name in ("canary", "blue_green", "linear") if getattr(self, name)]
        if self.strategy not in given:
            raise ValueError(
                f"strategy {self.strategy!r} needs a `{self.strategy}` block (blocks given: "
                f"{given or 'none'})"
            )
        others = [name for name in given if name != self.strategy]
        if others:
            raise ValueError(
                f"`{others[0]}` block does not apply to strategy {self.strategy!r}; remove it"
            )
        return self

    @model_validator(mode="after")
    def _bake_only_for_linear(self) -> RolloutPlan:
        if self.bake_s > 0 and self.strategy != "linear":
            raise ValueError(
                f"bake_s ({self.bake_s:g}) applies to strategy 'linear' only, not "
                f"{self.strategy!r}; add a pause_s step instead"
            )
        return self

    @model_validator(mode="after")
    def _shadow_gate_has_shadow(self) -> RolloutPlan:
        if (
            self.blue_green is not None
            and self.gates.min_shadow_agreement is not None
            and self.blue_green.shadow_percent == 0
        ):
            raise ValueError(
                f"gates.min_shadow_agreement ({self.gates.min_shadow_agreement}) needs "
                "blue_green.shadow_percent above 0 (got 0): nothing would be compared"
            )
        return self

    def expand(self) -> list[Step]:
        """The plan as concrete steps, always ending with Switch (and ScaleDown for blue-green).

        * canary: set_weight -> SetWeight; pause_s: N -> Hold(N); pause_s: null ->
          WaitForPromote; analysis_s: N -> Hold(N, analyze).
        * blue_green: SetWeight(0), Hold(preview_s), Hold(analysis_s, analyze) (each left out
          when 0), Switch, ScaleDown(scale_down_delay_s).
        * linear: SetWeight(k * step_percent), [Hold(bake_s)], Hold(interval_s, analyze) for
          k = 1, 2, ... up to and including 100, so the last increment is analysed too.

        Without auto_promote a WaitForPromote comes before the Switch.
        """
        steps: list[Step] = []
        if self.canary is not None:
            for item in self.canary.steps:
                if isinstance(item, SetWeight):
                    steps.append(item)
                elif isinstance(item, Pause):
                    if item.pause_s is None:
                        steps.append(WaitForPromote())
                    else:
                        steps.append(Hold(duration_s=item.pause_s, analyze=False, label="pause"))
                else:
                    steps.append(Hold(duration_s=item.analysis_s, analyze=True, label="analysis"))
        elif self.blue_green is not None:
            bg = self.blue_green
            steps.append(SetWeight(set_weight=0))
            if bg.preview_s > 0:
                steps.append(Hold(duration_s=bg.preview_s, analyze=False, label="preview"))
            if bg.analysis_s > 0:
                steps.append(Hold(duration_s=bg.analysis_s, analyze=True, label="analysis"))
        elif self.linear is not None:
            k = 1
            while True:
                weight = k * self.linear.step_percent
                weight = 100.0 if weight >= 100.0 - 1e-9 else round(weight, 6)
                steps.append(SetWeight(set_weight=weight))
                if self.bake_s > 0:
                    steps.append(Hold(duration_s=self.bake_s, analyze=False, label="bake"))
                interval_s = self.linear.interval_s
                steps.append(Hold(duration_s=interval_s, analyze=True, label="analysis"))
                if weight == 100.0:
                    break
                k += 1
        if not self.auto_promote and not (steps and isinstance(steps[-1], WaitForPromote)):
            steps.append(WaitForPromote())
        steps.append(Switch())
        if self.blue_green is not None:
            steps.append(ScaleDown(delay_s=self.blue_green.scale_down_delay_s))
        return steps

    def digest(self) -> str:
        """A short digest of the plan; a different digest is a new declaration."""
        return config_hash(self.model_dump(mode="json"))


# -- observations and gate verdicts ----------------------------------------------------------


@dataclass(frozen=True)
class VersionStats:
    """One version's outcomes in the current step's window (since `window_started_at`)."""

    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    def __post_init__(self) -> None:
        if self.requests < 0 or not (0 <= self.errors <= self.requests):
            raise ValueError(
                f"errors ({self.errors}) must be between 0 and requests ({self.requests})"
            )
        for name in ("p50_ms", "p99_ms"):
            value = getattr(self, name)
            if value is not None and not (value >= 0):
                raise ValueError(f"{name} ({value}) must be a latency of at least 0 ms or None")

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


@dataclass(frozen=True)
class Observation:
    """What the controller saw since the current step started: the input of one tick."""

    stats: Mapping[str, VersionStats] = field(default_factory=dict)
    shadow_agreement: float | None = None  # mean top-k overlap of shadow vs primary answers
    prometheus_value: float | None = None  # the value of gates.prometheus_query
    prometheus_available: bool = False  # False: not queried or unreachable -> gate skipped
    # Feedback outcomes since the rollout started (not per step: the sequential test runs over
    # the whole experiment): outcome name -> version -> ArmStats.
    outcomes: Mapping[str, Mapping[str, ArmStats]] = field(default_factory=dict)

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
    threshold = gates.max_error_rate
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
        return GateVerdict(
            "prometheus_max", GateStatus.SKIPPED, None, threshold,
            f"prometheus unavailable; {gates.prometheus_query!r} not evaluated",
        )  # fmt: skip
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
                    FAIL_FAST, GateStatus.PENDING, None, threshold,
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


def _lift_reason(outcome: str, verdict: Verdict, conclusion: Conclusion, bar: str, level: float) -> str:
    said = {
        Conclusion.BETTER: f"better than {bar}",
        Conclusion.WORSE: f"worse than {bar}",
        Conclusion.NOT_YET_KNOWN: f"not yet known against {bar}",
    }[conclusion]
    if verdict.looks == 0:
        return f"{outcome}: {said}; {verdict.reason}"
    mc, ms = verdict.candidate_mean, verdict.control_mean
    return (
        f"{outcome}: lift {_on_scale(verdict.lift, verdict.scale)}, "
        f"{level:.0%} always-valid interval [{_on_scale(verdict.low, verdict.scale)}, "
        f"{_on_scale(verdict.high, verdict.scale)}]; candidate {mc:.4g} (n={verdict.candidate_samples}), "
        f"stable {ms:.4g} (n={verdict.control_samples}): {said}"
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
        if before is not None and (before.candidate_samples, before.control_samples) == (
            cand.n, base.n
        ):
            verdict = before  # no new outcome: the same look (and the state stays equal)
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
            "mde": gate.mde,
            "min_samples_per_arm": gate.min_samples_per_arm,
            "p_value": verdict.p_value,
            "candidate": {"n": cand.n, "mean": cand.mean},
            "stable": {"n": base.n, "mean": base.mean},
        }
        verdicts.append(GateVerdict(
            name, _LIFT_STATUS[conclusion], verdict.lift, bar_value,
            _lift_reason(gate.outcome, verdict, conclusion, bar, gate.confidence), detail,
        ))  # fmt: skip
    return tuple(verdicts), state


# -- the state -------------------------------------------------------------------------------


class Phase(str, Enum):
    """Where a rollout is. The last three are terminal."""

    IDLE = "idle"  # declared; the first tick starts it
    PROGRESSING = "progressing"  # executing steps
    PAUSED = "paused"  # by the user, by a `pause_s: null` step, or an inconclusive analysis
    PROMOTING = "promoting"  # switched to 100%; old version kept warm until scale-down
    SUCCEEDED = "succeeded"  # the candidate is the stable version
    ROLLED_BACK = "rolled_back"  # a gate failed; all traffic on stable
    ABORTED = "aborted"  # an operator aborted; all traffic on stable

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.ABORTED})


class Command(str, Enum):
    """Operator commands (`rollout promote [--full] | pause | resume | abort`)."""

    PROMOTE = "promote"  # finish the current wait (pause, analysis, wait for promote) now
    PROMOTE_FULL = "promote_full"  # skip to the switch: 100% now
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


@dataclass(frozen=True)
class Event:
    """One line of a rollout's history: a phase change, a step done, or a command."""

    time_s: float
    from_phase: Phase
    to_phase: Phase
    step_index: int
    weight: float  # candidate percent after the event
    reason: str
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)  # gate -> reading

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "from_phase": self.from_phase.value,
            "to_phase": self.to_phase.value,
            "step_index": self.step_index,
            "weight": self.weight,
            "reason": self.reason,
            "gates": self.gates,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        return cls(
            time_s=float(data["time_s"]),
            from_phase=Phase(data["from_phase"]),
            to_phase=Phase(data["to_phase"]),
            step_index=int(data["step_index"]),
            weight=float(data["weight"]),
            reason=str(data["reason"]),
            gates={k: dict(v) for k, v in data.get("gates", {}).items()},
        )


@dataclass(frozen=True)
class RolloutState:
    """The live state of one rollout: everything `step` needs besides the observation.

    Immutable; `step` and `apply_command` return new states. Persist with `to_dict` (JSON-safe)
    and load with `from_dict`."""

    plan: RolloutPlan
    phase: Phase
    step_index: int  # index into plan.expand(); len(...) once finished
    candidate_weight: float
    step_started_at: float  # epoch s; also the start of the stats window
    paused_by_user: bool = False
    paused_at: float | None = None  # when the user paused (timer frozen since)
    hold_excluded_s: float = 0.0  # seconds since step_started_at that do not count toward it
    history: tuple[Event, ...] = ()
    generation: int = 0
    # The lift gates' sequential tests, carried from tick to tick: gate -> Verdict.reading().
    lift: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def start(cls, plan: RolloutPlan, now: float, *, generation: int = 0) -> RolloutState:
        """A new rollout, IDLE at 0%; the first `step` starts it."""
        return cls(
            plan=plan,
            phase=Phase.IDLE,
            step_index=0,
            candidate_weight=0.0,
            step_started_at=now,
            generation=generation,
        )

    @property
    def steps(self) -> list[Step]:
        return self.plan.expand()

    @property
    def current_step(self) -> Step | None:
        steps = self.steps
        return steps[self.step_index] if self.step_index < len(steps) else None

    @property
    def window_started_at(self) -> float:
        """Where the stats passed to the next `step` must start."""
        return self.step_started_at

    @property
    def stable_version(self) -> str:
        """The version that is stable now: the candidate once the rollout succeeded."""
        return self.plan.candidate if self.phase is Phase.SUCCEEDED else self.plan.stable

    @property
    def weights(self) -> dict[str, float]:
        return {
            self.plan.candidate: self.candidate_weight,
            self.plan.stable: 100.0 - self.candidate_weight,
        }

    @property
    def shadow_percent(self) -> float:
        """Percent mirrored to the candidate: blue-green's shadow, before the switch only."""
        bg = self.plan.blue_green
        if bg is None or self.phase not in (Phase.PROGRESSING, Phase.PAUSED):
            return 0.0
        return bg.shadow_percent

    def elapsed_s(self, now: float) -> float:
        """Seconds the current step has run, paused time excluded."""
        paused = now - self.paused_at if self.paused_at is not None else 0.0
        return max(0.0, now - self.step_started_at - self.hold_excluded_s - paused)

    def remaining_s(self, now: float) -> float | None:
        """Seconds left in the current timed step, or None when it is not timed."""
        current = self.current_step
        if isinstance(current, Hold):
            return max(0.0, current.duration_s - self.elapsed_s(now))
        if isinstance(current, ScaleDown):
            return max(0.0, current.delay_s - self.elapsed_s(now))
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "plan": self.plan.model_dump(mode="json"),
            "phase": self.phase.value,
            "step_index": self.step_index,
            "candidate_weight": self.candidate_weight,
            "step_started_at": self.step_started_at,
            "paused_by_user": self.paused_by_user,
            "paused_at": self.paused_at,
            "hold_excluded_s": self.hold_excluded_s,
            "history": [event.to_dict() for event in self.history],
            "generation": self.generation,
            "lift": {name: dict(reading) for name, reading in self.lift.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        schema = data.get("schema")
        if schema != STATE_SCHEMA:
            raise ValueError(f"rollout state schema {schema!r} is not {STATE_SCHEMA}")
        paused_at = data["paused_at"]
        return cls(
            plan=RolloutPlan.model_validate(data["plan"]),
            phase=Phase(data["phase"]),
            step_index=int(data["step_index"]),
            candidate_weight=float(data["candidate_weight"]),
            step_started_at=float(data["step_started_at"]),
            paused_by_user=bool(data["paused_by_user"]),
            paused_at=None if paused_at is None else float(paused_at),
            hold_excluded_s=float(data["hold_excluded_s"]),
            history=tuple(Event.from_dict(event) for event in data["history"]),
            generation=int(data["generation"]),
            lift={name: dict(reading) for name, reading in data.get("lift", {}).items()},
        )


@dataclass(frozen=True)
class Decision:
    """What one tick (or command) decided: the next state and the traffic it asks for."""

    state: RolloutState
    weights: dict[str, float]  # candidate and stable percent, summing to 100
    stable: str  # the stable version now (fallback target); the candidate once SUCCEEDED
    shadow_percent: float  # percent mirrored to the candidate (blue-green before the switch)
    verdicts: tuple[GateVerdict, ...]  # this tick's gate verdicts; () when none were taken
    events: tuple[Event, ...]  # the events this call added to the history
    traffic_changed: bool  # weights, stable or shadow differ from the input state's: push

    def traffic_config(self, base: TrafficConfig) -> TrafficConfig:
        """`base` (the declared router config) with this decision's traffic.

        The rollout owns weights (any other version in base gets 0) and the stable version;
        for blue-green it also owns the shadow rule. Breaker, cache, fallbacks and timeouts
        come from base."""
        plan = self.state.plan
        data = base.model_dump()
        data["weights"] = {version: 0.0 for version in base.weights} | self.weights
        data["stable"] = self.stable
        if plan.strategy == "blue_green":
            if self.shadow_percent > 0:
                keep = base.shadow.model_dump() if base.shadow is not None else {}
                data["shadow"] = ShadowRule.model_validate(
                    {**keep, "version": plan.candidate, "percent": self.shadow_percent}
                ).model_dump()
            else:
                data["shadow"] = None
        return TrafficConfig.model_validate(data)


# -- the reconcile function ------------------------------------------------------------------


def _traffic(state: RolloutState) -> tuple[Any, ...]:
    return (tuple(sorted(state.weights.items())), state.stable_version, state.shadow_percent)


def _readings(verdicts: tuple[GateVerdict, ...] | None) -> dict[str, dict[str, Any]]:
    return {v.gate: v.reading() for v in verdicts or ()}


def _event(
    before: RolloutState,
    after: RolloutState,
    now: float,
    reason: str,
    verdicts: tuple[GateVerdict, ...] | None = None,
    *,
    step_index: int | None = None,
) -> Event:
    return Event(
        time_s=now,
        from_phase=before.phase,
        to_phase=after.phase,
        step_index=before.step_index if step_index is None else step_index,
        weight=after.candidate_weight,
        reason=reason,
        gates=_readings(verdicts),
    )


def _next_step(
    state: RolloutState, now: float, *, weight: float | None = None, phase: Phase | None = None
) -> RolloutState:
    """Move to the following step with a fresh timer and stats window."""
    return replace(
        state,
        step_index=state.step_index + 1,
        step_started_at=now,
        hold_excluded_s=0.0,
        paused_at=None,
        paused_by_user=False,
        candidate_weight=state.candidate_weight if weight is None else weight,
        phase=state.phase if phase is None else phase,
    )


def _end(
    state: RolloutState,
    now: float,
    phase: Phase,
    reason: str,
    verdicts: tuple[GateVerdict, ...] | None,
    events: list[Event],
) -> RolloutState:
    """Roll back or abort: all traffic back on the stable version."""
    after = replace(
        state, phase=phase, candidate_weight=0.0, paused_by_user=False, paused_at=None
    )
    events.append(_event(state, after, now, reason, verdicts))
    return after


def _run_steps(
    state: RolloutState,
    now: float,
    verdicts: tuple[GateVerdict, ...] | None,
    events: list[Event],
    *,
    skip_first_wait: bool = False,
) -> RolloutState:
    """Execute steps from state.step_index until one must wait (or the rollout is done).

    `verdicts` is None when called from a command: an analysis that is due then waits for
    the next tick's verdicts. `skip_first_wait` (promote) ends the first waiting step at once.
    Each loop either returns or moves one step on, so it ends within len(steps) loops."""
    steps = state.plan.expand()
    total = len(steps)
    s = state
    while True:
        index = s.step_index
        if index >= total:
            after = replace(s, phase=Phase.SUCCEEDED, candidate_weight=100.0)
            events.append(
                _event(s, after, now, f"succeeded: {s.plan.candidate} is stable", verdicts)
            )
            return after
        current = steps[index]
        where = f"step {index + 1}/{total}"
        if isinstance(current, SetWeight):
            after = _next_step(s, now, weight=current.set_weight)
            events.append(_event(s, after, now, f"{where}: {current.describe()}", verdicts))
            s = after
            continue
        if isinstance(current, Switch):
            after = _next_step(s, now, weight=current.weight, phase=Phase.PROMOTING)
            events.append(_event(s, after, now, f"{where}: {current.describe()}", verdicts))
            s = after
            continue
        # A waiting step: Hold, WaitForPromote or ScaleDown.
        if skip_first_wait:
            skip_first_wait = False
            after = _next_step(s, now)
            reason = f"{where}: {current.describe()} skipped by promote"
            events.append(_event(s, after, now, reason))
            s = after
            continue
        if isinstance(current, WaitForPromote):
            if s.phase is Phase.PAUSED:
                return s
            after = replace(s, phase=Phase.PAUSED, paused_by_user=False)
            events.append(_event(s, after, now, f"{where}: waiting for promote", verdicts))
            return after
        assert isinstance(current, (Hold, ScaleDown))
        duration_s = current.duration_s if isinstance(current, Hold) else current.delay_s
        if s.elapsed_s(now) < duration_s:
            return s
        reason = f"{where}: {current.describe()} done"
        if isinstance(current, Hold) and current.analyze:
            if verdicts is None:
                return s
            undecided = [
                v for v in verdicts if v.status is GateStatus.PENDING and v.gate != FAIL_FAST
            ]
            if undecided and s.elapsed_s(now) < duration_s + _lift_wait_s(s.plan.gates, undecided):
                return s  # only lift gates are undecided and they may still take their time
            if undecided:
                after = replace(s, phase=Phase.PAUSED, paused_by_user=False)
                detail = "; ".join(f"{v.gate}: {v.reason}" for v in undecided)
                events.append(
                    _event(s, after, now, f"{where}: analysis inconclusive: {detail}", verdicts)
                )
                return after
            reason = f"{where}: {current.describe()} passed"
        after = _next_step(s, now)
        events.append(_event(s, after, now, reason, verdicts))
        s = after


def _lift_wait_s(gates: Gates, undecided: list[GateVerdict]) -> float:
    """How much longer than its duration an analysis may hold for `undecided` gates: the
    smallest max_wait_s among them, 0 if any is not a lift gate."""
    waits = []
    for verdict in undecided:
        gate = getattr(gates, verdict.gate, None) if verdict.gate in LIFT_GATES else None
        waits.append(gate.max_wait_s if gate is not None else 0.0)
    return min(waits, default=0.0)


def _decide(
    before: RolloutState,
    after: RolloutState,
    verdicts: tuple[GateVerdict, ...],
    events: list[Event],
) -> Decision:
    changed = _traffic(after) != _traffic(before)
    history = (before.history + tuple(events))[-MAX_HISTORY_EVENTS:]
    after = replace(
        after, history=history, generation=before.generation + (1 if changed else 0)
    )
    return Decision(
        state=after,
        weights=after.weights,
        stable=after.stable_version,
        shadow_percent=after.shadow_percent,
        verdicts=verdicts,
        events=tuple(events),
        traffic_changed=changed,
    )


def step(state: RolloutState, observation: Observation, now: float) -> Decision:
    """One reconcile tick: judge the gates, then run the plan as far as it can go now.

    `observation` covers `state.window_started_at` .. `now`. A failed gate rolls back at once
    (in any live phase); a paused rollout only has its gates judged; otherwise the steps run
    until one must wait. Pure: the same inputs give the same Decision."""
    if state.phase.terminal:
        return _decide(state, state, (), [])
    events: list[Event] = []
    s = state
    plan = s.plan
    if s.phase is Phase.IDLE:
        s = replace(s, phase=Phase.PROGRESSING, step_started_at=now)
        events.append(
            _event(
                state, s, now,
                f"started: {plan.strategy} rollout of {plan.candidate} (stable {plan.stable}), "
                f"plan {plan.digest()}",
            )  # fmt: skip
        )
    verdicts = evaluate_gates(
        plan.gates, observation, candidate=plan.candidate, stable=plan.stable
    )
    lift_verdicts, lift = evaluate_lift_gates(
        plan.gates, observation, s.lift, candidate=plan.candidate, stable=plan.stable
    )
    if lift_verdicts:
        verdicts += lift_verdicts
        s = replace(s, lift=lift)
    failed = [v for v in verdicts if v.status is GateStatus.FAILED]
    if failed:
        detail = "; ".join(f"gate {v.gate} failed: {v.reason}" for v in failed)
        s = _end(s, now, Phase.ROLLED_BACK, f"rolled back: {detail}", verdicts, events)
    elif s.phase is not Phase.PAUSED:
        s = _run_steps(s, now, verdicts, events)
    return _decide(state, s, verdicts, events)


_ALLOWED: dict[Command, frozenset[Phase]] = {
    Command.PROMOTE: frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING}),
    Command.PROMOTE_FULL: frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING}),
    Command.PAUSE: frozenset({Phase.PROGRESSING}),
    Command.RESUME: frozenset({Phase.PAUSED}),
    Command.ABORT: frozenset({Phase.IDLE, Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING}),
}


def _refusal(command: Command, phase: Phase) -> str:
    if phase.terminal:
        why = "it has ended; declare a new rollout"
    elif phase is Phase.IDLE:
        why = "it has not started yet; the controller's next tick starts it"
    elif command is Command.PAUSE and phase is Phase.PAUSED:
        why = "it is already paused"
    elif command is Command.PAUSE:
        why = "traffic has already switched; abort to roll back or promote to finish"
    else:
        why = "it is not paused"
    return f"cannot {command.value}: the rollout is {phase.value} ({why})"


def apply_command(
    state: RolloutState, command: Command | str, now: float, *, reason: str = ""
) -> RolloutState:
    """An operator command, recorded in the history; `reason` (who, why) goes into the event.

    * promote: end the current wait (pause, analysis, wait for promote, scale-down delay) and
      apply the following weight changes now; gates still judge on the next tick.
    * promote_full: jump to the switch (100%); in PROMOTING, finish now.
    * pause / resume: freeze / unfreeze the step timer (gates keep judging). resume also
      re-runs an inconclusive analysis (timer restarts; the stats window keeps growing).
    * abort: all traffic back on stable, ABORTED.

    Raises ValueError naming the phase when the command does not apply to it."""
    command = Command(command)
    phase = state.phase
    if phase not in _ALLOWED[command]:
        raise ValueError(_refusal(command, phase))
    note = f"command {command.value}" + (f" ({reason})" if reason else "")
    events: list[Event] = []
    if command is Command.ABORT:
        s = _end(state, now, Phase.ABORTED, f"aborted: {note}", None, events)
    elif command is Command.PAUSE:
        s = replace(state, phase=Phase.PAUSED, paused_by_user=True, paused_at=now)
        events.append(_event(state, s, now, note))
    elif command is Command.RESUME:
        current = state.current_step
        if state.paused_by_user:
            assert state.paused_at is not None
            excluded = state.hold_excluded_s + max(0.0, now - state.paused_at)
        elif isinstance(current, Hold) and current.analyze:
            excluded = max(0.0, now - state.step_started_at)  # run the analysis timer again
        else:
            raise ValueError(
                f"cannot resume: the rollout is paused at step {state.step_index + 1} waiting "
                "for promote; use promote"
            )
        s = replace(
            state,
            phase=Phase.PROGRESSING,
            paused_by_user=False,
            paused_at=None,
            hold_excluded_s=excluded,
        )
        events.append(_event(state, s, now, note))
    else:
        s = state
        if s.phase is Phase.PAUSED:
            s = replace(s, phase=Phase.PROGRESSING, paused_by_user=False, paused_at=None)
        if command is Command.PROMOTE_FULL:
            steps = s.plan.expand()
            switch = next(i for i, item in enumerate(steps) if isinstance(item, Switch))
            target = switch if s.step_index <= switch else len(steps)
            s = replace(s, step_index=target, step_started_at=now, hold_excluded_s=0.0)
            events.append(_event(state, s, now, note, step_index=state.step_index))
            s = _run_steps(s, now, None, events)
        else:
            events.append(_event(state, s, now, note))
            s = _run_steps(s, now, None, events, skip_first_wait=True)
    return _decide(state, s, (), events).state
