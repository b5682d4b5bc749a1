"""The `rollout` command: argparse and commands (`main`), the admin API client, text rendering."""

from app.ops.cli.commands import main
from app.ops.cli.render import render_history, render_status

__all__ = ["main", "render_history", "render_status"]
