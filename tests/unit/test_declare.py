"""Declaring a plan into a serve config; the controller's user_config in `rollout validate`;
the controller's traffic on top of a router's declared config."""

from __future__ import annotations

import pytest
import yaml

from app.config import TrafficConfig, project_root
from app.errors import ConfigError
from app.ops.cli import main
from app.ops.declare import declare_plan, load_plan
from app.ops.validate import validate_serve_config
from app.serving.traffic import apply_override
from tests.support.configs import router_app, set_config_root

ROOT = project_root()
PLANS = sorted((ROOT / "configs" / "rollouts").glob("*.yaml"))


def repo_config() -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return set_config_root(config, str(ROOT))


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.name)
def test_every_shipped_plan_is_valid_and_validates_in_the_repo_config(path, tmp_path):
    config = declare_plan(repo_config(), load_plan(path))
    out = tmp_path / "serve_config.yaml"
    out.write_text(yaml.safe_dump(config))
    report = validate_serve_config(out, load_models=False)
    assert report.errors == []
    controller = router_app(config)["deployments"][-1]
    assert (
        controller["name"] == "RolloutController"
        and controller["user_config"]["plan"]["candidate"] == "v2"
    )
    assert controller["user_config"]["tick_interval_s"] == 0.25  # kept from the repo config


def test_declare_none_and_bad_plans(tmp_path):
    config = declare_plan(repo_config(), None)
    assert router_app(config)["deployments"][-1]["user_config"]["plan"] is None
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "strategy: canary\ncandidate: v1\nstable: v1\ncanary: {steps: [{set_weight: 5}]}\n"
    )
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_plan(bad)
    with pytest.raises(ConfigError, match="no builder application named 'nope'"):
        declare_plan(repo_config(), None, app="nope")


def test_validate_reports_plan_errors_with_their_field(tmp_path):
    plan = yaml.safe_load(PLANS[0].read_text())
    plan["candidate"] = "v9"
    config = declare_plan(repo_config(), plan)
    router_app(config)["deployments"][-1]["user_config"]["tick_interval_s"] = 0
    out = tmp_path / "serve_config.yaml"
    out.write_text(yaml.safe_dump(config))
    errors = validate_serve_config(out, load_models=False).errors
    assert any("user_config.plan.candidate: 'v9' is not deployed" in e for e in errors), errors
    assert any("user_config.tick_interval_s" in e for e in errors), errors


def test_cli_declare_prints_or_writes(tmp_path, capsys):
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(repo_config()))
    assert main(["declare", str(PLANS[0]), "--config", str(config)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert router_app(printed)["deployments"][-1]["user_config"]["plan"]["stable"] == "v1"
    out = tmp_path / "declared.yaml"
    assert main(["declare", "none", "--config", str(config), "-o", str(out)]) == 0
    assert (
        router_app(yaml.safe_load(out.read_text()))["deployments"][-1]["user_config"]["plan"]
        is None
    )
    assert main(["declare", str(tmp_path / "missing.yaml"), "--config", str(config)]) == 1


def test_apply_override_takes_traffic_and_keeps_protection():
    base = TrafficConfig(stable="v1", weights={"v1": 90, "v2": 10, "v3": 0},
                         fallbacks={"v3": None}, request_timeout_s=12,
                         shadow={"version": "v3", "percent": 5})  # fmt: skip
    assert apply_override(base, None) is base
    out = apply_override(
        base, {"weights": {"v1": 75.0, "v2": 25.0}, "stable": "v1", "shadow": "declared"}
    )
    assert out.weights == {"v1": 75.0, "v2": 25.0, "v3": 0.0}
    assert out.request_timeout_s == 12 and out.fallbacks == {"v3": None}
    assert out.shadow == base.shadow
    blue_green = apply_override(base, {"weights": {"v1": 100.0, "v2": 0.0}, "stable": "v1",
                                       "shadow": {"version": "v2", "percent": 50.0}})  # fmt: skip
    assert blue_green.shadow.version == "v2" and blue_green.shadow.percent == 50.0
    assert blue_green.shadow.max_in_flight == base.shadow.max_in_flight
    done = apply_override(
        base, {"weights": {"v2": 100.0, "v1": 0.0}, "stable": "v2", "shadow": None}
    )
    assert done.stable == "v2" and done.shadow is None and done.weights["v2"] == 100.0
    with pytest.raises(ValueError):
        apply_override(base, {"weights": {"v1": 50.0}, "stable": "v1"})  # not 100 in all
