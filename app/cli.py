"""The `rollout` command.

    rollout validate [serve_config.yaml] [--no-load]   check configs, load models, smoke-test
    rollout checksum DIR                               print the sha256 block for a model config
    rollout declare PLAN.yaml [-o FILE]                put a plan into serve_config.yaml
    rollout validate --region R | --all-regions        ... with region overlays, and their fit
    rollout render [CONFIG] --region R [-o FILE]       the region's serve config (overlay merged)
    rollout kuberay [CONFIG] --region R [-o F|--check F]  the KubeRay RayService manifest
    rollout bench NAME [ARGS]                          python -m bench.NAME, from the checkout

Rollout control talks to the router's admin API over HTTP (`--url`, default $ROLLOUT_URL or
http://127.0.0.1:8000) with a bearer token (`--token`, default $ROLLOUT_ADMIN_TOKEN or the
file named by $ROLLOUT_ADMIN_TOKEN_FILE; see app/admin.py):

    rollout status [--watch] [--json] [--interval S]   GET  /admin/rollout
    rollout start | pause | resume | abort             POST /admin/rollout/<command>
    rollout promote [--full]                           POST /admin/rollout/promote[-full]
    rollout history [--json]                           GET  /admin/rollout/history
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
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from app.admin import TOKEN_ENV, TOKEN_FILE_ENV, load_admin_token
from app.artifacts import artifact_digests, resolve_artifact
from app.errors import ArtifactError, ConfigError

__all__ = ["main", "render_history", "render_status"]

URL_ENV = "ROLLOUT_URL"
DEFAULT_URL = "http://127.0.0.1:8000"
ADMIN_PATH = "/admin/rollout"
TERMINAL_PHASES = frozenset({"succeeded", "rolled_back", "aborted"})
CLEAR_SCREEN = "\x1b[H\x1b[2J"
# Command name on the command line -> the last path segment of its POST.
COMMAND_PATHS = {
    "start": "start",
    "promote": "promote",
    "promote_full": "promote-full",
    "pause": "pause",
    "resume": "resume",
    "abort": "abort",
}
UNAUTHORIZED = (
    f"unauthorized: set {TOKEN_ENV} (or {TOKEN_FILE_ENV}) to the router's admin token"
)
ADMIN_OFF = "the admin API is off: the router has no admin token configured"
GATE_SYMBOLS = {"passed": "✔", "failed": "✖", "pending": "…", "skipped": "-"}
BAR_WIDTH = 40


# ----------------------------------------------------------------------------- validate, checksum


def _validate(args: argparse.Namespace) -> int:
    from app.validate import validate_serve_config

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    from app.cli_regions import validation_targets

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


# ----------------------------------------------------------------------------- admin API client


class AdminError(Exception):
    """The admin API could not do what was asked; `exit_code` is the CLI's exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class AdminClient:
    """A thin client for the router's admin API; one connection, reused across a --watch."""

    def __init__(self, url: str, token: str | None, timeout_s: float) -> None:
        try:
            import httpx
        except ImportError as exc:  # httpx is only pulled in by the test extra today
            raise AdminError(
                "the rollout control commands need httpx: pip install httpx", 2
            ) from exc
        self._httpx = httpx
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        headers = {"accept": "application/json"}
        if token:
            headers["authorization"] = f"Bearer {token}"
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def status(self) -> dict[str, Any]:
        return self._call("GET", ADMIN_PATH)

    def history(self) -> dict[str, Any]:
        return self._call("GET", f"{ADMIN_PATH}/history")

    def command(self, name: str) -> dict[str, Any]:
        return self._call("POST", f"{ADMIN_PATH}/{COMMAND_PATHS[name]}")

    def _call(self, method: str, path: str) -> dict[str, Any]:
        httpx = self._httpx
        where = f"{method} {self.url}{path}"
        try:
            response = self._client.request(method, path)
        except httpx.ConnectError as exc:
            raise AdminError(
                f"cannot reach the router's admin API at {self.url}: {exc} "
                f"(is the app running? set --url or {URL_ENV})",
                2,
            ) from exc
        except httpx.TimeoutException as exc:
            message = f"{where}: no answer within {self.timeout_s:g}s (--timeout)"
            raise AdminError(message, 2) from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise AdminError(f"{where}: {exc}", 2) from exc
        code = response.status_code
        if code in (401, 403):
            raise AdminError(UNAUTHORIZED, 2)
        if code == 404:
            raise AdminError(ADMIN_OFF, 2)
        if code == 409:
            raise AdminError(_error_detail(response) or f"{where}: refused (HTTP 409)", 1)
        if code != 200:
            detail = _error_detail(response)
            raise AdminError(f"{where}: HTTP {code}" + (f": {detail}" if detail else ""), 2)
        try:
            data = response.json()
        except ValueError as exc:
            message = f"{where}: the answer is not JSON: {response.text[:200]!r}"
            raise AdminError(message, 2) from exc
        if not isinstance(data, dict):
            raise AdminError(f"{where}: expected a JSON object, got {type(data).__name__}", 2)
        return data


def _error_detail(response: Any) -> str:
    """The server's `{"error": ...}`, else the start of its body."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])
    return json.dumps(data)[:200]


# ----------------------------------------------------------------------------- rendering


def _number(value: Any) -> float | None:
    """`value` as a finite float, or None (missing, null, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _duration(seconds: Any) -> str:
    s = _number(seconds)
    if s is None:
        return "-"
    s = max(0.0, s)
    if s < 10:
        return f"{s:.1f}s"
    if s < 60:
        return f"{s:.0f}s"
    whole = int(s)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _ms(value: Any) -> str:
    v = _number(value)
    return "-" if v is None else f"{v:.1f}ms"


def _short(value: Any) -> str:
    v = _number(value)
    return "-" if v is None else f"{v:.4g}"


def _percent(value: Any) -> str:
    v = _number(value)
    return "-" if v is None else f"{v:g}%"


def _bar(percent: float | None) -> str:
    share = min(100.0, max(0.0, percent or 0.0))
    filled = round(share / 100 * BAR_WIDTH)
    return "█" * filled + "░" * (BAR_WIDTH - filled)


def _table(rows: Sequence[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    """Rows padded into columns; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _ordered_versions(status: Mapping[str, Any], *groups: Iterable[str]) -> list[str]:
    """Stable first, then the candidate, then the rest by name."""
    seen: list[str] = []
    for group in groups:
        for version in group:
            if version not in seen:
                seen.append(str(version))
    first = [v for v in (status.get("stable"), status.get("candidate")) if v in seen]
    return first + sorted(v for v in seen if v not in first)


def _role(status: Mapping[str, Any], version: str) -> str:
    if version == status.get("stable"):
        return "stable"
    if version == status.get("candidate"):
        return "candidate"
    return ""


def _step_line(status: Mapping[str, Any]) -> str:
    index = status.get("step_index")
    total = status.get("steps_total")
    description = status.get("step") or ""
    if isinstance(total, int) and total > 0 and isinstance(index, int):
        if index >= total:
            where = f"{total}/{total} (all steps done)"
        else:
            where = f"{index + 1}/{total}" + (f": {description}" if description else "")
    else:
        where = description or "-"
    in_step = _number(status.get("time_in_step_s"))
    return where + (f"  ({_duration(in_step)} in step)" if in_step is not None else "")


def _gate_reading(gate: str, value: Any, threshold: Any) -> str:
    """`0.012 (max 0.05)`: the reading and the bound it is held to (the gate's name says which
    way: max_*, fail_fast_* and *_max are ceilings, min_* are floors)."""
    if _number(threshold) is None:
        return _short(value)
    if gate.startswith(("max_", "fail_fast")) or gate.endswith("_max"):
        bound = "max"
    elif gate.startswith("min_"):
        bound = "min"
    else:
        bound = "threshold"
    return f"{_short(value)} ({bound} {_short(threshold)})"


def render_status(status: Mapping[str, Any], now: float | None = None) -> str:
    """A rollout status (the admin API's JSON) as a compact text block.

    Like `kubectl argo rollouts get rollout`: identity and phase, the current step, a bar per
    version's share of traffic, a table of each version's live stats, then each gate's verdict
    with its reading. Pure: give `now` (epoch seconds) to show how old the status is. Missing or
    null fields print as `-`, so a partial status (no rollout yet) still renders."""
    lines: list[str] = []

    def field(name: str, value: Any) -> None:
        lines.append(f"{name + ':':<13}{'-' if value is None or value == '' else value}")

    field("Name", status.get("model"))
    field("Phase", status.get("phase"))
    field("Strategy", status.get("strategy"))
    field("Stable", status.get("stable"))
    field("Candidate", status.get("candidate"))
    field("Step", _step_line(status))
    field("Generation", status.get("generation"))
    if status.get("plan_digest"):
        field("Plan", status.get("plan_digest"))
    if status.get("message"):
        field("Message", status.get("message"))
    updated = _number(status.get("updated_at"))
    if now is not None and updated is not None:
        field("Updated", f"{_duration(now - updated)} ago")

    weights = status.get("weights") if isinstance(status.get("weights"), Mapping) else {}
    versions = status.get("versions") if isinstance(status.get("versions"), Mapping) else {}
    order = _ordered_versions(status, weights, versions)

    if weights:
        lines += ["", "Traffic"]
        labels = {v: v + (f" ({_role(status, v)})" if _role(status, v) else "") for v in order}
        width = max(len(labels[v]) for v in order if v in weights)
        for version in (v for v in order if v in weights):
            share = _number(weights[version])
            lines.append(f"  {labels[version]:<{width}}  {_bar(share)}  {_percent(share):>5}")

    if versions:
        rows = [["VERSION", "ROLE", "REQUESTS", "ERRORS", "ERR RATE", "RPS", "P50", "P99"]]
        for version in (v for v in order if v in versions):
            stats = versions[version] if isinstance(versions[version], Mapping) else {}
            rate = _number(stats.get("error_rate"))
            rps = _number(stats.get("rps"))
            rows.append([
                version,
                _role(status, version) or "-",
                str(stats.get("requests", "-")),
                str(stats.get("errors", "-")),
                "-" if rate is None else f"{rate * 100:.2f}%",
                "-" if rps is None else f"{rps:.1f}",
                _ms(stats.get("p50_ms")),
                _ms(stats.get("p99_ms")),
            ])  # fmt: skip
        lines += ["", *_table(rows, right=frozenset(range(2, 8)))]

    verdicts = [v for v in status.get("verdicts") or () if isinstance(v, Mapping)]
    lines += ["", "Gates"]
    if not verdicts:
        lines.append("  (no verdicts yet)")
    else:
        rows = []
        for verdict in verdicts:
            gate = str(verdict.get("gate", "?"))
            state = str(verdict.get("status", "?"))
            rows.append([
                GATE_SYMBOLS.get(state, "?"),
                gate,
                state,
                _gate_reading(gate, verdict.get("value"), verdict.get("threshold")),
                str(verdict.get("reason") or ""),
            ])  # fmt: skip
        lines += ["  " + line for line in _table(rows)]
    lines += _render_ab(status, verdicts)
    return "\n".join(lines)


def _lift_text(value: Any, scale: Any) -> str:
    number = _number(value)
    if number is None:
        return "-"
    return f"{number:+.1%}" if scale == "relative" else f"{number:+.4g}"


def _render_ab(status: Mapping[str, Any], verdicts: Sequence[Mapping[str, Any]]) -> list[str]:
    """The feedback outcomes per version and the lift gates' conclusions (better / worse /
    not yet known) with their always-valid intervals."""
    lines: list[str] = []
    outcomes = status.get("outcomes") if isinstance(status.get("outcomes"), Mapping) else {}
    if outcomes:
        rows = [["OUTCOME", "VERSION", "N", "MEAN", "95% CI"]]
        for outcome, by_version in sorted(outcomes.items()):
            for version, row in sorted((by_version or {}).items()):
                low, high = _number(row.get("low")), _number(row.get("high"))
                ci = "-" if low is None or high is None else f"[{low:.4g}, {high:.4g}]"
                mean = _number(row.get("mean"))
                rows.append([outcome, version, str(row.get("n", "-")),
                             "-" if mean is None else f"{mean:.4g}", ci])  # fmt: skip
        lines += ["", "Feedback", *("  " + line for line in _table(rows, right=frozenset({2, 3})))]
    lift = [v for v in verdicts if v.get("conclusion") is not None]
    if lift:
        rows = []
        for v in lift:
            scale = v.get("scale")
            interval = "-"
            if v.get("low") is not None or v.get("high") is not None:
                interval = f"[{_lift_text(v.get('low'), scale)}, {_lift_text(v.get('high'), scale)}]"
            confidence = _number(v.get("confidence"))
            rows.append([
                str(v.get("gate")), str(v.get("outcome", "-")),
                str(v.get("conclusion")).replace("_", " ").upper(),
                f"lift {_lift_text(v.get('lift'), scale)}",
                interval + ("" if confidence is None else f" ({confidence:.0%} always-valid)"),
            ])  # fmt: skip
        lines += ["", "A/B verdict", *("  " + line for line in _table(rows))]
    return lines


def _clock(seconds: Any) -> str:
    s = _number(seconds)
    if s is None:
        return "-"
    return datetime.fromtimestamp(s, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def render_history(events: Sequence[Mapping[str, Any]]) -> str:
    """A rollout's history (oldest first) as one line per event; under an event whose gate
    readings hold a failure, one indented line per failed gate (the reason for a rollback).
    Times are UTC; steps count from 1, as in the status and the event reasons."""
    if not events:
        return "no events"
    rows = [["TIME", "FROM", "TO", "STEP", "WEIGHT", "REASON"]]
    failures: list[list[str]] = [[]]
    for event in events:
        index = event.get("step_index")
        rows.append([
            _clock(event.get("time_s")),
            str(event.get("from_phase", "-")),
            str(event.get("to_phase", "-")),
            str(index + 1) if isinstance(index, int) else "-",
            _percent(event.get("weight")),
            str(event.get("reason", "")),
        ])  # fmt: skip
        gates = event.get("gates") if isinstance(event.get("gates"), Mapping) else {}
        failures.append([
            f"    {GATE_SYMBOLS['failed']} {gate}: "
            f"{_gate_reading(gate, reading.get('value'), reading.get('threshold'))}"
            + (f": {reading['reason']}" if reading.get("reason") else "")
            for gate, reading in gates.items()
            if isinstance(reading, Mapping) and reading.get("status") == "failed"
        ])  # fmt: skip
    lines: list[str] = []
    for line, extra in zip(_table(rows, right=frozenset({3, 4})), failures, strict=True):
        lines += [line, *extra]
    return "\n".join(lines)


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
    return AdminClient(url, token, args.timeout)


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
                elif tty:
                    _emit(CLEAR_SCREEN + render_status(status, now=time.time()))
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
    from app.report import ReportError, render_report

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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


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
    return common


def _declare(args: argparse.Namespace) -> int:
    import yaml

    from app.config import load_yaml
    from app.declare import declare_plan, load_plan
    from app.errors import ConfigError

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

    from app.cli_regions import add_region_commands

    add_region_commands(commands)

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
    return parser


BENCHMARKS = ("abtest", "hotpatch", "rollback", "throughput", "world")


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
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
