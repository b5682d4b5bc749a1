"""Helpers the benchmarks share: progress lines on stderr, a free loopback port, the CPU count,
the argument parser every bench starts from."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from typing import Self

from tests.support.waiting import (
    free_port,  # one port picker for tests and benches (outside Ray's port ranges)
)

__all__ = [
    "Background",
    "bench_parser",
    "cpu_count",
    "emit",
    "free_port",
    "log",
    "machine",
    "shutdown",
]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(text: str, report: dict, as_json: bool) -> None:
    """A bench's results: its table for people (on stderr under --json), then with --json the
    report as one JSON line on stdout, for tools."""
    print(text, file=sys.stderr if as_json else sys.stdout, flush=True)
    if as_json:
        print(json.dumps(report), flush=True)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine() -> str:
    """The machine a bench ran on, for its report: OS, kernel, architecture, CPUs, Python."""
    return (f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_count()} CPUs, "
            f"python {platform.python_version()}")  # fmt: skip


def shutdown(*, serve_started: bool, ray_started: bool, tmp) -> None:
    """Stop only what a benchmark started: its Serve, its Ray, its temp dir."""
    log("shutting down Serve and Ray (only what this run started)")
    if serve_started:
        from ray import serve

        try:
            serve.shutdown()
        except Exception as exc:  # still stop Ray
            log(f"serve.shutdown failed: {exc!r}")
    if ray_started:
        import ray

        ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def bench_parser(
    module: str,
    doc: str | None,
    json_help: str = "only the JSON object on stdout (table on stderr)",
) -> argparse.ArgumentParser:
    """The parser every bench starts from: `python -m <module>`, the first line of the
    module's docstring as its description, and `--json`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=(doc or "").split("\n")[0]
    )
    parser.add_argument("--json", action="store_true", help=json_help)
    return parser


class Background:
    """`threads` daemon threads that each run `self._run(index)` until `stop` is set: `with`
    starts them, leaving sets `stop` and joins each for at most `join_timeout_s`. The benches'
    client loads and pollers; `lock` guards what they record."""

    join_timeout_s = 60.0

    def __init__(self, threads: int = 1) -> None:
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(threads)]  # fmt: skip

    def _run(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=self.join_timeout_s)
