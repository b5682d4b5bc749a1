"""A real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`): a head without
GPUs and workers that declare fake GPUs, all labelled with one region, as cluster/*.yaml do.

Runs in its own pytest process (`make test` starts one): the integration suite's session
fixture calls `ray.init` for a single-node cluster, and one process can join only one cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.waiting import (  # noqa: F401 - re-exported
    free_port,
    serve_deploy,
    serving_environ,
    wait_for_condition,
)

# A throwaway cluster of the test's own: token auth off (real clusters keep it on).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REGION = "test-region"
NODE_CPUS = 2


class MultiNode:
    """The cluster, its HTTP and dashboard ports, and node bookkeeping."""

    def __init__(self, cluster: Any, http_port: int, dashboard_port: int) -> None:
        self.cluster = cluster
        self.http_port = http_port
        self.dashboard_port = dashboard_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.gpu_nodes: list[Any] = []

    def add_gpu_worker(self) -> Any:
        """A worker that declares one (fake) GPU, like cluster/*.yaml's gpu-worker type."""
        node = self.cluster.add_node(num_cpus=NODE_CPUS, num_gpus=1, labels={"region": REGION})
        self.gpu_nodes.append(node)
        self.cluster.wait_for_nodes()
        return node

    def kill_node(self, node: Any) -> None:
        """Kill every process of a worker node at once (no graceful shutdown): a lost machine."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.gpu_nodes.remove(node)

    def serve_deploy(self, config: dict[str, Any], tmp_path: Path) -> None:
        serve_deploy(config, tmp_path, http_port=self.http_port, dashboard_port=self.dashboard_port)


@pytest.fixture(scope="session")
def multinode():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.fail("tests/multinode needs its own pytest process (make test runs it apart)")
    dashboard_port, http_port = free_port(), free_port()
    # Served as the project serves (app/ops/serving_mode.py): HAProxy on the HTTP port in front
    # of the Routers' own servers, with HAProxy files and ports of its own; every node's raylet
    # reads them (MULTINODE_SERVING=proxy: behind Serve's Python proxy instead).
    with serving_environ("MULTINODE_SERVING"):  # restored, whatever fails below
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": NODE_CPUS,
                "num_gpus": 0,  # the head never runs a GPU replica, as in cluster/*.yaml
                "labels": {"region": REGION},
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
            },
        )
        nodes = MultiNode(cluster, http_port, dashboard_port)
        try:
            nodes.add_gpu_worker()
            nodes.add_gpu_worker()
            ray.init(
                address=cluster.address,
                log_to_driver=False,
                runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}},
            )
            # One proxy (HAProxy), on the head: proxies on several "nodes" of one machine would
            # share a port.
            serve.start(
                proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port}
            )
            wait_for_condition(
                lambda: httpx.get(f"http://127.0.0.1:{dashboard_port}/api/version", timeout=5).status_code == 200,
                timeout_s=60, message="Ray dashboard",
            )  # fmt: skip
            yield nodes
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                cluster.shutdown()
