"""Comparing two model versions on real outcomes (conversions, clicks, ratings, revenue).

Ray-free statistics for the feedback loop: each version's outcomes are summed into an
`ArmStats`; fixed-horizon intervals describe one arm or the gap between two; a `SequentialTest`
decides whether the candidate is better, worse, or not yet known, and may be asked every tick.

    ArmStats(kind, n, sum, sum_sq, units)   sums, so router replicas merge them by addition;
                                            `units` (UnitMoments): per-user moments, so the
                                            variance is cluster-robust (a user's outcomes
                                            are correlated); `covariates`: the CUPED
                                            pre-period sums (COVARIATE_MOMENTS)
    confidence_interval(arm, level)         Wilson (binary) or normal (continuous), one arm
    difference_interval(c, s, level, scale) absolute gap (Newcombe / Welch) or relative lift
                                            (delta method); fixed-horizon, NOT safe to peek at
    SequentialTest.evaluate(c, s, previous) mixture SPRT: always-valid p-value and confidence
                                            sequence; safe to look at every tick (boundary
                                            horizon: valid up to a declared cap, ends there)
    Verdict.improvement(min_lift)           better / worse / not_yet_known against a bar
    Verdict.non_inferiority(margin)
    ImprovementGate, NonInferiorityGate     the rollout plan's lift gates (rollout/gates.py judges them)
    outcome_bounds(gates)                   outcome -> (min_value, max_value) to clip it to
    required_sample_size(...)               fixed-horizon planning figure (two proportions)
    horizon_tau(sd, max_samples_per_arm)    mixing tau with the lowest boundary at a planned cap

`arms.py` holds one arm and the fixed-horizon intervals, `sequential.py` the sequential test,
`gates.py` the gate configs. Why a sequential test, and the choices behind it, are written up
in docs/ab-testing.md ("The statistics").
"""

from app.rollout.abtest.arms import (
    COVARIATE_MOMENTS,
    MAX_ABS_OUTCOME,
    ArmStats,
    Interval,
    OutcomeKind,
    Scale,
    UnitMoments,
    confidence_interval,
    difference_interval,
    required_sample_size,
)
from app.rollout.abtest.gates import ImprovementGate, NonInferiorityGate, outcome_bounds
from app.rollout.abtest.sequential import (
    Conclusion,
    PathResult,
    SequentialTest,
    Verdict,
    horizon_tau,
)

__all__ = [
    "COVARIATE_MOMENTS",
    "MAX_ABS_OUTCOME",
    "ArmStats",
    "Conclusion",
    "ImprovementGate",
    "Interval",
    "NonInferiorityGate",
    "OutcomeKind",
    "PathResult",
    "Scale",
    "SequentialTest",
    "UnitMoments",
    "Verdict",
    "confidence_interval",
    "difference_interval",
    "horizon_tau",
    "outcome_bounds",
    "required_sample_size",
]
