"""Steady client load for integration tests: threads that repeat one request until stopped.

`Load(url, call, clients=4)`: each thread has its own httpx client and a seeded RNG and calls
`call(client, rng, index)` in a loop; `call` returns None for a success or a short error text,
which is kept in `errors` (a test asserts it stays empty). `sent` counts the calls.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

import httpx

__all__ = ["Call", "Load"]

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
