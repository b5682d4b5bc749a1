"""Changes under load: time from `serve deploy` to every replica serving the change, the client
requests that failed meanwhile (expected 0), and the replicas restarted outside the changed
version (expected 0), for each kind of change.

    cd /work/main && .venv/bin/python -m bench.hotpatch [--json] [--smoke]
    rollout bench hotpatch --json

A throwaway Ray + Serve (bench/localapp.py) runs the recommender with one application per
version (`version_apps`, as in serve_config.version-apps.yaml): tiny random BERTs v1 and v2,
50/50, one replica each, under 6 steady client threads (random user ids, bench/rollback.py's
Load). Each change is one `deploy_applications` call (what `serve deploy` sends) of the whole
config with one difference, and "serving it" is read from the replicas and the router:

* hyperparameters: v2's user_config (a query prefix): every v2 replica's info() reports the
  new user_config's digest;
* weights: v2's user_config names another artifact: loaded beside the old, checked, smoke
  tested, swapped; every v2 replica reports it;
* refused_weights: a wrong sha256 beside a hyperparameter change: every v2 replica reports
  the refusal and still the previous digest (time to the refusal);
* router: the Router's traffic table (30/70): the router's /status shows it;
* add_version: v3's application and its weight: the router routes to v3 (status and a
  pinned request);
* code: v2's runtime_env changes (new code): all v2 replicas are new and answer;
* resources: v2's replica resources (args): the same;
* retire_version: v3's weight and application removed: v3 is gone and the router's table
  has no v3;
* plan: a rollout plan in the RolloutController's user_config: the controller reports it.

Prints one JSON object: {"patches": {kind: {seconds, failed_requests, requests,
replicas_restarted}}, ...}; replicas_restarted counts replicas outside the changed version's
application. Exit status 1 if a request failed, a replica restarted elsewhere or a change never
showed.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray  # noqa: E402

from app.config import config_hash  # noqa: E402
from app.rollout import RolloutPlan  # noqa: E402
from bench.common import bench_parser, log, machine  # noqa: E402
from bench.localapp import APP, TICK_S, LocalApp, wait_for  # noqa: E402 - sets RAY_AUTH_MODE first
from bench.rollback import Load  # noqa: E402
from tests.support.waiting import handle_call  # noqa: E402

POLL_S = 0.05
BODY = {
    "inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [1], "data": ["likes space opera films"]},
        {
            "name": "items",
            "datatype": "BYTES",
            "shape": [2],
            "data": ["a space opera", "a cooking show"],
        },
    ]
}


class Declared:
    """What the serve config declares; `config()` renders it (version apps + router app)."""

    def __init__(self, versions: dict[str, Path], http_port: int, env: dict[str, str]) -> None:
        self.versions = dict(versions)
        self.http_port, self.env = http_port, env
        self.weights: dict[str, float] = {"v1": 50, "v2": 50}
        self.user_configs: dict[str, dict[str, Any]] = {}
        self.version_env: dict[str, dict[str, str]] = {}
        self.resources: dict[str, dict[str, Any]] = {}
        self.plan: dict[str, Any] | None = None

    def config(self) -> dict[str, Any]:
        applications = []
        for version, path in self.versions.items():
            name = f"{APP}-{version}"
            args: dict[str, Any] = {"config": str(path)}
            if version in self.resources:
                args["resources"] = self.resources[version]
            app: dict[str, Any] = {"name": name, "route_prefix": None,
                                   "import_path": "app.builder:build_version", "args": args,
                                   "runtime_env": {"env_vars": {**self.env, **self.version_env.get(version, {})}}}  # fmt: skip
            if version in self.user_configs:
                app["deployments"] = [{"name": name, "user_config": self.user_configs[version]}]
            applications.append(app)
        applications.append({
            "name": APP, "route_prefix": "/", "import_path": "app.builder:build_app",
            "args": {"model": APP, "version_apps": True}, "runtime_env": {"env_vars": self.env},
            "deployments": [
                {"name": "Router", "user_config": {"stable": "v1", "weights": self.weights}},
                {"name": "RolloutController", "user_config": {"plan": self.plan, "tick_interval_s": TICK_S}},
            ],
        })  # fmt: skip
        return {
            "http_options": {"host": "127.0.0.1", "port": self.http_port},
            "applications": applications,
        }


def infos(version: str, samples: int = 6) -> list[dict[str, Any]]:
    """info() from a version's replicas (several calls, so every replica is likely asked)."""
    name = f"{APP}-{version}"
    return [handle_call(name, name, "info") for _ in range(samples)]


def measure(app: LocalApp, load: Load, kind: str, config: dict[str, Any], shown: Callable[[], Any],
            changed_app: str | None) -> dict[str, Any]:  # fmt: skip
    before = app.replica_ids()
    sent0, errors0 = load.snapshot()
    started = time.monotonic()
    app.deploy(config)
    deploy_call_s = time.monotonic() - started
    wait_for(shown, timeout_s=180, interval_s=POLL_S, what=f"the {kind} change to show")
    seconds = time.monotonic() - started
    time.sleep(0.5)  # requests in flight at the switch finish
    sent1, errors1 = load.snapshot()
    after = app.replica_ids()
    elsewhere = [k for k in before if changed_app is None or not k.startswith(f"{changed_app}/")]
    restarted = sum(len(set(before[k]) - set(after.get(k, []))) for k in elsewhere)
    result = {"seconds": round(seconds, 3), "deploy_call_s": round(deploy_call_s, 3),
              "failed_requests": errors1 - errors0, "requests": sent1 - sent0,
              "replicas_restarted": restarted}  # fmt: skip
    log(f"{kind}: served {seconds:.2f}s after the deploy call; {result['failed_requests']} of "
        f"{result['requests']} requests failed; {restarted} replicas restarted elsewhere")  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench.hotpatch", __doc__, json_help="only the JSON object on stdout")
    parser.add_argument("--smoke", action="store_true", help="the same run (it is short); for CI")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-hotpatch-"))
    app = LocalApp()
    results: dict[str, Any] = {}
    failure: str | None = None
    load: Load | None = None
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        from app.serving.artifacts import artifact_digests
        from tests.support.tiny_models import build_tiny_bert
        from tests.support.tiny_models import write_model_config as model_config

        log("building tiny BERT artifacts (v1, v2, v3 and the weights to swap in)")
        a = build_tiny_bert(tmp / "tiny-a", seed=0)
        shutil.copytree(a, tmp / "tiny-a2")
        b = build_tiny_bert(tmp / "tiny-b", seed=1)
        paths = {
            v: model_config(tmp, v, p) for v, p in (("v1", a), ("v2", tmp / "tiny-a2"), ("v3", b))
        }
        state: Declared | None = None

        def build(http_port: int, env: dict[str, str]) -> dict[str, Any]:
            nonlocal state
            state = Declared({v: paths[v] for v in ("v1", "v2")}, http_port, env)
            return state.config()

        app.start(tmp, [], {}, build=build)
        assert state is not None
        wait_for(lambda: app.client.post(f"/v2/models/{APP}/infer", json=BODY).status_code == 200,
                 60, 0.2, "the first answer")  # fmt: skip
        v2_app = f"{APP}-v2"
        v3_app = f"{APP}-v3"
        pinned = lambda v: app.client.post(f"/v2/models/{APP}/versions/{v}/infer", json=BODY)  # noqa: E731
        status = lambda: app.client.get("/status").json()  # noqa: E731

        def new_replicas_answer(version: str, before: list[str]) -> Callable[[], bool]:
            def check() -> bool:
                now = app.replica_ids().get(f"{APP}-{version}/{APP}-{version}", [])
                details = app.details()["applications"].get(f"{APP}-{version}", {})
                return (bool(now) and not set(now) & set(before) and details.get("status") == "RUNNING"
                        and pinned(version).status_code == 200)  # fmt: skip

            return check

        digest_b = next(iter(artifact_digests(b).values()))
        hp = {"hyperparameters": {"query_prefix": "a fan of "}}
        swap = {**hp, "weights": {"artifact": str(b), "sha256": digest_b}}
        bad = {"hyperparameters": {"query_prefix": "refused "},
               "weights": {"artifact": str(a), "sha256": "0" * 64}}  # fmt: skip
        plan = {"strategy": "canary", "candidate": "v2", "stable": "v1",
                "canary": {"steps": [{"set_weight": 10}, {"pause_s": None}]},
                "gates": {"min_requests": 10, "max_p99_latency_ratio": None}}  # fmt: skip

        def step(kind: str, change: Callable[[Declared], None], shown: Callable[[], Any],
                 changed_app: str | None) -> None:  # fmt: skip
            change(state)
            results[kind] = measure(
                app, load, kind, copy.deepcopy(state.config()), shown, changed_app
            )

        with Load(app.url) as load:
            time.sleep(2.0)
            try:
                step("hyperparameters", lambda s: s.user_configs.update(v2=hp),
                     lambda: all(i["config"] == config_hash(hp) for i in infos("v2")), v2_app)  # fmt: skip
                step("weights", lambda s: s.user_configs.update(v2=swap),
                     lambda: all(i["config"] == config_hash(swap) and i["weights"] == str(b)
                                 for i in infos("v2")), v2_app)  # fmt: skip
                step("refused_weights", lambda s: s.user_configs.update(v2=bad),
                     lambda: all(i["refused_patch"] and i["config"] == config_hash(swap)
                                 for i in infos("v2")), v2_app)  # fmt: skip
                state.user_configs["v2"] = swap  # declare what runs again (not measured)
                app.deploy(state.config())
                wait_for(
                    lambda: all(i["refused_patch"] is None for i in infos("v2")),
                    60,
                    0.1,
                    "v2 settled",
                )
                router = {"v1": 30, "v2": 70}
                step("router", lambda s: setattr(s, "weights", router),
                     lambda: status()["weights"] == router, None)  # fmt: skip
                three = {"v1": 30, "v2": 50, "v3": 20}
                step("add_version", lambda s: (s.versions.update(v3=paths["v3"]), setattr(s, "weights", three)),
                     lambda: status()["weights"] == three and pinned("v3").status_code == 200, v3_app)  # fmt: skip
                v2_before = app.replica_ids()[f"{v2_app}/{v2_app}"]
                step("code", lambda s: s.version_env.update(v2={"ROLLOUT_BUILD": "2"}),
                     new_replicas_answer("v2", v2_before), v2_app)  # fmt: skip
                v2_before = app.replica_ids()[f"{v2_app}/{v2_app}"]
                step("resources", lambda s: s.resources.update(v2={"num_cpus": 0.25}),
                     new_replicas_answer("v2", v2_before), v2_app)  # fmt: skip
                two = {"v1": 30, "v2": 70}
                step("retire_version", lambda s: (s.versions.pop("v3"), setattr(s, "weights", two)),
                     lambda: v3_app not in app.details()["applications"] and status()["weights"] == two,
                     v3_app)  # fmt: skip
                digest = RolloutPlan.model_validate(plan).digest()
                step("plan", lambda s: setattr(s, "plan", plan),
                     lambda: app.admin()["plan_digest"] == digest, None)  # fmt: skip
            except Exception as exc:
                failure = f"{type(exc).__name__}: {exc}"
                log(f"change failed: {failure}")
    finally:
        if load is not None:
            load.stop.set()
        app.close()
        sys.stdout = stdout

    report: dict[str, Any] = {
        "patches": results,
        "failed_requests": sum(r["failed_requests"] for r in results.values()),
        "replicas_restarted_elsewhere": sum(r["replicas_restarted"] for r in results.values()),
        "requests_sent": load.sent if load else 0,
        "client_error_messages": (load.errors[:10] if load else []),
        "machine": machine(),
        "ray_version": ray.__version__,
        "smoke": args.smoke,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if failure:
        report["failure"] = failure
    print(json.dumps(report), flush=True)
    bad_run = (
        failure
        or report["failed_requests"]
        or report["replicas_restarted_elsewhere"]
        or len(results) < 9
    )
    return 1 if bad_run else 0


if __name__ == "__main__":
    sys.exit(main())
