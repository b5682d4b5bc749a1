"""How the app is served: Ray Serve's direct ingress with HAProxy in front.

Under `RAY_SERVE_ENABLE_HA_PROXY=1` (which turns on `RAY_SERVE_ENABLE_DIRECT_INGRESS` too) each
Router replica runs its own HTTP server (uvicorn inside the replica, a port from 30000-31000),
and HAProxy, started by Serve on every node, listens on the usual HTTP port (`http_options.port`,
8000) and balances over the Router replicas (`leastconn`). Clients keep calling :8000; the
request path is client -> HAProxy -> Router (in-process HTTP) -> model replica (gRPC), with no
Python proxy and no extra Ray actor calls per request. Serve keeps a Python "fallback" proxy on
the head (port 8500) for applications that have no running ingress replica yet.

Every variable Serve reads for this is set on the Ray nodes, before `ray start` (the cluster
files, the KubeRay manifest, `make demo`, the test clusters): `serving_env()` is the one place
that lists them. The defaults suit one cluster per machine. Two clusters on one machine (the
demo beside the regions demo, the test suites) need their own HAProxy files and ports:
`serving_env(state_dir, ports)` moves all of them (`rollout serving-env` prints them as
`export` lines for a shell).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["HAPROXY_FLAG", "HAPROXY_RETRY_ON", "HaproxyPorts", "serving_env", "shell_exports"]

HAPROXY_FLAG = "RAY_SERVE_ENABLE_HA_PROXY"
# What HAProxy re-sends, to another Router replica (`option redispatch 1`, up to `retries`, 3):
# besides a refused connection (Serve's default, `conn-failure`), a request whose Router closed
# the connection without any answer (`empty-response`): a Router replica that died, or a reused
# keep-alive connection to it (HAProxy's backends `http-reuse always`). With Serve's default a
# client of a killed Router saw "server disconnected" for every request in flight on it and for
# some sent just after (bench.chaos, docs/benchmarks.md). A re-sent request may run twice where
# the Router died after passing it on: inference and feedback (counted once per request id)
# are safe to repeat; admin commands carry an `Idempotency-Key` (the `rollout` CLI sends one), so
# the controller applies a repeat once. HAProxy re-sends only a request that fits its buffer whole
# (headers and body under about 15 KiB with the default tune.bufsize).
HAPROXY_RETRY_ON = "conn-failure empty-response"
# HAProxy refuses a unix socket path over 97 characters, and Serve puts each node's sockets in
# a folder named by the node id (56 hex characters) under the state directory:
# <state_dir>/<node id>/admin.sock.
MAX_SOCKET_PATH = 97
NODE_FOLDER_AND_SOCKET = len("/") + 56 + len("/metrics.sock")


@dataclass(frozen=True)
class HaproxyPorts:
    """The node-local ports Serve's HAProxy mode opens besides `http_options.port` (Serve's
    defaults: fallback proxy 8500 HTTP and 9500 gRPC, HAProxy stats 8404, HAProxy metrics 9101)."""

    fallback_http: int = 8500
    fallback_grpc: int = 9500
    stats: int = 8404
    metrics: int = 9101

    def __post_init__(self) -> None:
        ports = (self.fallback_http, self.fallback_grpc, self.stats, self.metrics)
        for name, port in zip(("fallback_http", "fallback_grpc", "stats", "metrics"), ports):
            if not 1 <= port <= 65535:
                raise ValueError(f"{name} port {port} is not between 1 and 65535")
        if len(set(ports)) != len(ports):
            raise ValueError(f"HAProxy ports must differ: {ports}")


def serving_env(
    state_dir: Path | str | None = None,
    ports: HaproxyPorts | None = None,
    *,
    haproxy_threads: int | None = None,
    haproxy_metrics: bool = True,
    drain_s: float | None = None,
) -> dict[str, str]:
    """The environment for every Ray node of a cluster served by HAProxy + direct ingress.

    `state_dir`: where this cluster's HAProxy keeps its config, admin socket and server state
    (Serve's default, /tmp/haproxy-serve, is shared by every cluster on the machine: two clusters
    would rewrite each other's config). `ports`: the node-local ports besides the HTTP port.
    `haproxy_threads`: HAProxy's nbthread (Serve's default 4; 1 on a 2-core box). `drain_s`: how
    long a stopping Router replica keeps serving so HAProxy can take it out of rotation first
    (Serve's default 30 s; throwaway test clusters shorten it because every redeploy of the
    Router waits for it). Always: `RAY_SERVE_HAPROXY_RETRY_ON` (HAPROXY_RETRY_ON, above)."""
    env = {HAPROXY_FLAG: "1", "RAY_SERVE_HAPROXY_RETRY_ON": HAPROXY_RETRY_ON}
    if state_dir is not None:
        base = Path(state_dir).resolve()
        if len(str(base)) + NODE_FOLDER_AND_SOCKET > MAX_SOCKET_PATH:
            raise ValueError(
                f"HAProxy state directory {str(base)!r} is too long: HAProxy's sockets go in "
                f"<state_dir>/<56-character node id>/, and a socket path may have at most "
                f"{MAX_SOCKET_PATH} characters, so state_dir may have at most "
                f"{MAX_SOCKET_PATH - NODE_FOLDER_AND_SOCKET} (e.g. /tmp/rh-<random>)"
            )
        env |= {
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
        }
    if ports is not None:
        env |= {
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(ports.fallback_http),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(ports.fallback_grpc),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(ports.stats),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports.metrics),
        }
    if haproxy_threads is not None:
        if haproxy_threads < 1:
            raise ValueError(f"haproxy_threads must be at least 1, not {haproxy_threads}")
        env["RAY_SERVE_HAPROXY_NBTHREAD"] = str(haproxy_threads)
    if not haproxy_metrics:
        env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] = "0"
    if drain_s is not None:
        if drain_s < 0:
            raise ValueError(f"drain_s must not be negative, not {drain_s}")
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = f"{drain_s:g}"
    return env


def shell_exports(env: Mapping[str, str]) -> str:
    """`export KEY=VALUE` lines a shell can `eval` (values single-quoted)."""
    lines = []
    for key, value in sorted(env.items()):
        quoted = "'" + value.replace("'", "'\"'\"'") + "'"
        lines.append(f"export {key}={quoted}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m app.ops.serving_mode [--state-dir D] [ports]`: print `serving_env` as `export`
    lines, for a shell to `eval` before `ray start` (scripts/demo.sh does)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m app.ops.serving_mode", description=main.__doc__
    )
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="this cluster's HAProxy files (default: Serve's /tmp/haproxy-serve)")  # fmt: skip
    defaults = HaproxyPorts()
    for name in ("fallback_http", "fallback_grpc", "stats", "metrics"):
        parser.add_argument(f"--{name.replace('_', '-')}-port", dest=name, type=int,
                            default=getattr(defaults, name), metavar="PORT")  # fmt: skip
    parser.add_argument("--haproxy-threads", type=int, default=None, metavar="N")
    args = parser.parse_args(argv)
    try:
        ports = HaproxyPorts(args.fallback_http, args.fallback_grpc, args.stats, args.metrics)
        env = serving_env(args.state_dir, ports, haproxy_threads=args.haproxy_threads)
    except ValueError as exc:
        parser.error(str(exc))
    print(shell_exports(env), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
