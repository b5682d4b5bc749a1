"""`rollout report`: a picture of the last rollout's timeline.

Input is what the controller's history gives (`GET /admin/rollout/history`, or a file saved
from `rollout history --json`): `events` (phase changes, steps, commands, each with the gate
readings that caused it) and `timeline` (one sample a second: weights, per-version requests,
error rate, p99, and every gate's verdict on that tick). Output is one image (PNG, SVG or PDF,
by the file's extension) with four panels over a shared time axis, seconds since the rollout
started:

    traffic weights per version      (step lines; every event a dotted line, labelled)
    error rate per version           (as the gates count it: fallbacks included)
    p99 latency per version
    A/B lift                         (only with lift gates: the estimate and its always-valid
                                      interval as a curve, tick by tick, from the status's
                                      `ab_series`; each event's reading marked on it; the bar
                                      it must clear, the verdict. Older controllers, with no
                                      `ab_series`: the readings at events only)
    gate verdicts                    (one row per gate: passed, pending, skipped, failed)

and the last events, with the reason for each, in a table under them. matplotlib draws it
(Agg backend: no display needed).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["ReportError", "lift_readings", "lift_series", "render_report", "rollout_identity"]

STATUS_COLORS = {
    "passed": "#2e7d32",
    "pending": "#9e9e9e",
    "skipped": "#cfd8dc",
    "failed": "#c62828",
}
PHASE_COLORS = {"rolled_back": "#c62828", "aborted": "#ef6c00", "succeeded": "#2e7d32",
                "paused": "#6a1b9a", "promoting": "#1565c0"}  # fmt: skip
MAX_EVENT_ROWS = 12


class ReportError(ValueError):
    """The history cannot make a report (no events, malformed)."""


def _versions(
    events: Sequence[Mapping[str, Any]], timeline: Sequence[Mapping[str, Any]]
) -> list[str]:
    names: set[str] = set()
    for sample in timeline:
        names |= set(sample.get("weights", {})) | set(sample.get("versions", {}))
    return sorted(names)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def render_report(
    history: Mapping[str, Any], path: Path, *, status: Mapping[str, Any] | None = None
) -> Path:
    """Draw `history` (`{"events": [...], "timeline": [...]}`) to `path`; returns the path."""
    events = history.get("events")
    timeline = history.get("timeline") or []
    if not isinstance(events, list) or not isinstance(timeline, list):
        raise ReportError("history must hold an `events` list (and a `timeline` list)")
    if not events:
        raise ReportError("no rollout history yet: declare a plan or run `rollout start` first")
    events = [e for e in events if isinstance(e, Mapping) and "time_s" in e]
    timeline = [s for s in timeline if isinstance(s, Mapping) and "time_s" in s]
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg", ".pdf"):
        raise ReportError(f"output {path} must end in .png, .svg or .pdf")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = float(events[0]["time_s"])  # time 0; samples before it are the baseline
    versions = _versions(events, timeline)
    colors = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(versions)}
    xs = [float(s["time_s"]) - start for s in timeline]

    lift = lift_readings(events, status, start)
    series = lift_series(status, start)
    if series and not lift:  # a curve, but no event or verdict to name the gate by
        lift = {"lift": []}
    table_ratio = 0.3 + 0.13 * min(len(events), MAX_EVENT_ROWS)
    ratios = [2.2, 1.6, 1.6] + ([1.6] if lift else []) + [1.3, table_ratio]
    fig = plt.figure(figsize=(13, 12 + (2 if lift else 0)), dpi=100, layout="constrained")
    grid = fig.add_gridspec(len(ratios), 1, height_ratios=ratios)
    ax_w = fig.add_subplot(grid[0])
    ax_e = fig.add_subplot(grid[1], sharex=ax_w)
    ax_p = fig.add_subplot(grid[2], sharex=ax_w)
    ax_l = fig.add_subplot(grid[3], sharex=ax_w) if lift else None
    ax_g = fig.add_subplot(grid[len(ratios) - 2], sharex=ax_w)
    ax_t = fig.add_subplot(grid[len(ratios) - 1])
    if ax_l is not None:
        _draw_lift(ax_l, lift, plt.get_cmap("Dark2"), series)

    # Weights: from the timeline; with no samples (a restarted controller), from the events.
    if timeline:
        for v in versions:
            ax_w.step(xs, [_number(s.get("weights", {}).get(v)) for s in timeline],
                      where="post", color=colors[v], lw=2, label=v)  # fmt: skip
    else:
        candidate = (status or {}).get("candidate") or "candidate"
        ax_w.step([float(e["time_s"]) - start for e in events], [_number(e.get("weight")) for e in events],
                  where="post", color="#1565c0", lw=2, label=f"{candidate} (from events)")  # fmt: skip
    ax_w.set_ylabel("traffic weight (%)")
    ax_w.set_ylim(-5, 112)
    ax_w.legend(loc="upper left", fontsize=8, ncols=max(1, len(versions)))

    for v in versions:
        rates = [
            _number(s.get("versions", {}).get(v, {}).get("error_rate")) * 100 for s in timeline
        ]
        p99 = [_number(s.get("versions", {}).get(v, {}).get("p99_ms")) for s in timeline]
        ax_e.plot(xs, rates, marker=".", ms=3, color=colors[v], label=v)
        ax_p.plot(xs, p99, marker=".", ms=3, color=colors[v], label=v)
    ax_e.set_ylabel("error rate (%)")
    ax_e.set_ylim(bottom=0)
    ax_p.set_ylabel("p99 latency (ms)")
    ax_p.set_ylim(bottom=0)
    for ax in (ax_e, ax_p):
        if versions:
            ax.legend(loc="upper left", fontsize=8, ncols=len(versions))
        ax.grid(alpha=0.3)
    ax_w.grid(alpha=0.3)

    # Gate verdicts: a row per gate, a marker per sample; event readings drawn larger.
    gates = sorted({g for s in timeline for g in s.get("gates", {})}
                   | {g for e in events for g in (e.get("gates") or {})})  # fmt: skip
    rows = {g: i for i, g in enumerate(gates)}
    for status_name, color in STATUS_COLORS.items():
        pts = [(x, rows[g]) for x, s in zip(xs, timeline) for g, st in s.get("gates", {}).items()
               if st == status_name]  # fmt: skip
        pts += [(float(e["time_s"]) - start, rows[g]) for e in events
                for g, r in (e.get("gates") or {}).items()
                if isinstance(r, Mapping) and r.get("status") == status_name]  # fmt: skip
        if pts:
            ax_g.scatter([p[0] for p in pts], [p[1] for p in pts], s=22 if status_name != "failed" else 90,
                         marker="s" if status_name != "failed" else "X", color=color, label=status_name,
                         zorder=3 if status_name == "failed" else 2)  # fmt: skip
    ax_g.set_yticks(range(len(gates)), gates, fontsize=8)
    ax_g.set_ylim(-0.7, max(len(gates), 1) - 0.3)
    ax_g.set_ylabel("gates")
    ax_g.set_xlabel("seconds since the rollout started (before 0: the baseline)")
    if gates:
        ax_g.legend(loc="upper left", fontsize=8, ncols=4)

    # Events: a dotted line on every time panel, labelled with the phase entered on top.
    span = max([1e-9] + [abs(x) for x in xs] + [float(e["time_s"]) - start for e in events])
    labelled: list[float] = []
    for e in events:
        x = float(e["time_s"]) - start
        to_phase = str(e.get("to_phase", ""))
        color = PHASE_COLORS.get(to_phase, "#607d8b")
        for ax in (ax_w, ax_e, ax_p, ax_g, *([ax_l] if ax_l is not None else [])):
            ax.axvline(x, color=color, ls=":", lw=1.2, zorder=1)
        if e.get("from_phase") != to_phase or to_phase in PHASE_COLORS:
            # Labels of events close together are spread sideways instead of overprinted.
            near = sum(1 for seen in labelled if abs(seen - x) < 0.02 * span)
            labelled.append(x)
            ax_w.annotate(to_phase, (x, 104), xytext=(2 + 11 * near, 0), textcoords="offset points",
                          rotation=90, fontsize=8, color=color, ha="left", va="top")  # fmt: skip

    # Event table: the last MAX_EVENT_ROWS events, oldest first.
    ax_t.axis("off")
    shown = events[-MAX_EVENT_ROWS:]
    cells = [[f"{float(e['time_s']) - start:7.2f}s", f"{e.get('from_phase')} → {e.get('to_phase')}",
              str((e.get("step_index") or 0) + 1), f"{_number(e.get('weight')):.0f}%",
              _failed(e) or str(e.get("reason", ""))[:90]] for e in shown]  # fmt: skip
    table = ax_t.table(cellText=cells, colLabels=["t", "phase", "step", "weight", "reason / failed gates"],
                       colWidths=[0.08, 0.2, 0.05, 0.07, 0.6], loc="upper center", cellLoc="left")  # fmt: skip
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    if len(events) > len(shown):
        ax_t.set_title(f"last {len(shown)} of {len(events)} events", fontsize=9, loc="left")

    last = events[-1]
    info = status or {}
    when = datetime.fromtimestamp(start, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    strategy, candidate, replaced = rollout_identity(events, timeline, info)
    title = (f"{info.get('model') or 'rollout'}: {strategy} rollout of "
             f"{candidate} over {replaced} — "
             f"{last.get('to_phase')} (started {when}, {len(events)} events, "
             f"{float(last['time_s']) - start:.2f}s from first to last)")  # fmt: skip
    fig.suptitle(title, fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def lift_readings(
    events: Sequence[Mapping[str, Any]], status: Mapping[str, Any] | None, start: float
) -> dict[str, list[dict[str, Any]]]:
    """The A/B (lift) gates' readings over time, per gate: `{"t", "lift", "low", "high",
    "bar", "conclusion", "outcome", "scale"}`, from every event that carries one (each step
    records the readings that decided it) and the status's current verdicts (at its
    `updated_at`). Gates without an estimate yet (no feedback) are left out."""
    points: dict[str, list[dict[str, Any]]] = {}

    def add(gate: str, reading: Any, at: Any) -> None:
        if not isinstance(reading, Mapping) or not isinstance(at, (int, float)):
            return
        values = [_number(reading.get(k)) for k in ("lift", "low", "high")]
        if any(math.isnan(v) for v in values[:1]):
            return
        lift, low, high = values
        points.setdefault(gate, []).append({
            "t": float(at) - start, "lift": lift, "low": low, "high": high,
            "bar": _number(reading.get("threshold")), "conclusion": reading.get("conclusion"),
            "outcome": reading.get("outcome"), "scale": reading.get("scale"),
        })  # fmt: skip

    for event in events:
        for gate, reading in (event.get("gates") or {}).items():
            if isinstance(reading, Mapping) and "lift" in reading:
                add(gate, reading, event.get("time_s"))
    for verdict in (status or {}).get("verdicts") or []:
        if isinstance(verdict, Mapping) and "lift" in verdict:
            add(str(verdict.get("gate")), verdict, (status or {}).get("updated_at"))
    for gate in points:
        points[gate].sort(key=lambda p: p["t"])
    return points


def lift_series(status: Mapping[str, Any] | None, start: float) -> list[dict[str, float]]:
    """The controller's A/B lift series (`status["ab_series"]`: one point per tick, at most
    one a second, of the plan's first lift gate) as `{"t", "lift", "low", "high"}` with `t` in
    seconds since `start` and NaN for a missing number; empty when the status has none (no
    lift gate, or a controller older than the series) or no point has an estimate yet."""
    raw = (status or {}).get("ab_series")
    if not isinstance(raw, list):
        return []
    points = []
    for point in raw:
        if not isinstance(point, Mapping) or not isinstance(point.get("t"), (int, float)):
            continue
        points.append({"t": float(point["t"]) - start, "lift": _number(point.get("lift")),
                       "low": _number(point.get("low")), "high": _number(point.get("high"))})  # fmt: skip
    if all(math.isnan(p["lift"]) for p in points):
        return []
    return sorted(points, key=lambda p: p["t"])


def _draw_lift(
    ax: Any,
    lift: Mapping[str, list[dict[str, Any]]],
    cmap: Any,
    series: Sequence[Mapping[str, float]] = (),
) -> None:
    """The A/B panel: the lift series as a curve with its always-valid interval as a band
    (when the controller keeps one), each lift gate's reading at every event marked with its
    interval, the bar it must clear (dashed), and its latest conclusion in the legend."""
    if series:
        ts = [p["t"] for p in series]
        first = sorted(lift)[0] if lift else None
        color = cmap(0)
        ax.plot(ts, [p["lift"] for p in series], color=color, lw=1.6,
                label="lift, tick by tick" + (f" ({first})" if first else ""))  # fmt: skip
        ax.fill_between(ts, [p["low"] for p in series], [p["high"] for p in series],
                        color=color, alpha=0.15, lw=0, label="always-valid interval")  # fmt: skip
    for i, (gate, pts) in enumerate(sorted(lift.items())):
        if not pts:
            continue
        color = cmap(i % 8)
        ts = [p["t"] for p in pts]
        ax.plot(ts, [p["lift"] for p in pts], marker="o", ms=4, color=color,
                ls=":" if series else "-",
                label=f"{gate} ({pts[-1]['outcome']}, {pts[-1]['scale']}): "
                      f"{pts[-1]['conclusion']}")  # fmt: skip
        lows, highs = [p["low"] for p in pts], [p["high"] for p in pts]
        if not series:  # with a series its band is the interval; here, the readings'
            ax.fill_between(ts, lows, highs, color=color, alpha=0.18, step=None)
        ax.vlines(ts, lows, highs, color=color, lw=1.5)
        bars = {p["bar"] for p in pts if not math.isnan(p["bar"])}
        for bar in bars:
            ax.axhline(bar, color=color, ls="--", lw=1)
    ax.axhline(0.0, color="#424242", lw=0.8)
    ax.set_ylabel("A/B lift\n(interval; dashed: bar)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


# The first event of every rollout the controller ran (app/rollout/machine.py `step`).
_STARTED = re.compile(r"started: (\S+) rollout of (\S+) \(stable (\S+)\)")


def rollout_identity(
    events: Sequence[Mapping[str, Any]],
    timeline: Sequence[Mapping[str, Any]],
    status: Mapping[str, Any],
) -> tuple[str, str, str]:
    """(strategy, candidate, the version it replaces) for the title. Not the status's
    `stable`: once a rollout succeeds that is the candidate itself ("v2 over v2"). The plan's
    stable version is in the history's `started` event; failing that, the version beside the
    candidate in the traffic weights."""
    strategy = str(status.get("strategy") or "")
    candidate = str(status.get("candidate") or "?")
    for event in events:
        found = _STARTED.search(str(event.get("reason", "")))
        if found:
            return found.group(1), found.group(2), found.group(3)
    others = sorted({v for sample in timeline for v in (sample.get("weights") or {})} - {candidate})
    if len(others) == 1:
        return strategy, candidate, others[0]
    stable = status.get("stable")
    return strategy, candidate, str(stable) if stable and stable != candidate else "?"


def _failed(event: Mapping[str, Any]) -> str:
    failed = [
        f"✖ {gate} = {_fmt(r.get('value'))} (limit {_fmt(r.get('threshold'))})"
        for gate, r in (event.get("gates") or {}).items()
        if isinstance(r, Mapping) and r.get("status") == "failed"
    ]
    return "; ".join(failed)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "-"
