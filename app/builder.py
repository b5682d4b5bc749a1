"""`import_path: app.builder:build_app` (and `:build_version`) in serve configs keeps working: the
builders live in `deployments/builder.py`, the Serve layer."""

from deployments.builder import build_app, build_version

__all__ = ["build_app", "build_version"]
