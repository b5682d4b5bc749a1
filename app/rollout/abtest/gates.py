"""The A/B lift gates a rollout plan declares: improvement (better by a bar) and non-inferiority."""

from __future__ import annotations

from pydantic import Field, model_validator

from app.config import FiniteStrictModel
from app.rollout.abtest.arms import Scale
from app.rollout.abtest.sequential import Conclusion, SequentialTest, Verdict

# -- gate configs ----------------------------------------------------------------------------


class _LiftGate(FiniteStrictModel):
    """What both lift gates share: the outcome they judge and the sequential test they run."""

    outcome: str = Field(
        pattern=r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$",
        description="The feedback outcome judged (POST .../feedback with this `outcome`).",
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
        description="1 - alpha of the sequential test: how sure a pass or a fail must be.",
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

    def sequential_test(self) -> SequentialTest:
        """The test whose verdicts this gate judges (alpha = 1 - confidence)."""
        return SequentialTest(
            alpha=round(1 - self.confidence, 12),  # 1 - 0.95 is 0.050000000000000044
            scale=self.scale,
            mde=self.mde,
            tau=self.tau,
            min_samples_per_arm=self.min_samples_per_arm,
        )

    def _check(self, verdict: Verdict) -> None:
        test = self.sequential_test()
        if (verdict.alpha, verdict.tau, verdict.scale) != (
            test.alpha,
            test.effective_tau,
            test.scale,
        ):
            raise ValueError(
                f"verdict came from another test (alpha {verdict.alpha}, tau {verdict.tau}, "
                f"{verdict.scale}) than this gate's (alpha {test.alpha}, tau "
                f"{test.effective_tau}, {test.scale})"
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
