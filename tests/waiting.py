"""Helpers shared by the Ray-backed tests and the benchmarks: a free loopback port, polling for
a condition instead of sleeping, and the real `serve deploy` CLI."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

__all__ = ["free_port", "serve_deploy", "wait_for_condition"]


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


def serve_deploy(config: dict[str, Any], tmp_path: Path, *, http_port: int,
                 dashboard_port: int) -> subprocess.CompletedProcess:  # fmt: skip
    """Run the real `serve deploy` CLI on `config` (written as YAML, HTTP on `http_port`)."""
    import yaml

    config = {**config, "http_options": {"host": "127.0.0.1", "port": http_port}}
    path = tmp_path / f"serve_config_{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    serve = Path(sys.executable).parent / "serve"
    result = subprocess.run(
        [str(serve), "deploy", "-a", f"http://127.0.0.1:{dashboard_port}", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, f"serve deploy failed:\n{result.stdout}\n{result.stderr}"
    return result
