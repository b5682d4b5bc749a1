"""The rollout plan schema: canary, blue-green and linear strategies, their steps and Gates.

A rollout is data (Argo Rollouts' idea): a `RolloutPlan` declares the strategy, the two
versions, the steps and the gates. `RolloutPlan.expand` turns any strategy into one flat list
of concrete steps (`LoadTest`, `SetWeight`, `Hold`, `WaitForPromote`, `Switch`, `ScaleDown`),
so the state machine (`machine.py`) knows only those six kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from app.config import (
    NAME_PATTERN,
    FiniteStrictModel,
    StrictModel,
    config_hash,
)
from app.constants import DEFAULT_TICK_INTERVAL_S
from app.rollout.abtest import (
    ImprovementGate,
    NonInferiorityGate,
    outcome_bounds,
)
from app.rollout.feedback import FeedbackSettings
from app.rollout.notify import NotificationSettings

FAIL_FAST = "fail_fast_error_rate"
MIN_REQUESTS = "min_requests"


# -- the plan --------------------------------------------------------------------------------


class Gates(FiniteStrictModel):
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
            "prometheus_max. What an unavailable reading does: prometheus_on_error."
        ),
    )
    prometheus_max: float | None = Field(
        default=None, description="Highest acceptable value of prometheus_query."
    )
    prometheus_on_error: Literal["pause", "fail", "skip"] = Field(
        default="pause",
        description=(
            "When prometheus_error_limit queries in a row gave no reading (unreachable, an "
            "error, no series, NaN or an infinite value): 'pause' keeps the gate pending, so "
            "no analysis can pass on it and one that ends without it pauses (inconclusive); "
            "'fail' fails the gate (a rollback); 'skip' skips it at once (fails open)."
        ),
    )
    prometheus_error_limit: int = Field(
        default=3, ge=1,
        description="Failed queries in a row before prometheus_on_error applies; until then "
        "the gate is pending.",
    )  # fmt: skip
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

    @model_validator(mode="after")
    def _lift_gates_agree_on_their_outcome(self) -> Gates:
        self.outcome_bounds()  # ValueError when both judge one outcome with other bounds
        return self

    def outcome_bounds(self) -> dict[str, tuple[float, float]]:
        """Outcome -> (min_value, max_value) of the lift gates' continuous outcomes: what the
        feedback desk clips those outcomes to for this rollout (`FeedbackDesk.reset`)."""
        return outcome_bounds((self.improvement, self.non_inferiority))


class LoadStage(FiniteStrictModel):
    """`load_stage:` in a plan: before the candidate takes any user weight, the controller
    replays a captured traffic sample against it, ramping linearly up to a target rate and
    holding it, through an internal path no router sees (never gate evidence, never counted in
    the routers' stats). The hold must pass every gate below, or the rollout rolls back with
    the candidate still at 0%.

    The target rate is `target_rps` when declared; else `headroom` x the model's observed
    request rate (every version, over the last RATE_WINDOW_S, taken once when the stage
    starts: with the candidate at 0% that is the traffic it will carry at 100%); never below
    `min_rps`. Exactly one of target_rps and headroom is set.

        load_stage:
          sample: /var/lib/rollout/capture   # router.capture's directory (or `capture import`)
          headroom: 1.5                      # or target_rps: 200
          min_rps: 5
          ramp_s: 30
          hold_s: 60
          concurrency: 32
          max_p99_ms: 250
          max_error_rate: 0.01
          min_throughput_ratio: 0.9
    """

    sample: str = Field(
        min_length=1,
        description=(
            "Directory of a captured sample (router.capture's directory, or one written by "
            "`rollout capture import`); the plan's model's records are replayed, in order, "
            "cycling. Read by the controller's replica: it must be reachable from its node."
        ),
    )
    target_rps: float | None = Field(
        default=None, gt=0, description="Requests per second to ramp up to and hold."
    )
    headroom: float | None = Field(
        default=None,
        gt=0,
        description="Target rate as this multiple of the model's observed request rate.",
    )
    min_rps: float = Field(default=1.0, gt=0, description="The lowest target rate.")
    ramp_s: float = Field(
        default=10.0, ge=0, description="Seconds to ramp linearly from 0 to the target rate."
    )
    hold_s: float = Field(
        default=30.0, gt=0, description="Seconds at the target rate; the gates judge the hold."
    )
    concurrency: int = Field(
        default=64,
        ge=1,
        description=(
            "Most replayed requests in flight at once; a due request waits for a slot, so a "
            "candidate too slow for the rate falls behind and fails min_throughput_ratio."
        ),
    )
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds one replayed request may take (else an error)."
    )
    max_p99_ms: float | None = Field(
        default=None, gt=0, description="Highest p99 latency of the hold's requests (ms)."
    )
    max_error_rate: float | None = Field(
        default=0.01, ge=0, le=1, description="Highest error rate of the hold's requests."
    )
    min_throughput_ratio: float | None = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Lowest (answered requests / hold_s) / target rate during the hold.",
    )
    max_records: int = Field(
        default=10_000, ge=1, description="Most sample records read (and cycled through)."
    )

    @model_validator(mode="after")
    def _one_rate_rule(self) -> LoadStage:
        if (self.target_rps is None) == (self.headroom is None):
            raise ValueError(
                f"load_stage needs exactly one of target_rps ({self.target_rps}) and headroom "
                f"({self.headroom}): a declared rate, or a multiple of the observed one"
            )
        return self

    @model_validator(mode="after")
    def _target_above_floor(self) -> LoadStage:
        if self.target_rps is not None and self.target_rps < self.min_rps:
            raise ValueError(
                f"load_stage.target_rps ({self.target_rps:g}) must be greater than or equal "
                f"to load_stage.min_rps ({self.min_rps:g})"
            )
        return self

    def target(self, observed_rps: float) -> float:
        """The rate to ramp to, given the model's observed request rate."""
        if self.target_rps is not None:
            return max(self.target_rps, self.min_rps)
        return max(self.min_rps, (self.headroom or 0.0) * max(0.0, observed_rps))


class SetWeight(FiniteStrictModel):
    """Canary step `- set_weight: 25`: the candidate's percent of public traffic."""

    set_weight: float = Field(ge=0, le=100, description="Candidate's percent of traffic.")

    def describe(self) -> str:
        return f"set_weight {self.set_weight:g}%"


class Pause(FiniteStrictModel):
    """Canary step `- pause_s: 30` (hold 30 s) or `- pause_s: null` (until `rollout promote`).

    Gates still judge during a pause; it just does not require them to pass."""

    pause_s: float | None = Field(
        gt=0, description="Seconds to hold the current weight; null waits for promote."
    )


class Analysis(FiniteStrictModel):
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
    kinds: dict[type[Any], str] = {
        SetWeight: "set_weight",
        Pause: "pause_s",
        Analysis: "analysis_s",
    }
    return kinds.get(type(value))


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


class CanaryPlan(FiniteStrictModel):
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


class BlueGreenPlan(FiniteStrictModel):
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


class LinearPlan(FiniteStrictModel):
    """Equal increments: step_percent more traffic every interval_s, analysed each time."""

    step_percent: float = Field(gt=0, le=100, description="Percent added per step.")
    interval_s: float = Field(gt=0, description="Seconds of analysis at each weight.")


class LoadTest(FiniteStrictModel):
    """Expanded step: run the plan's load stage (candidate at 0%) and wait for its verdict."""

    stage: LoadStage = Field(description="The plan's load_stage block.")

    def describe(self) -> str:
        st = self.stage
        rate = f"{st.target_rps:g} rps" if st.target_rps is not None else f"{st.headroom:g}x"
        return f"load stage {rate} (ramp {st.ramp_s:g}s, hold {st.hold_s:g}s)"


class Hold(FiniteStrictModel):
    """Expanded step: keep the weight for duration_s; with analyze, gates must pass at the end."""

    duration_s: float = Field(gt=0, description="Seconds to hold, not counting paused time.")
    analyze: bool = Field(description="Require every gate to pass when the time is up.")
    label: str = Field(default="hold", description="What the plan called it (for status).")

    def describe(self) -> str:
        return f"{self.label} {self.duration_s:g}s"


class WaitForPromote(FiniteStrictModel):
    """Expanded step: wait (PAUSED) until an operator promotes."""

    def describe(self) -> str:
        return "wait for promote"


class Switch(FiniteStrictModel):
    """Expanded step: the final move of all traffic to the candidate (phase PROMOTING)."""

    weight: float = Field(default=100.0, description="Candidate's percent after the switch.")

    def describe(self) -> str:
        return f"switch to {self.weight:g}%"


class ScaleDown(FiniteStrictModel):
    """Expanded step: keep the old version warm for delay_s after the switch, then finish."""

    delay_s: float = Field(ge=0, description="Seconds before the old version is retired.")

    def describe(self) -> str:
        return f"scale down after {self.delay_s:g}s"


Step = Union[LoadTest, SetWeight, Hold, WaitForPromote, Switch, ScaleDown]  # noqa: UP007


class RolloutPlan(FiniteStrictModel):
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
        progress_deadline_s: 600    # roll back a candidate with no running replica this long
        load_stage:                 # optional, any strategy: replay a sample at the candidate
          sample: /mnt/capture      #   at 0% before its first step (LoadStage)
          target_rps: 200
          max_p99_ms: 250
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
    load_stage: LoadStage | None = Field(
        default=None,
        description=(
            "Replay a traffic sample against the candidate at 0% before its first step; a "
            "failed load stage rolls back before any user request reaches it."
        ),
    )
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
    # 600 s as Flagger's progressDeadlineSeconds and a Kubernetes Deployment's default: long
    # enough for a large model to load on a fresh GPU node, short enough that a candidate that
    # can never start does not hold a rollout (and its pending gates) for hours.
    progress_deadline_s: float | None = Field(
        default=600.0,
        gt=0,
        description=(
            "Roll back when the candidate has had no running replica for this many seconds "
            "while the rollout is live (user pauses excepted), as Flagger's "
            "progressDeadlineSeconds; null: never."
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

        Without auto_promote a WaitForPromote comes before the Switch. With a load_stage, a
        LoadTest comes first (candidate at 0%).
        """
        steps: list[Step] = []
        if self.load_stage is not None:
            steps.append(LoadTest(stage=self.load_stage))
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


class ControllerUserConfig(StrictModel):
    """The RolloutController's `user_config` in serve_config.yaml: the declared rollout. One
    model for the controller (which refuses a bad declaration and keeps the live rollout) and
    for `rollout validate` (which refuses it before it is deployed)."""

    # Errors are shown in status and logs; they must not echo what was written (a webhook URL
    # put inline by mistake is a secret). The messages still name the field and the rule.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    plan: RolloutPlan | None = Field(
        default=None, description="The rollout to run; null: no rollout steers traffic."
    )
    tick_interval_s: float = Field(
        default=DEFAULT_TICK_INTERVAL_S, ge=0.05, le=10, strict=True,
        description="Seconds between the controller's reconcile ticks.",
    )  # fmt: skip
    prometheus_url: str | None = Field(
        default=None,
        description="Base URL of the Prometheus server the `prometheus_query` gate asks.",
    )
    feedback: FeedbackSettings = Field(
        default_factory=FeedbackSettings, description="How long answers stay open for feedback."
    )
    notifications: NotificationSettings = Field(
        default_factory=NotificationSettings,
        description="Webhooks that get every rollout event (docs/notifications.md).",
    )

    @field_validator("prometheus_url", mode="before")
    @classmethod
    def _http_url(cls, value: Any) -> Any:
        if value == "":
            return None  # an empty URL means none, as before
        if value is not None and not (
            isinstance(value, str) and value.startswith(("http://", "https://"))
        ):
            raise ValueError(f"{value!r} must be an http(s) URL")
        return value

    @field_validator("feedback", "notifications", mode="before")
    @classmethod
    def _null_feedback(cls, value: Any) -> Any:
        return {} if value is None else value  # `feedback: null`: the defaults

    @model_validator(mode="after")
    def _cuped_needs_a_pre_period(self) -> ControllerUserConfig:
        if self.plan is None or self.feedback.pre_period_s > 0:
            return self
        for name in ("improvement", "non_inferiority"):
            gate = getattr(self.plan.gates, name)
            if gate is not None and gate.cuped:
                raise ValueError(
                    f"plan.gates.{name}.cuped (true) needs feedback.pre_period_s "
                    f"({self.feedback.pre_period_s:g}) greater than 0: CUPED adjusts by each "
                    "user's outcomes from before the rollout, which the controller keeps only "
                    "for that many seconds"
                )
        return self

    def check_versions(self, deployed: list[str]) -> None:
        """ValueError when the plan names versions that are not deployed."""
        if self.plan is None:
            return
        unknown = sorted({self.plan.candidate, self.plan.stable} - set(deployed))
        if unknown:
            raise ValueError(f"plan names versions that are not deployed: {unknown}")
