"""Sticky routing buckets: the same routing key lands on the same version while a rollout moves.

DESIGN.md, decision 4 ("Sticky buckets"). A request that carries a routing key (the user id
header) is not routed by a random draw but by where its key falls:

1. **Hash the key into one of `BUCKETS` (10,000) buckets** with `bucket_of`. The hash is
   blake2b over the key's UTF-8 bytes, not Python's `hash()`: `hash()` of a str is salted per
   process (PYTHONHASHSEED), so two router replicas, or one router before and after a restart,
   would disagree about where a user lives. blake2b is in the standard library, fast, and its
   output is fixed by its specification. 10,000 buckets give a weight resolution of 0.01
   percentage points, the finest step a rollout plan is expected to take.

2. **Turn percent weights into whole bucket counts** with `bucket_counts`: largest-remainder
   rounding (floor every exact quota, then hand the buckets that are left to the largest
   fractional parts, ties broken by version name), so the counts always sum to exactly
   `BUCKETS` and the same weights always give the same counts on every replica.

3. **Lay the counts out as contiguous ranges** with `BucketMap.build`. The layout is what makes
   buckets sticky, so it is fixed:

   * the stable version's range starts at bucket 0: ``[0, s)``;
   * every other version with a non-zero count is laid from the *top* (``BUCKETS``) downward,
     in sorted version-name order: the first name gets ``[BUCKETS - n1, BUCKETS)``, the next
     ``[BUCKETS - n1 - n2, BUCKETS - n1)``, and so on;
   * the stable version gets what is left, ``s = BUCKETS - n1 - n2 - ...``.

   A version is never split into two ranges, and versions with no buckets have no range.

Guarantees (for one fixed `stable` version, all weights as `TrafficConfig` accepts them):

* **One stable version and one candidate.** The candidate owns ``[BUCKETS - n, BUCKETS)`` and
  ``n`` never falls when its weight rises (with two versions, largest-remainder rounding is
  plain rounding of the candidate's quota, which is monotone). So raising the candidate's
  weight only moves keys from stable to candidate, and lowering it (a rollback) only moves keys
  from candidate to stable. No key ever flips back and forth during a one-directional rollout.

* **More than one candidate.** When every candidate's weight stays the same or grows (so the
  stable weight only shrinks), the stable count never grows: a smaller stable quota keeps at
  least as many other versions ahead of it in the remainder ranking. The candidates together
  therefore own a top block ``[s, BUCKETS)`` that only grows downward, so **a key that is on
  any candidate never moves back to stable**. Keys may move *between* candidates, because each
  candidate's range sits below those of the names that sort before it and shifts down when
  they grow (or when a new one that sorts earlier appears); exact per-candidate stickiness is
  only promised for the one-candidate case, which is what a canary rollout is.

Changing which version is `stable` reshuffles the layout; that happens when a rollout is
promoted and a new generation begins, which is a deliberate new starting point.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction

__all__ = ["BUCKETS", "BucketMap", "bucket_counts", "bucket_of"]

BUCKETS = 10_000


def bucket_of(key: str) -> int:
    """The bucket (``0 <= b < BUCKETS``) of a routing key; the same in every process and run."""
    # 8 bytes (64 bits) of digest: the modulo bias of 2**64 % 10_000 over 2**64 values is about
    # 5e-16 per bucket, far below anything a traffic share could show.
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def bucket_counts(weights: Mapping[str, float]) -> dict[str, int]:
    """Whole bucket counts for percent weights, summing to exactly `BUCKETS`.

    Largest-remainder rounding: each version first gets the floor of its exact quota; the
    buckets still unassigned go one each to the largest fractional parts, ties going to the
    version whose name sorts first. A weight of 0 gets 0 buckets. Keys keep the input order.

    Quotas are computed with exact fractions and against the weights' actual total rather than
    a literal 100: floats such as ``33.33 + 33.33 + 33.34`` do not sum to exactly 100, and
    float noise in the remainders would otherwise decide ties that are really ties (1/3 splits)
    and could leave the counts one bucket off `BUCKETS`.
    """
    if not weights:
        raise ValueError("weights must name at least one version")
    exact: dict[str, Fraction] = {}
    for version, weight in weights.items():
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {version!r} ({weight}) must be a finite number >= 0")
        exact[version] = Fraction(weight)
    total = sum(exact.values(), Fraction(0))
    if total <= 0:
        raise ValueError("at least one weight must be greater than 0")

    quotas = {version: w * BUCKETS / total for version, w in exact.items()}
    counts = {version: math.floor(q) for version, q in quotas.items()}
    left = BUCKETS - sum(counts.values())
    # 0 <= left < len(weights): each floor loses less than one bucket, and the quotas sum to
    # BUCKETS exactly because they are exact fractions of the exact total.
    by_remainder = sorted(quotas, key=lambda v: (-(quotas[v] - counts[v]), v))
    for version in by_remainder[:left]:
        counts[version] += 1
    return counts


@dataclass(frozen=True)
class BucketMap:
    """Which version owns which bucket: contiguous half-open ranges covering ``[0, BUCKETS)``.

    `ranges` holds ``(start, end, version)`` in ascending order of `start`; only versions that
    own at least one bucket appear. Build one with `BucketMap.build`; the layout rule is in the
    module docstring. Immutable, so a router can swap maps atomically with its traffic table.
    """

    ranges: tuple[tuple[int, int, str], ...]
    # The range starts, kept for bisect so a lookup does no allocation on the request path.
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A map built by hand must still be a partition of [0, BUCKETS): a gap or an overlap
        # would route some keys to the wrong version silently.
        if not self.ranges:
            raise ValueError("a BucketMap needs at least one range")
        expected = 0
        for start, end, version in self.ranges:
            if start != expected or end <= start:
                raise ValueError(
                    f"ranges must be non-empty, ascending and contiguous from 0; "
                    f"got [{start}, {end}) for {version!r} where {expected} was expected"
                )
            expected = end
        if expected != BUCKETS:
            raise ValueError(f"ranges must end at {BUCKETS}, they end at {expected}")
        object.__setattr__(self, "_starts", tuple(start for start, _, _ in self.ranges))

    @classmethod
    def build(cls, weights: Mapping[str, float], stable: str) -> BucketMap:
        """Lay out `weights` (percent per version) with `stable` at the bottom, others on top."""
        if stable not in weights:
            raise ValueError(
                f"stable version {stable!r} must appear in weights ({sorted(weights)})"
            )
        # The stable version takes exactly what the others leave: TrafficConfig accepts totals
        # within 1e-6 of 100, and dividing by such a total could take a bucket from a rising
        # candidate (users moving back to stable) when both weights rise inside that slack.
        # fsum: the remainder does not depend on the mapping's order.
        rest = math.fsum(w for v, w in weights.items() if v != stable)
        counts = bucket_counts({**weights, stable: max(0.0, 100.0 - rest)})
        top: list[tuple[int, int, str]] = []
        end = BUCKETS
        # Sorted by name, not by input order: the layout must not depend on how a YAML mapping
        # happened to be ordered, or two replicas (or two deploys) could disagree.
        for version in sorted(counts):
            n = counts[version]
            if version == stable or n == 0:
                continue
            top.append((end - n, end, version))
            end -= n
        ranges: list[tuple[int, int, str]] = []
        if end > 0:
            # Whatever the candidates leave is exactly the stable count: counts sum to BUCKETS.
            ranges.append((0, end, stable))
        ranges.extend(reversed(top))
        return cls(ranges=tuple(ranges))

    def version_for(self, bucket: int) -> str:
        """The version that owns `bucket` (``0 <= bucket < BUCKETS``)."""
        if not 0 <= bucket < BUCKETS:
            raise ValueError(f"bucket {bucket} is outside [0, {BUCKETS})")
        return self.ranges[bisect_right(self._starts, bucket) - 1][2]
