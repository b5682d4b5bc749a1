"""Helpers shared by the Ray-backed tests and the benchmarks: a free loopback port, and polling
for a condition instead of sleeping."""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

__all__ = ["free_port", "wait_for_condition"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_condition(predicate: Callable[[], Any], timeout_s: float = 60, interval_s: float = 0.2,
                       message: str = "condition") -> Any:  # fmt: skip
    """Poll `predicate` until it returns a truthy value; fail with `message` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last error if we time out
            last_error = exc
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message}; last error: {last_error!r}")
