"""Reading configs from disk (YAML, model configs), error formatting, and config digests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from app.config.model import ModelConfig
from app.errors import ConfigError

Checked = TypeVar("Checked", bound=BaseModel)


def config_hash(user_config: Any) -> str:
    """A short digest of a deployment's raw `user_config`, as Serve stores and delivers it.

    A replica stamps its answers with the digest of the user_config it runs; the router reads
    the digest of the target user_config from Serve. The cache serves an answer only while the
    two agree, so no answer from before a hot patch outlives it."""
    text = json.dumps(user_config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def project_root() -> Path:
    """The checkout that holds `configs/` (the folder above this package)."""
    return Path(__file__).resolve().parents[2]


def format_validation_error(error: ValidationError, where: str) -> str:
    """One line per problem: `<where>: <dotted.field>: <message>`."""
    lines = []
    for item in error.errors():
        loc = ".".join(str(part) for part in item["loc"]) or "(root)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {loc}: {message}")
    return "\n".join(lines)


def load_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_checked(
    path: Path | str,
    model: type[Checked],
    shape: str,
    *,
    error: type[ConfigError] = ConfigError,
    extra: dict[str, Any] | None = None,
) -> Checked:
    """The YAML file at `path` as `model` (with `extra` fields added): `error` naming the file
    when it cannot be read, is not YAML, is not a mapping (`shape` says what it must be), or
    fails the schema (naming the field)."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise error(f"{path}: must be {shape}, got {type(data).__name__}")
    try:
        return model.model_validate({**data, **(extra or {})})
    except ValidationError as exc:
        raise error(format_validation_error(exc, str(path))) from None


def load_model_config(path: Path | str) -> ModelConfig:
    return load_checked(path, ModelConfig, "a mapping of fields", extra={"source": str(path)})
