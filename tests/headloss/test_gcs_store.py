"""GcsStore while the GCS is down, without Ray: Ray 2.60's KV calls then block until a GCS
answers (measured: a read and two writes made during a 8 s outage all returned when the new GCS
came up, the writes in the order sent), so the store lets one call at a time through and never
lands an older write after a newer one (deployments/store.py)."""

from __future__ import annotations

import threading
import time

import pytest

from app import ray_compat
from deployments.store import GcsStore, StoreBusy


class DownGcs:
    """ray_compat's KV calls against a GCS that is down until `up()`: calls block, then run."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.calls_waiting = 0
        self.most_waiting = 0
        self.data: dict[str, bytes] = {}
        self.landed: list[bytes] = []
        self.lock = threading.Lock()

    def _wait(self) -> None:
        with self.lock:
            self.calls_waiting += 1
            self.most_waiting = max(self.most_waiting, self.calls_waiting)
        self.running.wait()
        with self.lock:
            self.calls_waiting -= 1

    def kv_get(self, key: str, namespace: str) -> bytes | None:
        self._wait()
        return self.data.get(key)

    def kv_put(self, key: str, value: bytes, namespace: str) -> None:
        self._wait()
        with self.lock:
            self.data[key] = value
            self.landed.append(value)

    def up(self) -> None:
        self.running.set()


@pytest.fixture
def gcs(monkeypatch):
    down = DownGcs()
    monkeypatch.setattr(ray_compat, "kv_get", down.kv_get)
    monkeypatch.setattr(ray_compat, "kv_put", down.kv_put)
    yield down
    down.up()  # no thread left blocked


def in_thread(call, *args) -> tuple[threading.Thread, dict]:
    """Run `call(*args)` in a thread (as the controller's asyncio.to_thread does); the result
    or the exception lands in the dict."""
    out: dict = {}

    def run():
        try:
            out["value"] = call(*args)
        except Exception as exc:  # kept for the test to look at
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def test_one_call_waits_on_a_down_gcs_the_next_ones_give_up(gcs):
    store = GcsStore("ns", wait_s=0.2)
    stuck, stuck_out = in_thread(store.put, "state", b"s1")  # the controller gave up on it
    time.sleep(0.1)
    for call, args in [(store.get, ("epoch",)), (store.put, ("state", b"s2"))] * 3:
        with pytest.raises(StoreBusy, match="has not returned"):
            call(*args)
    assert gcs.most_waiting == 1  # one thread held by the GCS, not one per try
    gcs.up()
    stuck.join(5)
    assert stuck_out == {"value": None} and gcs.data == {"state": b"s1"}
    store.put("state", b"s3")  # the GCS is back: calls go through again
    assert store.get("state") == b"s3" and gcs.landed == [b"s1", b"s3"]


def test_an_older_write_never_lands_after_a_newer_one(gcs):
    store = GcsStore("ns", wait_s=5)
    first, _ = in_thread(store.put, "state", b"a")
    time.sleep(0.1)
    older, older_out = in_thread(store.put, "state", b"b")  # waits behind "a"
    time.sleep(0.1)
    newer, newer_out = in_thread(store.put, "state", b"c")  # asked for after "b"
    time.sleep(0.1)
    gcs.up()
    for thread in (first, older, newer):
        thread.join(5)
    assert isinstance(older_out.get("error"), StoreBusy), older_out  # dropped, not landed late
    assert newer_out == {"value": None}
    assert gcs.landed == [b"a", b"c"] and gcs.data["state"] == b"c"
