"""Comparing two model versions on real outcomes (conversions, clicks, ratings, revenue).

Ray-free statistics for the feedback loop: each version's outcomes are summed into an
`ArmStats`; fixed-horizon intervals describe one arm or the gap between two; a `SequentialTest`
decides whether the candidate is better, worse, or not yet known, and may be asked every tick.

    ArmStats(kind, n, sum, sum_sq)          sums, so router replicas merge them by addition
    confidence_interval(arm, level)         Wilson (binary) or normal (continuous), one arm
    difference_interval(c, s, level, scale) absolute gap (Newcombe / Welch) or relative lift
                                            (delta method); fixed-horizon, NOT safe to peek at
    SequentialTest.evaluate(c, s, previous) mixture SPRT: always-valid p-value and confidence
                                            sequence; safe to look at every tick
    Verdict.improvement(min_lift)           better / worse / not_yet_known against a bar
    Verdict.non_inferiority(margin)
    ImprovementGate, NonInferiorityGate     configs for the rollout gates (wired later)
    required_sample_size(...)               fixed-horizon planning figure (two proportions)

Why a sequential test. A rollout controller looks at the numbers every 250 ms. A fixed-horizon
test checked that often declares a winner in an A/A test far more often than its alpha (every
look is another chance for noise to cross the line). The mixture sequential probability ratio
test (mSPRT; Johari, Koomen, Pekelis, Walsh, "Peeking at A/B tests", KDD 2017, and "Always
valid inference", Operations Research 2022) keeps the false-positive rate at most alpha
however often, and whenever, one looks, and stops as soon as the evidence is there.

The test, on the normal approximation of the difference in means d = m_c - m_s with variance
V = var_c / n_c + var_s / n_s. Under H0 (no difference) the likelihood ratio of "difference
~ N(0, tau^2)" against "difference = 0" is

    Lambda = sqrt(V / (V + tau^2)) * exp(d^2 tau^2 / (2 V (V + tau^2)))

a martingale under H0 (for a known V; here V is estimated, which min_samples_per_arm and the
simulations in tests/unit/test_abtest.py cover), so by Ville's inequality
P(ever Lambda >= 1/alpha) <= alpha. The always-valid p-value is the running minimum of
min(1, 1/Lambda). Inverting the test at every difference theta0 gives the confidence sequence
d +- sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V))); the always-valid
interval is the running intersection of those. Both running operations need the previous
result, so `evaluate` takes the previous `Verdict` and returns the next one: a pure function,
like `app.rollout.step`.

Choices worth knowing (each one is the reason for some code below):

* **Lift is relative by default**: (m_c - m_s) / m_s, the number product owners quote ("+3%
  conversions"). `scale="absolute"` reports m_c - m_s instead. `mde`, `tau`, `min_lift` and
  `margin` are on the chosen scale.
* **The test always runs on the difference**; the relative scale only changes units. A
  relative tau becomes tau times the pooled mean in absolute units (pooled, so that under H0
  it does not grow with whichever arm runs high), and the relative interval is the
  difference's interval divided by m_s (m_s as of this look). Two alternatives lost:
  - the delta method on the ratio m_c / m_s - 1 (what `difference_interval` uses for one
    planned look) is skewed: its variance grows as m_s shrinks, so in a 20,000-experiment A/A
    simulation (10% conversions, a look every 100 samples up to 20,000 per arm) it said
    "worse" 6 times as often as "better" (0.23% vs 0.01%);
  - the log ratio log(m_c / m_s) is symmetric, but its variance explodes near 0: a candidate
    that converted 0 of 1,000 against 100 of 1,000 stayed not_yet_known, where the
    difference says worse at once.
  What dividing by m_s costs: the control mean's own noise is left out of the relative
  bounds. Judging lift > min_lift is judging d > min_lift * m_s, so the bar moves by
  min_lift * SE(m_s), about min_lift standard errors of d: 0.01 of one for a 1% bar, nothing
  at bar 0 (the p-value and `decision` are exact on d).
* **tau defaults to mde.** The boundary d^2/V >= (1 + V/tau^2)(2 log(1/alpha) + log(1 +
  tau^2/V)) is lowest (about z = 3.03 at alpha 0.05) where tau^2 is about 8 V. For an effect of
  size mde that V is reached near the fixed-horizon sample size at 80% power, so tau = mde
  tunes the test to detect what the plan was sized for. The boundary is flat there: tau from
  mde/1.5 to mde*1.5 raises it by 1 to 2%. The price of a small tau is paid by large effects:
  a +30% lift on 10% conversions with tau = 3% took a median 5,750 samples per arm to call
  (simulated), with tau = 30% 2,000, and a fixed test sized for it needs 1,774.
* **Binary variances add one success and one failure** (p~ = (s + 1) / (n + 2), as Agresti
  and Caffo do), and so do the means that scale a relative tau and interval: an arm with no
  conversions yet, or only conversions, would otherwise have zero variance and look
  infinitely certain. The shift fades as 1/n; point estimates use the raw means.
* **Nothing counts before min_samples_per_arm** in both arms: the normal approximation is poor
  for a handful of samples, and skipping early looks cannot raise the error rate (the test
  holds at any stopping time, so it holds for one that starts later).
* **An empty intersection restarts from this look's interval.** Each look's interval is
  valid on its own (the guarantee covers all looks at once; intersecting only tightens), so
  either is allowed. An empty intersection means the data contradict one fixed effect (a
  candidate hot-patched into a worse model, say); the latest interval describes the data as
  they are, where the old one would keep calling "better" a candidate that no longer is.
* **Stats must be cumulative from the start of the experiment** (the routers' sums, never
  reset), not the rollout's per-step window: the guarantee is about one growing sample. Unequal
  arms are fine (each arm's variance uses its own n). A split that changes during the test is
  fine only while outcomes do not drift over time: if the base rate moves with the weekday
  while the candidate goes from 5% to 50%, the arms sample different days (Simpson's paradox);
  hold the split while testing, or restart the test at each weight. An effect that itself
  changes (novelty) is estimated as its average so far.
* **Two-sided alpha.** "better" and "worse" share alpha: an A/A test says "better" at most
  about alpha/2 of the time, "better" or "worse" at most alpha.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "ArmStats",
    "Conclusion",
    "ImprovementGate",
    "Interval",
    "NonInferiorityGate",
    "OutcomeKind",
    "PathResult",
    "Scale",
    "SequentialTest",
    "Verdict",
    "confidence_interval",
    "difference_interval",
    "required_sample_size",
]

Scale = Literal["relative", "absolute"]

_NORMAL = NormalDist()


def _z(level: float) -> float:
    """Two-sided normal quantile for a confidence level (0.95 -> 1.95996)."""
    if not 0 < level < 1:
        raise ValueError(f"level ({level}) must be between 0 and 1, exclusive")
    return _NORMAL.inv_cdf(0.5 + level / 2)


class OutcomeKind(str, Enum):
    """What one outcome is: a 0/1 event (conversion, click) or a number (rating, revenue)."""

    BINARY = "binary"
    CONTINUOUS = "continuous"


# -- one arm ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmStats:
    """One version's outcomes so far: count, sum and sum of squares.

    Sums rather than a running mean because every router replica keeps its own and the
    controller adds them (`merge`), the way request counts are pushed today. Immutable: `add`
    and `merge` return a new ArmStats, so a Verdict's inputs cannot change under it; a hot
    path that counts events keeps plain integers and builds one ArmStats per push.

    Binary arms hold sum = successes and sum_sq = sum (x^2 = x for 0/1); build them with
    `ArmStats.binary(successes, n)`. Continuous sums lose precision when the mean is large
    against the spread (sum_sq - sum^2/n cancels): subtract a fixed offset from the values
    first (revenue minus a typical order) if that is the case.
    """

    kind: OutcomeKind
    n: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", OutcomeKind(self.kind))  # accept "binary" too
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"n ({self.n!r}) must be an integer of at least 0")
        if not (math.isfinite(self.sum) and math.isfinite(self.sum_sq)):
            raise ValueError(f"sum ({self.sum}) and sum_sq ({self.sum_sq}) must be finite")
        if self.kind is OutcomeKind.BINARY:
            if not (0 <= self.sum <= self.n) or self.sum != int(self.sum):
                raise ValueError(
                    f"binary arm: sum ({self.sum}) must be a whole number of successes "
                    f"between 0 and n ({self.n})"
                )
            if self.sum_sq != self.sum:
                raise ValueError(
                    f"binary arm: sum_sq ({self.sum_sq}) must equal sum ({self.sum}) since "
                    "x^2 = x for 0/1 outcomes; use ArmStats.binary(successes, n)"
                )
        elif self.sum_sq < 0:
            raise ValueError(f"sum_sq ({self.sum_sq}) must be at least 0")
        elif self.n == 0 and (self.sum or self.sum_sq):
            raise ValueError(f"an empty arm must have sum ({self.sum}) and sum_sq 0")

    @classmethod
    def binary(cls, successes: int, n: int) -> ArmStats:
        return cls(OutcomeKind.BINARY, n, float(successes), float(successes))

    @classmethod
    def from_values(cls, kind: OutcomeKind, values: Iterable[float]) -> ArmStats:
        arm = cls(kind)
        for value in values:
            arm = arm.add(value)
        return arm

    def add(self, value: float) -> ArmStats:
        """This arm with one more outcome (0/1 for binary, any finite number otherwise)."""
        value = float(value)
        if self.kind is OutcomeKind.BINARY and value not in (0.0, 1.0):
            raise ValueError(f"a binary outcome must be 0 or 1, got {value}")
        if not math.isfinite(value):
            raise ValueError(f"an outcome must be finite, got {value}")
        return ArmStats(self.kind, self.n + 1, self.sum + value, self.sum_sq + value * value)

    def merge(self, other: ArmStats) -> ArmStats:
        """Both arms' outcomes together (the same version counted by two router replicas)."""
        if other.kind is not self.kind:
            raise ValueError(f"cannot merge a {other.kind.value} arm into a {self.kind.value} one")
        return ArmStats(
            self.kind, self.n + other.n, self.sum + other.sum, self.sum_sq + other.sum_sq
        )

    @property
    def mean(self) -> float | None:
        """Conversion rate or average value; None with no samples."""
        return self.sum / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        """Per-outcome variance: p(1 - p) for binary, the sample variance (n - 1) otherwise.

        None where undefined (no samples; one continuous sample)."""
        if self.kind is OutcomeKind.BINARY:
            return None if not self.n else (self.sum / self.n) * (1 - self.sum / self.n)
        if self.n < 2:
            return None
        return max(self.sum_sq - self.sum * self.sum / self.n, 0.0) / (self.n - 1)


# -- fixed-horizon intervals -----------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval at `level`; bounds may be infinite (no information)."""

    estimate: float | None
    low: float
    high: float
    level: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def _wilson(successes: float, n: int, z: float) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clamp rounding only: exact bounds are inside [0, 1] and hit 0 or 1 at p = 0 or 1.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def confidence_interval(arm: ArmStats, level: float = 0.95) -> Interval:
    """Fixed-horizon interval for one arm's mean.

    Binary: Wilson's score interval, which stays inside [0, 1] and behaves at 0/n and n/n,
    where the textbook Wald interval collapses to a point. Continuous: mean +- z * s / sqrt(n)
    (normal, not Student t: outcome streams here run to hundreds of samples or more)."""
    z = _z(level)
    if arm.kind is OutcomeKind.BINARY:
        low, high = _wilson(arm.sum, arm.n, z)
        return Interval(arm.mean, low, high, level)
    if arm.n < 2:
        return Interval(arm.mean, -math.inf, math.inf, level)
    half = z * math.sqrt(arm.variance / arm.n)
    return Interval(arm.mean, arm.mean - half, arm.mean + half, level)


def difference_interval(
    candidate: ArmStats,
    control: ArmStats,
    level: float = 0.95,
    scale: Scale = "absolute",
) -> Interval:
    """Fixed-horizon interval for the candidate's lift over control, at one planned look.

    absolute: m_c - m_s. Binary: Newcombe's hybrid score interval (his method 10, built from
    the two Wilson intervals; good coverage at small n and near 0 or 1). Continuous: Welch's
    normal interval. relative: (m_c - m_s) / m_s +- z * sqrt(V_c / m_s^2 + m_c^2 V_s / m_s^4)
    (the delta method; V = variance / n, binary variances with one added success and failure so
    0/n and n/n arms are not certain); undefined (infinite) while m_s is not positive.

    Looking at this every tick and acting when it excludes 0 inflates false positives; that
    is what `SequentialTest` is for."""
    _same_kind(candidate, control)
    if scale not in ("relative", "absolute"):
        raise ValueError(f"scale ({scale!r}) must be 'relative' or 'absolute'")
    z = _z(level)
    if candidate.n == 0 or control.n == 0:
        return Interval(None, -math.inf, math.inf, level)
    mc, ms = candidate.mean, control.mean
    binary = candidate.kind is OutcomeKind.BINARY
    if scale == "absolute" and binary:
        estimate = mc - ms
        lc, uc = _wilson(candidate.sum, candidate.n, z)
        ls, us = _wilson(control.sum, control.n, z)
        low = estimate - math.hypot(mc - lc, us - ms)
        high = estimate + math.hypot(uc - mc, ms - ls)
        return Interval(estimate, low, high, level)
    if scale == "relative" and ms <= 0:
        return Interval(None, -math.inf, math.inf, level)
    estimate = mc - ms if scale == "absolute" else mc / ms - 1
    if not binary and (candidate.n < 2 or control.n < 2):
        return Interval(estimate, -math.inf, math.inf, level)
    vc = _inference_variance(candidate) / candidate.n
    vs = _inference_variance(control) / control.n
    if scale == "absolute":
        se = math.sqrt(vc + vs)
    else:
        se = math.sqrt(vc / ms**2 + mc**2 * vs / ms**4)
    return Interval(estimate, estimate - z * se, estimate + z * se, level)


def _inference_variance(arm: ArmStats) -> float:
    """Per-outcome variance for inference about a gap: binary with one added success and one
    added failure, so that 0/n and n/n arms are not certain."""
    if arm.kind is OutcomeKind.BINARY:
        p = (arm.sum + 1) / (arm.n + 2)
        return p * (1 - p)
    return arm.variance


def _same_kind(candidate: ArmStats, control: ArmStats) -> None:
    if candidate.kind is not control.kind:
        raise ValueError(
            f"candidate ({candidate.kind.value}) and control ({control.kind.value}) must "
            "measure the same kind of outcome"
        )


# -- planning --------------------------------------------------------------------------------


def required_sample_size(
    baseline_rate: float,
    mde: float,
    alpha: float = 0.05,
    power: float = 0.8,
    *,
    scale: Scale = "relative",
) -> int:
    """Samples per arm for a fixed-horizon two-sided test of two proportions.

    n = (z_(1-alpha/2) sqrt(2 pbar qbar) + z_power sqrt(p1 q1 + p2 q2))^2 / (p2 - p1)^2, the
    pooled-null formula R's power.prop.test solves (no continuity correction). A planning
    figure: the sequential test needs more at its horizon (about twice as many to reach the
    same power at alpha 0.05, measured in bench/abtest.py) and fewer on average for large
    effects, because it stops early."""
    if not 0 < baseline_rate < 1:
        raise ValueError(f"baseline_rate ({baseline_rate}) must be between 0 and 1, exclusive")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha ({alpha}) and power ({power}) must be between 0 and 1")
    if mde == 0:
        raise ValueError("mde (0) must not be 0: no sample detects a zero effect")
    p1 = baseline_rate
    p2 = p1 * (1 + mde) if scale == "relative" else p1 + mde
    if not 0 < p2 < 1:
        raise ValueError(
            f"baseline_rate ({baseline_rate}) moved by mde ({mde}, {scale}) gives {p2}, "
            "which is not a rate between 0 and 1"
        )
    pbar = (p1 + p2) / 2
    numerator = _z(1 - alpha) * math.sqrt(2 * pbar * (1 - pbar)) + _NORMAL.inv_cdf(
        power
    ) * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(numerator**2 / (p2 - p1) ** 2)


# -- the sequential test ---------------------------------------------------------------------


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SequentialTest(_Strict):
    """Always-valid two-sample test of the candidate's lift over control (mSPRT with a normal
    mixture). The module docstring has the math and the choices."""

    alpha: float = Field(
        default=0.05, gt=0, lt=1, description="Chance of any false 'better' or 'worse', ever."
    )
    scale: Scale = Field(
        default="relative",
        description="relative: (mean_c - mean_s) / mean_s; absolute: mean_c - mean_s.",
    )
    mde: float = Field(
        default=0.05,
        gt=0,
        description=(
            "Smallest lift worth detecting, on `scale` (0.05 relative = 5%); tau when tau is "
            "null."
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

    @property
    def effective_tau(self) -> float:
        return self.tau if self.tau is not None else self.mde

    def evaluate(
        self, candidate: ArmStats, control: ArmStats, previous: Verdict | None = None
    ) -> Verdict:
        """The verdict after this look, given the stats since the experiment started and the
        previous look's verdict (None on the first look). Same inputs, same verdict."""
        _same_kind(candidate, control)
        if previous is None:
            state = (1.0, -math.inf, math.inf)
            looks = 0
        else:
            self._check_previous(previous, candidate, control)
            state = (previous.p_value, previous.difference_low, previous.difference_high)
            looks = previous.looks
        relative = self.scale == "relative"
        binary = candidate.kind is OutcomeKind.BINARY
        columns = (*state, *_columns(candidate), *_columns(control))
        p, d_low, d_high, counted, control_scale, why = _advance(
            binary, relative, self.effective_tau, self.alpha, self.min_samples_per_arm,
            *(np.asarray(x, dtype=float) for x in columns),
        )  # fmt: skip
        p, d_low, d_high = float(p), float(d_low), float(d_high)
        low, high = (
            float(x) for x in _on_scale(d_low, d_high, float(control_scale), relative, binary)
        )
        mc, ms = candidate.mean, control.mean
        difference = mc - ms if mc is not None and ms is not None else None
        if not relative:
            lift = difference
        else:
            lift = difference / ms if difference is not None and ms > 0 else None
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
            reason=self._reason(decision, lift, low, high, p, candidate, control, why),
        )

    def evaluate_paths(
        self,
        kind: OutcomeKind,
        candidate: tuple[Any, Any, Any],
        control: tuple[Any, Any, Any],
    ) -> PathResult:
        """`evaluate` for many simulated experiments at once: each arm is (n, sum, sum_sq),
        cumulative, as (E, T) arrays (experiment, look). The same kernel as `evaluate`,
        vectorized over experiments, for planning and benchmarks."""
        arrays = [np.asarray(a, dtype=float) for a in (*candidate, *control)]
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
        for t in range(looks):
            p, d_low, d_high, _, control_scale, _ = _advance(
                kind is OutcomeKind.BINARY, relative, self.effective_tau, self.alpha,
                self.min_samples_per_arm, p, d_low, d_high, *(a[:, t] for a in arrays),
            )  # fmt: skip
            out["p"][:, t] = p
            out["low"][:, t], out["high"][:, t] = _on_scale(
                d_low, d_high, control_scale, relative, kind is OutcomeKind.BINARY
            )
        return PathResult(out["p"], out["low"], out["high"])

    def _check_previous(self, previous: Verdict, candidate: ArmStats, control: ArmStats) -> None:
        ours = (self.alpha, self.effective_tau, self.scale)
        theirs = (previous.alpha, previous.tau, previous.scale)
        if ours != theirs:
            raise ValueError(
                f"previous verdict came from another test (alpha, tau, scale = {theirs}) than "
                f"this one ({ours})"
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
    ) -> str:
        def fmt(value: float | None) -> str:
            if value is None or not math.isfinite(value):
                return "n/a" if value is None or math.isnan(value) else f"{value:+}"
            return f"{value:+.2%}" if self.scale == "relative" else f"{value:+.4g}"

        text = (
            f"{self.scale} lift {fmt(lift)}, always-valid {1 - self.alpha:.0%} interval "
            f"[{fmt(low)}, {fmt(high)}], p={p:.3g}, {candidate.n}/{control.n} samples "
            f"(candidate/control): {decision.value}"
        )
        return f"{text} ({why})" if why else text


def _columns(arm: ArmStats) -> tuple[float, float, float]:
    return float(arm.n), arm.sum, arm.sum_sq


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


def _advance(
    binary: bool,
    relative: bool,
    tau: float,
    alpha: float,
    min_samples: int,
    prev_p: Any,
    prev_low: Any,
    prev_high: Any,
    nc: Any,
    sc: Any,
    ssc: Any,
    ns: Any,
    ss: Any,
    sss: Any,
) -> tuple[Any, ...]:
    """One look of the mSPRT on the difference in means, elementwise over numpy arrays:
    (p, low, high, counted, control_scale, why), the interval in absolute units.

    The one kernel behind `evaluate` (0-d arrays) and `evaluate_paths` (one column of
    experiments), so the simulations in tests and benchmarks run exactly this arithmetic."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = sc / nc - ss / ns
        if binary:
            pc, ps = (sc + 1) / (nc + 2), (ss + 1) / (ns + 2)
            variance = pc * (1 - pc) / nc + ps * (1 - ps) / ns
            control_scale = ps
            pooled = (sc + ss + 1) / (nc + ns + 2)
        else:
            vc = np.maximum(ssc - sc * sc / nc, 0) / (nc - 1) / nc
            vs = np.maximum(sss - ss * ss / ns, 0) / (ns - 1) / ns
            variance = vc + vs
            control_scale = ss / ns
            pooled = (sc + ss) / (nc + ns)
        # A relative tau in absolute units: times the pooled mean, not the control's, because
        # under H0 the pooled mean does not depend on which arm happens to run high (with the
        # control's, a high control both makes d negative and widens tau: in a 20,000-experiment
        # A/A simulation with tau = 5%, "worse" came 97 times and "better" 61).
        tau_abs = tau * pooled if relative else np.full_like(d, tau)
        enough = (nc >= min_samples) & (ns >= min_samples)
        defined = enough & (tau_abs > 0) & ((control_scale > 0) | (not relative))
        exact = defined & (variance == 0)  # continuous arms with no spread at all
        counted = defined & ((variance > 0) | (exact & (d != 0)))
        v = np.where(variance > 0, variance, 1.0)
        t2 = np.where(tau_abs > 0, tau_abs, 1.0) ** 2
        # log Lambda, with Lambda = sqrt(V / (V + tau^2)) exp(d^2 tau^2 / (2 V (V + tau^2)))
        log_lr = 0.5 * np.log(v / (v + t2)) + d * d * t2 / (2 * v * (v + t2))
        p_now = np.where(exact, 0.0, np.exp(-np.maximum(log_lr, 0.0)))
        half = np.sqrt(v * (v + t2) / t2 * (2 * np.log(1 / alpha) + np.log((v + t2) / v)))
        half = np.where(exact, 0.0, half)
        low = np.maximum(prev_low, d - half)
        high = np.minimum(prev_high, d + half)
        contradicts = counted & (low > high)
        low = np.where(contradicts, d - half, low)
        high = np.where(contradicts, d + half, high)
        p = np.where(counted, np.minimum(prev_p, p_now), prev_p)
        low = np.where(counted, low, prev_low)
        high = np.where(counted, high, prev_high)
    why = ""
    if np.ndim(counted) == 0:
        if not enough:
            why = f"waiting for {min_samples} samples in each arm"
        elif not defined:
            why = "a mean is not positive: no relative lift (use scale absolute)"
        elif not counted:
            why = "no spread in either arm and no difference: no evidence yet"
        elif contradicts:
            why = "this look's interval misses the earlier ones: the effect changed; restarted"
    return p, low, high, counted, control_scale, why


# -- gate configs ----------------------------------------------------------------------------


class _LiftGate(_Strict):
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
