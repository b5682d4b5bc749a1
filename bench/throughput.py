"""Served against offline throughput of the demo's MiniLM recommender, measured in one run.

    cd /work/main && .venv/bin/python -m bench.throughput [--json] [--seconds S] [--smoke]
    rollout bench throughput --json

1. offline: the same adapter (configs/models/recommender/v1.yaml: MiniLM-L6, `whole` profile
   scoring) in this process, `torch_threads` = 2, on the demo world's slates: single-row
   requests in batches of 16 (one forward pass per batch, as @serve.batch would), and 16-row
   requests (16 user profiles against one slate) one at a time;
2. served: the full routed app (bench/localapp.py: Router with the traffic split, metrics and
   access log on, cache off, one v1 replica with the model config's batching) under 16
   concurrent HTTP clients (threads, loopback, keep-alive) sending the same requests.

Prints requests/s for each and the ratios served/offline. The machine, Ray version and
settings go into the JSON. This is the starting point of issue 7 (performance): the goals
there are served/offline >= 0.45 single-row and >= 0.85 with 16-row requests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.localapp import APP, ROOT, LocalApp  # noqa: E402 - sets RAY_AUTH_MODE first

import ray  # noqa: E402

from bench.common import cpu_count, log  # noqa: E402
from bench.world import World  # noqa: E402

CONCURRENCY = 16
ROWS = 16


def requests(count: int, rows: int, seed: int = 3) -> list[dict[str, Any]]:
    """V2 bodies: `rows` user profiles (from the demo world) against one slate each."""
    world, rng = World(), random.Random(seed)
    bodies = []
    for _ in range(count):
        slates = [world.slate(rng) for _ in range(rows)]
        items = list(slates[0].items)
        bodies.append({
            "inputs": [
                {"name": "user", "datatype": "BYTES", "shape": [rows], "data": [s.user.profile for s in slates]},
                {"name": "items", "datatype": "BYTES", "shape": [len(items)], "data": items},
            ],
            "parameters": {"top_k": 1},
        })  # fmt: skip
    return bodies


def offline_rps(bodies: list[dict[str, Any]], batch: int, seconds: float) -> float:
    """Requests/s of the adapter itself, `batch` requests per forward pass."""
    import numpy as np

    from app.adapters import adapter_class
    from app.artifacts import resolve_artifact
    from app.config import load_model_config

    config = load_model_config(ROOT / "configs/models/recommender/v1.yaml")
    cls = adapter_class(config.adapter)
    adapter = cls(resolve_artifact(config.artifact, config.base_dir()),
                  cls.parse_hyperparameters(config.hyperparameters), threads=2)  # fmt: skip
    tensors = [{"user": np.array(b["inputs"][0]["data"], dtype=object),
                "items": np.array(b["inputs"][1]["data"], dtype=object)} for b in bodies]  # fmt: skip
    adapter.predict(tensors[:batch], [{"top_k": 1}] * batch)  # warm up
    done, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        chunk = [tensors[(i + k) % len(tensors)] for k in range(batch)]
        adapter.predict(chunk, [{"top_k": 1}] * batch)
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - started)


def served_rps(url: str, bodies: list[dict[str, Any]], seconds: float) -> tuple[float, int]:
    """Requests/s through the router with CONCURRENCY clients; and the failed count."""
    import httpx

    stop = threading.Event()
    counts = [0] * CONCURRENCY
    failures = [0] * CONCURRENCY

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            i = index
            while not stop.is_set():
                r = c.post(f"/v2/models/{APP}/infer", json=bodies[i % len(bodies)])
                counts[index] += 1
                failures[index] += r.status_code != 200
                i += CONCURRENCY

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CONCURRENCY)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # warm up: batches fill, connections open
    before, started = sum(counts), time.perf_counter()
    time.sleep(seconds)
    done, elapsed = sum(counts) - before, time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join(timeout=60)
    return done / elapsed, sum(failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per figure")
    parser.add_argument("--smoke", action="store_true", help="3 s per figure; checks that it runs")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set for the whole throwaway cluster (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")  # fmt: skip
    args = parser.parse_args(argv)
    for pair in args.env:
        key, _, value = pair.partition("=")
        os.environ[key] = value  # before ray.init: the raylet and every worker inherit it
    seconds = 3.0 if args.smoke else args.seconds
    started = time.perf_counter()
    single, batched = requests(512, 1), requests(64, ROWS)
    log(f"offline: MiniLM v1 in-process, {seconds:g}s per figure")
    offline_single = offline_rps(single, 16, seconds)
    offline_batched = offline_rps(batched, 1, seconds)
    log(f"offline: {offline_single:.1f} single-row req/s (batches of 16), {offline_batched:.1f} {ROWS}-row req/s")
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    app = LocalApp()
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        app.start(tmp, [ROOT / "configs/models/recommender/v1.yaml"],
                  router={"stable": "v1", "weights": {"v1": 100}, "cache": {"enabled": False}})  # fmt: skip
        served_single, failed_single = served_rps(app.url, single, seconds)
        served_batched, failed_batched = served_rps(app.url, batched, seconds)
    finally:
        app.close()
        sys.stdout = stdout
    log(f"served: {served_single:.1f} single-row req/s, {served_batched:.1f} {ROWS}-row req/s")
    report = {
        "served_over_offline_single": round(served_single / offline_single, 3),
        "served_over_offline_batched": round(served_batched / offline_batched, 3),
        "offline_single_rps": round(offline_single, 1),
        "offline_batched_rps": round(offline_batched, 1),
        "served_single_rps": round(served_single, 1),
        "served_batched_rps": round(served_batched, 1),
        "failed_requests": failed_single + failed_batched,
        "concurrency": CONCURRENCY,
        "rows_batched": ROWS,
        "seconds_per_figure": seconds,
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_count()} CPUs, "
                   f"python {platform.python_version()}",  # fmt: skip
        "ray_version": ray.__version__,
        "env": args.env,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report), flush=True)
    return 1 if report["failed_requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
