"""Model artifacts: where a version's files live, and proof that they are the declared ones.

A version's weights are checked against its declared sha256 before the replica serves: a
model that silently changed on disk is worse than one that fails loudly.

Three sources, all ending as a local directory: a path, `package:<module>` (a package that ships
its model), and `mlflow:models:/<name>/<version>[/<sub-path>]` (a model registry version,
downloaded once per node into a cache that keeps the ARTIFACT_CACHE_KEEP most recently loaded
versions; see docs/configuration.md#artifact-sources).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from app import constants
from app.errors import ArtifactError

__all__ = [
    "ARTIFACT_CACHE_ENV",
    "MLFLOW_PREFIX",
    "PACKAGE_PREFIX",
    "RegistryVersion",
    "artifact_digests",
    "mlflow_cache_dir",
    "parse_mlflow_artifact",
    "prune_mlflow_cache",
    "resolve_artifact",
    "verify_artifact",
]

PACKAGE_PREFIX = "package:"
MLFLOW_PREFIX = "mlflow:"
# Where registry downloads are kept on each node (default: $XDG_CACHE_HOME or ~/.cache, then
# ray-rollout/); one directory per registry + model + version, shared by the node's replicas.
ARTIFACT_CACHE_ENV = "RAY_ROLLOUT_ARTIFACT_CACHE"
# Moving names: what they point to changes without the rollout's config changing.
_MLFLOW_STAGES = {"latest", "none", "staging", "production", "archived"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx")
# A cache entry's folder name (mlflow_cache_dir): anything else in the cache folder (staging
# folders, which start with ".", the lock file, an operator's files) is never pruned.
_CACHE_ENTRY = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,63})?-[1-9][0-9]{0,9}-[0-9a-f]{16}")

logger = logging.getLogger("ray.serve")


def resolve_artifact(artifact: str, base_dir: Path) -> Path:
    """The local directory for `artifact`: a path, `package:<module>` (its get_model_path()), or
    `mlflow:models:/<name>/<version>[/<sub-path>]` (downloaded into the node's cache)."""
    if artifact.startswith(MLFLOW_PREFIX):
        path = _resolve_mlflow(artifact)
    elif artifact.startswith(PACKAGE_PREFIX):
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


@dataclass(frozen=True)
class RegistryVersion:
    """`mlflow:models:/<name>/<version>[/<sub-path>]`, parsed."""

    name: str
    version: int
    sub_path: tuple[str, ...] = ()


def parse_mlflow_artifact(artifact: str) -> RegistryVersion:
    """Parse an `mlflow:` artifact; refuse aliases and stages, which are mutable.

    A rollout's config must say which weights it serves: `@champion` or `Production` would
    change under a running version (and under its sha256) when someone moves them.
    """
    uri = artifact[len(MLFLOW_PREFIX) :]
    form = "mlflow:models:/<name>/<version>[/<sub-path>]"
    if not uri.startswith("models:/"):
        raise ArtifactError(f"artifact {artifact!r}: expected {form}")
    name, _, rest = uri[len("models:/") :].partition("/")
    if "@" in name:
        raise ArtifactError(
            f"artifact {artifact!r}: {name!r} names an alias, which moves when someone reassigns "
            f"it; name an immutable version number instead ({form})"
        )
    version, _, sub_path = rest.partition("/")
    if not name or not version:
        raise ArtifactError(f"artifact {artifact!r}: expected {form}")
    if version.lower() in _MLFLOW_STAGES:
        raise ArtifactError(
            f"artifact {artifact!r}: {version!r} is a stage, which moves when someone "
            f"transitions another version; name an immutable version number instead ({form})"
        )
    if not re.fullmatch(r"[1-9][0-9]{0,9}", version):
        raise ArtifactError(
            f"artifact {artifact!r}: version {version!r} is not a version number ({form})"
        )
    parts = tuple(sub_path.split("/")) if sub_path else ()
    if any(part in ("", ".", "..") for part in parts):
        raise ArtifactError(
            f"artifact {artifact!r}: sub-path {sub_path!r} must be a relative path inside the "
            "model version (no empty, '.' or '..' parts)"
        )
    return RegistryVersion(name, int(version), parts)


def _registry_uris(artifact: str) -> tuple[str, str]:
    """(tracking URI, registry URI), from the environment as MLflow reads them."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    registry = os.environ.get("MLFLOW_REGISTRY_URI", "") or tracking
    if not registry:
        # MLflow would fall back to a fresh local store in the working directory: an empty
        # registry on every node, which hides a missing setting behind "version not found".
        raise ArtifactError(
            f"artifact {artifact!r}: no model registry configured: set MLFLOW_TRACKING_URI "
            "(or MLFLOW_REGISTRY_URI) in the application's runtime_env env_vars"
        )
    return tracking or registry, registry


def _redact(uri: str) -> str:
    """`uri` without a password, for messages (a database or server URI may hold one)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def mlflow_cache_dir(registry_uri: str, version: RegistryVersion) -> Path:
    """The node-local copy of a registry version: keyed by registry, name and version."""
    root = os.environ.get(ARTIFACT_CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "ray-rollout"
    )
    key = hashlib.sha256(f"{registry_uri}\n{version.name}\n{version.version}".encode())
    # Readable for an operator pruning the cache; a leading "." is left to staging folders.
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", version.name).lstrip(".")[:64]
    folder = f"{readable}-{version.version}-{key.hexdigest()[:16]}"
    return Path(root).expanduser() / "mlflow" / folder


def _resolve_mlflow(artifact: str) -> Path:
    version = parse_mlflow_artifact(artifact)
    tracking_uri, registry_uri = _registry_uris(artifact)
    cached = mlflow_cache_dir(registry_uri, version)
    # A registry version is immutable, so a complete copy is reused without asking the
    # registry (replicas start while it is down); the sha256 check still runs on every load.
    # Shared lock: a prune (exclusive) never moves away a copy between this check and its touch.
    with _cache_lock(cached.parent, exclusive=False):
        hit = cached.is_dir()
        if hit:
            _mark_used(cached)
    if not hit:
        _download_mlflow(artifact, version, tracking_uri, registry_uri, cached)
        prune_mlflow_cache(cached.parent, constants.ARTIFACT_CACHE_KEEP, keep_entry=cached.name)
    return cached.joinpath(*version.sub_path)


def _mark_used(entry: Path) -> None:
    """Record a load of a cache entry: its folder's mtime is its last use, which orders pruning.
    A cache the replica cannot write (read-only, another owner's) still serves its copies."""
    try:
        os.utime(entry)
    except OSError as exc:
        logger.warning(
            "artifact cache: cannot mark %s as used (%s); it may be pruned early", entry, exc
        )


@contextlib.contextmanager
def _cache_lock(folder: Path, *, exclusive: bool) -> Iterator[None]:
    """flock on `folder/.lock`: loads share it, a prune holds it alone. Without the folder or
    the right to create the lock file (a read-only cache, which is never pruned either), no lock."""
    try:
        fd = os.open(folder / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def prune_mlflow_cache(folder: Path, keep: int, keep_entry: str) -> list[str]:
    """Delete the least recently used registry copies in `folder` beyond `keep`; return their names.

    `keep_entry` (the copy just resolved) always stays and counts towards `keep`. Only folders
    named like a cache entry are candidates: staging folders (another replica's download in
    progress), the lock file and anything else an operator put there are left alone. A doomed
    entry is first renamed to a "."-prefixed folder under the exclusive lock, so a replica
    sees a whole copy or none (and downloads it again), never one being deleted. A failure
    (a copy this process may not move or delete) is logged and skipped: pruning never fails a
    load.
    """
    doomed: list[tuple[str, Path]] = []
    try:
        with _cache_lock(folder, exclusive=True):
            entries: list[tuple[int, str]] = []
            for child in os.scandir(folder):
                if child.name == keep_entry or not _CACHE_ENTRY.fullmatch(child.name):
                    continue
                try:
                    if child.is_dir(follow_symlinks=False):
                        entries.append((child.stat(follow_symlinks=False).st_mtime_ns, child.name))
                except OSError:
                    continue  # pruned by another process meanwhile
            entries.sort(reverse=True)  # most recently used first
            for _, name in entries[max(keep - 1, 0) :]:
                holder = None
                try:
                    holder = Path(tempfile.mkdtemp(prefix=f".{name}.prune-", dir=folder))
                    os.rename(folder / name, holder)  # onto the empty holder: atomic
                except OSError as exc:
                    logger.warning("artifact cache: cannot prune %s (%s)", folder / name, exc)
                    if holder is not None:
                        with contextlib.suppress(OSError):
                            holder.rmdir()
                    continue
                doomed.append((name, holder))
    except OSError as exc:
        logger.warning("artifact cache: cannot prune %s (%s)", folder, exc)
    pruned = []
    for name, holder in doomed:
        try:
            shutil.rmtree(holder)
        except OSError as exc:
            logger.warning(
                "artifact cache: pruned %s but cannot delete its files in %s (%s)",
                name,
                holder,
                exc,
            )
        pruned.append(name)
    if pruned:
        logger.info("artifact cache: pruned %s (keeping %d in %s)", ", ".join(pruned), keep, folder)
    return pruned


def _download_mlflow(
    artifact: str, version: RegistryVersion, tracking_uri: str, registry_uri: str, target: Path
) -> None:
    """Download a registry version into `target`, atomically: a staging directory beside it
    is renamed into place, so the replicas of a node never see a half-written copy."""
    # A serving replica should not report usage to MLflow; an operator may still opt in.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow.artifacts
        from mlflow import MlflowClient
    except ImportError as exc:
        raise ArtifactError(
            f"artifact {artifact!r}: MLflow is not installed on this node "
            f"(pip install 'ray-rollout[mlflow]'): {exc}"
        ) from None
    where = f"registry {_redact(registry_uri)}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise ArtifactError(
            f"artifact {artifact!r}: cannot write the artifact cache {target.parent} ({exc}); "
            f"set {ARTIFACT_CACHE_ENV} to a writable folder"
        ) from None
    try:
        try:
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
            found = client.get_model_version(version.name, str(version.version))
            if found.status != "READY":
                raise ArtifactError(
                    f"artifact {artifact!r}: version {version.version} of {version.name!r} in "
                    f"{where} is {found.status}, not READY"
                )
            uri = client.get_model_version_download_uri(version.name, str(version.version))
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(staging / "files"), tracking_uri=tracking_uri
            )
        except ArtifactError:
            raise
        except Exception as exc:  # the registry's own errors: not found, unreachable, denied
            raise ArtifactError(
                f"artifact {artifact!r}: cannot get version {version.version} of "
                f"{version.name!r} from {where}: {_one_line(exc, registry_uri)}"
            ) from None
        try:
            os.utime(local)  # its last use is now, not when its last file was written
            os.rename(local, target)
        except OSError as exc:
            if not target.is_dir():  # not another replica that won the race: a real failure
                raise ArtifactError(
                    f"artifact {artifact!r}: cannot move the download into {target} ({exc})"
                ) from None
            _mark_used(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _one_line(exc: Exception, registry_uri: str) -> str:
    """`exc` in one bounded line without the registry's password: registry errors can carry
    whole responses, tracebacks, and the URL they called."""
    lines = str(exc).strip().splitlines()
    line = lines[0][:300] if lines else ""
    password = urlsplit(registry_uri).password
    if password:
        line = line.replace(password, "***")
    return f"{type(exc).__name__}: {line}"


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
