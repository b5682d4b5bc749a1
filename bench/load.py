"""Closed-loop HTTP load for benchmarks: N clients, each sending its next request when the last
one answered, over keep-alive loopback connections.

`closed_loop(url, path, bodies, concurrency=, seconds=, warmup_s=)` -> `LoadResult`: requests/s,
p50/p99 latency, failures (status != 200 or transport errors, with the first one's text) and
cache hits (`x-cache: hit`), counted over the measuring window only; the warm-up before it
fills batches, caches and connections. Bodies are pre-encoded JSON bytes, so the clients'
own CPU cost stays small (about 1 ms per request with httpx on this machine, measured from
the bench process's CPU time) next to the served path's. Client `i` sends bodies i, i+N, ...
`interleaved_p50_ms` times single requests to several paths in turn (concurrency 1).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

__all__ = ["LoadResult", "closed_loop", "interleaved_p50_ms"]


@dataclass
class LoadResult:
    concurrency: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    cache_hits: int
    first_error: str | None
    latencies_ms: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))
    probes: tuple[Any, Any] | None = field(repr=False, default=None)  # probe() at start, end

    def summary(self) -> str:
        return (f"c={self.concurrency}: {self.rps:.1f} req/s, p50 {self.p50_ms:.1f} ms, "
                f"p99 {self.p99_ms:.1f} ms, {self.requests} requests, {self.failed} failed")  # fmt: skip


def closed_loop(url: str, path: str, bodies: Sequence[bytes], *, concurrency: int, seconds: float,
                warmup_s: float, headers: dict[str, str] | None = None,
                probe: Callable[[], Any] | None = None) -> LoadResult:  # fmt: skip
    """`probe()` (e.g. CPU times of some processes) is called when the measuring window opens
    and when it closes; both results come back in `LoadResult.probes`."""
    headers = {"content-type": "application/json", **(headers or {})}
    measuring = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()
    latencies: list[float] = []
    failed = hits = 0
    first_error: list[str] = []

    def client(index: int) -> None:
        nonlocal failed, hits
        i = index
        with httpx.Client(base_url=url, timeout=120) as session:
            while not stop.is_set():
                started = time.perf_counter()
                error = None
                try:
                    r = session.post(path, content=bodies[i % len(bodies)], headers=headers)
                    if r.status_code != 200:
                        error = f"{r.status_code} {r.text[:200]}"
                    hit = r.headers.get("x-cache") == "hit"
                except httpx.HTTPError as exc:
                    error, hit = f"{type(exc).__name__}: {exc}", False
                elapsed = time.perf_counter() - started
                i += concurrency
                if measuring.is_set() and not stop.is_set():
                    with lock:
                        latencies.append(elapsed)
                        hits += hit
                        if error is not None:
                            failed += 1
                            if not first_error:
                                first_error.append(error)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(warmup_s)
    first = probe() if probe else None
    measuring.set()
    started = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    elapsed = time.perf_counter() - started
    last = probe() if probe else None
    for t in threads:
        t.join(timeout=180)
    ms = np.asarray(latencies or [float("nan")]) * 1000
    return LoadResult(
        concurrency=concurrency, seconds=round(elapsed, 2), requests=len(latencies),
        rps=len(latencies) / elapsed, p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)), failed=failed, cache_hits=hits,
        first_error=first_error[0] if first_error else None, latencies_ms=ms,
        probes=(first, last) if probe else None,
    )  # fmt: skip


def interleaved_p50_ms(
    url: str, paths: Sequence[str], body: bytes, requests: int
) -> dict[str, float]:
    """p50 latency (ms) of each path at concurrency 1, sent request by request in turn (the
    order alternating), so drift in the machine's state hits every path alike."""
    samples: dict[str, list[float]] = {p: [] for p in paths}
    headers = {"content-type": "application/json"}
    with httpx.Client(base_url=url, timeout=60) as session:
        for i in range(requests):
            for path in paths if i % 2 == 0 else paths[::-1]:
                started = time.perf_counter()
                r = session.post(path, content=body, headers=headers)
                samples[path].append(time.perf_counter() - started)
                if r.status_code != 200:
                    raise RuntimeError(f"{path}: {r.status_code} {r.text[:200]}")
    return {p: float(np.percentile(np.asarray(v), 50)) * 1000 for p, v in samples.items()}
