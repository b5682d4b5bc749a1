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
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from ray import serve

from app import ray_compat
from app.constants import (
    DEFAULT_TICK_INTERVAL_S,
    GAUGE_INTERVAL_S,
    KV_TIMEOUT_S,
    LONG_POLL_TIMEOUT_S,
    MAX_SHADOW_REPORTS,
    PROMETHEUS_MIN_INTERVAL_S,
    RATE_WINDOW_S,
)
from app.errors import CommandRefused, Unavailable
from app.messages import (
    FeedbackHint,
    ServedAnswer,
    ShadowDelta,
    StatsReport,
    TrafficOverride,
)
from app.observability.access_log import flush_serve_logs
from app.observability.metrics import ControllerMetrics, Metrics
from app.observability.stats import StatsWindow
from app.rollout import (
    OPERATOR_COMMANDS,
    START_COMMAND,
    Command,
    GateVerdict,
    Observation,
    Phase,
    RolloutState,
    apply_command,
    command_path,
    rollout_override,
    step,
    traffic_key,
)
from app.rollout.feedback import (
    FeedbackDesk,
)
from app.rollout.plan import ControllerUserConfig
from app.rollout.prometheus import PrometheusUnavailable, query_scalar
from app.rollout.timeline import Timeline
from deployments.store import GcsStore, RolloutStore

logger = logging.getLogger("ray.serve")

OUTCOMES_SUFFIX = "/outcomes"  # the outcome book's key: the state's key + this


class PrometheusReading(NamedTuple):
    """The Prometheus gate's last reading; `available` False: not queried or unreachable."""

    value: float | None
    available: bool
    reason: str
    errors: int = 0  # queries in a row that gave no reading


class ControllerCore:
    """Everything the RolloutController does, with its store, clock and Serve lookups passed in,
    so unit tests drive it without Ray (`tests/unit/test_controller.py`)."""

    def __init__(
        self,
        model: str,
        versions: list[str] | None,
        *,
        app_name: str,
        store: RolloutStore,
        deployed_versions: Callable[[], list[str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.model = model
        # None (version_apps): versions are applications of their own, checked by name in Serve.
        self.versions = None if versions is None else list(versions)
        self.store = store
        self.clock = clock
        self._deployed = deployed_versions
        self.kv_key = f"{app_name}/{model}/rollout-state"
        self.window = StatsWindow()
        self.metrics = ControllerMetrics(Metrics(model))
        self.timeline = Timeline()  # per-second curves for `rollout report`
        # (arrival time, shadow version, answers compared, sum of their top-k overlap)
        self.shadow_reports: deque[tuple[float, str, int, float]] = deque(maxlen=MAX_SHADOW_REPORTS)
        self.prometheus_url: str | None = None
        self.prometheus = PrometheusReading(None, False, "no Prometheus configured")
        self._prometheus_at = 0.0  # monotonic time of the last query
        self._prometheus_task: asyncio.Task[None] | None = None
        self._gauges_at = 0.0  # when the gauges were last re-sent
        self.tick_interval_s = DEFAULT_TICK_INTERVAL_S
        self.state: RolloutState | None = None
        # Digest of the plan in the current declaration: a rollout starts when it changes (a
        # replica restart re-applies the same declaration and must not restart the rollout).
        self.declared: str | None = None
        self.override: dict[str, Any] | None = None
        self.generation = 0
        self.verdicts: tuple[GateVerdict, ...] = ()
        self.message: str | None = None
        self._published = asyncio.Event()
        # What routers were last told (traffic_key of the published state): traffic is published
        # only once the state that asks for it is stored, so a restart never undoes it.
        self._published_key: tuple[Any, ...] | None = None
        # Ticks, commands and declarations change the state one at a time (each awaits storage).
        self._lock = asyncio.Lock()
        self._ticker: asyncio.Task | None = None
        self._dirty = False  # the state in memory is newer than the stored one
        # Feedback: who answered each request id (pushed by routers), and the outcomes per
        # version since the current rollout started (persisted beside the state).
        self.desk = FeedbackDesk(self.versions)
        now = self.clock()
        saved_book = self.store.get(self.kv_key + OUTCOMES_SUFFIX)
        if saved_book is not None:
            try:
                self.desk.restore(json.loads(saved_book))
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("RolloutController: ignoring unreadable saved outcomes: %s", exc)
        saved = self.store.get(self.kv_key)
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
                self._published_key = traffic_key(state)  # stored, and so already published
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
        would race the tick; on the event loop, under the state lock, it runs between ticks."""
        async with self._lock:
            await self._reconfigure(user_config)

    async def _reconfigure(self, user_config: dict[str, Any]) -> None:
        try:
            declared = ControllerUserConfig.model_validate(user_config)
            declared.check_versions(self._deployed_versions() if declared.plan else [])
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            self.message = f"refused the declared plan: {exc}"
            logger.error("RolloutController: %s", self.message)
            return
        plan = declared.plan
        self.tick_interval_s = declared.tick_interval_s
        self.prometheus_url = declared.prometheus_url
        self.desk.reconfigure(declared.feedback, self.clock())
        if plan is None:
            # No plan declared: routers follow their own declared traffic again.
            self.declared = None
            if self.state is not None and not self.state.phase.terminal:
                await self._set(apply_command(self.state, Command.ABORT, self.clock(),
                                              reason="plan removed from the config"))  # fmt: skip
            if self.override is not None:
                self.override = None
                self._wake_routers()
            return
        if self.declared != plan.digest():
            self.declared = plan.digest()
            self._reset_outcomes()
            await self._set(RolloutState.start(plan, self.clock(), generation=self.generation + 1))
            self.message = f"started plan {plan.digest()}"
        elif self.override is None and self.state is not None:
            self._publish(self.state)  # a restarted replica resumes steering the same rollout

    def _deployed_versions(self) -> list[str]:
        if self.versions is not None:
            return self.versions
        if self._deployed is None:
            raise ValueError("cannot list the deployed versions")
        return self._deployed()

    # -- the loop ------------------------------------------------------------------------------

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def check_health(self) -> None:
        self._ensure_ticker()

    async def _tick_loop(self) -> None:
        while True:
            try:
                # The query runs beside the tick, never in front of it: a slow Prometheus must
                # not delay a rollback. The tick judges the last reading.
                if self._prometheus_task is None or self._prometheus_task.done():
                    self._prometheus_task = asyncio.get_running_loop().create_task(
                        self._query_prometheus()
                    )
                await self.tick(self.clock())
            except Exception:
                logger.exception("RolloutController: tick failed")
            await asyncio.sleep(self.tick_interval_s)

    async def _query_prometheus(self) -> None:
        """Refresh the Prometheus gate's reading (off the event loop; at most once a second)."""
        state = self.state
        query = state.plan.gates.prometheus_query if state is not None else None
        if (
            query is None or cast(RolloutState, state).phase.terminal
        ):  # query set: state is not None
            return
        if self.prometheus_url is None:
            self.prometheus = PrometheusReading(
                None, False, "no prometheus_url configured", self.prometheus.errors + 1
            )
            return
        if time.monotonic() - self._prometheus_at < PROMETHEUS_MIN_INTERVAL_S:
            return
        self._prometheus_at = time.monotonic()
        try:
            value = await asyncio.to_thread(query_scalar, self.prometheus_url, query)
            self.prometheus = PrometheusReading(value, True, "")
        except PrometheusUnavailable as exc:
            self.prometheus = PrometheusReading(None, False, str(exc), self.prometheus.errors + 1)

    def observation(self, now: float) -> Observation:
        """What the gates judge: everything since the current step's window started."""
        assert self.state is not None  # tick calls this only while a rollout runs
        since = self.state.window_started_at
        candidate = self.state.plan.candidate
        compared = overlap = 0.0
        for at, version, n, total in self.shadow_reports:
            if version == candidate and since <= at <= now:
                compared, overlap = compared + n, overlap + total
        reading = self.prometheus
        outcomes = self.desk.arms((candidate, self.state.plan.stable))
        return Observation(
            stats=self.window.observe(since, now),
            shadow_agreement=overlap / compared if compared else None,
            prometheus_value=reading.value,
            prometheus_available=reading.available,
            prometheus_errors=reading.errors,
            outcomes=outcomes,
        )

    async def tick(self, now: float) -> None:
        async with self._lock:
            await self._tick(now)

    async def _tick(self, now: float) -> None:
        await self._persist()  # retries a failed write, and publishes what it stores
        self._refresh_gauges(now)
        if self.state is None or self.state.phase.terminal:
            self._sample(now, force=False)  # the baseline before, and the aftermath after
            return
        decision = step(self.state, self.observation(now), now)
        self.verdicts = decision.verdicts
        if decision.state != self.state:
            await self._set(decision.state)  # logs the decision's events
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

    async def _set(self, state: RolloutState) -> None:
        """Take `state`: store it, then publish its traffic. Persist before publish: traffic the
        store does not hold could be undone by a restart (a rollback re-run as a canary). If the
        write fails the state stays dirty, and every tick tries again and publishes then."""
        before = self.state
        self.state = state
        self.generation = max(self.generation, state.generation)
        self._dirty = True
        self._observe_change(before, state)
        await self._persist()

    def _refresh_gauges(self, now: float) -> None:
        """Re-send the phase, step and weight gauges about once a second, terminal phases too:
        Ray's metrics agent drops a gauge that is not re-sent within two export intervals."""
        if now - self._gauges_at < GAUGE_INTERVAL_S:
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

    async def _persist(self) -> None:
        """Store what changed (off the event loop, with a timeout), then publish the traffic
        of a stored state that routers have not been told. A failure leaves it dirty."""
        if self.desk.dirty:
            try:
                await self._put(
                    self.kv_key + OUTCOMES_SUFFIX, json.dumps(self.desk.to_dict()).encode()
                )
                self.desk.dirty = False
            except Exception:
                logger.exception("RolloutController: could not persist the outcomes; will retry")
        if self.state is None:
            return
        if self._dirty:
            try:
                await self._put(self.kv_key, json.dumps(self.state.to_dict()).encode())
                self._dirty = False
            except Exception:
                logger.exception(
                    "RolloutController: could not persist the rollout state; will retry"
                )
                return
        if self._published_key != traffic_key(self.state):
            self._publish(self.state)

    async def _put(self, key: str, value: bytes) -> None:
        # The store blocks (a GCS RPC): in a thread, bounded, so a slow or restarting GCS
        # never freezes the long-polls, stats reports and commands on this loop.
        await asyncio.wait_for(asyncio.to_thread(self.store.put, key, value), KV_TIMEOUT_S)

    def _publish(self, state: RolloutState) -> None:
        self._published_key = traffic_key(state)
        self.generation += 1
        self.override = {"generation": self.generation, **rollout_override(state)}
        self._wake_routers()

    def _wake_routers(self) -> None:
        event, self._published = self._published, asyncio.Event()
        event.set()  # wake every router waiting in wait_for_traffic

    # -- what routers call -----------------------------------------------------------------------

    async def report(
        self,
        stats: StatsReport,
        shadow: dict[str, ShadowDelta] | None = None,
        served: list[ServedAnswer] | None = None,
    ) -> None:
        """Per-version counts since the router's last report, shadow comparisons and the
        request ids answered (for feedback). Tuples from older routers unpack the same."""
        self._ensure_ticker()
        now = self.clock()
        self.desk.record_served(served or (), now)
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

    async def wait_for_traffic(
        self, known_generation: int, timeout_s: float = LONG_POLL_TIMEOUT_S
    ) -> TrafficOverride | None:
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
        return cast("TrafficOverride | None", self.override)

    async def feedback(
        self, items: list[dict[str, Any]], hints: dict[str, FeedbackHint]
    ) -> list[dict[str, Any]]:
        """Count outcomes for answered requests (FeedbackDesk.count): one result per item."""
        return self.desk.count(items, hints, self.clock())

    def _reset_outcomes(self) -> None:
        """A new rollout is a new experiment: outcomes (and verdicts) from before it do not
        count."""
        self.desk.reset(self.clock())
        self.verdicts = ()

    # -- operators ---------------------------------------------------------------------------------

    async def command(self, name: str) -> dict[str, Any]:
        """An operator command (`Command` values: start, promote, promote_full, pause, resume,
        abort; the admin API's dashed spelling is accepted). CommandRefused (409): not now;
        Unavailable (503): accepted in memory but not stored, so not answered as done."""
        async with self._lock:
            await self._command(name)
            if self._dirty:  # in memory, not stored: not yet applied to traffic either
                raise Unavailable(
                    f"{command_path(name.replace('-', '_'))} is not stored yet (the rollout store is "
                    "unavailable): it is applied once a write succeeds; check `rollout status`",
                    retry_after_s=1.0,
                )
            return self._status()

    async def _command(self, name: str) -> None:
        now = self.clock()
        name = name.replace("-", "_")
        if name not in OPERATOR_COMMANDS:
            raise CommandRefused(f"unknown command {command_path(name)!r}")
        if name == START_COMMAND:
            if self.state is None:
                raise CommandRefused(
                    "no plan is declared: add one to the RolloutController's user_config"
                )
            if not self.state.phase.terminal:
                raise CommandRefused(f"a rollout is already {self.state.phase.value}")
            self._reset_outcomes()
            await self._set(
                RolloutState.start(self.state.plan, now, generation=self.generation + 1)
            )
        else:
            if self.state is None:
                raise CommandRefused("no rollout: no plan is declared")
            try:
                changed = apply_command(self.state, Command(name), now,
                                        reason=f"rollout {command_path(name)}")  # fmt: skip
            except ValueError as exc:  # the state machine's refusal, with its reason
                raise CommandRefused(str(exc)) from None
            await self._set(changed)
        await self._tick(now)

    async def status(self) -> dict[str, Any]:
        # Async so it runs on the event loop: the stats window is not thread-safe.
        return self._status()

    def _status(self) -> dict[str, Any]:
        now = self.clock()
        state = self.state
        versions = {}
        if state is not None:
            stats = self.window.observe(state.window_started_at, now)
            rates = self.window.rates(RATE_WINDOW_S, now)
            known = (
                self.versions
                if self.versions is not None
                else sorted({state.plan.stable, state.plan.candidate} | set(stats))
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
            "outcomes": self.desk.book.summary(),
            "feedback": self.desk.status(),
            "versions": versions,
            "plan_digest": state.plan.digest() if state else None,
            "updated_at": now,
            "message": self.message,
            "prometheus": None
            if self.prometheus_url is None
            else {
                "url": self.prometheus_url,
                "value": self.prometheus.value,
                "available": self.prometheus.available,
                "reason": self.prometheus.reason or None,
            },
        }

    async def history(self) -> dict[str, Any]:
        events = self.state.history if self.state else ()
        # The curves of this rollout: from 30 s before its first event (the baseline) to now.
        start = events[0].time_s - 30.0 if events else float("inf")
        return {"events": [e.to_dict() for e in events], "timeline": self.timeline.since(start)}


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class RolloutController(ControllerCore):
    """The Serve deployment: ControllerCore with its state in Ray's GCS and the deployed
    versions (version_apps mode) read from Serve."""

    def __init__(self, model: str, versions: list[str] | None) -> None:
        super().__init__(
            model,
            versions,
            app_name=serve.get_replica_context().app_name,
            store=GcsStore(),
            deployed_versions=self._serve_versions,
        )

    def _serve_versions(self) -> list[str]:
        prefix = f"{self.model}-"
        apps = ray_compat.serve_details().get("applications", {})
        return [name[len(prefix) :] for name in apps if name.startswith(prefix)]
