"""Helpers shared by the Ray-backed tests and the benchmarks: a free loopback port, HAProxy's
files and ports for a throwaway cluster, polling for a condition instead of sleeping, and the
real `serve deploy` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "environ",
    "free_port",
    "handle_call",
    "serve_deploy",
    "serving_environ",
    "throwaway_serving",
    "wait_for_condition",
]

# A throwaway cluster's stopping Router replica keeps serving this long so HAProxy takes it out
# first (Serve's default is 30 s, which every Router redeploy and each shutdown would wait for;
# one HAProxy health-check round here is 0.25 s).
THROWAWAY_DRAIN_S = 2.0


# Ray's own processes (GCS, raylet, agents, workers' gRPC servers) bind port 0, i.e. take ports
# from the kernel's ephemeral range, and workers by default also take 10002-19999. A port picked
# there and released before `ray.init` can be taken by one of them before Serve's proxy binds it
# ("Failed to bind to address", seen once on a 16-core box). So pick between the two.
_LOWEST = 20_000
_handed_out: set[int] = set()
# Serve's direct ingress gives each ingress replica an HTTP port from this range
# (RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT): a port handed out from it could be taken by a
# Router replica before the test binds it.
_DIRECT_INGRESS_PORTS = (30_000, 31_000)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA range starts at 49152
        return 49_152


def free_port() -> int:
    """A loopback port that is free now and that a Ray cluster started next will not take for
    itself (outside the ephemeral range, Ray's worker ports and Serve's direct-ingress ports);
    never the same one twice in a process."""
    highest = _ephemeral_low() - 1
    candidates = random.Random().sample(
        range(_LOWEST, highest + 1), k=min(200, max(0, highest + 1 - _LOWEST))
    )
    for port in candidates:
        if port in _handed_out or _DIRECT_INGRESS_PORTS[0] <= port <= _DIRECT_INGRESS_PORTS[1]:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # no room below the ephemeral range: let the kernel choose
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throwaway_serving() -> tuple[Path, int, dict[str, str]]:
    """HAProxy mode (app/ops/serving_mode.py) for a throwaway cluster on this machine: (its own
    HAProxy folder, which the caller removes after the cluster stops; the port of Serve's Python
    fallback proxy; the environment to set before `ray.init`). Its own folder and free ports,
    so another cluster here (`make demo`, a bench beside the test suite) keeps its own; one
    HAProxy thread (2 cores), HAProxy's metrics exporter off, a short drain."""
    from app.ops.serving_mode import HaproxyPorts, serving_env

    # HAProxy caps socket paths at 97 characters: a short folder, not one under pytest's tmp.
    state = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))
    ports = HaproxyPorts(free_port(), free_port(), free_port(), free_port())
    env = serving_env(state, ports, haproxy_threads=1, haproxy_metrics=False,
                      drain_s=THROWAWAY_DRAIN_S)  # fmt: skip
    return state, ports.fallback_http, env


@contextlib.contextmanager
def environ(values: Mapping[str, str]) -> Iterator[None]:
    """`values` set in os.environ for the block, then os.environ as it was (keys that were not
    set are removed): for the processes a cluster this process starts inherits."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def serving_environ(switch: str) -> Iterator[dict[str, str]]:
    """HAProxy mode (`throwaway_serving`: files and ports of its own) in os.environ for a
    cluster this process starts in the block (`ray.cluster_utils.Cluster` nodes inherit it),
    unless the variable `switch` is `proxy` (Serve's Python proxy: nothing set). Yields what it
    set; os.environ is restored and the HAProxy folder removed after."""
    state, _, serving = throwaway_serving()
    if os.environ.get(switch, "haproxy") == "proxy":
        serving = {}
    try:
        with environ(serving):
            yield serving
    finally:
        shutil.rmtree(state, ignore_errors=True)


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
    raise AssertionError(
        f"timed out after {timeout_s}s waiting for {message}; last error: {last_error!r}"
    )


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


_handle_loop: asyncio.AbstractEventLoop | None = None
_handle_loop_lock = threading.Lock()
_handles: dict[tuple[str, str], Any] = {}  # (deployment, app) -> handle; touched on that loop only


def handle_call(deployment: str, app: str, method: str, *args: Any, timeout_s: float = 60) -> Any:
    """`serve.get_deployment_handle(deployment, app).<method>.remote(*args)`'s result, from a
    test or a bench's driver. The handle is made (once per deployment) and awaited on one event
    loop that runs in a background thread, because a blocking `.result()` outside a running
    loop is refused when Serve runs handles on the caller's loop
    (`RAY_SERVE_THROUGHPUT_OPTIMIZED=1`); this works with and without it."""
    global _handle_loop
    with _handle_loop_lock:
        if _handle_loop is None:
            _handle_loop = asyncio.new_event_loop()
            threading.Thread(
                target=_handle_loop.run_forever, name="serve-handle-calls", daemon=True
            ).start()

    async def call() -> Any:
        from ray import serve

        key = (deployment, app)
        handle = _handles.get(key)
        if handle is None:
            handle = _handles[key] = serve.get_deployment_handle(deployment, app_name=app)
        try:
            return await getattr(handle, method).remote(*args)
        except Exception:
            _handles.pop(
                key, None
            )  # e.g. the app was deleted and deployed again: a new handle next time
            raise

    return asyncio.run_coroutine_threadsafe(call(), _handle_loop).result(timeout=timeout_s)
