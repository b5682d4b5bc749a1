"""Helpers the benchmarks share: progress lines on stderr, a free loopback port, the CPU count."""

from __future__ import annotations

import os
import shutil
import sys
import time

from tests.support.waiting import (
    free_port,  # one port picker for tests and benches (outside Ray's port ranges)
)

__all__ = ["cpu_count", "free_port", "log", "shutdown"]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
