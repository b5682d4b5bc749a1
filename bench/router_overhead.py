"""What the router costs: the same no-op model served through the router and directly.

    cd /work/main && .venv/bin/python -m bench.router_overhead [--json] [--requests N] [--smoke]

Starts a throwaway Ray (its own, `address="local"`, 4 logical CPUs, no dashboard) and Serve on a
free loopback port, and deploys two apps side by side:

* `routed` (route prefix `/`): `app.builder.build_app` with one version, v1, of a no-op model
  (`bench.noop:NoopAdapter`, y = x): the Router ingress (FastAPI, V2 codec, traffic choice,
  circuit breaker) calls the `noop-v1` ModelServer (sha256 check at load, `@serve.batch`).
  Router user_config: weights {v1: 100}, breaker on, no shadow, cache off.
* `direct` (route prefix `/direct`): one plain deployment whose `__call__` decodes the same V2
  JSON body with the same codec (`app.protocol`), runs `NoopAdapter.predict` in-process and
  encodes the V2 response: the same model and protocol work without the router hop. It takes
  the Router's ingress settings (max_ongoing_requests, num_cpus), so the two differ only in what
  the router adds.

Then, over loopback with httpx, on single-row requests of 16 FP32 values:

1. latency at concurrency 1, `--requests` per target (300; smoke 30), routed and direct
   interleaved request by request, after a warm-up;
2. throughput at concurrency 16, `--throughput-requests` per target (1000; smoke 100), in
   blocks ordered routed, direct, direct, routed so drift hits both alike.

Prints a table (stdout; stderr with --json) and, with --json, one JSON object on stdout.
Progress goes to stderr. Shuts down only the Serve and Ray it started.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# A throwaway cluster of our own: token auth off (real clusters keep it on). Before `import ray`.
os.environ["RAY_AUTH_MODE"] = "disabled"

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import yaml  # noqa: E402
from ray import serve  # noqa: E402

from app.artifacts import artifact_digests  # noqa: E402
from bench.common import cpu_count, free_port, log, shutdown  # noqa: E402
from bench.noop import NoopAdapter  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent  # the checkout: `bench` and `app` import from here
MODEL, VERSION = "noop", "v1"
ROUTED_APP, DIRECT_APP = "routed", "direct"
DIRECT_PREFIX = "/direct"
INFER_PATH = f"/v2/models/{MODEL}/infer"
FLOATS = 16
CONCURRENCY = 16
# The Router's user_config (TrafficConfig): everything to v1, breaker on, no shadow, cache off.
TRAFFIC: dict[str, Any] = {
    "stable": VERSION,
    "weights": {VERSION: 100},
    "breaker": {"enabled": True},
    "cache": {"enabled": False},
}


# -- the two apps ------------------------------------------------------------------------------


def write_model(root: Path, batch_wait_s: float) -> Path:
    """A no-op model version: an artifact dir with one random weights file, and its config."""
    artifact = root / "noop-artifact"
    artifact.mkdir()
    (artifact / "noop.safetensors").write_bytes(os.urandom(4096))
    config = {
        "name": MODEL,
        "version": VERSION,
        "artifact": str(artifact),
        "sha256": artifact_digests(artifact)["noop.safetensors"],
        "adapter": "bench.noop:NoopAdapter",
        "resources": {"num_cpus": 0.5},
        "max_ongoing_requests": 32,
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": batch_wait_s},
    }
    path = root / f"{VERSION}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def routed_app(model_config: Path, max_ongoing_requests: int | None = None):
    """`build_app` as serve_config.yaml would run it, with TRAFFIC as the Router's user_config.

    A serve config sets it with `deployments: [{name: Router, user_config: ...}]`; from Python,
    Serve's `Application` has no public `options`, so the bound ingress deployment is re-optioned
    (its init args are kept). If that ever fails, build_app's default (100% to the first version,
    TrafficConfig defaults: breaker on, no shadow, cache off) is the same table, and the live
    config is checked through /status before measuring either way.
    `max_ongoing_requests` overrides the Router's (what-if; default: as build_app sets it).
    Returns (app, the Router's max_ongoing_requests, the Router's ray_actor_options).
    """
    from ray.serve import Application

    from app.builder import build_app

    app = build_app({"model": MODEL, "versions": [str(model_config)], "config_root": str(model_config.parent)})
    try:
        router = app._bound_deployment
        overrides: dict[str, Any] = {"user_config": TRAFFIC}
        if max_ongoing_requests is not None:
            overrides["max_ongoing_requests"] = max_ongoing_requests
        router = router.options(**overrides)
        return Application(router), router.max_ongoing_requests, dict(router.ray_actor_options or {})
    except AttributeError:
        if max_ongoing_requests is not None:
            raise
        log("could not set the Router's user_config; using build_app's default (checked below)")
        return app, None, {}


def direct_app(max_ongoing_requests: int, ray_actor_options: dict[str, Any]):
    """One plain deployment: V2 JSON in, NoopAdapter.predict in-process, V2 JSON out."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    from app.errors import InvalidInput
    from app.protocol import INFERENCE_HEADER, check_request, decode_body, encode_infer_response

    @serve.deployment(
        name="Direct", max_ongoing_requests=max_ongoing_requests, ray_actor_options=ray_actor_options
    )
    class Direct:
        def __init__(self) -> None:
            self.adapter = NoopAdapter(Path("."), NoopAdapter.parse_hyperparameters({}))

        async def __call__(self, request: Request) -> Response:
            try:
                raw = decode_body(await request.body(), header_length=request.headers.get(INFERENCE_HEADER))
                parsed = check_request(raw, NoopAdapter.inputs, NoopAdapter.outputs)
            except InvalidInput as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            [outputs] = self.adapter.predict([parsed.inputs], [parsed.parameters])
            content, headers = encode_infer_response(
                model=MODEL, version="direct", request=parsed, result=outputs,
                outputs=NoopAdapter.outputs,
            )  # fmt: skip
            return Response(content=content, headers=headers)

    return Direct.bind()


def wait_ready(client: httpx.Client, timeout_s: float = 60) -> None:
    """Until the router's health poll has seen v1 running (then /v2/health/ready is 200)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/v2/health/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the routed app was not ready within {timeout_s}s")


def check_router_config(client: httpx.Client) -> dict[str, Any]:
    status = client.get("/status").json()
    problems = []
    if status.get("weights") != {VERSION: 100} and status.get("weights") != {VERSION: 100.0}:
        problems.append(f"weights {status.get('weights')}")
    if status.get("shadow") is not None:
        problems.append(f"shadow {status.get('shadow')}")
    if status.get("cache", {}).get("enabled"):
        problems.append("cache enabled")
    if VERSION not in status.get("versions", {}) or "breaker" not in status["versions"][VERSION]:
        problems.append("no breaker for v1")
    if problems:
        raise RuntimeError(f"the live Router config is not the benchmark's: {', '.join(problems)}")
    return status


# -- load --------------------------------------------------------------------------------------


def request_body(rng: np.random.Generator) -> tuple[bytes, list[float]]:
    data = [float(v) for v in rng.standard_normal(FLOATS).astype(np.float32)]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [FLOATS], "data": data}]}
    return json.dumps(body).encode(), data


class Target:
    def __init__(self, name: str, base_url: str, path: str) -> None:
        self.name = name
        self.path = path
        self.client = httpx.AsyncClient(
            base_url=base_url,
            timeout=60,
            limits=httpx.Limits(max_connections=2 * CONCURRENCY, max_keepalive_connections=2 * CONCURRENCY),
        )
        self.errors = 0
        self.first_error: str | None = None

    async def send(self, body: bytes) -> httpx.Response:
        response = await self.client.post(self.path, content=body, headers={"content-type": "application/json"})
        if response.status_code != 200:
            self.errors += 1
            self.first_error = self.first_error or f"{response.status_code} {response.text[:200]}"
        return response

    async def timed(self, body: bytes) -> float:
        start = time.perf_counter()
        await self.send(body)
        return time.perf_counter() - start


async def verify(target: Target, body: bytes, data: list[float]) -> None:
    response = await target.send(body)
    if response.status_code != 200:
        raise RuntimeError(f"{target.name}: {response.status_code} {response.text[:300]}")
    [output] = response.json()["outputs"]
    if output["name"] != "y" or output["shape"] != [FLOATS] or output["data"] != data:
        raise RuntimeError(f"{target.name}: y != x: {response.text[:300]}")
    if target.name == "routed" and response.headers.get("x-model-version") != VERSION:
        raise RuntimeError(f"routed: served by {response.headers.get('x-model-version')!r}, not {VERSION}")


async def latency(targets: list[Target], bodies: list[bytes], n: int) -> dict[str, list[float]]:
    """Concurrency 1, interleaved request by request (order alternating), so both see the same
    machine state."""
    samples: dict[str, list[float]] = {t.name: [] for t in targets}
    step = max(1, n // 5)
    for i in range(n):
        order = targets if i % 2 == 0 else targets[::-1]
        for target in order:
            samples[target.name].append(await target.timed(bodies[i % len(bodies)]))
        if (i + 1) % step == 0:
            log(f"  latency: {i + 1}/{n} per target")
    return samples


async def throughput_block(target: Target, bodies: list[bytes], count: int, concurrency: int) -> float:
    """Send `count` requests with `concurrency` in flight; return the elapsed seconds."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await target.send(bodies[i % len(bodies)])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start


async def measure(base_url: str, n_latency: int, n_throughput: int, warmup: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    pairs = [request_body(rng) for _ in range(64)]
    bodies = [b for b, _ in pairs]
    routed = Target("routed", base_url, INFER_PATH)
    direct = Target("direct", base_url, DIRECT_PREFIX + INFER_PATH)
    targets = [routed, direct]
    try:
        for target in targets:
            for body, data in pairs[:4]:
                await verify(target, body, data)
        log(f"responses check out (y == x, routed served by {VERSION}); warming up: {warmup} per target, "
            f"sequential and at concurrency {CONCURRENCY}")  # fmt: skip
        for i in range(warmup):
            for target in targets:
                await target.send(bodies[i % len(bodies)])
        for target in targets:
            await throughput_block(target, bodies, warmup, CONCURRENCY)
        for target in targets:
            target.errors, target.first_error = 0, None  # count errors in the measured phases only

        log(f"latency at concurrency 1: {n_latency} requests per target, interleaved")
        samples = await latency(targets, bodies, n_latency)

        half = n_throughput // 2
        blocks = [(routed, half), (direct, half), (direct, n_throughput - half), (routed, n_throughput - half)]
        elapsed = {t.name: 0.0 for t in targets}
        done = {t.name: 0 for t in targets}
        log(f"throughput at concurrency {CONCURRENCY}: {n_throughput} requests per target, "
            "blocks routed, direct, direct, routed")  # fmt: skip
        for target, count in blocks:
            seconds = await throughput_block(target, bodies, count, CONCURRENCY)
            elapsed[target.name] += seconds
            done[target.name] += count
            log(f"  {target.name}: {count} requests in {seconds:.2f}s ({count / seconds:.0f} req/s)")
        return {
            "latency_s": samples,
            "rps": {name: done[name] / elapsed[name] for name in elapsed},
            "errors": {t.name: t.errors for t in targets},
            "first_error": {t.name: t.first_error for t in targets if t.first_error},
        }
    finally:
        for target in targets:
            await target.client.aclose()


# -- report ------------------------------------------------------------------------------------


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) * 1000.0


def table(result: dict[str, Any]) -> str:
    r = result
    rows = [
        ("", "routed", "direct", "routed - direct"),
        ("p50 latency, c=1 (ms)", f"{r['routed_p50_ms']:.2f}", f"{r['direct_p50_ms']:.2f}",
         f"{r['router_added_p50_ms']:+.2f}"),
        ("p99 latency, c=1 (ms)", f"{r['routed_p99_ms']:.2f}", f"{r['direct_p99_ms']:.2f}",
         f"{r['routed_p99_ms'] - r['direct_p99_ms']:+.2f}"),
        (f"throughput, c={r['concurrency']} (req/s)", f"{r['routed_rps']:.0f}", f"{r['direct_rps']:.0f}",
         f"routed/direct = {r['routed_over_direct']:.2f}"),
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"{r['requests']} latency requests and {r['throughput_requests']} throughput requests per target, "
        f"{FLOATS} FP32 per request; errors: {r['errors']}; batch_wait_timeout_s={r['batch_wait_timeout_s']}; "
        f"Router max_ongoing_requests={r['router_max_ongoing_requests']}"
    )
    lines.append(f"machine: {r['machine']}; ray {r['ray_version']}; {r['wall_s']:.0f}s in all")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (table on stderr)")
    parser.add_argument("--requests", type=int, default=None,
                        help="latency requests per target at concurrency 1 (default 300; --smoke 30)")
    parser.add_argument("--throughput-requests", type=int, default=None,
                        help=f"requests per target at concurrency {CONCURRENCY} (default 1000; --smoke 100)")
    parser.add_argument("--smoke", action="store_true", help="few requests: checks that the bench works")
    parser.add_argument("--batch-wait-ms", type=float, default=0.0,
                        help="the noop version's batching.batch_wait_timeout_s, in ms (default 0: a "
                             "lone request is not held back waiting for a batch to fill; the "
                             "project's default is 5)")  # fmt: skip
    parser.add_argument("--router-max-ongoing", type=int, default=None, metavar="N",
                        help="what-if: the Router's max_ongoing_requests (and so the direct "
                             "deployment's); default: as build_app sets it")  # fmt: skip
    args = parser.parse_args(argv)
    n_latency = args.requests or (30 if args.smoke else 300)
    n_throughput = args.throughput_requests or (100 if args.smoke else 1000)
    warmup = 10 if args.smoke else 50
    if n_latency < 2 or n_throughput < 2:
        parser.error("--requests and --throughput-requests must be at least 2")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-router-overhead-"))
    ray_started = serve_started = False
    # Ray prints some of its own messages (e.g. "(raylet) ..." during shutdown) with print():
    # send them to stderr so stdout holds only the table or the JSON object.
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        model_config = write_model(tmp, args.batch_wait_ms / 1000.0)
        port = free_port()
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        log("starting a throwaway Ray (address=local, num_cpus=4, no dashboard)")
        ray.init(
            address="local",  # always a new cluster of our own, never one that is already running
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            # Workers (the Router and the noop replicas) import `bench.noop` from the checkout.
            runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_AUTH_MODE": "disabled"}},
        )
        ray_started = True
        log(f"starting Serve on http://127.0.0.1:{port}")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve_started = True

        app, router_max_ongoing, router_actor_options = routed_app(model_config, args.router_max_ongoing)
        log(f"deploying {ROUTED_APP!r} at / (build_app: Router -> {MODEL}-{VERSION})")
        serve.run(app, name=ROUTED_APP, route_prefix="/")
        ingress_max_ongoing = router_max_ongoing or 5
        log(f"deploying {DIRECT_APP!r} at {DIRECT_PREFIX} (one deployment, "
            f"max_ongoing_requests={ingress_max_ongoing}, {router_actor_options})")  # fmt: skip
        serve.run(direct_app(ingress_max_ongoing, router_actor_options), name=DIRECT_APP,
                  route_prefix=DIRECT_PREFIX)  # fmt: skip
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=30) as client:
            wait_ready(client)
            status = check_router_config(client)
        log(f"Router live config: weights {status['weights']}, stable {status['stable']}, shadow "
            f"{status['shadow']}, cache {status['cache']['enabled']}, breaker {status['versions'][VERSION]['breaker']['state']}")  # fmt: skip
        log(f"deployed in {time.perf_counter() - started:.0f}s")

        measured = asyncio.run(measure(base_url, n_latency, n_throughput, warmup))
    finally:
        shutdown(serve_started=serve_started, ray_started=ray_started, tmp=tmp)
        sys.stdout = stdout

    lat = measured["latency_s"]
    rps = measured["rps"]
    result: dict[str, Any] = {
        "router_added_p50_ms": round(percentile_ms(lat["routed"], 50) - percentile_ms(lat["direct"], 50), 3),
        "routed_over_direct": round(rps["routed"] / rps["direct"], 3),
        "routed_p50_ms": round(percentile_ms(lat["routed"], 50), 3),
        "routed_p99_ms": round(percentile_ms(lat["routed"], 99), 3),
        "direct_p50_ms": round(percentile_ms(lat["direct"], 50), 3),
        "direct_p99_ms": round(percentile_ms(lat["direct"], 99), 3),
        "routed_rps": round(rps["routed"], 1),
        "direct_rps": round(rps["direct"], 1),
        "concurrency": CONCURRENCY,
        "requests": n_latency,
        "throughput_requests": n_throughput,
        "errors": measured["errors"],
        "batch_wait_timeout_s": args.batch_wait_ms / 1000.0,
        "router_max_ongoing_requests": router_max_ongoing,
        "smoke": args.smoke,
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_count()} CPUs, "
                   f"python {platform.python_version()}",  # fmt: skip
        "ray_version": ray.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if measured["first_error"]:
        result["first_error"] = measured["first_error"]
    print(table(result), file=sys.stderr if args.json else sys.stdout, flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    if any(measured["errors"].values()):
        log(f"requests failed: {measured['errors']} (first: {measured['first_error']})")
        return 1
    if not all(math.isfinite(v) for v in (result["router_added_p50_ms"], result["routed_over_direct"])):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
