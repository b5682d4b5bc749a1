"""Serving one routed request: breaker, deadline, fallback, and shadow copies.

A router replica owns one `Dispatcher`. It calls a version through an injected `call`
coroutine (a Serve handle in production, a fake in unit tests) and decides, per request:

1. whether the chosen version may be tried at all (its circuit breaker);
2. how much of the request's deadline the first try may spend: half of what is left when a
   fallback could still run, all of it otherwise, so that a slow version leaves its fallback
   time to answer within the same deadline;
3. whether to retry once on the same version, when the replica died under the request
   (`ReplicaLost`: a lost node, not the version's fault) and the version has no fallback;
   otherwise whether to retry once on the version's fallback (after an error, a timeout or an open
   breaker; not after bad input, which would fail there too; not for a pinned request unless
   the client allows it);
4. whether to send a shadow copy (sampled, bounded in flight, dropped when full), never
   awaited on the request path; its agreement with the primary answer is accumulated per
   shadow version.

Response caching is separate (`app/serving/cache.py`): the router consults it before dispatching.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.adapters import ModelAdapter, Tensors
from app.constants import REPLICA_RETRIES, REPLICA_RETRY_PAUSE_S
from app.errors import (
    DeadlineExceeded,
    InvalidInput,
    LoadShed,
    ReplicaLost,
    ReplicaWaitTimeout,
    ServingError,
    Unavailable,
)
from app.serving.breaker import BreakerSettings, BreakerState, CircuitBreaker
from app.serving.traffic import Decision, Route, TrafficTable

__all__ = [
    "Call", "Dispatcher", "Served", "ShadowStats", "failure_is_evidence", "fallback_is_evidence",
]  # fmt: skip

logger = logging.getLogger("ray.serve")

# call(version, inputs, parameters, timeout_s) -> {"outputs": Tensors, "config": str}
Call = Callable[[str, Tensors, dict[str, Any], float], Awaitable[dict[str, Any]]]


class BreakerOpen(Unavailable):
    """503: the version's circuit breaker is open and nothing could take the request."""


@dataclass(frozen=True)
class Served:
    version: str
    decision: Decision
    outputs: Tensors
    config: str
    fell_back_from: str | None = None
    fallback_reason: str | None = None
    # Whether the failure that made it fall back counts against `fell_back_from` in the gates
    # (fallback_is_evidence, decided when the failure happened).
    fallback_evidence: bool = False


@dataclass
class ShadowStats:
    """Per shadow version: how many copies went, failed, were dropped, and how they agreed."""

    sent: int = 0
    completed: int = 0
    failed: int = 0
    dropped: int = 0
    sums: dict[str, float] = field(default_factory=dict)

    def add(self, agreement: Mapping[str, float]) -> None:
        self.completed += 1
        for name, value in agreement.items():
            self.sums[name] = self.sums.get(name, 0.0) + value

    def snapshot(self) -> dict[str, Any]:
        means = (
            {name: total / self.completed for name, total in self.sums.items()}
            if self.completed
            else {}
        )
        return {"sent": self.sent, "completed": self.completed, "failed": self.failed,
                "dropped": self.dropped, "agreement": means}  # fmt: skip


class Dispatcher:
    def __init__(
        self,
        call: Call,
        versions: Mapping[str, type[ModelAdapter]],
        *,
        clock: Callable[[], float],
        rng: random.Random,
        breaker: BreakerSettings | None = None,
        on_shadow: Callable[[str, bool, float], None] | None = None,
        running: Callable[[str], bool] | None = None,
    ) -> None:
        self._call = call
        # Whether a version has a RUNNING replica now (the router's health poll). A call that
        # timed out while its version had none waited on Serve replacing a replica: that is not
        # the version failing (ReplicaWaitTimeout), and it must not open a breaker that would
        # then refuse the replacement.
        self._running = running or (lambda version: True)
        # Told of every shadow copy's outcome (version, ok, latency_ms): a blue-green preview
        # is judged on them, since the candidate serves no client yet.
        self._on_shadow = on_shadow
        self._adapters = dict(versions)
        self._clock = clock
        self._rng = rng
        settings = breaker or BreakerSettings()
        self._breaker_settings = settings
        self.breakers = {v: CircuitBreaker(settings, clock) for v in self._adapters}
        self.shadow_stats: dict[str, ShadowStats] = {}
        self.fallbacks = 0
        self.replica_retries = 0  # requests retried on the same version after a replica died
        self._shadow_in_flight = 0
        self._shadow_tasks: set[asyncio.Task] = set()

    def reconfigure(self, breaker: BreakerSettings) -> None:
        self._breaker_settings = breaker
        for b in self.breakers.values():
            b.reconfigure(breaker)

    def add_version(self, version: str, adapter: type[ModelAdapter]) -> None:
        """A version found after start (a version app): its adapter and a closed breaker."""
        self._adapters[version] = adapter
        if version not in self.breakers:
            self.breakers[version] = CircuitBreaker(self._breaker_settings, self._clock)

    def breaker_states(self) -> dict[str, BreakerState]:
        return {v: b.state for v, b in self.breakers.items()}

    # -- the primary path ----------------------------------------------------------------------

    async def serve(
        self,
        table: TrafficTable,
        route: Route,
        inputs: Tensors,
        parameters: dict[str, Any],
        *,
        deadline: float,
        available: frozenset[str] | set[str],
        allow_fallback: bool,
        client_deadline: bool = False,
    ) -> Served:
        """Serve on `route.version`, falling back once if allowed; raise the final error.

        `client_deadline`: the client asked for a shorter deadline than the table's; running
        out of it is then the client's choice and is not held against the version (otherwise
        one impatient client could open a breaker that every other client then hits)."""
        version = route.version
        fallback = table.fallback_for(version) if allow_fallback else None
        if fallback is not None and (
            fallback not in available or self._adapters[fallback] is not self._adapters[version]
        ):
            fallback = None  # nowhere to go, or a model with other tensors
        share = 0.5 if fallback else 1.0
        if fallback is not None and version not in available:
            # The chosen version has no running replica (a pin to a version that is restarting):
            # the fallback answers now rather than after half the deadline.
            return await self._fall_back(
                version, fallback, Unavailable(f"version {version!r} has no running replica"),
                inputs, parameters, deadline, client_deadline,
            )  # fmt: skip
        try:
            try:
                outputs, config = await self._attempt(version, inputs, parameters, deadline,
                                                      share=share, client_deadline=client_deadline)  # fmt: skip
            except ReplicaLost as lost:
                # The replica died under the request (a lost node) and nothing else could take
                # it (the stable version, or `fallbacks: null`): retry the same version, which
                # reaches another replica or waits within the deadline for the replacement.
                # Serve's handle may still pick the dead replica until it hears of the death
                # (about a second), so a few retries with growing pauses, never past the
                # deadline. With a fallback, falling back is quicker.
                if fallback is not None:
                    raise
                outputs, config = await self._retry_lost(
                    version, lost, inputs, parameters, deadline, share, client_deadline
                )
            return Served(version, route.decision, outputs, config)
        except InvalidInput:
            raise
        except ServingError as error:
            if fallback is None or self._clock() >= deadline:
                raise
            logger.warning("falling back from %s to %s: %s", version, fallback, error.message)
            return await self._fall_back(
                version, fallback, error, inputs, parameters, deadline, client_deadline
            )

    async def _fall_back(
        self, version: str, fallback: str, error: ServingError, inputs: Tensors,
        parameters: dict[str, Any], deadline: float, client_deadline: bool,
    ) -> Served:  # fmt: skip
        self.fallbacks += 1
        outputs, config = await self._attempt(fallback, inputs, parameters, deadline, share=1.0,
                                              client_deadline=client_deadline)  # fmt: skip
        return Served(fallback, Decision.FALLBACK, outputs, config, version, _reason(error),
                      failure_is_evidence(error, client_deadline=client_deadline))  # fmt: skip

    async def _retry_lost(
        self, version: str, lost: ReplicaLost, inputs: Tensors, parameters: dict[str, Any],
        deadline: float, share: float, client_deadline: bool,
    ) -> tuple[Tensors, str]:  # fmt: skip
        pause_s = REPLICA_RETRY_PAUSE_S
        for _ in range(REPLICA_RETRIES):
            if self._clock() + pause_s >= deadline:
                break
            self.replica_retries += 1
            logger.warning("retrying %s on another replica: %s", version, lost.message)
            await asyncio.sleep(pause_s)
            pause_s *= 2
            try:
                return await self._attempt(version, inputs, parameters, deadline, share=share,
                                           client_deadline=client_deadline)  # fmt: skip
            except ReplicaLost as again:
                lost = again
        raise lost

    async def _attempt(
        self, version: str, inputs: Tensors, parameters: dict[str, Any], deadline: float,
        share: float, client_deadline: bool = False,
    ) -> tuple[Tensors, str]:  # fmt: skip
        breaker = self.breakers[version]
        if not breaker.allow():
            raise BreakerOpen(f"version {version!r} is failing (circuit breaker open)")
        remaining = deadline - self._clock()
        if remaining <= 0:
            breaker.release()
            raise DeadlineExceeded("the request's deadline passed before it could be served")
        timeout = remaining * share
        try:
            result = await self._call(version, inputs, parameters, timeout)
        except (InvalidInput, LoadShed, ReplicaLost):
            breaker.release()  # the request's fault, load shedding or a lost node: not the version's
            raise
        except DeadlineExceeded as error:
            if client_deadline:
                breaker.release()
                raise
            if not self._running(version):
                breaker.release()
                raise ReplicaWaitTimeout(error.message) from None
            breaker.record(False)
            raise
        except ServingError:
            breaker.record(False)
            raise
        except BaseException:  # cancelled (client went away) or a bug: no verdict
            breaker.release()
            raise
        breaker.record(True)
        return result["outputs"], result["config"]

    # -- shadow copies ---------------------------------------------------------------------------

    def maybe_shadow(
        self,
        table: TrafficTable,
        served: Served,
        inputs: Tensors,
        parameters: dict[str, Any],
        *,
        available: frozenset[str] | set[str],
        timeout_s: float,
    ) -> bool:
        """Start a shadow copy of a served request if the table says so; True if one started."""
        rule = table.shadow
        if rule is None or rule.version == served.version or rule.percent <= 0:
            return False
        if self._rng.random() * 100 >= rule.percent:
            return False
        stats = self.shadow_stats.setdefault(rule.version, ShadowStats())
        if (
            self._shadow_in_flight >= rule.max_in_flight
            or rule.version not in available
            or self._adapters[rule.version] is not self._adapters[served.version]
        ):
            stats.dropped += 1
            return False
        stats.sent += 1
        self._shadow_in_flight += 1
        task = asyncio.get_running_loop().create_task(
            self._shadow(rule.version, served, inputs, parameters, timeout_s, stats)
        )
        self._shadow_tasks.add(task)  # keep a reference until it finishes
        task.add_done_callback(self._shadow_tasks.discard)
        return True

    async def _shadow(
        self, version: str, served: Served, inputs: Tensors, parameters: dict[str, Any],
        timeout_s: float, stats: ShadowStats,
    ) -> None:  # fmt: skip
        started = self._clock()
        ok = False
        try:
            result = await self._call(version, inputs, parameters, timeout_s)
            stats.add(self._adapters[version].agreement(served.outputs, result["outputs"]))
            ok = True
        except Exception:  # a shadow's failure is counted, never seen by the client
            stats.failed += 1
        finally:
            self._shadow_in_flight -= 1
            if self._on_shadow is not None:
                self._on_shadow(version, ok, (self._clock() - started) * 1000)

    async def drain_shadows(self) -> None:
        """Wait for shadow copies in flight (tests and shutdown)."""
        if self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)


def fallback_is_evidence(
    reason: str | None, *, client_deadline: bool, version_available: bool
) -> bool:
    """Whether a request that fell back from a version counts as that version's failure in the
    rollout's gates (the client saw no error; the rollout must see real ones).

    Not evidence: load shedding (a full queue says nothing of the model); a replica lost under
    the request (its process or node died: the infrastructure's doing); a client's own short
    deadline; and a timeout while the version had no running replica (it waited on Serve
    replacing one). The breaker ignores all four too. Without these exclusions, killing a
    healthy candidate's only replica rolled the canary back in 4 of 6 chaos runs
    (`rollout bench chaos`). A version that never comes back is the progress deadline's to
    judge (`progress_deadline_s`), not the error gates'."""
    if reason in ("shed", "replica_lost"):
        return False
    if reason == "timeout" and (client_deadline or not version_available):
        return False
    return True


def failure_is_evidence(error: ServingError, *, client_deadline: bool) -> bool:
    """Whether a failed call counts against its version in the rollout's gates, whether the
    client then got a fallback's answer or the error (fallback_is_evidence, for the error)."""
    return fallback_is_evidence(
        _reason(error), client_deadline=client_deadline,
        version_available=not isinstance(error, ReplicaWaitTimeout),
    )  # fmt: skip


def _reason(error: ServingError) -> str:
    if isinstance(error, ReplicaLost):
        return "replica_lost"
    if isinstance(error, BreakerOpen):
        return "breaker_open"
    if isinstance(error, LoadShed):
        return "shed"
    if isinstance(error, DeadlineExceeded):
        return "timeout"
    if isinstance(error, Unavailable):
        return "unavailable"
    return "error"
