"""Region waves across real local Ray clusters: does a failure in a later region stop the
waves, how fast, and do clients notice?

    cd /work/main && .venv/bin/python -m bench.waves [--regions N] [--bake-s S] [--json] [--smoke]

Starts N (default 2; `--smoke` 2) independent Ray clusters on this machine, one per region,
each its own `ray start --head` with its own ports, temp dir and node label (the
`tests/regions` harness: `tests/regions/conftest.py` `RayRegion`, `build_project`), and
deploys the recommender app (tiny random BERTs v1, v2, v3) in each from its rendered region
config. The last region's v2 fails every call (`faults: {error_rate: 1.0}`).

Then one wave per region, in order, each running the canary plan v1 -> v2 (`set_weight 50`,
`analysis_s 5`, fail-fast gates), `bake_s` between waves, `on_failure: halt`, with the
orchestrator (`app/ops/waves.py` `WavesRunner`, polling every 0.5 s) in this process and 2
client threads per region sending inference requests the whole time.

Reports: `regions`, `waves_completed` (waves that succeeded and baked), `halted_at_region`
(the last region, if the fault works), `client_requests`, `client_failed` (any non-200 or
transport error; goal 0: the routers' fallback hides the faulty candidate), and
`decision_latency_s`: from the failing region's controller recording its rollback (its
`/admin/rollout/history` event, wall clock) to the orchestrator's halt decision (its history,
wall clock): one poll interval plus one read, at most.

Needs ~1.5 GB of memory per region. Run Ray benches one at a time on a shared machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import bench_parser


def run(regions_n: int, bake_s: float) -> dict[str, Any]:
    from app.ops.waves import WavesRunner, load_waves, resolve_waves
    from bench.common import log
    from tests.regions.conftest import TOKEN, RayRegion, build_project, start_loads, write_yaml

    names = [f"r{i + 1}" for i in range(regions_n)]
    span = 10_000 // regions_n
    regions = {n: RayRegion(n, (10_002 + i * span, 10_001 + (i + 1) * span))
               for i, n in enumerate(names)}  # fmt: skip
    loads: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-waves-") as tmp:
        try:
            for region in regions.values():
                log(f"starting region {region.name}")
                region.start()
            root = build_project(regions, Path(tmp), faulty={names[-1]: "v2"})
            loads = start_loads(regions)
            waves = write_yaml(root / "configs/waves/bench.yaml", {
                "name": "bench", "on_failure": "halt", "poll_interval_s": 0.5,
                "waves": [{"regions": [{"region": n, "plan": "configs/rollouts/to-v2.yaml"}],
                           "bake_s": bake_s} for n in names],
            })  # fmt: skip
            spec = load_waves(waves)
            runner = WavesRunner(spec=spec, targets=resolve_waves(spec, root),
                                 state_dir=root / "state", root=root, log=log)  # fmt: skip
            started = time.monotonic()
            runner.run()
            elapsed = time.monotonic() - started
            for load in loads.values():
                load.__exit__(None, None, None)
            state = runner.state
            latency = None
            halted = state.get("halted_at_region")
            if halted:
                events = httpx.get(f"{regions[halted].url}/admin/rollout/history", timeout=10,
                                   headers={"authorization": f"Bearer {TOKEN}"}).json()  # fmt: skip
                rolled = [e.get("time_s") for e in events.get("events", [])
                          if e.get("to_phase") == "rolled_back"]  # fmt: skip
                decided = [
                    e["time"] for e in state["history"] if e["decision"].startswith("halted")
                ]
                if rolled and decided:
                    latency = round(decided[-1] - rolled[-1], 3)
            errors = [e for load in loads.values() for e in load.errors]
            return {
                "regions": regions_n,
                "waves_completed": state["waves_completed"],
                "phase": state["phase"],
                "halted_at_region": halted,
                "client_requests": sum(load.sent for load in loads.values()),
                "client_failed": len(errors),
                "client_failed_examples": errors[:3],
                "decision_latency_s": latency,
                "bake_s": bake_s,
                "waves_wall_s": round(elapsed, 1),
            }
        finally:
            for load in loads.values():
                load.__exit__(None, None, None)
            for region in regions.values():
                region.stop()


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench.waves", __doc__, json_help="print the result as JSON")
    parser.add_argument("--regions", type=int, default=2, help="regions (clusters), 2 to 4")
    parser.add_argument("--bake-s", type=float, default=5.0, help="bake between waves")
    parser.add_argument("--smoke", action="store_true", help="2 regions, 2 s bake")
    args = parser.parse_args(argv)
    if not 2 <= args.regions <= 4:
        parser.error(f"--regions must be between 2 and 4, got {args.regions}")
    if args.smoke:
        args.regions, args.bake_s = 2, 2.0
    result = run(args.regions, args.bake_s)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {value}")
    return 0 if result["client_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
