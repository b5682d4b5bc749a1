"""A Ray head whose GCS keeps its tables in Redis (GCS fault tolerance), as cluster/*.yaml and
cluster/kuberay/rayservice.yaml start it in production, with a redis-server of the test's own.

Runs in its own pytest process (`make test` starts one): the integration suite's session
fixture calls `ray.init` for a cluster of its own, and one process can join only one cluster.
The redis-server (Debian package `redis-server`; .ci/run installs it) listens on a free
loopback port with a password, keeps nothing on disk, and is killed with the cluster, also when
a test fails. `HEADLOSS_WITHOUT_REDIS=1` starts the head without it (GCS tables in memory
only), the control that shows what the test catches.

The head's own processes get the first CPU and Ray's workers (replicas, proxies) the others
(`CpuSplit`), as on a production cluster, whose head runs no replica (`CPU: 0` in cluster/*.yaml
and the RayService). While the GCS is down, the dashboard's head modules and a driver spin on
their reconnect loops (30-70% of a core each, measured with top); on one 2-core machine shared
by everything, that starved the replicas (which Ray starts at nice 15) and requests took 2-3 s.
`HEADLOSS_SHARED_CPUS=1` leaves every process on every CPU, the control that shows it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.waiting import (
    environ,
    free_port,
    serve_deploy,
    serving_environ,
    wait_for_condition,
)

# A throwaway cluster of the test's own: token auth off (real clusters keep it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

NODE_CPUS = 4
REDIS_PASSWORD = "headloss-redis-password-0123456789"
STORAGE_NAMESPACE = "ray-rollout-headloss"


class Redis:
    """A redis-server process on 127.0.0.1:`port`, in `directory`."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("tests/headloss needs redis-server (Debian: apt-get install redis-server)")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = directory / "redis.log"
        # No persistence: Redis is the GCS's store here, and the test never restarts Redis.
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
             "--save", "", "--appendonly", "no", "--requirepass", REDIS_PASSWORD,
             "--logfile", str(self.log)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for_condition(self.ping, timeout_s=20, message="redis-server to answer PING")

    def ping(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server exited: {self.log.read_text()[-2000:]}")
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), "--no-auth-warning", "-a", REDIS_PASSWORD, "PING"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return result.stdout.strip() == "PONG"

    def keys(self) -> int:
        """How many keys Redis holds (the GCS's tables live under the storage namespace)."""
        result = subprocess.run(
            ["redis-cli", "-p", str(self.port), "--no-auth-warning", "-a", REDIS_PASSWORD, "DBSIZE"],
            capture_output=True, text=True, timeout=5,
        )  # fmt: skip
        return int(result.stdout.strip() or 0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class CpuSplit:
    """Pins the processes this test started (its descendants, and itself) as a cluster's
    machines would split them: the head's processes (GCS, raylet, dashboard and its agents,
    Redis, the Serve controller, this driver and its clients) on the first CPU, Ray's workers
    (replicas, proxies, HAProxy, idle workers) on the others. A thread repeats it every `interval_s`,
    since Ray starts workers and threads at any time; every thread of a process is pinned."""

    HEAD_ACTORS = ("ServeController", "DashboardAgent", "RuntimeEnvAgent")

    def __init__(self, interval_s: float = 0.5) -> None:
        # Linux only (sched_setaffinity); as PID 1 (a container's init) every orphan in the
        # container would count as a descendant: neither splits.
        linux = hasattr(os, "sched_getaffinity") and os.getpid() != 1
        self.original = os.sched_getaffinity(0) if linux else set()
        cpus = sorted(self.original)
        self.head_cpus, self.worker_cpus = set(cpus[:1]), set(cpus[1:])
        self.interval_s = interval_s
        self.stop = threading.Event()
        self.pinned: dict[str, int] = {"head": 0, "worker": 0}  # processes, last pass
        self.thread = threading.Thread(target=self._run, name="cpu-split", daemon=True)

    @property
    def possible(self) -> bool:
        return bool(self.worker_cpus)

    def __enter__(self) -> CpuSplit:
        if self.possible:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)
            # This process (the test's driver) gets every CPU back for the teardown.
            self._pin(os.getpid(), self.original)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.pin_once()
            except Exception:  # never end the thread quietly: say why, and try again
                logging.getLogger(__name__).exception("CpuSplit: pinning failed")
            self.stop.wait(self.interval_s)

    @staticmethod
    def _pin(pid: int, cpus: set[int]) -> bool:
        """Every thread of `pid` on `cpus`; False if the process is gone."""
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return False
        for tid in tasks:
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:  # the thread ended meanwhile
                pass
        return True

    def pin_once(self) -> None:
        parents: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces
                    stat = Path(entry.path, "stat").read_text()
                    parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue  # exited meanwhile
        root = os.getpid()
        ours, frontier = {root}, [root]
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in ours:
                    ours.add(child)
                    frontier.append(child)
        counts = {"head": 0, "worker": 0}
        for pid in ours:
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            except (OSError, UnicodeDecodeError):
                continue
            # HAProxy (Serve runs one per node, in front of the replicas) serves with them.
            worker = (command.startswith("ray::") or Path(command).name == "haproxy") and not any(
                name in command for name in self.HEAD_ACTORS
            )
            if self._pin(pid, self.worker_cpus if worker else self.head_cpus):
                counts["worker" if worker else "head"] += 1
        self.pinned = counts


class HeadLoss:
    """The cluster (`ray.cluster_utils.Cluster`, one head node), its ports and its Redis."""

    def __init__(
        self, cluster: Any, redis: Redis, http_port: int, dashboard_port: int, split: CpuSplit
    ) -> None:
        self.cluster = cluster
        self.split = split
        self.redis = redis
        self.http_port = http_port
        self.dashboard_port = dashboard_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.gcs_down = False

    @property
    def head(self) -> Any:
        return self.cluster.head_node

    def kill_gcs(self) -> float:
        """Kill the GCS server process (SIGKILL, as a crashed head process); the time it died."""
        self.gcs_down = True
        self.head.kill_gcs_server()
        return time.monotonic()

    def start_gcs(self) -> float:
        """Start a new GCS server on the same port; it reloads its tables from Redis."""
        self.head.start_gcs_server()
        self.gcs_down = False
        return time.monotonic()

    def serve_deploy(self, config: dict[str, Any], tmp_path: Path) -> None:
        serve_deploy(config, tmp_path, http_port=self.http_port, dashboard_port=self.dashboard_port)


@pytest.fixture(scope="session")
def headloss(tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("tests/headloss needs its own pytest process (make test runs it apart)")
    redis = Redis(tmp_path_factory.mktemp("redis"))
    # Served as the project serves (app/ops/serving_mode.py): HAProxy on the HTTP port in front
    # of the Router's own server, with this cluster's own HAProxy files and ports; read by
    # Serve's controller and HAProxy manager, which the head's raylet starts.
    # HEADLOSS_SERVING=proxy: behind Serve's Python proxy instead.
    settings = contextlib.ExitStack()
    settings.enter_context(serving_environ("HEADLOSS_SERVING"))
    # What `ray start --head` reads on a production head (cluster/*.yaml): the GCS stores its
    # tables in this Redis, under a namespace of the cluster's own.
    if not os.environ.get("HEADLOSS_WITHOUT_REDIS"):  # the control: a GCS that keeps nothing
        settings.enter_context(environ({"RAY_REDIS_ADDRESS": redis.address,
                                        "RAY_external_storage_namespace": STORAGE_NAMESPACE}))  # fmt: skip
    cluster = nodes = None
    try:
        dashboard_port, http_port = free_port(), free_port()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": NODE_CPUS,
                "num_gpus": 0,
                "redis_password": REDIS_PASSWORD,
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
            },
        )
        ray.init(
            address=cluster.address,
            _redis_password=REDIS_PASSWORD,
            log_to_driver=False,
            runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}},
        )
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        wait_for_condition(
            lambda: httpx.get(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=5).status_code == 200,
            timeout_s=60, message="Ray dashboard",
        )  # fmt: skip
        split = CpuSplit()
        if os.environ.get("HEADLOSS_SHARED_CPUS"):  # the control: everything on every CPU
            split.worker_cpus = set()
        with split:
            nodes = HeadLoss(cluster, redis, http_port, dashboard_port, split)
            yield nodes
    finally:
        try:
            if cluster is not None:
                try:
                    # A test that failed while the GCS was down: Serve's shutdown would wait
                    # for it; killing the processes (below) is enough then.
                    if ray.is_initialized() and (nodes is None or not nodes.gcs_down):
                        serve.shutdown()
                finally:
                    ray.shutdown()
                    cluster.shutdown()
        finally:
            redis.stop()
            settings.close()
