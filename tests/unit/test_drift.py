"""Score drift: PSI against the stable version over a sliding window (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from app.adapters.base import TensorSpec
from app.observability.drift import DriftSettings, ScoreWindow, psi, score_output


def _fill(window: ScoreWindow, version: str, values: np.ndarray, at: float) -> None:
    for chunk in np.array_split(values, max(1, len(values) // 4)):
        window.add(version, chunk.reshape(1, -1), at)


def test_identical_distributions_have_near_zero_psi_and_shift_raises_it():
    rng = np.random.default_rng(7)
    readings = []
    for shift in (0.0, 0.25, 0.5, 1.0):
        window = ScoreWindow()
        _fill(window, "v1", rng.normal(0, 1, 4000), 5.0)
        _fill(window, "v2", rng.normal(shift, 1, 4000), 5.0)
        readings.append(window.psi_by_version("v1", 5.0)["v2"])
    assert readings[0] < 0.02  # sampling noise only
    assert readings == sorted(readings)  # a larger shift is a larger PSI
    assert readings[-1] > 0.25  # one standard deviation: a large shift by the usual rule


def test_psi_matches_the_textbook_formula_on_hand_made_bins():
    # Expected 50/50 over two groups, actual 80/20: (0.8-0.5)ln(0.8/0.5) + (0.2-0.5)ln(0.2/0.5)
    expected = np.array([50, 50], dtype=float)
    actual = np.array([80, 20], dtype=float)
    want = 0.3 * np.log(0.8 / 0.5) + (-0.3) * np.log(0.2 / 0.5)
    assert psi(expected, actual, groups=2) == pytest.approx(want)


def test_empty_bins_are_floored_not_infinite():
    expected = np.array([100, 0, 0, 0], dtype=float)
    actual = np.array([0, 0, 0, 100], dtype=float)
    value = psi(expected, actual, groups=4, epsilon=1e-4)
    assert np.isfinite(value) and value > 5


def test_psi_refuses_mismatched_or_empty_histograms():
    with pytest.raises(ValueError, match="alike"):
        psi(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="at least one"):
        psi(np.zeros(3), np.ones(3))


def test_no_psi_below_min_samples():
    window = ScoreWindow(DriftSettings(min_samples=50))
    window.add("v1", np.zeros(49), 0.0)
    window.add("v2", np.ones(60), 0.0)
    assert window.psi_by_version("v1", 0.0) == {}  # stable too thin
    window.add("v1", np.zeros(1), 0.0)
    assert set(window.psi_by_version("v1", 0.0)) == {"v1", "v2"}
    window.add("v3", np.ones(10), 0.0)
    assert "v3" not in window.psi_by_version("v1", 0.0)  # v3 too thin


def test_old_slots_leave_the_window():
    settings = DriftSettings(slots=3, slot_s=10.0, min_samples=1)
    window = ScoreWindow(settings)
    window.add("v1", np.zeros(5), 0.0)  # slot 0
    window.add("v1", np.zeros(7), 25.0)  # slot 2
    assert window.counts("v1", 29.0).sum() == 12
    assert window.counts("v1", 30.0).sum() == 7  # slot 3: slots 1..3 kept, slot 0 gone
    assert window.counts("v1", 60.0).sum() == 0
    assert window.sizes(60.0) == {"v1": 0}


def test_scores_outside_the_grid_and_nans():
    window = ScoreWindow(DriftSettings(low=-1, high=1, bins=10, min_samples=1))
    window.add("v1", np.array([-5.0, 5.0, np.nan, 0.05]), 0.0)
    counts = window.counts("v1", 0.0)
    assert counts[0] == 1 and counts[-1] == 1 and counts.sum() == 3


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"low": 1.0, "high": 1.0}, "high (1.0) must be greater than low (1.0)"),
        ({"bins": 10, "psi_bins": 20}, "psi_bins (20) must be at most bins (10)"),
        ({"slot_s": 0}, "slot_s"),
        ({"window": 3}, "window"),
    ],
)
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DriftSettings.model_validate(fields)


def test_score_output_prefers_scores_then_first_float():
    spec = lambda name, dt: TensorSpec(name=name, datatype=dt, shape=(-1,))  # noqa: E731
    assert score_output([spec("ranking", "INT64"), spec("scores", "FP32")]) == "scores"
    assert score_output([spec("ids", "INT64"), spec("logits", "FP16")]) == "logits"
    assert score_output([spec("ids", "INT64")]) is None
