"""Finding things in a serve config document (a dict), whichever layout it uses."""

from __future__ import annotations

from typing import Any

BUILDER = "app.builder:build_app"
VERSION_BUILDER = "app.builder:build_version"


def router_app(config: dict[str, Any]) -> dict[str, Any]:
    """The model's router application (`app.builder:build_app`): the Router, the controller and,
    in serve_config.single-app.yaml, the versions."""
    (app,) = [a for a in config["applications"] if a.get("import_path") == BUILDER]
    return app


def version_app(config: dict[str, Any], name: str) -> dict[str, Any]:
    """A version's own application (`<model>-<version>`, app.builder:build_version)."""
    (app,) = [
        a for a in config["applications"]
        if a.get("import_path") == VERSION_BUILDER and a["name"] == name
    ]  # fmt: skip
    return app


def set_config_root(config: dict[str, Any], root: str) -> dict[str, Any]:
    """Resolve every application's relative config paths from `root`."""
    for app in config["applications"]:
        if app.get("import_path") in (BUILDER, VERSION_BUILDER):
            app.setdefault("args", {})["config_root"] = root
    return config
