"""`rollout report`: the picture of a rollout's timeline, from a history (no Ray, no router)."""

from __future__ import annotations

import json
import math

import pytest

from app.ops.cli import main
from app.ops.report import (
    ReportError,
    lift_readings,
    lift_series,
    render_report,
    rollout_identity,
)

T0 = 1_760_000_000.0


def _history() -> dict:
    """A canary of v2 at 10% then 50%, whose errors climb until fail-fast rolls it back."""
    events = [
        {"time_s": T0, "from_phase": "idle", "to_phase": "progressing", "step_index": 0,
         "weight": 10.0, "reason": "rollout started", "gates": {}},
        {"time_s": T0 + 20, "from_phase": "progressing", "to_phase": "progressing", "step_index": 1,
         "weight": 50.0, "reason": "analysis passed", "gates": {
             "max_error_rate": {"status": "passed", "value": 0.0, "threshold": 0.05, "reason": ""}}},
        {"time_s": T0 + 31, "from_phase": "progressing", "to_phase": "rolled_back", "step_index": 2,
         "weight": 0.0, "reason": "gate failed", "gates": {
             "fail_fast_error_rate": {"status": "failed", "value": 0.6, "threshold": 0.5, "reason": ""}}},
    ]  # fmt: skip
    timeline = []
    for i in range(32):
        weight = 10.0 if i < 20 else (50.0 if i < 31 else 0.0)
        v2_rate = 0.0 if i < 20 else min(0.7, 0.06 * (i - 19))
        timeline.append({
            "time_s": T0 + i, "phase": "progressing" if i < 31 else "rolled_back", "step_index": 1,
            "weights": {"v1": 100 - weight, "v2": weight},
            "versions": {"v1": {"requests": 90, "errors": 0, "error_rate": 0.0, "p99_ms": 12.0 + i % 3},
                         "v2": {"requests": 10, "errors": 0, "error_rate": v2_rate, "p99_ms": 20.0 + i}},
            "gates": {"max_error_rate": "pending" if i < 10 else ("passed" if i < 25 else "failed"),
                      "max_p99_latency_ratio": "skipped"},
        })  # fmt: skip
    return {"events": events, "timeline": timeline}


def test_renders_a_png_with_content(tmp_path):
    path = render_report(_history(), tmp_path / "r.png",
                         status={"model": "rec", "strategy": "canary", "candidate": "v2", "stable": "v1"})  # fmt: skip
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    image = Image.open(path).convert("L")
    assert image.size[0] >= 1000 and image.size[1] >= 1000
    low, high = image.getextrema()
    assert high - low > 200  # drawn, not a blank page
    # Non-white pixels: axes, curves, table and text cover a real share of the picture.
    histogram = image.histogram()
    assert sum(histogram[:200]) / sum(histogram) > 0.02


def test_svg_by_extension_and_bad_extension(tmp_path):
    path = render_report(_history(), tmp_path / "r.svg")
    assert "<svg" in path.read_text()[:2000]
    with pytest.raises(ReportError, match=r"\.png, \.svg or \.pdf"):
        render_report(_history(), tmp_path / "r.gif")


def test_no_events_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="no rollout history yet"):
        render_report({"events": [], "timeline": []}, tmp_path / "r.png")


def test_events_without_timeline_still_draw(tmp_path):
    history = _history()
    history["timeline"] = []  # a restarted controller keeps events, not curves
    assert render_report(history, tmp_path / "r.png").stat().st_size > 10_000


def test_cli_from_json(tmp_path, capsys):
    saved = tmp_path / "history.json"
    saved.write_text(json.dumps(_history()))
    out = tmp_path / "out" / "report.png"
    assert main(["report", "--from-json", str(saved), "-o", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "3 events, 32 timeline samples" in capsys.readouterr().out
    saved.write_text(json.dumps({"events": []}))
    assert main(["report", "--from-json", str(saved), "-o", str(out)]) == 1
    assert "no rollout history yet" in capsys.readouterr().err


def _succeeded_history() -> dict:
    """v2 replaced v1 and succeeded: the status now names v2 as the stable version."""
    started = {"time_s": T0, "from_phase": "idle", "to_phase": "progressing", "step_index": 0,
               "weight": 0.0, "gates": {},
               "reason": "started: canary rollout of v2 (stable v1), plan 0123abcd"}  # fmt: skip
    done = {**started, "time_s": T0 + 5, "from_phase": "promoting", "to_phase": "succeeded",
            "weight": 100.0, "reason": "succeeded: v2 is stable"}  # fmt: skip
    timeline = [{"time_s": T0 + 1, "weights": {"v1": 90.0, "v2": 10.0}, "versions": {}}]
    return {"events": [started, done], "timeline": timeline}


SUCCEEDED_STATUS = {"model": "rec", "phase": "succeeded", "strategy": "canary",
                    "candidate": "v2", "stable": "v2"}  # fmt: skip


def test_title_names_the_version_replaced_after_a_success():
    history = _succeeded_history()
    assert rollout_identity(history["events"], history["timeline"], SUCCEEDED_STATUS) == (
        "canary", "v2", "v1")  # fmt: skip
    # A history without the started event (trimmed): the other version in the weights.
    assert rollout_identity(history["events"][1:], history["timeline"], SUCCEEDED_STATUS) == (
        "canary", "v2", "v1")  # fmt: skip
    # Nothing to tell: a question mark, never "v2 over v2".
    assert rollout_identity([], [], SUCCEEDED_STATUS) == ("canary", "v2", "?")


def test_report_title_after_a_success(tmp_path, monkeypatch):
    import matplotlib.figure

    titles: list[str] = []
    original = matplotlib.figure.Figure.suptitle

    def suptitle(self, text, **kwargs):
        titles.append(text)
        return original(self, text, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", suptitle)
    render_report(_succeeded_history(), tmp_path / "r.png", status=SUCCEEDED_STATUS)
    assert titles and "canary rollout of v2 over v1" in titles[0], titles


def _ab_history() -> tuple[dict, dict]:
    """An A/B rollout whose improvement gate's interval narrows until it clears the bar."""

    def reading(lift: float, low: float, high: float, conclusion: str) -> dict:
        return {
            "status": "passed" if conclusion == "better" else "pending",
            "value": lift,
            "threshold": 0.01,
            "reason": "",
            "conclusion": conclusion,
            "outcome": "click",
            "scale": "relative",
            "lift": lift,
            "low": low,
            "high": high,
        }

    history = _history()
    history["events"][1]["gates"]["improvement"] = reading(0.05, -0.2, 0.3, "not_yet_known")
    history["events"][2]["gates"]["improvement"] = {"status": "pending", "value": None,
        "threshold": 0.01, "reason": "click: no feedback yet", "conclusion": "not_yet_known",
        "outcome": "click"}  # fmt: skip
    status = {"model": "rec", "strategy": "ab", "candidate": "v2", "stable": "v1",
              "updated_at": T0 + 40,
              "verdicts": [{"gate": "improvement", **reading(0.08, 0.03, 0.13, "better")}]}  # fmt: skip
    return history, status


def test_lift_readings_follow_the_interval_over_time():
    history, status = _ab_history()
    points = lift_readings(history["events"], status, T0)
    assert list(points) == ["improvement"]  # the gate with no estimate yet is not a point
    assert [(p["t"], p["lift"], p["low"], p["high"]) for p in points["improvement"]] == [
        (20.0, 0.05, -0.2, 0.3), (40.0, 0.08, 0.03, 0.13)]  # fmt: skip
    assert points["improvement"][-1]["conclusion"] == "better"
    assert lift_readings(_history()["events"], None, T0) == {}  # no lift gates: no panel


def test_report_draws_the_ab_panel_when_lift_gates_decided(tmp_path, monkeypatch):
    import matplotlib.figure

    labels: list[str] = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        labels.extend(ax.get_ylabel() for ax in self.axes)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    history, status = _ab_history()
    render_report(history, tmp_path / "ab.png", status=status)
    assert any(label.startswith("A/B lift") for label in labels), labels
    labels.clear()
    render_report(_history(), tmp_path / "plain.png")
    assert not any(label.startswith("A/B lift") for label in labels), labels


def _ab_series(n: int = 40) -> list[dict]:
    """The controller's `ab_series`: a point a second, the interval narrowing around +8%."""
    series = []
    for i in range(n):
        width = 0.5 / (1 + i / 4)
        lift = None if i < 3 else 0.08
        series.append({"t": T0 + i, "lift": lift, "low": None if lift is None else lift - width,
                       "high": None if lift is None else lift + width,
                       "verdict": "better" if lift is not None and lift - width > 0.01 else "not_yet_known"})  # fmt: skip
    return series


def _lift_axes(monkeypatch) -> list:
    """The A/B panel of every figure saved from now on."""
    import matplotlib.figure

    found: list = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        found.extend(ax for ax in self.axes if ax.get_ylabel().startswith("A/B lift"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return found


def test_lift_series_reads_the_controllers_curve():
    series = list(reversed(_ab_series(6))) + [{"lift": 1.0}, "junk"]  # no t, not a point
    points = lift_series({"ab_series": series}, T0)
    assert [p["t"] for p in points] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # sorted, since start
    assert all(math.isnan(points[i]["lift"]) for i in range(3))  # null: no estimate yet
    assert points[3]["lift"] == 0.08 and points[3]["low"] < 0.08 < points[3]["high"]
    assert lift_series({"ab_series": []}, T0) == []  # the plan has no lift gate
    assert lift_series({"ab_series": _ab_series(3)}, T0) == []  # no estimate at all yet
    assert lift_series({"model": "rec"}, T0) == [] and lift_series(None, T0) == []  # older


def test_report_draws_the_lift_as_a_curve_from_the_series(tmp_path, monkeypatch):
    axes = _lift_axes(monkeypatch)
    history, status = _ab_history()
    render_report(history, tmp_path / "curve.png", status={**status, "ab_series": _ab_series()})
    (ax,) = axes
    sizes = sorted(len(line.get_xdata()) for line in ax.get_lines())
    assert 40 in sizes  # the curve: one point per series point, not per event
    assert any("tick by tick" in text.get_text() for text in ax.get_legend().get_texts())

    # An older controller (no ab_series): the readings at events only, as before.
    axes.clear()
    render_report(history, tmp_path / "events.png", status=status)
    (ax,) = axes
    assert max(len(line.get_xdata()) for line in ax.get_lines()) == 2


def test_report_draws_the_series_when_no_event_carries_a_reading(tmp_path, monkeypatch):
    axes = _lift_axes(monkeypatch)
    status = {"model": "rec", "candidate": "v2", "ab_series": _ab_series()}
    render_report(_history(), tmp_path / "series-only.png", status=status)
    assert len(axes) == 1
