"""Feedback on answered requests: which version answered a request id, and outcomes per version.

    parse_feedback(body, max_items)    validate a POST body; InvalidInput names the field
    RequestLedger(max_entries, ttl_s)  request id -> version that answered it (and the routing
                                       unit); bounded, with TTL
    OutcomeBook                        outcome name -> version -> ArmStats, each (id, outcome)
                                       counted once; continuous values clipped to the gates'
                                       bounds; per-unit moments for a cluster-robust variance;
                                       CUPED covariates from a frozen pre-period table
    PrePeriodBook(max_units)           unit -> outcome -> version -> (sum, count) of outcomes
                                       before a rollout, for CUPED; bounded, oldest dropped

Where each piece runs. Router replicas keep a small local ledger of the ids they answered and
push new records to the rollout controller with their stats (~250 ms). The controller keeps
the global ledger and the OutcomeBook: feedback may reach another router replica than the one
that answered, and a duplicate must be counted once whichever replica it reaches. The router
that takes a feedback forwards it with the version its own ledger knows (a hint), which covers
feedback sent before the record's push reached the controller.

Unknown or expired. A record answers feedback for `ttl_s` after its request was answered;
after that, until it is dropped (at 2 x ttl_s, or sooner when `max_entries` pushes the oldest
out), feedback for it is 410 Gone: the id was real, its window has closed. An id never seen,
or already dropped, is 404.

Outcome kinds. A JSON boolean is a binary outcome (click, conversion); a number is continuous
(rating, revenue). The first value of an outcome name fixes its kind for the book: a rating
sent as `true` later is a 400, not silently mixed into another test.

Bounds. A continuous outcome that a lift gate judges is declared with [min_value, max_value];
the book clips (winsorises) each value to them and counts how many it clipped, so one value
(a forged revenue of 1e6) cannot dominate the test. Undeclared outcomes are clipped to
+-MAX_ABS_OUTCOME only, which keeps every sum finite.

Units. Under sticky routing one user's outcomes are correlated; the unit of analysis is the
user. Routers send each answer's routing unit (a hash of its routing key; None for keyless
traffic, which makes the request its own unit). The book keeps, per arm, the running total of
each unit's cluster (`UNIT_CLUSTERS` of them, by a stable hash of the unit, so memory and the
persisted book stay bounded whatever the number of users; grouping whole users into clusters
keeps the variance cluster-robust) and the per-unit moments the sequential test needs.

CUPED. With `pre_period_s` set, the desk also keeps each unit's outcomes in a `PrePeriodBook`
(per unit, not per cluster: a cluster mixes users that land in different arms). A rollout's
start (`FeedbackDesk.reset`) freezes the units seen within pre_period_s, on the plan's stable
version, as the covariate table; the first time a unit's outcome is counted in an arm, its
pre-period (sum, count) joins its cluster's totals there, from which the arm's nine
`COVARIATE_MOMENTS` follow. Keyless answers have no unit and so no covariate.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydantic import Field

from app.config import NAME_PATTERN, StrictModel
from app.errors import Gone, InvalidInput, ModelNotFound, ServingError, http_status
from app.messages import FeedbackHint
from app.rollout.abtest import (
    COVARIATE_MOMENTS,
    MAX_ABS_OUTCOME,
    ArmStats,
    OutcomeKind,
    UnitMoments,
    confidence_interval,
)
from app.unicode import is_unicode

__all__ = [
    "FeedbackDesk",
    "FeedbackItem",
    "FeedbackSettings",
    "OutcomeBook",
    "PrePeriodBook",
    "RequestLedger",
    "parse_feedback",
    "MAX_ITEMS_PER_REQUEST",
    "MAX_REQUEST_ID_CHARS",
    "RANDOMISED_DECISIONS",
    "UNIT_CLUSTERS",
    "unit_cluster",
]

MAX_REQUEST_ID_CHARS = 256
MAX_ITEMS_PER_REQUEST = 1000  # feedback items one POST may carry
# Decisions whose answers make an A/B arm: the router chose the version by the traffic split.
# Pinned answers (chosen by the client) and fallbacks (served by another version than the one
# chosen) are answered and accepted, but not counted in an arm.
RANDOMISED_DECISIONS = frozenset({"sticky", "weighted"})
# Clusters per arm that routing units (users) are hashed into. Whole users per cluster keep
# the variance cluster-robust (users in one cluster are independent of each other); 256 bound
# the book's memory and its persisted size (~6 KB per arm) and still give the variance 255
# degrees of freedom: the correlated-users scenario of bench/abtest.py, which simulates these
# clusters, keeps its A/A false promotions within alpha (docs/benchmarks.md).
UNIT_CLUSTERS = 256
_NAME = re.compile(NAME_PATTERN)


def unit_cluster(unit: str) -> int:
    """The cluster (0 <= c < UNIT_CLUSTERS) of a routing unit; the same in every process (blake2b,
    not the per-process salted hash())."""
    digest = hashlib.blake2b(unit.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % UNIT_CLUSTERS


class FeedbackSettings(StrictModel):
    """How long answered request ids stay open for feedback (RolloutController user_config
    `feedback`)."""

    ttl_s: float = Field(
        default=3600.0, gt=0, le=7 * 24 * 3600,
        description="Seconds after the answer during which feedback for a request id counts.",
    )  # fmt: skip
    max_request_ids: int = Field(
        default=500_000, ge=1000, le=20_000_000,
        description="Request ids remembered at most (oldest dropped first; ~400 bytes each).",
    )  # fmt: skip
    max_outcomes: int = Field(
        default=32, ge=1, le=1000,
        description="Distinct outcome names counted at most (a new name beyond them is a 400).",
    )  # fmt: skip
    pre_period_s: float = Field(
        default=0.0, ge=0, le=90 * 24 * 3600,
        description=(
            "Seconds of each user's outcomes before a rollout starts kept for CUPED (lift "
            "gates with cuped: true); 0 keeps none."
        ),
    )  # fmt: skip
    max_pre_period_units: int = Field(
        default=100_000, ge=100, le=5_000_000,
        description=(
            "Users whose pre-period outcomes are kept at most (the least recently seen "
            "dropped first, and counted)."
        ),
    )  # fmt: skip


@dataclass(frozen=True)
class FeedbackItem:
    """One outcome for one answered request."""

    request_id: str
    outcome: str
    value: float
    kind: OutcomeKind

    def to_dict(self) -> dict[str, Any]:
        value: Any = bool(self.value) if self.kind is OutcomeKind.BINARY else self.value
        return {"request_id": self.request_id, "outcome": self.outcome, "value": value}


def _item(data: Any, where: str) -> FeedbackItem:
    if not isinstance(data, dict):
        raise InvalidInput(f"{where} must be an object with request_id, outcome and value")
    unknown = sorted(set(data) - {"request_id", "outcome", "value"})
    if unknown:
        raise InvalidInput(
            f"{where}: unknown field(s) {unknown}; expected request_id, outcome, value"
        )
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not request_id.strip():
        raise InvalidInput(
            f"{where}.request_id must be a non-empty string (the x-request-id of the answer)"
        )
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(f"{where}.request_id is longer than {MAX_REQUEST_ID_CHARS} characters")
    if not is_unicode(request_id):
        raise InvalidInput(f"{where}.request_id is not valid Unicode (it holds a lone surrogate)")
    outcome = data.get("outcome")
    if not isinstance(outcome, str) or not _NAME.fullmatch(outcome):
        raise InvalidInput(
            f"{where}.outcome must be a name such as 'click' or 'revenue' "
            f"(lowercase letters, digits, '_', '.', '-'), got {outcome!r}"
        )
    value = data.get("value")
    if isinstance(value, bool):
        return FeedbackItem(request_id, outcome, float(value), OutcomeKind.BINARY)
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:  # a JSON integer with hundreds of digits
            number = math.inf
        if math.isfinite(number):
            return FeedbackItem(request_id, outcome, number, OutcomeKind.CONTINUOUS)
    raise InvalidInput(
        f"{where}.value must be true/false (a binary outcome) or a finite number, got {value!r}"
    )


def parse_feedback(
    body: Any, max_items: int = MAX_ITEMS_PER_REQUEST
) -> tuple[list[FeedbackItem], bool]:
    """(items, batch): one object `{"request_id", "outcome", "value"}`, or a batch
    `{"feedback": [ ...objects... ]}`. InvalidInput names the offending field."""
    if isinstance(body, dict) and "feedback" in body:
        extra = sorted(set(body) - {"feedback"})
        if extra:
            raise InvalidInput(f"unknown field(s) {extra} beside 'feedback'")
        items = body["feedback"]
        if not isinstance(items, list) or not items:
            raise InvalidInput("feedback must be a non-empty list of {request_id, outcome, value}")
        if len(items) > max_items:
            raise InvalidInput(f"feedback has {len(items)} items; at most {max_items} per request")
        return [_item(x, f"feedback[{i}]") for i, x in enumerate(items)], True
    return [_item(body, "body")], False


class RequestLedger:
    """Request id -> (version, answered at): the oldest first, at most `max_entries`.

    Each entry also holds the outcome names already counted for it, so a repeated feedback is
    recognised. Time comes in as arguments (epoch seconds), never read here."""

    def __init__(self, max_entries: int, ttl_s: float) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        # id -> [version, answered at, outcomes counted (None: none yet), routing decision,
        #        routing unit (None: keyless, the request is its own unit)]
        self._entries: OrderedDict[str, list[Any]] = OrderedDict()
        self.dropped = 0

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def reconfigure(self, max_entries: int, ttl_s: float, now: float) -> None:
        self.max_entries, self.ttl_s = max_entries, ttl_s
        self._trim(now)

    def record(self, request_id: str, version: str, answered_at: float, now: float,
               decision: str | None = None, unit: str | None = None) -> None:  # fmt: skip
        """Remember who answered `request_id` (how the router chose it, and for whom). A
        repeated id keeps its first record (and what was counted for it): an id is one
        answer; only a unit the first record lacked (a router's hint) is filled in."""
        entry = self._entries.get(request_id)
        if entry is None:
            self._entries[request_id] = [version, answered_at, None, decision, unit]
        elif entry[4] is None and unit is not None:
            entry[4] = unit
        self._trim(now)

    def _trim(self, now: float) -> None:
        entries = self._entries
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.dropped += 1
        horizon = now - 2 * self.ttl_s
        while entries:
            first = next(iter(entries.values()))
            if first[1] >= horizon:
                break
            entries.popitem(last=False)
            self.dropped += 1

    def lookup(self, request_id: str, now: float) -> str:
        """The version that answered; ModelNotFound (404) if unknown, Gone (410) if expired."""
        entry = self._entries.get(request_id)
        if entry is None:
            raise ModelNotFound(
                f"request id {request_id!r} is unknown: no answer with that x-request-id is "
                f"remembered (ids are kept {self.ttl_s:g}s)"
            )
        if now - entry[1] > self.ttl_s:
            raise Gone(
                f"request id {request_id!r} was answered {now - entry[1]:.0f}s ago; feedback is "
                f"taken for {self.ttl_s:g}s"
            )
        return entry[0]

    def entry(self, request_id: str, now: float) -> tuple[str, float, str | None] | None:
        """(version, answered at, decision) while feedback for `request_id` is open; else None."""
        entry = self._entries.get(request_id)
        if entry is None or now - entry[1] > self.ttl_s:
            return None
        return entry[0], entry[1], entry[3]

    def answered(self, request_id: str) -> tuple[float, str | None]:
        """(answered at, decision) of a known id (after `lookup`)."""
        entry = self._entries[request_id]
        return entry[1], entry[3]

    def unit(self, request_id: str) -> str | None:
        """The routing unit an id was answered for; None if keyless or unknown."""
        entry = self._entries.get(request_id)
        return None if entry is None else entry[4]

    def counted(self, request_id: str, outcome: str) -> bool:
        """Whether `outcome` was already counted for `request_id` (False if unknown)."""
        entry = self._entries.get(request_id)
        return entry is not None and entry[2] is not None and outcome in entry[2]

    def counted_outcomes(self, request_id: str) -> list[str]:
        """The outcomes already counted for `request_id` (none if unknown)."""
        entry = self._entries.get(request_id)
        return sorted(entry[2]) if entry is not None and entry[2] else []

    def mark_counted(self, request_id: str, outcomes: list[str]) -> None:
        """Record outcomes counted elsewhere (a router's memory, after this ledger lost it)."""
        for outcome in outcomes:
            self.first_count(request_id, outcome)

    def hints(self, request_ids: Iterable[str], now: float) -> dict[str, FeedbackHint]:
        """A router's side of a feedback forward: what this ledger knows of each id (who
        answered, when, how it was chosen, the outcomes it saw taken, the unit), so a
        controller that lost its own record (a restart) still judges the id, and a repeat once."""
        hints: dict[str, FeedbackHint] = {}
        for request_id in request_ids:
            entry = self.entry(request_id, now)
            if entry is not None:
                hints[request_id] = FeedbackHint(
                    *entry, self.counted_outcomes(request_id), self.unit(request_id)
                )
        return hints

    def remember(self, outcomes: Iterable[tuple[str, str]],
                 results: Iterable[Mapping[str, Any]]) -> None:  # fmt: skip
        """After the controller answered a forward: mark each (request id, outcome) it took
        (`taken`: counted, kept in the pre-period, or a duplicate), for the next `hints`."""
        for (request_id, outcome), result in zip(outcomes, results):
            if taken(result) and request_id in self:
                self.first_count(request_id, outcome)

    def first_count(self, request_id: str, outcome: str) -> bool:
        """Mark `outcome` counted for `request_id`; False if it already was (a duplicate)."""
        entry = self._entries[request_id]
        counted = entry[2]
        if counted is None:
            entry[2] = {outcome}
            return True
        if outcome in counted:
            return False
        counted.add(outcome)
        return True


class _Tally:
    """One arm as the book counts it: plain numbers updated in place (an ArmStats is built per
    look), with the running total of each unit cluster so that the per-unit moments of
    `UnitMoments` are updated in O(1) per outcome."""

    __slots__ = ("clipped", "clusters", "cross", "n", "n_sq", "pre", "sum", "sum_sq",
                 "unit_sum_sq", "units")  # fmt: skip

    def __init__(self) -> None:
        self.n, self.sum, self.sum_sq, self.clipped = 0, 0.0, 0.0, 0
        self.units, self.unit_sum_sq, self.cross, self.n_sq = 0, 0.0, 0.0, 0.0
        self.clusters: dict[int, list[float]] = {}  # cluster -> [outcomes, sum]
        # CUPED: cluster -> [pre-period sum, pre-period count] of the units seen in this arm
        self.pre: dict[int, list[float]] = {}

    def add(self, value: float, cluster: int | None) -> None:
        """One outcome; `cluster` None: a unit of its own (a keyless answer)."""
        self.n += 1
        self.sum += value
        self.sum_sq += value * value
        before_n, before_sum = 0.0, 0.0
        if cluster is not None:
            total = self.clusters.setdefault(cluster, [0.0, 0.0])
            before_n, before_sum = total
            total[0], total[1] = before_n + 1, before_sum + value
        # (S + x)^2 - S^2, (S + x)(m + 1) - S m, (m + 1)^2 - m^2 for a unit with m outcomes, sum S
        self.units += before_n == 0
        self.unit_sum_sq += value * (2 * before_sum + value)
        self.cross += before_sum + value * (before_n + 1)
        self.n_sq += 2 * before_n + 1

    def add_pre(self, cluster: int, pre_sum: float, pre_n: float) -> None:
        """A unit's pre-period (sum, count), once, when its first outcome joins this arm."""
        total = self.pre.setdefault(cluster, [0.0, 0.0])
        total[0] += pre_sum
        total[1] += pre_n

    def covariates(self) -> tuple[float, ...]:
        """The nine COVARIATE_MOMENTS over clusters, from each cluster's (S, n) and (P, M)
        (O(clusters) per look; keyless units have no pre-period and add nothing)."""
        sums = [0.0] * len(COVARIATE_MOMENTS)
        for cluster, (p, m) in self.pre.items():
            n, s = self.clusters.get(cluster, (0.0, 0.0))
            for i, x in enumerate((p, m, p * p, p * m, m * m, s * p, s * m, n * p, n * m)):
                sums[i] += x
        return tuple(sums)

    def arm(
        self, kind: OutcomeKind, bounds: tuple[float, float] | None, cuped: bool = False
    ) -> ArmStats:
        units = UnitMoments(self.units, self.unit_sum_sq, self.cross, self.n_sq)
        covariates = self.covariates() if cuped else None
        return ArmStats(kind, self.n, self.sum, self.sum_sq, units, self.clipped, bounds,
                        covariates)  # fmt: skip

    def to_dict(self, kind: OutcomeKind) -> dict[str, Any]:
        return {
            "kind": kind.value, "n": self.n, "sum": self.sum, "sum_sq": self.sum_sq,
            "clipped": self.clipped,
            "units": [self.units, self.unit_sum_sq, self.cross, self.n_sq],
            "clusters": {str(c): total for c, total in self.clusters.items()},
            "pre": {str(c): total for c, total in self.pre.items()},
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> _Tally:
        """The inverse of `to_dict`; a book stored before units were kept reads as one unit
        per outcome (its clusters unknown, so later outcomes start new units)."""
        tally = cls()
        tally.n, tally.sum, tally.sum_sq = int(data["n"]), float(data["sum"]), float(data["sum_sq"])
        tally.clipped = int(data.get("clipped", 0))
        units = data.get("units")
        if units is None:
            units = [tally.n, tally.sum_sq, tally.sum, tally.n]
        tally.units, tally.unit_sum_sq = int(units[0]), float(units[1])
        tally.cross, tally.n_sq = float(units[2]), float(units[3])
        for cluster, (n, total) in (data.get("clusters") or {}).items():
            if not 0 <= int(cluster) < UNIT_CLUSTERS:
                raise ValueError(f"cluster {cluster} is not below {UNIT_CLUSTERS}")
            tally.clusters[int(cluster)] = [float(n), float(total)]
        for cluster, (pre_sum, pre_n) in (data.get("pre") or {}).items():
            if not 0 <= int(cluster) < UNIT_CLUSTERS:
                raise ValueError(f"cluster {cluster} is not below {UNIT_CLUSTERS}")
            tally.pre[int(cluster)] = [float(pre_sum), float(pre_n)]
        return tally


def _check_bounds(bounds: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
    checked = {}
    for outcome, (low, high) in bounds.items():
        low, high = float(low), float(high)
        if not -MAX_ABS_OUTCOME <= low < high <= MAX_ABS_OUTCOME:
            raise ValueError(
                f"bounds of {outcome!r} ({low}, {high}) must be increasing and within "
                f"+-{MAX_ABS_OUTCOME:g}"
            )
        checked[str(outcome)] = (low, high)
    return checked


# CUPED's frozen pre-period: outcome -> unit -> [sum, count, versions whose arm it joined]
CovariateTable = dict[str, dict[str, list[Any]]]


def _check_covariates(table: Mapping[str, Any] | None) -> CovariateTable | None:
    if table is None:
        return None
    checked: CovariateTable = {}
    for outcome, by_unit in table.items():
        rows = checked[str(outcome)] = {}
        for unit, (pre_sum, pre_n, versions) in by_unit.items():
            pre_sum, pre_n = float(pre_sum), float(pre_n)
            if not (math.isfinite(pre_sum) and math.isfinite(pre_n) and pre_n >= 0):
                raise ValueError(f"pre-period of unit {unit!r} ({pre_sum}, {pre_n}) is not a "
                                 "finite sum and count")  # fmt: skip
            rows[str(unit)] = [pre_sum, pre_n, [str(v) for v in versions]]
    return checked


class OutcomeBook:
    """Outcome name -> version -> arm, since `reset`; continuous values clipped to `bounds`
    (outcome -> (min_value, max_value), from the plan's lift gates) or else to
    +-MAX_ABS_OUTCOME.

    `covariates` (CUPED): the pre-period table frozen at the rollout's start; with it (even
    empty) every arm carries its nine COVARIATE_MOMENTS, without it (None) none."""

    def __init__(
        self,
        bounds: Mapping[str, Sequence[float]] | None = None,
        covariates: Mapping[str, Any] | None = None,
    ) -> None:
        self.kinds: dict[str, OutcomeKind] = {}
        self.tallies: dict[str, dict[str, _Tally]] = {}
        self.bounds = _check_bounds(bounds or {})
        self.covariates = _check_covariates(covariates)

    def reset(
        self,
        bounds: Mapping[str, Sequence[float]] | None = None,
        covariates: Mapping[str, Any] | None = None,
    ) -> None:
        self.bounds = _check_bounds(bounds or {})
        self.covariates = _check_covariates(covariates)
        self.kinds.clear()
        self.tallies.clear()

    def clip(self, item: FeedbackItem) -> float:
        """The value as counted: a continuous one clipped to its outcome's bounds."""
        if item.kind is not OutcomeKind.CONTINUOUS:
            return item.value
        low, high = self.bounds.get(item.outcome, (-MAX_ABS_OUTCOME, MAX_ABS_OUTCOME))
        return min(max(item.value, low), high)

    def check_kind(self, item: FeedbackItem, max_outcomes: int = 32) -> None:
        if item.outcome not in self.kinds and len(self.kinds) >= max_outcomes:
            raise InvalidInput(
                f"outcome: {item.outcome!r} would be outcome name number {len(self.kinds) + 1}; "
                f"at most {max_outcomes} are counted ({sorted(self.kinds)})"
            )
        kind = self.kinds.get(item.outcome)
        if kind is not None and kind is not item.kind:
            wanted = "true/false" if kind is OutcomeKind.BINARY else "a number"
            raise InvalidInput(
                f"value: outcome {item.outcome!r} is {kind.value} and takes {wanted}; "
                f"got {item.to_dict()['value']!r}"
            )

    def add(self, item: FeedbackItem, version: str, unit: str | None = None) -> None:
        """Count one outcome for `version`, answered for routing `unit` (None: keyless, the
        answer is a unit of its own). Never raises for a value parse_feedback accepted."""
        self.check_kind(item)
        self.kinds[item.outcome] = item.kind
        tally = self.tallies.setdefault(item.outcome, {}).get(version)
        if tally is None:
            tally = self.tallies[item.outcome][version] = _Tally()
        value = self.clip(item)
        if value != item.value:
            tally.clipped += 1
        cluster = None if unit is None else unit_cluster(unit)
        tally.add(value, cluster)
        if cluster is not None and self.covariates is not None:
            pre = self.covariates.get(item.outcome, {}).get(cast(str, unit))
            if pre is not None and version not in pre[2]:  # the unit's first outcome here
                pre[2].append(version)
                tally.add_pre(cluster, pre[0], pre[1])

    def _bounds_of(self, outcome: str) -> tuple[float, float] | None:
        if self.kinds.get(outcome) is not OutcomeKind.CONTINUOUS:
            return None
        return self.bounds.get(outcome)

    def arm(self, outcome: str, version: str) -> ArmStats | None:
        """That version's outcomes; an empty arm of the outcome's kind if the outcome has been
        seen but not for this version; None if the outcome has never been seen."""
        kind = self.kinds.get(outcome)
        if kind is None:
            return None
        tally = self.tallies.get(outcome, {}).get(version) or _Tally()
        return tally.arm(kind, self._bounds_of(outcome), self.covariates is not None)

    @property
    def arms(self) -> dict[str, dict[str, ArmStats]]:
        """Every outcome's arms (outcome -> version -> ArmStats)."""
        return {
            outcome: {v: t.arm(self.kinds[outcome], self._bounds_of(outcome),
                               self.covariates is not None)
                      for v, t in by_version.items()}
            for outcome, by_version in self.tallies.items()
        }  # fmt: skip

    def clipped(self) -> dict[str, int]:
        """Outcome -> values clipped to its bounds so far (outcomes with any)."""
        counts = {o: sum(t.clipped for t in by_v.values()) for o, by_v in self.tallies.items()}
        return {outcome: n for outcome, n in counts.items() if n}

    def to_dict(self) -> dict[str, Any]:
        return {
            outcome: {v: t.to_dict(self.kinds[outcome]) for v, t in by_version.items()}
            for outcome, by_version in self.tallies.items()
        }

    @classmethod
    def from_dict(
        cls,
        data: dict[str, Any],
        bounds: Mapping[str, Sequence[float]] | None = None,
        covariates: Mapping[str, Any] | None = None,
    ) -> OutcomeBook:
        book = cls(bounds, covariates)
        for outcome, by_version in data.items():
            for version, a in by_version.items():
                book.kinds[outcome] = OutcomeKind(a["kind"])
                book.tallies.setdefault(outcome, {})[version] = _Tally.from_dict(a)
                book.arm(outcome, version)  # validates what was read (ValueError)
        return book

    def summary(self, level: float = 0.95) -> dict[str, dict[str, dict[str, Any]]]:
        """Per outcome and version: samples, units (users), mean and its fixed-horizon
        interval at `level` (for display; the gates use the sequential test, which is safe to
        peek at), and for a continuous outcome the values clipped to its bounds."""
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for outcome, by_version in self.arms.items():
            for version, arm in by_version.items():
                row: dict[str, Any] = {"kind": arm.kind.value, "n": arm.n,
                                       "units": arm.unit_count, "mean": arm.mean}  # fmt: skip
                if arm.kind is OutcomeKind.CONTINUOUS:
                    row["clipped"] = arm.clipped
                    if arm.bounds is not None:
                        row["min_value"], row["max_value"] = arm.bounds
                if arm.n >= 2:
                    interval = confidence_interval(arm, level)
                    row.update(low=interval.low, high=interval.high, level=level)
                result.setdefault(outcome, {})[version] = row
        return result


class PrePeriodBook:
    """Each unit's outcomes before a rollout, for CUPED: unit (the routing-unit hash) ->
    outcome -> version -> [sum, count], with the time of its latest answer.

    Per unit, not per cluster: a cluster mixes users that land in different arms, and only a
    unit's own past predicts its outcomes. Bounded like the request ledger: at most
    `max_units` units, the least recently seen dropped first (counted in `dropped`), and a
    unit with no answer within the window is dropped when `trim` reaches it. The window is
    per unit: a unit's sums run from its first outcome after it was last dropped, so a user
    who never pauses for a whole window may add up more than `pre_period_s`; every sum still
    comes from before the rollout that freezes it, which is what keeps CUPED unbiased."""

    def __init__(self, max_units: int) -> None:
        self.max_units = max_units
        # unit -> [latest answer's time, {outcome: {version: [sum, count]}}], least recent first
        self._units: OrderedDict[str, list[Any]] = OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._units)

    def clear(self) -> None:
        self._units.clear()

    def add(self, unit: str, outcome: str, version: str, value: float, answered_at: float,
            now: float, window_s: float) -> None:  # fmt: skip
        """One counted outcome of an answer the traffic split chose for `unit`."""
        entry = self._units.get(unit)
        if entry is None:
            entry = self._units[unit] = [answered_at, {}]
        else:
            entry[0] = max(entry[0], answered_at)
            self._units.move_to_end(unit)
        total = entry[1].setdefault(outcome, {}).setdefault(version, [0.0, 0.0])
        total[0] += value
        total[1] += 1.0
        self.trim(now, window_s)

    def trim(self, now: float, window_s: float) -> None:
        units = self._units
        while len(units) > self.max_units:
            units.popitem(last=False)
            self.dropped += 1
        horizon = now - window_s
        while units and next(iter(units.values()))[0] < horizon:
            units.popitem(last=False)  # expired: its last answer left the window

    def freeze(self, now: float, window_s: float, version: str) -> CovariateTable:
        """The covariate table at a rollout's start `now`: outcome -> unit -> [sum, count,
        []] of the outcomes of `version` (the plan's stable one) of each unit whose latest
        answer is within `window_s` before `now`."""
        table: CovariateTable = {}
        horizon = now - window_s
        for unit, (latest, by_outcome) in self._units.items():
            if not horizon <= latest <= now:
                continue
            for outcome, by_version in by_outcome.items():
                total = by_version.get(version)
                if total is not None:
                    table.setdefault(outcome, {})[unit] = [total[0], total[1], []]
        return table

    def to_dict(self) -> dict[str, Any]:
        return {"dropped": self.dropped,
                "units": [[unit, at, by_outcome] for unit, (at, by_outcome) in self._units.items()]}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], max_units: int) -> PrePeriodBook:
        """The inverse of `to_dict`; not trimmed here (the next `add` or reconfigure does, so a
        restart before the settings are read keeps every unit)."""
        book = cls(max_units)
        book.dropped = int(data.get("dropped", 0))
        for unit, at, by_outcome in data.get("units") or []:
            totals = {
                str(o): {str(v): [float(t[0]), float(t[1])] for v, t in by_version.items()}
                for o, by_version in by_outcome.items()
            }
            book._units[str(unit)] = [float(at), totals]
        return book


def taken(result: Mapping[str, Any]) -> bool:
    """Whether a router that forwarded an item should remember its (request id, outcome) as
    taken, so that the hint it sends with a repeat says so (FeedbackHint's counted outcomes):
    counted in an arm, kept in the CUPED pre-period book, or a duplicate of either. A
    restarted controller has only the router's hint to keep that repeat out of its books."""
    return bool(result.get("counted") or result.get("pre_period") or result.get("duplicate"))


def rebase(now: float, sent_at: float | None) -> float:
    """What to add to a time stamped by another process's wall clock (a router's) to put it
    on this one's: `now - sent_at`, where `sent_at` is that clock when the message left, so
    the two clocks' skew cancels and only the message's transit (milliseconds: answers read
    as that much later) is left. 0 for a message without `sent_at` (an older router) or
    with one that is not a finite number."""
    if sent_at is None or not math.isfinite(sent_at):
        return 0.0
    return now - sent_at


class FeedbackDesk:
    """The controller's feedback accounting: the global ledger of answered request ids, the
    outcome book of the current experiment, and the counts shown in status. Pure: time comes
    in as arguments, persistence goes through `to_dict`/`from_dict` (and `dirty`).

    `versions` is the set of versions this app serves (None in version_apps mode: any name a
    router reports is taken)."""

    def __init__(
        self, versions: list[str] | None, settings: FeedbackSettings | None = None
    ) -> None:
        self.versions = versions
        self.settings = settings or FeedbackSettings()
        self.ledger = RequestLedger(self.settings.max_request_ids, self.settings.ttl_s)
        self.book = OutcomeBook()
        self.pre_period = PrePeriodBook(self.settings.max_pre_period_units)
        self.counts = {"counted": 0, "duplicate": 0, "excluded": 0, "unknown": 0,
                       "expired": 0, "invalid": 0}  # fmt: skip
        self.started_at = 0.0  # answers from before the current experiment are not counted
        self.dirty = False  # the book changed since the last `to_dict` was stored

    def reconfigure(self, settings: FeedbackSettings, now: float) -> None:
        self.settings = settings
        self.ledger.reconfigure(settings.max_request_ids, settings.ttl_s, now)
        self.pre_period.max_units = settings.max_pre_period_units
        if settings.pre_period_s > 0:
            self.pre_period.trim(now, settings.pre_period_s)
        elif len(self.pre_period):
            self.pre_period.clear()  # CUPED off: its data are not kept
            self.dirty = True

    def reset(
        self,
        now: float,
        bounds: Mapping[str, Sequence[float]] | None = None,
        stable: str | None = None,
    ) -> None:
        """A new rollout is a new experiment: outcomes from before it do not count. `bounds`:
        outcome -> (min_value, max_value) its continuous values are clipped to, the plan's
        `gates.outcome_bounds()`. With `pre_period_s` set and the plan's `stable` version
        given, the pre-period book's units within the window on that version are frozen as
        the experiment's CUPED covariates."""
        table = None
        if self.settings.pre_period_s > 0 and stable is not None:
            table = self.pre_period.freeze(now, self.settings.pre_period_s, stable)
        self.book.reset(bounds, table)
        self.started_at = now
        self.dirty = True

    def record_served(
        self, served: Iterable[Sequence[Any]], now: float, sent_at: float | None = None
    ) -> None:
        """Answers routers pushed: ServedAnswer tuples (id, version, answered at, decision,
        unit); older routers' shorter tuples read as no decision and no unit. `sent_at`: the
        router's wall clock when it sent them; their times are moved onto this clock
        (`rebase`), so a router whose clock runs ahead or behind neither lets answers from
        before the experiment into its arms nor keeps later ones out (F16)."""
        shift = rebase(now, sent_at)
        for request_id, version, answered_at, *rest in served:
            decision = rest[0] if rest else None
            unit = rest[1] if len(rest) > 1 and rest[1] is not None else None
            self.ledger.record(str(request_id), str(version), float(answered_at) + shift, now,
                               decision, None if unit is None else str(unit))  # fmt: skip

    def count(
        self,
        items: Iterable[Mapping[str, Any]],
        hints: Mapping[str, Sequence[Any]],
        now: float,
        sent_at: float | None = None,
    ) -> list[dict[str, Any]]:
        """Count outcomes for answered requests. `items` are parsed FeedbackItem dicts (with
        `kind`); `hints` what the forwarding router's own ledger knows of an id (FeedbackHint:
        version, answered at, decision, outcomes it saw counted), its times on the router's
        clock, which read `sent_at` when it sent them (moved onto this clock, as in
        `record_served`). One result per item: counted, duplicate, excluded (a pinned or
        fallback answer, or one from before the current experiment: accepted, not in an A/B
        arm), or an error with its HTTP status (404 unknown, 410 expired, 400 wrong kind or
        too many outcome names)."""
        shift = rebase(now, sent_at)
        results = []
        for raw in items:
            item = FeedbackItem(str(raw["request_id"]), str(raw["outcome"]), float(raw["value"]),
                                OutcomeKind(raw["kind"]))  # fmt: skip
            result: dict[str, Any] = {"request_id": item.request_id, "outcome": item.outcome}
            try:
                self._take_hint(item.request_id, hints.get(item.request_id), now, shift)
                result.update(self._count_one(item, now))
            except ServingError as exc:
                status = http_status(exc)
                result.update(counted=False, status=status, error=exc.message)
                self.counts[{404: "unknown", 410: "expired"}.get(status, "invalid")] += 1
            results.append(result)
        return results

    def _take_hint(
        self, request_id: str, hint: Sequence[Any] | None, now: float, shift: float
    ) -> None:
        if hint is None or (self.versions is not None and hint[0] not in self.versions):
            return
        unit = hint[4] if len(hint) > 4 and hint[4] is not None else None
        self.ledger.record(request_id, str(hint[0]), float(hint[1]) + shift, now,
                           hint[2] if len(hint) > 2 else None,
                           None if unit is None else str(unit))  # fmt: skip
        if len(hint) > 3 and request_id in self.ledger:
            self.ledger.mark_counted(request_id, [str(o) for o in hint[3]])

    def _count_one(self, item: FeedbackItem, now: float) -> dict[str, Any]:
        version = self.ledger.lookup(item.request_id, now)
        self.book.check_kind(item, self.settings.max_outcomes)
        answered_at, decision = self.ledger.answered(item.request_id)
        excluded = None
        if decision is not None and decision not in RANDOMISED_DECISIONS:
            excluded = f"a {decision} answer is not part of the traffic split's A/B arms"
        elif answered_at < self.started_at:
            excluded = "answered before the current rollout (experiment) started"
        if excluded is not None:
            self.counts["excluded"] += 1
            randomised = decision is None or decision in RANDOMISED_DECISIONS
            result: dict[str, Any] = {"version": version, "counted": False}
            if randomised and self._keep_pre_period(item, version, answered_at, now, True):
                excluded += " (kept in the pre-period for the next rollout's CUPED)"
                result["pre_period"] = True  # the router remembers it as taken (`taken`)
            return {**result, "excluded": excluded}
        if self.ledger.first_count(item.request_id, item.outcome):
            self.book.add(item, version, self.ledger.unit(item.request_id))
            self._keep_pre_period(item, version, answered_at, now, False)
            self.dirty = True
            self.counts["counted"] += 1
            return {"version": version, "counted": True}
        self.counts["duplicate"] += 1
        return {"version": version, "counted": False, "duplicate": True}

    def _keep_pre_period(
        self, item: FeedbackItem, version: str, answered_at: float, now: float, mark: bool
    ) -> bool:
        """Keep a randomised answer's outcome in the pre-period book (CUPED on, a keyed
        answer, the first time this (id, outcome) comes): what a later rollout's covariates
        come from. `mark`: the outcome was not counted in an arm (an answer from before the
        experiment), so mark it counted in the ledger here, which keeps a repeat out. Whether
        it was kept."""
        window = self.settings.pre_period_s
        unit = self.ledger.unit(item.request_id)
        if window <= 0 or unit is None:
            return False
        if mark and not self.ledger.first_count(item.request_id, item.outcome):
            return False
        self.pre_period.add(unit, item.outcome, version, self.book.clip(item), answered_at,
                            now, window)  # fmt: skip
        self.dirty = True
        return True

    def arms(self, versions: Sequence[str]) -> dict[str, dict[str, ArmStats]]:
        """Outcome name -> version -> ArmStats of the current experiment, for the gates."""
        # arm() is None only for an outcome not in kinds, and these all are.
        return {
            outcome: {v: cast(ArmStats, self.book.arm(outcome, v)) for v in versions}
            for outcome in self.book.kinds
        }

    def status(self) -> dict[str, Any]:
        return {
            **self.counts,
            "request_ids_remembered": len(self.ledger),
            "ttl_s": self.settings.ttl_s,
            # continuous values clipped to their declared bounds, per outcome
            "clipped": self.book.clipped(),
            "bounds": {o: list(b) for o, b in self.book.bounds.items()},
            "pre_period": self._pre_period_status(),
        }

    def _pre_period_status(self) -> dict[str, Any]:
        """CUPED's data: units kept for the next rollout (and dropped at the bound), and the
        units per outcome in the current experiment's frozen table (null: no table)."""
        table = self.book.covariates
        return {
            "pre_period_s": self.settings.pre_period_s,
            "units": len(self.pre_period),
            "max_units": self.pre_period.max_units,
            "dropped": self.pre_period.dropped,
            "covariate_units": None if table is None else {o: len(t) for o, t in table.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """What survives a controller restart: the experiment's start, its outcome bounds and
        its outcome book, and for CUPED the experiment's covariate table and the pre-period
        book collecting the next one's."""
        return {
            "started_at": self.started_at,
            "bounds": {o: list(b) for o, b in self.book.bounds.items()},
            "book": self.book.to_dict(),
            "covariates": self.book.covariates,
            "pre_period": self.pre_period.to_dict(),
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Load `to_dict`'s output; ValueError, KeyError or TypeError if it is unreadable."""
        book = OutcomeBook.from_dict(data["book"], data.get("bounds"), data.get("covariates"))
        started_at = float(data["started_at"])
        pre_period = PrePeriodBook.from_dict(
            data.get("pre_period") or {}, self.settings.max_pre_period_units
        )
        self.book, self.started_at, self.pre_period = book, started_at, pre_period
