"""`rollout report`: the picture of a rollout's timeline, from a history (no Ray, no router)."""

from __future__ import annotations

import json

import pytest

from app.ops.cli import main
from app.ops.report import ReportError, render_report

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
