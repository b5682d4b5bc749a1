"""Feedback parsing, the request ledger (bounds, TTL, duplicates) and the outcome book."""

from __future__ import annotations

import pytest

from app.errors import Gone, InvalidInput, ModelNotFound, http_status
from app.rollout.abtest import OutcomeKind
from app.rollout.feedback import FeedbackSettings, OutcomeBook, RequestLedger, parse_feedback

T0 = 1_700_000_000.0


def test_parse_one_item_and_a_batch():
    items, batch = parse_feedback({"request_id": "r1", "outcome": "click", "value": True})
    assert not batch
    assert (items[0].request_id, items[0].outcome, items[0].value, items[0].kind) == (
        "r1", "click", 1.0, OutcomeKind.BINARY,
    )  # fmt: skip
    items, batch = parse_feedback({"feedback": [
        {"request_id": "r1", "outcome": "revenue", "value": 12.5},
        {"request_id": "r2", "outcome": "click", "value": False},
    ]})  # fmt: skip
    assert batch and [i.kind for i in items] == [OutcomeKind.CONTINUOUS, OutcomeKind.BINARY]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"outcome": "click", "value": True}, "body.request_id"),
        ({"request_id": "", "outcome": "click", "value": True}, "body.request_id"),
        ({"request_id": "r", "outcome": "Click!", "value": True}, "body.outcome"),
        ({"request_id": "r", "outcome": "click", "value": "yes"}, "body.value"),
        ({"request_id": "r", "outcome": "click", "value": float("nan")}, "body.value"),
        ({"request_id": "r", "outcome": "click", "value": 1, "extra": 1}, "unknown field"),
        ({"request_id": "r" * 300, "outcome": "click", "value": 1}, "body.request_id"),
        ({"feedback": []}, "feedback"),
        ({"feedback": [{"request_id": "r", "outcome": "click"}]}, "feedback[0].value"),
        ([1, 2], "body must be an object"),
    ],
)
def test_bad_feedback_names_the_field(body, field):
    with pytest.raises(InvalidInput, match=field.replace("[", r"\[").replace("]", r"\]")) as info:
        parse_feedback(body)
    assert http_status(info.value) == 400


def test_batch_size_is_bounded():
    body = {"feedback": [{"request_id": f"r{i}", "outcome": "c", "value": 1} for i in range(11)]}
    with pytest.raises(InvalidInput, match="at most 10"):
        parse_feedback(body, max_items=10)


def test_ledger_knows_unknown_expired_and_duplicates():
    ledger = RequestLedger(max_entries=1000, ttl_s=60)
    ledger.record("r1", "v2", T0, T0)
    assert ledger.lookup("r1", T0 + 59) == "v2"
    with pytest.raises(Gone, match="feedback is taken for 60s") as gone:
        ledger.lookup("r1", T0 + 61)
    assert http_status(gone.value) == 410
    with pytest.raises(ModelNotFound, match="unknown") as unknown:
        ledger.lookup("nope", T0)
    assert http_status(unknown.value) == 404
    assert ledger.first_count("r1", "click") is True
    assert ledger.first_count("r1", "click") is False  # a duplicate counts once
    assert ledger.first_count("r1", "revenue") is True  # another outcome of the same answer
    ledger.record("r1", "v1", T0 + 1, T0 + 1)  # a repeated id keeps its first answer
    assert ledger.lookup("r1", T0 + 2) == "v2"


def test_ledger_is_bounded_and_drops_the_oldest():
    ledger = RequestLedger(max_entries=1000, ttl_s=60)
    for i in range(1500):
        ledger.record(f"r{i}", "v1", T0, T0)
    assert len(ledger) == 1000 and ledger.dropped == 500
    with pytest.raises(ModelNotFound):
        ledger.lookup("r0", T0)
    assert ledger.lookup("r1499", T0) == "v1"
    # Past 2 x TTL records are dropped, not kept as 410 forever.
    ledger.record("late", "v2", T0 + 121, T0 + 121)
    assert len(ledger) == 1
    with pytest.raises(ModelNotFound):
        ledger.lookup("r1499", T0 + 121)


def test_outcome_book_counts_per_version_and_keeps_kinds_apart():
    book = OutcomeBook()
    click, *_ = parse_feedback({"request_id": "a", "outcome": "click", "value": True})[0]
    miss = parse_feedback({"request_id": "b", "outcome": "click", "value": False})[0][0]
    book.add(click, "v1")
    book.add(miss, "v1")
    book.add(click, "v2")
    assert book.arm("click", "v1").n == 2 and book.arm("click", "v1").mean == 0.5
    assert book.arm("click", "v3").n == 0  # seen outcome, version without feedback: empty arm
    assert book.arm("revenue", "v1") is None
    rating = parse_feedback({"request_id": "c", "outcome": "click", "value": 4.5})[0][0]
    with pytest.raises(InvalidInput, match="value: outcome 'click' is binary"):
        book.add(rating, "v1")
    restored = OutcomeBook.from_dict(book.to_dict())
    assert restored.to_dict() == book.to_dict()
    summary = book.summary()
    assert summary["click"]["v1"]["n"] == 2 and summary["click"]["v1"]["low"] < 0.5


def test_settings_are_strict():
    with pytest.raises(ValueError, match="ttl_s"):
        FeedbackSettings(ttl_s=0)
    with pytest.raises(ValueError, match="max_request_ids"):
        FeedbackSettings(max_request_ids=10)


def test_ledger_keeps_the_routing_decision_and_what_was_counted():
    ledger = RequestLedger(max_entries=1000, ttl_s=60)
    ledger.record("r1", "v2", T0, T0, "pinned")
    assert ledger.entry("r1", T0 + 1) == ("v2", T0, "pinned")
    assert ledger.answered("r1") == (T0, "pinned")
    assert not ledger.counted("r1", "click") and not ledger.counted("nope", "click")
    ledger.first_count("r1", "click")
    assert ledger.counted("r1", "click") and not ledger.counted("r1", "revenue")
    assert ledger.counted_outcomes("r1") == ["click"] and "r1" in ledger and "r2" not in ledger
    restarted = RequestLedger(max_entries=1000, ttl_s=60)  # a controller that lost its records
    restarted.record("r1", "v2", T0, T0 + 5, "pinned")  # from the router's hint
    restarted.mark_counted("r1", ledger.counted_outcomes("r1"))
    assert restarted.first_count("r1", "click") is False  # the repeat is still a duplicate
    assert ledger.entry("r1", T0 + 61) is None  # past the TTL: no hint


def test_huge_numbers_are_a_400_naming_the_value():
    with pytest.raises(InvalidInput, match="body.value"):
        parse_feedback({"request_id": "r", "outcome": "revenue", "value": 10**400})


def test_outcome_names_are_bounded():
    book = OutcomeBook()
    for i in range(3):
        book.add(parse_feedback({"request_id": "r", "outcome": f"o{i}", "value": 1})[0][0], "v1")
    extra = parse_feedback({"request_id": "r", "outcome": "o3", "value": 1})[0][0]
    with pytest.raises(InvalidInput, match="outcome: 'o3' would be outcome name number 4"):
        book.check_kind(extra, max_outcomes=3)
    book.check_kind(parse_feedback({"request_id": "r", "outcome": "o1", "value": 2})[0][0], 3)


# -- FeedbackDesk: the controller's accounting, pure ------------------------------------------


def _item(
    request_id: str, value: float = 1.0, outcome: str = "click", kind: str = "binary"
) -> dict:
    return {"request_id": request_id, "outcome": outcome, "value": value, "kind": kind}


def test_desk_counts_once_excludes_pinned_and_names_unknown_and_expired():
    from app.rollout.feedback import FeedbackDesk

    desk = FeedbackDesk(["v1", "v2"], FeedbackSettings(ttl_s=60))
    desk.reset(now=100.0)
    desk.record_served([("a", "v2", 101.0, "weighted"), ("p", "v2", 101.0, "pinned"),
                        ("old", "v1", 10.0, "sticky")], now=102.0)  # fmt: skip
    results = desk.count([_item("a"), _item("a"), _item("p"), _item("nope")], {}, now=103.0)
    assert [r.get("counted") for r in results] == [True, False, False, False]
    assert results[1]["duplicate"] is True
    assert "pinned answer" in results[2]["excluded"]
    assert results[3]["status"] == 404
    assert desk.book.arm("click", "v2").n == 1
    expired = desk.count([_item("a", outcome="buy")], {}, now=200.0)
    assert expired[0]["status"] == 410
    assert desk.status()["counted"] == 1 and desk.status()["unknown"] == 1
    assert desk.dirty


def test_desk_takes_a_routers_hint_for_an_answer_not_pushed_yet():
    from app.messages import FeedbackHint
    from app.rollout.feedback import FeedbackDesk

    desk = FeedbackDesk(["v1", "v2"])
    hint = FeedbackHint("v2", 50.0, "sticky", ["click"])  # this router already saw click counted
    results = desk.count([_item("h"), _item("h", outcome="buy")], {"h": hint}, now=51.0)
    assert results[0]["duplicate"] is True  # counted once, wherever it was counted
    assert results[1]["counted"] is True and results[1]["version"] == "v2"
    ignored = desk.count([_item("x")], {"x": FeedbackHint("v9", 50.0, "sticky", [])}, now=51.0)
    assert ignored[0]["status"] == 404  # a hint naming a version this app does not serve


@pytest.mark.parametrize("skew_s", [120.0, -120.0])
def test_a_routers_clock_skew_does_not_move_answers_across_the_experiments_start(skew_s):
    """F16, cross-host: a router stamps answers with its own wall clock. Its times are moved
    onto the controller's by the clock it sends with them, so an answer from before the
    experiment stays out of the arms with the router 2 minutes ahead, and one from after it
    counts with the router 2 minutes behind; pushed answers and a forwarding router's hints
    alike."""
    from app.messages import FeedbackHint
    from app.rollout.feedback import FeedbackDesk

    desk = FeedbackDesk(["v1", "v2"], FeedbackSettings(ttl_s=600))
    desk.reset(now=1000.0)  # the experiment starts at 1000 on the controller's clock
    router = skew_s  # router clock = controller clock + skew
    # Answered 5 s before the start and 5 s after it (controller time), pushed at 1010.
    desk.record_served([("before", "v2", 995.0 + router, "weighted"),
                        ("after", "v2", 1005.0 + router, "weighted")],
                       now=1010.0, sent_at=1010.0 + router)  # fmt: skip
    hints = {"hint-before": FeedbackHint("v2", 996.0 + router, "weighted", []),
             "hint-after": FeedbackHint("v2", 1006.0 + router, "weighted", [])}  # fmt: skip
    results = desk.count(
        [_item("before"), _item("after"), _item("hint-before"), _item("hint-after")],
        hints, now=1011.0, sent_at=1011.0 + router,
    )  # fmt: skip
    assert ["excluded" in r for r in results] == [True, False, True, False], results
    assert [r.get("counted") for r in results] == [False, True, False, True]
    assert desk.book.arm("click", "v2").n == 2


def test_answers_from_a_router_that_sends_no_clock_keep_their_times():
    """An older router sends no clock: its times are taken as they are (no rebase)."""
    from app.rollout.feedback import FeedbackDesk, rebase

    assert rebase(50.0, None) == 0.0 and rebase(50.0, float("nan")) == 0.0
    assert rebase(50.0, 45.0) == 5.0
    desk = FeedbackDesk(["v1", "v2"])
    desk.reset(now=100.0)
    desk.record_served([("a", "v2", 99.0, "weighted")], now=101.0)
    assert "excluded" in desk.count([_item("a")], {}, now=102.0)[0]


def test_desk_persists_its_experiment_and_book():
    from app.rollout.feedback import FeedbackDesk

    desk = FeedbackDesk(None)
    desk.reset(now=5.0)
    desk.record_served([("a", "v2", 6.0, "weighted")], now=6.0)
    desk.count([_item("a", value=3.5, outcome="revenue", kind="continuous")], {}, now=7.0)
    again = FeedbackDesk(None)
    again.restore(desk.to_dict())
    assert again.started_at == 5.0
    assert again.book.arm("revenue", "v2").sum == 3.5
    with pytest.raises((ValueError, KeyError, TypeError)):
        again.restore({"book": {}})


# -- bounds: a continuous value cannot dominate the test or overflow (issue 18, F2) ----------


def test_continuous_values_are_clipped_to_the_declared_bounds_and_counted():
    from app.rollout.feedback import FeedbackDesk

    desk = FeedbackDesk(["v1", "v2"])
    desk.reset(now=0.0, bounds={"revenue": (0.0, 500.0)})
    desk.record_served([(r, "v2", 1.0, "weighted") for r in "abcd"], now=1.0)
    values = {"a": 120.0, "b": 1e6, "c": -40.0, "d": 500.0}  # 500 is within: not clipped
    results = desk.count([_item(r, v, "revenue", "continuous") for r, v in values.items()], {},
                         now=2.0)  # fmt: skip
    assert all(r["counted"] for r in results)
    arm = desk.book.arm("revenue", "v2")
    assert (arm.n, arm.sum, arm.clipped, arm.bounds) == (4, 1120.0, 2, (0.0, 500.0))
    assert arm.sum_sq == 120.0**2 + 500.0**2 + 500.0**2
    assert desk.status()["clipped"] == {"revenue": 2}
    assert desk.status()["bounds"] == {"revenue": [0.0, 500.0]}
    row = desk.book.summary()["revenue"]["v2"]
    assert (row["clipped"], row["min_value"], row["max_value"]) == (2, 0.0, 500.0)
    # The bounds and the clipped counts survive a controller restart.
    again = FeedbackDesk(["v1", "v2"])
    again.restore(json_roundtrip(desk.to_dict()))
    assert again.book.arm("revenue", "v2") == arm
    again.record_served([("e", "v2", 3.0, "weighted")], now=3.0)
    again.count([_item("e", 9e9, "revenue", "continuous")], {}, now=3.0)
    assert again.book.arm("revenue", "v2").sum == 1620.0  # still clipped to 500
    with pytest.raises(ValueError, match="bounds of 'revenue'"):
        desk.reset(now=9.0, bounds={"revenue": (5.0, 5.0)})


def test_a_huge_value_is_counted_clipped_not_lost_and_the_batch_goes_on():
    """F2: `value: 1e200` made ArmStats raise after the id was marked counted (a 409, the item
    lost, the rest of the batch skipped). Undeclared outcomes are clipped to +-1e12, so the
    sums stay finite whatever comes."""
    from app.rollout.feedback import FeedbackDesk

    desk = FeedbackDesk(["v1", "v2"])
    desk.reset(now=0.0)
    desk.record_served([("a", "v2", 1.0, "weighted"), ("b", "v2", 1.0, "weighted")], now=1.0)
    results = desk.count([_item("a", 1e200, "revenue", "continuous"),
                          _item("b", -1e300, "revenue", "continuous")], {}, now=2.0)  # fmt: skip
    assert [r["counted"] for r in results] == [True, True]
    arm = desk.book.arm("revenue", "v2")
    assert (arm.n, arm.sum, arm.sum_sq, arm.clipped) == (2, 0.0, 2e24, 2)
    assert arm.bounds is None  # not a declared bound: only the safety limit applied


def json_roundtrip(data):
    import json

    return json.loads(json.dumps(data))


# -- units: one user's outcomes are one unit of analysis (issue 18 item 3) -------------------


def test_the_routing_unit_of_each_answer_reaches_the_arms():
    from app.messages import ServedAnswer
    from app.rollout.feedback import FeedbackDesk

    desk = FeedbackDesk(["v1", "v2"])
    desk.reset(now=0.0)
    served = [ServedAnswer(f"u1-{i}", "v2", 1.0, "sticky", "user-1") for i in range(3)]
    served += [
        ServedAnswer("u2-0", "v2", 1.0, "sticky", "user-2"),
        ServedAnswer("k-0", "v2", 1.0, "weighted"),  # keyless: a unit of its own
        ("old-router", "v2", 1.0, "weighted"),
    ]  # a 4-tuple from an older router
    desk.record_served(served, now=1.0)
    ids = ["u1-0", "u1-1", "u1-2", "u2-0", "k-0", "old-router"]
    desk.count([_item(r, 1.0 if r.startswith("u1") else 0.0) for r in ids], {}, now=2.0)
    arm = desk.book.arm("click", "v2")
    # user-1 (3 clicks), user-2, two keyless answers: 4 units
    assert arm.n == 6 and arm.units is not None and arm.unit_count == 4
    assert (arm.units.sum_sq, arm.units.cross, arm.units.n_sq) == (9.0, 9.0, 12.0)
    assert arm.design_effect > 1.5  # user-1's clicks are one unit's, not three independent ones
    row = desk.book.summary()["click"]["v2"]
    assert row["units"] == 4
    # Persisted and restored: later outcomes of the same user join the same unit.
    again = FeedbackDesk(["v1", "v2"])
    again.restore(json_roundtrip(desk.to_dict()))
    assert again.book.arm("click", "v2") == arm
    again.record_served([ServedAnswer("u1-3", "v2", 3.0, "sticky", "user-1")], now=3.0)
    again.count([_item("u1-3")], {}, now=3.0)
    assert again.book.arm("click", "v2").unit_count == 4
    assert again.book.arm("click", "v2").units.n_sq == 16.0 + 1 + 1 + 1


def test_a_hint_may_carry_the_unit_and_a_later_push_fills_a_missing_one():
    from app.rollout.feedback import FeedbackDesk

    desk = FeedbackDesk(["v1", "v2"])
    desk.reset(now=0.0)
    hint = ("v2", 1.0, "sticky", [], "user-9")  # FeedbackHint with a unit appended
    desk.count([_item("h1")], {"h1": hint}, now=2.0)
    assert desk.ledger.unit("h1") == "user-9"
    desk.count([_item("h2")], {"h2": ("v2", 1.0, "sticky", [])}, now=2.0)  # no unit in the hint
    assert desk.ledger.unit("h2") is None
    desk.record_served([("h2", "v2", 1.0, "sticky", "user-9")], now=3.0)
    assert desk.ledger.unit("h2") == "user-9"  # the push completes the record; the rest stays
    assert desk.ledger.entry("h2", 3.0) == ("v2", 1.0, "sticky")


def test_a_book_stored_before_units_reads_as_one_unit_per_outcome():
    from app.rollout.feedback import FeedbackDesk

    old = {"started_at": 5.0, "book": {"click": {
        "v2": {"kind": "binary", "n": 10, "sum": 3.0, "sum_sq": 3.0}}}}  # fmt: skip
    desk = FeedbackDesk(None)
    desk.restore(old)
    arm = desk.book.arm("click", "v2")
    assert (arm.n, arm.sum, arm.unit_count, arm.design_effect, arm.clipped) == (10, 3.0, 10, 1.0, 0)
