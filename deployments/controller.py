"""`RolloutController`: one replica per app that runs the declared rollout plan.

Every `tick_interval_s` it merges the per-version stats that router replicas push, ticks the
pure state machine (`app.rollout.step`), persists the state in Ray's GCS key-value store when
it changes, and publishes the traffic it asks for to routers waiting on `wait_for_traffic`
(long-poll: a router learns of a change as soon as it is published). Routers never wait for
the controller on the request path, and keep their last traffic when it is gone.

Single-headed: a replica claims the controller epoch (`deployments.store.Fence`) when it
starts and checks it before it writes; a replica that finds a newer claim stops (`Fenced`,
503, to everything). Rollout timing runs on a steady clock (`ControllerCore.now`) and is
persisted as elapsed seconds, refreshed every `CHECKPOINT_S`, so a restart resumes a hold
where it was and a step of the wall clock moves nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple, cast

from ray import serve

from app import ray_compat
from app.config import version_app_name
from app.config.waves import WavesDocumentError, parse_waves_document
from app.constants import (
    DEFAULT_TICK_INTERVAL_S,
    GAUGE_INTERVAL_S,
    GENERATION_EPOCH_STRIDE,
    KV_TIMEOUT_S,
    LONG_POLL_TIMEOUT_S,
    MAX_SHADOW_REPORTS,
    OUTCOMES_WRITE_INTERVAL_S,
    PROMETHEUS_MIN_INTERVAL_S,
    RATE_WINDOW_S,
)
from app.errors import CommandRefused, Fenced, InvalidInput, Unavailable
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
    MAX_REQUEST_ID_CHARS,
    FeedbackDesk,
)
from app.rollout.gates import LIFT_GATES
from app.rollout.loadstage import (
    REPLAY_GATE,
    LoadRecorder,
    LoadResult,
    send_offsets,
    stage_failure,
)
from app.rollout.notify import Notifier
from app.rollout.plan import ControllerUserConfig, LoadStage, LoadTest, RolloutPlan
from app.rollout.prometheus import PrometheusUnavailable, query_scalar
from app.rollout.timeline import Timeline
from app.serving.capture import SampleStats, decode_record_request, iter_sample
from deployments.capacity_floor import (
    CapacityKeeper,
    CapacitySettings,
    capacity_settings,
    gcs_floors,
)
from deployments.store import Claim, Fence, GcsStore, RolloutStore, StoreBusy

logger = logging.getLogger("ray.serve")

OUTCOMES_SUFFIX = "/outcomes"  # the outcome book's key: the state's key + this
EPOCH_SUFFIX = "/epoch"  # the fence's key: the state's key + this
WAVES_SUFFIX = "/waves"  # the latest region-waves state published here: the state's key + this
# The A/B lift series (status["ab_series"]): at most one point a second, at most this many; a
# full series is thinned (every other point dropped, the spacing doubled), so it always spans
# the whole experiment at a bounded size.
AB_SERIES_MAX = 600
AB_SERIES_GAP_S = 1.0
# While a timer runs (a hold, a scale-down delay, the progress deadline) the stored state is
# rewritten at least this often, so its timers are never older than this: a controller that
# crashes every minute still advances a long hold.
CHECKPOINT_S = 5.0
# Ticks run every tick_interval_s, sooner after a reported candidate failure, never closer.
MIN_TICK_GAP_S = 0.02
# A replica with nothing to write still checks the fence this often, so a superseded one stops
# ticking, answering long-polls and taking commands within about a second.
FENCE_CHECK_S = 1.0
# Idempotency-Keys of applied commands remembered in memory (a re-sent command arrives within
# HAProxy's retries or the client's, seconds after the first), and the newest of them stored
# with the state, so a replica that takes over (the first one died before it answered) does not
# apply a re-sent command again. Commands come at an operator's pace: 64 cover minutes of them.
COMMAND_KEYS = 1024
STORED_COMMAND_KEYS = 64
# How often the candidate's replicas are looked up in Serve (for progress_deadline_s), and how
# old a reading may be before it counts as unknown.
READINESS_INTERVAL_S = 2.0
READINESS_MAX_AGE_S = 30.0


class PrometheusReading(NamedTuple):
    """The Prometheus gate's last reading; `available` False: not queried or unreachable."""

    value: float | None
    available: bool
    reason: str
    errors: int = 0  # queries in a row that gave no reading


class Readiness(NamedTuple):
    """The last lookup of whether a version has a running replica (None: unknown)."""

    version: str | None
    ready: bool | None
    at: float  # the controller's steady clock


def load_requests(
    directory: str, model: str, limit: int
) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], SampleStats]:
    """Up to `limit` of the model's sample records, decoded; records that do not decode are
    counted in the stats as corrupt. Blocking (file reads): call it off the event loop."""
    stats = SampleStats()
    requests = []
    for record in iter_sample(directory, model, limit, stats):
        try:
            requests.append(decode_record_request(record.request))
        except (InvalidInput, ValueError, KeyError, TypeError) as exc:
            stats.corrupt += 1
            if stats.first_error is None:
                stats.first_error = f"record captured at {record.captured_at}: {exc}"
    return requests, stats


# What the load stage calls: one version's `infer(inputs, parameters)`, past the routers.
VersionCall = Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]


class LoadRun:
    """One replay of a plan's load stage against its candidate: a background task of the
    controller's event loop (`ControllerCore._replay`), never awaited by a tick. The tick
    starts it, reads its progress for status, and hands its `result` to the state machine
    once it is finished; a rollout that leaves the stage (abort, pause, a rollback on
    another gate, a new declaration) stops it."""

    def __init__(self, key: tuple[Any, ...], stage: LoadStage, candidate: str) -> None:
        self.key = key  # (plan digest, generation): which rollout it belongs to
        self.stage = stage
        self.candidate = candidate
        self.phase = "waiting for the candidate"  # then: reading sample, ramp, hold, ...
        self.observed_rps = 0.0
        self.target_rps: float | None = None
        self.recorder: LoadRecorder | None = None
        self.t0: float | None = None  # time.monotonic() at the first scheduled request
        self.result: LoadResult | None = None
        self.task: asyncio.Task[None] | None = None
        self.requests: set[asyncio.Task[None]] = set()
        self.stopped = False

    @property
    def running(self) -> bool:
        return not self.stopped and self.task is not None and not self.task.done()

    def finish(self, result: LoadResult) -> None:
        self.result = result
        self.phase = "passed" if result.passed else "failed"

    def stop(self, why: str) -> None:
        self.stopped = True
        for task in (self.task, *self.requests):
            if task is not None and not task.done():
                task.cancel()
        if self.result is None:
            self.phase = f"stopped ({why})"

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "phase": self.phase,
            "candidate": self.candidate,
            "target_rps": None if self.target_rps is None else round(self.target_rps, 2),
            "observed_rps": round(self.observed_rps, 2),
            "ramp_s": self.stage.ramp_s,
            "hold_s": self.stage.hold_s,
        }
        if self.recorder is not None and self.t0 is not None:
            offset = min(time.monotonic() - self.t0, self.recorder.end_s)
            out.update(self.recorder.progress(offset))
        if self.result is not None:
            out["summary"] = self.result.summary
            out["gates"] = self.result.readings
        return out


def _finite(value: Any) -> float | None:
    """A number for JSON: None for a missing or non-finite one (status must stay valid JSON)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class LiftSeries:
    """The A/B test's lift over time, for the operator page and `rollout report`: one point
    `{"t", "lift", "low", "high", "verdict"}` per tick at most every `gap_s`, taken from the
    plan's first lift gate's verdict (improvement, else non-inferiority: its estimate, its
    always-valid interval and its conclusion, as `evaluate_lift_gates` computed them on that
    tick; nothing is recomputed). Bounded: at `max_points` every other point is dropped and
    the spacing doubles, so the series still covers the whole experiment. In memory only,
    like the timeline; `reset` when a new rollout starts."""

    def __init__(self, max_points: int = AB_SERIES_MAX, gap_s: float = AB_SERIES_GAP_S) -> None:
        if max_points < 2:
            raise ValueError(f"max_points ({max_points}) must be at least 2")
        self.max_points = max_points
        self.base_gap_s = gap_s
        self.gap_s = gap_s
        self.points: list[dict[str, Any]] = []

    def reset(self) -> None:
        self.points = []
        self.gap_s = self.base_gap_s

    def record(self, now: float, verdicts: Sequence[GateVerdict]) -> bool:
        """Add the lift gates' reading at `now` (at most one point per `gap_s`); True if added."""
        lift = next((v for name in LIFT_GATES for v in verdicts if v.gate == name), None)
        if lift is None:
            return False
        if self.points and now - self.points[-1]["t"] < self.gap_s:
            return False
        detail = lift.detail
        conclusion = detail.get("conclusion")
        self.points.append({
            "t": float(now),
            "lift": _finite(detail.get("lift", lift.value)),
            "low": _finite(detail.get("low")),
            "high": _finite(detail.get("high")),
            "verdict": None if conclusion is None else str(conclusion),
        })  # fmt: skip
        if len(self.points) >= self.max_points:
            self.points = self.points[::2]
            self.gap_s *= 2
        return True

    def to_list(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self.points]


def deployment_ready(deployment: dict[str, Any] | None) -> bool:
    """Whether one deployment's Serve details (`serve_details()`, a deployment entry) say it
    can serve now: a RUNNING replica, or HEALTHY with none (autoscaled to zero replicas, which
    Serve starts on the first request). Starting, failed, unhealthy or missing: not ready."""
    if not deployment:
        return False
    if any(r.get("state") == "RUNNING" for r in deployment.get("replicas") or []):
        return True
    return deployment.get("status") == "HEALTHY"


def stored_command_keys(raw: Any) -> OrderedDict[str, str]:
    """The (Idempotency-Key, command) pairs a stored state carries (`command_keys`), oldest
    first; a malformed entry is dropped (logged), never the state with it. None: an older
    state, stored before keys were."""
    keys: OrderedDict[str, str] = OrderedDict()
    if raw is None:
        return keys
    commands = {command_path(name) for name in OPERATOR_COMMANDS}
    entries = raw if isinstance(raw, list) else []
    dropped = 0 if isinstance(raw, list) else 1
    for entry in entries[-COMMAND_KEYS:]:
        if (
            isinstance(entry, list) and len(entry) == 2
            and isinstance(entry[0], str) and 0 < len(entry[0]) <= MAX_REQUEST_ID_CHARS
            and isinstance(entry[1], str) and entry[1] in commands
        ):  # fmt: skip
            keys[entry[0]] = entry[1]
        else:
            dropped += 1
    if dropped:
        logger.error("RolloutController: ignoring %d unreadable stored Idempotency-Key(s)", dropped)
    return keys


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
        candidate_ready: Callable[[str], bool | None] | None = None,
        capacity: CapacityKeeper | None = None,
        call_version: Callable[[str], VersionCall] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.app_name = app_name
        # None (version_apps): versions are applications of their own, checked by name in Serve.
        self.versions = None if versions is None else list(versions)
        self.store = store
        # The wall clock: what feedback (stamped by routers' wall clocks) and status dates use.
        self.clock = clock
        # Rollout timing uses now(): this replica's start on the wall clock, moved on by the
        # monotonic one (F16), so stepping the wall clock neither ends nor stretches a hold.
        self._monotonic = monotonic
        self._wall0, self._mono0 = clock(), monotonic()
        self._deployed = deployed_versions
        self._ready_lookup = candidate_ready  # blocking; run off the event loop
        # Capacity-aware steps (docs/capacity-aware-steps.md): Serve look-ups and floor writes
        # off the tick, the step's floor on it. Without a keeper no step waits for capacity.
        self.capacity = capacity if capacity is not None else CapacityKeeper(None, None)
        self._capacity_task: asyncio.Task[None] | None = None
        self.readiness = Readiness(None, None, float("-inf"))
        self._readiness_asked_at = float("-inf")
        self._readiness_lookup: asyncio.Future[bool | None] | None = None  # the one in flight
        self._readiness_task: asyncio.Task[None] | None = None
        self._call_version = call_version  # the load stage's path to a version, past routers
        self.load: LoadRun | None = None  # the live (or last) rollout's load stage replay
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
        self.generation = 0  # the rollout generation (RolloutState.generation): traffic changes
        self._publishes = 0  # traffic published by this replica (the low part of its generations)
        self.verdicts: tuple[GateVerdict, ...] = ()
        self.message: str | None = None
        self._published = asyncio.Event()
        # A router reported a failure of the live candidate since the last tick began.
        self._failure_pending = False
        self._failure_reported: asyncio.Event | None = None
        # What routers were last told (traffic_key of the published state): traffic is published
        # only once the state that asks for it is stored, so a restart never undoes it.
        self._published_key: tuple[Any, ...] | None = None
        # Ticks, commands and declarations change the state one at a time (each awaits storage).
        self._lock = asyncio.Lock()
        # Idempotency-Key -> the command it applied (the newest COMMAND_KEYS): a command re-sent
        # with the same key (HAProxy re-sends a request whose Router died before it answered;
        # app/ops/serving_mode.py) is applied once.
        self._command_keys: OrderedDict[str, str] = OrderedDict()
        self._ticker: asyncio.Task | None = None
        self._dirty = False  # the state in memory is newer than the stored one
        # Feedback: who answered each request id (pushed by routers), and the outcomes per
        # version since the current rollout started (persisted beside the state).
        self.desk = FeedbackDesk(self.versions)
        self.notifier = Notifier(model)  # webhooks for every event; posts in the background
        self.ab_series = LiftSeries()  # the current rollout's A/B lift, tick by tick
        # The newest region-waves state the waves orchestrator published here (status["waves"]).
        self.waves: dict[str, Any] | None = None
        now = self.now()
        # Claim the fence before reading: every write the replica before this one acknowledged
        # was checked against the fence after it landed, so this read sees it.
        self.fence = Fence(store, self.kv_key + EPOCH_SUFFIX)
        self.fence.claim()
        self.fenced: str | None = None  # why this replica stopped: a newer one claimed
        self._fence_checked_at = self._saved_at = now
        self._book_saved_at = now - OUTCOMES_WRITE_INTERVAL_S  # the first tick may write it
        # State writes so far, and how many of them a fence check has followed: a command is
        # answered as done only when its write has been followed by one.
        self._state_writes = self._checked_writes = 0
        saved_book = self.store.get(self.kv_key + OUTCOMES_SUFFIX)
        if saved_book is not None:
            try:
                self.desk.restore(json.loads(saved_book))
                self.desk.dirty = True  # stored again under this replica's epoch
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("RolloutController: ignoring unreadable saved outcomes: %s", exc)
        self.waves = self._restore_waves()
        saved = self.store.get(self.kv_key)
        if saved is not None:
            try:
                data = json.loads(saved)
                # Timers resume where the stored state left them (elapsed seconds, whatever
                # this node's clock says); the stats window starts afresh (RolloutState.resume).
                self.state = RolloutState.resume(data, now)
                self._published_key = traffic_key(self.state)  # stored, and so already published
                self._dirty = True  # stored again under this replica's epoch at the first tick
                self.generation = self.state.generation
                self.declared = self.state.plan.digest()
                self._command_keys = stored_command_keys(data.get("command_keys"))
                logger.info("RolloutController: epoch %d resumed %s at step %d (%s, candidate "
                            "%.1f%%, %.1f s into the step; stored by epoch %s)", self.epoch,
                            self.state.plan.candidate, self.state.step_index,
                            self.state.phase.value, self.state.candidate_weight,
                            self.state.elapsed_s(now), data.get("epoch"))  # fmt: skip
                flush_serve_logs()
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("RolloutController: ignoring unreadable saved state: %s", exc)

    def _restore_waves(self) -> dict[str, Any] | None:
        raw = self.store.get(self.kv_key + WAVES_SUFFIX)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            received_at = _finite(data.pop("received_at", None))
            document = parse_waves_document(data).model_dump(mode="json")
        except (ValueError, TypeError, AttributeError) as exc:
            logger.error("RolloutController: ignoring an unreadable saved waves state: %s", exc)
            return None
        return {**document, "received_at": received_at}

    @property
    def epoch(self) -> int:
        """This replica's controller epoch: one more than the replica before it."""
        return self.fence.epoch

    def now(self) -> float:
        """The controller's steady clock, what rollout timing runs on: epoch seconds at this
        replica's start, moving with the monotonic clock since (never jumps)."""
        return self._wall0 + (self._monotonic() - self._mono0)

    # -- declared state --------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A new declaration. A changed plan starts a new rollout generation; the same plan
        (a restart, or an unrelated change) keeps the live one. A bad declaration is refused
        (and shown in status) and the live rollout goes on: it never touches traffic.

        Async on purpose: Ray Serve 2.60 runs a sync `reconfigure` in a worker thread, where it
        would race the tick; on the event loop, under the state lock, it runs between ticks."""
        async with self._lock:
            if self.fenced is not None:  # superseded: the newer replica takes declarations
                logger.warning("RolloutController: ignoring a declaration: %s", self.fenced)
                return
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
        self.notifier.configure(declared.notifications)
        if plan is None:
            # No plan declared: routers follow their own declared traffic again.
            self.declared = None
            if self.state is not None and not self.state.phase.terminal:
                await self._set(apply_command(self.state, Command.ABORT, self.now(),
                                              reason="plan removed from the config"))  # fmt: skip
            if self.override is not None:
                self.override = None
                self._wake_routers()
            return
        if self.declared != plan.digest():
            self.declared = plan.digest()
            self._reset_outcomes(plan)
            await self._set(RolloutState.start(plan, self.now(), generation=self.generation + 1))
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
        if self.fenced is None and (self._ticker is None or self._ticker.done()):
            self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())

    async def check_health(self) -> None:
        """Unhealthy once superseded: if Serve still runs this replica as its only one (the
        newer one is gone), it replaces it, and the replacement claims the fence again."""
        self._refuse_if_fenced()
        self._ensure_ticker()

    def _refuse_if_fenced(self) -> None:
        if self.fenced is not None:
            raise Fenced(self.fenced, retry_after_s=1.0)

    async def _tick_loop(self) -> None:
        while self.fenced is None:  # a superseded replica stops ticking
            try:
                # The lookups run beside the tick, never in front of it: a slow Prometheus or
                # Serve controller must not delay a rollback. The tick judges the last reading.
                loop = asyncio.get_running_loop()
                if self._prometheus_task is None or self._prometheus_task.done():
                    self._prometheus_task = loop.create_task(self._query_prometheus())
                if self._readiness_task is None or self._readiness_task.done():
                    self._readiness_task = loop.create_task(self.refresh_readiness())
                if self._capacity_task is None or self._capacity_task.done():
                    self._capacity_task = loop.create_task(self.refresh_capacity())
                await self.tick()
            except Exception:
                logger.exception("RolloutController: tick failed")
            await self._until_next_tick()

    async def _until_next_tick(self) -> None:
        """Wait `tick_interval_s`, or less when a router reports a failure of the live
        candidate (what a rollback waits for: judged now, not up to a tick later), but never
        less than MIN_TICK_GAP_S after the last tick."""
        ended = time.monotonic()
        if not self._failure_pending:  # (one reported during the last tick: tick again now)
            self._failure_reported = asyncio.Event()  # on this loop
            try:
                await asyncio.wait_for(self._failure_reported.wait(), self.tick_interval_s)
            except asyncio.TimeoutError:
                pass
        self._failure_pending = False
        rest = MIN_TICK_GAP_S - (time.monotonic() - ended)
        if rest > 0:
            await asyncio.sleep(rest)

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

    async def refresh_readiness(self) -> None:
        """Look up whether the live rollout's candidate has a running replica (off the event
        loop, at most every READINESS_INTERVAL_S), for the plan's progress_deadline_s."""
        state = self.state
        lookup = self._ready_lookup
        if (
            lookup is None
            or state is None
            or state.phase.terminal
            # The load stage waits for a running candidate before it replays.
            or (state.plan.progress_deadline_s is None and state.plan.load_stage is None)
            or self.now() - self._readiness_asked_at < READINESS_INTERVAL_S
            # One lookup at a time: one that outlived its timeout (a Serve controller that
            # does not answer) still holds a worker thread; the reading ages into unknown.
            or (self._readiness_lookup is not None and not self._readiness_lookup.done())
        ):
            return
        candidate = state.plan.candidate
        self._readiness_asked_at = self.now()
        self._readiness_lookup = asyncio.ensure_future(asyncio.to_thread(lookup, candidate))
        # Retrieve the outcome of one that ends after its timeout (else asyncio logs it).
        self._readiness_lookup.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            ready = await asyncio.wait_for(asyncio.shield(self._readiness_lookup), KV_TIMEOUT_S)
        except Exception as exc:  # unknown: the deadline neither starts nor stops on it
            logger.warning("RolloutController: could not look up %s's replicas: %s", candidate, exc)
            ready = None
        self.readiness = Readiness(candidate, ready, self.now())

    async def refresh_capacity(self) -> None:
        """Look up the rollout's versions in Serve (at most every second) and write the
        capacity floors that differ or are due (off the event loop, bounded)."""
        await self.capacity.refresh(self.state, self.now())
        await self.capacity.sync(self.state, self.now())

    def _candidate_ready(self, candidate: str, now: float) -> bool | None:
        reading = self.readiness
        if reading.version != candidate or now - reading.at > READINESS_MAX_AGE_S:
            return None
        return reading.ready

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
            candidate_ready=self._candidate_ready(candidate, now),
        )

    async def tick(self, now: float | None = None) -> None:
        """One reconcile tick at `now` on the steady clock (default: `self.now()`)."""
        async with self._lock:
            await self._tick(self.now() if now is None else now)

    async def _tick(self, now: float) -> None:
        if self.fenced is None:
            # Before the store's round trips: a slow store must not keep them from Ray's metrics
            # agent for two export intervals (it drops a gauge then, and the phase alerts blink).
            self._refresh_gauges(now)
        await self._persist()  # retries a failed write, checkpoints, checks the fence
        if self.fenced is not None:
            return
        if self.state is None or self.state.phase.terminal:
            self._stop_load(self.state.phase.value if self.state else "no plan")
            self._sample(now, force=False)  # the baseline before, and the aftermath after
            return
        if self.state.phase is Phase.IDLE and self.capacity.awaits_first_reading(self.state, now):
            return  # the first step may raise the weight: not before Serve was asked
        capacity = self.capacity.plan(self.state, self.window.rates(RATE_WINDOW_S, now), now)
        decision = step(self.state, self.observation(now), now, load=self._load_stage(now),
                        capacity=capacity)  # fmt: skip
        self.capacity.waiting = decision.capacity_wait
        self.verdicts = decision.verdicts
        self.ab_series.record(now, decision.verdicts)
        if decision.state != self.state:
            await self._set(decision.state)  # logs the decision's events
        self._sample(now, force=bool(decision.events))

    # -- the load stage ------------------------------------------------------------------------

    def _load_stage(self, now: float) -> LoadResult | None:
        """Drive the plan's load stage while it is the current step of a progressing rollout:
        start the replay once the candidate has a running replica, and return its result once
        finished (the state machine's input; None meanwhile). Outside it, stop any replay:
        a pause, abort or rollback ends the replay at once, and a resume starts it again."""
        state = self.state
        assert state is not None
        run = self.load
        current = state.current_step
        if not isinstance(current, LoadTest) or state.phase is not Phase.PROGRESSING:
            self._stop_load(state.phase.value)
            return None
        key = (state.plan.digest(), state.generation)
        if run is None or run.key != key or run.stopped:
            if run is not None:
                run.stop("superseded")
            run = self.load = LoadRun(key, current.stage, state.plan.candidate)
        if run.task is not None and run.task.done() and run.result is None:
            # A bug in the replay, not the candidate's doing; still no verdict to pass on it.
            exc = None if run.task.cancelled() else run.task.exception()
            run.finish(stage_failure(f"the replay failed: {exc!r}", gate=REPLAY_GATE))
        if run.task is None:
            ready = self._candidate_ready(run.candidate, now)
            if self._ready_lookup is not None and ready is not True:
                return None  # waiting for a running candidate (progress_deadline_s applies)
            rates = self.window.rates(RATE_WINDOW_S, now)
            run.observed_rps = sum(rates.values())
            run.target_rps = run.stage.target(run.observed_rps)
            run.phase = "reading sample"
            run.task = asyncio.get_running_loop().create_task(self._replay(run))
            logger.info("RolloutController: load stage of %s started: %.2f rps target "
                        "(observed %.2f rps), ramp %gs, hold %gs", run.candidate,
                        run.target_rps, run.observed_rps, run.stage.ramp_s,
                        run.stage.hold_s)  # fmt: skip
        return run.result

    def _stop_load(self, why: str) -> None:
        run = self.load
        if run is not None and run.running:
            run.stop(why)
            logger.info("RolloutController: load stage of %s stopped (%s)", run.candidate, why)

    async def _replay(self, run: LoadRun) -> None:
        """The replay: the sample's requests, cycled, sent open loop on `send_offsets` (ramp,
        then hold) straight to the candidate's deployment, at most `concurrency` in flight
        (a due request waits for a slot: a candidate too slow for the rate falls behind,
        which min_throughput_ratio sees). Nothing here passes a router: no router stat,
        feedback, capture or gate window ever sees these requests."""
        stage, target = run.stage, cast(float, run.target_rps)
        try:
            requests, stats = await asyncio.to_thread(
                load_requests, stage.sample, self.model, stage.max_records
            )
        except Exception as exc:
            run.finish(stage_failure(f"could not read the sample at {stage.sample}: {exc}"))
            return
        if not requests:
            why = f"; first problem: {stats.first_error}" if stats.first_error else ""
            run.finish(stage_failure(
                f"the sample at {stage.sample} has no usable record of model {self.model} "
                f"({stats.records} records, {stats.corrupt} skipped{why})"))  # fmt: skip
            return
        if self._call_version is None:
            run.finish(stage_failure("this controller cannot call versions directly",
                                     gate=REPLAY_GATE))  # fmt: skip
            return
        try:
            call = self._call_version(run.candidate)
        except Exception as exc:
            run.finish(stage_failure(f"cannot reach candidate {run.candidate}: {exc}",
                                     gate=REPLAY_GATE))  # fmt: skip
            return
        recorder = run.recorder = LoadRecorder(target, stage.ramp_s, stage.hold_s)
        slots = asyncio.Semaphore(stage.concurrency)
        loop = asyncio.get_running_loop()
        t0 = run.t0 = time.monotonic()

        async def one(index: int, sent_at: float) -> None:
            inputs, parameters = requests[index % len(requests)]
            ok = False
            try:
                await asyncio.wait_for(call(inputs, parameters), stage.request_timeout_s)
                ok = True
            except Exception:  # an error answer, a timeout: counted, never raised
                ok = False
            finally:
                done_at = time.monotonic() - t0
                recorder.on_done(sent_at, done_at, (done_at - sent_at) * 1000.0, ok)
                slots.release()

        for index, offset in enumerate(send_offsets(target, stage.ramp_s, stage.hold_s)):
            await asyncio.sleep(max(0.0, t0 + offset - time.monotonic()))
            await slots.acquire()
            sent_at = time.monotonic() - t0
            if sent_at >= recorder.end_s:  # fell so far behind that the stage is over
                slots.release()
                break
            run.phase = "ramp" if sent_at < stage.ramp_s else "hold"
            recorder.on_send()
            task = loop.create_task(one(index, sent_at))
            run.requests.add(task)
            task.add_done_callback(run.requests.discard)
        run.phase = "draining"
        if run.requests:  # each ends within request_timeout_s
            await asyncio.wait(set(run.requests))
        run.finish(recorder.verdict(stage))
        logger.info("RolloutController: load stage of %s %s: %s", run.candidate, run.phase,
                    run.result.summary if run.result else "")  # fmt: skip

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

    async def _set(self, state: RolloutState, key: tuple[str, str] | None = None) -> None:
        """Take `state`: store it, then publish its traffic. Persist before publish: traffic the
        store does not hold could be undone by a restart (a rollback re-run as a canary). If the
        write fails the state stays dirty, and every tick tries again and publishes then.
        `key`: the (Idempotency-Key, command) that made this change, stored with it."""
        before = self.state
        self.state = state
        if key is not None:
            self._command_keys[key[0]] = key[1]
            self._command_keys.move_to_end(key[0])
            while len(self._command_keys) > COMMAND_KEYS:
                self._command_keys.popitem(last=False)
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
            self.metrics.load_stage(self._load_status())  # None: no load stage (zeroes the last)
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
            # Queued, never awaited: a slow or dead webhook cannot delay the tick.
            self.notifier.notify(events, candidate=candidate, stable=state.plan.stable,
                                 strategy=state.plan.strategy, plan=state.plan.digest(),
                                 generation=state.generation)  # fmt: skip
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
        of a stored state that routers have not been told. A failure leaves it dirty.

        Every write comes after a fence check, and a publish after another: a replica
        superseded while its write was on the way never tells routers about it. While a timer
        runs the state is rewritten every CHECKPOINT_S even if unchanged, so its stored timers
        (elapsed seconds) stay fresh for a replica that takes over."""
        if self.fenced is not None:
            return
        now = self.now()
        state = self.state
        if state is not None and state.timer_running and now - self._saved_at >= CHECKPOINT_S:
            self._dirty = True  # a checkpoint: the timers moved on
        # The outcome book at most every OUTCOMES_WRITE_INTERVAL_S: under a feedback flood it
        # changed every tick, and writing it each time made the tick (a rollback's) 12 ms slower.
        book_due = self.desk.dirty and now - self._book_saved_at >= OUTCOMES_WRITE_INTERVAL_S
        writes = book_due or (self._dirty and state is not None)
        if (writes or now - self._fence_checked_at >= FENCE_CHECK_S) and not (
            await self._holds_fence()
        ):
            return
        if book_due:
            # Clean before the write: outcomes counted while it is on the way mark it again.
            self._book_saved_at, self.desk.dirty = now, False
            try:
                await self._put(
                    self.kv_key + OUTCOMES_SUFFIX, json.dumps(self.desk.to_dict()).encode()
                )
            except Exception:
                self.desk.dirty = True
                logger.exception("RolloutController: could not persist the outcomes; will retry")
        if state is None:
            return
        if self._dirty:
            # Tagged with the epoch for people reading the store; the fence is what decides.
            data = {**state.to_dict(now=now), "epoch": self.epoch,
                    "command_keys": self._stored_command_keys()}  # fmt: skip
            try:
                await self._put(self.kv_key, json.dumps(data).encode())
                self._dirty = False
                self._saved_at = now
                self._state_writes += 1
            except Exception:
                logger.exception(
                    "RolloutController: could not persist the rollout state; will retry"
                )
                return
        if self._published_key != traffic_key(state) and await self._holds_fence():
            self._publish(state)

    def _stored_command_keys(self) -> list[list[str]]:
        """The newest STORED_COMMAND_KEYS (Idempotency-Key, command) pairs, oldest first."""
        pairs = list(self._command_keys.items())[-STORED_COMMAND_KEYS:]
        return [[key, path] for key, path in pairs]

    async def _holds_fence(self) -> bool:
        """Whether this replica still holds the fence (one read, off the loop, bounded). A
        newer claim fences it for good; a read that fails is no answer: False, not fenced, and
        nothing is written or published on it (the next tick asks again)."""
        try:
            writes = self._state_writes
            holder = await asyncio.wait_for(asyncio.to_thread(self.fence.holder), KV_TIMEOUT_S)
        except (asyncio.TimeoutError, StoreBusy) as exc:  # a GCS outage: one line, not a trace
            logger.warning("RolloutController: the store did not answer (GCS down?); "
                           "nothing is stored or published until it does: %r", exc)  # fmt: skip
            return False
        except Exception:
            logger.exception("RolloutController: could not read the controller epoch; will retry")
            return False
        self._fence_checked_at = self.now()
        if holder == self.fence.mine:
            self._checked_writes = writes
            return True
        self._lose_fence(holder)
        return False

    def _lose_fence(self, holder: Claim | None) -> None:
        if holder is None:
            why = "lost its claim (the epoch key is gone or unreadable)"
        elif holder.epoch == self.epoch:
            why = f"was superseded by epoch {holder.epoch} (a replica that claimed at once)"
        else:
            why = f"was superseded by epoch {holder.epoch}"
        self.fenced = (
            f"this rollout controller replica (epoch {self.epoch}) {why}: it no longer "
            "ticks, publishes or takes commands; retry, the current one answers"
        )
        logger.error("RolloutController: %s", self.fenced)
        flush_serve_logs()
        if self.load is not None:
            self.load.stop("fenced")
        self._wake_routers()  # long-polls waiting here return now, and get Fenced

    async def _put(self, key: str, value: bytes) -> None:
        # The store blocks (a GCS RPC): in a thread, bounded, so a slow or restarting GCS
        # never freezes the long-polls, stats reports and commands on this loop.
        await asyncio.wait_for(asyncio.to_thread(self.store.put, key, value), KV_TIMEOUT_S)

    def _publish(self, state: RolloutState) -> None:
        self._published_key = traffic_key(state)
        self._publishes += 1
        self.override = {"generation": self.published_generation(), **rollout_override(state)}
        self._wake_routers()

    def published_generation(self) -> int:
        """The generation of this replica's latest publish: its epoch, then its count, so
        every replica's generations are above every earlier replica's (F6.6: a restarted
        replica used to count again from the stored rollout's generation, below what routers
        and clients had seen). Clients echo it (`x-traffic-generation`) for monotonic reads."""
        return self.epoch * GENERATION_EPOCH_STRIDE + self._publishes

    def _wake_routers(self) -> None:
        event, self._published = self._published, asyncio.Event()
        event.set()  # wake every router waiting in wait_for_traffic

    # -- what routers call -----------------------------------------------------------------------

    async def report(
        self,
        stats: StatsReport,
        shadow: dict[str, ShadowDelta] | None = None,
        served: list[ServedAnswer] | None = None,
        sent_at: float | None = None,
    ) -> None:
        """Per-version counts since the router's last report, shadow comparisons and the
        request ids answered (for feedback). Tuples from older routers unpack the same.
        `sent_at`: the router's wall clock when it sent the report (None from older routers):
        the answers' times are moved onto this clock (FeedbackDesk.record_served)."""
        self._refuse_if_fenced()  # the newer replica judges: the router keeps its ids to resend
        self._ensure_ticker()
        # Routers stamp answers in their wall time.
        self.desk.record_served(served or (), self.clock(), sent_at)
        now = self.now()
        try:
            if stats:
                self.window.add(stats, now)
                self.timeline.add(stats)  # validated by the line above
                state = self.state
                if state is not None and not state.phase.terminal:
                    failed = int((stats.get(state.plan.candidate) or {}).get("errors") or 0)
                    if failed > 0:  # the tick judges it now
                        self._failure_pending = True
                        if self._failure_reported is not None:
                            self._failure_reported.set()
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
        rollout steers traffic, routers follow their declared user_config. Fenced (503) from a
        superseded replica: the router keeps its traffic and asks again."""
        self._refuse_if_fenced()
        self._ensure_ticker()
        current = self.override["generation"] if self.override else 0
        if current == known_generation:  # nothing new for this router: wait for a publish
            try:
                await asyncio.wait_for(self._published.wait(), timeout=timeout_s)
            except asyncio.TimeoutError:
                pass
            self._refuse_if_fenced()
        return cast("TrafficOverride | None", self.override)

    async def feedback(
        self,
        items: list[dict[str, Any]],
        hints: dict[str, FeedbackHint],
        sent_at: float | None = None,
    ) -> list[dict[str, Any]]:
        """Count outcomes for answered requests (FeedbackDesk.count): one result per item.
        `sent_at`: the forwarding router's wall clock when it sent them (its hints' times are
        moved onto this clock); None from older routers."""
        self._refuse_if_fenced()
        return self.desk.count(items, hints, self.clock(), sent_at)

    def _reset_outcomes(self, plan: RolloutPlan) -> None:
        """A new rollout is a new experiment: outcomes (and verdicts) from before it do not
        count. Continuous outcomes are clipped to the bounds the plan's gates declare; with
        feedback.pre_period_s set, users' earlier outcomes on the plan's stable version are
        frozen as the CUPED covariates of this experiment."""
        self.desk.reset(self.clock(), plan.gates.outcome_bounds(), plan.stable)
        # Written with the new rollout's state, not up to a second later: a replica that takes
        # over in between must not restore the last rollout's outcomes into this one.
        self._book_saved_at = -math.inf
        self.verdicts = ()
        self.ab_series.reset()

    # -- operators ---------------------------------------------------------------------------------

    async def command(
        self, name: str, caller: str | None = None, key: str | None = None
    ) -> dict[str, Any]:
        """An operator command (`Command` values: start, promote, promote_full, pause, resume,
        abort; the admin API's dashed spelling is accepted), recorded in the history with its
        `caller` (the router passes who and from where). CommandRefused (409): not now;
        Unavailable (503): accepted in memory but not stored, so not answered as done; Fenced
        (503): this replica was superseded, so the command may not be applied.

        `key` (the client's Idempotency-Key): a command this controller already applied under
        the same key is not applied again (a second `promote` would skip a step); the repeat
        gets the rollout's current status once it is stored (503 while it is not). The same
        key with another command is refused (400)."""
        path = command_path(name.replace("-", "_"))
        self._refuse_if_fenced()
        async with self._lock:
            self._refuse_if_fenced()
            applied = self._command_keys.get(key) if key is not None else None
            if applied is not None and applied != path:
                raise InvalidInput(
                    f"Idempotency-Key {key!r} was used for {applied}; send a new key for {path}"
                )
            if applied is None:
                # The key is kept with the state it changed (`_set`), and stored in the same
                # write: kept even if what follows failed (the write, a tick), and read back by
                # a replica that takes over. A re-send is never applied a second time.
                await self._command(name, caller, None if key is None else (key, path))
            else:
                logger.info("rollout %s with Idempotency-Key %r again: applied once", path, key)
                if self._dirty:  # a replica that took over, before its first tick: store now
                    await self._persist()
            # Answered as done only once stored *and* this replica still holds the fence after
            # the write: then any replica that claims later reads it.
            confirmed = (
                self.fenced is None
                and not self._dirty
                and (self._checked_writes == self._state_writes or await self._holds_fence())
            )
            if self.fenced is not None:
                # Its write may have landed before or after the newer replica read the store.
                raise Fenced(
                    f"{path} may not be applied: {self.fenced}; check `rollout status`",
                    retry_after_s=1.0,
                )
            if self._dirty:  # in memory, not stored: not yet applied to traffic either
                raise Unavailable(
                    f"{path} is not stored yet (the rollout store is unavailable): it is "
                    "applied once a write succeeds; check `rollout status`",
                    retry_after_s=1.0,
                )
            if not confirmed:
                raise Unavailable(
                    f"{path} is stored but the controller epoch could not be read back to "
                    "confirm it; check `rollout status`",
                    retry_after_s=1.0,
                )
            return self._status()

    async def _command(
        self, name: str, caller: str | None = None, key: tuple[str, str] | None = None
    ) -> None:
        now = self.now()
        reason = f"rollout {command_path(name.replace('-', '_'))}" + (
            f" by {caller}" if caller else ""
        )
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
            self._reset_outcomes(self.state.plan)
            await self._set(
                RolloutState.start(
                    self.state.plan, now, generation=self.generation + 1, reason=reason
                ),
                key,
            )
        else:
            if self.state is None:
                raise CommandRefused("no rollout: no plan is declared")
            try:
                changed = apply_command(self.state, Command(name), now, reason=reason)
            except ValueError as exc:  # the state machine's refusal, with its reason
                raise CommandRefused(str(exc)) from None
            await self._set(changed, key)
        await self._tick(now)

    async def publish_waves(self, document: dict[str, Any]) -> dict[str, Any]:
        """The waves orchestrator's latest state (`POST /admin/waves`, checked by the router
        and again here), kept and stored if it is not older than the one held (orchestrator
        clock: `published_at`), so a restarted replica still shows it. A failed write keeps
        it in memory (`stored` False); the orchestrator publishes again within seconds."""
        self._refuse_if_fenced()
        try:
            waves = parse_waves_document(document).model_dump(mode="json")
        except WavesDocumentError as exc:
            raise InvalidInput(str(exc)) from None
        held = self.waves
        if held is not None and waves["published_at"] < held["published_at"]:
            return {"accepted": False, "stored": False, "published_at": held["published_at"],
                    "reason": "older than the waves state held"}  # fmt: skip
        self.waves = {**waves, "received_at": self.clock()}
        stored = True
        try:
            await self._put(self.kv_key + WAVES_SUFFIX, json.dumps(self.waves).encode())
        except Exception as exc:
            stored = False
            logger.warning("RolloutController: could not store the waves state: %r", exc)
        return {"accepted": True, "stored": stored, "published_at": waves["published_at"]}

    async def status(self) -> dict[str, Any]:
        # Async so it runs on the event loop: the stats window is not thread-safe.
        self._refuse_if_fenced()  # its view is stale: the current replica answers
        return self._status()

    def _status(self) -> dict[str, Any]:
        now = self.now()
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
            "updated_at": self.clock(),
            "message": self.message,
            "epoch": self.epoch,
            "progress_deadline": self._deadline_status(now),
            "load_stage": self._load_status(),
            "capacity": self.capacity.status(),
            "waves": self.waves,
            "notifications": self.notifier.stats() if self.notifier.settings.webhooks else None,
            "ab_series": self.ab_series.to_list(),
            "prometheus": None
            if self.prometheus_url is None
            else {
                "url": self.prometheus_url,
                "value": self.prometheus.value,
                "available": self.prometheus.available,
                "reason": self.prometheus.reason or None,
            },
        }

    def _load_status(self) -> dict[str, Any] | None:
        """The current rollout's load stage replay, for status: None when it has none (yet)."""
        run, state = self.load, self.state
        if run is None or state is None or run.key[0] != state.plan.digest():
            return None
        return run.status()

    def _deadline_status(self, now: float) -> dict[str, Any] | None:
        """The progress deadline's clock, for status: None when no live plan has one."""
        state = self.state
        if state is None or state.phase.terminal or state.plan.progress_deadline_s is None:
            return None
        unready_s = state.unready_s(now)
        return {
            "deadline_s": state.plan.progress_deadline_s,
            "candidate_ready": self._candidate_ready(state.plan.candidate, now),
            "unready_s": None if unready_s is None else round(unready_s, 1),
        }

    async def history(self) -> dict[str, Any]:
        self._refuse_if_fenced()
        events = self.state.history if self.state else ()
        # The curves of this rollout: from 30 s before its first event (the baseline) to now.
        start = events[0].time_s - 30.0 if events else float("inf")
        return {"events": [e.to_dict() for e in events], "timeline": self.timeline.since(start)}


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class RolloutController(ControllerCore):
    """The Serve deployment: ControllerCore with its state in Ray's GCS, and the deployed
    versions (version_apps mode) and the candidate's replicas read from Serve."""

    def __init__(self, model: str, versions: list[str] | None) -> None:
        app_name = serve.get_replica_context().app_name
        super().__init__(
            model,
            versions,
            app_name=app_name,
            store=GcsStore(),
            deployed_versions=self._serve_versions,
            candidate_ready=self._serve_ready,
            capacity=CapacityKeeper(
                gcs_floors(app_name, model, version_apps=versions is None), self._serve_capacity
            ),
            call_version=self._serve_call,
        )

    def _serve_call(self, version: str) -> VersionCall:
        """`version`'s `infer`, through its deployment handle: the load stage's path, which
        bypasses the routers (as their own handles do, but with no router in front)."""
        name = version_app_name(self.model, version)
        app = self.app_name if self.versions is not None else name
        handle = serve.get_deployment_handle(name, app)

        async def call(inputs: dict[str, Any], parameters: dict[str, Any]) -> Any:
            response = handle.infer.remote(inputs, parameters)
            try:
                return await response
            except asyncio.CancelledError:  # a timeout or a stopped stage: drop it in Serve too
                response.cancel()
                raise

        return call

    def _serve_ready(self, version: str) -> bool:
        """Whether `version`'s deployment has a running replica (blocking: a Serve controller
        call). Its deployment is `<model>-<version>` in both modes; in version_apps mode it is
        also its own application."""
        name = version_app_name(self.model, version)
        app = self.app_name if self.versions is not None else name
        apps = ray_compat.serve_details().get("applications", {})
        deployments = (apps.get(app) or {}).get("deployments") or {}
        return deployment_ready(deployments.get(name))

    def _serve_capacity(self, version: str) -> CapacitySettings | None:
        """`version`'s capacity-aware settings and RUNNING replicas from Serve's details
        (None: it did not opt in). Blocking: a Serve controller call."""
        name = version_app_name(self.model, version)
        app = self.app_name if self.versions is not None else name
        apps = ray_compat.serve_details().get("applications", {})
        return capacity_settings(((apps.get(app) or {}).get("deployments") or {}).get(name))

    def _serve_versions(self) -> list[str]:
        prefix = f"{self.model}-"
        apps = ray_compat.serve_details().get("applications", {})
        return [name[len(prefix) :] for name in apps if name.startswith(prefix)]
