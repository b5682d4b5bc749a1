"""Region overlays: the merge rules, their errors, `rollout render`, `rollout validate --region`,
and the builder args a region sets (region label, per-version resources)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from app.config import AppArgs, load_app_args, load_yaml, project_root
from app.errors import ConfigError
from app.ops.cli import main
from app.ops.overlay import load_overlay, merge, render
from app.ops.validate import validate_serve_config

ROOT = project_root()
# The merge rules, on the single-application layout (one app holds every version's
# deployments); the repo's regions are written for serve_config.yaml (one app per version).
SINGLE = ROOT / "serve_config.single-app.yaml"
BASE = load_yaml(SINGLE)


def write_overlay(tmp_path: Path, region: str = "test-1", **fields) -> Path:
    document = {"region": region, "clusters": [], "serve": {}, **fields}
    path = tmp_path / f"{region}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def app_overlay(region: str = "test-1", **app) -> dict:
    return {"applications": [{"name": "recommender", "args": {"region": region}, **app}]}


# ----------------------------------------------------------------------------- merge rules


def test_named_lists_merge_by_name_and_atomic_keys_replace():
    before = copy.deepcopy(BASE)
    merged = merge(BASE, {"applications": [{
        "name": "recommender",
        "args": {"router_replicas": 3},
        "deployments": [
            {"name": "Router", "user_config": {"weights": {"v1": 100}, "breaker": {"cooldown_s": 9}}},
            {"name": "recommender-v1", "autoscaling_config": {"min_replicas": 2}},
        ],
    }]})  # fmt: skip
    assert BASE == before  # the inputs are never modified
    app = merged["applications"][0]
    assert app["args"]["router_replicas"] == 3
    assert app["args"]["versions"] == BASE["applications"][0]["args"]["versions"]  # kept
    router = next(d for d in app["deployments"] if d["name"] == "Router")["user_config"]
    assert router["weights"] == {"v1": 100}  # replaced whole: no v2: 10 left over to sum to 110
    assert router["breaker"]["cooldown_s"] == 9 and router["breaker"]["window_s"] == 10  # merged
    assert router["stable"] == "v1"
    names = [d["name"] for d in app["deployments"]]
    assert names == ["Router", "RolloutController", "recommender-v1"]  # a new name is appended


def test_an_application_the_base_lacks_is_an_error(tmp_path):
    path = write_overlay(tmp_path, serve={"applications": [{"name": "recomender", "args": {}}]})
    with pytest.raises(ConfigError) as caught:
        render(BASE, load_overlay(path))
    message = str(caught.value)
    assert (
        str(path) in message and "applications[0].name: 'recomender' is not in the base" in message
    )


def test_overlay_file_errors_name_the_file_and_field(tmp_path):
    path = write_overlay(tmp_path, regoin="x")
    with pytest.raises(ConfigError, match=r"test-1.yaml: regoin: Extra inputs are not permitted"):
        load_overlay(path)
    other = tmp_path / "elsewhere.yaml"
    other.write_text(yaml.safe_dump({"region": "test-1"}))
    with pytest.raises(ConfigError, match=r"region: 'test-1' does not match the file name"):
        load_overlay(other)


def test_render_requires_the_region_label_in_args(tmp_path):
    path = write_overlay(tmp_path, serve=app_overlay(region="test-2"))
    with pytest.raises(
        ConfigError, match=r"applications\[0\]\.args\.region: must be 'test-1'.*got 'test-2'"
    ):
        render(BASE, load_overlay(path))


# ----------------------------------------------------------------------------- validate


def test_every_repo_region_validates_and_fits():
    for path in sorted((ROOT / "configs/regions").glob("*.yaml")):
        report = validate_serve_config(ROOT / "serve_config.yaml", load_models=False, overlay=path)
        assert report.ok, report.errors
        assert any("fit" in note or "not checked" in note for note in report.notes), report.notes


def test_validate_with_overlay_names_both_files_and_the_merged_field(tmp_path):
    path = write_overlay(tmp_path, serve=app_overlay(
        deployments=[{"name": "Router", "user_config": {"weights": {"v1": 95}}}],
        args={"region": "test-1", "version_resources": {"v9": {"num_gpus": 1}}},
    ))  # fmt: skip
    report = validate_serve_config(SINGLE, load_models=False, overlay=path)
    where = f"serve_config.single-app.yaml + {path}"
    assert any(
        where in e and "version_resources: ['v9'] are not versions" in e for e in report.errors
    ), report.errors
    path = write_overlay(tmp_path, serve=app_overlay(
        deployments=[{"name": "Router", "user_config": {"weights": {"v1": 95}}}]))  # fmt: skip
    report = validate_serve_config(SINGLE, load_models=False, overlay=path)
    assert report.errors == [
        f"{SINGLE} + {path}: applications[0].deployments[0].user_config: "
        "weights: weights must sum to 100, got 95"
    ]


def test_validate_checks_the_regions_cluster_files(tmp_path):
    launcher = load_yaml(ROOT / "cluster/aws-us-east-1.yaml")
    for spec in launcher["available_node_types"].values():
        spec["labels"] = {"region": "test-1"}
    del launcher["available_node_types"]["gpu-worker"]  # no GPU workers at all
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(launcher))
    path = write_overlay(tmp_path, clusters=[str(cluster)], serve=app_overlay(
        args={"region": "test-1", "version_resources": {"v1": {"num_gpus": 1}}}))  # fmt: skip
    report = validate_serve_config(SINGLE, load_models=False, overlay=path)
    assert len(report.errors) == 1, report.errors
    assert (
        "recommender/recommender-v1 (CPU 1, GPU 1, region=test-1) fits no node type"
        in report.errors[0]
    )
    missing = write_overlay(tmp_path, clusters=["cluster/nowhere.yaml"], serve=app_overlay())
    report = validate_serve_config(SINGLE, load_models=False, overlay=missing)
    assert any("clusters:" in e and "nowhere.yaml: cannot read" in e for e in report.errors), (
        report.errors
    )


# ----------------------------------------------------------------------------- CLI


def test_rollout_render_writes_the_merged_config(tmp_path, capsys):
    out = tmp_path / "eu.yaml"
    assert (
        main(["render", str(ROOT / "serve_config.yaml"), "--region", "eu-west-1", "-o", str(out)])
        == 0
    )
    expected = render(load_yaml(ROOT / "serve_config.yaml"),
                      load_overlay(ROOT / "configs/regions/eu-west-1.yaml"))  # fmt: skip
    assert yaml.safe_load(out.read_text()) == expected
    assert out.read_text().startswith("# GENERATED by `rollout render")
    assert main(["render", "--region", "atlantis"]) == 1
    assert "atlantis.yaml: cannot read" in capsys.readouterr().err


def test_rollout_validate_all_regions(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["validate", "--no-load", "--all-regions"]) == 0
    out = capsys.readouterr().out
    for region in ("us-east-1", "eu-west-1", "europe-west4", "onprem"):
        assert f"serve_config.yaml --region {region}: valid" in out
    assert "serve_config.yaml: valid" in out
    assert main(["validate", "--no-load", "--region", "atlantis"]) == 1
    assert "atlantis.yaml: cannot read" in capsys.readouterr().err


# ----------------------------------------------------------------------------- builder args


def test_version_resources_replace_the_model_configs_and_region_selects_nodes():
    args = copy.deepcopy(BASE["applications"][0]["args"])
    args.update(
        region="eu-west-1",
        version_resources={"v2": {"num_cpus": 2, "num_gpus": 1, "memory_mb": 4096}},
    )
    parsed, configs = load_app_args(args)
    by_version = {c.version: c for c in configs}
    assert by_version["v2"].resources.ray_actor_options() == {
        "num_cpus": 2,
        "num_gpus": 1,
        "memory": 4096 * 2**20,
    }
    assert by_version["v1"].resources.num_gpus == 0  # untouched: its model config's
    assert parsed.label_selector() == {"region": "eu-west-1"}
    assert AppArgs.model_validate({"model": "m", "versions": ["x"]}).label_selector() is None
    with pytest.raises(ConfigError, match=r"args: region: String should match pattern"):
        load_app_args({**args, "region": "eu west 1"})
    with pytest.raises(ConfigError, match=r"args.version_resources: \['v7'\] are not versions"):
        load_app_args({**args, "version_resources": {"v7": {}}})


def test_a_base_entry_without_a_name_is_a_config_error_not_a_crash():
    base = {"applications": [{"x": 1}, {"name": "a"}]}
    with pytest.raises(ConfigError, match=r"'b' is not in the base config; names: \['a'\]"):
        merge(base, {"applications": [{"name": "b"}]})
