"""`rollout capture export | import | stats`: a model's traffic sample (app/serving/capture.py).

    rollout capture export --dir D --model M [--limit N] [--out FILE|-]   one JSONL file
    rollout capture import --dir D --model M [--version V] FILE           add a dataset
    rollout capture stats  --dir D --model M [--json]                     what the sample holds

`import` checks every line before it writes anything: each line is a capture record
(`{"model","version","captured_at","request"}`) or a bare V2 infer request body (then `--version`
names the version it stands for, and `captured_at` is the import time). A bad line rejects the
whole file, with its line number and the field. Accepted lines are written as one new file of
the sample, in the capturer's own format and naming, so a replayer reads them like captured ones.

Exit status: 0 done; 1 the file was rejected (a bad line); 2 a file or directory could not be
read or written, or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

from app.config._base import NAME_PATTERN
from app.serving.capture import (
    CaptureRecord,
    CaptureSettings,
    RecordError,
    SampleStats,
    check_request_document,
    iter_sample,
    model_directory,
    parse_line,
    parse_record,
    redact_request,
    write_sample,
)

__all__ = ["add_capture_commands", "read_import"]

NAME = re.compile(NAME_PATTERN)
PROGRESS_EVERY = 10_000  # lines between progress notes on stderr
DEFAULT_MAX_LINE_BYTES = CaptureSettings().max_record_bytes


class ImportRejected(ValueError):
    """A line of an import file is not a record or a V2 request; the message names line and field."""


def _progress(what: str, count: int) -> None:
    print(f"  {what}: {count} ...", file=sys.stderr, flush=True)


def _record_of(value: Any, *, model: str, version: str | None, now: float) -> CaptureRecord:
    """A line's value as a record of `model`: a record is checked as is; a bare request body
    becomes one (version from --version, captured now). RecordError names the field."""
    if isinstance(value, dict) and "request" in value:
        record = parse_record(value)
        if record.model != model:
            raise RecordError(f"model is {record.model!r}, but --model is {model!r}")
        return replace(record, request=redact_request(record.request))
    if version is None:
        raise RecordError(
            "a bare V2 request (no 'request' field): give --version to say which version "
            "it stands for"
        )
    try:
        request = check_request_document(value)
    except RecordError as exc:
        raise RecordError(f"request: {exc}") from None
    # Stored as the capturer stores a body: without the client's id, model_name, model_version.
    return parse_record(
        {"model": model, "version": version, "captured_at": round(now, 3),
         "request": redact_request(request)}
    )  # fmt: skip


def read_import(
    source: BinaryIO,
    *,
    model: str,
    version: str | None,
    now: float,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    name: str = "input",
    progress: bool = False,
) -> Iterator[CaptureRecord]:
    """The records of an import file, each line checked; ImportRejected at the first bad line
    (blank lines are skipped)."""
    for number, line in enumerate(source, start=1):
        if progress and number % PROGRESS_EVERY == 0:
            _progress(f"{name}: lines checked", number)
        if len(line) > max_line_bytes + 1:  # + its newline
            raise ImportRejected(
                f"{name} line {number}: {len(line)} bytes; a record may have at most "
                f"{max_line_bytes} (--max-record-bytes)"
            )
        if not line.strip():
            continue
        try:
            yield _record_of(parse_line(line), model=model, version=version, now=now)
        except RecordError as exc:
            raise ImportRejected(f"{name} line {number}: {exc}") from None


def _model_arg(args: argparse.Namespace) -> Path:
    return model_directory(args.dir, args.model)


def _export(args: argparse.Namespace) -> int:
    _model_arg(args)
    stats = SampleStats()
    to_stdout = args.out == "-"
    target = None if to_stdout else Path(args.out)
    tmp = None if target is None else target.with_name(f".{target.name}.tmp")
    out: BinaryIO = sys.stdout.buffer if tmp is None else open(tmp, "wb")
    try:
        for record in iter_sample(args.dir, args.model, limit=args.limit, stats=stats):
            out.write(record.to_line())
            if stats.records % PROGRESS_EVERY == 0:
                _progress("records exported", stats.records)
        out.flush()
        if tmp is not None and target is not None:
            out.close()
            os.replace(tmp, target)
    finally:
        if tmp is not None:
            out.close()
            tmp.unlink(missing_ok=True)
    where = "stdout" if target is None else str(target)
    print(
        f"{where}: {stats.records} records of {args.model} from {stats.files} file(s)"
        + (f"; skipped {stats.corrupt} corrupt line(s) ({stats.first_error})" if stats.corrupt else ""),
        file=sys.stderr,
    )  # fmt: skip
    return 0


def _import(args: argparse.Namespace) -> int:
    _model_arg(args)
    if args.version is not None and not NAME.fullmatch(args.version):
        print(f"error: --version {args.version!r} is not a version name", file=sys.stderr)
        return 2
    path = Path(args.file)
    now = time.time()

    def records(progress: bool) -> Iterator[CaptureRecord]:
        with open(path, "rb") as source:
            yield from read_import(
                source, model=args.model, version=args.version, now=now,
                max_line_bytes=args.max_record_bytes, name=str(path), progress=progress,
            )  # fmt: skip

    try:
        count = sum(1 for _ in records(progress=True))  # check everything before writing
    except ImportRejected as exc:
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 1
    if count == 0:
        print(f"error: {path}: no records; nothing was written", file=sys.stderr)
        return 1
    try:
        written, n = write_sample(args.dir, args.model, records(progress=False))
    except ImportRejected as exc:  # the file changed between the two passes
        print(f"error: {exc}; nothing was written", file=sys.stderr)
        return 1
    print(f"{written}: imported {n} records of {args.model}", file=sys.stderr)
    return 0


def _stats(args: argparse.Namespace) -> int:
    _model_arg(args)
    stats = SampleStats()
    for count, _ in enumerate(iter_sample(args.dir, args.model, stats=stats), start=1):
        if count % PROGRESS_EVERY == 0:
            _progress("records read", count)
    if args.json:
        print(json.dumps({"model": args.model, **stats.to_json()}, indent=2))
        return 0

    def when(at: float | None) -> str:
        return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))

    versions = ", ".join(f"{v}: {n}" for v, n in sorted(stats.versions.items())) or "-"
    print(f"model:    {args.model}  ({model_directory(args.dir, args.model)})")
    print(f"records:  {stats.records} in {stats.files} file(s), {stats.bytes} bytes")
    print(f"versions: {versions}")
    print(f"captured: {when(stats.first_at)} .. {when(stats.last_at)}")
    print(f"corrupt:  {stats.corrupt} line(s) skipped"
          + (f" (first: {stats.first_error})" if stats.first_error else ""))  # fmt: skip
    return 0


def _guard(action: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(action(args))
        except ValueError as exc:  # a model name that is not a name
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_capture_commands(commands: argparse._SubParsersAction) -> None:
    """Register `rollout capture ...` on the `rollout` command's subparsers."""
    capture = commands.add_parser(
        "capture", help="export, import or summarise a model's captured traffic sample",
        description=__doc__.split("\n\n")[0],
    )  # fmt: skip
    actions = capture.add_subparsers(dest="capture_action", required=True)

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--dir", required=True, help="the capture directory (router.capture.directory)"
        )
        parser.add_argument("--model", required=True, help="the model whose sample it is")  # fmt: skip

    export = actions.add_parser("export", help="write the sample as one JSONL file")
    common(export)
    export.add_argument("--limit", type=_positive_int, default=None, help="at most N records")
    export.add_argument("--out", default="-", help="file to write (default -: stdout)")
    export.set_defaults(func=_guard(_export))

    imp = actions.add_parser(
        "import", help="check a JSONL dataset and add it to the sample (all or nothing)"
    )
    common(imp)
    imp.add_argument("file", help="JSONL: capture records, or bare V2 infer request bodies")
    imp.add_argument(
        "--version", default=None,
        help="the version bare requests stand for (records name their own)",
    )  # fmt: skip
    imp.add_argument(
        "--max-record-bytes", type=_positive_int, default=DEFAULT_MAX_LINE_BYTES,
        help=f"longest line accepted (default {DEFAULT_MAX_LINE_BYTES}, as the capturer's)",
    )  # fmt: skip
    imp.set_defaults(func=_guard(_import))

    stats = actions.add_parser("stats", help="records, versions, time range, corrupt lines")
    common(stats)
    stats.add_argument("--json", action="store_true", help="print the figures as JSON")
    stats.set_defaults(func=_guard(_stats))
