"""The always-valid sequential test (mixture SPRT) that decides an A/B rollout.

    SequentialTest.evaluate(c, s, previous) always-valid p-value and confidence sequence; safe
                                            to look at every tick (the controller does, 4x/s)
    Verdict.improvement(min_lift)           better / worse / not_yet_known against a bar
    Verdict.non_inferiority(margin)
    horizon_tau(sd, max_samples_per_arm)    the mixing tau whose boundary is lowest at a cap

`directions` shared (the default) runs one two-sided test whose alpha covers a false 'better'
and a false 'worse' together; separate runs a one-sided test per direction (half-normal
mixtures), alpha for a false 'better' (a promotion) and stop_alpha for a false 'worse' (a
stop). With `cuped`, `evaluate` adjusts by each unit's pre-experiment outcomes (the arms'
`covariates`), as `evaluate_paths` does with the covariates it is given.

`boundary` mixture (the default) is valid for ever, however long the test runs; horizon
(with `horizon_samples_per_arm`, a cap N declared in advance) is valid for any number of
looks up to N and ends there. With information time t = n_eff / N (n_eff the harmonic mean
of the arms' outcome counts) and Z = (d - delta) / sqrt(V), the B-value W(t) = Z sqrt(t) is
about Brownian motion under delta, and P(sup_{t <= 1} W(t) >= c) = 2 (1 - Phi(c)) (the
reflection principle): the interval d -+ c sqrt(V / t) with c = Phi^-1(1 - a / 2) per side
is a confidence sequence over t in (0, 1]. The continuous-monitoring O'Brien-Fleming shape
(Lan-DeMets): z = c / sqrt(t) at a look, c = 1.96 one-sided at 5% at the horizon, against
~2.8-3.1 for the mixture there. With correlated users information grows slower than n
(concave), so the true information fraction s >= t and W(t) = W_true(s) sqrt(t / s) is
never larger than the true B-value: the boundary is conservative, never anti-conservative.

Why sequential, and how the variance, the mixing scale and the alphas are chosen:
docs/ab-testing.md ("The statistics").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from statistics import NormalDist
from typing import Any, Literal, cast

import numpy as np
from pydantic import Field, model_validator

from app.config import FiniteStrictModel
from app.rollout.abtest.arms import (
    COVARIATE_MOMENTS,
    ArmStats,
    OutcomeKind,
    Scale,
    _design_effect,
    _moments,
    _same_kind,
)

# -- the sequential test ---------------------------------------------------------------------

# shared: one two-sided test, alpha bounds a false 'better' or 'worse' (about alpha/2 each);
# separate: a one-sided test per direction, alpha bounds a false 'better' (a promotion) and
# stop_alpha a false 'worse' (a stop), each on its own.
Directions = Literal["shared", "separate"]
# mixture: the mSPRT's boundary, valid for ever; horizon: a continuous-monitoring
# O'Brien-Fleming boundary on the B-value scale, valid up to horizon_samples_per_arm.
Boundary = Literal["mixture", "horizon"]


class Conclusion(str, Enum):
    """What the evidence says about the lift against a bar (0, min_lift or -margin)."""

    BETTER = "better"  # the whole always-valid interval lies above the bar
    WORSE = "worse"  # the whole interval lies below the bar
    NOT_YET_KNOWN = "not_yet_known"  # the interval still straddles it


def _conclude(low: float, high: float, bar: float) -> Conclusion:
    if low > bar:
        return Conclusion.BETTER
    if high < bar:
        return Conclusion.WORSE
    return Conclusion.NOT_YET_KNOWN


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Verdict:
    """The sequential test's result after one look; pass it back as `previous` next time.

    `p_value` and the intervals are always valid: the running minimum of the p-values, and the
    running intersection of the confidence sequence for the difference (`difference_low`,
    `difference_high`; restarted from the current look if it would be empty), since the first
    look with min_samples_per_arm in both arms. `low` and `high` are that interval on `scale`
    (divided by the control mean if relative). `lift` and `difference` are this look's point
    estimates from the raw means. `decision` judges the lift against 0; `improvement` and
    `non_inferiority` judge other bars."""

    decision: Conclusion
    scale: Scale
    lift: float | None
    low: float
    high: float
    difference: float | None
    difference_low: float
    difference_high: float
    p_value: float
    alpha: float
    tau: float
    candidate_samples: int
    control_samples: int
    candidate_mean: float | None
    control_mean: float | None
    looks: int  # looks that counted (both arms at min_samples_per_arm, a usable variance)
    reason: str
    # Units (users) behind each arm's outcomes, and outcomes clipped to the gate's bounds;
    # None in readings stored before these were kept.
    candidate_units: int | None = None
    control_units: int | None = None
    candidate_clipped: int | None = None
    control_clipped: int | None = None
    # How alpha is split between the two decisions (SequentialTest.directions) and the chance
    # of a false 'worse' when they are separate; "shared" in readings stored before.
    directions: Directions = "shared"
    stop_alpha: float | None = None
    # CUPED (SequentialTest.cuped, with both arms' covariates): the pooled theta of this look
    # and the factor it multiplied the variance of the difference by (below 1: narrower);
    # None when the look ran without covariates.
    cuped_theta: float | None = None
    cuped_variance_factor: float | None = None
    # The boundary (SequentialTest.boundary) and, for horizon, the cap it is valid up to;
    # "mixture" and None in readings stored before.
    boundary: Boundary = "mixture"
    horizon_samples_per_arm: int | None = None

    @property
    def information_time(self) -> float | None:
        """boundary horizon: n_eff / N of this look's counts, at most 1; None for the mixture."""
        if self.horizon_samples_per_arm is None:
            return None
        return min(self._information(), 1.0)

    @property
    def ended(self) -> bool:
        """boundary horizon: this look is at or past the horizon, so no later look can move
        the verdict (an undecided test stays undecided); False for the mixture."""
        return self.horizon_samples_per_arm is not None and self._information() >= 1.0

    def _information(self) -> float:
        n = cast(int, self.horizon_samples_per_arm)
        return float(_information_time(self.candidate_samples, self.control_samples, n))

    def improvement(self, min_lift: float = 0.0) -> Conclusion:
        """BETTER once the lift surely exceeds min_lift (lower bound > min_lift); WORSE once it
        surely falls short (upper bound < min_lift: the candidate cannot prove the lift, so
        stop spending traffic on it); NOT_YET_KNOWN otherwise."""
        return _conclude(self.low, self.high, min_lift)

    def non_inferiority(self, margin: float) -> Conclusion:
        """BETTER (passes) once the lift is surely above -margin (lower bound > -margin); WORSE
        (fails) once the whole interval lies below -margin; NOT_YET_KNOWN otherwise."""
        if margin < 0:
            raise ValueError(f"margin ({margin}) must be at least 0 (how much worse is allowed)")
        return _conclude(self.low, self.high, -margin)

    def reading(self) -> dict[str, Any]:
        """JSON-safe form (infinite bounds as None)."""
        return {
            "decision": self.decision.value,
            "scale": self.scale,
            "lift": _finite_or_none(self.lift),
            "low": _finite_or_none(self.low),
            "high": _finite_or_none(self.high),
            "difference": _finite_or_none(self.difference),
            "difference_low": _finite_or_none(self.difference_low),
            "difference_high": _finite_or_none(self.difference_high),
            "p_value": self.p_value,
            "alpha": self.alpha,
            "tau": self.tau,
            "candidate_samples": self.candidate_samples,
            "control_samples": self.control_samples,
            "candidate_mean": self.candidate_mean,
            "control_mean": self.control_mean,
            "looks": self.looks,
            "reason": self.reason,
            "candidate_units": self.candidate_units,
            "control_units": self.control_units,
            "candidate_clipped": self.candidate_clipped,
            "control_clipped": self.control_clipped,
            "directions": self.directions,
            "stop_alpha": self.stop_alpha,
            "cuped_theta": _finite_or_none(self.cuped_theta),
            "cuped_variance_factor": _finite_or_none(self.cuped_variance_factor),
            "boundary": self.boundary,
            "horizon_samples_per_arm": self.horizon_samples_per_arm,
        }

    @classmethod
    def from_reading(cls, data: dict[str, Any]) -> Verdict:
        """The inverse of `reading` (a persisted verdict, passed back as `previous`)."""

        def bound(key: str, missing: float) -> float:
            value = data.get(key)
            return missing if value is None else float(value)

        def maybe(key: str) -> float | None:
            value = data.get(key)
            return None if value is None else float(value)

        def count(key: str) -> int | None:
            value = data.get(key)
            return None if value is None else int(value)

        return cls(
            decision=Conclusion(data["decision"]),
            scale=data["scale"],
            lift=maybe("lift"),
            low=bound("low", -math.inf),
            high=bound("high", math.inf),
            difference=maybe("difference"),
            difference_low=bound("difference_low", -math.inf),
            difference_high=bound("difference_high", math.inf),
            p_value=float(data["p_value"]),
            alpha=float(data["alpha"]),
            tau=float(data["tau"]),
            candidate_samples=int(data["candidate_samples"]),
            control_samples=int(data["control_samples"]),
            candidate_mean=maybe("candidate_mean"),
            control_mean=maybe("control_mean"),
            looks=int(data["looks"]),
            reason=str(data.get("reason", "")),
            candidate_units=count("candidate_units"),
            control_units=count("control_units"),
            candidate_clipped=count("candidate_clipped"),
            control_clipped=count("control_clipped"),
            directions=cast(Directions, data.get("directions", "shared")),
            stop_alpha=maybe("stop_alpha"),
            cuped_theta=maybe("cuped_theta"),
            cuped_variance_factor=maybe("cuped_variance_factor"),
            boundary=cast(Boundary, data.get("boundary", "mixture")),
            horizon_samples_per_arm=count("horizon_samples_per_arm"),
        )


@dataclass(frozen=True)
class PathResult:
    """`SequentialTest.evaluate_paths` over E experiments and T looks: (E, T) arrays of the
    always-valid p-value and interval (on the test's scale) after each look."""

    p_value: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def first_decision(self, bar: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Per experiment: +1 (better), -1 (worse) or 0 (none) at the first look whose
        interval clears `bar`, and that look's index (-1 if none): the decision a controller
        that acts at once would take."""
        better = self.low > bar
        worse = self.high < bar
        decided = better | worse
        index = np.where(decided.any(axis=1), decided.argmax(axis=1), -1)
        at = np.maximum(index, 0)
        rows = np.arange(decided.shape[0])
        code = np.where(index < 0, 0, np.where(better[rows, at], 1, -1))
        return code, index


class SequentialTest(FiniteStrictModel):
    """Always-valid two-sample test of the candidate's lift over control: an mSPRT with a
    normal mixture (boundary mixture), or an O'Brien-Fleming boundary for continuous
    monitoring up to a declared cap (boundary horizon). The module docstring has the math and
    the choices."""

    alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description=(
            "directions shared: chance of any false 'better' or 'worse', ever; separate: "
            "chance of a false 'better' (a promotion), ever."
        ),
    )
    directions: Directions = Field(
        default="shared",
        description=(
            "shared: one two-sided test (the interval is a 1 - alpha confidence sequence); "
            "separate: a one-sided test per direction, the lower bound at alpha (promote), "
            "the upper at stop_alpha (stop), for more power at the same false-promotion bound."
        ),
    )
    stop_alpha: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description=(
            "directions separate: chance of a false 'worse' (a stop), ever; null uses alpha. "
            "Not allowed with directions shared."
        ),
    )
    scale: Scale = Field(
        default="relative",
        description="relative: (mean_c - mean_s) / mean_s; absolute: mean_c - mean_s.",
    )
    mde: float = Field(
        default=0.05,
        gt=0,
        description=(
            "Smallest lift worth detecting, on `scale` (0.05 relative = 5%); tau when tau is null."
        ),
    )
    tau: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Standard deviation of the normal mixing distribution over the lift, on `scale`; "
            "null uses mde. Smaller tunes for small effects and stops large ones later."
        ),
    )
    min_samples_per_arm: int = Field(
        default=1000,
        ge=2,
        description="Looks with fewer outcomes in either arm do not count (normal approximation).",
    )
    min_units_per_arm: int = Field(
        default=30,
        ge=2,
        description=(
            "Looks with fewer units (users) in either arm do not count: a variance from the "
            "spread between a handful of users is unreliable. At most min_samples_per_arm."
        ),
    )
    kind: OutcomeKind | None = Field(
        default=None,
        description=(
            "The outcome kind the test judges; arms of another kind make no look count (with "
            "the reason). Null: any."
        ),
    )
    bounds: tuple[float, float] | None = Field(
        default=None,
        description=(
            "[min_value, max_value] continuous outcomes must have been clipped to; arms "
            "clipped otherwise (or not at all) make no look count. Null: not checked."
        ),
    )

    cuped: bool = Field(
        default=False,
        description=(
            "CUPED: adjust the difference by each arm's pre-experiment outcomes per unit "
            "(ArmStats.covariates), when both arms carry them; a look without them runs the "
            "per-unit test unadjusted."
        ),
    )

    boundary: Boundary = Field(
        default="mixture",
        description=(
            "mixture: the mSPRT, valid however long the test runs; horizon: valid for any "
            "number of looks up to horizon_samples_per_arm, with a lower boundary there (more "
            "power at the cap), and the test ends at it (later looks do not count)."
        ),
    )
    horizon_samples_per_arm: int | None = Field(
        default=None,
        ge=2,
        description=(
            "boundary horizon: the cap N, outcomes per arm, declared before any data; "
            "information time is n_eff / N, n_eff the harmonic mean of the arms' outcome "
            "counts. Required with horizon, not allowed with mixture (tau and mde are unused "
            "by horizon)."
        ),
    )

    @model_validator(mode="after")
    def _horizon_samples_with_horizon_boundary(self) -> SequentialTest:
        if self.boundary == "horizon" and self.horizon_samples_per_arm is None:
            raise ValueError(
                "horizon_samples_per_arm (None) is required with boundary horizon: the cap "
                "the boundary is valid up to, declared before any data"
            )
        if self.boundary == "mixture" and self.horizon_samples_per_arm is not None:
            raise ValueError(
                f"horizon_samples_per_arm ({self.horizon_samples_per_arm}) needs boundary "
                "horizon (boundary is mixture, which has no horizon)"
            )
        _check_horizon(self.horizon_samples_per_arm, self.min_samples_per_arm)
        return self

    @model_validator(mode="after")
    def _stop_alpha_needs_separate_directions(self) -> SequentialTest:
        if self.stop_alpha is not None and self.directions == "shared":
            raise ValueError(
                f"stop_alpha ({self.stop_alpha}) needs directions separate (directions is "
                f"{self.directions}: alpha ({self.alpha}) covers both directions)"
            )
        return self

    @property
    def effective_tau(self) -> float:
        return self.tau if self.tau is not None else self.mde

    @property
    def effective_stop_alpha(self) -> float | None:
        """The upper bound's one-sided alpha; None for a shared two-sided test."""
        if self.directions == "shared":
            return None
        return self.stop_alpha if self.stop_alpha is not None else self.alpha

    @property
    def effective_min_units(self) -> int:
        return min(self.min_units_per_arm, self.min_samples_per_arm)

    @property
    def horizon_z(self) -> tuple[float, float] | None:
        """boundary horizon: (c_low, c_high), the B-value boundaries of the lower and upper
        bound (c = Phi^-1(1 - a / 2) for a one-sided level a, a = alpha / 2 each when shared:
        1.96 one-sided at 5%, 2.24 shared at 5%); None for the mixture."""
        if self.boundary != "horizon":
            return None
        stop_alpha = self.effective_stop_alpha
        if stop_alpha is None:
            c = _horizon_c(self.alpha / 2)
            return c, c
        return _horizon_c(self.alpha), _horizon_c(stop_alpha)

    def evaluate(
        self, candidate: ArmStats, control: ArmStats, previous: Verdict | None = None
    ) -> Verdict:
        """The verdict after this look, given the stats since the experiment started and the
        previous look's verdict (None on the first look). Same inputs, same verdict."""
        _same_kind(candidate, control)
        if previous is None:
            state = (1.0, -math.inf, math.inf)
            looks = 0
            reached = 0.0
        else:
            self._check_previous(previous, candidate, control)
            state = (previous.p_value, previous.difference_low, previous.difference_high)
            looks = previous.looks
            reached = self._information(previous.candidate_samples, previous.control_samples)
        relative = self.scale == "relative"
        binary = candidate.kind is OutcomeKind.BINARY
        covariates = None
        if self.cuped and candidate.covariates is not None and control.covariates is not None:
            covariates = (_arrays(candidate.covariates), _arrays(control.covariates))
        cuped: dict[str, Any] = {}
        p, d_low, d_high, counted, control_scale, why = _advance(
            binary, relative, self.effective_tau, self.alpha, self.effective_stop_alpha,
            self.min_samples_per_arm, self.effective_min_units, _arrays(state),
            _arrays(_columns(candidate)), _arrays(_columns(control)), covariates, cuped,
            self.horizon_z, self.horizon_samples_per_arm, np.asarray(reached),
        )  # fmt: skip
        theta = _finite_or_none(float(cuped["theta"])) if cuped else None
        factor = _finite_or_none(float(cuped["variance_factor"])) if cuped else None
        refused = self._refusal(candidate, control)
        if refused:  # the arms are not what this test may judge: the look does not count
            (p, d_low, d_high), counted, why = state, False, refused
        p, d_low, d_high = float(p), float(d_low), float(d_high)
        low, high = (
            float(x) for x in _on_scale(d_low, d_high, float(control_scale), relative, binary)
        )
        if previous is not None and previous.ended:
            # The test ended: its interval is final, on its scale too (a relative one would
            # otherwise move with the control mean, and a bar near it could flip).
            low, high = previous.low, previous.high
        mc, ms = candidate.mean, control.mean
        difference = mc - ms if mc is not None and ms is not None else None
        if not relative:
            lift = difference
        else:
            control_mean = cast(float, ms)  # not None whenever difference is not None
            lift = (
                difference / control_mean if difference is not None and control_mean > 0 else None
            )
        decision = _conclude(low, high, 0.0)
        return Verdict(
            decision=decision,
            scale=self.scale,
            lift=lift,
            low=low,
            high=high,
            difference=difference,
            difference_low=d_low,
            difference_high=d_high,
            p_value=p,
            alpha=self.alpha,
            tau=self.effective_tau,
            candidate_samples=candidate.n,
            control_samples=control.n,
            candidate_mean=mc,
            control_mean=ms,
            looks=looks + int(counted),
            reason=self._reason(decision, lift, low, high, p, candidate, control, why, cuped),
            candidate_units=candidate.unit_count,
            control_units=control.unit_count,
            candidate_clipped=candidate.clipped,
            control_clipped=control.clipped,
            directions=self.directions,
            stop_alpha=self.effective_stop_alpha,
            cuped_theta=theta,
            cuped_variance_factor=factor,
            boundary=self.boundary,
            horizon_samples_per_arm=self.horizon_samples_per_arm,
        )

    def _information(self, candidate_n: float, control_n: float) -> float:
        """boundary horizon: the information time n_eff / N of these counts (not clipped);
        0 for the mixture."""
        if self.horizon_samples_per_arm is None:
            return 0.0
        return float(_information_time(candidate_n, control_n, self.horizon_samples_per_arm))

    def _refusal(self, candidate: ArmStats, control: ArmStats) -> str:
        """Why these arms may not be judged by this test ('' if they may)."""
        if self.kind is not None and candidate.kind is not self.kind:
            hint = (
                ": a continuous outcome needs kind: continuous with min_value and max_value"
                if candidate.kind is OutcomeKind.CONTINUOUS
                else ""
            )
            return (
                f"the outcome is {candidate.kind.value}, the gate declares {self.kind.value}{hint}"
            )
        if candidate.kind is OutcomeKind.CONTINUOUS and self.bounds is not None:
            for arm in (candidate, control):
                if arm.n and arm.bounds != self.bounds:
                    clipped = "not clipped" if arm.bounds is None else f"clipped to {arm.bounds}"
                    return (
                        f"values are {clipped}, not to the gate's bounds {self.bounds} "
                        "(min_value, max_value): no look counts until the feedback desk clips "
                        "to them"
                    )
        return ""

    def evaluate_paths(
        self,
        kind: OutcomeKind,
        candidate: tuple[Any, ...],
        control: tuple[Any, ...],
        covariates: tuple[tuple[Any, ...], tuple[Any, ...]] | None = None,
    ) -> PathResult:
        """`evaluate` for many simulated experiments at once: each arm is (n, sum, sum_sq),
        one unit per outcome, or (n, sum, sum_sq, units, unit_sum_sq, unit_cross, unit_n_sq)
        (UnitMoments), cumulative, as (E, T) arrays (experiment, look). The same kernel as
        `evaluate`, vectorized over experiments, for planning and benchmarks.

        `covariates` (candidate's, control's), CUPED: each arm's pre-experiment sums per
        unit, the nine arrays of `COVARIATE_MOMENTS` (7-array arms only); the difference
        is then adjusted by theta times the difference of the arms' pre-period means, theta
        from both arms pooled (see `_cuped`)."""
        for arm in (candidate, control):
            if len(arm) not in (3, 7):
                raise ValueError(f"an arm is 3 or 7 arrays, got {len(arm)}")
        full = [_with_units(tuple(np.asarray(a, dtype=float) for a in arm))
                for arm in (candidate, control)]  # fmt: skip
        pre: list[tuple[Any, ...]] = []
        if covariates is not None:
            if len(candidate) != 7 or len(control) != 7:
                raise ValueError("covariates need arms of 7 arrays (the per-unit moments)")
            for cov in covariates:
                if len(cov) != len(COVARIATE_MOMENTS):
                    raise ValueError(
                        f"covariates are {len(COVARIATE_MOMENTS)} arrays per arm "
                        f"({', '.join(COVARIATE_MOMENTS)}), got {len(cov)}"
                    )
                pre.append(tuple(np.asarray(a, dtype=float) for a in cov))
        arrays = [*full[0], *full[1], *(a for cov in pre for a in cov)]
        shape = arrays[0].shape
        if len(shape) != 2 or any(a.shape != shape for a in arrays):
            raise ValueError(
                f"every array must have one (experiments, looks) shape, got "
                f"{[a.shape for a in arrays]}"
            )
        experiments, looks = shape
        p = np.ones(experiments)
        d_low = np.full(experiments, -np.inf)
        d_high = np.full(experiments, np.inf)
        out = {name: np.empty(shape) for name in ("p", "low", "high")}
        relative = self.scale == "relative"
        reached = np.zeros(experiments)  # the information time of the previous look
        for t in range(looks):
            look_pre = tuple(tuple(a[:, t] for a in cov) for cov in pre)
            p, d_low, d_high, _, control_scale, _ = _advance(
                kind is OutcomeKind.BINARY, relative, self.effective_tau, self.alpha,
                self.effective_stop_alpha, self.min_samples_per_arm, self.effective_min_units,
                (p, d_low, d_high), tuple(a[:, t] for a in full[0]),
                tuple(a[:, t] for a in full[1]), look_pre or None, None, self.horizon_z,
                self.horizon_samples_per_arm, reached,
            )  # fmt: skip
            out["p"][:, t] = p
            low, high = _on_scale(
                d_low, d_high, control_scale, relative, kind is OutcomeKind.BINARY
            )
            if self.horizon_samples_per_arm is not None:
                if t > 0:  # an ended test's interval stays as it was, on its scale too
                    final = reached >= 1
                    low = np.where(final, out["low"][:, t - 1], low)
                    high = np.where(final, out["high"][:, t - 1], high)
                reached = _information_time(
                    full[0][0][:, t], full[1][0][:, t], self.horizon_samples_per_arm
                )
            out["low"][:, t], out["high"][:, t] = low, high
        return PathResult(out["p"], out["low"], out["high"])

    def _check_previous(self, previous: Verdict, candidate: ArmStats, control: ArmStats) -> None:
        ours = (self.alpha, self.effective_tau, self.scale, self.directions,
                self.effective_stop_alpha, self.boundary, self.horizon_samples_per_arm)  # fmt: skip
        theirs = (previous.alpha, previous.tau, previous.scale, previous.directions,
                  previous.stop_alpha, previous.boundary,
                  previous.horizon_samples_per_arm)  # fmt: skip
        if ours != theirs:
            raise ValueError(
                f"previous verdict came from another test (alpha, tau, scale, directions, "
                f"stop_alpha, boundary, horizon_samples_per_arm = {theirs}) than this one "
                f"({ours})"
            )
        if candidate.n < previous.candidate_samples or control.n < previous.control_samples:
            raise ValueError(
                f"stats must be cumulative: samples went from {previous.candidate_samples}/"
                f"{previous.control_samples} to {candidate.n}/{control.n} (candidate/control)"
            )

    def _reason(
        self,
        decision: Conclusion,
        lift: float | None,
        low: float,
        high: float,
        p: float,
        candidate: ArmStats,
        control: ArmStats,
        why: str,
        cuped: dict[str, Any] | None = None,
    ) -> str:
        def fmt(value: float | None) -> str:
            if value is None or not math.isfinite(value):
                return "n/a" if value is None or math.isnan(value) else f"{value:+}"
            return f"{value:+.2%}" if self.scale == "relative" else f"{value:+.4g}"

        units = ""
        if candidate.units is not None or control.units is not None:
            units = f" from {candidate.unit_count}/{control.unit_count} units"
        clipped = ""
        if candidate.clipped or control.clipped:
            clipped = f", {candidate.clipped}/{control.clipped} clipped to {candidate.bounds}"
        if cuped:
            clipped += (
                f", CUPED theta {float(cuped['theta']):.3g}, variance "
                f"x{float(cuped['variance_factor']):.3g}"
            )
        elif self.cuped:
            clipped += ", CUPED off for this look (no pre-period covariates)"
        level = f"{1 - self.alpha:.0%} interval"
        stop_alpha = self.effective_stop_alpha
        if stop_alpha is not None:
            level = f"bounds ({1 - self.alpha:.0%} lower, {1 - stop_alpha:.0%} upper, one-sided)"
        kind = "always-valid"
        horizon = ""
        if self.horizon_samples_per_arm is not None:
            kind = "horizon-bounded"
            t = min(self._information(candidate.n, control.n), 1.0)
            horizon = f", t={t:.2f} of {self.horizon_samples_per_arm}/arm"
        text = (
            f"{self.scale} lift {fmt(lift)}, {kind} {level} "
            f"[{fmt(low)}, {fmt(high)}], p={p:.3g}, {candidate.n}/{control.n} samples{units}"
            f"{horizon}{clipped} (candidate/control): {decision.value}"
        )
        return f"{text} ({why})" if why else text


def horizon_tau(
    sd: float,
    max_samples_per_arm: int,
    alpha: float = 0.05,
    directions: Directions = "separate",
    mean: float | None = None,
) -> float:
    """The mixing tau whose boundary is lowest at the cap, for planning: two equal arms of
    max_samples_per_arm outcomes with standard deviation sd (sqrt(p (1 - p)) for a rate p)
    have V = 2 sd^2 / n there, and the boundary in z units depends on tau^2 / V only (lowest
    near tau^2 = 6.7 V one-sided at alpha 5%, 8 V two-sided). A lower boundary at the cap is
    more power at the cap; any tau fixed before the data keeps the test valid. Absolute units,
    or relative to `mean` when given (then pass it as `tau` with scale relative)."""
    if sd <= 0 or max_samples_per_arm < 2 or not 0 < alpha < 1:
        raise ValueError(
            f"sd ({sd}) must be positive, max_samples_per_arm ({max_samples_per_arm}) at "
            f"least 2 and alpha ({alpha}) in (0, 1)"
        )
    ratio = np.exp(np.linspace(math.log(0.05), math.log(500.0), 4001))  # tau^2 / V
    r = ratio / (1 + ratio)
    if directions == "shared":
        z = np.sqrt((2 * math.log(1 / alpha) - np.log1p(-r)) / r)
    else:
        z = _one_sided_z(r, alpha)
    variance = 2 * sd * sd / max_samples_per_arm
    tau = math.sqrt(float(ratio[int(np.argmin(z))]) * variance)
    if mean is None:
        return tau
    if mean <= 0:
        raise ValueError(f"mean ({mean}) must be positive for a relative tau")
    return tau / mean


def _columns(arm: ArmStats) -> tuple[float, ...]:
    return (float(arm.n), arm.sum, arm.sum_sq, *_moments(arm))


def _arrays(columns: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(np.asarray(x, dtype=float) for x in columns)


def _with_units(arm: tuple[Any, ...]) -> tuple[Any, ...]:
    """(n, sum, sum_sq) -> the same with the moments of one unit per outcome appended."""
    if len(arm) == 7:
        return arm
    n, s, ss = arm
    return (n, s, ss, n, ss, s, n)


def _on_scale(
    d_low: Any, d_high: Any, control_scale: Any, relative: bool, binary: bool
) -> tuple[Any, Any]:
    """The difference's interval on the test's scale: divided by the control mean if relative
    (unbounded while that mean is not positive). Binary bounds are cut to what rates allow
    (a gap within +-1, a lift of at least -100%): the normal approximation can overshoot."""
    if not relative:
        return (np.maximum(d_low, -1.0), np.minimum(d_high, 1.0)) if binary else (d_low, d_high)
    with np.errstate(divide="ignore", invalid="ignore"):
        positive = control_scale > 0
        divisor = np.where(positive, control_scale, 1.0)
        low = np.where(positive, d_low / divisor, -np.inf)
        high = np.where(positive, d_high / divisor, np.inf)
    return (np.maximum(low, -1.0) if binary else low), high


def _cuped(candidate: tuple[Any, ...], control: tuple[Any, ...], pre: tuple[Any, ...]) -> Any:
    """(adjustment of d, variance factor of the candidate, of the control): `_cuped_terms`
    without theta."""
    _, shift, reduce_c, reduce_s = _cuped_terms(candidate, control, pre)
    return shift, reduce_c, reduce_s


def _cuped_terms(
    candidate: tuple[Any, ...], control: tuple[Any, ...], pre: tuple[Any, ...]
) -> tuple[Any, Any, Any, Any]:
    """CUPED (Deng, Xu, Kohavi, Walker, WSDM 2013) on ratio means with unit clusters:
    (theta, adjustment of d, variance factor of the candidate, of the control), elementwise.

    Each arm's mean m = sum S / sum n has per-unit influence e_g = (S_g - m n_g) / N; its
    pre-period mean q = sum P / sum M has f_g = (P_g - q M_g) / M. The pre-period comes before
    the split, so E[q_c - q_s] = 0 and d - theta (q_c - q_s) estimates the same difference for
    any theta; its cluster-robust variance is smallest at theta = sum cov(e, f) / sum var(f)
    over both arms (pooled, as CUPED does). Each arm's variance is then its robust variance
    times (var(e) - 2 theta cov(e, f) + theta^2 var(f)) / var(e)."""
    parts = []
    for arm, cov in ((candidate, pre[0]), (control, pre[1])):
        n, s, _, _, gss, gsn, gnn = arm
        p_sum, p_n, pp, pm, mm, sp, sm, np_, nm = cov
        m, q = s / n, p_sum / np.where(p_n > 0, p_n, 1.0)
        scale_e, scale_f = n, np.where(p_n > 0, p_n, 1.0)
        vee = np.maximum(gss - 2 * m * gsn + m * m * gnn, 0.0) / (scale_e * scale_e)
        vff = np.maximum(pp - 2 * q * pm + q * q * mm, 0.0) / (scale_f * scale_f)
        vef = (sp - q * sm - m * np_ + m * q * nm) / (scale_e * scale_f)
        parts.append((q, vee, vff, vef))
    (qc, eec, ffc, efc), (qs, ees, ffs, efs) = parts
    ff = ffc + ffs
    theta = np.where(ff > 0, (efc + efs) / np.where(ff > 0, ff, 1.0), 0.0)
    factors = []
    for ee, ff_arm, ef in ((eec, ffc, efc), (ees, ffs, efs)):
        reduced = np.maximum(ee - 2 * theta * ef + theta * theta * ff_arm, 0.0)
        factors.append(np.where(ee > 0, reduced / np.where(ee > 0, ee, 1.0), 1.0))
    return theta, theta * (qc - qs), factors[0], factors[1]


_erfc = np.frompyfunc(math.erfc, 1, 1)


def _log_phi(x: Any) -> Any:
    """log of the standard normal CDF, for x >= 0 (numpy has no erf)."""
    tail = np.asarray(_erfc(np.asarray(x, dtype=float) / math.sqrt(2)), dtype=float)
    return np.log1p(-0.5 * tail)


def _one_sided_z(r: Any, alpha: float) -> Any:
    """The one-sided mixture's boundary as a z-score: the u > 0 at which
    Lambda+ = 2 sqrt(1 - r) exp(u^2 r / 2) Phi(u sqrt(r)) reaches 1 / alpha, r = tau^2 /
    (V + tau^2). Lambda+ is the likelihood ratio mixed over a half-normal (the lift on one
    side of 0 only), a martingale under H0, so P(ever >= 1 / alpha) <= alpha (Ville).

    u solves u^2 = (2 log(1 / (2 alpha)) - log(1 - r) - 2 log Phi(u sqrt(r))) / r; the right side
    falls as u grows, so from u0 (Phi taken as 1, below the root) each step jumps across the
    root: odd steps land above it. Three steps end above it (a conservative, valid bound)
    and within ~1e-6 of it (Phi(u sqrt(r)) is near 1 there)."""
    base = 2 * math.log(1 / (2 * alpha)) - np.log1p(-r)
    u = np.sqrt(np.maximum(base, 0.0) / r)
    for _ in range(3):
        u = np.sqrt(np.maximum(base - 2 * _log_phi(u * np.sqrt(r)), 0.0) / r)
    return u


# The look that crosses the horizon counts (at t = 1) only if it is at most this far past it:
# data from further past (after a pause, a backlog, a restart) would make the call
# anti-conservative (simulated, one-sided at 5%: 5.2% false calls at t = 1.25, 5.9% at 2).
HORIZON_OVERSHOOT = 0.05


def _check_horizon(horizon: int | None, min_samples_per_arm: int) -> None:
    """n_eff = 2 nc ns / (nc + ns) is below twice the smaller arm, so a horizon under
    2 min_samples_per_arm can be reached before any look counts (an unequal split)."""
    if horizon is not None and horizon < 2 * min_samples_per_arm:
        raise ValueError(
            f"horizon_samples_per_arm ({horizon}) must be at least twice min_samples_per_arm "
            f"({min_samples_per_arm}): n_eff, which the horizon counts, reaches it while the "
            "smaller arm has only half as many outcomes, before a look could count"
        )


def _horizon_c(level: float) -> float:
    """The B-value boundary c of a one-sided level under continuous monitoring to the horizon:
    P(sup_{t <= 1} W(t) >= c) = 2 (1 - Phi(c)) = level (the reflection principle)."""
    return NormalDist().inv_cdf(1 - level / 2)


def _information_time(candidate_n: Any, control_n: Any, horizon: int) -> Any:
    """n_eff / N, n_eff = 2 nc ns / (nc + ns) (the harmonic mean of the arms' counts, n at an
    even split: the variance of the difference goes as 1 / n_eff), elementwise, not clipped."""
    nc, ns = np.asarray(candidate_n, dtype=float), np.asarray(control_n, dtype=float)
    total = nc + ns
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(total > 0, 2 * nc * ns / np.where(total > 0, total, 1.0), 0.0) / horizon


def _advance(
    binary: bool,
    relative: bool,
    tau: float,
    alpha: float,
    stop_alpha: float | None,
    min_samples: int,
    min_units: int,
    previous: tuple[Any, Any, Any],
    candidate: tuple[Any, ...],
    control: tuple[Any, ...],
    covariates: tuple[Any, ...] | None = None,
    cuped: dict[str, Any] | None = None,
    horizon_z: tuple[float, float] | None = None,
    horizon: int | None = None,
    reached: Any = 0.0,
) -> tuple[Any, ...]:
    """One look of the sequential test on the difference in means, elementwise over numpy
    arrays:
    (p, low, high, counted, control_scale, why), the interval in absolute units. `previous`
    is (p, low, high); each arm is (n, sum, sum_sq, units, unit_sum_sq, unit_cross, unit_n_sq).
    stop_alpha None: one two-sided test at alpha (the normal mixture); else the lower bound
    is a one-sided test at alpha and the upper one at stop_alpha (half-normal mixtures).
    covariates: (candidate's, control's) COVARIATE_MOMENTS, for CUPED; with them, `cuped`
    (a dict, if given) receives theta and variance_factor (the variance of the difference
    with CUPED over without, at this look).

    horizon_z None: the mixture boundary (tau, alpha, stop_alpha). Else (c_low, c_high), the
    horizon boundary's B-value boundaries, with horizon N (samples per arm) and `reached`, the
    information time of the previous look (0 before the first): the interval is
    d - c_low sqrt(V / t), d + c_high sqrt(V / t) at t = n_eff / N clipped to 1 (the look that
    crosses the horizon counts at t = 1), and no look after one at t >= 1 counts.

    The one kernel behind `evaluate` (0-d arrays) and `evaluate_paths` (one column of
    experiments), so the simulations in tests and benchmarks run exactly this arithmetic."""
    prev_p, prev_low, prev_high = previous
    nc, sc, ssc, gc = candidate[:4]
    ns, ss, sss, gs = control[:4]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = sc / nc - ss / ns
        # Outcomes of one unit (user) are correlated: each arm's variance of the mean is the
        # independent-outcome one times its design effect (cluster-robust over independent;
        # exactly 1 with one outcome per unit), see UnitMoments.
        effect_c, effect_s = _design_effect(*candidate), _design_effect(*control)
        if binary:
            pc, ps = (sc + 1) / (nc + 2), (ss + 1) / (ns + 2)
            vc, vs = pc * (1 - pc) / nc, ps * (1 - ps) / ns
            control_scale = ps
            pooled = (sc + ss + 1) / (nc + ns + 2)
        else:
            vc = np.maximum(ssc - sc * sc / nc, 0) / (nc - 1) / nc
            vs = np.maximum(sss - ss * ss / ns, 0) / (ns - 1) / ns
            control_scale = ss / ns
            pooled = (sc + ss) / (nc + ns)
        variance = vc * effect_c + vs * effect_s
        if covariates is not None:
            theta, shift, reduce_c, reduce_s = _cuped_terms(candidate, control, covariates)
            d = d - shift
            plain = variance
            variance = vc * effect_c * reduce_c + vs * effect_s * reduce_s
            if cuped is not None:
                cuped["theta"] = theta
                cuped["variance_factor"] = np.where(plain > 0, variance / plain, 1.0)
        # A relative tau in absolute units: times the pooled mean, not the control's, because
        # under H0 the pooled mean does not depend on which arm happens to run high (with the
        # control's, a high control both makes d negative and widens tau: in a 20,000-experiment
        # A/A simulation with tau = 5%, "worse" came 97 times and "better" 61).
        tau_abs = tau * pooled if relative else np.full_like(d, tau)
        samples = (nc >= min_samples) & (ns >= min_samples)
        enough = samples & (gc >= min_units) & (gs >= min_units)
        defined = enough & (tau_abs > 0) & ((control_scale > 0) | (not relative))
        # horizon: a look after the one that reached the horizon has no guarantee left, and
        # neither has a first look past it by more than HORIZON_OVERSHOOT
        if horizon_z is not None and horizon is not None:
            ended = np.asarray(reached) >= 1
            overshot = _information_time(nc, ns, horizon) > 1 + HORIZON_OVERSHOOT
            defined = defined & ~ended & ~overshot
        else:
            ended = overshot = np.zeros(np.shape(d), dtype=bool)
        exact = defined & (variance == 0)  # continuous arms with no spread at all
        counted = defined & ((variance > 0) | (exact & (d != 0)))
        v = np.where(variance > 0, variance, 1.0)
        if horizon_z is not None and horizon is not None:
            # W(t) = Z sqrt(t) is about Brownian motion on (0, 1]: |W| >= c at any look has
            # chance at most 2 (1 - Phi(c)) per side, so the interval is d -+ c sqrt(V / t).
            t = np.minimum(_information_time(nc, ns, horizon), 1.0)
            t = np.where(t > 0, t, 1.0)
            spread = np.sqrt(v / t)
            half_low, half_high = horizon_z[0] * spread, horizon_z[1] * spread
            # 2 (1 - Phi(|W|)): one side's p; shared doubles it (the interval's c is for a / 2)
            tail = np.asarray(_erfc(np.abs(d) / spread / math.sqrt(2)), dtype=float)
            p_now = np.minimum(tail if stop_alpha is not None else 2 * tail, 1.0)
        else:
            t2 = np.where(tau_abs > 0, tau_abs, 1.0) ** 2
            # log Lambda, with Lambda = sqrt(V / (V + tau^2)) exp(d^2 tau^2 / (2 V (V + tau^2)))
            log_lr = 0.5 * np.log(v / (v + t2)) + d * d * t2 / (2 * v * (v + t2))
            if stop_alpha is None:
                half_low = np.sqrt(
                    v * (v + t2) / t2 * (2 * np.log(1 / alpha) + np.log((v + t2) / v))
                )
                half_high = half_low
            else:
                # One side each: Lambda+- = 2 Lambda Phi(+-d tau / sqrt(V (V + tau^2))); the
                # p-value is the smaller side's.
                r = t2 / (v + t2)
                log_lr = log_lr + math.log(2) + _log_phi(np.abs(d) * np.sqrt(r / v))
                half_low = _one_sided_z(r, alpha) * np.sqrt(v)
                half_high = (
                    half_low if stop_alpha == alpha else _one_sided_z(r, stop_alpha) * np.sqrt(v)
                )
            p_now = np.exp(-np.maximum(log_lr, 0.0))
        p_now = np.where(exact, 0.0, p_now)
        half_low = np.where(exact, 0.0, half_low)
        half_high = np.where(exact, 0.0, half_high)
        low = np.maximum(prev_low, d - half_low)
        high = np.minimum(prev_high, d + half_high)
        contradicts = counted & (low > high)
        low = np.where(contradicts, d - half_low, low)
        high = np.where(contradicts, d + half_high, high)
        p = np.where(counted, np.minimum(prev_p, p_now), prev_p)
        low = np.where(counted, low, prev_low)
        high = np.where(counted, high, prev_high)
    why = ""
    if np.ndim(counted) == 0:
        if ended:
            why = f"horizon of {horizon} samples per arm reached: the test has ended"
        elif overshot:
            why = (
                f"this look is more than {HORIZON_OVERSHOOT:.0%} past the horizon of {horizon} "
                "samples per arm (no look since before it): it does not count, and the test "
                "has ended"
            )
        elif not samples:
            why = f"waiting for {min_samples} samples in each arm"
        elif not enough:
            why = f"waiting for {min_units} units (users) in each arm, {gc:.0f}/{gs:.0f} so far"
        elif not defined:
            why = "a mean is not positive: no relative lift (use scale absolute)"
        elif not counted:
            why = "no spread in either arm and no difference: no evidence yet"
        elif contradicts:
            why = "this look's interval misses the earlier ones: the effect changed; restarted"
    return p, low, high, counted, control_scale, why
