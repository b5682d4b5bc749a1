"""`rollout waves start | status | pause | resume | promote | abort WAVES.yaml` and
`rollout status --all-regions`. The orchestrator: app/ops/waves.py.

Exit status: 0 done (start: every wave succeeded); 1 the waves ended halted, rolled back or
aborted; 2 they cannot run (a bad waves file, another orchestrator holds them, bad state).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from app.errors import ConfigError

__all__ = ["add_waves_commands", "all_regions_status"]

STATE_DIR_ENV = "ROLLOUT_WAVES_STATE_DIR"


def _runner(args: argparse.Namespace) -> Any:
    from app.config import project_root
    from app.ops.waves import DEFAULT_STATE_DIR, WavesRunner, load_waves, resolve_waves

    root = Path(args.root) if args.root else project_root()
    spec = load_waves(Path(args.waves))
    targets = resolve_waves(spec, root, where=args.waves)
    state_dir = Path(args.state_dir or os.environ.get(STATE_DIR_ENV) or root / DEFAULT_STATE_DIR)

    def log(line: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        print(f"{stamp} {spec.name}: {line}", flush=True)

    return WavesRunner(spec=spec, targets=targets, state_dir=state_dir, root=root, log=log)


def _guard(action: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        from app.ops.waves import WavesError

        try:
            return int(action(args))
        except (ConfigError, WavesError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("stopped; `rollout waves start` again resumes where it stopped", file=sys.stderr)
            return 130

    return run


def _start(args: argparse.Namespace) -> int:
    runner = _runner(args)
    phase = runner.run(max_ticks=1 if args.once else None)
    print(_render_state(runner.state, now=time.time()))
    if not phase.terminal:
        return 0
    return 0 if phase.value == "succeeded" else 1


def _status(args: argparse.Namespace) -> int:
    runner = _runner(args)
    if args.json:
        print(json.dumps(runner.state, indent=2))
    else:
        holder = runner.lock.holder()
        print(_render_state(runner.state, now=time.time()))
        print(
            f"orchestrator: pid {holder.get('pid')} on {holder.get('host')}"
            if holder
            else "orchestrator: none running (`rollout waves start` resumes)"
        )
    return 0


def _command(args: argparse.Namespace) -> int:
    from app.ops.cli.admin_client import _actor
    from app.ops.waves import send_command

    runner = _runner(args)
    print(send_command(runner, args.action, _actor()))
    return 0


def _render_state(state: dict[str, Any], now: float) -> str:
    lines = [
        f"waves {state['name']}: {state['phase']}"
        + (" (paused by operator)" if state.get("paused") else "")
        + f", wave {state['wave'] + 1}/{state['waves_total']}, "
        f"{state['waves_completed']} completed, on_failure {state['on_failure']}"
    ]
    bake = state.get("bake")
    if bake:
        left = bake["bake_s"] - (now - bake["started_at"] - bake["paused_s"])
        lines.append(f"bake: {max(0.0, left):.0f}s of {bake['bake_s']:g}s left (wall clock)")
    if state.get("reason"):
        lines.append(f"reason: {state['reason']}")
    lines.append(f"{'region':<16}{'wave':>5}  {'status':<12}{'phase':<13}{'step':<22}weights")
    for region, record in state["regions"].items():
        reading = record.get("reading") or {}
        weights = reading.get("weights") or {}
        lines.append(
            f"{region:<16}{record['wave'] + 1:>5}  {record['status']:<12}"
            f"{str(record.get('phase') or '-'):<13}{str(reading.get('step') or '-')[:21]:<22}"
            + " ".join(f"{v}={w}" for v, w in weights.items())
            + (f"  ({record['error']})" if record.get("error") else "")
        )
    history = state.get("history") or []
    for entry in history[-5:]:
        stamp = time.strftime("%H:%M:%S", time.gmtime(entry["time"]))
        lines.append(f"  {stamp} wave {entry['wave'] + 1}: {entry['decision']}")
    return "\n".join(lines)


def all_regions_status(args: argparse.Namespace) -> int:
    """Every region with an `admin:` block in configs/regions/, side by side."""
    from app.config import project_root
    from app.ops.overlay import load_overlay, region_overlays
    from app.ops.waves import (
        RegionClient,
        RegionTarget,
        RegionUnreachable,
        region_reading,
    )

    root = Path(args.root) if getattr(args, "root", None) else project_root()
    rows: dict[str, Any] = {}
    for path in region_overlays(root):
        try:
            overlay = load_overlay(path)
        except ConfigError as exc:
            rows[path.stem] = {"error": str(exc)}
            continue
        if overlay.admin is None:
            rows[overlay.region] = {"error": "no admin: block in its overlay"}
            continue
        target = RegionTarget(
            region=overlay.region, wave=0, plan_file="", plan={}, plan_digest="", candidate="",
            url=overlay.admin.url.rstrip("/"), token_file=overlay.admin.token_file,
            dashboard_url=overlay.admin.dashboard_url, overlay_file=path,
        )  # fmt: skip
        try:
            status = RegionClient(target, args.timeout).status()
        except RegionUnreachable as exc:
            rows[overlay.region] = {"url": target.url, "error": str(exc)}
            continue
        rows[overlay.region] = {"url": target.url, **region_reading(status)}
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'region':<16}{'phase':<13}{'candidate':<10}{'step':<24}{'errors':>8}  weights")
        for region, row in rows.items():
            if "error" in row:
                print(f"{region:<16}{'unreachable':<13}{row['error']}")
                continue
            rate = row.get("candidate_error_rate")
            print(
                f"{region:<16}{str(row.get('phase')):<13}{str(row.get('candidate') or '-'):<10}"
                f"{str(row.get('step') or '-')[:23]:<24}"
                f"{'-' if rate is None else f'{rate:.2%}':>8}  "
                + " ".join(f"{v}={w}" for v, w in (row.get("weights") or {}).items())
            )
    return 0 if all("error" not in row for row in rows.values()) else 2


def add_waves_commands(commands: argparse._SubParsersAction) -> None:
    waves = commands.add_parser(
        "waves",
        help="roll a version across regions in waves (configs/waves/*.yaml)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = waves.add_subparsers(dest="waves_action", required=True)
    helps = {
        "start": "run (or resume) the waves until they end; restart it to resume",
        "status": "the waves' state: wave, bake, each region, the last decisions",
        "pause": "no region starts and the bake clock stops (live region rollouts go on)",
        "resume": "undo pause",
        "promote": "end the current bake now (and resume)",
        "abort": "stop, and send every region of this rollout back to stable",
    }
    for name, text in helps.items():
        sub = actions.add_parser(name, help=text, description=text)
        sub.add_argument("waves", help="waves file, e.g. configs/waves/recommender-v2.yaml")
        sub.add_argument(
            "--state-dir",
            default=None,
            help=f"where state and lock live (default ${STATE_DIR_ENV} or .rollout/waves)",
        )
        sub.add_argument(
            "--root", default=None, help="project root holding configs/ (default: this checkout)"
        )
        if name == "start":
            sub.add_argument("--once", action="store_true", help="one reconcile, then exit")
            sub.set_defaults(func=_guard(_start))
        elif name == "status":
            sub.add_argument("--json", action="store_true", help="the whole state as JSON")
            sub.set_defaults(func=_guard(_status))
        else:
            sub.set_defaults(func=_guard(_command), action=name)
