"""Tunables read from the environment: a set value is used, a bad one is refused by name."""

from __future__ import annotations

import importlib

import pytest

import app.constants


@pytest.fixture
def reload_constants(monkeypatch):
    def load(**env: str):
        for name, value in env.items():
            monkeypatch.setenv(f"RAY_ROLLOUT_{name}", value)
        return importlib.reload(app.constants)

    yield load
    monkeypatch.undo()
    importlib.reload(app.constants)


def test_defaults_and_overrides(reload_constants):
    constants = reload_constants(REPORT_TIMEOUT_S="3.5", SERVED_BACKLOG="1000")
    assert constants.REPORT_TIMEOUT_S == 3.5
    assert constants.SERVED_BACKLOG == 1000
    assert constants.LONG_POLL_TIMEOUT_S == 10.0


@pytest.mark.parametrize(
    ("name", "value"),
    [("SERVED_BACKLOG", "0"), ("STATS_PUSH_INTERVAL_S", "-1"), ("ARTIFACT_CACHE_KEEP", "0")],
)
def test_a_value_that_is_not_positive_is_refused_by_name(reload_constants, name, value):
    with pytest.raises(ValueError, match=f"RAY_ROLLOUT_{name}"):
        reload_constants(**{name: value})
