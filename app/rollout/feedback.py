"""Feedback on answered requests: which version answered a request id, and outcomes per version.

    parse_feedback(body, max_items)    validate a POST body; InvalidInput names the field
    RequestLedger(max_entries, ttl_s)  request id -> version that answered it; bounded, with TTL
    OutcomeBook                        outcome name -> version -> ArmStats, each (id, outcome)
                                       counted once

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
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from pydantic import Field

from app.config import NAME_PATTERN, StrictModel
from app.errors import Gone, InvalidInput, ModelNotFound, ServingError, http_status
from app.rollout.abtest import ArmStats, OutcomeKind, confidence_interval
from app.unicode import is_unicode

__all__ = [
    "FeedbackDesk",
    "FeedbackItem",
    "FeedbackSettings",
    "OutcomeBook",
    "RequestLedger",
    "parse_feedback",
    "MAX_ITEMS_PER_REQUEST",
    "MAX_REQUEST_ID_CHARS",
    "RANDOMISED_DECISIONS",
]

MAX_REQUEST_ID_CHARS = 256
MAX_ITEMS_PER_REQUEST = 1000  # feedback items one POST may carry
# Decisions whose answers make an A/B arm: the router chose the version by the traffic split.
# Pinned answers (chosen by the client) and fallbacks (served by another version than the one
# chosen) are answered and accepted, but not counted in an arm.
RANDOMISED_DECISIONS = frozenset({"sticky", "weighted"})
_NAME = re.compile(NAME_PATTERN)


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
        # id -> [version, answered at, outcomes counted (None: none yet), routing decision]
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
               decision: str | None = None) -> None:  # fmt: skip
        """Remember who answered `request_id` (and how the router chose it). A repeated id
        keeps its first record (and what was counted for it): an id is one answer."""
        if request_id not in self._entries:
            self._entries[request_id] = [version, answered_at, None, decision]
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


class OutcomeBook:
    """Outcome name -> version -> ArmStats, since `reset`."""

    def __init__(self) -> None:
        self.kinds: dict[str, OutcomeKind] = {}
        self.arms: dict[str, dict[str, ArmStats]] = {}

    def reset(self) -> None:
        self.kinds.clear()
        self.arms.clear()

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

    def add(self, item: FeedbackItem, version: str) -> None:
        self.check_kind(item)
        self.kinds[item.outcome] = item.kind
        by_version = self.arms.setdefault(item.outcome, {})
        arm = by_version.get(version) or ArmStats(item.kind)
        by_version[version] = arm.add(item.value)

    def arm(self, outcome: str, version: str) -> ArmStats | None:
        """That version's outcomes; an empty arm of the outcome's kind if the outcome has been
        seen but not for this version; None if the outcome has never been seen."""
        kind = self.kinds.get(outcome)
        if kind is None:
            return None
        return self.arms.get(outcome, {}).get(version) or ArmStats(kind)

    def to_dict(self) -> dict[str, Any]:
        return {
            outcome: {
                version: {"kind": a.kind.value, "n": a.n, "sum": a.sum, "sum_sq": a.sum_sq}
                for version, a in by_version.items()
            }
            for outcome, by_version in self.arms.items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OutcomeBook:
        book = cls()
        for outcome, by_version in data.items():
            for version, a in by_version.items():
                arm = ArmStats(
                    OutcomeKind(a["kind"]), int(a["n"]), float(a["sum"]), float(a["sum_sq"])
                )
                book.kinds[outcome] = arm.kind
                book.arms.setdefault(outcome, {})[version] = arm
        return book

    def summary(self, level: float = 0.95) -> dict[str, dict[str, dict[str, Any]]]:
        """Per outcome and version: samples, mean and its fixed-horizon interval at `level`
        (for display; the gates use the sequential test, which is safe to peek at)."""
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for outcome, by_version in self.arms.items():
            for version, arm in by_version.items():
                row: dict[str, Any] = {"kind": arm.kind.value, "n": arm.n, "mean": arm.mean}
                if arm.n >= 2:
                    interval = confidence_interval(arm, level)
                    row.update(low=interval.low, high=interval.high, level=level)
                result.setdefault(outcome, {})[version] = row
        return result


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
        self.counts = {"counted": 0, "duplicate": 0, "excluded": 0, "unknown": 0,
                       "expired": 0, "invalid": 0}  # fmt: skip
        self.started_at = 0.0  # answers from before the current experiment are not counted
        self.dirty = False  # the book changed since the last `to_dict` was stored

    def reconfigure(self, settings: FeedbackSettings, now: float) -> None:
        self.settings = settings
        self.ledger.reconfigure(settings.max_request_ids, settings.ttl_s, now)

    def reset(self, now: float) -> None:
        """A new rollout is a new experiment: outcomes from before it do not count."""
        self.book.reset()
        self.started_at = now
        self.dirty = True

    def record_served(self, served: Iterable[Sequence[Any]], now: float) -> None:
        """Answers routers pushed: ServedAnswer tuples (id, version, answered at, decision)."""
        for request_id, version, answered_at, *decision in served:
            self.ledger.record(str(request_id), str(version), float(answered_at), now,
                               decision[0] if decision else None)  # fmt: skip

    def count(
        self, items: Iterable[Mapping[str, Any]], hints: Mapping[str, Sequence[Any]], now: float
    ) -> list[dict[str, Any]]:
        """Count outcomes for answered requests. `items` are parsed FeedbackItem dicts (with
        `kind`); `hints` what the forwarding router's own ledger knows of an id (FeedbackHint:
        version, answered at, decision, outcomes it saw counted). One result per item: counted,
        duplicate, excluded (a pinned or fallback answer, or one from before the current
        experiment: accepted, not in an A/B arm), or an error with its HTTP status (404
        unknown, 410 expired, 400 wrong kind or too many outcome names)."""
        results = []
        for raw in items:
            item = FeedbackItem(str(raw["request_id"]), str(raw["outcome"]), float(raw["value"]),
                                OutcomeKind(raw["kind"]))  # fmt: skip
            result: dict[str, Any] = {"request_id": item.request_id, "outcome": item.outcome}
            try:
                self._take_hint(item.request_id, hints.get(item.request_id), now)
                result.update(self._count_one(item, now))
            except ServingError as exc:
                status = http_status(exc)
                result.update(counted=False, status=status, error=exc.message)
                self.counts[{404: "unknown", 410: "expired"}.get(status, "invalid")] += 1
            results.append(result)
        return results

    def _take_hint(self, request_id: str, hint: Sequence[Any] | None, now: float) -> None:
        if hint is None or (self.versions is not None and hint[0] not in self.versions):
            return
        self.ledger.record(request_id, str(hint[0]), float(hint[1]), now,
                           hint[2] if len(hint) > 2 else None)  # fmt: skip
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
            return {"version": version, "counted": False, "excluded": excluded}
        if self.ledger.first_count(item.request_id, item.outcome):
            self.book.add(item, version)
            self.dirty = True
            self.counts["counted"] += 1
            return {"version": version, "counted": True}
        self.counts["duplicate"] += 1
        return {"version": version, "counted": False, "duplicate": True}

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
        }

    def to_dict(self) -> dict[str, Any]:
        """What survives a controller restart: the experiment's start and its outcome book."""
        return {"started_at": self.started_at, "book": self.book.to_dict()}

    def restore(self, data: Mapping[str, Any]) -> None:
        """Load `to_dict`'s output; ValueError, KeyError or TypeError if it is unreadable."""
        book = OutcomeBook.from_dict(data["book"])
        started_at = float(data["started_at"])
        self.book, self.started_at = book, started_at
