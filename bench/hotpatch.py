"""Hot patches under load: time from `serve deploy` to every replica serving the patch, and the
client requests that failed meanwhile (expected 0), for each kind of in-place change.

    cd /work/main && .venv/bin/python -m bench.hotpatch [--json] [--smoke]
    rollout bench hotpatch --json

A throwaway Ray + Serve (bench/localapp.py) runs the recommender app with two tiny random BERT
versions (v1 and v2, 50/50, one replica each) under 6 steady client threads (random user ids,
bench/rollback.py's Load). Each patch is one `deploy_applications` call (what `serve deploy` does) with one change,
and "serving the patch" is read from the replicas themselves:

* hyperparameters: v2's `user_config.hyperparameters` (a query prefix): every v2 replica's
  `info()["config"]` is the new user_config's digest;
* weights: v2's `user_config.weights` names another artifact: loaded beside the old one,
  checked, smoke-tested and swapped; every v2 replica reports the new weights and digest;
* refused_weights: a weights patch with a wrong sha256: every v2 replica reports the refusal
  and keeps serving the previous weights (the time is to the refusal);
* router: the Router's traffic table (weights 30/70): every router replica's /status shows it
  (one router replica here);
* plan: a rollout plan in the RolloutController's user_config: the controller reports the
  new plan digest.

Replica ids are compared before and after each patch (none may restart). Prints one JSON
object: {"patches": {kind: {seconds, failed_requests, requests, replicas_restarted}}, ...}.
Exit status 1 if a request failed, a replica restarted or a patch never showed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.localapp import APP, TICK_S, LocalApp, wait_for, with_user_configs  # noqa: E402 - sets RAY_AUTH_MODE first

import ray  # noqa: E402

from app.config import config_hash  # noqa: E402
from app.rollout import RolloutPlan  # noqa: E402
from bench.common import cpu_count, log  # noqa: E402
from bench.rollback import Load  # noqa: E402

V2 = f"{APP}-v2"
POLL_S = 0.05


def v2_infos(samples: int = 6) -> list[dict[str, Any]]:
    """info() from v2's replicas (several calls, so every replica is likely asked)."""
    from ray import serve

    handle = serve.get_deployment_handle(V2, app_name=APP)
    return [handle.info.remote().result() for _ in range(samples)]


def measure(app: LocalApp, load: Load, kind: str, config: dict[str, Any],
            shown: Callable[[], Any], timeout_s: float = 120) -> dict[str, Any]:  # fmt: skip
    before = app.replica_ids()
    sent0, errors0 = load.snapshot()
    started = time.monotonic()
    app.deploy(config)
    deploy_call_s = time.monotonic() - started
    wait_for(shown, timeout_s=timeout_s, interval_s=POLL_S, what=f"the {kind} patch to show")
    seconds = time.monotonic() - started
    time.sleep(0.5)  # requests in flight at the switch finish
    sent1, errors1 = load.snapshot()
    after = app.replica_ids()
    restarted = sum(len(set(ids) - set(after.get(name, []))) for name, ids in before.items())
    result = {"seconds": round(seconds, 3), "deploy_call_s": round(deploy_call_s, 3),
              "failed_requests": errors1 - errors0, "requests": sent1 - sent0,
              "replicas_restarted": restarted}  # fmt: skip
    log(f"{kind}: served by every replica {seconds:.2f}s after the deploy call; "
        f"{result['failed_requests']} of {result['requests']} requests failed; {restarted} restarted")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpatch", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    parser.add_argument("--smoke", action="store_true", help="same run (it is short); for CI")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-hotpatch-"))
    app = LocalApp()
    results: dict[str, Any] = {}
    failure: str | None = None
    load: Load | None = None
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        from tests.integration.tiny_models import build_tiny_bert, write_model_config as model_config

        log("building tiny BERT artifacts (v1, v2, and the weights to swap in)")
        a = build_tiny_bert(tmp / "tiny-a", seed=0)
        shutil.copytree(a, tmp / "tiny-a2")
        b = build_tiny_bert(tmp / "tiny-b", seed=1)
        versions = [model_config(tmp, "v1", a), model_config(tmp, "v2", tmp / "tiny-a2")]
        app.start(tmp, versions, router={"stable": "v1", "weights": {"v1": 50, "v2": 50}})
        base = app.config
        v2_base = {"hyperparameters": {}, "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.005}}
        from app.artifacts import artifact_digests

        digest_b = next(iter(artifact_digests(b).values()))
        patches: list[tuple[str, dict[str, Any], Callable[[], Any]]] = []

        hp = {**v2_base, "hyperparameters": {"query_prefix": "a fan of "}}
        patches.append(("hyperparameters", with_user_configs(base, **{V2: hp}),
                        lambda: all(i["config"] == config_hash(hp) for i in v2_infos())))  # fmt: skip
        swap = {**hp, "weights": {"artifact": str(b), "sha256": digest_b}}
        patches.append(("weights", with_user_configs(base, **{V2: swap}),
                        lambda: all(i["config"] == config_hash(swap) and i["weights"] == str(b)
                                    for i in v2_infos())))  # fmt: skip
        bad = {**hp, "weights": {"artifact": str(a), "sha256": "0" * 64}}
        patches.append(("refused_weights", with_user_configs(base, **{V2: bad}),
                        lambda: all(i["refused_patch"] and i["weights"] == str(b) for i in v2_infos())))  # fmt: skip
        router = {"stable": "v1", "weights": {"v1": 30, "v2": 70}}
        patches.append(("router", with_user_configs(base, **{V2: bad, "Router": router}),
                        lambda: app.client.get("/status").json()["weights"] == router["weights"]))  # fmt: skip
        plan = {"strategy": "canary", "candidate": "v2", "stable": "v1",
                "canary": {"steps": [{"set_weight": 10}, {"pause_s": None}]},
                "gates": {"min_requests": 10, "max_p99_latency_ratio": None}}  # fmt: skip
        digest = RolloutPlan.model_validate(plan).digest()
        patches.append(("plan", with_user_configs(base, **{V2: bad, "Router": router,
                        "RolloutController": {"plan": plan, "tick_interval_s": TICK_S}}),
                        lambda: app.admin()["plan_digest"] == digest))  # fmt: skip

        with Load(app.url) as load:
            time.sleep(2.0)
            for kind, config, shown in patches:
                try:
                    results[kind] = measure(app, load, kind, config, shown)
                except Exception as exc:
                    failure = f"{kind}: {type(exc).__name__}: {exc}"
                    log(f"patch failed: {failure}")
                    break
    finally:
        if load is not None:
            load.stop.set()
        app.close()
        sys.stdout = stdout

    report: dict[str, Any] = {
        "patches": results,
        "failed_requests": sum(r["failed_requests"] for r in results.values()),
        "replicas_restarted": sum(r["replicas_restarted"] for r in results.values()),
        "requests_sent": load.sent if load else 0,
        "client_error_messages": (load.errors[:10] if load else []),
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_count()} CPUs, "
                   f"python {platform.python_version()}",  # fmt: skip
        "ray_version": ray.__version__,
        "smoke": args.smoke,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if failure:
        report["failure"] = failure
    print(json.dumps(report), flush=True)
    bad_run = failure or report["failed_requests"] or report["replicas_restarted"] or len(results) < 5
    return 1 if bad_run else 0


if __name__ == "__main__":
    sys.exit(main())
