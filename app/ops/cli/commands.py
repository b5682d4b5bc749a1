"""The `rollout` command.

    rollout validate [serve_config.yaml] [--no-load]   check configs, load models, smoke-test
    rollout checksum DIR                               print the sha256 block for a model config
    rollout declare PLAN.yaml [-o FILE]                put a plan into serve_config.yaml
    rollout validate --region R | --all-regions        ... with region overlays, and their fit
    rollout render [CONFIG] --region R [-o FILE]       the region's serve config (overlay merged)
    rollout kuberay [CONFIG] --region R [-o F|--check F]  the KubeRay RayService manifest
    rollout bench NAME [ARGS]                          python -m bench.NAME, from the checkout
    rollout capture export|import|stats --dir D --model M   the traffic sample (capture.py)
    rollout alertmanager --template T --url-file K=PATH --output F   Alertmanager config, URLs from files

Rollout control talks to the router's admin API over HTTP (`--url`, default $ROLLOUT_URL or
http://127.0.0.1:8000) with a bearer token (`--token`, default $ROLLOUT_ADMIN_TOKEN or the
file named by $ROLLOUT_ADMIN_TOKEN_FILE; see app/serving/auth.py):

    rollout status [--watch] [--json] [--interval S]   GET  /admin/rollout
    rollout start | pause | resume | abort             POST /admin/rollout/<command>
    rollout promote [--full]                           POST /admin/rollout/promote[-full]
    rollout history [--json]                           GET  /admin/rollout/history
    rollout status --all-regions [--json]              every region's overlay `admin:`, side by side
    rollout waves start|status|pause|resume|promote|abort WAVES.yaml   regions in waves
    rollout report [-o FILE.png] [--from-json FILE]    picture of the last rollout's timeline

Exit status: 0 done; 1 the rollout refused the command in its current phase (HTTP 409), or a
watched rollout ended rolled back or aborted; 2 the admin API could not be used (unauthorized,
admin API off, router unreachable, timeout, unexpected answer, bad token config).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from app.errors import ArtifactError, ConfigError
from app.ops.cli.admin_client import (
    ADMIN_PATH,
    COMMAND_PATHS,
    DEFAULT_URL,
    RETRY_FOR_S,
    URL_ENV,
    AdminClient,
    AdminError,
)
from app.ops.cli.render import (
    TERMINAL_PHASES,
    redraw,
    render_history,
    render_status,
)
from app.serving.artifacts import artifact_digests, resolve_artifact
from app.serving.auth import TOKEN_ENV, TOKEN_FILE_ENV, load_admin_token

__all__ = ["main", "render_history", "render_status"]


# ----------------------------------------------------------------------------- validate, checksum


def _validate(args: argparse.Namespace) -> int:
    from app.ops.validate import is_waves_file, validate_serve_config, validate_waves

    if is_waves_file(Path(args.config)):
        waves = validate_waves(Path(args.config))
        for note in waves.notes:
            print(f"ok: {note}")
        for error in waves.errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"{args.config}: valid" if waves.ok else f"{args.config}: {len(waves.errors)} error(s)",
              file=sys.stdout if waves.ok else sys.stderr)  # fmt: skip
        return 0 if waves.ok else 1

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    from app.ops.cli.regions import validation_targets

    status = 0
    for overlay, label in validation_targets(args.config, args.region, args.all_regions):
        report = validate_serve_config(
            Path(args.config), load_models=not args.no_load, progress=progress, overlay=overlay
        )
        for note in report.notes:
            print(f"ok: {note}")
        for error in report.errors:
            print(f"error: {error}", file=sys.stderr)
        if report.ok:
            print(f"{label}: valid")
        else:
            print(f"{label}: {len(report.errors)} error(s)", file=sys.stderr)
            status = 1
    if args.all_regions:  # and the waves that roll out across them
        from app.config import project_root
        from app.ops.waves import WAVES_DIR

        for path in sorted((project_root() / WAVES_DIR).glob("*.yaml")):
            waves = validate_waves(path)
            for error in waves.errors:
                print(f"error: {error}", file=sys.stderr)
            print(f"{path.relative_to(project_root())}: "
                  + ("valid" if waves.ok else f"{len(waves.errors)} error(s)"))  # fmt: skip
            status = status if waves.ok else 1
    return status


def _checksum(args: argparse.Namespace) -> int:
    try:
        directory = resolve_artifact(args.artifact, Path.cwd())
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    digests = artifact_digests(directory)
    if not digests:
        print(f"error: {directory}: no weights files found", file=sys.stderr)
        return 1
    value = next(iter(digests.values())) if len(digests) == 1 else digests
    print(yaml.safe_dump({"sha256": value}, sort_keys=True), end="")
    return 0


# ----------------------------------------------------------------------------- control commands


def _emit(text: str) -> None:
    """Print to stdout; a terminal that cannot show ✔ or █ gets `?` instead of a traceback."""
    try:
        sys.stdout.write(text + "\n")
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "ascii"
        sys.stdout.write(text.encode(encoding, "replace").decode(encoding) + "\n")
    sys.stdout.flush()


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _client(args: argparse.Namespace) -> AdminClient:
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    token = args.token
    if token is None:
        try:
            token = load_admin_token()
        except ConfigError as exc:
            raise AdminError(str(exc), 2) from exc
    return AdminClient(url, token, args.timeout, args.retry_for)


def _run_admin(action: Any) -> Any:
    """Wrap a control command: AdminError -> `error: ...` on stderr and its exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return action(args)
        except AdminError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return exc.exit_code

    return run


def _print_status(status: Mapping[str, Any], as_json: bool) -> None:
    if as_json:
        _emit(json.dumps(status, indent=2, ensure_ascii=False))
    else:
        _emit(render_status(status, now=time.time()))


def _status(args: argparse.Namespace) -> int:
    if args.all_regions:
        from app.ops.cli.waves import all_regions_status

        return all_regions_status(args)
    with _client(args) as client:
        if not args.watch:
            _print_status(client.status(), args.json)
            return 0
        tty = _stdout_is_tty()
        frames = 0
        try:
            while True:
                status = client.status()
                if args.json:  # one object per line, for jq and logs
                    _emit(json.dumps(status, ensure_ascii=False))
                elif tty:  # overwrite the last frame in place: no blank screen, no flicker
                    _emit(redraw(render_status(status, now=time.time())))
                else:
                    if frames:
                        _emit("-" * 72)
                    _emit(render_status(status, now=time.time()))
                frames += 1
                phase = status.get("phase")
                if phase in TERMINAL_PHASES:
                    return 0 if phase == "succeeded" else 1
                time.sleep(args.interval)
        except KeyboardInterrupt:
            return 0


def _command(args: argparse.Namespace) -> int:
    name = args.action
    if name == "promote" and args.full:
        name = "promote_full"
    with _client(args) as client:
        status = client.command(name)
    if not args.json:
        _emit(f"{COMMAND_PATHS[name]}: accepted; the rollout is {status.get('phase', '-')}")
    _print_status(status, args.json)
    return 0


def _history(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.history()
    events = data.get("events")
    if not isinstance(events, list):
        raise AdminError(f"GET {client.url}{ADMIN_PATH}/history: no `events` list in the answer", 2)
    if args.json:
        _emit(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        _emit(render_history([e for e in events if isinstance(e, Mapping)]))
    return 0


def _report(args: argparse.Namespace) -> int:
    from app.ops.report import ReportError, render_report

    status = None
    if args.from_json is not None:
        try:
            history = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as exc:
            raise AdminError(f"{args.from_json}: not a readable JSON history: {exc}", 2) from None
    else:
        with _client(args) as client:
            history = client.history()
            status = client.status()
    if not isinstance(history, Mapping):
        raise AdminError("the history is not a JSON object", 2)
    try:
        path = render_report(history, Path(args.output), status=status)
    except ReportError as exc:
        raise AdminError(str(exc), 1) from None
    print(f"{path}: {len(history.get('events') or [])} events, "
          f"{len(history.get('timeline') or [])} timeline samples")  # fmt: skip
    return 0


def _seconds(text: str, allow_zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        what = "0 or a positive" if allow_zero else "a positive"
        raise argparse.ArgumentTypeError(f"must be {what} number of seconds, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _seconds(text)


def _seconds_or_zero(text: str) -> float:
    return _seconds(text, allow_zero=True)


def _admin_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=None,
        help=f"the router's base URL (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        default=None,
        help=(
            f"admin bearer token (default: ${TOKEN_ENV}, or the file named by ${TOKEN_FILE_ENV}; "
            "prefer those: a command-line token shows in the process list)"
        ),
    )
    common.add_argument(
        "--timeout", type=_positive_float, default=5.0, help="seconds per HTTP request (default 5)"
    )
    common.add_argument(
        "--retry-for",
        type=_seconds_or_zero,
        default=RETRY_FOR_S,
        metavar="SECONDS",
        help=(
            "keep sending a request again for this long while it meets a transient failure: a "
            "dropped connection, a 503, the ingress's own 5xx page (a command keeps its "
            f"Idempotency-Key, so it is applied once; 0: never; default {RETRY_FOR_S:g})"
        ),
    )
    return common


def _declare(args: argparse.Namespace) -> int:
    import yaml

    from app.config import load_yaml
    from app.errors import ConfigError
    from app.ops.declare import declare_plan, load_plan

    try:
        plan = None if args.plan == "none" else load_plan(Path(args.plan))
        config = declare_plan(load_yaml(Path(args.config)), plan, app=args.app)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    text = yaml.safe_dump(config, sort_keys=False)
    if args.output is None:  # stdout: writing in place would drop the file's comments
        print(text, end="")
        return 0
    Path(args.output).write_text(text)
    what = f"plan {args.plan}" if plan is not None else "no rollout"
    print(f"{args.output}: declares {what}; check with `rollout validate {args.output}`, "
          f"apply with `serve deploy {args.output}`", file=sys.stderr)  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollout", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check serve_config.yaml and model configs")
    validate.add_argument("config", nargs="?", default="serve_config.yaml")
    validate.add_argument(
        "--no-load", action="store_true", help="check configs only; skip loading the models"
    )
    validate.add_argument(
        "--region", action="append", default=[],
        help="also apply configs/regions/<REGION>.yaml and check the fit on its cluster files "
        "(repeatable)",
    )  # fmt: skip
    validate.add_argument(
        "--all-regions", action="store_true",
        help="check the config as is, then with every overlay in configs/regions/",
    )  # fmt: skip
    validate.set_defaults(func=_validate)
    checksum = commands.add_parser("checksum", help="print the sha256 block for an artifact")
    checksum.add_argument("artifact", help="model directory, or package:<module>")
    checksum.set_defaults(func=_checksum)

    declare = commands.add_parser(
        "declare", help="put a rollout plan (configs/rollouts/*.yaml) into a serve config"
    )
    declare.add_argument("plan", help="plan file, or 'none' to declare no rollout")
    declare.add_argument("--config", default="serve_config.yaml", help="serve config to start from")
    declare.add_argument("--app", default=None, help="application name, if the config has several")
    declare.add_argument("-o", "--output", default=None, help="write here (default: stdout)")
    declare.set_defaults(func=_declare)

    from app.ops.cli.regions import add_region_commands

    add_region_commands(commands)

    from app.ops.cli.waves import add_waves_commands

    add_waves_commands(commands)

    from app.ops.cli.capture import add_capture_commands

    add_capture_commands(commands)

    common = _admin_options()
    status = commands.add_parser(
        "status", parents=[common], help="show the live rollout: phase, step, traffic, gates"
    )
    status.add_argument(
        "--watch",
        action="store_true",
        help=(
            "redraw every --interval seconds until Ctrl-C, or until the rollout ends "
            "(exit 0 succeeded, 1 rolled back or aborted)"
        ),
    )
    status.add_argument(
        "--json",
        action="store_true",
        help="print the raw JSON status (with --watch: one JSON object per line)",
    )
    status.add_argument(
        "--interval", type=_positive_float, default=2.0, help="seconds between redraws (default 2)"
    )
    status.add_argument(
        "--all-regions",
        action="store_true",
        help="every region with an `admin:` block in configs/regions/, side by side",
    )
    status.add_argument("--root", default=None, help=argparse.SUPPRESS)
    status.set_defaults(func=_run_admin(_status))
    helps = {
        "start": "start the declared rollout now",
        "promote": "end the current wait (pause, analysis, wait for promote) and move on",
        "pause": "freeze the step timer (gates keep judging)",
        "resume": "unfreeze the step timer; re-run an inconclusive analysis",
        "abort": "send all traffic back to the stable version",
    }
    for name, text in helps.items():
        sub = commands.add_parser(name, parents=[common], help=text, description=text)
        if name == "promote":
            sub.add_argument(
                "--full", action="store_true", help="skip the remaining steps: switch to 100%% now"
            )
        sub.add_argument("--json", action="store_true", help="print the resulting status as JSON")
        sub.set_defaults(func=_run_admin(_command), action=name)
    history = commands.add_parser(
        "history", parents=[common], help="list the rollout's events, oldest first"
    )
    history.add_argument("--json", action="store_true", help="print the raw JSON events")
    history.set_defaults(func=_run_admin(_history))
    report = commands.add_parser(
        "report", parents=[common],
        help="draw the last rollout's timeline (weights, error rate, p99, gate verdicts)",
    )  # fmt: skip
    report.add_argument("-o", "--output", default="rollout-report.png",
                        help="image to write: .png, .svg or .pdf (default rollout-report.png)")  # fmt: skip
    report.add_argument("--from-json", default=None, metavar="FILE",
                        help="draw a history saved with `rollout history --json` instead of asking the router")  # fmt: skip
    report.set_defaults(func=_run_admin(_report))
    bench = commands.add_parser(
        "bench", help="run a benchmark from bench/ (e.g. `rollout bench abtest --json`)",
        description="Run `python -m bench.<name>` with the remaining arguments; "
        f"benchmarks: {', '.join(BENCHMARKS)}.",
    )  # fmt: skip
    bench.add_argument("name", choices=BENCHMARKS, help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="its own arguments (--json, ...)")
    bench.set_defaults(func=_bench)
    alertmanager = commands.add_parser(
        "alertmanager", add_help=False,
        help="render configs/prometheus/alertmanager.yml with its webhook URLs read from files",
        description="Same as `python -m app.ops.alertmanager` (--template, --url-file KEY=PATH, "
        "--output); `rollout alertmanager --help` shows its options.",
    )  # fmt: skip
    alertmanager.add_argument("rest", nargs=argparse.REMAINDER, help="its own arguments")
    return parser


BENCHMARKS = (
    "abtest", "autoscale", "chaos", "hotpatch", "loadgate", "microbatch", "propagation",
    "rollback", "throughput", "waves", "world", "wrkload",
)  # fmt: skip


def _bench(args: argparse.Namespace) -> int:
    """Benchmarks live in the repository's bench/ package (run from the repository root)."""
    import runpy

    if Path("bench", "__init__.py").is_file() and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        import bench  # noqa: F401
    except ImportError:
        print("rollout bench: the bench/ package is not importable; run from the repository root",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.argv = [f"rollout bench {args.name}", *args.rest]
    try:
        runpy.run_module(f"bench.{args.name}", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["alertmanager"]:  # its own options (argparse's REMAINDER skips a leading --x)
        from app.ops.alertmanager import main as render_main

        return render_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
