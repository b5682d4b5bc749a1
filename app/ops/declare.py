"""Put a rollout plan file into a serve config: the declared state `serve deploy` applies.

`configs/rollouts/*.yaml` hold plans; the RolloutController reads its plan from its
`user_config` in serve_config.yaml. `rollout declare` copies one into the other (checked
first), so the plan that runs is always the one in the config under version control.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.config import CONTROLLER_DEPLOYMENT, format_validation_error, load_yaml
from app.errors import ConfigError

__all__ = ["declare_plan", "load_plan", "patch_version"]


def load_plan(path: Path) -> dict[str, Any] | None:
    """The plan in `path`, checked against the schema; ConfigError names the file and field."""
    from app.rollout import RolloutPlan

    raw = load_yaml(path)
    if raw is None:
        return None
    try:
        RolloutPlan.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
    return raw


def declare_plan(
    serve_config: dict[str, Any], plan: dict[str, Any] | None, *, app: str | None = None
) -> dict[str, Any]:
    """A copy of `serve_config` whose RolloutController (in `app`, or the only builder app)
    runs `plan` (None: no rollout)."""
    config = copy.deepcopy(serve_config)
    apps = [
        a for a in config.get("applications", []) if a.get("import_path") == "app.builder:build_app"
    ]
    if app is not None:
        apps = [a for a in apps if a.get("name") == app]
    if len(apps) != 1:
        names = [a.get("name") for a in config.get("applications", [])]
        raise ConfigError(f"name one app with --app (applications: {names})" if apps or app is None
                          else f"no builder application named {app!r} (applications: {names})")  # fmt: skip
    deployments = apps[0].setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == CONTROLLER_DEPLOYMENT), None)
    if entry is None:
        entry = {"name": CONTROLLER_DEPLOYMENT}
        deployments.append(entry)
    user_config = dict(entry.get("user_config") or {})
    user_config["plan"] = plan
    entry["user_config"] = user_config
    return config


def patch_version(
    serve_config: dict[str, Any], deployment: str, user_config: dict[str, Any]
) -> None:
    """Set version `deployment`'s (`<model>-<version>`) hot patch in `serve_config`, in place:
    in the version's own application (one application per version, serve_config.yaml), or in
    the builder app that runs it (serve_config.single-app.yaml)."""
    applications = serve_config.get("applications", [])
    owner = next(
        (a for a in applications
         if a.get("name") == deployment and a.get("import_path") == "app.builder:build_version"),
        None,
    ) or next(
        (a for a in applications if a.get("import_path") == "app.builder:build_app"), None
    )  # fmt: skip
    if owner is None:
        raise ConfigError(f"no application runs {deployment!r}")
    deployments = owner.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    entry["user_config"] = user_config
