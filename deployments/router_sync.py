"""`RouterSync`: a Router replica's background loops, off the request path.

    ensure_running()      start (or restart, if one died) the loops; cheap when they run
    _poll_health          which versions can serve, and their target user_config digests
    _follow_controller    long-poll the rollout controller for traffic; apply it
    _push_stats           per-version stats, shadow comparisons, answered ids -> controller
    _observe_loop         gauges: weights, availability, breakers, shadow, drift
    resolve_versions      version_apps: find a version's application by name

The loops read and write the Router's state (`table`, `available`, `handles`, `override`);
all of it runs on the replica's one event loop, so no two of them interleave mid-update.
"""

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

from ray import serve

from app import ray_compat
from app.adapters import adapter_class
from app.config import ModelConfig, config_hash, version_app_name
from app.constants import (
    CONTROLLER_RETRY_S,
    DESCRIBE_TIMEOUT_S,
    GAUGE_INTERVAL_S,
    LONG_POLL_TIMEOUT_S,
    REPORT_TIMEOUT_S,
    SERVED_BACKLOG,
    STATS_PUSH_INTERVAL_S,
    STATS_PUSH_MIN_GAP_S,
)
from app.messages import ShadowDelta
from app.observability.drift import score_output
from app.serving.traffic import TrafficTable, apply_override

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from deployments.router import Router

logger = logging.getLogger("ray.serve")


def _routable(deployment: dict[str, Any]) -> bool:
    if any(r.get("state") == "RUNNING" for r in deployment.get("replicas", [])):
        return True
    return deployment.get("status") not in ("DEPLOY_FAILED", "UNHEALTHY")


class RouterSync:
    """The Router's background loops; it owns their tasks, the Router owns the state."""

    def __init__(self, router: "Router") -> None:
        self.router = router
        self._poller: asyncio.Task | None = None
        self._observer: asyncio.Task | None = None
        self._controller_tasks: list[asyncio.Task | None] = []

    async def resolve_versions(self, versions: set[str]) -> None:
        """version_apps: find each version not known yet as the application `<model>-<version>`
        and learn its model config from its replicas. ValueError names what is not deployed."""
        router = self.router
        missing = sorted(v for v in versions if v not in router.handles)
        for version in missing:
            name = version_app_name(router.model, version)
            try:
                # In a thread: it asks Serve's controller with a blocking ray.get, and the Router
                # runs on the replica's main loop (router_main_loop), which also serves HTTP.
                found = await asyncio.wait_for(
                    asyncio.to_thread(serve.get_deployment_handle, name, app_name=name),
                    timeout=DESCRIBE_TIMEOUT_S,
                )
                handle = router._transport(found)
                described = await asyncio.wait_for(
                    handle.describe.remote(), timeout=DESCRIBE_TIMEOUT_S
                )
                config = ModelConfig.model_validate(described)
            except Exception as exc:
                raise ValueError(
                    f"version {version!r} is not deployed: application {name!r} did not answer "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            if (config.name, config.version) != (router.model, version):
                raise ValueError(
                    f"application {name!r} serves {config.name}/{config.version}, not "
                    f"{router.model}/{version}"
                )
            adapter = adapter_class(config.adapter)
            router.handles[version] = handle
            router.configs[version] = config
            router.adapters[version] = adapter
            router.apps[version] = name
            router.score_outputs[version] = score_output(adapter.outputs)
            router.dispatcher.add_version(version, adapter)
            router.available = router.available | {version}
            router.waitable = router.waitable | {version}
            logger.info("Router: found version %s (application %s)", version, name)

    def ensure_running(self) -> None:
        """Start (or restart, if one died) the background tasks: health poll, controller
        follower, stats pusher. Called on every request and health check; cheap when running."""
        router = self.router
        loop = asyncio.get_running_loop()
        if self._poller is None or self._poller.done():
            self._poller = loop.create_task(self._poll_health())
        if self._observer is None or self._observer.done():
            self._observer = loop.create_task(self._observe_loop())
        if router.controller is None:
            return
        if not self._controller_tasks:
            self._controller_tasks = [None, None]
        for i, factory in enumerate((self._follow_controller, self._push_stats)):
            task = self._controller_tasks[i]
            if task is None or task.done():
                self._controller_tasks[i] = loop.create_task(factory())

    async def _follow_controller(self) -> None:
        """Long-poll the rollout controller for traffic; keep the last table when it is gone."""
        router = self.router
        while True:
            known = router.seen_generation
            try:
                # Not None: ensure_running starts this loop only when there is a controller.
                controller = cast("DeploymentHandle", router.controller)
                override = await controller.wait_for_traffic.remote(known, LONG_POLL_TIMEOUT_S)
            except Exception as exc:  # controller restarting or gone: serve on, retry soon
                logger.warning("Router: rollout controller unreachable (%s); keeping traffic", exc)
                await asyncio.sleep(CONTROLLER_RETRY_S)
                continue
            router.seen_generation = override["generation"] if override else 0
            if override != router.override:
                await self._take_override(override)

    async def _take_override(self, override: dict[str, Any] | None) -> None:
        """Apply the controller's traffic, first finding (version_apps) the versions it names.
        Used by the follower for new traffic and by the health poll for traffic refused before
        (a version app still starting); a refusal is logged once, and /status shows it."""
        router = self.router
        if router.version_apps and override:
            named = set(override.get("weights") or {}) | {override.get("stable")}
            try:
                await self.resolve_versions({v for v in named if v})
            except ValueError as exc:  # _apply_override refuses it, naming the version
                if (router.refused_override or {}).get("override") != override:
                    logger.error("Router: the controller's traffic names %s", exc)
        try:
            self._apply_override(override)
        except Exception:  # a malformed override must not kill the loop that applies it
            logger.exception("Router: could not apply the controller's traffic")

    @property
    def applied_generation(self) -> int | None:
        """The controller generation of the traffic in force; None when no rollout steers it
        (the declared traffic is the truth then, the same on every Router)."""
        override = self.router.override
        return int(override.get("generation") or 0) if override else None

    async def catch_up(self, generation: int, timeout_s: float) -> bool:
        """Monotonic reads across Routers (issue 18 item 8): a client that was answered with
        `generation` by another Router waits, at most `timeout_s`, for this one to apply it
        too (it is on its way), so a user the newer traffic moved is not moved back by an
        older table here. False: still behind after `timeout_s` (it routes with what it has)."""
        deadline = time.monotonic() + timeout_s
        while True:
            applied = self.applied_generation
            if applied is None or applied >= generation:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._applied_event().wait(), remaining)
            except asyncio.TimeoutError:
                return False

    def _applied_event(self) -> asyncio.Event:
        event = self.__dict__.get("_applied")
        if event is None:
            event = self._applied = asyncio.Event()
        return event

    def _wake_catch_ups(self) -> None:
        event = self.__dict__.pop("_applied", None)  # the next waiter makes a fresh one
        if event is not None:
            event.set()

    def _apply_override(self, override: dict[str, Any] | None) -> None:
        router = self.router
        if router.declared is None:
            router.override = override
            self._wake_catch_ups()
            return
        # router.table is not None here: Router.reconfigure sets it together with declared.
        try:
            table = TrafficTable.from_config(apply_override(router.declared, override),
                                             router.handles.keys(), cast("TrafficTable", router.table).generation + 1)  # fmt: skip
        except ValueError as exc:
            # Shown in /status (F20) and retried by the health poll every second: a version
            # app may still be starting; the table in force keeps serving meanwhile.
            if (router.refused_override or {}).get("override") != override:
                logger.error("Router: refused the controller's traffic %s: %s", override, exc)
            router.refused_override = {
                "generation": (override or {}).get("generation"), "error": str(exc),
                "override": override,
            }  # fmt: skip
            return
        router.override, router.table, router.refused_override = override, table, None
        self._wake_catch_ups()
        logger.info("Router: rollout traffic generation %s: %s", (override or {}).get("generation"),
                    dict(table.weights))  # fmt: skip

    def candidate_failed(self) -> None:
        """A version other than the stable one failed a request: push the stats now (a
        rollback waits on such failures), not at the end of the push interval."""
        self._failed = True
        event = self.__dict__.get("_failure")
        if event is not None:
            event.set()

    async def _until_next_push(self, last: float) -> None:
        """STATS_PUSH_INTERVAL_S, or sooner after a candidate failure, never closer than
        STATS_PUSH_MIN_GAP_S to the push before (`last`, monotonic)."""
        if not self.__dict__.get("_failed"):
            self._failure = asyncio.Event()
            try:
                await asyncio.wait_for(self._failure.wait(), STATS_PUSH_INTERVAL_S)
            except asyncio.TimeoutError:
                pass
        self._failed = False
        rest = STATS_PUSH_MIN_GAP_S - (time.monotonic() - last)
        if rest > 0:
            await asyncio.sleep(rest)

    async def _push_stats(self) -> None:
        """Every ~250 ms (sooner after a candidate failure), send the per-version counts since
        the last push to the controller."""
        router = self.router
        sent: dict[str, tuple[int, float]] = {}  # shadow totals already reported
        last = time.monotonic()
        while True:
            await self._until_next_push(last)
            last = time.monotonic()
            report = router.stats.drain()
            shadow: dict[str, ShadowDelta] = {}
            for version, st in router.dispatcher.shadow_stats.items():
                total = (st.completed, st.sums.get("top_k_overlap", 0.0))
                before = sent.get(version, (0, 0.0))
                if total[0] > before[0] and "top_k_overlap" in st.sums:
                    shadow[version] = {"compared": total[0] - before[0],
                                       "top_k_overlap_sum": total[1] - before[1]}  # fmt: skip
                    sent[version] = total
            served = list(router.served)
            router.served = deque(maxlen=SERVED_BACKLOG)
            if not report and not shadow and not served:
                continue
            try:
                # Not None: ensure_running starts this loop only when there is a controller.
                controller = cast("DeploymentHandle", router.controller)
                # Its wall clock now: the controller moves the answers' times onto its own.
                await asyncio.wait_for(
                    controller.report.remote(report, shadow, served, time.time()),
                    timeout=REPORT_TIMEOUT_S,
                )
            except Exception as exc:  # lost reports only delay a verdict; never block serving
                logger.warning("Router: stats report to the controller failed: %s", exc)
                # Keep the answered ids for the next push (the newest, if there are too many).
                router.served = deque([*served, *router.served], maxlen=SERVED_BACKLOG)

    async def _poll_health(self) -> None:
        """Keep `available` current from Serve's status, every `health_poll_interval_s`.

        A version is left out only when it has no RUNNING replica *and* Serve has given up on
        it (DEPLOY_FAILED, UNHEALTHY) or it is gone. A version whose replicas are still
        starting stays routable: its handle queues the request until a replica is up.
        """
        router = self.router
        while True:
            try:
                await router.retry_pending()  # version_apps: an update still waiting
                if router.refused_override is not None:  # the controller's, refused before
                    await self._take_override(router.refused_override["override"])
                details = await asyncio.to_thread(ray_compat.serve_details)
                applications = details.get("applications", {})
                found = {}  # version -> its deployment's details, where Serve has it
                for version, config in list(router.configs.items()):
                    app_details = applications.get(router.apps[version]) or {}
                    deployment = (app_details.get("deployments") or {}).get(config.deployment_name)
                    if deployment is not None:
                        found[version] = deployment
                router.available = frozenset(v for v, d in found.items() if _routable(d))
                router.running = {
                    v: sum(r.get("state") == "RUNNING" for r in d.get("replicas") or [])
                    for v, d in found.items()
                }
                # Serve brings these back by itself (it replaces lost replicas): a request
                # for one waits on its handle rather than failing (DEPLOY_FAILED does not heal).
                router.waitable = frozenset(
                    v for v, d in found.items() if d.get("status") != "DEPLOY_FAILED"
                )
                router.target_config = {
                    v: config_hash(d["deployment_config"].get("user_config"))
                    for v, d in found.items()
                }
            except RuntimeError as exc:
                if "shutdown" in str(exc):  # the replica is exiting
                    return
                logger.exception("Router: health poll failed")
            except Exception:  # keep the last view; the next poll may succeed
                logger.exception("Router: health poll failed")
            await asyncio.sleep(router.settings.health_poll_interval_s)

    async def _observe_loop(self) -> None:
        """About once a second: publish the router's state as gauges (weights, availability,
        breakers, shadow outcomes, score drift). Off the request path."""
        router = self.router
        while True:
            await asyncio.sleep(GAUGE_INTERVAL_S)
            try:
                table = router.table
                psi = {}
                if table is not None and router.settings.drift.enabled:
                    psi = router.scores.psi_by_version(table.stable, time.monotonic())
                router.gauges.update(
                    versions=router.handles.keys(),
                    weights=dict(table.weights) if table else {},
                    stable=table.stable if table else None,
                    available=router.available,
                    breakers={v: s.value for v, s in router.dispatcher.breaker_states().items()},
                    shadow=router.dispatcher.shadow_stats, psi=psi,
                )  # fmt: skip
            except Exception:
                logger.exception("Router: metrics update failed")
