"""`RolloutController`: one replica per app that runs the declared rollout plan.

Every `tick_interval_s` it merges the per-version stats that router replicas push, ticks the
pure state machine (`app.rollout.step`), persists the state in Ray's GCS key-value store when
it changes, and publishes the traffic it asks for to routers waiting on `wait_for_traffic`
(long-poll: a router learns of a change as soon as it is published). Routers never wait for
the controller on the request path, and keep their last traffic when it is gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from typing import Any

from ray import serve

from app.errors import ServingError, http_status
from app.observability.access_log import flush_serve_logs
from app.observability.metrics import ControllerMetrics, Metrics
from app.observability.stats import StatsWindow
from app.rollout import (
    Command,
    Observation,
    Phase,
    RolloutPlan,
    RolloutState,
    apply_command,
    step,
)
from app.rollout.abtest import OutcomeKind
from app.rollout.feedback import (
    RANDOMISED_DECISIONS,
    FeedbackItem,
    FeedbackSettings,
    OutcomeBook,
    RequestLedger,
)
from app.rollout.prometheus import PrometheusUnavailable, query_scalar
from app.rollout.timeline import Timeline

logger = logging.getLogger("ray.serve")

KV_NAMESPACE = "ray-rollout"


def _kv_get(key: str) -> bytes | None:
    from ray.experimental.internal_kv import _internal_kv_get

    return _internal_kv_get(key, namespace=KV_NAMESPACE)


def _kv_put(key: str, value: bytes) -> None:
    from ray.experimental.internal_kv import _internal_kv_put

    _internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)


def _traffic(state: RolloutState) -> tuple:
    return (tuple(sorted(state.weights.items())), state.stable_version, state.shadow_percent)


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class RolloutController:
    def __init__(self, model: str, versions: list[str] | None) -> None:
        self.model = model
        # None (version_apps): versions are applications of their own, checked by name in Serve.
        self.versions = None if versions is None else list(versions)
        app_name = serve.get_replica_context().app_name
        self.kv_key = f"{app_name}/{model}/rollout-state"
        self.window = StatsWindow()
        self.metrics = ControllerMetrics(Metrics(model))
        self.timeline = Timeline()  # per-second curves for `rollout report`
        # (arrival time, shadow version, answers compared, sum of their top-k overlap)
        self.shadow_reports: deque[tuple[float, str, int, float]] = deque(maxlen=100_000)
        self.prometheus_url: str | None = None
        self.prometheus: tuple[float | None, bool, str] = (None, False, "no Prometheus configured")
        self.tick_interval_s = 0.25
        self.state: RolloutState | None = None
        # Digest of the plan in the current declaration: a rollout starts when it changes (a
        # replica restart re-applies the same declaration and must not restart the rollout).
        self.declared: str | None = None
        self.override: dict[str, Any] | None = None
        self.generation = 0
        self.verdicts: tuple = ()
        self.message: str | None = None
        self._published = asyncio.Event()
        self._ticker: asyncio.Task | None = None
        self._dirty = False  # the state in memory is newer than the stored one
        # Feedback: who answered each request id (pushed by routers), and the outcomes per
        # version since the current rollout started (persisted beside the state).
        self.feedback_settings = FeedbackSettings()
        self.ledger = RequestLedger(self.feedback_settings.max_request_ids, self.feedback_settings.ttl_s)
        self.book = OutcomeBook()
        self.feedback_counts = {"counted": 0, "duplicate": 0, "excluded": 0, "unknown": 0,
                                "expired": 0, "invalid": 0}  # fmt: skip
        self.experiment_started_at = 0.0  # answers from before it are not counted
        self._book_dirty = False
        now = time.time()
        saved_book = _kv_get(self.kv_key + "/outcomes")
        if saved_book is not None:
            try:
                saved_outcomes = json.loads(saved_book)
                self.book = OutcomeBook.from_dict(saved_outcomes["book"])
                self.experiment_started_at = float(saved_outcomes["started_at"])
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("RolloutController: ignoring unreadable saved outcomes: %s", exc)
        saved = _kv_get(self.kv_key)
        if saved is not None:
            try:
                state = RolloutState.from_dict(json.loads(saved))
                if not state.phase.terminal:
                    # The stats window lived in the old replica's memory: re-run the current
                    # step's hold from now, on fresh evidence, rather than judge a sliver.
                    paused_at = now if state.paused_at is not None else None
                    state = dataclasses.replace(state, step_started_at=now, hold_excluded_s=0.0,
                                                paused_at=paused_at)  # fmt: skip
                self.state = state
                self.generation = self.state.generation
                self.declared = self.state.plan.digest()
                logger.info("RolloutController: resumed %s at step %d (%s, candidate %.1f%%)",
                            self.state.plan.candidate, self.state.step_index,
                            self.state.phase.value, self.state.candidate_weight)  # fmt: skip
                flush_serve_logs()
            except (ValueError, KeyError) as exc:
                logger.error("RolloutController: ignoring unreadable saved state: %s", exc)

    # -- declared state --------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new declaration. A changed plan starts a new rollout generation; the same plan
        (a restart, or an unrelated change) keeps the live one. A bad declaration is refused
        (and shown in status) and the live rollout goes on: it never touches traffic.

        Async on purpose: Ray Serve 2.60 runs a sync `reconfigure` in a worker thread, where it
        would race the tick; on the event loop (no await inside) it runs between ticks."""
        try:
            tick, plan = self._parse(user_config)
        except ValueError as exc:
            self.message = f"refused the declared plan: {exc}"
            logger.error("RolloutController: %s", self.message)
            return
        self.tick_interval_s = tick
        self.prometheus_url = user_config.get("prometheus_url") or None
        self.feedback_settings = FeedbackSettings.model_validate(user_config.get("feedback") or {})
        self.ledger.reconfigure(self.feedback_settings.max_request_ids, self.feedback_settings.ttl_s,
                                time.time())  # fmt: skip
        if plan is None:
            # No plan declared: routers follow their own declared traffic again.
            self.declared = None
            if self.state is not None and not self.state.phase.terminal:
                self._set(apply_command(self.state, Command.ABORT, time.time(),
                                        reason="plan removed from the config"))  # fmt: skip
            if self.override is not None:
                self.override = None
                self._wake_routers()
            return
        if self.declared != plan.digest():
            self.declared = plan.digest()
            self._reset_outcomes()
            self._set(RolloutState.start(plan, time.time(), generation=self.generation + 1))
            self.message = f"started plan {plan.digest()}"
        elif self.override is None and self.state is not None:
            self._publish(self.state)  # a restarted replica resumes steering the same rollout

    def _parse(self, user_config: dict[str, Any]) -> tuple[float, RolloutPlan | None]:
        unknown = sorted(set(user_config) - {"plan", "tick_interval_s", "prometheus_url", "feedback"})
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown}; expected plan, tick_interval_s, prometheus_url, feedback"
            )
        FeedbackSettings.model_validate(user_config.get("feedback") or {})
        tick = float(user_config.get("tick_interval_s", 0.25))
        if not 0.05 <= tick <= 10:
            raise ValueError(f"tick_interval_s ({tick}) must be between 0.05 and 10 seconds")
        raw = user_config.get("plan")
        if raw is None:
            return tick, None
        plan = RolloutPlan.model_validate(raw)  # pydantic's ValidationError is a ValueError
        unknown = sorted({plan.candidate, plan.stable} - set(self._deployed_versions()))
        if unknown:
            raise ValueError(f"plan names versions that are not deployed: {unknown}")
        return tick, plan

    def _deployed_versions(self) -> list[str]:
        if self.versions is not None:
            return self.versions
        from ray.serve.context import _get_global_client

        prefix = f"{self.model}-"
        apps = _get_global_client().get_serve_details().get("applications", {})
        return [name[len(prefix):] for name in apps if name.startswith(prefix)]

    # -- the loop ------------------------------------------------------------------------------

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def check_health(self) -> None:
        self._ensure_ticker()

    async def _tick_loop(self) -> None:
        while True:
            try:
                await self._query_prometheus()
                self.tick(time.time())
            except Exception:
                logger.exception("RolloutController: tick failed")
            await asyncio.sleep(self.tick_interval_s)

    async def _query_prometheus(self) -> None:
        """Refresh the Prometheus gate's reading (off the event loop; at most once a second)."""
        state = self.state
        query = state.plan.gates.prometheus_query if state is not None else None
        if query is None or state.phase.terminal:
            return
        if self.prometheus_url is None:
            self.prometheus = (None, False, "no prometheus_url configured")
            return
        last = getattr(self, "_prometheus_at", 0.0)
        if time.monotonic() - last < 1.0:
            return
        self._prometheus_at = time.monotonic()
        try:
            value = await asyncio.to_thread(query_scalar, self.prometheus_url, query)
            self.prometheus = (value, True, "")
        except PrometheusUnavailable as exc:
            self.prometheus = (None, False, str(exc))

    def observation(self, now: float) -> Observation:
        """What the gates judge: everything since the current step's window started."""
        since = self.state.window_started_at
        candidate = self.state.plan.candidate
        compared = overlap = 0.0
        for at, version, n, total in self.shadow_reports:
            if version == candidate and since <= at <= now:
                compared, overlap = compared + n, overlap + total
        value, available, _ = self.prometheus
        versions = (candidate, self.state.plan.stable)
        outcomes = {
            outcome: {v: self.book.arm(outcome, v) for v in versions} for outcome in self.book.kinds
        }
        return Observation(
            stats=self.window.observe(since, now),
            shadow_agreement=overlap / compared if compared else None,
            prometheus_value=value,
            prometheus_available=available,
            outcomes=outcomes,
        )

    def tick(self, now: float) -> None:
        self._persist()
        self._refresh_gauges(now)
        if self.state is None or self.state.phase.terminal:
            self._sample(now, force=False)  # the baseline before, and the aftermath after
            return
        decision = step(self.state, self.observation(now), now)
        self.verdicts = decision.verdicts
        if decision.state != self.state:
            self._set(decision.state)  # logs the decision's events
        self._sample(now, force=bool(decision.events))

    def _sample(self, now: float, *, force: bool) -> None:
        state = self.state
        if state is None:
            self.timeline.sample(now, phase=Phase.IDLE.value, step_index=0, weights={}, force=force)
            return
        live = not state.phase.terminal
        self.timeline.sample(now, phase=state.phase.value, step_index=state.step_index,
                             weights=state.weights, force=force,
                             verdicts=[{"gate": v.gate, "status": v.status.value}
                                       for v in self.verdicts] if live else [])  # fmt: skip

    def _set(self, state: RolloutState) -> None:
        before = self.state
        self.state = state
        self.generation = max(self.generation, state.generation)
        if before is None or _traffic(before) != _traffic(state):
            self._publish(state)  # first: traffic must not wait on storage
        self._dirty = True
        self._persist()
        self._observe_change(before, state)

    def _refresh_gauges(self, now: float) -> None:
        """Re-send the phase, step and weight gauges about once a second, terminal phases too:
        Ray's metrics agent drops a gauge that is not re-sent within two export intervals."""
        if now - getattr(self, "_gauges_at", 0.0) < 1.0:
            return
        self._gauges_at = now
        state = self.state
        try:
            if state is None:  # no plan yet: idle (so a later phase shows as a change from 0)
                self.metrics.state(phase=Phase.IDLE.value, step_index=0, candidate=None, weight=0.0)
                return
            self.metrics.state(phase=state.phase.value, step_index=state.step_index,
                               candidate=state.plan.candidate, weight=state.candidate_weight)  # fmt: skip
        except Exception:
            logger.exception("RolloutController: recording rollout gauges failed")

    def _observe_change(self, before: RolloutState | None, state: RolloutState) -> None:
        """Metrics and one structured log record per new history event (ticks and commands)."""
        try:
            seen = {id(e) for e in before.history} if before is not None else set()
            events = [e.to_dict() for e in state.history if id(e) not in seen]
            candidate = state.plan.candidate
            self.metrics.state(phase=state.phase.value, step_index=state.step_index,
                               candidate=candidate, weight=state.candidate_weight)  # fmt: skip
            started = before.step_started_at if before is not None else state.step_started_at
            self.metrics.events(events, candidate=candidate, step_started_at=started)
            for event in events:
                logger.info("RolloutController: %s -> %s at step %d, weight %.1f: %s",
                            event["from_phase"], event["to_phase"], event["step_index"],
                            event["weight"], event["reason"],
                            extra={"rollout_event": event, "model": self.model,
                                   "candidate": candidate})  # fmt: skip
            if events:
                flush_serve_logs()
        except Exception:  # observability must never break the controller
            logger.exception("RolloutController: recording rollout metrics failed")

    def _persist(self) -> None:
        """Store the state; on failure keep it dirty and let the next tick try again."""
        if self._book_dirty:
            try:
                saved = {"started_at": self.experiment_started_at, "book": self.book.to_dict()}
                _kv_put(self.kv_key + "/outcomes", json.dumps(saved).encode())
                self._book_dirty = False
            except Exception:
                logger.exception("RolloutController: could not persist the outcomes; will retry")
        if not self._dirty or self.state is None:
            return
        try:
            _kv_put(self.kv_key, json.dumps(self.state.to_dict()).encode())
            self._dirty = False
        except Exception:
            logger.exception("RolloutController: could not persist the rollout state; will retry")

    def _publish(self, state: RolloutState) -> None:
        shadow: Any = "declared"
        if state.plan.strategy == "blue_green":
            percent = state.shadow_percent
            shadow = {"version": state.plan.candidate, "percent": percent} if percent > 0 else None
        self.generation += 1
        self.override = {
            "generation": self.generation,
            "weights": state.weights,
            "stable": state.stable_version,
            "shadow": shadow,
        }
        self._wake_routers()

    def _wake_routers(self) -> None:
        event, self._published = self._published, asyncio.Event()
        event.set()  # wake every router waiting in wait_for_traffic

    # -- what routers call -----------------------------------------------------------------------

    async def report(
        self,
        stats: dict[str, dict[str, Any]],
        shadow: dict[str, dict[str, float]] | None = None,
        served: list[tuple[str, str, float]] | None = None,
    ) -> None:
        """Per-version counts since the router's last report, shadow comparisons
        (`{version: {"compared": n, "top_k_overlap_sum": x}}`) and the request ids answered
        (`[(request_id, version, answered_at, routing decision)]`, for feedback)."""
        self._ensure_ticker()
        now = time.time()
        for request_id, version, answered_at, *decision in served or ():
            self.ledger.record(str(request_id), str(version), float(answered_at), now,
                               decision[0] if decision else None)  # fmt: skip
        try:
            if stats:
                self.window.add(stats, now)
                self.timeline.add(stats)  # validated by the line above
            for version, delta in (shadow or {}).items():
                n, total = int(delta["compared"]), float(delta["top_k_overlap_sum"])
                if n > 0:
                    self.shadow_reports.append((now, str(version), n, total))
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("RolloutController: dropped a malformed stats report: %s", exc)

    async def wait_for_traffic(self, known_generation: int, timeout_s: float = 10.0) -> dict | None:
        """Long-poll: return the traffic override as soon as its generation differs from
        `known_generation` (the router's; 0 for none), else after `timeout_s`. None: no
        rollout steers traffic, routers follow their declared user_config."""
        self._ensure_ticker()
        current = self.override["generation"] if self.override else 0
        if current == known_generation:  # nothing new for this router: wait for a publish
            try:
                await asyncio.wait_for(self._published.wait(), timeout=timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.override

    async def feedback(
        self, items: list[dict[str, Any]], hints: dict[str, tuple[str, float]]
    ) -> list[dict[str, Any]]:
        """Count outcomes for answered requests. `items` are parsed FeedbackItem dicts;
        `hints` what the forwarding router's own ledger knows of an id, (version, answered
        at, decision), for feedback that arrives before that router's push. One result per
        item: counted, duplicate, excluded (a pinned or fallback answer, or one from before
        the current experiment: accepted, not in an A/B arm), or an error with its HTTP
        status (404 unknown, 410 expired, 400 wrong kind or too many outcome names)."""
        now = time.time()
        results = []
        for raw in items:
            item = FeedbackItem(str(raw["request_id"]), str(raw["outcome"]), float(raw["value"]),
                                OutcomeKind(raw["kind"]))  # fmt: skip
            result: dict[str, Any] = {"request_id": item.request_id, "outcome": item.outcome}
            try:
                hint = hints.get(item.request_id)
                if hint is not None and (self.versions is None or hint[0] in self.versions):
                    self.ledger.record(item.request_id, str(hint[0]), float(hint[1]), now,
                                       hint[2] if len(hint) > 2 else None)  # fmt: skip
                    if len(hint) > 3 and item.request_id in self.ledger:
                        self.ledger.mark_counted(item.request_id, [str(o) for o in hint[3]])
                version = self.ledger.lookup(item.request_id, now)
                self.book.check_kind(item, self.feedback_settings.max_outcomes)
                result["version"] = version
                answered_at, decision = self.ledger.answered(item.request_id)
                excluded = None
                if decision is not None and decision not in RANDOMISED_DECISIONS:
                    excluded = f"a {decision} answer is not part of the traffic split's A/B arms"
                elif answered_at < self.experiment_started_at:
                    excluded = "answered before the current rollout (experiment) started"
                if excluded is not None:
                    result.update(counted=False, excluded=excluded)
                    self.feedback_counts["excluded"] += 1
                elif self.ledger.first_count(item.request_id, item.outcome):
                    self.book.add(item, version)
                    self._book_dirty = True
                    result["counted"] = True
                    self.feedback_counts["counted"] += 1
                else:
                    result.update(counted=False, duplicate=True)
                    self.feedback_counts["duplicate"] += 1
            except ServingError as exc:
                status = http_status(exc)
                result.update(counted=False, status=status, error=exc.message)
                key = {404: "unknown", 410: "expired"}.get(status, "invalid")
                self.feedback_counts[key] += 1
            results.append(result)
        return results

    def _reset_outcomes(self) -> None:
        """A new rollout is a new experiment: outcomes (and verdicts) from before it do not
        count."""
        self.book.reset()
        self._book_dirty = True
        self.verdicts = ()
        self.experiment_started_at = time.time()

    # -- operators ---------------------------------------------------------------------------------

    async def command(self, name: str) -> dict[str, Any]:
        """start | promote | promote-full | pause | resume | abort. ValueError: not now."""
        now = time.time()
        if name == "start":
            if self.state is None:
                raise ValueError("no plan is declared: add one to the RolloutController's user_config")
            if not self.state.phase.terminal:
                raise ValueError(f"a rollout is already {self.state.phase.value}")
            self._reset_outcomes()
            self._set(RolloutState.start(self.state.plan, now, generation=self.generation + 1))
        else:
            if self.state is None:
                raise ValueError("no rollout: no plan is declared")
            command = {"promote": Command.PROMOTE, "promote-full": Command.PROMOTE_FULL,
                       "pause": Command.PAUSE, "resume": Command.RESUME, "abort": Command.ABORT}.get(name)  # fmt: skip
            if command is None:
                raise ValueError(f"unknown command {name!r}")
            self._set(apply_command(self.state, command, now, reason=f"rollout {name}"))
        self.tick(now)
        return self._status()

    async def status(self) -> dict[str, Any]:
        # Async so it runs on the event loop: the stats window is not thread-safe.
        return self._status()

    def _status(self) -> dict[str, Any]:
        now = time.time()
        state = self.state
        versions = {}
        if state is not None:
            stats = self.window.observe(state.window_started_at, now)
            rates = self.window.rates(10.0, now)
            known = self.versions if self.versions is not None else sorted(
                {state.plan.stable, state.plan.candidate} | set(stats)
            )
            for v in known:
                s = stats.get(v)
                requests = s.requests if s else 0
                errors = s.errors if s else 0
                versions[v] = {
                    "requests": requests, "errors": errors,
                    "error_rate": errors / requests if requests else 0.0,
                    "rps": round(rates.get(v, 0.0), 2),
                    "p50_ms": s.p50_ms if s else None, "p99_ms": s.p99_ms if s else None,
                }  # fmt: skip
        steps = state.steps if state else []
        current = state.current_step if state else None
        return {
            "model": self.model,
            "phase": state.phase.value if state else Phase.IDLE.value,
            "strategy": state.plan.strategy if state else None,
            "candidate": state.plan.candidate if state else None,
            "stable": state.stable_version if state else None,
            "step_index": state.step_index if state else 0,
            "steps_total": len(steps),
            "step": current.describe() if current is not None else "done",
            "weights": state.weights if state else {},
            "time_in_step_s": round(state.elapsed_s(now), 2) if state else 0.0,
            "generation": self.override["generation"] if self.override else 0,
            "verdicts": [{"gate": v.gate, **v.reading()} for v in self.verdicts],
            "outcomes": self.book.summary(),
            "feedback": {**self.feedback_counts, "request_ids_remembered": len(self.ledger),
                         "ttl_s": self.feedback_settings.ttl_s},  # fmt: skip
            "versions": versions,
            "plan_digest": state.plan.digest() if state else None,
            "updated_at": now,
            "message": self.message,
            "prometheus": None if self.prometheus_url is None else {
                "url": self.prometheus_url, "value": self.prometheus[0],
                "available": self.prometheus[1], "reason": self.prometheus[2] or None,
            },
        }

    async def history(self) -> dict[str, Any]:
        events = self.state.history if self.state else ()
        # The curves of this rollout: from 30 s before its first event (the baseline) to now.
        start = events[0].time_s - 30.0 if events else float("inf")
        return {"events": [e.to_dict() for e in events], "timeline": self.timeline.since(start)}

