"""`mlflow:models:/<name>/<version>` artifacts against a real MLflow registry (sqlite backend,
file artifact store, both in a temp dir): resolved, cached per node, checksummed, validated."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.errors import ArtifactError
from app.ops.cli import main
from app.ops.validate import validate_serve_config
from app.serving import artifacts
from app.serving.artifacts import (
    RegistryVersion,
    artifact_digests,
    mlflow_cache_dir,
    parse_mlflow_artifact,
    resolve_artifact,
    verify_artifact,
)
from tests.support.tiny_models import build_tiny_bert

# MLflow's SQL store configures its mappers with SQLAlchemy 2.1's deprecated `noload`.
pytestmark = pytest.mark.filterwarnings(
    "ignore:The ``noload`` loader strategy is deprecated:sqlalchemy.exc.SADeprecationWarning"
)

NAME = "recommender"
V1 = f"mlflow:models:/{NAME}/1"  # the model's files at the version's root
V2_NESTED = f"mlflow:models:/{NAME}/2/model"  # a flavor-style log: the files under model/


class Registry:
    """A registry with two versions of `recommender` and the digests of their weights."""

    def __init__(self, root: Path) -> None:
        self.uri = f"sqlite:///{root}/mlflow.db"
        self.digest: dict[int, str] = {}


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("mlflow")
    reg = Registry(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=reg.uri, registry_uri=reg.uri)
        experiment = client.create_experiment("tiny", artifact_location=(root / "store").as_uri())
        client.create_registered_model(NAME)
        for version, seed in ((1, 0), (2, 1)):
            model = build_tiny_bert(root / f"bert{seed}", seed=seed)
            reg.digest[version] = next(iter(artifact_digests(model).values()))
            run = client.create_run(experiment)
            client.log_artifacts(run.info.run_id, str(model), artifact_path="model")
            client.set_terminated(run.info.run_id)
            # v1 registers the model folder itself, v2 the whole run (files under model/).
            source = run.info.artifact_uri + ("/model" if version == 1 else "")
            created = client.create_model_version(NAME, source, run_id=run.info.run_id)
            assert str(created.version) == str(version)
        yield reg


@pytest.fixture
def env(registry, tmp_path, monkeypatch) -> Path:
    """The replica's environment: the registry's URI and an empty artifact cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv(artifacts.ARTIFACT_CACHE_ENV, str(cache))
    return cache


def cache_entries(cache: Path) -> list[str]:
    folder = cache / "mlflow"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    ("artifact", "expected"),
    [
        ("mlflow:models:/recommender/1", RegistryVersion("recommender", 1)),
        ("mlflow:models:/recommender/12/model", RegistryVersion("recommender", 12, ("model",))),
        ("mlflow:models:/my model.v2/3/a/b", RegistryVersion("my model.v2", 3, ("a", "b"))),
    ],
)
def test_parse_names_version_and_sub_path(artifact, expected):
    assert parse_mlflow_artifact(artifact) == expected


@pytest.mark.parametrize(
    ("artifact", "needles"),
    [
        ("mlflow:models:/recommender@champion", ("alias", "immutable version number")),
        ("mlflow:models:/recommender@champion/model", ("alias", "immutable version number")),
        ("mlflow:models:/recommender/Production", ("stage", "immutable version number")),
        ("mlflow:models:/recommender/latest", ("stage", "immutable version number")),
        ("mlflow:models:/recommender/v1", ("'v1' is not a version number",)),
        ("mlflow:models:/recommender/01", ("'01' is not a version number",)),
        ("mlflow:models:/recommender", ("expected mlflow:models:/<name>/<version>",)),
        ("mlflow:models:/recommender/", ("expected mlflow:models:/<name>/<version>",)),
        ("mlflow:runs:/abc/model", ("expected mlflow:models:/<name>/<version>",)),
        ("mlflow:models:/recommender/1/../../etc", ("sub-path", "'..'")),
        ("mlflow:models:/recommender/1/model/", ("sub-path",)),
    ],
)
def test_mutable_or_malformed_references_are_refused(artifact, needles, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/unused.db")
    with pytest.raises(ArtifactError) as info:
        resolve_artifact(artifact, tmp_path)
    message = str(info.value)
    assert message.startswith(f"artifact {artifact!r}: ")
    assert all(needle in message for needle in needles), message
    assert not (tmp_path / "unused.db").exists()  # refused before touching any registry


def test_no_registry_configured_is_refused_before_mlflow_is_imported(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArtifactError, match="set MLFLOW_TRACKING_URI"):
        resolve_artifact(V1, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no stray mlflow.db / mlruns in the working dir


def test_cache_key_is_registry_name_and_version(tmp_path, monkeypatch):
    monkeypatch.setenv(artifacts.ARTIFACT_CACHE_ENV, str(tmp_path))
    one = RegistryVersion(NAME, 1)
    assert mlflow_cache_dir("sqlite:///a.db", one).parent == tmp_path / "mlflow"
    assert mlflow_cache_dir("sqlite:///a.db", one).name.startswith("recommender-1-")
    assert mlflow_cache_dir("sqlite:///a.db", one) != mlflow_cache_dir("sqlite:///b.db", one)
    assert mlflow_cache_dir("sqlite:///a.db", one) != mlflow_cache_dir(
        "sqlite:///a.db", RegistryVersion(NAME, 2)
    )
    # The sub-path is a folder inside the one download, not a download of its own.
    assert mlflow_cache_dir("sqlite:///a.db", one) == mlflow_cache_dir(
        "sqlite:///a.db", RegistryVersion(NAME, 1, ("model",))
    )


# ----------------------------------------------------------------------------- a real registry


def test_resolved_version_passes_its_sha256(registry, env):
    directory = resolve_artifact(V1, Path("/nonexistent-base"))
    assert directory.parent == (env / "mlflow").resolve()
    assert (directory / "config.json").is_file()
    assert verify_artifact(directory, registry.digest[1]) == {
        "model.safetensors": registry.digest[1]
    }


def test_sub_path_selects_the_nested_model_folder(registry, env):
    directory = resolve_artifact(V2_NESTED, Path("."))
    assert directory.name == "model"
    verify_artifact(directory, registry.digest[2])
    # Without the sub-path the weights are one level down: found, but at model/...
    root = resolve_artifact(f"mlflow:models:/{NAME}/2", Path("."))
    assert artifact_digests(root) == {"model/model.safetensors": registry.digest[2]}


def test_sub_path_missing_in_the_version(registry, env):
    with pytest.raises(ArtifactError, match=r"weights is not a directory"):
        resolve_artifact(f"mlflow:models:/{NAME}/1/weights", Path("."))


def test_rollout_checksum_prints_the_digest_to_declare(registry, env, capsys):
    assert main(["checksum", V1]) == 0
    assert registry.digest[1] in capsys.readouterr().out


def test_unwritable_cache_is_a_clear_error(registry, env, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(artifacts.ARTIFACT_CACHE_ENV, str(blocker))
    with pytest.raises(ArtifactError, match="cannot write the artifact cache .* set RAY_ROLLOUT"):
        resolve_artifact(V1, Path("."))


def test_wrong_sha256_fails(registry, env):
    directory = resolve_artifact(V1, Path("."))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        verify_artifact(directory, registry.digest[2])


def test_unknown_version_is_a_clear_error_and_leaves_no_partial_copy(registry, env):
    with pytest.raises(ArtifactError) as info:
        resolve_artifact(f"mlflow:models:/{NAME}/9", Path("."))
    message = str(info.value)
    assert "cannot get version 9 of 'recommender' from registry sqlite:///" in message
    assert "not found" in message.lower() and "\n" not in message
    assert cache_entries(env) == []  # the staging directory is gone too


def test_unknown_model_is_a_clear_error(registry, env):
    with pytest.raises(ArtifactError, match="cannot get version 1 of 'ranker'"):
        resolve_artifact("mlflow:models:/ranker/1", Path("."))


def test_unreachable_registry_is_a_clear_error(registry, env, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9/")  # discard: refused
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(ArtifactError) as info:
        resolve_artifact(V1, Path("."))
    assert "from registry http://127.0.0.1:9/" in str(info.value)
    assert cache_entries(env) == []


def test_registry_uri_takes_precedence_and_password_is_not_shown(registry, env, monkeypatch):
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "http://alice:s3cret@127.0.0.1:9/")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(ArtifactError) as info:
        resolve_artifact(V1, Path("."))
    assert "registry http://alice:***@127.0.0.1:9/" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_mlflow_not_installed_is_a_clear_error(registry, env, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    with pytest.raises(ArtifactError, match=r"MLflow is not installed on this node \(pip install"):
        resolve_artifact(V1, Path("."))
    assert cache_entries(env) == []


def test_cached_copy_is_reused_without_the_registry(registry, env, monkeypatch):
    first = resolve_artifact(V1, Path("."))
    weights = first / "model.safetensors"
    inode = weights.stat().st_ino
    monkeypatch.setitem(sys.modules, "mlflow", None)  # a second load needs no MLflow at all
    again = resolve_artifact(V1, Path("."))
    assert again == first and weights.stat().st_ino == inode
    # ... but the checksum still runs on every load: a tampered copy is refused.
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        verify_artifact(resolve_artifact(V1, Path(".")), registry.digest[1])


def test_a_replica_that_loses_the_download_race_uses_the_winners_copy(registry, env, monkeypatch):
    import mlflow.artifacts

    real = mlflow.artifacts.download_artifacts
    rivals: list[Path] = []
    raced = False

    def download_while_a_rival_finishes_first(**kwargs: Any) -> str:
        nonlocal raced
        local = real(**kwargs)
        if not raced:  # another replica of the node completes the same download meanwhile
            raced = True
            rivals.append(resolve_artifact(V1, Path(".")))
        return local

    monkeypatch.setattr(
        mlflow.artifacts, "download_artifacts", download_while_a_rival_finishes_first
    )
    mine = resolve_artifact(V1, Path("."))
    assert rivals == [mine]
    verify_artifact(mine, registry.digest[1])
    assert len(cache_entries(env)) == 1  # one copy, no staging directory left behind


# ----------------------------------------------------------------------------- rollout validate


def write_configs(root: Path, sha256: str) -> Path:
    """A one-version app whose model config names the registry version."""
    model = {
        "name": NAME,
        "version": "v1",
        "artifact": V1,
        "sha256": sha256,
        "adapter": "recommender",
    }
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "configs" / "v1.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    app = {
        "name": NAME,
        "route_prefix": "/",
        "import_path": "app.builder:build_app",
        "args": {"model": NAME, "versions": ["configs/v1.yaml"], "config_root": str(root)},
    }
    path = root / "serve_config.yaml"
    path.write_text(yaml.safe_dump({"applications": [app]}, sort_keys=False))
    return path


def test_validate_loads_and_smoke_tests_a_registry_version(registry, env, tmp_path, capsys):
    path = write_configs(tmp_path, registry.digest[1])
    report = validate_serve_config(path, load_models=True)
    assert report.errors == []
    assert any("smoke inference ok" in note for note in report.notes), report.notes
    assert main(["validate", str(path)]) == 0
    assert f"{path}: valid" in capsys.readouterr().out


def test_validate_with_a_wrong_sha256_names_the_file_and_field(registry, env, tmp_path, capsys):
    path = write_configs(tmp_path, registry.digest[2])
    report = validate_serve_config(path, load_models=True)
    (error,) = report.errors
    assert error.startswith(f"{tmp_path / 'configs' / 'v1.yaml'}: artifact: ")
    assert "sha256 mismatch" in error and registry.digest[2] in error
    assert main(["validate", str(path)]) == 1
    assert "sha256 mismatch" in capsys.readouterr().err


def test_validate_with_an_alias_says_why(registry, env, tmp_path):
    path = write_configs(tmp_path, registry.digest[1])
    model = tmp_path / "configs" / "v1.yaml"
    model.write_text(model.read_text().replace(V1, f"mlflow:models:/{NAME}@champion"))
    (error,) = validate_serve_config(path, load_models=True).errors
    assert "artifact" in error and "alias" in error and "immutable version" in error
