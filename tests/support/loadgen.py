"""Steady client load for integration tests: threads that repeat one request until stopped.

`Load(url, call, clients=4)`: each thread has its own httpx client and a seeded RNG and calls
`call(client, rng, index)` in a loop; `call` returns None for a success or a short error text,
which is kept in `errors` (a test asserts it stays empty). `sent` counts the calls.

`InferLoad(url, path, body, clients=4)`: the same clients, each POSTing one inference body as
a random user, that also keep every answer (`Answer`: when it came on the steady clock, its
latency, its error, its routing headers), for tests that read the load in time windows
(`window`) or by routing header (`count`).
"""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import httpx

__all__ = ["Answer", "Call", "InferLoad", "Load"]

Call = Callable[[httpx.Client, random.Random, int], "str | None"]


class Load:
    def __init__(self, url: str, call: Call, clients: int = 4, seed: int = 0) -> None:
        self.url, self.call, self.seed = url, call, seed
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.errors: list[str] = []
        self.sent = 0
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    error = self.call(client, rng, index)
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.sent += 1
                    if error is not None:
                        self.errors.append(error)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


class Answer(NamedTuple):
    at: float  # time.monotonic() when it came
    latency_s: float
    error: str | None
    headers: dict[str, str]  # the routing headers it carried (ROUTING_HEADERS), successes only


ROUTING_HEADERS = ("x-routing-decision", "x-model-version", "x-fallback-reason")


class InferLoad(Load):
    """Clients that POST `body` to `path` as user-<random>, keeping every `Answer`."""

    def __init__(self, url: str, path: str, body: dict[str, Any], clients: int = 4) -> None:
        self.path, self.body = path, body
        self.answers: list[Answer] = []
        super().__init__(url, self._infer, clients)

    def _infer(self, client: httpx.Client, rng: random.Random, index: int) -> str | None:
        start = time.monotonic()
        headers: dict[str, str] = {}
        try:
            r = client.post(self.path, json=self.body,
                            headers={"x-user-id": f"user-{rng.randrange(100_000)}"})  # fmt: skip
        except httpx.HTTPError as exc:
            error: str | None = f"{type(exc).__name__}: {exc}"
        else:
            error = None if r.status_code == 200 else f"{r.status_code} {r.text[:160]}"
            if error is None:
                headers = {h: r.headers[h] for h in ROUTING_HEADERS if h in r.headers}
        now = time.monotonic()
        with self.lock:
            self.answers.append(Answer(now, now - start, error, headers))
        return error

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Answers that came in [start, end) on the steady clock: how many, how many failed
        (and the first few reasons), their median and slowest latency."""
        with self.lock:
            found = [a for a in self.answers if start <= a.at < end]
        latencies = sorted(a.latency_s for a in found)
        errors = [a.error for a in found if a.error is not None]
        return {
            "requests": len(found), "failed": len(errors), "failures": errors[:3],
            "p50_ms": round(1000 * latencies[len(latencies) // 2]) if latencies else None,
            "max_ms": round(1000 * latencies[-1]) if latencies else None,
        }  # fmt: skip

    def count(self, header: str) -> collections.Counter[str]:
        """How many successful answers carried each value of routing header `header` ("?"
        where it was absent)."""
        with self.lock:
            return collections.Counter(
                a.headers.get(header, "?") for a in self.answers if a.error is None
            )
