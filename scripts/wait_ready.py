"""Wait until the Serve app is RUNNING and the router says ready; print progress; fail fast.

Reads the same status as `serve status` (the dashboard's Serve API)."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import httpx


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--app", default="recommender")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    client = ServeSubmissionClient(args.dashboard)
    started = time.monotonic()
    last = None
    while time.monotonic() - started < args.timeout:
        app = client.get_serve_details().get("applications", {}).get(args.app)
        if app is not None:
            deployments = {}
            for name, d in app.get("deployments", {}).items():
                states = Counter(r["state"].lower() for r in d.get("replicas", []))
                replicas = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
                deployments[name] = f"{d['status']} ({replicas or 'no replicas yet'})"
            line = f"{app['status']}: " + "; ".join(
                f"{n} {s}" for n, s in sorted(deployments.items())
            )
            if line != last:
                print(f"  [{time.monotonic() - started:5.1f}s] {line}", flush=True)
                last = line
            if app["status"] == "DEPLOY_FAILED":
                for name, d in app.get("deployments", {}).items():
                    if d.get("message"):
                        print(f"  {name}: {d['message']}", file=sys.stderr)
                return 1
            if app["status"] == "RUNNING":
                try:
                    if httpx.get(f"{args.url}/v2/health/ready", timeout=5).status_code == 200:
                        print(f"  ready after {time.monotonic() - started:.1f}s")
                        return 0
                except httpx.HTTPError:
                    pass
        time.sleep(1)
    print(f"timed out after {args.timeout:.0f}s; see `serve status`", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
