"""Per-version request statistics, from the router replicas to the rollout controller.

The rollout gates judge a version on its request count, error count and p50/p99 latency over
the current step's window (`VersionStats`, below). Those numbers come from many router
replicas, so they travel in a form that merges by plain addition:

    router replica                              controller
    RouterStats.record(...) per request
    RouterStats.drain() every push ──report──>  StatsWindow.add(report, at=time received)
                                                StatsWindow.observe(since, now) every tick
                                                  -> {version: VersionStats}

* **Latency is a fixed-bucket histogram** (`LATENCY_BOUNDS_MS`, plus one overflow bucket).
  Fixed bounds are what let histograms from any number of routers, and any number of pushes,
  merge by adding counts; a quantile sketch with data-dependent bounds would not. The price is
  resolution: a quantile is exact only to within the width of the bucket that holds it, at
  most 25% of its value from 1 ms to 68 s (the E12 series), which is fine enough for a ratio
  gate like p99 1.5x stable.
* **Bucket edges are inclusive above**: bucket i holds `bounds[i-1] < latency <= bounds[i]`
  (bucket 0 holds `0 <= latency <= bounds[0]`; the overflow bucket everything over
  `bounds[-1]`), as Prometheus' `le` buckets do, so a request of exactly 10 ms is "<= 10 ms".
* **A report is a delta, stamped when the controller receives it.** `drain` resets, so a lost
  push loses that push's requests but never double counts. The controller attributes a whole
  report to its arrival time, so a step's window is fuzzy by one push interval: the first report
  after a weight change can hold requests served, at the old weight, up to one interval before.
  Keep the push interval well under a step's hold (a second, against holds of minutes).
* **Reports are JSON-safe** (str keys, ints, lists of ints) so they can cross any transport a
  Ray actor call or an HTTP push uses, and the controller validates them before they touch its
  state: a router on an older or newer build must not corrupt the gates' evidence.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "LATENCY_BOUNDS_MS",
    "LEGACY_BOUNDS_MS",
    "MAX_REPORTS",
    "RouterStats",
    "StatsWindow",
    "VersionStats",
    "bucket_index",
    "quantile",
    "rebin_legacy",
]


@dataclass(frozen=True)
class VersionStats:
    """One version's outcomes in the current step's window (since `window_started_at`)."""

    requests: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None

    def __post_init__(self) -> None:
        if self.requests < 0 or not (0 <= self.errors <= self.requests):
            raise ValueError(
                f"errors ({self.errors}) must be between 0 and requests ({self.requests})"
            )
        for name in ("p50_ms", "p99_ms"):
            value = getattr(self, name)
            if value is not None and not (value >= 0):
                raise ValueError(f"{name} ({value}) must be a latency of at least 0 ms or None")

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None


# Upper bounds of the latency buckets, in ms; one more bucket holds everything above the last.
# The E12 series (1, 1.2, 1.5, ... 8.2 per decade) from 1 ms to 68 s: each bound is at most
# 1.25x the one before, so a quantile (interpolated inside its bucket) is within 25% of the
# truth everywhere, and a 1.5x p99 gate is judged on real resolution (the layout before jumped
# 1 -> 2 -> 5 s, and p99 plotted as a saw between them). The same bounds serve the gates'
# window and the Prometheus histograms. Never change these in place: routers and controllers
# of different builds must agree (a report in the old layout, LEGACY_BOUNDS_MS, is re-binned;
# any other bucket count is refused).
E12: tuple[float, ...] = (1.0, 1.2, 1.5, 1.8, 2.2, 2.7, 3.3, 3.9, 4.7, 5.6, 6.8, 8.2)
LATENCY_BOUNDS_MS: tuple[float, ...] = tuple(
    round(m * 10**d, 1) for d in range(5) for m in E12 if m * 10**d <= 68_000
)
# The layout before the E12 one (23 buckets); reports in it are still taken (`rebin_legacy`).
LEGACY_BOUNDS_MS: tuple[float, ...] = (
    1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000,
    10000, 30000,
)  # fmt: skip
N_BUCKETS = len(LATENCY_BOUNDS_MS) + 1

# StatsWindow's hard cap on stored reports, whatever the horizon says. At the designed rate
# (a push every 250 ms from each of 10 routers, 900 s horizon) the window holds 36,000
# reports; the cap only matters past that (more routers, faster pushes), and then the oldest
# go first, so a long step is judged on less than the horizon.
MAX_REPORTS = 100_000


def bucket_index(latency_ms: float, bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> int:
    """The bucket a latency falls in: the first bound >= latency (len(bounds): overflow).

    A latency equal to a bound goes in that bound's bucket (edges are inclusive above). A
    negative latency (a clock step between start and end) counts as 0 ms; NaN raises, since it
    can only be a bug in the caller's timing code.
    """
    if latency_ms != latency_ms:  # NaN: bisect would silently file it in bucket 0
        raise ValueError("latency_ms is NaN")
    return bisect_left(bounds, latency_ms)


def rebin_legacy(buckets: Sequence[int]) -> list[int]:
    """A bucket list in the LEGACY_BOUNDS_MS layout (a router of an older build, during an
    upgrade) in today's: each old bucket's count goes to the new bucket that holds its upper
    bound, so latencies are never under-stated; the old overflow bucket to the new overflow."""
    out = [0] * N_BUCKETS
    for i, count in enumerate(buckets):
        upper = LEGACY_BOUNDS_MS[i] if i < len(LEGACY_BOUNDS_MS) else math.inf
        out[bucket_index(upper) if math.isfinite(upper) else N_BUCKETS - 1] += count
    return out


def quantile(
    buckets: Sequence[int], q: float, bounds: Sequence[float] = LATENCY_BOUNDS_MS
) -> float | None:
    """The q-quantile (0 <= q <= 1) of a latency histogram, in ms; None when it is empty.

    Finds the bucket that holds the q-th observation (rank q * total) and interpolates
    linearly inside it, assuming observations spread evenly between its edges (the first
    bucket's lower edge is 0). The overflow bucket has no upper edge, so a quantile that lands
    there reports its lower edge, the last bound: "at least this slow".
    """
    if len(buckets) != len(bounds) + 1:
        raise ValueError(f"expected {len(bounds) + 1} buckets, got {len(buckets)}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q ({q}) must be between 0 and 1")
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count <= 0:
            continue
        if seen + count >= rank:
            if i == len(bounds):
                return float(bounds[-1])
            lower = float(bounds[i - 1]) if i else 0.0
            upper = float(bounds[i])
            return lower + (upper - lower) * max(0.0, rank - seen) / count
        seen += count
    return float(bounds[-1])  # unreachable unless float rounding leaves rank above total


class RouterStats:
    """The counts one router replica gathers between two pushes to the controller.

    `record` is called once per finished request, so it does as little as possible: a bisect
    and three integer increments. Not thread-safe by design: a router replica owns one event
    loop and every method here is synchronous, so no two calls interleave.
    """

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS_MS) -> None:
        self._bounds = tuple(bounds)
        # version -> [requests, errors, buckets]; the delta since the last drain
        self._pending: dict[str, list[Any]] = {}
        # version -> [requests, errors]; never reset (for /status)
        self._totals: dict[str, list[int]] = {}

    def record(self, version: str, ok: bool, latency_ms: float) -> None:
        """One finished request: the version that served it, its outcome and its latency."""
        index = bucket_index(latency_ms, self._bounds)
        entry = self._pending.get(version)
        if entry is None:
            entry = self._pending[version] = [0, 0, [0] * (len(self._bounds) + 1)]
        total = self._totals.get(version)
        if total is None:
            total = self._totals[version] = [0, 0]
        entry[0] += 1
        total[0] += 1
        if not ok:
            entry[1] += 1
            total[1] += 1
        entry[2][index] += 1

    def drain(self) -> dict[str, dict[str, Any]]:
        """The JSON-safe delta since the last drain, and a fresh start.

        `{version: {"requests": int, "errors": int, "buckets": [int, ...]}}`, only versions
        that served requests since the last drain (an empty dict when none did).
        """
        pending, self._pending = self._pending, {}
        return {
            version: {"requests": requests, "errors": errors, "buckets": buckets}
            for version, (requests, errors, buckets) in pending.items()
        }

    def totals(self) -> dict[str, dict[str, int]]:
        """Cumulative counts per version since this replica started (drain does not reset)."""
        return {
            version: {"requests": requests, "errors": errors}
            for version, (requests, errors) in self._totals.items()
        }


# One version's share of one stored report: (requests, errors, buckets).
_Entry = tuple[int, int, list[int]]


class StatsWindow:
    """The reports the controller has received from every router over the last `horizon_s`.

    `observe(since, now)` merges the reports that arrived in `[since, now]` into one
    `VersionStats` per version, which is what `rollout.step` takes. The controller calls it
    every tick with the same `since` (the step's start) and a later `now`, so the last merge is
    kept and only the reports that arrived since are added to it: a tick costs the new reports,
    not the whole step. The merge is keyed by the range of stored reports it covers, so any call
    whose range starts elsewhere (a new `since` that excludes or includes other reports, a prune
    that reached into the range), ends earlier, or follows a report slotted in out of order
    merges afresh: column sums of small int lists, about 3 ms per thousand reports of two
    versions.

    Memory is bounded by time: about `horizon_s / push interval * routers` reports (900 s,
    0.25 s, 10 routers: 36,000 reports of about 1 KB each), and by `max_reports` whatever the
    push rate. The horizon must cover the longest step window that needs evidence; a step
    longer than the horizon is judged on its last `horizon_s` seconds.

    Times are the controller's (epoch seconds, like `rollout.step`'s `now`). Reports are kept
    in order of `at`; one that arrives out of order is slotted in where it belongs.
    """

    def __init__(self, horizon_s: float = 900.0, *, max_reports: int = MAX_REPORTS) -> None:
        if not (horizon_s > 0 and math.isfinite(horizon_s)):
            raise ValueError(f"horizon_s ({horizon_s}) must be a positive number of seconds")
        if max_reports < 1:
            raise ValueError(f"max_reports ({max_reports}) must be at least 1")
        self._horizon_s = float(horizon_s)
        self._max_reports = max_reports
        self._bounds = LATENCY_BOUNDS_MS
        # Parallel lists, sorted by time: _times for bisect, _reports for the data.
        self._times: list[float] = []
        self._reports: list[dict[str, _Entry]] = []
        self._dropped = 0  # reports pruned from the front so far: absolute index = this + i
        self._reordered = 0  # out-of-order inserts so far: they shift the absolute indices
        self._merge: _Merge | None = None  # the last observe's sums, extended by the next

    @property
    def horizon_s(self) -> float:
        return self._horizon_s

    def __len__(self) -> int:
        """How many reports are stored."""
        return len(self._reports)

    def add(self, report: Mapping[str, Mapping[str, Any]], at: float) -> None:
        """Store one router's drained report, received at `at`; then prune.

        Raises ValueError, storing nothing, when the report is malformed: not a mapping of
        version name to `{"requests", "errors", "buckets"}`, a count that is not a
        non-negative int, more errors than requests, a bucket list of the wrong length, or
        buckets that do not add up to the requests. Version names are not checked against any
        plan (a router may still serve a version the controller has moved past). Keys other
        than those three are ignored, so a newer router may send more.
        """
        if not math.isfinite(at):
            raise ValueError(f"report time ({at}) must be a finite number of seconds")
        entries = self._validate(report)
        if entries:
            if not self._times or at >= self._times[-1]:
                self._times.append(at)
                self._reports.append(entries)
            else:
                position = bisect_right(self._times, at)
                self._times.insert(position, at)
                self._reports.insert(position, entries)
                self._reordered += 1
        if self._times:
            self.prune(max(at, self._times[-1]))

    def observe(self, since: float, now: float) -> dict[str, VersionStats]:
        """Every version's merged stats over the reports received in `[since, now]`.

        A version appears if any report in range mentions it; its p50/p99 are None when it had
        no requests.
        """
        lo = bisect_left(self._times, since)
        hi = bisect_right(self._times, now)
        start, end = self._dropped + lo, self._dropped + max(lo, hi)
        merge = self._merge
        if (
            merge is None
            or merge.start != start
            or merge.reordered != self._reordered
            or merge.end > end
        ):
            merge = self._merge = _Merge(start, start, self._reordered, {})
        if end > merge.end:
            _merge_into(merge.sums, self._reports[merge.end - self._dropped : hi])
            merge.end = end
        out: dict[str, VersionStats] = {}
        for version, (requests, errors, buckets) in merge.sums.items():
            if requests == 0:
                out[version] = VersionStats(requests=0, errors=0)
                continue
            out[version] = VersionStats(
                requests=requests,
                errors=errors,
                p50_ms=quantile(buckets, 0.5, self._bounds),
                p99_ms=quantile(buckets, 0.99, self._bounds),
            )
        return out

    def rates(self, window_s: float, now: float) -> dict[str, float]:
        """Requests per second per version over the reports received in `(now - window_s, now]`.

        The window is open at its start so back-to-back windows never count a report twice.
        Versions with no requests in the window are left out.
        """
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s ({window_s}) must be a positive number of seconds")
        lo = bisect_right(self._times, now - window_s)
        hi = bisect_right(self._times, now)
        totals: dict[str, int] = {}
        for report in self._reports[lo:hi]:
            for version, entry in report.items():
                if entry[0]:
                    totals[version] = totals.get(version, 0) + entry[0]
        return {version: count / window_s for version, count in totals.items()}

    def prune(self, now: float) -> None:
        """Drop reports received before `now - horizon_s`, and the oldest over max_reports."""
        cut = bisect_left(self._times, now - self._horizon_s)
        cut = max(cut, len(self._times) - self._max_reports)
        if cut > 0:
            del self._times[:cut]
            del self._reports[:cut]
            self._dropped += cut

    # -- internals ---------------------------------------------------------------------------

    def _validate(self, report: Mapping[str, Mapping[str, Any]]) -> dict[str, _Entry]:
        if not isinstance(report, Mapping):
            raise ValueError(f"a stats report must be a mapping, got {type(report).__name__}")
        entries: dict[str, _Entry] = {}
        for version, data in report.items():
            if not isinstance(version, str) or not version:
                raise ValueError(f"version names must be non-empty strings, got {version!r}")
            where = f"stats report for version {version!r}"
            if not isinstance(data, Mapping):
                raise ValueError(f"{where}: must be a mapping, got {type(data).__name__}")
            requests = _count(data, "requests", where)
            errors = _count(data, "errors", where)
            if errors > requests:
                raise ValueError(f"{where}: errors ({errors}) exceed requests ({requests})")
            raw = data.get("buckets")
            if not isinstance(raw, (list, tuple)):
                raise ValueError(f"{where}: 'buckets' must be a list of ints, got {raw!r:.80}")
            if len(raw) != N_BUCKETS and len(raw) != len(LEGACY_BOUNDS_MS) + 1:
                raise ValueError(
                    f"{where}: expected {N_BUCKETS} latency buckets, got {len(raw)}"
                    " (a router with different LATENCY_BOUNDS_MS?)"
                )
            buckets = list(raw)
            for count in buckets:
                if type(count) is not int or count < 0:
                    raise ValueError(
                        f"{where}: bucket counts must be non-negative ints, got {count!r}"
                    )
            if sum(buckets) != requests:
                raise ValueError(
                    f"{where}: buckets add up to {sum(buckets)}, not requests ({requests})"
                )
            if len(buckets) != N_BUCKETS:
                buckets = rebin_legacy(buckets)
            entries[version] = (requests, errors, buckets)
        return entries


class _Merge:
    """StatsWindow.observe's running sums over the absolute report indices [start, end)."""

    __slots__ = ("start", "end", "reordered", "sums")

    def __init__(self, start: int, end: int, reordered: int, sums: dict[str, list[Any]]) -> None:
        self.start = start
        self.end = end
        self.reordered = reordered
        self.sums = sums  # version -> [requests, errors, buckets]


def _merge_into(sums: dict[str, list[Any]], reports: Sequence[Mapping[str, _Entry]]) -> None:
    """Add `reports` into `sums`, version by version, as column sums (the fast way in Python)."""
    columns: dict[str, list[_Entry]] = {}
    for report in reports:
        for version, entry in report.items():
            found = columns.get(version)
            if found is None:
                columns[version] = [entry]
            else:
                found.append(entry)
    for version, entries in columns.items():
        current = sums.get(version)
        if current is not None:
            entries.append((current[0], current[1], current[2]))
        sums[version] = [
            sum(entry[0] for entry in entries),
            sum(entry[1] for entry in entries),
            list(map(sum, zip(*(entry[2] for entry in entries)))),
        ]


def _count(data: Mapping[str, Any], key: str, where: str) -> int:
    if key not in data:
        raise ValueError(f"{where}: missing {key!r}")
    value = data[key]
    if type(value) is not int or value < 0:  # bool is an int subclass; not a count
        raise ValueError(f"{where}: {key!r} must be a non-negative int, got {value!r}")
    return value
