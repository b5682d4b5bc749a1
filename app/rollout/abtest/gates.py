"""The A/B lift gates a rollout plan declares: improvement (better by a bar) and non-inferiority."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import Field, model_validator

from app.config import FiniteStrictModel
from app.rollout.abtest.arms import MAX_ABS_OUTCOME, OutcomeKind, Scale
from app.rollout.abtest.sequential import (
    Boundary,
    Conclusion,
    Directions,
    SequentialTest,
    Verdict,
    _check_horizon,
)

# -- gate configs ----------------------------------------------------------------------------


class _LiftGate(FiniteStrictModel):
    """What both lift gates share: the outcome they judge and the sequential test they run."""

    outcome: str = Field(
        pattern=r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$",
        description="The feedback outcome judged (POST .../feedback with this `outcome`).",
    )
    kind: Literal["binary", "continuous"] = Field(
        default="binary",
        description=(
            "binary: true/false feedback (click, conversion); continuous: numbers (revenue, "
            "rating), which need min_value and max_value. Feedback of the other kind is "
            "never judged (the gate stays pending and says why)."
        ),
    )
    min_value: float | None = Field(
        default=None,
        ge=-MAX_ABS_OUTCOME,
        le=MAX_ABS_OUTCOME,
        description=(
            "Continuous outcomes: a value below is counted as min_value (winsorised), so no "
            "single value can dominate the test; clipped values are counted in status."
        ),
    )
    max_value: float | None = Field(
        default=None,
        ge=-MAX_ABS_OUTCOME,
        le=MAX_ABS_OUTCOME,
        description="Continuous outcomes: a value above is counted as max_value (winsorised).",
    )
    max_wait_s: float = Field(
        default=0.0,
        ge=0,
        le=7 * 24 * 3600,
        description=(
            "When an analysis hold's time is up and this gate is still not yet known, keep "
            "holding up to this many more seconds for the test to decide (0: inconclusive at "
            "once, which pauses the rollout)."
        ),
    )

    confidence: float = Field(
        default=0.95,
        gt=0.5,
        lt=1,
        description=(
            "1 - alpha of the sequential test: how sure a pass or a fail must be (directions "
            "shared: both together; separate: a pass alone)."
        ),
    )
    directions: Directions = Field(
        default="shared",
        description=(
            "shared: one two-sided test, 1 - confidence bounds a false pass or fail together; "
            "separate: a one-sided test for each, 1 - confidence bounds a false pass (a "
            "promotion) and 1 - stop_confidence a false fail (a stop), for more power."
        ),
    )
    stop_confidence: float | None = Field(
        default=None,
        gt=0.5,
        lt=1,
        description=(
            "directions separate: how sure a fail (a rollback) must be; null uses confidence. "
            "Only with directions separate."
        ),
    )
    scale: Scale = Field(
        default="relative",
        description="relative: (mean_c - mean_s) / mean_s; absolute: mean_c - mean_s.",
    )
    mde: float = Field(
        default=0.05, gt=0, description="Lift the test is tuned to detect, on `scale`."
    )
    tau: float | None = Field(
        default=None,
        gt=0,
        description="Mixing standard deviation over the lift, on `scale`; null uses mde.",
    )
    min_samples_per_arm: int = Field(
        default=1000, ge=2, description="Outcomes per arm before a look counts."
    )
    min_units_per_arm: int = Field(
        default=30,
        ge=2,
        description=(
            "Units (users) per arm before a look counts (at most min_samples_per_arm): the "
            "variance comes from the spread between users."
        ),
    )

    cuped: bool = Field(
        default=False,
        description=(
            "CUPED: adjust the test by each user's outcomes on the stable version before the "
            "rollout started, which narrows the interval when users' rates differ (keyed, "
            "sticky traffic only). Needs feedback.pre_period_s > 0 in the controller's "
            "user_config."
        ),
    )

    boundary: Boundary = Field(
        default="mixture",
        description=(
            "mixture: the always-valid mSPRT, no end; horizon: valid for any number of looks "
            "up to horizon_samples_per_arm, more power there, and the test ends at it (an "
            "undecided gate then makes the analysis inconclusive when its time is up; "
            "max_wait_s does not extend it)."
        ),
    )
    horizon_samples_per_arm: int | None = Field(
        default=None,
        ge=2,
        description=(
            "boundary horizon: the rollout's cap in outcomes per arm, fixed before it starts "
            "(at least twice min_samples_per_arm). Required with horizon, not allowed with "
            "mixture."
        ),
    )

    @model_validator(mode="after")
    def _horizon_samples_with_horizon_boundary(self) -> _LiftGate:
        horizon = self.horizon_samples_per_arm
        if self.boundary == "horizon" and horizon is None:
            raise ValueError(
                f"horizon_samples_per_arm is required with boundary horizon (outcome "
                f"{self.outcome!r}): the cap in outcomes per arm the test is valid up to"
            )
        if self.boundary == "mixture" and horizon is not None:
            raise ValueError(
                f"horizon_samples_per_arm ({horizon}) needs boundary horizon (boundary is "
                "mixture, which has no horizon)"
            )
        _check_horizon(horizon, self.min_samples_per_arm)
        return self

    @model_validator(mode="after")
    def _stop_confidence_needs_separate_directions(self) -> _LiftGate:
        if self.stop_confidence is not None and self.directions != "separate":
            raise ValueError(
                f"stop_confidence ({self.stop_confidence}) needs directions separate "
                f"(directions is {self.directions}: confidence ({self.confidence}) covers a "
                "pass and a fail together)"
            )
        return self

    @model_validator(mode="after")
    def _continuous_outcomes_have_bounds(self) -> _LiftGate:
        declared = (self.min_value is not None, self.max_value is not None)
        if self.kind == "binary" and any(declared):
            raise ValueError(
                f"min_value ({self.min_value}) and max_value ({self.max_value}) apply to a "
                f"continuous outcome only; outcome {self.outcome!r} has kind binary"
            )
        if self.kind == "continuous" and not all(declared):
            raise ValueError(
                f"a continuous outcome ({self.outcome!r}) needs min_value "
                f"({self.min_value}) and max_value ({self.max_value}): its values are clipped "
                "to them, so that no single value (a forged 1e6 in revenue) can dominate the "
                "test"
            )
        if self.min_value is not None and self.max_value is not None:
            if self.max_value <= self.min_value:
                raise ValueError(
                    f"max_value ({self.max_value}) must be greater than min_value "
                    f"({self.min_value})"
                )
        return self

    @property
    def bounds(self) -> tuple[float, float] | None:
        """(min_value, max_value) of a continuous outcome; None for a binary one."""
        if self.min_value is None or self.max_value is None:
            return None
        return (float(self.min_value), float(self.max_value))

    def sequential_test(self) -> SequentialTest:
        """The test whose verdicts this gate judges (alpha = 1 - confidence, stop_alpha =
        1 - stop_confidence)."""
        stop = self.stop_confidence
        return SequentialTest(
            alpha=round(1 - self.confidence, 12),  # 1 - 0.95 is 0.050000000000000044
            directions=self.directions,
            stop_alpha=None if stop is None else round(1 - stop, 12),
            scale=self.scale,
            mde=self.mde,
            tau=self.tau,
            min_samples_per_arm=self.min_samples_per_arm,
            min_units_per_arm=self.min_units_per_arm,
            kind=OutcomeKind(self.kind),
            bounds=self.bounds,
            cuped=self.cuped,
            boundary=self.boundary,
            horizon_samples_per_arm=self.horizon_samples_per_arm,
        )

    def _check(self, verdict: Verdict) -> None:
        test = self.sequential_test()
        theirs = (verdict.alpha, verdict.tau, verdict.scale, verdict.directions,
                  verdict.stop_alpha, verdict.boundary, verdict.horizon_samples_per_arm)  # fmt: skip
        ours = (test.alpha, test.effective_tau, test.scale, test.directions,
                test.effective_stop_alpha, test.boundary, test.horizon_samples_per_arm)  # fmt: skip
        if theirs != ours:
            raise ValueError(
                f"verdict came from another test (alpha, tau, scale, directions, stop_alpha, "
                f"boundary, horizon_samples_per_arm = {theirs}) than this gate's ({ours})"
            )


class ImprovementGate(_LiftGate):
    """Promote only on proof of a lift: passes (BETTER) once the always-valid lower bound
    exceeds min_lift; fails (WORSE) once the upper bound is below it, since the candidate can
    then no longer prove the lift and its traffic is better spent elsewhere."""

    min_lift: float = Field(
        default=0.0, ge=0, description="Lift the candidate must surely exceed, on `scale`."
    )

    def judge(self, verdict: Verdict) -> Conclusion:
        self._check(verdict)
        return verdict.improvement(self.min_lift)


class NonInferiorityGate(_LiftGate):
    """Keep going unless the candidate is surely worse by more than margin: passes (BETTER)
    once the lower bound exceeds -margin; fails (WORSE) once the upper bound is below it."""

    margin: float = Field(
        ge=0, description="How much worse than control is acceptable, on `scale` (0.01 = 1%)."
    )

    @model_validator(mode="after")
    def _relative_margin_below_one(self) -> NonInferiorityGate:
        if self.scale == "relative" and self.margin >= 1:
            raise ValueError(
                f"margin ({self.margin}) must be less than 1 on the relative scale: a lift "
                "cannot fall below -100%, so the gate could never fail"
            )
        return self

    def judge(self, verdict: Verdict) -> Conclusion:
        self._check(verdict)
        return verdict.non_inferiority(self.margin)


def outcome_bounds(gates: Iterable[_LiftGate | None]) -> dict[str, tuple[float, float]]:
    """Outcome name -> (min_value, max_value) the feedback desk clips it to, from a plan's lift
    gates; ValueError when two gates declare one outcome differently (it is counted once)."""
    declared: dict[str, tuple[str, tuple[float, float] | None]] = {}
    for gate in gates:
        if gate is None:
            continue
        mine = (gate.kind, gate.bounds)
        theirs = declared.setdefault(gate.outcome, mine)
        if theirs != mine:
            raise ValueError(
                f"outcome {gate.outcome!r} is declared twice, as {theirs[0]} {theirs[1] or ''} "
                f"and as {mine[0]} {mine[1] or ''}: gates judging one outcome must agree on "
                "kind, min_value and max_value"
            )
    return {outcome: b for outcome, (_, b) in declared.items() if b is not None}
