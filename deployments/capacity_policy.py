"""`CapacityFloorPolicy`: Serve's queue-length autoscaler, never below the rollout's floor.

Set per version deployment by `deployments/builder.py` when the model config opts in
(`autoscaling.capacity_aware: true`):

    autoscaling_config:
      upscale_delay_s: 0                      # the policy keeps the declared delay itself
      policy:
        policy_function: deployments.capacity_policy:CapacityFloorPolicy
        policy_kwargs: {model: recommender, version: v2, upscale_delay_s: 30, namespace: ...}

Before it raises a candidate's weight, the rollout controller publishes a replica floor for
the version in Ray's GCS key-value store (`deployments/capacity_floor.py`, key
`<app>/<model>/capacity/<version>`, where `<app>` is the Serve application the version runs
in). Serve instantiates this class once per deployment config in *its own controller's
process* and calls it every control-loop tick (0.1 s), synchronously, so:

* `__call__` never blocks: a daemon thread reads the key every `refresh_s` (0.5 s) into a
  cache and `__call__` only reads the cache;
* the floor counts only while it is fresh: a cache older than `stale_s` (5 s, a KV that
  stopped answering), a value past its `expires_at_s` (a controller that died) or no value
  at all is a floor of 0, so a broken KV only turns the feature off;
* the answer is `max(load, floor)`: the floor never lowers what the load asks for;
* the declared `upscale_delay_s` applies to the load part only, kept here in `policy_state`
  with the same timestamp logic as Serve's `_apply_delay_logic` (Serve's own delay, which
  wraps every custom policy, is set to 0 by the builder), so a floor rise is answered at once
  while a load spike still has to last. Scaling down stays Serve's (`downscale_delay_s`).

This module is cloudpickled by value into the Serve controller (ray/serve/config.py
`AutoscalingPolicy.serialize_policy`); what it imports at module top must import there, so it
imports only the standard library and Ray. The default KV reader imports `app.ray_compat`
lazily, in the refresh thread (the package is installed wherever Ray runs the app); if it
cannot, the floor stays 0 and the version scales on load alone.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy
from ray.serve.config import AutoscalingContext

__all__ = [
    "DEFAULT_REFRESH_S",
    "DEFAULT_STALE_S",
    "REQUESTS_IN_REPLICA",
    "CapacityFloorPolicy",
    "counted_in_requests",
    "floor_key",
    "request_load_policy",
]

logger = logging.getLogger("ray.serve")

DEFAULT_REFRESH_S = 0.5
DEFAULT_STALE_S = 5.0
# The rollout state's namespace (app.constants.KV_NAMESPACE), repeated: app is not imported here.
DEFAULT_NAMESPACE = "ray-rollout"
# policy_state keys; Serve's own are "__decision_counters" and "__decision_timestamp".
LOAD_UP_SINCE = "capacity_floor.load_up_since"
FLOOR_STATE = "capacity_floor.floor"
# As Serve's _DELAY_ELAPSED_EPS_S: a 30 s delay must not compare as 29.999999 s.
_EPS_S = 1e-6

KvRead = Callable[[str], bytes | None]
# What ModelServer.record_autoscaling_stats reports: the requests in the replica, each request a
# Router coalesced into one call (`infer_many`, app/serving/coalesce.py) counted on its own.
REQUESTS_IN_REPLICA = "rollout_requests_in_replica"


def counted_in_requests(ctx: AutoscalingContext) -> AutoscalingContext:
    """`ctx` with its load counted in requests rather than Serve calls.

    Serve counts ongoing and queued *calls* (`total_num_requests`); with Router -> model
    micro-batching one call carries several requests, so a version under load read as a few
    calls and never scaled out. The replicas report the requests they hold (REQUESTS_IN_REPLICA,
    averaged over the look-back window like Serve's own count); the load is their sum plus the
    calls still queued in handles, or Serve's count when that is larger (the two are sampled at
    different moments) or when no replica reported yet. Never below Serve's own count (so with
    micro-batching off it is Serve's count or a little above it, the two being sampled apart).
    Requests still waiting in a Router's coalescer for the next call are in neither count."""
    per_replica = (ctx.aggregated_metrics or {}).get(REQUESTS_IN_REPLICA)
    if not per_replica:
        return ctx
    requests = sum(per_replica.values()) + (ctx.total_queued_requests or 0.0)
    if not math.isfinite(requests) or requests <= ctx.total_num_requests:
        return ctx
    view = copy.copy(ctx)
    # `total_num_requests` is a cached_property: an instance attribute of that name wins.
    view.__dict__["total_num_requests"] = requests
    return view


def request_load_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Serve's queue-length policy over requests (`counted_in_requests`): what every version
    deployment that does not opt in to capacity-aware steps scales with. Serve wraps it with
    the same bounds, smoothing and delays as its default policy."""
    return replica_queue_length_autoscaling_policy(counted_in_requests(ctx))


def floor_key(app: str, model: str, version: str) -> str:
    """Where the floor of `version` (served in Serve application `app`) lives in the KV."""
    return f"{app}/{model}/capacity/{version}"


def _make_reader(read_kv: KvRead | None, namespace: str) -> KvRead:
    if read_kv is not None:
        return read_kv
    from app.ray_compat import kv_get  # lazily, in the thread: see the module docstring

    return lambda key: kv_get(key, namespace)


class _FloorCache:
    """What the refresh thread shares with the policy. Kept apart so that the thread holds no
    reference to the policy: Serve replaces the policy on a config change, and the finalizer
    then stops the old thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.floor: int | None = None  # None: no floor published (or an unreadable one)
        self.expires_at_s = 0.0
        self.read_at: float | None = None  # clock time of the last read that answered


def _parse(raw: bytes) -> tuple[int, float]:
    data = json.loads(raw)
    floor, expires = data["floor"], data["expires_at_s"]
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ValueError(f"floor ({floor!r}) must be an integer >= 0")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise ValueError(f"expires_at_s ({expires!r}) must be a number")
    return floor, float(expires)


def _refresh(cache: _FloorCache, read: KvRead, key: str, clock: Callable[[], float]) -> None:
    try:
        raw = read(key)
    except Exception:  # a KV that does not answer: the cache goes stale, the floor lapses
        logger.warning("capacity floor: reading %r failed", key, exc_info=True)
        return
    floor: int | None = None
    expires = 0.0
    if raw is not None:
        try:
            floor, expires = _parse(raw)
        except (ValueError, KeyError, TypeError):
            logger.warning("capacity floor: ignoring the unreadable value under %r", key)
    with cache.lock:
        cache.floor, cache.expires_at_s, cache.read_at = floor, expires, clock()


def _refresh_loop(
    cache: _FloorCache, make_read: Callable[[], KvRead], key: str,
    clock: Callable[[], float], interval_s: float,
) -> None:  # fmt: skip
    try:
        read = make_read()
    except Exception:
        logger.warning("capacity floor: no KV reader; the floor stays 0", exc_info=True)
        return
    while not cache.stop.is_set():
        _refresh(cache, read, key, clock)
        cache.stop.wait(interval_s)


class CapacityFloorPolicy:
    """A deployment-level Serve autoscaling policy: `max(queue-length policy, floor)`.

    `model` and `version` name the key (with the Serve application from the context);
    `upscale_delay_s` is the version's declared delay, applied here to the load part only.
    `read_kv` and `clock` are for tests (a fake reader and clock, no Ray); `background: false`
    leaves the cache to `refresh()` calls instead of a thread.
    """

    def __init__(
        self,
        model: str,
        version: str,
        upscale_delay_s: float = 0.0,
        namespace: str = DEFAULT_NAMESPACE,
        refresh_s: float = DEFAULT_REFRESH_S,
        stale_s: float = DEFAULT_STALE_S,
        app: str | None = None,
        replica_capacity_rps: float | None = None,
        headroom: float | None = None,
        read_kv: KvRead | None = None,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ) -> None:
        if not math.isfinite(upscale_delay_s) or upscale_delay_s < 0:
            raise ValueError(f"upscale_delay_s ({upscale_delay_s}) must be a finite number >= 0")
        if not refresh_s > 0 or not stale_s > 0:
            raise ValueError(f"refresh_s ({refresh_s}) and stale_s ({stale_s}) must be > 0")
        self.model, self.version, self.app = model, version, app
        # Not used here: the rollout controller reads them back from Serve's deployment
        # details to size the floor it publishes.
        self.replica_capacity_rps, self.headroom = replica_capacity_rps, headroom
        self.upscale_delay_s = float(upscale_delay_s)
        self.namespace = namespace
        self.refresh_s, self.stale_s = refresh_s, stale_s
        self._read_kv = read_kv
        self._clock = clock
        self._background = background
        self._cache = _FloorCache()
        self._started = False

    @property
    def key(self) -> str | None:
        return floor_key(self.app, self.model, self.version) if self.app is not None else None

    def refresh(self) -> None:
        """Read the floor once, now (what the thread does every `refresh_s`). Blocking."""
        if self.key is not None:
            _refresh(
                self._cache, _make_reader(self._read_kv, self.namespace), self.key, self._clock
            )

    def _ensure_refreshing(self, app: str | None) -> None:
        if self.app is None:
            self.app = app
        if self._started or not self._background or self.key is None:
            return
        self._started = True
        cache = self._cache
        # Nothing the thread holds refers to the policy (no bound method), or it would never
        # be collected and the finalizer below would never stop the thread.
        make_read = functools.partial(_make_reader, self._read_kv, self.namespace)
        threading.Thread(
            target=_refresh_loop,
            args=(cache, make_read, self.key, self._clock, self.refresh_s),
            name=f"capacity-floor-{self.model}-{self.version}",
            daemon=True,
        ).start()
        weakref.finalize(self, cache.stop.set)  # the policy replaced: stop its thread

    def floor(self, now: float) -> int:
        """The floor in force at `now`: 0 when none was read, the cache is stale or the value
        has expired. Never blocks on the KV."""
        cache = self._cache
        with cache.lock:
            floor, expires, read_at = cache.floor, cache.expires_at_s, cache.read_at
        if floor is None or read_at is None or now - read_at > self.stale_s or now >= expires:
            return 0
        return floor

    def __call__(self, ctx: AutoscalingContext) -> tuple[int, dict[str, Any]]:
        self._ensure_refreshing(ctx.app_name)
        now = ctx.current_time if ctx.current_time is not None else self._clock()
        floor = self.floor(now)
        load, _ = replica_queue_length_autoscaling_policy(counted_in_requests(ctx))
        load_desired = math.ceil(load)
        target = ctx.target_num_replicas

        state = dict(ctx.policy_state or {})
        since = state.get(LOAD_UP_SINCE)
        if load_desired > target:
            # The load asks for more: only once it has asked for upscale_delay_s in a row.
            if since is None:
                since = now
            if now - since + _EPS_S >= self.upscale_delay_s:
                load_answer, since = load_desired, None
            else:
                load_answer = target
        else:
            load_answer, since = load_desired, None
        state[LOAD_UP_SINCE] = since
        state[FLOOR_STATE] = floor
        return max(load_answer, floor), state
