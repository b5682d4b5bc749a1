"""A rollout's timeline: what traffic, errors and latency looked like, second by second.

The rollout history (`RolloutState.history`) records *events*: phase changes, steps, commands,
with the gate readings that caused them. A report needs the curves between events too: the
weights, each version's error rate and p99 over time, and the gates' verdicts on every tick.
The controller feeds `Timeline` the same stats reports the gates get (`add`) and closes one
sample per `interval_s` (`sample`), so a sample describes the requests of that interval only.

Bounded: at most `max_samples` samples (an hour at one a second by default); the oldest go
first. Kept in the controller's memory, not in GCS: a restarted controller replica starts a
fresh timeline (the events survive; the curves before the restart do not).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from app.observability.stats import LATENCY_BOUNDS_MS, N_BUCKETS, quantile

__all__ = ["Timeline"]


class Timeline:
    def __init__(self, interval_s: float = 1.0, max_samples: int = 3600) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s ({interval_s}) must be positive")
        if max_samples < 1:
            raise ValueError(f"max_samples ({max_samples}) must be at least 1")
        self.interval_s = interval_s
        self.samples: deque[dict[str, Any]] = deque(maxlen=max_samples)
        # version -> [requests, errors, buckets] since the last sample
        self._pending: dict[str, list[Any]] = {}
        self._last: float | None = None

    def add(self, report: Mapping[str, Mapping[str, Any]]) -> None:
        """One router stats report (already validated by StatsWindow.add)."""
        for version, data in report.items():
            entry = self._pending.get(version)
            if entry is None:
                entry = self._pending[version] = [0, 0, [0] * N_BUCKETS]
            entry[0] += int(data["requests"])
            entry[1] += int(data["errors"])
            buckets = data["buckets"]
            if len(buckets) == N_BUCKETS:
                entry[2] = [a + b for a, b in zip(entry[2], buckets)]

    def sample(
        self,
        now: float,
        *,
        phase: str,
        step_index: int,
        weights: Mapping[str, float],
        verdicts: Sequence[Mapping[str, Any]] = (),
        force: bool = False,
    ) -> bool:
        """Close a sample at `now` if `interval_s` has passed since the last one (or `force`:
        a phase change gets its own point); True if a sample was taken."""
        if not force and self._last is not None and now - self._last < self.interval_s:
            return False
        self._last = now
        versions = {}
        for version, (requests, errors, buckets) in self._pending.items():
            versions[version] = {
                "requests": requests,
                "errors": errors,
                "error_rate": errors / requests if requests else None,
                "p99_ms": quantile(buckets, 0.99, LATENCY_BOUNDS_MS) if requests else None,
            }
        self._pending = {}
        self.samples.append({
            "time_s": now,
            "phase": phase,
            "step_index": step_index,
            "weights": dict(weights),
            "versions": versions,
            "gates": {str(v["gate"]): str(v["status"]) for v in verdicts},
        })  # fmt: skip
        return True

    def since(self, start_s: float) -> list[dict[str, Any]]:
        """Samples at or after `start_s`, oldest first (the controller samples before, during
        and after a rollout, so a report shows the baseline and the aftermath too)."""
        return [s for s in self.samples if s["time_s"] >= start_s]
