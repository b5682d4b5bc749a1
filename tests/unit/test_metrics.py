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
