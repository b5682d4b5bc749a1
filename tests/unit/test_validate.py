"""`rollout validate` / `validate_serve_config` and `rollout checksum`: every problem is reported,
each naming its file and field; the CLI's exit codes and output are what scripts rely on."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.ops.cli import main
from app.ops.validate import validate_serve_config
from app.serving.artifacts import artifact_digests, verify_artifact
from tests.support.tiny_models import build_tiny_bert

REPO = Path(__file__).resolve().parents[2]
FAKE_DIGEST = "ab" * 32


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert", seed=0)


def weights_digest(directory: Path) -> str:
    return hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()


def write_model_config(root: Path, file_version: str, **changes: Any) -> Path:
    """Write configs/<file_version>.yaml; `changes` override (or, with None, drop) fields."""
    fields: dict[str, Any] = {
        "name": "recommender",
        "version": file_version,
        "artifact": "../models/tiny",
        "sha256": FAKE_DIGEST,
        "adapter": "recommender",
        "hyperparameters": {"pooling": "mean", "normalize": True, "temperature": 1.0},
    }
    fields.update(changes)
    fields = {k: v for k, v in fields.items() if v is not None}
    path = root / "configs" / f"{file_version}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return path


def builder_app(root: Path, *, deployments: list | None = None, **args: Any) -> dict[str, Any]:
    app_args: dict[str, Any] = {
        "model": "recommender",
        "versions": ["configs/v1.yaml", "configs/v2.yaml"],
        "config_root": str(root),
    }
    app_args.update(args)
    app_args = {k: v for k, v in app_args.items() if v is not None}
    app: dict[str, Any] = {
        "name": "recommender",
        "route_prefix": "/",
        "import_path": "app.builder:build_app",
        "args": app_args,
    }
    if deployments is not None:
        app["deployments"] = deployments
    return app


def router(weights: dict[str, float], stable: str = "v1") -> dict[str, Any]:
    return {"name": "Router", "user_config": {"stable": stable, "weights": weights}}


def write_serve_config(root: Path, *applications: dict[str, Any], **top: Any) -> Path:
    document = {"proxy_location": "EveryNode", **top, "applications": list(applications)}
    path = root / "serve_config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def two_versions(root: Path, **v2_changes: Any) -> None:
    write_model_config(root, "v1")
    write_model_config(root, "v2", **{"hyperparameters": {"temperature": 0.5}, **v2_changes})


def errors_with(report, *needles: str) -> list[str]:
    return [e for e in report.errors if all(n in e for n in needles)]


# ----------------------------------------------------------------------------- valid configs


def test_repo_serve_config_is_valid_without_loading():
    report = validate_serve_config(REPO / "serve_config.yaml", load_models=False)
    assert report.errors == []
    assert report.ok


def test_tmp_config_with_config_root_is_valid(tmp_path):
    two_versions(tmp_path)
    path = write_serve_config(
        tmp_path, builder_app(tmp_path, deployments=[router({"v1": 75, "v2": 25})])
    )
    report = validate_serve_config(path, load_models=False)
    assert report.errors == []
    assert report.ok


def test_relative_version_paths_resolve_from_config_root_not_cwd(tmp_path, monkeypatch):
    two_versions(tmp_path)
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert validate_serve_config(path, load_models=False).errors == []


def test_load_models_smoke_tests_each_version(tmp_path, tiny_bert):
    shutil.copytree(tiny_bert, tmp_path / "models" / "tiny")
    digest = weights_digest(tmp_path / "models" / "tiny")
    write_model_config(tmp_path, "v1", sha256=digest)
    write_model_config(
        tmp_path, "v2", sha256=digest, hyperparameters={"query_prefix": "a user who "}
    )
    path = write_serve_config(
        tmp_path,
        builder_app(tmp_path, deployments=[router({"v1": 50, "v2": 50})]),
        http_options={"request_timeout_s": 35},
    )
    progress: list[str] = []
    report = validate_serve_config(path, load_models=True, progress=progress.append)
    assert report.errors == []
    assert len(report.notes) == 2
    for version, note in zip(("v1", "v2"), report.notes):
        assert note.startswith(f"recommender-{version}: ")
        assert "smoke inference ok" in note
        # the example has 1 user and 2 items
        assert "scores [1, 2]" in note
        assert "ranking [1, 2]" in note
    assert [line.split()[1] for line in progress] == ["recommender-v1", "recommender-v2"]


def test_non_builder_app_is_noted_not_failed(tmp_path):
    two_versions(tmp_path)
    other = {
        "name": "other",
        "route_prefix": "/other",
        "import_path": "somebody_elses.module:app",
        "args": {"anything": "goes", "model": 123},
    }
    path = write_serve_config(tmp_path, builder_app(tmp_path), other)
    report = validate_serve_config(path, load_models=False)
    assert report.ok, report.errors
    (note,) = report.notes
    assert str(path) in note
    assert "applications[1]" in note
    assert "import_path is not app.builder:build_app" in note


# ----------------------------------------------------------------------------- Serve's own schema


def test_serve_schema_errors_name_file_and_field(tmp_path):
    path = write_serve_config(
        tmp_path,
        {"name": "a", "route_prefix": "/", "import_path": "no_separator_here"},
        proxy_location="Everywhere",
    )
    report = validate_serve_config(path, load_models=False)
    assert not report.ok
    lines = "\n".join(report.errors).splitlines()
    # both problems reported, each naming the file and the field
    assert any(str(path) in ln and "proxy_location" in ln for ln in lines), lines
    assert any(
        str(path) in ln and "applications.0.import_path" in ln and "no_separator_here" in ln
        for ln in lines
    ), lines


def test_serve_schema_duplicate_route_prefix(tmp_path):
    two_versions(tmp_path)
    second = {**builder_app(tmp_path), "name": "second"}
    path = write_serve_config(tmp_path, builder_app(tmp_path), second)
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(path), "applications", "route prefix"), report.errors


def test_route_prefix_without_leading_slash_is_an_error(tmp_path):
    # `serve deploy` rejects this app (route prefix must start with "/"); validate must not pass it.
    two_versions(tmp_path)
    path = write_serve_config(tmp_path, {**builder_app(tmp_path), "route_prefix": "recommender"})
    report = validate_serve_config(path, load_models=False)
    assert not report.ok, "route_prefix 'recommender' (no leading '/') passed validation"
    assert errors_with(report, str(path), "route_prefix"), report.errors


def test_unreadable_and_non_yaml_serve_config(tmp_path):
    missing = tmp_path / "nope.yaml"
    report = validate_serve_config(missing, load_models=False)
    assert errors_with(report, str(missing), "cannot read"), report.errors
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [\n")
    report = validate_serve_config(broken, load_models=False)
    assert errors_with(report, str(broken), "not valid YAML"), report.errors


# ----------------------------------------------------------------------------- builder args


def test_args_missing_model_names_file_and_field(tmp_path):
    two_versions(tmp_path)
    path = write_serve_config(tmp_path, builder_app(tmp_path, model=None))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(path), "applications[0].args", "model", "Field required"), (
        report.errors
    )


def test_args_errors_are_all_reported_one_per_line_each_naming_the_file(tmp_path):
    two_versions(tmp_path)
    app = builder_app(tmp_path, model=None, versions=[], router_replicas=0)
    app["args"]["config_rot"] = "/typo"
    path = write_serve_config(tmp_path, app)
    report = validate_serve_config(path, load_models=False)
    lines = "\n".join(report.errors).splitlines()
    for field in ("model", "versions", "router_replicas", "config_rot"):
        assert any(f"applications[0].args: {field}:" in ln for ln in lines), (field, lines)
    for line in lines:
        assert line.startswith(f"{path}: applications[0].args"), line


def test_missing_version_file(tmp_path):
    write_model_config(tmp_path, "v1")
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    report = validate_serve_config(path, load_models=False)
    missing = tmp_path / "configs" / "v2.yaml"
    assert errors_with(report, str(missing), "cannot read"), report.errors


def test_model_config_typo_field_names_file_and_field(tmp_path):
    write_model_config(tmp_path, "v1")
    v2 = write_model_config(tmp_path, "v2", autoscalling={"max_replicas": 3})
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(v2), "autoscalling", "Extra inputs are not permitted"), (
        report.errors
    )


def test_hyperparameter_typo_names_hyperparameters_and_field(tmp_path):
    v1 = write_model_config(tmp_path, "v1", hyperparameters={"temprature": 0.5})
    write_model_config(tmp_path, "v2")
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(v1), "hyperparameters", "temprature"), report.errors


def test_bad_hyperparameter_value(tmp_path):
    v1 = write_model_config(tmp_path, "v1", hyperparameters={"pooling": "max"})
    write_model_config(tmp_path, "v2")
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(v1), "hyperparameters", "pooling"), report.errors


def test_unknown_adapter(tmp_path):
    v1 = write_model_config(tmp_path, "v1", adapter="no-such-task")
    write_model_config(tmp_path, "v2")
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(v1), "adapter", "no-such-task"), report.errors


def test_version_name_mismatch_and_duplicate_version(tmp_path):
    write_model_config(tmp_path, "v1")
    v2 = write_model_config(tmp_path, "v2", name="other-model")
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(v2), "name", "other-model"), report.errors

    dup = write_model_config(tmp_path, "v2", version="v1")
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(dup), "version", "'v1'"), report.errors


def test_problems_in_several_version_files_are_all_reported(tmp_path):
    v1 = write_model_config(tmp_path, "v1", autoscalling={"max_replicas": 3})
    v2 = write_model_config(tmp_path, "v2", max_ongoing_request=8)
    v3 = tmp_path / "configs" / "v3.yaml"  # does not exist
    path = write_serve_config(
        tmp_path,
        builder_app(tmp_path, versions=["configs/v1.yaml", "configs/v2.yaml", "configs/v3.yaml"]),
    )
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(v1), "autoscalling"), report.errors
    assert errors_with(report, str(v2), "max_ongoing_request"), report.errors
    assert errors_with(report, str(v3), "cannot read"), report.errors


def test_hyperparameter_typo_is_reported_alongside_another_files_field_typo(tmp_path):
    # Fixing v2's typo must not be what it takes to learn about v1's.
    v1 = write_model_config(tmp_path, "v1", hyperparameters={"temprature": 0.5})
    v2 = write_model_config(tmp_path, "v2", max_ongoing_request=8)
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(v2), "max_ongoing_request"), report.errors
    assert errors_with(report, str(v1), "hyperparameters", "temprature"), report.errors


# ----------------------------------------------------------------------------- deployments overrides


def test_router_weights_not_summing_to_100(tmp_path):
    two_versions(tmp_path)
    path = write_serve_config(
        tmp_path, builder_app(tmp_path, deployments=[router({"v1": 80, "v2": 15})])
    )
    report = validate_serve_config(path, load_models=False)
    (error,) = report.errors
    assert str(path) in error
    assert "applications[0].deployments[0].user_config" in error
    assert "weights" in error and "sum to 100" in error and "95" in error


def test_router_weights_name_undeployed_version(tmp_path):
    two_versions(tmp_path)
    path = write_serve_config(
        tmp_path, builder_app(tmp_path, deployments=[router({"v1": 90, "v3": 10})])
    )
    report = validate_serve_config(path, load_models=False)
    (error,) = report.errors
    assert str(path) in error
    assert "applications[0].deployments[0].user_config.weights" in error
    assert "'v3'" in error and "not deployed" in error


def test_router_stable_must_be_weighted(tmp_path):
    two_versions(tmp_path)
    path = write_serve_config(
        tmp_path, builder_app(tmp_path, deployments=[router({"v1": 100}, stable="v2")])
    )
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(path), "deployments[0].user_config", "stable"), report.errors


def test_override_naming_unknown_deployment(tmp_path):
    two_versions(tmp_path)
    deployments = [router({"v1": 100}), {"name": "recommender-v3", "user_config": {}}]
    path = write_serve_config(tmp_path, builder_app(tmp_path, deployments=deployments))
    report = validate_serve_config(path, load_models=False)
    (error,) = report.errors
    assert str(path) in error
    assert "applications[0].deployments[1].name" in error
    assert "'recommender-v3'" in error
    assert "recommender-v1" in error and "recommender-v2" in error  # says what does exist


def test_model_override_with_bad_hyperparameter(tmp_path):
    two_versions(tmp_path)
    deployments = [
        router({"v1": 100}),
        {"name": "recommender-v2", "user_config": {"hyperparameters": {"temprature": 0.5}}},
    ]
    path = write_serve_config(tmp_path, builder_app(tmp_path, deployments=deployments))
    report = validate_serve_config(path, load_models=False)
    (error,) = report.errors
    assert str(path) in error
    assert "applications[0].deployments[1].user_config" in error
    assert "temprature" in error
    assert "hyperparameters" in error, f"error does not say the field is a hyperparameter: {error}"


def test_model_override_with_bad_batching(tmp_path):
    two_versions(tmp_path)
    deployments = [{"name": "recommender-v1", "user_config": {"batching": {"max_batch_size": 0}}}]
    path = write_serve_config(tmp_path, builder_app(tmp_path, deployments=deployments))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(
        report, str(path), "deployments[0].user_config", "batching.max_batch_size"
    ), report.errors


def test_valid_model_override_passes(tmp_path):
    two_versions(tmp_path)
    deployments = [
        router({"v1": 50, "v2": 50}),
        {"name": "recommender-v2", "user_config": {"hyperparameters": {"temperature": 0.25}}},
        {"name": "recommender-v1", "num_replicas": 2},  # no user_config: nothing to check
    ]
    path = write_serve_config(tmp_path, builder_app(tmp_path, deployments=deployments))
    assert validate_serve_config(path, load_models=False).errors == []


def test_every_deployment_problem_is_collected(tmp_path):
    two_versions(tmp_path)
    deployments = [
        router({"v1": 80, "v2": 15}),
        {"name": "recommender-v9", "user_config": {}},
        {"name": "recommender-v1", "user_config": {"hyperparameters": {"pooling": "max"}}},
    ]
    path = write_serve_config(tmp_path, builder_app(tmp_path, deployments=deployments))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, "deployments[0].user_config", "sum to 100"), report.errors
    assert errors_with(report, "deployments[1].name", "recommender-v9"), report.errors
    assert errors_with(report, "deployments[2].user_config", "pooling"), report.errors
    assert len(report.errors) == 3, report.errors


def test_problems_in_several_applications_are_all_reported(tmp_path):
    two_versions(tmp_path)
    first = builder_app(tmp_path, deployments=[router({"v1": 60})])
    second = {
        **builder_app(tmp_path, deployments=[{"name": "nope", "user_config": {}}]),
        "name": "second",
        "route_prefix": "/second",
    }
    path = write_serve_config(tmp_path, first, second)
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, str(path), "applications[0].deployments[0]", "sum to 100")
    assert errors_with(report, str(path), "applications[1].deployments[0].name", "'nope'")


# ----------------------------------------------------------------------------- loading artifacts


def test_checksum_mismatch_when_loading(tmp_path, tiny_bert):
    shutil.copytree(tiny_bert, tmp_path / "models" / "tiny")
    good = weights_digest(tmp_path / "models" / "tiny")
    write_model_config(tmp_path, "v1", sha256=good)
    v2 = write_model_config(tmp_path, "v2", sha256=FAKE_DIGEST)
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    report = validate_serve_config(path, load_models=True)
    (error,) = report.errors
    assert str(v2) in error
    assert "sha256 mismatch" in error
    assert FAKE_DIGEST in error and good in error
    # the good version still loads and is smoke-tested
    (note,) = report.notes
    assert note.startswith("recommender-v1: ") and "smoke inference ok" in note


def test_checksum_not_checked_without_loading(tmp_path):
    two_versions(tmp_path)  # FAKE_DIGEST, artifact dir does not exist
    path = write_serve_config(tmp_path, builder_app(tmp_path))
    assert validate_serve_config(path, load_models=False).ok


def test_missing_artifact_when_loading(tmp_path):
    two_versions(tmp_path)
    path = write_serve_config(tmp_path, builder_app(tmp_path, versions=["configs/v1.yaml"]))
    report = validate_serve_config(path, load_models=True)
    v1 = tmp_path / "configs" / "v1.yaml"
    assert errors_with(report, str(v1), "artifact", "is not a directory"), report.errors


def test_smoke_test_uses_the_override_hyperparameters(tmp_path, tiny_bert):
    # The override is what the replica will run with; an override the model cannot run must fail.
    shutil.copytree(tiny_bert, tmp_path / "models" / "tiny")
    digest = weights_digest(tmp_path / "models" / "tiny")
    write_model_config(tmp_path, "v1", sha256=digest)
    deployments = [
        {"name": "recommender-v1", "user_config": {"hyperparameters": {"temperature": 0.5}}}
    ]
    path = write_serve_config(
        tmp_path, builder_app(tmp_path, versions=["configs/v1.yaml"], deployments=deployments)
    )
    report = validate_serve_config(path, load_models=True)
    assert report.errors == []
    assert "smoke inference ok" in report.notes[0]


# ----------------------------------------------------------------------------- CLI: validate


def test_cli_validate_no_load_valid(capsys):
    config = REPO / "serve_config.yaml"
    assert main(["validate", str(config), "--no-load"]) == 0
    out, err = capsys.readouterr()
    assert f"{config}: valid" in out
    assert "error" not in err


def test_cli_validate_defaults_to_serve_config_in_cwd(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["validate", "--no-load"]) == 0
    assert "serve_config.yaml: valid" in capsys.readouterr().out


def test_cli_validate_bad_file(tmp_path, capsys):
    two_versions(tmp_path)
    deployments = [router({"v1": 80, "v2": 15}), {"name": "ghost", "user_config": {}}]
    path = write_serve_config(tmp_path, builder_app(tmp_path, deployments=deployments))
    assert main(["validate", str(path), "--no-load"]) == 1
    out, err = capsys.readouterr()
    assert "valid" not in out
    error_lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(error_lines) == 2, err
    assert any("sum to 100" in ln for ln in error_lines)
    assert any("'ghost'" in ln for ln in error_lines)
    assert f"{path}: 2 error(s)" in err


def test_cli_validate_every_error_line_is_prefixed(tmp_path, capsys):
    # multi-problem errors must still come out one `error:` line per problem
    two_versions(tmp_path)
    app = builder_app(tmp_path, model=None, versions=[])
    path = write_serve_config(tmp_path, app)
    assert main(["validate", str(path), "--no-load"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    body = lines[:-1]  # the last line is the count
    assert body and all(ln.startswith("error: ") for ln in body), lines
    assert any("model" in ln for ln in body) and any("versions" in ln for ln in body)


def test_cli_validate_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "absent.yaml"), "--no-load"]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "cannot read" in err


def test_cli_validate_loads_models(tmp_path, tiny_bert, capsys):
    shutil.copytree(tiny_bert, tmp_path / "models" / "tiny")
    write_model_config(tmp_path, "v1", sha256=weights_digest(tmp_path / "models" / "tiny"))
    path = write_serve_config(tmp_path, builder_app(tmp_path, versions=["configs/v1.yaml"]))
    assert main(["validate", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "ok: recommender-v1: " in out and "smoke inference ok" in out
    assert f"{path}: valid" in out
    assert "loading recommender-v1" in err  # progress goes to stderr


# ----------------------------------------------------------------------------- CLI: checksum


def test_cli_checksum_single_weights_file(tiny_bert, capsys):
    assert main(["checksum", str(tiny_bert)]) == 0
    out = capsys.readouterr().out
    expected = hashlib.sha256((tiny_bert / "model.safetensors").read_bytes()).hexdigest()
    assert out == f"sha256: {expected}\n"
    block = yaml.safe_load(out)
    assert block == {"sha256": expected}
    verify_artifact(tiny_bert, block["sha256"])  # pasteable into a model config


def test_cli_checksum_relative_to_cwd(tiny_bert, capsys, monkeypatch):
    monkeypatch.chdir(tiny_bert.parent)
    assert main(["checksum", tiny_bert.name]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == {"sha256": weights_digest(tiny_bert)}


def test_cli_checksum_two_weights_files_prints_mapping(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.safetensors").write_bytes(b"main weights")
    (tmp_path / "sub" / "head.bin").write_bytes(b"head weights")
    (tmp_path / "config.json").write_text("{}")
    assert main(["checksum", str(tmp_path)]) == 0
    block = yaml.safe_load(capsys.readouterr().out)
    assert block == {
        "sha256": {
            "model.safetensors": hashlib.sha256(b"main weights").hexdigest(),
            "sub/head.bin": hashlib.sha256(b"head weights").hexdigest(),
        }
    }
    assert block["sha256"] == artifact_digests(tmp_path)
    verify_artifact(tmp_path, block["sha256"])


def test_cli_checksum_no_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "vocab.txt").write_text("a\n")
    assert main(["checksum", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and "no weights files found" in err


def test_cli_checksum_missing_dir(tmp_path, capsys):
    missing = tmp_path / "not-there"
    assert main(["checksum", str(missing)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and str(missing) in err and "is not a directory" in err


def test_cli_checksum_uninstalled_package(capsys):
    assert main(["checksum", "package:no_such_model_package_xyz"]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "no_such_model_package_xyz" in err


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2


def test_weights_patch_is_checksummed_and_smoke_tested(tmp_path, tiny_bert):
    shutil.copytree(tiny_bert, tmp_path / "models" / "tiny")
    shutil.copytree(tiny_bert, tmp_path / "models" / "tiny2")
    digest = weights_digest(tmp_path / "models" / "tiny")
    write_model_config(tmp_path, "v1", sha256=digest)
    write_model_config(tmp_path, "v2", sha256=digest)

    def patched(weights: dict) -> Path:
        v2 = {"name": "recommender-v2", "user_config": {"weights": weights}}
        return write_serve_config(tmp_path, builder_app(tmp_path, deployments=[v2]))

    good = validate_serve_config(patched({"artifact": "../models/tiny2", "sha256": digest}))
    assert good.errors == [] and len(good.notes) == 2
    wrong = validate_serve_config(patched({"artifact": "../models/tiny2", "sha256": FAKE_DIGEST}))
    assert errors_with(wrong, "recommender-v2.user_config.weights", "sha256 mismatch")
    missing = validate_serve_config(patched({"artifact": "../models/none", "sha256": digest}))
    assert errors_with(missing, "recommender-v2.user_config.weights", "is not a directory")
    malformed = validate_serve_config(patched({"artifact": "../models/tiny2", "sha256": "abc"}),
                                      load_models=False)  # fmt: skip
    assert errors_with(malformed, "user_config", "weights", "sha256")


def version_apps_config(root: Path, *, names: dict[str, str] | None = None, weights=None,
                        router_user_config: bool = True, **router_args: Any) -> Path:  # fmt: skip
    """v1 and v2 as applications of their own, plus the router app in version_apps mode."""
    two_versions(root)
    names = names or {}
    apps = [
        {"name": names.get(v, f"recommender-{v}"), "route_prefix": None,
         "import_path": "app.builder:build_version",
         "args": {"config": f"configs/{v}.yaml", "config_root": str(root)}}
        for v in ("v1", "v2")
    ]  # fmt: skip
    router_app = {
        "name": "recommender", "route_prefix": "/", "import_path": "app.builder:build_app",
        "args": {"model": "recommender", "version_apps": True, **router_args},
        "deployments": [router(weights or {"v1": 90, "v2": 10})] if router_user_config else [],
    }  # fmt: skip
    return write_serve_config(root, *apps, router_app)


def test_version_apps_config_is_valid(tmp_path):
    report = validate_serve_config(version_apps_config(tmp_path), load_models=False)
    assert report.errors == []


def test_version_apps_errors_name_the_field(tmp_path):
    wrong_name = validate_serve_config(
        version_apps_config(tmp_path, names={"v2": "rec-v2"}), load_models=False
    )
    assert errors_with(wrong_name, "applications[1].name", "'recommender-v2'")
    unknown = validate_serve_config(
        version_apps_config(tmp_path, weights={"v1": 50, "v3": 50}), load_models=False
    )
    assert errors_with(unknown, "applications[2].deployments[0].user_config", "v3")
    no_table = validate_serve_config(
        version_apps_config(tmp_path, router_user_config=False), load_models=False
    )
    assert errors_with(no_table, "applications[2].deployments", "needs a user_config")
    both = validate_serve_config(
        version_apps_config(tmp_path, versions=["configs/v1.yaml"]), load_models=False
    )
    assert errors_with(both, "args: versions", "must be empty with version_apps")


def test_version_app_with_a_route_or_alone_is_an_error(tmp_path):
    path = version_apps_config(tmp_path)
    document = yaml.safe_load(path.read_text())
    document["applications"][0]["route_prefix"] = "/v1"
    document["applications"] = document["applications"][:1] + document["applications"][2:]
    document["applications"][1]["deployments"] = [router({"v1": 100})]
    path.write_text(yaml.safe_dump(document))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, "applications[0].route_prefix", "must be null")
    alone = {**document, "applications": [document["applications"][1]]}
    path.write_text(yaml.safe_dump(alone))
    report = validate_serve_config(path, load_models=False)
    assert errors_with(report, "args.version_apps", "no application in this file runs a version")


def test_repo_single_app_config_is_valid_without_loading():
    report = validate_serve_config(REPO / "serve_config.single-app.yaml", load_models=False)
    assert report.errors == []


# ----------------------------------------------------------------------------- admission control


def test_a_proxy_deadline_shorter_than_the_routers_is_refused(tmp_path):
    two_versions(tmp_path)
    table = {**router({"v1": 100})["user_config"], "request_timeout_s": 30}
    app = builder_app(tmp_path, deployments=[{"name": "Router", "user_config": table}])
    short = write_serve_config(tmp_path, app, http_options={"request_timeout_s": 10})
    report = validate_serve_config(short, load_models=False)
    assert errors_with(report, "request_timeout_s", "30s is longer than", "(10s)")
    missing = write_serve_config(tmp_path, app)
    report = validate_serve_config(missing, load_models=False)
    assert report.ok and any("http_options.request_timeout_s is not set" in n for n in report.notes)


def _shipped_serve_configs() -> dict[str, dict[str, Any]]:
    """Every serve config the project ships: the two layouts, each region overlay rendered on
    serve_config.yaml, and the KubeRay manifest's serveConfigV2."""
    from app.ops.overlay import load_overlay, render

    base = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    shipped = {
        "serve_config.yaml": base,
        "serve_config.single-app.yaml": yaml.safe_load(
            (REPO / "serve_config.single-app.yaml").read_text()
        ),
    }
    for overlay in sorted((REPO / "configs" / "regions").glob("*.yaml")):
        shipped[f"{overlay.name} on serve_config.yaml"] = render(base, load_overlay(overlay))
    text = (REPO / "cluster" / "kuberay" / "rayservice.yaml").read_text()
    manifest = next(yaml.safe_load_all(text))  # the RayService; its NetworkPolicies follow
    shipped["rayservice.yaml"] = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    return shipped


@pytest.mark.parametrize("name", sorted(_shipped_serve_configs()))
def test_admission_control_is_on_in_every_shipped_config(name):
    """F9: every shipped config bounds how long a request waits in a proxy (above the Router's
    own deadline) and how many wait for a Router replica and for each version."""
    from app.config import AppArgs, TrafficConfig, load_model_config

    document = _shipped_serve_configs()[name]
    proxy_timeout = (document.get("http_options") or {}).get("request_timeout_s")
    assert proxy_timeout is not None, f"{name}: no http_options.request_timeout_s"
    for application in document["applications"]:
        args = application.get("args") or {}
        if application["import_path"] == "app.builder:build_app":
            app_args = AppArgs.model_validate(args)
            assert app_args.router_max_queued_requests > 0 and app_args.router_memory_mb
            for deployment in application.get("deployments") or []:
                if deployment["name"] == "Router":
                    table = TrafficConfig.model_validate(deployment["user_config"])
                    assert proxy_timeout >= table.request_timeout_s, name
            files = app_args.versions
        else:
            files = [args["config"]]
        for file in files:
            config = load_model_config(REPO / file)
            assert config.max_queued_requests > 0, f"{name}: {file} queues without bound"
            assert config.limits.max_tokens is not None, f"{name}: {file} has no token budget"


def test_the_default_layout_is_one_application_per_version():
    """serve_config.yaml (what `make demo`, the region overlays and the KubeRay manifest use)
    runs each version as an application of its own, so adding or retiring one restarts
    nothing else (tests/integration/test_deploy.py measures it under load)."""
    document = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    builders = [a["import_path"] for a in document["applications"]]
    assert builders.count("app.builder:build_app") == 1
    assert builders.count("app.builder:build_version") >= 2
    (router,) = [a for a in document["applications"] if a["import_path"] == "app.builder:build_app"]
    assert router["args"]["version_apps"] is True
