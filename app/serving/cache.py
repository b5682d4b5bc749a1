"""The router's response cache: a version-scoped key and a bounded LRU with a TTL.

Step 2 of the request path (DESIGN.md). The key names the model, the version and the traffic
generation as well as the request, so a cached answer from one version is never served as
another's, and a new traffic generation (a new rollout declaration) starts from a cold cache
without anyone having to flush it.

Bounds: at most `max_entries` entries and `max_bytes` bytes (an entry's size is its body plus
its headers' UTF-8 lengths); a single entry over `max_bytes / 4` is not stored at all, so one
huge response cannot wipe out the working set. Freshness: an entry lives `ttl_s` seconds from
when it was stored; reading it refreshes its recency, not its age.

Counters (cumulative, for metrics): `hits`, `misses`, `evictions` (entries pushed out by the
entry or byte bound), `expirations` (entries found past their TTL and removed), `rejected`
(responses too large to store). `clear()` and disabling remove entries without counting them.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import numbers
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from app.config.router import CacheSettings

__all__ = ["CacheSettings", "CachedResponse", "ResponseCache", "cache_key"]

# Bumped whenever the key's layout changes, so old and new layouts can never collide.
_KEY_VERSION = b"rollout-cache-key/1"


@dataclass(frozen=True)
class CachedResponse:
    """A stored response. `headers` is a read-only view; copy it before adding to it."""

    body: bytes
    headers: Mapping[str, str]


# -- the key -------------------------------------------------------------------------------------


def cache_key(
    model: str,
    version: str,
    generation: str | int,
    inputs: Mapping[str, np.ndarray],
    parameters: Mapping[str, Any],
    outputs: Sequence[str],
) -> str:
    """A sha256 hex digest that is equal for two requests exactly when they ask the same thing.

    Canonical: inputs are taken in name order and parameters are JSON with sorted keys, so the
    order a client wrote them in does not matter. Exact: every field is written with a length
    prefix, every array with its dtype and shape, and BYTES elements one by one with their
    lengths, so no two different requests share one byte stream (['ab', 'c'] vs ['a', 'bc'],
    shape [2, 3] vs [3, 2] with the same data, int32 vs float32 with the same bits).

    `outputs` keeps its order (it is the order of the response's outputs); empty means "all
    outputs", as in the protocol. `parameters` must be JSON-serializable (they come from JSON).
    """
    h = hashlib.sha256(_KEY_VERSION)
    _put_str(h, model)
    _put_str(h, version)
    _put_str(h, str(generation))
    _put_count(h, len(inputs))
    for name in sorted(inputs):
        _put_str(h, name)
        _put_array(h, inputs[name])
    _put_str(h, json.dumps(dict(parameters), sort_keys=True, separators=(",", ":"), allow_nan=True))
    outputs = list(outputs or ())
    _put_count(h, len(outputs))
    for name in outputs:
        _put_str(h, name)
    return h.hexdigest()


def _put_count(h: Any, n: int) -> None:
    h.update(struct.pack("<Q", n))


def _put_bytes(h: Any, data: bytes) -> None:
    _put_count(h, len(data))
    h.update(data)


def _put_str(h: Any, text: str) -> None:
    _put_bytes(h, text.encode("utf-8"))


def _put_array(h: Any, array: np.ndarray) -> None:
    array = np.asarray(array)
    _put_count(h, array.ndim)
    for dim in array.shape:
        _put_count(h, dim)
    if array.dtype.kind == "O":
        # BYTES tensors: numpy object arrays. Each element is tagged with its type and
        # length-prefixed, in C order, so element boundaries are part of the key.
        _put_str(h, "object")
        for item in array.ravel(order="C"):
            _put_object(h, item)
        return
    _put_str(h, array.dtype.str)  # includes byte order and item size: '<f4', '<U3', '|b1'
    _put_bytes(h, np.ascontiguousarray(array).tobytes())


def _put_object(h: Any, item: Any) -> None:
    if isinstance(item, str):
        h.update(b"s")
        _put_str(h, item)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        h.update(b"b")
        _put_bytes(h, bytes(item))
    elif isinstance(item, (bool, np.bool_)):
        h.update(b"t" if item else b"f")
    elif isinstance(item, numbers.Integral):
        h.update(b"i")
        _put_str(h, str(int(item)))  # object arrays hold ints too wide for int64
    elif isinstance(item, numbers.Real):
        h.update(b"r")
        _put_str(h, repr(float(item)))
    else:
        raise TypeError(f"cannot build a cache key from a {type(item).__name__} tensor element")


# -- the store -----------------------------------------------------------------------------------


@dataclass
class _Entry:
    response: CachedResponse
    size: int
    stored_at: float


class ResponseCache:
    """A bounded LRU of responses with a TTL, one per router replica.

    An `OrderedDict` holds the entries, least recently used first: a hit moves its entry to the
    end, and eviction pops from the front until both the entry bound and the byte bound hold.
    Expiry is checked when an entry is read (and by `purge_expired`), against `stored_at +
    ttl_s` with the *current* `ttl_s`, so lowering the TTL takes effect at once.

    Disabled, `get` and `put` do nothing and count nothing (a disabled cache has no hit rate).

    Not thread-safe by design: a router replica runs one event loop, and every method here is
    synchronous, so calls never interleave. Do not share one across threads.
    """

    def __init__(self, settings: CacheSettings, clock: Callable[[], float]) -> None:
        self._settings = settings
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.expirations = 0
        self.rejected = 0

    @property
    def settings(self) -> CacheSettings:
        return self._settings

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> CachedResponse | None:
        """The fresh response stored under `key`, or None (a miss; an expired entry is removed)."""
        if not self._settings.enabled:
            return None
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if self._expired(entry, self._clock()):
            self._remove(key)
            self.expirations += 1
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.response

    def put(self, key: str, body: builtins.bytes, headers: Mapping[str, str]) -> None:
        """Store a response (replacing any under `key`), then evict down to the bounds."""
        if not self._settings.enabled:
            return
        size = len(body) + sum(len(k.encode()) + len(v.encode()) for k, v in headers.items())
        if size > self._settings.max_bytes // 4:
            self.rejected += 1
            return
        if key in self._entries:
            self._remove(key)
        response = CachedResponse(body=bytes(body), headers=MappingProxyType(dict(headers)))
        self._entries[key] = _Entry(response=response, size=size, stored_at=self._clock())
        self._bytes += size
        self._shrink()

    def clear(self) -> None:
        """Drop every entry (counters are kept: they are cumulative)."""
        self._entries.clear()
        self._bytes = 0

    def purge_expired(self) -> int:
        """Remove every expired entry now (O(entries)); returns how many. For a periodic task."""
        now = self._clock()
        stale = [key for key, entry in self._entries.items() if self._expired(entry, now)]
        for key in stale:
            self._remove(key)
        self.expirations += len(stale)
        return len(stale)

    def reconfigure(self, settings: CacheSettings) -> None:
        """Apply new settings in place: evict down to smaller bounds; disabling clears."""
        self._settings = settings
        if not settings.enabled:
            self.clear()
            return
        self._shrink()

    def stats(self) -> dict[str, int]:
        return {
            "entries": self.entries,
            "bytes": self.bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "expirations": self.expirations,
            "rejected": self.rejected,
        }

    # -- internals ---------------------------------------------------------------------------

    def _expired(self, entry: _Entry, now: float) -> bool:
        return now - entry.stored_at >= self._settings.ttl_s

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size

    def _shrink(self) -> None:
        settings = self._settings
        while self._entries and (
            len(self._entries) > settings.max_entries or self._bytes > settings.max_bytes
        ):
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.size
            self.evictions += 1
