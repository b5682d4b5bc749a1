"""Routed against plain through HAProxy, loaded by wrk: an outside load generator users know.

    cd /work/main && .venv/bin/python -m bench.wrkload [--json] [--seconds S] [--rounds N] [--smoke]

Needs `wrk` on PATH (Debian/Ubuntu: `apt-get install wrk`); without it, exit 2 at once.

The throwaway cluster of bench/throughput.py (its `LocalApp`, `throwaway_serving`, model config
and serve config), with two of its seven applications: the full routed recommender app
(Router: traffic split, breaker, metrics, drift and JSON access log on, cache off;
RolloutController; one MiniLM ModelServer replica) and the plain deployment of the same model
(bench/direct.py), both served by HAProxy on the cluster's HTTP port (direct ingress), as the
project serves. Then `wrk -t2 -c16 -d<S>s -s bench/wrk/infer.lua` against each: a warm-up of
each arm, then N rounds, the arms in turn and the order reversed every round (routed, plain,
plain, routed, ...) so the machine's drift hits both alike. The requests are throughput's
single-row ones (512 demo-world bodies sent in turn, `WRK_BODIES`), each from a new user
(`x-user-id`), so the numbers compare with throughput's MiniLM routed/haproxy and
plain/haproxy arms at 16 clients. wrk runs on the same cores as the cluster.

Prints a table (stderr with --json) and the JSON: per arm every round's wrk JSON line (what
bench/wrk/infer.lua's done() prints) and the arm pooled (requests and seconds summed; p50, p90,
p99 the mean of the rounds', max the largest), `routed_over_plain` (rps, p50, p99), `order`,
`cores`, `machine`. Exit 1 if any response was not 2xx or any socket error (connect, read,
write, timeout) happened, warm-ups included. Starts its own throwaway Ray and stops only that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from bench.common import bench_parser, cpu_count, emit, log, machine
from bench.localapp import ROOT, LocalApp  # before Ray starts: sets RAY_AUTH_MODE
from bench.throughput import (
    APP,
    MODEL_CONFIG,
    PLAIN_PATH,
    ROUTED_PATH,
    encoded,
    model_config,
    requests,
    serve_config,
)
from tests.support.waiting import throwaway_serving

__all__ = ["SCRIPT", "main", "pooled", "run_wrk"]

SCRIPT = ROOT / "bench/wrk/infer.lua"
PLAIN_APP = "direct"  # throughput's plain deployment of the served model
PREFIXES = {"routed": "", "plain": "/direct"}  # the route prefix wrk's URL carries, per arm
PATHS = {"routed": ROUTED_PATH, "plain": PLAIN_PATH}
SOCKET_ERRORS = ("connect", "read", "write", "timeout")
MISSING = "wrk is not on PATH: install it (Debian/Ubuntu: apt-get install wrk) and run again"


def wrk_command(url: str, *, seconds: int, threads: int, connections: int, timeout_s: int) -> list[str]:  # fmt: skip
    return ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", f"{timeout_s}s",
            "-s", str(SCRIPT.relative_to(ROOT)), url]  # fmt: skip


def run_wrk(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run wrk (from the repository root, where the script's path is relative to) and return
    the JSON line bench/wrk/infer.lua's done() printed."""
    seconds = int(next(a for a in command if a.startswith("-d"))[2:-1])
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=seconds + 120)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(command)} exited {done.returncode}: {(done.stderr or done.stdout).strip()[-500:]}"
        )
    return json.loads(lines[-1])


def failures(result: dict[str, Any]) -> int:
    """Responses that were not 2xx plus socket errors, in one wrk run."""
    return result["non_2xx"] + sum(result["socket_errors"][k] for k in SOCKET_ERRORS)


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm's rounds as one figure: requests and seconds summed; p50, p90 and p99 the mean of
    the rounds' that answered any request (wrk gives percentiles, not the latencies; None if
    none did), max the largest."""
    requests_, seconds = sum(r["requests"] for r in rounds), sum(r["duration_s"] for r in rounds)
    figure: dict[str, Any] = {"requests": requests_, "duration_s": round(seconds, 3),
                              "rps": round(requests_ / seconds, 2) if seconds > 0 else 0.0}  # fmt: skip
    answered = [r for r in rounds if r["requests"] > 0]
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        figure[key] = round(sum(r[key] for r in answered) / len(answered), 2) if answered else None
    figure["max_ms"] = max(r["max_ms"] for r in rounds)
    figure["socket_errors"] = {k: sum(r["socket_errors"][k] for r in rounds) for k in SOCKET_ERRORS}
    figure["non_2xx"] = sum(r["non_2xx"] for r in rounds)
    return figure


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def _cell(value: float | None, width: int) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}s}"


def two_apps(recommender: Path, http_port: int, env: dict[str, str]) -> dict[str, Any]:
    """throughput's serve config with only the routed recommender app and its plain twin (the
    no-op apps' model path is never read: they are dropped)."""
    config = serve_config(recommender, recommender, http_port, env)
    config["applications"] = [a for a in config["applications"] if a["name"] in (APP, PLAIN_APP)]
    return config


def table(report: dict[str, Any]) -> str:
    arms, r = report["arms"], report["routed_over_plain"]
    lines = [f"{'arm (wrk, through HAProxy)':28s} {'req/s':>8s} {'p50 ms':>9s} {'p90 ms':>9s} "
             f"{'p99 ms':>9s} {'max ms':>9s} {'requests':>9s} {'failed':>7s}"]  # fmt: skip
    for name, arm in arms.items():
        p = arm["pooled"]
        failed = failures(p)
        lines.append(f"{name:28s} {p['rps']:8.2f} {_cell(p['p50_ms'], 9)} {_cell(p['p90_ms'], 9)} "
                     f"{_cell(p['p99_ms'], 9)} {p['max_ms']:9.2f} {p['requests']:9d} {failed:7d}")  # fmt: skip
    lines += [
        f"routed / plain: rps {r['rps']}, p50 {r['p50']}, p99 {r['p99']}",
        f"order: {', '.join(report['order'])}; {report['command']}",
        f"{report['wrk']}; machine: {report['machine']}; ray {report['ray_version']}; {report['wall_s']:.0f}s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench.wrkload", __doc__)
    parser.add_argument(
        "--seconds", type=int, default=20, help="wrk -d per arm per round (default 20)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="rounds, each arm once in each (default 2)"
    )
    parser.add_argument(
        "--warmup-s", type=int, default=5, help="wrk -d of each arm's warm-up (default 5)"
    )
    parser.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    parser.add_argument("--connections", type=int, default=16, help="wrk -c (default 16)")
    parser.add_argument("--timeout-s", type=int, default=10, help="wrk --timeout (default 10)")
    parser.add_argument("--smoke", action="store_true",
                        help="1 round of 2 s after a 2 s warm-up: checks that it runs, figures are noise")  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("seconds", "rounds", "warmup_s", "threads", "connections", "timeout_s"):
        if getattr(args, name) < 1:
            parser.error(
                f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}"
            )
    if args.connections < args.threads:
        parser.error(
            f"--connections ({args.connections}) must be at least --threads ({args.threads})"
        )
    if shutil.which("wrk") is None:
        print(MISSING, file=sys.stderr)
        return 2
    seconds, rounds, warmup_s = (
        (2, 1, 2) if args.smoke else (args.seconds, args.rounds, args.warmup_s)
    )
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-wrkload-"))
    # throughput's model config: the demo's MiniLM v1 as `recommender` `v1`, one fixed replica.
    served = model_config(tmp, argparse.Namespace(
        model_config=MODEL_CONFIG, num_gpus=None, replicas=1, torch_threads=None,
        max_batch_size=None, batch_wait_ms=None, max_ongoing=None))  # fmt: skip
    assert served.source is not None  # model_config read it from a file
    recommender = Path(served.source)
    bodies = tmp / "bodies.jsonl"
    bodies.write_bytes(b"\n".join(encoded(requests(512, 1))) + b"\n")  # throughput's single-row
    haproxy_state, _, serving = throwaway_serving()
    os.environ.update(serving)  # before ray.init: Serve's controller and HAProxy manager read them
    env = {"WRK_MODEL": APP, "WRK_BODIES": str(bodies)}
    order = [arm for i in range(rounds) for arm in (("routed", "plain") if i % 2 == 0 else ("plain", "routed"))]  # fmt: skip
    found: dict[str, list[dict[str, Any]]] = {"routed": [], "plain": []}
    warmup: dict[str, dict[str, Any]] = {}
    app = LocalApp()
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        app.start(tmp, [], router={}, build=lambda port, app_env: two_apps(recommender, port, app_env),
                  num_cpus=5)  # as throughput's cluster, whose seven apps reserve 4.0  # fmt: skip

        def command(arm: str, duration: int) -> list[str]:
            return wrk_command(app.url + PREFIXES[arm], seconds=duration, threads=args.threads,
                               connections=args.connections, timeout_s=args.timeout_s)  # fmt: skip

        for arm in ("routed", "plain"):
            warmup[arm] = run_wrk(command(arm, warmup_s), env)
            if warmup[arm]["path"] != PATHS[arm]:  # the script and throughput name the same path
                raise RuntimeError(
                    f"wrk sent {warmup[arm]['path']}, throughput's {arm} path is {PATHS[arm]}"
                )
            log(f"warm-up {arm}: {warmup[arm]['rps']} req/s, {failures(warmup[arm])} failed")
        for i, arm in enumerate(order):
            result = run_wrk(command(arm, seconds), env)
            found[arm].append(result)
            log(f"round {i // 2 + 1} {arm}: {result['rps']} req/s, p50 {result['p50_ms']} ms, "
                f"p99 {result['p99_ms']} ms, {failures(result)} failed")  # fmt: skip
    finally:
        app.close()
        shutil.rmtree(haproxy_state, ignore_errors=True)
        sys.stdout = stdout
    arms: dict[str, dict[str, Any]] = {arm: {"url_path": PATHS[arm], "rounds": found[arm], "pooled": pooled(found[arm])}
            for arm in found}  # fmt: skip
    routed, plain = arms["routed"]["pooled"], arms["plain"]["pooled"]
    failed = sum(failures(r) for r in [*warmup.values(), *found["routed"], *found["plain"]])
    command_line = " ".join(wrk_command("URL", seconds=seconds, threads=args.threads,
                                        connections=args.connections, timeout_s=args.timeout_s))  # fmt: skip
    report = {
        "routed_over_plain": {
            "rps": ratio(routed["rps"], plain["rps"]),
            "p50": ratio(routed["p50_ms"], plain["p50_ms"]),
            "p99": ratio(routed["p99_ms"], plain["p99_ms"]),
        },  # fmt: skip
        "arms": arms,
        "warmup": warmup,
        "order": order,
        "failed": failed,
        "command": command_line,
        "env": {"WRK_MODEL": APP, "WRK_BODIES": "512 single-row demo-world bodies (throughput's)"},
        "settings": {
            "seconds": seconds,
            "rounds": rounds,
            "warmup_s": warmup_s,
            "threads": args.threads,
            "connections": args.connections,
            "timeout_s": args.timeout_s,
        },  # fmt: skip
        "wrk": wrk_version.splitlines()[0].strip() if wrk_version else "wrk",
        "cores": cpu_count(),
        "machine": machine(),
        "ray_version": ray.__version__,
        "smoke": args.smoke,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    emit(table(report), report, args.json)
    if failed:
        first = next(
            r for r in [*warmup.values(), *found["routed"], *found["plain"]] if failures(r)
        )
        print(f"{failed} failed (non-2xx or socket errors), first in a run of {first['path']}: "
              f"non_2xx {first['non_2xx']}, socket errors {first['socket_errors']}", file=sys.stderr)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
