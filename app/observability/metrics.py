"""Every Prometheus metric the app exports, in one place, with fixed and bounded tag keys.

The catalog (`METRICS`) is plain data: names, kinds, descriptions, tag keys, histogram
bounds. `Metrics` turns it into live `ray.serve.metrics` objects (Ray exports them from each
node's metrics agent, adding the `ray_` prefix, and `_total` to counters) and gives the Serve
adapters one cheap method per thing they record. The factory is injected, so unit tests
check every call site's tags against the catalog without Ray.

Tag values are bounded by construction: `model` and `version` come from the app's own configs,
and every other tag takes its values from one of the tuples below (`DECISIONS`, `OUTCOMES`,
`ERROR_TYPES`, ...). `Metrics` refuses (ValueError) a value outside its tuple, so a bug can't
grow a label without bound. Serve adds `deployment`, `replica` and `application` itself.

Gauges must be re-sent: Ray's metrics agent drops a gauge value that no process re-sent
within two export intervals (`RAY_metrics_report_interval_ms`, 10 s by default), so every
gauge here is set periodically (router: every second; controller: every second, terminal
phases included; model replicas: on health checks and batches), never only on change.

Cost: one record is a dict merge and a Cython call, about 3 µs on this 2-core machine (measured
in a Ray actor: counter 3.2 µs, histogram 2.6 µs, gauge 2.3 µs); a routed request records 4
to 8 of them (2 per request, 2 per version call, 1 each for a cache lookup, fallback, error).

    metric (exported as ray_<name>[_total])         kind       tags
    rollout_requests                                counter    model version decision outcome
    rollout_request_errors                          counter    model version error_type
    rollout_request_latency_ms                      histogram  model version decision
    rollout_version_requests                        counter    model version outcome
    rollout_version_latency_ms                      histogram  model version
    rollout_fallbacks                               counter    model version reason
    rollout_breaker_state                           gauge      model version
    rollout_cache_lookups                           counter    model version outcome
    rollout_shadow_requests                         counter    model version outcome
    rollout_shadow_agreement                        gauge      model version
    rollout_traffic_weight_percent                  gauge      model version
    rollout_stable_version                          gauge      model version
    rollout_version_available                       gauge      model version
    rollout_score_psi                               gauge      model version
    rollout_phase                                   gauge      model phase
    rollout_step_index                              gauge      model
    rollout_candidate_weight_percent                gauge      model version
    rollout_transitions                             counter    model phase
    rollout_gate_failures                           counter    model gate
    rollout_rollbacks                               counter    model version
    rollout_time_to_rollback_s                      histogram  model version
    rollout_load_stage_running                      gauge      model version
    rollout_load_stage_rps                          gauge      model version rate
    rollout_load_stage_p99_ms                       gauge      model version
    rollout_batch_size                              histogram  model version
    rollout_model_load_s                            gauge      model version
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from app.observability.stats import LATENCY_BOUNDS_MS, RouterStats

__all__ = [
    "BREAKER_STATE_VALUES",
    "ControllerMetrics",
    "DECISIONS",
    "ERROR_TYPES",
    "EXPORT_PREFIX",
    "LOAD_STAGE_RATES",
    "METRICS",
    "MeteredStats",
    "Metrics",
    "MetricSpec",
    "OUTCOMES",
    "PHASES",
    "RouterGauges",
    "UNROUTED",
    "UNROUTED_DECISION",
    "error_type",
    "exported_names",
    "names_in_promql",
    "ray_factory",
]

EXPORT_PREFIX = "ray_"

# Routing decisions: the router's own (traffic.Decision values), `cache` for an answer served
# from the response cache, and `unrouted` (version "none") for a request refused before a
# version was chosen (unknown model, body too large, undecodable body).
UNROUTED = "none"
UNROUTED_DECISION = "unrouted"
DECISIONS = ("pinned", "sticky", "weighted", "fallback", "stable", "cache", UNROUTED_DECISION)
# Client-visible outcome of a request: ok, the client's fault (4xx), or ours (5xx).
OUTCOMES = ("ok", "client_error", "error")
VERSION_OUTCOMES = ("ok", "error")
CACHE_OUTCOMES = ("hit", "miss")
SHADOW_OUTCOMES = ("compared", "failed", "dropped")
FALLBACK_REASONS = ("error", "timeout", "unavailable", "breaker_open", "shed", "replica_lost")
ERROR_TYPES = (
    "invalid_input", "not_found", "too_large", "overloaded", "unavailable", "timeout",
    "model_error", "unauthorized", "conflict", "other",
)  # fmt: skip
PHASES = ("idle", "progressing", "paused", "promoting", "succeeded", "rolled_back", "aborted")
BREAKER_STATE_VALUES = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
# The load stage's rates (rollout_load_stage_rps): the stage's target, the rate its schedule
# asks for now (rising over the ramp), and the answers per second it gets back.
LOAD_STAGE_RATES = ("target", "scheduled", "achieved")

BATCH_SIZE_BOUNDS = (1, 2, 4, 8, 16, 32, 64, 128)
ROLLBACK_BOUNDS_S = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as defined; Prometheus sees EXPORT_PREFIX + name (+ "_total" for counters)
    kind: Kind
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] | None = None

    @property
    def exported(self) -> str:
        """The metric's family name in Prometheus."""
        suffix = "_total" if self.kind == "counter" and not self.name.endswith("_total") else ""
        return EXPORT_PREFIX + self.name + suffix

    def series_names(self) -> tuple[str, ...]:
        """Every series name Prometheus stores for this metric."""
        if self.kind == "histogram":
            base = EXPORT_PREFIX + self.name
            return (base + "_bucket", base + "_sum", base + "_count")
        return (self.exported,)


_MV = ("model", "version")

METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        # -- router, per request
        MetricSpec("rollout_requests", "counter",
                   "Client requests answered by the router, by the version that answered, the "
                   "routing decision and the outcome (ok, client_error, error).",
                   (*_MV, "decision", "outcome")),
        MetricSpec("rollout_request_errors", "counter",
                   "Requests that ended in an error response, by error type.",
                   (*_MV, "error_type")),
        MetricSpec("rollout_request_latency_ms", "histogram",
                   "End-to-end latency in the router (body read to response), ms.",
                   (*_MV, "decision"), tuple(LATENCY_BOUNDS_MS)),
        MetricSpec("rollout_version_requests", "counter",
                   "Calls to a version as the rollout gates count them: a request that fell "
                   "back counts as an error of the version that failed it; shadow copies count.",
                   (*_MV, "outcome")),
        MetricSpec("rollout_version_latency_ms", "histogram",
                   "Latency of a version's answer as the gates see it (dispatch to answer), ms.",
                   _MV, tuple(LATENCY_BOUNDS_MS)),
        MetricSpec("rollout_fallbacks", "counter",
                   "Requests retried on a fallback version, by the version that failed and why.",
                   (*_MV, "reason")),
        MetricSpec("rollout_cache_lookups", "counter",
                   "Response cache lookups by outcome (hit, miss).", (*_MV, "outcome")),
        MetricSpec("rollout_score_psi", "gauge",
                   "Population stability index of the version's output scores against the "
                   "stable version's, over the router's sliding window (0 for the stable "
                   "version; above 0.25 is a large shift).", _MV),
        # -- router, periodic
        MetricSpec("rollout_breaker_state", "gauge",
                   "Circuit breaker state per version in this router replica: 0 closed, "
                   "1 half open, 2 open.", _MV),
        MetricSpec("rollout_shadow_requests", "counter",
                   "Shadow copies by outcome (compared, failed, dropped).", (*_MV, "outcome")),
        MetricSpec("rollout_shadow_agreement", "gauge",
                   "Mean top-k overlap of the shadow version's answers with the primary's, "
                   "over the copies compared since the last update.", _MV),
        MetricSpec("rollout_traffic_weight_percent", "gauge",
                   "Percent of public traffic the router's live table gives each version.", _MV),
        MetricSpec("rollout_stable_version", "gauge",
                   "1 for the version the router's live table names stable (the fallback "
                   "target and the baseline the alerts compare canaries with), else 0.", _MV),
        MetricSpec("rollout_version_available", "gauge",
                   "1 when the router may route to the version (Serve reports a running "
                   "replica or it is still starting), else 0.", _MV),
        # -- rollout controller
        MetricSpec("rollout_phase", "gauge",
                   "1 for the rollout's current phase, 0 for the others.", ("model", "phase")),
        MetricSpec("rollout_step_index", "gauge",
                   "Index of the rollout's current step (0-based; steps_total when done).",
                   ("model",)),
        MetricSpec("rollout_candidate_weight_percent", "gauge",
                   "The candidate's share of traffic the rollout asks for.", _MV),
        MetricSpec("rollout_transitions", "counter",
                   "Rollout phase changes, by the phase entered.", ("model", "phase")),
        MetricSpec("rollout_gate_failures", "counter",
                   "Gate verdicts that failed a rollout, by gate.", ("model", "gate")),
        MetricSpec("rollout_rollbacks", "counter",
                   "Automatic rollbacks, by the candidate rolled back.", _MV),
        MetricSpec("rollout_time_to_rollback_s", "histogram",
                   "Seconds the candidate served at the weight it was rolled back from "
                   "(from that step's start to the rollback).", _MV, ROLLBACK_BOUNDS_S),
        MetricSpec("rollout_load_stage_running", "gauge",
                   "1 while the candidate's load stage is under way (waiting for a running "
                   "replica, reading the sample, ramp, hold, draining), 0 once it passed, "
                   "failed or stopped.", _MV),
        MetricSpec("rollout_load_stage_rps", "gauge",
                   "The load stage's replay rate at the candidate, requests/s: its target, "
                   "the rate its schedule asks for now (0 -> target over the ramp), and the "
                   "answers received per second over the last 5 s; scheduled and achieved "
                   "are 0 when it is not running.", (*_MV, "rate")),
        MetricSpec("rollout_load_stage_p99_ms", "gauge",
                   "p99 latency of the load stage's replayed requests so far (the gate judges "
                   "the hold's), ms.", _MV),
        # -- model servers
        MetricSpec("rollout_batch_size", "histogram",
                   "Requests per dynamic batch.", _MV, BATCH_SIZE_BOUNDS),
        MetricSpec("rollout_model_load_s", "gauge",
                   "Seconds the replica took to verify and load its model.", _MV),
    )
}  # fmt: skip

# Tag keys whose values must come from a fixed tuple.
_ALLOWED: dict[str, tuple[str, ...]] = {
    "decision": DECISIONS,
    "error_type": ERROR_TYPES,
    "reason": FALLBACK_REASONS,
    "phase": PHASES,
    "rate": LOAD_STAGE_RATES,
}
_OUTCOMES_BY_METRIC = {
    "rollout_requests": OUTCOMES,
    "rollout_version_requests": VERSION_OUTCOMES,
    "rollout_cache_lookups": CACHE_OUTCOMES,
    "rollout_shadow_requests": SHADOW_OUTCOMES,
}

# Error class name (app.errors) -> error_type tag.
_ERROR_TYPES = {
    "InvalidInput": "invalid_input",
    "ModelNotFound": "not_found",
    "PayloadTooLarge": "too_large",
    "OverBudget": "too_large",
    "RequestTimeout": "timeout",
    "LoadShed": "overloaded",
    "Overloaded": "overloaded",
    "Gone": "not_found",
    "Unavailable": "unavailable",
    "BreakerOpen": "unavailable",
    "DeadlineExceeded": "timeout",
    "ModelFailure": "model_error",
    "InjectedFault": "model_error",
    "Unauthorized": "unauthorized",
    "Conflict": "conflict",
}


def error_type(error: BaseException) -> str:
    """The bounded `error_type` tag for an exception (its class or the nearest base class)."""
    for cls in type(error).__mro__:
        found = _ERROR_TYPES.get(cls.__name__)
        if found is not None:
            return found
    return "other"


def exported_names(specs: Iterable[MetricSpec] | None = None) -> set[str]:
    """Every series name the catalog puts in Prometheus (histograms: _bucket, _sum, _count)."""
    return {name for spec in (specs or METRICS.values()) for name in spec.series_names()}


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_NAME = re.compile(
    r"(?<![A-Za-z0-9_:])(ray_[a-z0-9_]+|[a-z_]+:[a-z0-9_:]+|ALERTS|up|scrape_[a-z_]+)"
    r"(?![A-Za-z0-9_:(])"
)


def names_in_promql(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: Ray-exported series (`ray_...`), recording
    rules (`level:metric:operations`), `ALERTS`, and Prometheus' own per-target series (`up`,
    `scrape_...`). String literals (label values) are skipped."""
    return set(_NAME.findall(_STRING.sub('""', expr)))


Factory = Callable[[MetricSpec], Any]


def ray_factory(spec: MetricSpec) -> Any:
    """A live `ray.serve.metrics` object for `spec` (call inside a Serve replica)."""
    from ray.serve import metrics

    # The ignores below: Ray types tag_keys as tuple[str] | None, meaning tuple[str, ...].
    if spec.kind == "counter":
        return metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)  # type: ignore[arg-type]
    if spec.kind == "gauge":
        return metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)  # type: ignore[arg-type]
    return metrics.Histogram(spec.name, description=spec.description,
                             boundaries=list(spec.boundaries or ()), tag_keys=spec.tag_keys)  # type: ignore[arg-type]  # fmt: skip


class Metrics:
    """The live metrics of one process (router, controller or model replica) for one model.

    Metric objects are created on first use, so a process creates only those it records. Tag
    dicts are built fresh per call (Ray merges them into its own), and checked against the
    catalog only for the keys that have a fixed vocabulary, which is a tuple lookup.
    """

    def __init__(self, model: str, factory: Factory = ray_factory) -> None:
        self.model = model
        self._factory = factory
        self._live: dict[str, Any] = {}

    def _metric(self, name: str) -> Any:
        metric = self._live.get(name)
        if metric is None:
            metric = self._live[name] = self._factory(METRICS[name])
        return metric

    def _tags(self, name: str, tags: Mapping[str, str]) -> dict[str, str]:
        spec = METRICS[name]
        out = {"model": self.model, **tags}
        if set(out) != set(spec.tag_keys):
            raise ValueError(
                f"{name}: tags {sorted(out)} are not its tag keys {sorted(spec.tag_keys)}"
            )
        for key, value in out.items():
            allowed = _OUTCOMES_BY_METRIC.get(name) if key == "outcome" else _ALLOWED.get(key)
            if allowed is not None and value not in allowed:
                raise ValueError(f"{name}: {key}={value!r} is not one of {allowed}")
        return out

    def inc(self, name: str, value: float = 1.0, **tags: str) -> None:
        self._metric(name).inc(value, self._tags(name, tags))

    def set(self, name: str, value: float, **tags: str) -> None:
        self._metric(name).set(value, self._tags(name, tags))

    def observe(self, name: str, value: float, **tags: str) -> None:
        self._metric(name).observe(value, self._tags(name, tags))

    # -- router, per request -------------------------------------------------------------------

    def request(self, version: str, decision: str, outcome: str, latency_ms: float) -> None:
        """One client request answered (or refused) by the router."""
        self.inc("rollout_requests", version=version, decision=decision, outcome=outcome)
        self.observe("rollout_request_latency_ms", latency_ms, version=version, decision=decision)

    def request_error(self, version: str, error: BaseException) -> None:
        self.inc("rollout_request_errors", version=version, error_type=error_type(error))

    def version_call(self, version: str, ok: bool, latency_ms: float) -> None:
        """One call to a version, as the rollout gates count it (same place as RouterStats)."""
        self.inc("rollout_version_requests", version=version, outcome="ok" if ok else "error")
        self.observe("rollout_version_latency_ms", latency_ms, version=version)

    def fallback(self, failed_version: str, reason: str) -> None:
        self.inc("rollout_fallbacks", version=failed_version, reason=reason)

    def cache_lookup(self, version: str, hit: bool) -> None:
        self.inc("rollout_cache_lookups", version=version, outcome="hit" if hit else "miss")


class MeteredStats(RouterStats):
    """RouterStats that also records each call as a metric: the gates and Prometheus count the
    same calls at the same place (including shadow copies, which the gates count too)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def record(self, version: str, ok: bool, latency_ms: float) -> None:
        super().record(version, ok, latency_ms)
        self._metrics.version_call(version, ok, latency_ms)


class RouterGauges:
    """The router's periodic metrics (about once a second, off the request path): the live
    weights, availability, breaker states, shadow outcomes and agreement, and score drift.

    Shadow counts live in the Dispatcher as running totals; this sends the difference since
    the last update, so the counters count each copy once."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._shadow_seen: dict[str, tuple[int, int, int, float]] = {}

    def update(
        self,
        *,
        versions: Iterable[str],
        weights: Mapping[str, float],
        stable: str | None,
        available: Iterable[str],
        breakers: Mapping[str, str],
        shadow: Mapping[str, Any],
        psi: Mapping[str, float],
    ) -> None:
        m = self._metrics
        up = set(available)
        for version in versions:
            m.set(
                "rollout_traffic_weight_percent", float(weights.get(version, 0.0)), version=version
            )
            m.set("rollout_version_available", 1.0 if version in up else 0.0, version=version)
            m.set("rollout_stable_version", 1.0 if version == stable else 0.0, version=version)
        for version, state in breakers.items():
            m.set(
                "rollout_breaker_state", BREAKER_STATE_VALUES.get(str(state), 0.0), version=version
            )
        for version, value in psi.items():
            m.set("rollout_score_psi", float(value), version=version)
        for version, st in shadow.items():
            sums = getattr(st, "sums", {}) or {}
            key = "top_k_overlap" if "top_k_overlap" in sums else next(iter(sums), None)
            total = (st.completed, st.failed, st.dropped, float(sums.get(key, 0.0)) if key else 0.0)
            before = self._shadow_seen.get(version, (0, 0, 0, 0.0))
            compared, failed, dropped = (total[i] - before[i] for i in range(3))
            for outcome, n in (("compared", compared), ("failed", failed), ("dropped", dropped)):
                if n > 0:
                    m.inc("rollout_shadow_requests", n, version=version, outcome=outcome)
            if compared > 0 and key is not None:
                m.set(
                    "rollout_shadow_agreement", (total[3] - before[3]) / compared, version=version
                )
            self._shadow_seen[version] = total


class ControllerMetrics:
    """The rollout controller's metrics: phase, step and candidate weight (set on every
    change), the load stage's replay (re-sent every second), and per event: transitions,
    automatic rollbacks with their time to rollback, and the gates that failed."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._load_candidate: str | None = None  # the last load stage's, zeroed once it is gone

    def state(self, *, phase: str, step_index: int, candidate: str | None, weight: float) -> None:
        m = self._metrics
        for p in PHASES:
            m.set("rollout_phase", 1.0 if p == phase else 0.0, phase=p)
        m.set("rollout_step_index", float(step_index))
        if candidate is not None:
            m.set("rollout_candidate_weight_percent", float(weight), version=candidate)

    def load_stage(self, status: Mapping[str, Any] | None) -> None:
        """The load stage gauges from its status block (the controller's `_load_status()`,
        `LoadRun.status()`: phase, candidate, target_rps, current_rps, achieved_rps, p99_ms),
        or None when the rollout has no load stage (then the last candidate's gauges go to 0).
        Running is every phase but the finished ones (passed, failed, stopped (...))."""
        m = self._metrics
        if status is None:
            if self._load_candidate is not None:
                m.set("rollout_load_stage_running", 0.0, version=self._load_candidate)
                for rate in LOAD_STAGE_RATES:
                    m.set("rollout_load_stage_rps", 0.0, version=self._load_candidate, rate=rate)
            return
        version = str(status["candidate"])
        if self._load_candidate not in (None, version):  # a new candidate: the old one is done
            self.load_stage(None)
        self._load_candidate = version
        phase = str(status.get("phase", ""))
        running = phase not in ("passed", "failed") and not phase.startswith("stopped")
        m.set("rollout_load_stage_running", 1.0 if running else 0.0, version=version)
        rates = {
            "target": status.get("target_rps"),
            "scheduled": status.get("current_rps") if running else 0.0,
            "achieved": status.get("achieved_rps") if running else 0.0,
        }
        for rate, value in rates.items():
            m.set("rollout_load_stage_rps", float(value or 0.0), version=version, rate=rate)
        if status.get("p99_ms") is not None:
            m.set("rollout_load_stage_p99_ms", float(status["p99_ms"]), version=version)

    def events(
        self, events: Iterable[Mapping[str, Any]], *, candidate: str, step_started_at: float
    ) -> None:
        """Events as `Event.to_dict()` gives them; `step_started_at` is when the step the
        events left began (for a rollback: when the candidate got the weight it lost)."""
        m = self._metrics
        for event in events:
            to_phase = str(event["to_phase"])
            if event["from_phase"] != to_phase:
                m.inc("rollout_transitions", phase=to_phase)
            if to_phase == "rolled_back" and event["from_phase"] != to_phase:
                m.inc("rollout_rollbacks", version=candidate)
                m.observe("rollout_time_to_rollback_s",
                          max(0.0, float(event["time_s"]) - step_started_at), version=candidate)  # fmt: skip
                for gate, reading in (event.get("gates") or {}).items():
                    if isinstance(reading, Mapping) and reading.get("status") == "failed":
                        m.inc("rollout_gate_failures", gate=str(gate))
