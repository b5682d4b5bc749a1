"""Where the rollout controller keeps what must survive its restart: the rollout state and the
current experiment's outcome book, as bytes under string keys.

`RolloutStore` is the interface (as Ray Serve's `KVStoreBase`); `GcsStore` keeps the values in
Ray's GCS key-value store (with GCS fault tolerance backed by Redis in production, so they
survive a head-node restart); `InMemoryStore` is its twin for unit tests of the controller's
logic. `Fence` is the epoch that keeps a superseded controller replica from writing. Ray-free
at import.
"""

from __future__ import annotations

import abc
import itertools
import json
import threading
import uuid
from typing import NamedTuple

from app import ray_compat
from app.constants import KV_NAMESPACE, KV_TIMEOUT_S

__all__ = ["Claim", "Fence", "GcsStore", "InMemoryStore", "RolloutStore", "StoreBusy"]


class RolloutStore(abc.ABC):
    """Bytes under string keys; `put` replaces."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value under `key`, or None if there is none."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`; raises if it could not be stored."""


class StoreBusy(OSError):
    """An earlier call to the store has not returned (the GCS is down or restarting)."""


class GcsStore(RolloutStore):
    """Ray's GCS key-value store, under one namespace, one call at a time.

    While the GCS is down, Ray 2.60's KV calls neither fail nor time out: each blocks its
    thread until a GCS answers again, then completes (queued writes land then, in the order
    they were sent). The controller waits for a call at most KV_TIMEOUT_S, in a thread of its
    event loop's default executor, so every call it gives up on would keep one of those few
    threads (min(32, CPUs + 4)) for the whole outage, starving the controller's other work in
    threads (Prometheus queries, Serve lookups) after a few seconds of it. So a call first
    waits up to KV_TIMEOUT_S for the one before it to return, and raises StoreBusy if it has
    not: at most one call is stuck on the GCS and one waits behind it. And a write that waited
    while a newer write of the same key was asked for is dropped with StoreBusy, never landed
    after it: the store only goes forward."""

    def __init__(self, namespace: str = KV_NAMESPACE, wait_s: float = KV_TIMEOUT_S) -> None:
        self.namespace = namespace
        self.wait_s = wait_s
        self._one_call = threading.Lock()
        self._asked = itertools.count(1)
        self._newest: dict[str, int] = {}  # key -> the number of the newest put asked for

    def _enter(self, what: str) -> None:
        if not self._one_call.acquire(timeout=self.wait_s):
            raise StoreBusy(
                f"GCS key-value store: {what} not sent, an earlier call has not returned in "
                f"{self.wait_s:g} s (is the GCS down?)"
            )

    def get(self, key: str) -> bytes | None:
        self._enter(f"read of {key!r}")
        try:
            return ray_compat.kv_get(key, self.namespace)
        finally:
            self._one_call.release()

    def put(self, key: str, value: bytes) -> None:
        mine = self._newest[key] = next(self._asked)
        self._enter(f"write of {key!r}")
        try:
            if self._newest[key] != mine:
                raise StoreBusy(f"GCS key-value store: write of {key!r} superseded by a newer one")
            ray_compat.kv_put(key, value, self.namespace)
        finally:
            self._one_call.release()


class InMemoryStore(RolloutStore):
    """A dict; `fail_puts` makes every put raise (to test what a failed write does)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.fail_puts = False

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> None:
        if self.fail_puts:
            raise OSError("store unavailable (InMemoryStore.fail_puts)")
        self.data[key] = value


class Claim(NamedTuple):
    """Who holds the fence: an epoch (counts controller starts, for people) and the token of
    the replica that took it (tells two claims of the same epoch apart)."""

    epoch: int
    token: str


class Fence:
    """The epoch under `key` that says which controller replica may write: the one that
    claimed it last.

    Serve updates a controller by starting a new replica while the old one drains (up to its
    graceful_shutdown_timeout_s, with routers' long-polls keeping it busy), and both tick. So
    each replica claims the fence when it starts, before it reads the state, and checks it
    before every write: once another replica has claimed, the old one's check fails and it
    stops writing, publishing and taking commands.

    GCS KV has no compare-and-swap (`kv_put` only overwrites), so a claim is read, increment,
    write, with a random token in the value: two replicas that start at the same instant may
    both write epoch N, and the last write wins; the other sees a token not its own on its first
    check, so at most one replica ever holds the fence. A check is a read before a write, not a
    condition on it: a write already on its way when a newer replica claims can still land
    (docs/rollouts.md says what that costs)."""

    def __init__(self, store: RolloutStore, key: str, token: str | None = None) -> None:
        self.store = store
        self.key = key
        self.mine = Claim(0, token or uuid.uuid4().hex)

    @property
    def epoch(self) -> int:
        return self.mine.epoch

    def claim(self) -> int:
        """Take the next epoch (blocking: a read and a write); raises if the write fails."""
        current = self.holder()
        self.mine = Claim((current.epoch if current else 0) + 1, self.mine.token)
        self.store.put(self.key, json.dumps(self.mine._asdict()).encode())
        return self.mine.epoch

    def holder(self) -> Claim | None:
        """Who holds the fence now (blocking: one read); None if no one (or unreadable)."""
        raw = self.store.get(self.key)
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            return Claim(int(data["epoch"]), str(data["token"]))
        except (ValueError, KeyError, TypeError):
            return None
