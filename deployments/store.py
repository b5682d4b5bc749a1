"""Where the rollout controller keeps what must survive its restart: the rollout state and the
current experiment's outcome book, as bytes under string keys.

`RolloutStore` is the interface (as Ray Serve's `KVStoreBase`); `GcsStore` keeps the values in
Ray's GCS key-value store (with GCS fault tolerance backed by Redis in production, so they
survive a head-node restart); `InMemoryStore` is its twin for unit tests of the controller's
logic. Ray-free at import.
"""

from __future__ import annotations

import abc

from app import ray_compat
from app.constants import KV_NAMESPACE

__all__ = ["GcsStore", "InMemoryStore", "RolloutStore"]


class RolloutStore(abc.ABC):
    """Bytes under string keys; `put` replaces."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The value under `key`, or None if there is none."""

    @abc.abstractmethod
    def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`; raises if it could not be stored."""


class GcsStore(RolloutStore):
    """Ray's GCS key-value store, under one namespace."""

    def __init__(self, namespace: str = KV_NAMESPACE) -> None:
        self.namespace = namespace

    def get(self, key: str) -> bytes | None:
        return ray_compat.kv_get(key, self.namespace)

    def put(self, key: str, value: bytes) -> None:
        ray_compat.kv_put(key, value, self.namespace)


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
