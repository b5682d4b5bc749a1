"""Model artifacts: where a version's files live, and proof that they are the declared ones.

A version's weights are checked against its declared sha256 before the replica serves: a
model that silently changed on disk is worse than one that fails loudly.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from app.errors import ArtifactError

__all__ = ["PACKAGE_PREFIX", "artifact_digests", "resolve_artifact", "verify_artifact"]

PACKAGE_PREFIX = "package:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx")


def resolve_artifact(artifact: str, base_dir: Path) -> Path:
    """The local directory for `artifact`: a path, or `package:<module>` (its get_model_path())."""
    if artifact.startswith(PACKAGE_PREFIX):
        module_name = artifact[len(PACKAGE_PREFIX) :]
        if not module_name.replace(".", "").replace("_", "").isalnum() or module_name.startswith(
            "."
        ):
            raise ArtifactError(f"artifact {artifact!r}: {module_name!r} is not a module name")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ArtifactError(
                f"artifact {artifact!r}: Python package {module_name!r} is not installed ({exc})"
            ) from exc
        getter = getattr(module, "get_model_path", None)
        if getter is None:
            raise ArtifactError(f"artifact {artifact!r}: {module_name} has no get_model_path()")
        path = Path(getter())
    else:
        path = Path(artifact).expanduser()
        if not path.is_absolute():
            path = base_dir / path
    if not path.is_dir():
        raise ArtifactError(f"artifact {artifact!r}: {path} is not a directory")
    return path.resolve()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def artifact_digests(directory: Path) -> dict[str, str]:
    """sha256 of every weights file under `directory`, keyed by path relative to it."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return {str(p.relative_to(directory)): _sha256_file(p) for p in files}


def verify_artifact(directory: Path, expected: str | dict[str, str]) -> dict[str, str]:
    """Check the weights in `directory` against `expected`; return the digests found.

    `expected` is one digest (the artifact must hold exactly one weights file) or a mapping
    from each weights file to its digest (every weights file must be listed).
    """
    found = artifact_digests(directory)
    if not found:
        raise ArtifactError(
            f"{directory}: no weights file ({', '.join(WEIGHT_SUFFIXES)}) to check against sha256"
        )
    if isinstance(expected, str):
        if len(found) != 1:
            raise ArtifactError(
                f"{directory}: holds {len(found)} weights files ({', '.join(found)}); "
                "declare sha256 as a mapping of file -> digest"
            )
        expected = {next(iter(found)): expected}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ArtifactError(f"{directory}: weights files declared in sha256 are missing: {missing}")
    unlisted = sorted(set(found) - set(expected))
    if unlisted:
        raise ArtifactError(f"{directory}: weights files not covered by sha256: {unlisted}")
    for name, digest in expected.items():
        if found[name] != digest:
            raise ArtifactError(
                f"{directory / name}: sha256 mismatch: expected {digest}, found {found[name]}"
            )
    return found
