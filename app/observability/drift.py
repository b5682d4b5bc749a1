"""Quality drift: how far a version's output scores have moved from the stable version's.

A canary can answer every request with a 200 and still be worse: its scores shift, its
rankings flatten. Labels arrive late, if at all, so the early signal is the *distribution*
of what the model outputs, compared with what the stable version outputs for the same
traffic at the same time. This module keeps that distribution per version over a sliding
window and scores the difference with the population stability index (PSI):

    PSI = sum over bins of (actual% - expected%) * ln(actual% / expected%)

with the stable version as "expected". Rules of thumb (credit scoring, where PSI comes from):
below 0.1 no real change, 0.1 to 0.25 a moderate shift, above 0.25 a large one.

How, cheaply and mergeably:

* **A fixed fine grid** (`DriftSettings.low`..`high` in `bins` equal steps, plus one
  under- and one overflow bin). Recording a request is a `searchsorted` and a `bincount` on
  its score array: a few microseconds, no per-request allocation that grows.
* **A sliding window of time slots** (`slots` x `slot_s`, 12 x 10 s by default): each version
  has one count array per slot; old slots fall out as time moves, so the PSI tracks the last
  two minutes, not the whole day.
* **Bins for the PSI come from the stable version's quantiles**: the fine bins are grouped
  into up to `psi_bins` groups that each hold about the same share of the stable scores, so
  no group is near-empty on the expected side (PSI explodes on empty bins). Empty shares are
  floored at `epsilon`, the usual fix.
* **Not judged on a sliver**: no PSI until both sides have `min_samples` scores in the window.

Which output is "the score" is the adapter's business: `score_output` picks the output
named `scores`, else the first floating-point output; a model with none has no drift signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.config.router import DriftSettings

__all__ = ["DriftSettings", "ScoreWindow", "psi", "score_output"]


def score_output(outputs: Sequence[Any]) -> str | None:
    """The name of the output whose values are scores: `scores`, else the first FP output."""
    names = [o.name for o in outputs]
    if "scores" in names:
        return "scores"
    for spec in outputs:
        if str(spec.datatype).upper() in ("FP16", "FP32", "FP64", "BF16"):
            return spec.name
    return None


def psi(
    expected: np.ndarray, actual: np.ndarray, *, groups: int = 10, epsilon: float = 1e-4
) -> float:
    """The PSI of `actual` against `expected`, two histograms over the same fine bins.

    Fine bins are grouped by the expected distribution's quantiles (about 1/groups of its mass
    each); both sides' shares are floored at epsilon. Raises ValueError on empty histograms or
    mismatched shapes (the caller checks min_samples first)."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape or expected.ndim != 1:
        raise ValueError(
            f"histograms must be 1-d and alike, got {expected.shape} and {actual.shape}"
        )
    e_total, a_total = expected.sum(), actual.sum()
    if e_total <= 0 or a_total <= 0:
        raise ValueError("both histograms need at least one observation")
    # Group boundaries: the fine-bin index where the expected CDF crosses k/groups.
    cdf = np.cumsum(expected) / e_total
    cuts = np.searchsorted(cdf, np.arange(1, groups) / groups, side="left") + 1
    cuts = np.unique(np.clip(cuts, 1, len(expected) - 1))
    e_grouped = np.add.reduceat(expected, np.concatenate(([0], cuts)))
    a_grouped = np.add.reduceat(actual, np.concatenate(([0], cuts)))
    p = np.maximum(e_grouped / e_total, epsilon)
    q = np.maximum(a_grouped / a_total, epsilon)
    return float(np.sum((q - p) * np.log(q / p)))


class ScoreWindow:
    """Per-version histograms of output scores over a sliding window of time slots.

    `add` is on the request path (one array op); `psi_by_version` runs off it (once a
    second). Times are passed in (monotonic seconds); not thread-safe, like RouterStats: a
    router replica owns one event loop."""

    def __init__(self, settings: DriftSettings | None = None) -> None:
        self.settings = settings or DriftSettings()
        s = self.settings
        self._edges = np.linspace(s.low, s.high, s.bins + 1)
        self._n = s.bins + 2  # under- and overflow bins
        # version -> {slot number: counts}
        self._slots: dict[str, dict[int, np.ndarray]] = {}

    def add(self, version: str, scores: Any, now: float) -> None:
        """Count one answer's scores (any shape; NaNs are dropped) for `version` at `now`."""
        values = np.asarray(scores, dtype=np.float64).ravel()
        if values.size == 0:
            return
        values = values[~np.isnan(values)]
        slot = int(now // self.settings.slot_s)
        slots = self._slots.get(version)
        if slots is None:
            slots = self._slots[version] = {}
        counts = slots.get(slot)
        if counts is None:
            counts = slots[slot] = np.zeros(self._n, dtype=np.int64)
            self._expire(slots, slot)
        # bin 0: below low; bin bins+1: above high (side="right": a score on an edge goes up)
        counts += np.bincount(np.searchsorted(self._edges, values, side="right"), minlength=self._n)

    def counts(self, version: str, now: float) -> np.ndarray:
        """The version's histogram over the window ending at `now` (zeros when none)."""
        slots = self._slots.get(version, {})
        current = int(now // self.settings.slot_s)
        self._expire(slots, current)
        total = np.zeros(self._n, dtype=np.int64)
        for slot, counts in slots.items():
            if slot <= current:
                total += counts
        return total

    def psi_by_version(self, stable: str, now: float) -> dict[str, float]:
        """PSI of every version with enough scores against `stable` (stable itself: 0.0).

        Versions (or a stable version) below min_samples in the window are left out."""
        s = self.settings
        base = self.counts(stable, now)
        if base.sum() < s.min_samples:
            return {}
        out = {stable: 0.0}
        for version in list(self._slots):
            if version == stable:
                continue
            counts = self.counts(version, now)
            if counts.sum() >= s.min_samples:
                out[version] = psi(base, counts, groups=s.psi_bins, epsilon=s.epsilon)
        return out

    def sizes(self, now: float) -> dict[str, int]:
        """Scores per version in the window ending at `now` (for status pages)."""
        return {v: int(self.counts(v, now).sum()) for v in list(self._slots)}

    def _expire(self, slots: dict[int, np.ndarray], current: int) -> None:
        oldest = current - self.settings.slots + 1
        for slot in [k for k in slots if k < oldest]:
            del slots[slot]
