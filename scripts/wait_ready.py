"""Wait until the Serve apps (the router app and its version apps) are RUNNING and the router says ready; print progress; fail fast.

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
        # The model's router app and, with one application per version (serve_config.yaml),
        # its version apps `<app>-<version>`.
        apps = {
            name: app for name, app in client.get_serve_details().get("applications", {}).items()
            if name == args.app or name.startswith(f"{args.app}-")
        }  # fmt: skip
        if args.app in apps:
            lines = []
            for app_name, app in sorted(apps.items()):
                deployments = []
                for name, d in sorted(app.get("deployments", {}).items()):
                    states = Counter(r["state"].lower() for r in d.get("replicas", []))
                    replicas = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
                    deployments.append(f"{name} {d['status']} ({replicas or 'no replicas yet'})")
                lines.append(f"{app_name} {app['status']}: " + "; ".join(deployments))
            line = " | ".join(lines)
            if line != last:
                print(f"  [{time.monotonic() - started:5.1f}s] {line}", flush=True)
                last = line
            failed = [app for app in apps.values() if app["status"] == "DEPLOY_FAILED"]
            for app in failed:
                for name, d in app.get("deployments", {}).items():
                    if d.get("message"):
                        print(f"  {name}: {d['message']}", file=sys.stderr)
            if failed:
                return 1
            if all(app["status"] == "RUNNING" for app in apps.values()):
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
