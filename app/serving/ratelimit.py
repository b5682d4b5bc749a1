"""Per-client token buckets (the feedback endpoint's rate limit). Ray-free, clock injected.

Each client (the address the proxy saw) has a bucket of `burst` tokens that refills at `rate`
tokens per second; a request that costs more than the bucket holds is refused with how long to
wait. Buckets of clients not seen for a while are dropped, and at most `max_clients` are kept
(the oldest go first), so a flood of source addresses cannot grow memory without end.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float], max_clients: int = 10_000
    ) -> None:
        if not rate > 0 or not burst > 0:
            raise ValueError("rate and burst must be positive")
        self.rate, self.burst, self._clock, self.max_clients = rate, burst, clock, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # (tokens, at)
        self.refused = 0

    def take(self, client: str, cost: float = 1.0) -> float | None:
        """Take `cost` tokens from `client`'s bucket: None when allowed, else the seconds to
        wait before asking again (always > 0). A cost over `burst` can never pass: it is
        refused, with the time a full bucket takes."""
        now = self._clock()
        tokens, at = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = cost <= tokens
        self._buckets[client] = (tokens - cost if allowed else tokens, now)
        self._trim()
        if allowed:
            return None
        self.refused += 1
        if cost > self.burst:
            return self.burst / self.rate
        return (cost - tokens) / self.rate

    def _trim(self) -> None:
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
