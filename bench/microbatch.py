"""Router -> model micro-batching (`microbatch` in the Router's user_config), off against on.

    cd /work/main && .venv/bin/python -m bench.microbatch [--json] [--seconds S] [--smoke]

Two routed apps side by side in one throwaway Ray (bench/localapp.py): the no-op model
(bench/noop.py: measures the serving path alone) and a tiny recommender (tests/support's
2-layer, 32-wide BERT: a real tokenizer and forward pass that cost little). Each app has one
Router, one RolloutController and one model replica; cache off. Closed-loop HTTP load
(bench/load.py) at concurrency 1, 16 and 64 on each, in blocks off, on, on, off (micro-batching
switched in place, as operators would, between blocks), so the machine's drift over the run
hits both arms alike; each arm's two blocks are pooled.

Prints a table (stderr with --json) and the JSON: per model and concurrency, req/s, p50 and p99
for each arm, the on/off ratios measured in this run, and the requests per Router -> model
call while on. Exit 1 if any request failed. Starts its own throwaway Ray and stops only that.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_parser, emit, log, machine
from bench.load import LoadResult, closed_loop
from bench.localapp import LocalApp, wait_for  # sets RAY_AUTH_MODE before Ray is imported

SCALE = (1, 16, 64)
ORDER = ("off", "on", "on", "off")
MODELS = {"noop": "/noop", "tiny": "/tiny"}  # name -> route prefix
MODEL_NAMES = {"noop": "noop", "tiny": "recommender"}  # the V2 model name each app serves
MICROBATCH_ON = {"enabled": True, "max_batch_size": 32, "max_calls_in_flight": 2}


def router_config(on: bool, microbatch: dict[str, Any]) -> dict[str, Any]:
    return {"stable": "v1", "weights": {"v1": 100}, "cache": {"enabled": False},
            "microbatch": microbatch if on else {"enabled": False}}  # fmt: skip


def serve_config(versions: dict[str, Path], http_port: int, env: dict[str, str],
                 on: bool, microbatch: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    return {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [
            {
                "name": name, "route_prefix": MODELS[name], "import_path": "app.builder:build_app",
                "args": {"model": MODEL_NAMES[name], "versions": [str(path)], "router": {}},
                "runtime_env": {"env_vars": env},
                "deployments": [
                    {"name": "Router", "user_config": router_config(on, microbatch)},
                    {"name": "RolloutController",
                     "user_config": {"plan": None, "tick_interval_s": 0.25}},
                ],
            }
            for name, path in versions.items()
        ],
    }  # fmt: skip


def switch(app: LocalApp, on: bool, microbatch: dict[str, Any]) -> None:
    """Micro-batching on or off in every app, in place (a new Router user_config)."""
    config = copy.deepcopy(app.config)
    for application in config["applications"]:
        for deployment in application["deployments"]:
            if deployment["name"] == "Router":
                deployment["user_config"] = router_config(on, microbatch)
    app.deploy(config)
    app.config = config
    assert app.client is not None
    for prefix in MODELS.values():
        wait_for(lambda p=prefix: app.client.get(f"{p}/status").json()["microbatch"]["enabled"] is on,
                 30, 0.2, f"micro-batching {'on' if on else 'off'} at {prefix}")  # fmt: skip


def counters(app: LocalApp) -> dict[str, dict[str, int]]:
    assert app.client is not None
    return {name: app.client.get(f"{prefix}/status").json()["microbatch"]
            for name, prefix in MODELS.items()}  # fmt: skip


def merged(results: list[LoadResult]) -> LoadResult:
    """An arm's blocks, measured apart, as one figure."""
    latencies = np.concatenate([r.latencies_ms for r in results])
    seconds, count = sum(r.seconds for r in results), sum(r.requests for r in results)
    return LoadResult(
        concurrency=results[0].concurrency, seconds=seconds, requests=count, rps=count / seconds,
        p50_ms=float(np.percentile(latencies, 50)), p99_ms=float(np.percentile(latencies, 99)),
        failed=sum(r.failed for r in results), cache_hits=0,
        first_error=next((r.first_error for r in results if r.first_error), None),
        latencies_ms=latencies,
    )  # fmt: skip


def bodies() -> dict[str, list[bytes]]:
    from bench.noop import request_body
    from tests.support.serving import infer_body

    rng = np.random.default_rng(0)
    users = ["user loves science fiction films", "a fan of jazz and cooking shows",
             "watches football and space documentaries", "reads poetry, likes quiet music"]  # fmt: skip
    items = ["space opera", "cooking show", "jazz music", "football match", "poetry reading"]
    return {
        "noop": [request_body(rng)[0] for _ in range(64)],
        "tiny": [json.dumps(infer_body([u], items)).encode() for u in users],
    }


def figure(result: LoadResult) -> dict[str, Any]:
    return {"rps": round(result.rps, 1), "p50_ms": round(result.p50_ms, 2),
            "p99_ms": round(result.p99_ms, 2), "requests": result.requests,
            "failed": result.failed}  # fmt: skip


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None


def table(report: dict[str, Any]) -> str:
    lines = [
        f"{'model':6s} {'c':>3s} | {'off req/s':>9s} {'p50':>7s} {'p99':>7s} | "
        f"{'on req/s':>9s} {'p50':>7s} {'p99':>7s} | {'on/off rps':>10s} {'p50':>6s} {'p99':>6s}"
    ]
    for model, rows in report["models"].items():
        for row in rows:
            off, on, r = row["off"], row["on"], row["on_over_off"]
            lines.append(
                f"{model:6s} {row['concurrency']:3d} | {off['rps']:9.1f} {off['p50_ms']:7.2f} "
                f"{off['p99_ms']:7.2f} | {on['rps']:9.1f} {on['p50_ms']:7.2f} {on['p99_ms']:7.2f} | "
                f"{r['rps'] or 0:10.3f} {r['p50'] or 0:6.3f} {r['p99'] or 0:6.3f} | "
                f"{row['requests_per_call_on'] or 0:8.2f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench.microbatch", __doc__)
    parser.add_argument(
        "--seconds", type=float, default=6.0, help="measuring time per block (default 6)"
    )
    parser.add_argument(
        "--smoke", action="store_true",
        help="1 s per block after a 0.5 s warm-up: checks that it runs, figures are noise",
    )  # fmt: skip
    parser.add_argument("--max-calls-in-flight", type=int, default=MICROBATCH_ON["max_calls_in_flight"],
                        metavar="N", help="the 'on' arm's microbatch.max_calls_in_flight (default %(default)s)")  # fmt: skip
    parser.add_argument("--max-batch-size", type=int, default=MICROBATCH_ON["max_batch_size"],
                        metavar="N", help="the 'on' arm's microbatch.max_batch_size (default %(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    microbatch = {"enabled": True, "max_batch_size": args.max_batch_size,
                  "max_calls_in_flight": args.max_calls_in_flight}  # fmt: skip
    seconds, warmup_s = (1.0, 0.5) if args.smoke else (args.seconds, 1.5)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-microbatch-"))
    from bench.noop import write_model
    from tests.support.tiny_models import build_tiny_bert, write_model_config

    (tmp / "noop").mkdir()
    (tmp / "tiny").mkdir()
    versions = {
        "noop": write_model(tmp / "noop", 0.0),
        "tiny": write_model_config(tmp / "tiny", "v1", build_tiny_bert(tmp / "tiny-bert", seed=0)),
    }
    loads = bodies()
    results: dict[tuple[str, int, str], list[LoadResult]] = {}
    per_call = {(name, c): {"calls": 0, "items": 0} for name in MODELS for c in SCALE}
    app = LocalApp()
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        app.start(tmp, [], router={}, num_cpus=4,
                  build=lambda port, env: serve_config(versions, port, env, False, microbatch),
                  ready_paths=tuple(f"{p}/v2/health/ready" for p in MODELS.values()))  # fmt: skip
        for index, arm in enumerate(ORDER):
            if index == 0 or ORDER[index - 1] != arm:
                switch(app, arm == "on", microbatch)
            log(f"block {index + 1}/{len(ORDER)}: micro-batching {arm}")
            for name, prefix in MODELS.items():
                path = f"{prefix}/v2/models/{MODEL_NAMES[name]}/infer"
                for c in SCALE:
                    before = counters(app)[name]
                    result = closed_loop(app.url, path, loads[name], concurrency=c,
                                         seconds=seconds, warmup_s=warmup_s)  # fmt: skip
                    after = counters(app)[name]
                    log(f"  {name} {arm}: {result.summary()}")
                    results.setdefault((name, c, arm), []).append(result)
                    if arm == "on":  # (warm-up included: the ratio, not a count, is reported)
                        for key in ("calls", "items"):
                            per_call[(name, c)][key] += after[key] - before[key]
    finally:
        app.close()
        sys.stdout = stdout
    report: dict[str, Any] = {"models": {}}
    failed = 0
    first_error = None
    for name in MODELS:
        rows = []
        for c in SCALE:
            off, on = merged(results[(name, c, "off")]), merged(results[(name, c, "on")])
            failed += off.failed + on.failed
            first_error = first_error or off.first_error or on.first_error
            counted = per_call[(name, c)]
            rows.append({"concurrency": c, "off": figure(off), "on": figure(on),
                         "requests_per_call_on": ratio(counted["items"], counted["calls"]),
                         "on_over_off": {"rps": ratio(on.rps, off.rps),
                                         "p50": ratio(on.p50_ms, off.p50_ms),
                                         "p99": ratio(on.p99_ms, off.p99_ms)}})  # fmt: skip
        report["models"][name] = rows
    report.update({
        "failed_requests": failed, "first_error": first_error, "order": list(ORDER),
        "seconds_per_block": seconds, "microbatch_on": microbatch,
        "machine": machine(),
        "smoke": args.smoke, "wall_s": round(time.perf_counter() - started, 1),
    })  # fmt: skip
    emit(table(report), report, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
