"""The `rollout` command.

    rollout validate [serve_config.yaml] [--no-load]   check configs, load models, smoke-test
    rollout checksum DIR                               print the sha256 block for a model config

Rollout control (status, start, promote, pause, resume, abort, history) arrives with the
rollout controller; load tests and benchmarks with their own issues.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from app.artifacts import artifact_digests, resolve_artifact
from app.errors import ArtifactError

__all__ = ["main"]


def _validate(args: argparse.Namespace) -> int:
    from app.validate import validate_serve_config

    def progress(line: str) -> None:
        print(f"  {line}", file=sys.stderr, flush=True)

    report = validate_serve_config(Path(args.config), load_models=not args.no_load, progress=progress)
    for note in report.notes:
        print(f"ok: {note}")
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    if report.ok:
        print(f"{args.config}: valid")
        return 0
    print(f"{args.config}: {len(report.errors)} error(s)", file=sys.stderr)
    return 1


def _checksum(args: argparse.Namespace) -> int:
    try:
        directory = resolve_artifact(args.artifact, Path.cwd())
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    digests = artifact_digests(directory)
    if not digests:
        print(f"error: {directory}: no weights files found", file=sys.stderr)
        return 1
    value = next(iter(digests.values())) if len(digests) == 1 else digests
    print(yaml.safe_dump({"sha256": value}, sort_keys=True), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rollout", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check serve_config.yaml and model configs")
    validate.add_argument("config", nargs="?", default="serve_config.yaml")
    validate.add_argument(
        "--no-load", action="store_true", help="check configs only; skip loading the models"
    )
    validate.set_defaults(func=_validate)
    checksum = commands.add_parser("checksum", help="print the sha256 block for an artifact")
    checksum.add_argument("artifact", help="model directory, or package:<module>")
    checksum.set_defaults(func=_checksum)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
