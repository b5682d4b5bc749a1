"""Text rendering of the controller's status and history for `rollout status` and `history`."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, cast

from app.rollout import Phase

__all__ = ["TERMINAL_PHASES", "redraw", "render_history", "render_status"]

# The phases a rollout ends in (`rollout status --watch` stops there).
TERMINAL_PHASES = frozenset(phase.value for phase in Phase if phase.terminal)
# `rollout status --watch` on a terminal: overwrite the last frame in place instead of clearing
# the screen first (a clear shows a blank screen for a moment each frame: flicker). Cursor home,
# each line followed by "erase to end of line" (the old line may be longer), then "erase to end
# of screen" (the old frame may have had more lines).
CURSOR_HOME = "\x1b[H"
ERASE_LINE_END = "\x1b[K"
ERASE_SCREEN_END = "\x1b[J"
GATE_SYMBOLS = {"passed": "✔", "failed": "✖", "pending": "…", "skipped": "-"}
BAR_WIDTH = 40


def redraw(text: str) -> str:
    """`text` as a frame that overwrites the previous one on a terminal, without a blank
    screen in between (see CURSOR_HOME)."""
    lines = text.split("\n")
    return CURSOR_HOME + "\n".join(line + ERASE_LINE_END for line in lines) + ERASE_SCREEN_END


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
    gate = gate.rsplit(".", 1)[-1]  # `load_stage.max_p99_ms`: the load stage's gates
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

    weights = (
        cast("Mapping[str, Any]", status.get("weights"))
        if isinstance(status.get("weights"), Mapping)
        else {}
    )
    versions = (
        cast("Mapping[str, Any]", status.get("versions"))
        if isinstance(status.get("versions"), Mapping)
        else {}
    )
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

    lines += _render_load_stage(status.get("load_stage"))

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


def _render_load_stage(load: Any) -> list[str]:
    """The load stage's replay (status `load_stage`): where it is, the scheduled, target and
    achieved rates, p99 and errors so far; once finished, each of its gates."""
    if not isinstance(load, Mapping):
        return []
    target, rate = _number(load.get("target_rps")), _number(load.get("current_rps"))
    achieved = _number(load.get("achieved_rps"))
    lines = [
        "",
        f"Load stage   {load.get('phase', '-')}"
        + (f" ({_duration(load.get('elapsed_s'))} in)" if load.get("elapsed_s") is not None
           else ""),
        f"  target {'-' if target is None else f'{target:.1f}'} rps"
        f" (observed {_short(load.get('observed_rps'))} rps)"
        f"  now {'-' if rate is None else f'{rate:.1f}'} rps"
        f"  achieved {'-' if achieved is None else f'{achieved:.1f}'} rps"
        f"  p99 {_ms(load.get('p99_ms'))}  errors {load.get('errors', '-')}"
        f"  sent {load.get('sent', '-')}",
    ]  # fmt: skip
    gates = load.get("gates")
    if isinstance(gates, Mapping):
        for gate, reading in gates.items():
            if isinstance(reading, Mapping):
                state = str(reading.get("status", "?"))
                lines.append(f"  {GATE_SYMBOLS.get(state, '?')} {gate} {state}: "
                             f"{reading.get('reason') or ''}")  # fmt: skip
    return lines


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
                interval = (
                    f"[{_lift_text(v.get('low'), scale)}, {_lift_text(v.get('high'), scale)}]"
                )
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
        gates = (
            cast("Mapping[str, Any]", event.get("gates"))
            if isinstance(event.get("gates"), Mapping)
            else {}
        )
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
