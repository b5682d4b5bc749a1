"""One arm of an A/B test: outcome sums that merge by addition, and fixed-horizon intervals.

ArmStats(kind, n, sum, sum_sq, units)   sums, so router replicas merge them by addition;
                                        `units` holds the per-unit (user) moments that make
                                        the variance cluster-robust
UnitMoments(count, sum_sq, cross, n_sq) those moments
COVARIATE_MOMENTS                       CUPED: the nine pre-period sums an arm may carry
confidence_interval(arm, level)         Wilson (binary) or normal (continuous), one arm
difference_interval(c, s, level, scale) absolute gap (Newcombe / Welch) or relative lift
                                        (delta method); fixed-horizon, NOT safe to peek at
required_sample_size(...)               fixed-horizon planning figure (two proportions)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum
from statistics import NormalDist
from typing import Any, Literal, cast

import numpy as np

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


# CUPED: an arm's pre-experiment sums over its units (clusters) g, with S_g, n_g the unit's
# outcomes in the experiment and P_g, M_g its outcomes' sum and count in the pre-period.
COVARIATE_MOMENTS = (
    "pre_sum",  # sum P_g
    "pre_n",  # sum M_g
    "pre_sum_sq",  # sum P_g^2
    "pre_cross",  # sum P_g M_g
    "pre_n_sq",  # sum M_g^2
    "sum_pre_sum",  # sum S_g P_g
    "sum_pre_n",  # sum S_g M_g
    "n_pre_sum",  # sum n_g P_g
    "n_pre_n",  # sum n_g M_g
)

# Outcomes are clipped to at most this magnitude even where no bounds are declared, so that
# sums of squares stay finite for any count (n * 1e24 < 1.8e308 for n below 1e284).
MAX_ABS_OUTCOME = 1e12


@dataclass(frozen=True)
class UnitMoments:
    """Per-unit moments of one arm: how its outcomes group into units (users).

    One user's outcomes are correlated (a user who clicks often clicks often on either
    version), so the variance of an arm's mean is estimated from per-unit totals (the
    cluster-robust, or "sandwich", variance), not from outcomes as if each were independent.
    With S_g and n_g the sum and count of unit g's outcomes:

        count  = number of units with outcomes        sum_sq = sum over units of S_g^2
        cross  = sum over units of S_g * n_g          n_sq   = sum over units of n_g^2

    Var(mean) = count / (count - 1) * sum_g (S_g - mean * n_g)^2 / n^2, which expands into
    these four. With one outcome per unit it is the usual s^2 / n. Moments of arms whose
    units are disjoint (two router replicas, each holding whole units) add."""

    count: int
    sum_sq: float
    cross: float
    n_sq: float

    def merge(self, other: UnitMoments) -> UnitMoments:
        return UnitMoments(
            self.count + other.count,
            self.sum_sq + other.sum_sq,
            self.cross + other.cross,
            self.n_sq + other.n_sq,
        )


@dataclass(frozen=True)
class ArmStats:
    """One version's outcomes so far: count, sum and sum of squares, and per-unit moments.

    Sums rather than a running mean because every router replica keeps its own and the
    controller adds them (`merge`), the way request counts are pushed today. Immutable: `add`
    and `merge` return a new ArmStats, so a Verdict's inputs cannot change under it; a hot
    path that counts events keeps plain integers and builds one ArmStats per push.

    Binary arms hold sum = successes and sum_sq = sum (x^2 = x for 0/1); build them with
    `ArmStats.binary(successes, n)`. Continuous sums lose precision when the mean is large
    against the spread (sum_sq - sum^2/n cancels): subtract a fixed offset from the values
    first (revenue minus a typical order) if that is the case.

    `units` (UnitMoments) is None when every outcome is its own unit (keyless traffic, or
    stats built from values); the feedback book fills it from the routing unit of each
    answer. `clipped` counts continuous outcomes that were clipped (winsorised) to `bounds`,
    the [min_value, max_value] a gate declared (None: only +-MAX_ABS_OUTCOME applied).

    `covariates`, for CUPED: the nine `COVARIATE_MOMENTS` sums of the arm's units'
    pre-experiment outcomes (None: no pre-period was kept). A unit without a pre-period adds
    0 to each, so an outcome added by `add` (a unit of its own) leaves them as they are, and
    arms whose units are disjoint add them.
    """

    kind: OutcomeKind
    n: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0
    units: UnitMoments | None = None
    clipped: int = 0
    bounds: tuple[float, float] | None = None
    covariates: tuple[float, ...] | None = None

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
        if self.units is not None:
            u = self.units
            if not (min(self.n, 1) <= u.count <= self.n):
                raise ValueError(
                    f"units.count ({u.count}) must be between {min(self.n, 1)} and n ({self.n})"
                )
            if not all(math.isfinite(x) for x in (u.sum_sq, u.cross, u.n_sq)):
                raise ValueError(f"unit moments ({u}) must be finite")
            if not (self.n <= u.n_sq <= self.n * self.n):
                raise ValueError(
                    f"units.n_sq ({u.n_sq}) must be between n ({self.n}) and n^2 ({self.n**2})"
                )
        if self.clipped < 0 or self.clipped > self.n:
            raise ValueError(f"clipped ({self.clipped}) must be between 0 and n ({self.n})")
        if self.covariates is not None:
            covariates = tuple(float(x) for x in self.covariates)
            if len(covariates) != len(COVARIATE_MOMENTS) or not all(
                math.isfinite(x) for x in covariates
            ):
                raise ValueError(
                    f"covariates ({self.covariates}) must be {len(COVARIATE_MOMENTS)} finite "
                    f"sums ({', '.join(COVARIATE_MOMENTS)})"
                )
            object.__setattr__(self, "covariates", covariates)

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
        """This arm with one more outcome, a unit of its own (0/1 for binary, any finite
        number otherwise)."""
        value = float(value)
        if self.kind is OutcomeKind.BINARY and value not in (0.0, 1.0):
            raise ValueError(f"a binary outcome must be 0 or 1, got {value}")
        if not math.isfinite(value):
            raise ValueError(f"an outcome must be finite, got {value}")
        units = self.units
        if units is not None:
            units = units.merge(UnitMoments(1, value * value, value, 1.0))
        return replace(
            self, n=self.n + 1, sum=self.sum + value, sum_sq=self.sum_sq + value * value,
            units=units,
        )  # fmt: skip

    def merge(self, other: ArmStats) -> ArmStats:
        """Both arms' outcomes together (the same version counted by two router replicas,
        each holding whole units)."""
        if other.kind is not self.kind:
            raise ValueError(f"cannot merge a {other.kind.value} arm into a {self.kind.value} one")
        if other.bounds != self.bounds:
            raise ValueError(
                f"cannot merge an arm clipped to {other.bounds} into one clipped to {self.bounds}"
            )
        units = None
        if self.units is not None or other.units is not None:
            units = self.unit_moments.merge(other.unit_moments)
        covariates = None
        if self.covariates is not None or other.covariates is not None:
            zeros = (0.0,) * len(COVARIATE_MOMENTS)
            covariates = tuple(
                a + b for a, b in zip(self.covariates or zeros, other.covariates or zeros)
            )
        return ArmStats(
            self.kind, self.n + other.n, self.sum + other.sum, self.sum_sq + other.sum_sq,
            units, self.clipped + other.clipped, self.bounds, covariates,
        )  # fmt: skip

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

    @property
    def unit_moments(self) -> UnitMoments:
        """`units`, or the moments of one unit per outcome when it is None."""
        if self.units is not None:
            return self.units
        return UnitMoments(self.n, self.sum_sq, self.sum, float(self.n))

    @property
    def unit_count(self) -> int:
        return self.unit_moments.count

    @property
    def design_effect(self) -> float:
        """How much the grouping of outcomes into units inflates the variance of the mean
        (the cluster-robust variance over the independent one): 1 with one outcome per unit
        or no spread; above 1 when a unit's outcomes resemble each other; inf while all
        outcomes come from one unit."""
        return float(_design_effect(float(self.n), self.sum, self.sum_sq, *_moments(self)))


def _moments(arm: ArmStats) -> tuple[float, float, float, float]:
    u = arm.unit_moments
    return float(u.count), u.sum_sq, u.cross, u.n_sq


def _design_effect(n: Any, s: Any, ss: Any, g: Any, gss: Any, gsn: Any, gnn: Any) -> Any:
    """Cluster-robust over independent variance of the mean, elementwise over numpy arrays
    (the sequential test's kernel uses it too): 1 where every outcome is its own unit (so
    such arms give exactly the independent-outcome variance) or there is no spread at all,
    inf while one unit holds every outcome."""
    with np.errstate(divide="ignore", invalid="ignore"):
        m = s / n
        naive = np.maximum(ss - s * m, 0.0) * n / (n - 1)  # sum (x - m)^2 * n/(n-1)
        robust = np.maximum(gss - 2 * m * gsn + m * m * gnn, 0.0) * g / (g - 1)
        ratio = np.where(g > 1, robust / np.where(naive > 0, naive, 1.0), np.inf)
        return np.where((g >= n) | (naive <= 0), 1.0, ratio)


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


def _wilson(successes: float, n: float, z: float) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clamp rounding only: exact bounds are inside [0, 1] and hit 0 or 1 at p = 0 or 1.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _wilson_arm(arm: ArmStats, z: float) -> tuple[float, float]:
    """Wilson's interval of a binary arm on its effective sample size, n / design effect
    (outcomes grouped in units carry less information than as many independent ones)."""
    if arm.n == 0:
        return 0.0, 1.0
    effect = arm.design_effect
    if effect == 1.0:
        return _wilson(arm.sum, arm.n, z)
    n = arm.n / effect
    return _wilson(arm.sum / arm.n * n, n, z)


def confidence_interval(arm: ArmStats, level: float = 0.95) -> Interval:
    """Fixed-horizon interval for one arm's mean.

    Binary: Wilson's score interval, which stays inside [0, 1] and behaves at 0/n and n/n,
    where the textbook Wald interval collapses to a point. Continuous: mean +- z * s / sqrt(n)
    (normal, not Student t: outcome streams here run to hundreds of samples or more). Both on
    the effective sample size n / design effect when outcomes group into units."""
    z = _z(level)
    if arm.kind is OutcomeKind.BINARY:
        low, high = _wilson_arm(arm, z)
        return Interval(arm.mean, low, high, level)
    if arm.n < 2:
        return Interval(arm.mean, -math.inf, math.inf, level)
    mean = cast(float, arm.mean)  # n >= 2 here
    half = z * math.sqrt(cast(float, arm.variance) * arm.design_effect / arm.n)
    return Interval(arm.mean, mean - half, mean + half, level)


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
    0/n and n/n arms are not certain); undefined (infinite) while m_s is not positive. Each
    arm's variance is scaled by its design effect (outcomes grouped in units).

    Looking at this every tick and acting when it excludes 0 inflates false positives; that
    is what `SequentialTest` is for."""
    _same_kind(candidate, control)
    if scale not in ("relative", "absolute"):
        raise ValueError(f"scale ({scale!r}) must be 'relative' or 'absolute'")
    z = _z(level)
    if candidate.n == 0 or control.n == 0:
        return Interval(None, -math.inf, math.inf, level)
    mc, ms = cast(float, candidate.mean), cast(float, control.mean)  # both n > 0 here
    binary = candidate.kind is OutcomeKind.BINARY
    if scale == "absolute" and binary:
        estimate = mc - ms
        lc, uc = _wilson_arm(candidate, z)
        ls, us = _wilson_arm(control, z)
        low = estimate - math.hypot(mc - lc, us - ms)
        high = estimate + math.hypot(uc - mc, ms - ls)
        return Interval(estimate, low, high, level)
    if scale == "relative" and ms <= 0:
        return Interval(None, -math.inf, math.inf, level)
    estimate = mc - ms if scale == "absolute" else mc / ms - 1
    if not binary and (candidate.n < 2 or control.n < 2):
        return Interval(estimate, -math.inf, math.inf, level)
    vc = _inference_variance(candidate) * candidate.design_effect / candidate.n
    vs = _inference_variance(control) * control.design_effect / control.n
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
    return cast(float, arm.variance)  # callers pass continuous arms with n >= 2


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
