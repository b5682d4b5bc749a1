"""The response cache: the canonical key, LRU and byte bounds, TTL with a fake clock."""

from __future__ import annotations

import re

import numpy as np
import pytest
from pydantic import ValidationError

from app.serving.cache import CachedResponse, CacheSettings, ResponseCache, cache_key
from tests.support.fakes import FakeClock


def make(**overrides) -> tuple[ResponseCache, FakeClock]:
    clock = FakeClock()
    base = dict(enabled=True, max_entries=100, max_bytes=1024 * 1024, ttl_s=60.0)
    base.update(overrides)
    return ResponseCache(CacheSettings(**base), clock), clock


def bytes_tensor(*items: str) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = list(items)
    return array


# -- the key --------------------------------------------------------------------------------------

BASE = dict(
    model="recommender",
    version="v1",
    generation="7",
    inputs={
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "text": bytes_tensor("hello", "world"),
    },
    parameters={"top_k": 5, "temperature": 0.5},
    outputs=["scores"],
)


def key(**changes) -> str:
    return cache_key(**{**BASE, **changes})


def test_key_is_sha256_hex_and_stable():
    k = key()
    assert re.fullmatch(r"[0-9a-f]{64}", k)
    assert key() == k


def test_key_ignores_dict_order():
    inputs = dict(reversed(list(BASE["inputs"].items())))
    parameters = {"temperature": 0.5, "top_k": 5}
    assert list(inputs) != list(BASE["inputs"]) and list(parameters) != list(BASE["parameters"])
    assert key(inputs=inputs, parameters=parameters) == key()


def test_key_ignores_memory_layout():
    ids = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    assert not ids.flags.c_contiguous
    assert key(inputs={**BASE["inputs"], "ids": ids}) == key()


def test_key_ignores_parameter_nested_order():
    a = key(parameters={"opts": {"a": 1, "b": [1, 2]}})
    b = key(parameters={"opts": {"b": [1, 2], "a": 1}})
    assert a == b


def changed_ids(array: np.ndarray) -> dict:
    return {**BASE["inputs"], "ids": array}


IDS = np.arange(6, dtype=np.int64)


@pytest.mark.parametrize(
    "label, changes",
    [
        ("model", dict(model="recommender2")),
        ("version", dict(version="v2")),
        ("generation", dict(generation="8")),
        ("one element", dict(inputs=changed_ids(np.array([[0, 1, 2], [3, 4, 9]], np.int64)))),
        ("dtype, same bits", dict(inputs=changed_ids(IDS.reshape(2, 3).view(np.float64)))),
        ("dtype, same values", dict(inputs=changed_ids(IDS.reshape(2, 3).astype(np.int32)))),
        ("shape [3,2] vs [2,3]", dict(inputs=changed_ids(IDS.reshape(3, 2)))),
        ("shape [6] vs [2,3]", dict(inputs=changed_ids(IDS))),
        ("input renamed", dict(inputs={"ids2": IDS.reshape(2, 3), "text": BASE["inputs"]["text"]})),
        ("input missing", dict(inputs={"ids": BASE["inputs"]["ids"]})),
        ("bytes element", dict(inputs={**BASE["inputs"], "text": bytes_tensor("hello", "World")})),
        ("parameter value", dict(parameters={"top_k": 6, "temperature": 0.5})),
        ("parameter type", dict(parameters={"top_k": "5", "temperature": 0.5})),
        ("parameter added", dict(parameters={**BASE["parameters"], "seed": 1})),
        ("no parameters", dict(parameters={})),
        ("other output", dict(outputs=["embedding"])),
        ("all outputs", dict(outputs=[])),
        ("more outputs", dict(outputs=["scores", "embedding"])),
    ],
)
def test_key_is_sensitive(label, changes):
    assert key(**changes) != key(), label


def test_key_output_order_matters():
    assert key(outputs=["a", "b"]) != key(outputs=["b", "a"])


def test_key_bytes_split_is_not_ambiguous():
    def k(*items):
        return key(inputs={"text": bytes_tensor(*items)})

    assert k("ab", "c") != k("a", "bc")
    assert k("abc") != k("ab", "c")
    assert k("", "a") != k("a", "")
    assert k("a") != k("a", "")


def test_key_bytes_shape_matters():
    flat = bytes_tensor("a", "b", "c", "d")
    assert key(inputs={"t": flat.reshape(2, 2)}) != key(inputs={"t": flat})
    assert key(inputs={"t": flat.reshape(2, 2)}) != key(inputs={"t": flat.reshape(4, 1)})


def test_key_bytes_vs_unicode_and_str_vs_bytes():
    as_object = bytes_tensor("ab", "c")
    as_unicode = np.array(["ab", "c"])
    raw = np.empty(2, dtype=object)
    raw[:] = [b"ab", b"c"]
    keys = {key(inputs={"t": a}) for a in (as_object, as_unicode, raw)}
    assert len(keys) == 3


def test_key_object_array_holds_wide_ints():
    wide = np.array([2**64 - 1, 1], dtype=object)
    other = np.array([2**64 - 2, 1], dtype=object)
    assert key(inputs={"u": wide}) != key(inputs={"u": other})


def test_key_field_boundaries_are_unambiguous():
    # Without length prefixes, model+version "ab"+"c" and "a"+"bc" would hash the same bytes.
    assert key(model="ab", version="c") != key(model="a", version="bc")
    assert key(version="v1", generation="23") != key(version="v12", generation="3")


def test_key_generation_int_and_str_agree():
    assert key(generation=7) == key(generation="7")


def test_key_rejects_unhashable_elements():
    odd = np.empty(1, dtype=object)
    odd[0] = {"not": "a string"}
    with pytest.raises(TypeError, match="dict"):
        key(inputs={"t": odd})


# -- settings -------------------------------------------------------------------------------------


def test_settings_defaults():
    s = CacheSettings()
    assert (s.enabled, s.max_entries, s.ttl_s) == (False, 10_000, 60.0)
    assert s.max_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    "field, value", [("max_entries", 0), ("max_bytes", 1023), ("ttl_s", 0), ("max_age", 1)]
)
def test_settings_reject_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        CacheSettings(**{field: value})


# -- the store ------------------------------------------------------------------------------------


def test_miss_then_hit():
    cache, _ = make()
    assert cache.get("k") is None
    cache.put("k", b"body", {"content-type": "application/json"})
    got = cache.get("k")
    assert got == CachedResponse(body=b"body", headers={"content-type": "application/json"})
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.entries == 1
    assert cache.bytes == len(b"body") + len("content-type") + len("application/json")


def test_cached_headers_are_read_only_copies():
    cache, _ = make()
    headers = {"x-model-version": "v1"}
    cache.put("k", b"x", headers)
    headers["x-model-version"] = "v2"
    got = cache.get("k")
    assert got.headers["x-model-version"] == "v1"
    with pytest.raises(TypeError):
        got.headers["x"] = "y"  # type: ignore[index]


def test_put_replaces_and_recounts_bytes():
    cache, _ = make()
    cache.put("k", b"a" * 100, {})
    cache.put("k", b"b" * 10, {})
    assert cache.entries == 1 and cache.bytes == 10
    assert cache.get("k").body == b"b" * 10


def test_ttl_expiry():
    cache, clock = make(ttl_s=60.0)
    cache.put("k", b"body", {})
    clock.advance(59.9)
    assert cache.get("k") is not None
    clock.advance(0.1)
    assert cache.get("k") is None
    assert cache.entries == 0 and cache.bytes == 0
    assert (cache.hits, cache.misses, cache.expirations, cache.evictions) == (1, 1, 1, 0)
    assert cache.get("k") is None  # gone: a plain miss now
    assert (cache.misses, cache.expirations) == (2, 1)


def test_get_does_not_extend_ttl():
    cache, clock = make(ttl_s=10.0)
    cache.put("k", b"body", {})
    for _ in range(9):
        clock.advance(1.0)
        assert cache.get("k") is not None
    clock.advance(1.0)
    assert cache.get("k") is None


def test_put_again_restarts_ttl():
    cache, clock = make(ttl_s=10.0)
    cache.put("k", b"old", {})
    clock.advance(8.0)
    cache.put("k", b"new", {})
    clock.advance(8.0)
    assert cache.get("k").body == b"new"


def test_purge_expired():
    cache, clock = make(ttl_s=10.0)
    cache.put("old1", b"x", {})
    cache.put("old2", b"x", {})
    clock.advance(5.0)
    cache.put("young", b"x", {})
    clock.advance(5.0)
    assert cache.purge_expired() == 2
    assert cache.entries == 1 and cache.bytes == 1 and cache.expirations == 2
    assert cache.get("young") is not None


def test_lru_evicts_least_recently_used():
    cache, _ = make(max_entries=3)
    for k in "abc":
        cache.put(k, k.encode(), {})
    assert cache.get("a") is not None  # a is now the most recent: b is the oldest
    cache.put("d", b"d", {})
    assert cache.entries == 3 and cache.evictions == 1
    assert cache.get("b") is None
    assert all(cache.get(k) is not None for k in "acd")


def test_lru_without_gets_is_insertion_order():
    cache, _ = make(max_entries=2)
    cache.put("a", b"a", {})
    cache.put("b", b"b", {})
    cache.put("c", b"c", {})
    assert cache.get("a") is None
    assert cache.get("b") is not None and cache.get("c") is not None


def test_byte_bound_enforced():
    cache, _ = make(max_entries=1000, max_bytes=4096)
    for i in range(10):
        cache.put(f"k{i}", b"x" * 1000, {})  # each 1000 bytes: at most 4 fit
        assert cache.bytes <= 4096
    assert cache.entries == 4 and cache.bytes == 4000
    assert cache.evictions == 6
    assert [cache.get(f"k{i}") is not None for i in range(10)] == [False] * 6 + [True] * 4


def test_byte_bound_counts_headers():
    cache, _ = make(max_entries=1000, max_bytes=4096)
    headers = {"h": "v" * 99}  # 100 bytes
    for i in range(4):
        cache.put(f"k{i}", b"x" * 900, headers)  # 1000 bytes each with headers
    assert cache.entries == 4 and cache.bytes == 4000
    cache.put("k4", b"x" * 200, {})
    assert cache.entries == 4 and cache.bytes == 3200
    assert cache.get("k0") is None


def test_entry_bound_and_byte_bound_both_hold():
    cache, _ = make(max_entries=3, max_bytes=4096)
    for i in range(5):
        cache.put(f"small{i}", b"x", {})
    assert cache.entries == 3
    cache.put("big1", b"x" * 1024, {})
    cache.put("big2", b"x" * 1024, {})
    cache.put("big3", b"x" * 1024, {})
    assert cache.entries == 3 and cache.bytes == 3 * 1024  # entry bound pushed out the smalls
    cache.reconfigure(cache.settings.model_copy(update={"max_entries": 10}))
    cache.put("big4", b"x" * 1024, {})
    cache.put("big5", b"x" * 1024, {})  # now the byte bound binds: 5 KiB > 4 KiB
    assert cache.entries == 4 and cache.bytes == 4096
    assert cache.get("big1") is None and cache.get("big5") is not None


def test_oversize_entry_not_stored():
    cache, _ = make(max_bytes=4096)
    cache.put("keep", b"x", {})
    cache.put("huge", b"x" * 1025, {})  # over max_bytes / 4
    assert cache.get("huge") is None
    assert cache.get("keep") is not None
    assert cache.rejected == 1 and cache.evictions == 0
    cache.put("edge", b"x" * 1024, {})  # exactly a quarter: stored
    assert cache.get("edge") is not None


def test_oversize_replacement_keeps_the_fresh_old_entry():
    cache, _ = make(max_bytes=4096)
    cache.put("k", b"small", {})
    cache.put("k", b"x" * 2000, {})
    # Not stored; the old body stays (still fresh, and the same key means the same request).
    assert cache.get("k").body == b"small"
    assert cache.bytes == len(b"small")


def test_clear():
    cache, _ = make()
    cache.put("a", b"a", {})
    cache.get("a")
    cache.clear()
    assert cache.entries == 0 and cache.bytes == 0
    assert cache.get("a") is None
    assert cache.hits == 1  # counters are cumulative


def test_disabled_cache_stores_and_counts_nothing():
    cache, _ = make(enabled=False)
    cache.put("k", b"body", {})
    assert cache.get("k") is None
    assert cache.entries == 0
    assert cache.stats() == dict(
        entries=0, bytes=0, hits=0, misses=0, evictions=0, expirations=0, rejected=0
    )


def test_reconfigure_shrinking_evicts_oldest():
    cache, _ = make(max_entries=10)
    for i in range(10):
        cache.put(f"k{i}", b"x" * 100, {})
    cache.get("k0")  # most recent now
    cache.reconfigure(cache.settings.model_copy(update={"max_entries": 3}))
    assert cache.entries == 3 and cache.evictions == 7
    assert {k for k in (f"k{i}" for i in range(10)) if cache.get(k)} == {"k8", "k9", "k0"}


def test_reconfigure_shrinking_bytes_evicts():
    cache, _ = make(max_bytes=10_000)
    for i in range(8):
        cache.put(f"k{i}", b"x" * 1000, {})
    cache.reconfigure(cache.settings.model_copy(update={"max_bytes": 3000}))
    assert cache.bytes <= 3000 and cache.entries == 3


def test_reconfigure_shorter_ttl_applies_to_stored_entries():
    cache, clock = make(ttl_s=60.0)
    cache.put("k", b"x", {})
    clock.advance(20.0)
    cache.reconfigure(cache.settings.model_copy(update={"ttl_s": 10.0}))
    assert cache.get("k") is None


def test_reconfigure_growing_keeps_entries():
    cache, _ = make(max_entries=2)
    cache.put("a", b"a", {})
    cache.put("b", b"b", {})
    cache.reconfigure(cache.settings.model_copy(update={"max_entries": 5}))
    assert cache.entries == 2 and cache.evictions == 0


def test_disabling_clears():
    cache, _ = make()
    cache.put("a", b"a", {})
    cache.reconfigure(cache.settings.model_copy(update={"enabled": False}))
    assert cache.entries == 0 and cache.bytes == 0
    cache.reconfigure(cache.settings.model_copy(update={"enabled": True}))
    assert cache.get("a") is None
