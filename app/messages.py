"""The typed messages routers and the rollout controller exchange (over Ray actor calls).

    router ── report(stats, shadow, served) ──────────────────> controller   every ~250 ms
    router <─ wait_for_traffic(generation) -> TrafficOverride ── controller   long-poll
    router ── feedback(items, hints: {id: FeedbackHint}) ──────> controller   per feedback POST

NamedTuples are tuples: they pickle as tuples and unpack the same on the receiving side, so a
router and a controller on builds from before these types still understand each other.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, TypedDict

__all__ = [
    "SHADOW_DECLARED",
    "FeedbackHint",
    "ServedAnswer",
    "ShadowDelta",
    "StatsReport",
    "TrafficOverride",
]

# A TrafficOverride's `shadow` when the rollout leaves the router's declared shadow rule alone.
SHADOW_DECLARED = "declared"


class ServedAnswer(NamedTuple):
    """One answered request, pushed so that its feedback can be attributed."""

    request_id: str
    version: str
    answered_at: float  # epoch seconds, the router's clock
    decision: str | None  # the routing decision ("sticky", "weighted", "pinned", ...)
    # The unit of analysis of the A/B test: a hash of the routing key (the user), so that one
    # user's correlated outcomes count as one unit; None for keyless traffic (the request is
    # its own unit). Last and optional: 4-tuples from older routers read the same.
    unit: str | None = None


class FeedbackHint(NamedTuple):
    """What the router that takes a feedback POST knows of its request id (its own ledger),
    for feedback that arrives before that router's push reached the controller."""

    version: str
    answered_at: float
    decision: str | None
    counted: list[str]  # outcomes this router already saw counted for the id
    unit: str | None = None  # the routing unit (hashed user key) it was answered for


class TrafficOverride(TypedDict):
    """The traffic a rollout asks for, published by the controller; `generation` goes up by
    one per publish so routers can tell a change from a repeat."""

    generation: int
    weights: dict[str, float]
    stable: str
    # None: no shadow; {"version", "percent"}: mirror to the candidate; SHADOW_DECLARED: keep
    # the router's own shadow rule.
    shadow: dict[str, Any] | None | Literal["declared"]


# version -> RouterStats.drain() entry (requests, errors, latency histogram): JSON-safe.
StatsReport = dict[str, dict[str, Any]]


class ShadowDelta(TypedDict):
    """Shadow comparisons of one version since the router's last report."""

    compared: int
    top_k_overlap_sum: float
