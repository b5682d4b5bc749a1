"""The metric catalog and the recording helpers, against a fake metric factory (no Ray)."""

from __future__ import annotations

import re

import pytest

from app import errors
from app.observability.metrics import (
    DECISIONS,
    METRICS,
    ControllerMetrics,
    MeteredStats,
    Metrics,
    MetricSpec,
    RouterGauges,
    error_type,
    exported_names,
    names_in_promql,
)
from app.serving.dispatch import ShadowStats


class FakeMetric:
    def __init__(self, spec: MetricSpec) -> None:
        self.spec = spec
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def inc(self, value, tags):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def observe(self, value, tags):
        self.calls.append(("observe", value, tags))


class FakeFactory:
    def __init__(self) -> None:
        self.made: dict[str, FakeMetric] = {}

    def __call__(self, spec: MetricSpec) -> FakeMetric:
        assert spec.name not in self.made, f"{spec.name} created twice"
        self.made[spec.name] = FakeMetric(spec)
        return self.made[spec.name]

    def calls(self, name: str) -> list[tuple[str, float, dict[str, str]]]:
        return self.made[name].calls if name in self.made else []


@pytest.fixture
def factory() -> FakeFactory:
    return FakeFactory()


@pytest.fixture
def metrics(factory) -> Metrics:
    return Metrics("rec", factory)


# -- the catalog -----------------------------------------------------------------------------


def test_every_metric_has_model_and_no_tag_serve_reserves():
    for spec in METRICS.values():
        assert spec.tag_keys[0] == "model", spec.name
        assert not {"deployment", "replica", "application", "route"} & set(spec.tag_keys), spec.name
        assert re.fullmatch(r"rollout_[a-z0-9_]+", spec.name), spec.name
        assert spec.description.strip(), spec.name


def test_histograms_have_increasing_bounds_and_others_none():
    for spec in METRICS.values():
        if spec.kind == "histogram":
            assert spec.boundaries and list(spec.boundaries) == sorted(set(spec.boundaries)), (
                spec.name
            )
        else:
            assert spec.boundaries is None, spec.name


def test_exported_names_follow_rays_export():
    # Ray adds `ray_`, and `_total` to counters (checked against a live export in the
    # integration suite); histograms become _bucket/_sum/_count.
    names = exported_names()
    assert "ray_rollout_requests_total" in names
    assert "ray_rollout_request_latency_ms_bucket" in names
    assert "ray_rollout_traffic_weight_percent" in names
    assert "ray_rollout_request_latency_ms" not in names  # a histogram has no bare series


def test_the_module_docstring_lists_every_metric():
    import app.observability.metrics

    listed = set(
        re.findall(r"^\s{4}(rollout_[a-z0-9_]+)\s", app.observability.metrics.__doc__, re.M)
    )
    assert listed == set(METRICS)


# -- recording ------------------------------------------------------------------------------


def test_request_records_counter_and_latency_with_bounded_tags(metrics, factory):
    metrics.request("v2", "sticky", "ok", 12.5)
    assert factory.calls("rollout_requests") == [
        ("inc", 1.0, {"model": "rec", "version": "v2", "decision": "sticky", "outcome": "ok"})
    ]
    assert factory.calls("rollout_request_latency_ms") == [
        ("observe", 12.5, {"model": "rec", "version": "v2", "decision": "sticky"})
    ]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: m.request("v1", "random", "ok", 1.0), "decision='random'"),
        (lambda m: m.request("v1", "pinned", "fine", 1.0), "outcome='fine'"),
        (lambda m: m.fallback("v1", "because"), "reason='because'"),
        (lambda m: m.inc("rollout_requests", version="v1"), "are not its tag keys"),
        (lambda m: m.set("rollout_phase", 1.0, phase="dancing"), "phase='dancing'"),
        (lambda m: m.set("rollout_load_stage_rps", 1.0, version="v2", rate="peak"), "rate='peak'"),
    ],
)
def test_unbounded_or_missing_tag_values_are_refused(metrics, call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call(metrics)


def test_every_routing_decision_is_a_valid_tag(metrics, factory):
    from app.serving.traffic import Decision

    for decision in Decision:
        assert decision.value in DECISIONS
        metrics.request("v1", decision.value, "ok", 1.0)
    assert len(factory.calls("rollout_requests")) == len(Decision)


@pytest.mark.parametrize(
    "error, expected",
    [
        (errors.InvalidInput("x"), "invalid_input"),
        (errors.ModelNotFound("x"), "not_found"),
        (errors.PayloadTooLarge("x"), "too_large"),
        (errors.LoadShed("x"), "overloaded"),
        (errors.Overloaded("x"), "overloaded"),
        (errors.Unavailable("x"), "unavailable"),
        (errors.DeadlineExceeded("x"), "timeout"),
        (errors.ModelFailure("x"), "model_error"),
        (errors.InjectedFault("x"), "model_error"),
        (errors.Unauthorized("x"), "unauthorized"),
        (errors.Conflict("x"), "conflict"),
        (RuntimeError("x"), "other"),
    ],
)
def test_error_type_maps_each_error_class(error, expected):
    assert error_type(error) == expected


def test_metered_stats_feed_the_gates_and_the_metric_alike(metrics, factory):
    stats = MeteredStats(metrics)
    stats.record("v2", False, 40.0)
    stats.record("v2", True, 3.0)
    assert stats.drain()["v2"]["requests"] == 2
    assert [c[2]["outcome"] for c in factory.calls("rollout_version_requests")] == ["error", "ok"]
    assert [c[1] for c in factory.calls("rollout_version_latency_ms")] == [40.0, 3.0]


def test_router_gauges_send_shadow_deltas_once(metrics, factory):
    gauges = RouterGauges(metrics)
    shadow = ShadowStats()
    shadow.sent, shadow.completed, shadow.failed, shadow.dropped = 5, 4, 1, 0
    shadow.sums = {"top_k_overlap": 3.0}
    common = dict(versions=["v1", "v2"], weights={"v1": 90.0, "v2": 10.0}, stable="v1",
                  available=["v1"], breakers={"v1": "closed", "v2": "open"}, psi={"v2": 0.3})  # fmt: skip
    gauges.update(shadow={"v2": shadow}, **common)
    shadow.completed, shadow.sums = 6, {"top_k_overlap": 3.0 + 2 * 0.5}
    gauges.update(shadow={"v2": shadow}, **common)
    compared = [
        c[1] for c in factory.calls("rollout_shadow_requests") if c[2]["outcome"] == "compared"
    ]
    assert compared == [4, 2]  # running totals 4 then 6: sent as 4 and 2
    assert [c[1] for c in factory.calls("rollout_shadow_agreement")] == [0.75, 0.5]
    failed = [c[1] for c in factory.calls("rollout_shadow_requests") if c[2]["outcome"] == "failed"]
    assert failed == [1]  # unchanged on the second update: not counted again
    breaker = {c[2]["version"]: c[1] for c in factory.calls("rollout_breaker_state")}
    assert breaker == {"v1": 0.0, "v2": 2.0}
    weights = {c[2]["version"]: c[1] for c in factory.calls("rollout_traffic_weight_percent")}
    assert weights == {"v1": 90.0, "v2": 10.0}
    available = {c[2]["version"]: c[1] for c in factory.calls("rollout_version_available")}
    assert available == {"v1": 1.0, "v2": 0.0}
    stable = {c[2]["version"]: c[1] for c in factory.calls("rollout_stable_version")}
    assert stable == {"v1": 1.0, "v2": 0.0}
    assert factory.calls("rollout_score_psi")[-1] == ("set", 0.3, {"model": "rec", "version": "v2"})


def _event(t, frm, to, gates=None):
    return {"time_s": t, "from_phase": frm, "to_phase": to, "step_index": 1, "weight": 0.0,
            "reason": "r", "gates": gates or {}}  # fmt: skip


def test_controller_metrics_count_a_rollback_and_its_time(metrics, factory):
    cm = ControllerMetrics(metrics)
    cm.state(phase="rolled_back", step_index=1, candidate="v2", weight=0.0)
    phases = {c[2]["phase"]: c[1] for c in factory.calls("rollout_phase")}
    assert phases["rolled_back"] == 1.0 and sum(phases.values()) == 1.0
    gates = {"fail_fast_error_rate": {"status": "failed"}, "max_error_rate": {"status": "passed"}}
    cm.events([_event(1000.75, "progressing", "rolled_back", gates)], candidate="v2",
              step_started_at=1000.0)  # fmt: skip
    assert factory.calls("rollout_rollbacks") == [("inc", 1.0, {"model": "rec", "version": "v2"})]
    assert factory.calls("rollout_time_to_rollback_s") == [
        ("observe", 0.75, {"model": "rec", "version": "v2"})
    ]
    assert [c[2]["gate"] for c in factory.calls("rollout_gate_failures")] == [
        "fail_fast_error_rate"
    ]
    assert [c[2]["phase"] for c in factory.calls("rollout_transitions")] == ["rolled_back"]


def test_controller_metrics_do_not_count_steps_or_aborts_as_rollbacks(metrics, factory):
    cm = ControllerMetrics(metrics)
    cm.events([_event(1.0, "progressing", "progressing"), _event(2.0, "progressing", "aborted")],
              candidate="v2", step_started_at=0.0)  # fmt: skip
    assert factory.calls("rollout_rollbacks") == []
    assert [c[2]["phase"] for c in factory.calls("rollout_transitions")] == ["aborted"]


def _load_status(phase, **figures):
    """A load stage status block as the controller shows it (`LoadRun.status()`)."""
    return {"phase": phase, "candidate": "v2", "target_rps": 30.0, "observed_rps": 0.0,
            "ramp_s": 2.0, "hold_s": 4.0, **figures}  # fmt: skip


def _load_gauges(factory):
    """The last value of each load stage gauge, keyed by (name, version, rate or None)."""
    out = {}
    for name in (
        "rollout_load_stage_running",
        "rollout_load_stage_rps",
        "rollout_load_stage_p99_ms",
    ):
        for _, value, tags in factory.calls(name):
            out[(name, tags["version"], tags.get("rate"))] = value
    return out


def test_controller_metrics_show_the_load_stage_while_it_runs_and_zero_it_after(metrics, factory):
    cm = ControllerMetrics(metrics)
    cm.load_stage(_load_status("ramp", current_rps=12.0, achieved_rps=10.5, p99_ms=41.0))
    gauges = _load_gauges(factory)
    assert gauges == {
        ("rollout_load_stage_running", "v2", None): 1.0,
        ("rollout_load_stage_rps", "v2", "target"): 30.0,
        ("rollout_load_stage_rps", "v2", "scheduled"): 12.0,
        ("rollout_load_stage_rps", "v2", "achieved"): 10.5,
        ("rollout_load_stage_p99_ms", "v2", None): 41.0,
    }
    # Waiting for the candidate: under way, nothing sent yet (no rates, no p99).
    cm.load_stage({"phase": "waiting for the candidate", "candidate": "v2", "target_rps": None})
    assert _load_gauges(factory)[("rollout_load_stage_running", "v2", None)] == 1.0
    assert _load_gauges(factory)[("rollout_load_stage_rps", "v2", "target")] == 0.0
    # Finished (failed, passed or stopped): not running, no live rate; the target and the
    # last p99 stay on the dashboard.
    for phase in ("failed", "passed", "stopped (aborted)"):
        cm.load_stage(_load_status(phase, current_rps=30.0, achieved_rps=9.8, p99_ms=1873.4))
        gauges = _load_gauges(factory)
        assert gauges[("rollout_load_stage_running", "v2", None)] == 0.0, phase
        assert gauges[("rollout_load_stage_rps", "v2", "scheduled")] == 0.0, phase
        assert gauges[("rollout_load_stage_rps", "v2", "achieved")] == 0.0, phase
        assert gauges[("rollout_load_stage_rps", "v2", "target")] == 30.0, phase
        assert gauges[("rollout_load_stage_p99_ms", "v2", None)] == 1873.4, phase


def test_controller_metrics_zero_the_last_load_stage_when_the_rollout_has_none(metrics, factory):
    cm = ControllerMetrics(metrics)
    cm.load_stage(None)  # no load stage ever: nothing to send (no version to tag)
    assert _load_gauges(factory) == {}
    cm.load_stage(_load_status("hold", current_rps=30.0, achieved_rps=29.0, p99_ms=40.0))
    # A new candidate's stage: the old candidate's gauges are zeroed, the new one's set.
    cm.load_stage(_load_status("ramp", current_rps=5.0, achieved_rps=4.0) | {"candidate": "v3"})
    gauges = _load_gauges(factory)
    assert gauges[("rollout_load_stage_running", "v2", None)] == 0.0
    assert gauges[("rollout_load_stage_rps", "v2", "achieved")] == 0.0
    assert gauges[("rollout_load_stage_running", "v3", None)] == 1.0
    cm.load_stage(None)  # the next rollout has no load stage: v3's gauges go to 0
    gauges = _load_gauges(factory)
    assert gauges[("rollout_load_stage_running", "v3", None)] == 0.0
    assert all(gauges[("rollout_load_stage_rps", "v3", r)] == 0.0
               for r in ("target", "scheduled", "achieved"))  # fmt: skip


# -- PromQL names ----------------------------------------------------------------------------


def test_names_in_promql_finds_series_rules_and_alerts_not_label_values():
    expr = ('sum by (version) (rate(ray_rollout_requests_total{model="ray_fake",x=\'a:b:c\'}[5m]))'
            ' / rollout:requests:rate1m or ALERTS{alertstate="firing"} > bool 0')  # fmt: skip
    assert names_in_promql(expr) == {
        "ray_rollout_requests_total",
        "rollout:requests:rate1m",
        "ALERTS",
    }


def test_every_fallback_reason_the_dispatcher_gives_is_a_valid_tag():
    from app.observability.metrics import FALLBACK_REASONS
    from app.serving.dispatch import BreakerOpen, _reason

    classes = [BreakerOpen] + [c for c in vars(errors).values()
                               if isinstance(c, type) and issubclass(c, errors.ServingError)]  # fmt: skip
    for cls in classes:
        assert _reason(cls("x")) in FALLBACK_REASONS, cls.__name__
