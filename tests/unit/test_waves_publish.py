"""The waves orchestrator tells every region of the waves file (all waves) the whole waves state
(`POST /admin/waves`, for each region's operator page), against the fake regions of
test_waves.py (real HTTP servers on 127.0.0.1). A region that refuses, is down or hangs never
fails or holds up a tick. No Ray."""

from __future__ import annotations

import json
import threading
from typing import Any

from app.config.waves import parse_waves_document
from app.ops.waves import PUBLISH_EVERY_S, WavesPhase
from tests.unit.test_waves import Clock, FakeRegion, _runner, _waves_file, world

__all__ = ["world"]  # the fixture, used by name


def _regions(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["region"]: r for wave in document["waves"] for r in wave["regions"]}


def test_every_region_of_every_wave_is_told_the_waves_state_after_a_change(world):
    root, regions = world
    for region in regions.values():
        region.start()
    clock = Clock()
    runner = _runner(root, _waves_file(root, [["a"], ["b", "c"]], bake_s=10), clock)
    with runner.lock:
        runner.tick()  # wave 1 starts: a is declared
        runner.publisher.wait()
        for name, region in regions.items():  # b and c too, though their wave has not come
            assert len(region.published) == 1, name
            document = region.published[0]
            parse_waves_document(document)  # what a region's router accepts
            assert document["name"] == "v2" and document["on_failure"] == "halt"
            assert document["published_at"] == clock() and document["current_wave"] == 0
            assert [w["state"] for w in document["waves"]] == ["running", "pending"]
            assert [w["index"] for w in document["waves"]] == [0, 1]
            assert _regions(document)["a"]["state"] == "starting"
            assert _regions(document)["b"]["state"] == _regions(document)["c"]["state"] == "pending"
        while not runner.done:
            clock.sleep(5)
            runner.tick()
        runner.publisher.wait()
    assert runner.phase is WavesPhase.SUCCEEDED
    for region in regions.values():
        last = region.published[-1]
        assert last["phase"] == "succeeded" and last["current_wave"] == 1
        assert {r["state"] for r in _regions(last).values()} == {"succeeded"}
        assert _regions(last)["b"]["weights"] == {"v1": 0.0, "v2": 100.0}
        times = [d["published_at"] for d in region.published]
        assert times == sorted(times)
    # The bake showed when it ends, on the orchestrator's clock.
    baking = [d for d in regions["a"].published if d["phase"] == "baking"]
    assert baking and baking[0]["waves"][0]["bake_until"] == baking[0]["published_at"] + 10


def test_an_unchanged_state_is_published_again_only_every_few_seconds(world):
    root, regions = world
    clock = Clock()  # no region answers: the state does not change between publishes
    runner = _runner(root, _waves_file(root, [["a"]]), clock)
    assert runner.publish_state()  # the first
    assert not runner.publish_state()  # the same state, no time passed
    clock.sleep(PUBLISH_EVERY_S / 2)
    assert not runner.publish_state()
    clock.sleep(PUBLISH_EVERY_S / 2)
    assert runner.publish_state()  # a heartbeat while the waves run
    runner.apply_command("pause")
    assert runner.publish_state()  # changed: at once
    assert runner.waves_document()["phase"] == "paused"
    runner.publisher.wait()


def test_a_region_that_refuses_or_is_down_does_not_fail_the_tick(world):
    root, regions = world
    regions["a"].start()
    regions["b"].start()
    regions["b"].waves_reply = 503  # refuses the waves state; its rollout API works
    lines: list[str] = []
    clock = Clock()  # c is down: nothing listens on its port (its wave never starts)
    runner = _runner(root, _waves_file(root, [["a", "b"], ["c"]], bake_s=1000), clock)
    runner.log = runner.publisher.log = lines.append
    with runner.lock:
        for _ in range(6):
            runner.tick()
            clock.sleep(5)
        runner.publisher.wait()
    assert runner.phase is WavesPhase.BAKING  # wave 1 went on as if nothing was wrong
    assert regions["a"].published and regions["b"].published == []
    assert "HTTP 503" in runner.publisher.errors["b"]
    assert "127.0.0.1" in runner.publisher.errors["c"]  # could not connect
    assert runner.publisher.errors["a"] is None
    # Logged once per region while the error stays the same, not once per publish.
    assert sum("publish the waves state to b" in line for line in lines) == 1, lines
    assert sum("publish the waves state to c" in line for line in lines) == 1, lines
    regions["b"].waves_reply = 200  # it takes them again
    clock.sleep(PUBLISH_EVERY_S)
    with runner.lock:
        runner.tick()
    runner.publisher.wait()
    assert regions["b"].published and runner.publisher.errors["b"] is None
    assert any("to b works again" in line for line in lines)


class HangingRegion(FakeRegion):
    """A region whose waves endpoint does not answer until `release` is set."""

    def __init__(self, name: str, port: int | None = None) -> None:
        super().__init__(name, port)
        self.release = threading.Event()
        self.arrived = threading.Event()

    def start(self) -> FakeRegion:
        super().start()
        handler = self.server.RequestHandlerClass  # type: ignore[union-attr]
        post = handler.do_POST
        region = self

        def do_post(self: Any) -> None:
            if self.path == "/admin/waves":
                region.arrived.set()
                region.release.wait(120)
            post(self)

        handler.do_POST = do_post
        return self


def test_a_region_that_hangs_holds_neither_the_tick_nor_the_other_regions(world):
    root, regions = world
    hanging = regions["b"] = HangingRegion("b", regions["b"].port)
    for region in regions.values():
        region.start()
    clock = Clock()
    runner = _runner(root, _waves_file(root, [["a"], ["b", "c"]]), clock)
    runner.publisher.timeout_s = 120  # b's first post stays on the way for the whole test
    try:
        with runner.lock:
            for _ in range(3):  # three ticks, each with a publish (a change or a heartbeat)
                runner.tick()
                assert hanging.arrived.wait(60)
                clock.sleep(5)
        # The ticks all returned while b's first post was unanswered, and not by giving up
        # on it: no error is recorded for b.
        assert hanging.published == [] and "b" not in runner.publisher.errors
        assert runner.publisher.wait(60, regions=["a", "c"])  # the others got every one
        assert len(regions["a"].published) == len(regions["c"].published) == 3
        assert not runner.publisher.wait(0)  # b's is still on the way
    finally:
        hanging.release.set()
    assert runner.publisher.wait(60)
    # b gets the first document, then only the latest: the one in between was replaced.
    sent = [d["published_at"] for d in regions["a"].published]
    assert [d["published_at"] for d in hanging.published] == [sent[0], sent[-1]]
    assert json.dumps(hanging.published[-1]) == json.dumps(regions["a"].published[-1])
