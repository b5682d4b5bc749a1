"""`mlflow:models:/<name>/<version>` artifacts against a real MLflow registry (sqlite backend,
file artifact store, both in a temp dir): resolved, cached per node, checksummed, validated."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import app.constants as constants_module
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
    """What the cache folder holds, but for the lock file loads and prunes share."""
    folder = cache / "mlflow"
    names = (p.name for p in folder.iterdir()) if folder.exists() else ()
    return sorted(name for name in names if name != ".lock")


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


# ----------------------------------------------------------------------------- the cache's bound


def fake_entry(folder: Path, name: str, used_at: float) -> str:
    """A cache entry's folder, named as mlflow_cache_dir names them, last used at `used_at`."""
    entry = folder / f"{name}-{'0' * 16}"
    (entry / "files").mkdir(parents=True)
    (entry / "files" / "model.safetensors").write_bytes(b"w")
    os.utime(entry, (used_at, used_at))
    return entry.name


@pytest.fixture
def cache_folder(tmp_path) -> Path:
    folder = tmp_path / "mlflow"
    folder.mkdir()
    return folder


def test_prune_keeps_the_most_recently_used_and_the_resolved_entry(cache_folder):
    now = time.time()
    names = [fake_entry(cache_folder, f"m-{i}", now - 1000 * i) for i in range(1, 6)]  # m-1 newest
    just_resolved = fake_entry(cache_folder, "m-9", now - 10_000)  # the oldest, but just loaded
    pruned = artifacts.prune_mlflow_cache(cache_folder, keep=3, keep_entry=just_resolved)
    assert sorted(pruned) == sorted(names[2:])  # m-3, m-4, m-5: the least recently used
    assert sorted(p.name for p in cache_folder.iterdir()) == sorted(
        [just_resolved, *names[:2], ".lock"]
    )


def test_a_cache_hit_counts_as_a_use(cache_folder):
    now = time.time()
    old = fake_entry(cache_folder, "m-1", now - 5000)
    newer = fake_entry(cache_folder, "m-2", now - 100)
    artifacts._mark_used(cache_folder / old)  # what a hit does
    assert artifacts.prune_mlflow_cache(cache_folder, keep=2, keep_entry="m-3-x") == [newer]


def test_prune_leaves_staging_folders_and_foreign_files_alone(cache_folder):
    now = time.time()
    entry = fake_entry(cache_folder, "m-1", now - 5000)
    staging = cache_folder / f".{entry}.abc123"  # another replica's download in progress
    (staging / "files").mkdir(parents=True)
    os.utime(staging, (now - 9000, now - 9000))
    (cache_folder / "README").write_text("operator notes")
    (cache_folder / "notes-1-0123456789abcdef").write_text("a file named like an entry")
    target = cache_folder.parent / "elsewhere"
    target.mkdir()
    (cache_folder / "link-1-0123456789abcdef").symlink_to(target)
    (cache_folder / "other").mkdir()
    keep = fake_entry(cache_folder, "m-2", now)
    assert artifacts.prune_mlflow_cache(cache_folder, keep=1, keep_entry=keep) == [entry]
    assert sorted(p.name for p in cache_folder.iterdir()) == sorted(
        [".lock", staging.name, "README", "notes-1-0123456789abcdef",
         "link-1-0123456789abcdef", "other", keep]
    )  # fmt: skip
    assert target.is_dir()


def unremovable(entry: Path, monkeypatch) -> tuple[str, Callable[[], None]]:
    """Make `entry` a cache entry this process cannot prune; return what the prune then logs,
    and the undo.

    Not root: its files folder is read-only, so the entry is moved aside but its files cannot
    be deleted. Root ignores modes, so the entry is made immutable (`chattr +i`: the kernel
    refuses to move or touch it) or, where the filesystem cannot, os.rename and os.utime of it
    fail as the kernel would."""
    if os.geteuid() != 0:
        (entry / "files").chmod(0o555)

        def undo() -> None:
            for folder in entry.parent.rglob("files"):
                folder.chmod(0o755)

        return f"pruned {entry.name} but cannot delete its files", undo
    needle = f"cannot prune {entry}"
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(entry)], capture_output=True).returncode == 0:
        return needle, lambda: subprocess.run([chattr, "-i", str(entry)], check=True)

    def deny(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(src: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(src) == entry:
                raise PermissionError(1, "Operation not permitted", str(src))
            return real(src, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "rename", deny(os.rename))
    monkeypatch.setattr(os, "utime", deny(os.utime))
    return needle, lambda: None


def test_an_entry_that_cannot_be_pruned_is_logged_and_skipped(cache_folder, monkeypatch, caplog):
    now = time.time()
    stuck = fake_entry(cache_folder, "m-1", now - 9000)
    gone = fake_entry(cache_folder, "m-2", now - 5000)
    keep = fake_entry(cache_folder, "m-3", now)
    logged, undo = unremovable(cache_folder / stuck, monkeypatch)
    try:
        pruned = artifacts.prune_mlflow_cache(cache_folder, keep=1, keep_entry=keep)
    finally:
        undo()
    assert gone in pruned and not (cache_folder / gone).exists()  # the next one still went
    assert (cache_folder / keep).is_dir()
    assert logged in caplog.text


@pytest.fixture
def keep_two() -> Iterator[None]:
    """RAY_ROLLOUT_ARTIFACT_CACHE_KEEP=2, read as a replica's process reads it (at import)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ROLLOUT_ARTIFACT_CACHE_KEEP", "2")
        importlib.reload(constants_module)
    try:
        yield
    finally:
        importlib.reload(constants_module)


def test_a_download_prunes_the_cache_to_the_bound_from_the_environment(registry, env, keep_two):
    assert constants_module.ARTIFACT_CACHE_KEEP == 2
    folder = env / "mlflow"
    folder.mkdir(parents=True)
    now = time.time()
    older = fake_entry(folder, "ranker-1", now - 9000)
    newer = fake_entry(folder, "ranker-2", now - 5000)
    staging = folder / ".ranker-3-0000000000000000.xyz"
    staging.mkdir()
    os.utime(staging, (now - 99_000, now - 99_000))
    directory = resolve_artifact(V1, Path("."))
    verify_artifact(directory, registry.digest[1])
    assert cache_entries(env) == sorted([staging.name, newer, directory.name])
    assert older not in cache_entries(env)


def test_the_bound_counts_the_version_just_loaded(registry, env):
    folder = env / "mlflow"
    folder.mkdir(parents=True)
    now = time.time()
    for i in range(constants_module.ARTIFACT_CACHE_KEEP + 2):  # the default bound, 8, exceeded
        fake_entry(folder, f"ranker-{i + 1}", now - 1000 * (i + 1))
    directory = resolve_artifact(V1, Path("."))
    entries = [n for n in cache_entries(env) if not n.startswith(".")]
    assert len(entries) == constants_module.ARTIFACT_CACHE_KEEP == 8
    assert directory.name in entries and f"ranker-1-{'0' * 16}" in entries
    assert f"ranker-8-{'0' * 16}" not in entries  # the oldest went


def test_a_prune_failure_does_not_fail_the_load(registry, env, monkeypatch, caplog):
    folder = env / "mlflow"
    folder.mkdir(parents=True)
    now = time.time()
    stuck = [fake_entry(folder, f"ranker-{i}", now - 1000 * i) for i in range(1, 9)]
    logged, undo = unremovable(folder / stuck[-1], monkeypatch)  # the oldest: pruned first
    try:
        directory = resolve_artifact(V1, Path("."))
        verify_artifact(directory, registry.digest[1])
    finally:
        undo()
    assert logged in caplog.text
    assert directory.name in cache_entries(env)


def test_a_cache_hit_marks_the_entry_used(registry, env):
    first = resolve_artifact(V1, Path("."))
    os.utime(first, (1, 1))
    again = resolve_artifact(V1, Path("."))
    assert again == first and first.stat().st_mtime > time.time() - 60
