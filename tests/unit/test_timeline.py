"""The controller's per-second timeline for `rollout report` (no Ray)."""

from __future__ import annotations

import pytest

from app.observability.stats import RouterStats
from app.rollout.timeline import Timeline


def _report(**versions):
    stats = RouterStats()
    for version, latencies in versions.items():
        for ok, ms in latencies:
            stats.record(version, ok, ms)
    return stats.drain()


def test_a_sample_covers_only_its_interval():
    t = Timeline(interval_s=1.0)
    t.add(_report(v1=[(True, 5)] * 9 + [(False, 5)], v2=[(True, 200)]))
    assert t.sample(100.0, phase="progressing", step_index=1, weights={"v1": 90, "v2": 10},
                    verdicts=[{"gate": "max_error_rate", "status": "pending"}])  # fmt: skip
    assert not t.sample(100.5, phase="progressing", step_index=1, weights={})  # too soon
    t.add(_report(v1=[(True, 5)] * 2))
    assert t.sample(101.0, phase="progressing", step_index=2, weights={"v1": 75, "v2": 25})
    first, second = t.samples
    assert first["versions"]["v1"]["error_rate"] == pytest.approx(0.1)
    assert first["versions"]["v2"]["p99_ms"] > 150  # in the 150-200 ms bucket
    assert first["gates"] == {"max_error_rate": "pending"}
    assert second["versions"] == {"v1": {"requests": 2, "errors": 0, "error_rate": 0.0,
                                         "p99_ms": second["versions"]["v1"]["p99_ms"]}}  # fmt: skip
    assert t.since(100.5) == [second]


def test_bounded():
    t = Timeline(interval_s=1.0, max_samples=3)
    for i in range(5):
        t.sample(float(i), phase="progressing", step_index=0, weights={})
    assert [s["time_s"] for s in t.samples] == [2.0, 3.0, 4.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="interval_s"):
        Timeline(interval_s=0)
    with pytest.raises(ValueError, match="max_samples"):
        Timeline(max_samples=0)
