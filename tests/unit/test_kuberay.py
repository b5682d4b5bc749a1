"""cluster/kuberay/rayservice.yaml: generated from serve_config.yaml + a region overlay; the
committed file must match what the generator makes now (drift fails here). Its NetworkPolicies
are checked by evaluating them as Kubernetes does, for who can reach which port of which pod."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import yaml

from app.config import load_yaml, project_root
from app.ops import kuberay
from app.ops.cli import main
from app.ops.kuberay import generate, manifest_text, pod_labels, project_version
from app.ops.overlay import load_overlay, render
from app.ops.placement import load_launcher, node_types
from app.ops.serving_mode import HAPROXY_RETRY_ON
from tests.support.configs import router_app

ROOT = project_root()
MANIFEST = ROOT / "cluster/kuberay/rayservice.yaml"
REGION = "us-east-1"


def test_committed_manifest_matches_its_sources():
    expected = manifest_text(ROOT / "serve_config.yaml", REGION)
    assert MANIFEST.read_text() == expected, (
        "cluster/kuberay/rayservice.yaml drifted from serve_config.yaml + configs/regions/"
        f"{REGION}.yaml: run `make kuberay`"
    )
    assert (
        main(
            [
                "kuberay",
                str(ROOT / "serve_config.yaml"),
                "--region",
                REGION,
                "--check",
                str(MANIFEST),
            ]
        )
        == 0
    )


def test_check_fails_with_a_diff_when_the_serve_config_changes(tmp_path, capsys):
    changed = load_yaml(ROOT / "serve_config.yaml")
    router_app(changed)["deployments"][0]["user_config"]["request_timeout_s"] = 12
    config = tmp_path / "serve_config.yaml"
    config.write_text(yaml.safe_dump(changed, sort_keys=False))
    stale = tmp_path / "rayservice.yaml"
    shutil.copy(MANIFEST, stale)
    assert main(["kuberay", str(config), "--region", REGION, "--check", str(stale)]) == 1
    err = capsys.readouterr().err
    assert "has drifted" in err and "+          request_timeout_s: 12" in err, err
    assert main(["kuberay", str(config), "--region", REGION, "-o", str(stale)]) == 0
    assert main(["kuberay", str(config), "--region", REGION, "--check", str(stale)]) == 0


def test_serve_config_v2_is_the_regions_serve_config():
    from ray.serve.schema import ServeDeploySchema

    manifest, *_policies = yaml.safe_load_all(MANIFEST.read_text())
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayService"
    served = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(served)
    expected = render(
        load_yaml(ROOT / "serve_config.yaml"), load_overlay(ROOT / f"configs/regions/{REGION}.yaml")
    )
    env = router_app(expected)["runtime_env"]["env_vars"]
    env["ROLLOUT_ADMIN_TOKEN_FILE"] = "/etc/ray-rollout/admin_token"  # the Secret's mount
    assert served == expected


def test_ray_cluster_mirrors_the_regions_launcher_file():
    spec = generate(ROOT / "serve_config.yaml", REGION)["spec"]["rayClusterConfig"]
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # the dashboard never leaves the cluster network
    assert head["rayStartParams"]["num-gpus"] == "0"
    launcher_types = {
        t.name: t for t in node_types(load_launcher(ROOT / "cluster/aws-us-east-1.yaml"))
    }
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {n for n, t in launcher_types.items() if not t.head}
    version = project_version()
    for name, group in groups.items():
        t = launcher_types[name]
        params = group["rayStartParams"]
        assert (group["minReplicas"], group["maxReplicas"]) == (t.min_workers, t.max_workers)
        assert (
            float(params["num-cpus"]) == t.resources["CPU"]
            and float(params["num-gpus"]) == t.resources["GPU"]
        )
        assert params["labels"] == f"region={REGION}"
        (container,) = group["template"]["spec"]["containers"]
        gpu = t.resources["GPU"] > 0
        assert container["image"].endswith(f":{version}-{'gpu' if gpu else 'cpu'}")
        assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu
    assert any(t.resources["GPU"] > 0 for t in launcher_types.values())


def test_the_gcs_keeps_its_tables_in_an_external_redis():
    """Head-node loss: KubeRay's GCS fault tolerance with a TLS Redis whose password comes
    from a Secret; no password in the manifest, and none passed to `ray start` beside it
    (KubeRay refuses both)."""
    manifest, *_policies = yaml.safe_load_all(MANIFEST.read_text())
    spec = manifest["spec"]["rayClusterConfig"]
    ft = spec["gcsFaultToleranceOptions"]
    assert ft["redisAddress"].startswith("rediss://")  # TLS in transit
    assert ft["redisPassword"] == {
        "valueFrom": {"secretKeyRef": {"name": "ray-rollout-gcs-redis", "key": "password"}}
    }
    # KubeRay's default storage namespace (the RayCluster's UID) keeps an upgrade's new
    # cluster from reading the old one's tables.
    assert "externalStorageNamespace" not in ft
    head = spec["headGroupSpec"]
    assert not {"redis-password", "redis-username"} & set(head["rayStartParams"])
    env = {e["name"] for c in head["template"]["spec"]["containers"] for e in c.get("env", [])}
    assert not {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD", "RAY_REDIS_PASSWORD"} & env
    assert "password:" not in MANIFEST.read_text().replace("redisPassword:", "")


def test_every_ray_container_serves_through_haproxy_and_direct_ingress():
    """Head and every worker group: HAProxy on the Serve port in front of each Router
    replica's own server (app/ops/serving_mode.py); each node runs its own HAProxy."""
    manifest, *_policies = yaml.safe_load_all(MANIFEST.read_text())
    spec = manifest["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1", container["name"]
            assert env.get("RAY_SERVE_HAPROXY_RETRY_ON") == HAPROXY_RETRY_ON, container["name"]


# ------------------------------------------------------------------------ NetworkPolicies


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: tuple[tuple[str, str], ...]

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels)


APP_NAMESPACE = "serving"  # wherever the RayService is applied; the policies go with it
PORTS = (6379, 8000, 8080, 8265, 10001, 52365)  # GCS, Serve, metrics, dashboard, client, agent
EVERY_PORT = set(PORTS)


def _matches(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector  # matchExpressions: teach this evaluator
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _peer_admits(peer: dict, source: Pod, namespace: str) -> bool:
    """One `from` entry, as Kubernetes reads it: podSelector alone = pods of the policy's own
    namespace; namespaceSelector alone = every pod of those namespaces; both = those pods of
    those namespaces. Namespaces by their kubernetes.io/metadata.name label."""
    assert "ipBlock" not in peer, peer
    if "namespaceSelector" not in peer:
        return source.namespace == namespace and _matches(peer["podSelector"], source.label_dict())
    ns_labels = {"kubernetes.io/metadata.name": source.namespace}
    return _matches(peer["namespaceSelector"], ns_labels) and _matches(
        peer.get("podSelector", {}), source.label_dict()
    )


def reachable_ports(policies: list[dict], source: Pod, target: Pod) -> set[int]:
    """The ports of `target` that `source` may connect to. A pod no policy selects for Ingress
    takes everything; a selected pod only what some rule of a selecting policy allows."""
    selecting = [
        p
        for p in policies
        if p["metadata"].get("namespace", APP_NAMESPACE) == target.namespace
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
        and _matches(p["spec"]["podSelector"], target.label_dict())
    ]
    if not selecting:
        return EVERY_PORT
    open_ports: set[int] = set()
    for policy in selecting:
        namespace = policy["metadata"].get("namespace", APP_NAMESPACE)
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from") or []
            if peers and not any(_peer_admits(peer, source, namespace) for peer in peers):
                continue
            ports = rule.get("ports") or []
            assert all(p.get("protocol", "TCP") == "TCP" for p in ports), ports
            open_ports |= {p["port"] for p in ports} if ports else EVERY_PORT
    return open_ports


def _committed() -> tuple[dict, list[dict]]:
    service, *policies = yaml.safe_load_all(MANIFEST.read_text())
    return service, policies


def _ray_pods(service: dict) -> dict[str, Pod]:
    """The pods KubeRay makes: the template's labels plus its own (ray.io/node-type is not
    overridable by a template: KubeRay's labelPod)."""
    spec = service["spec"]["rayClusterConfig"]
    groups = [("head", "headgroup", spec["headGroupSpec"])]
    groups += [("worker", g["groupName"], g) for g in spec["workerGroupSpecs"]]
    pods = {}
    for kind, group, g in groups:
        labels = {
            **g["template"].get("metadata", {}).get("labels", {}),
            "ray.io/node-type": kind,
            "ray.io/group": group,
            "ray.io/cluster": f"{service['metadata']['name']}-x7k2p",  # KubeRay's random suffix
            "ray.io/is-ray-node": "yes",
        }
        pods[group] = Pod(APP_NAMESPACE, tuple(sorted(labels.items())))
    return pods


def _pod(namespace: str, **labels: str) -> Pod:
    return Pod(namespace, tuple(sorted(labels.items())))


def test_the_manifest_holds_the_rayservice_then_its_network_policies():
    service, policies = _committed()
    assert service["kind"] == "RayService"
    assert [p["kind"] for p in policies] == ["NetworkPolicy"] * 4, [p["kind"] for p in policies]
    assert all(p["apiVersion"] == "networking.k8s.io/v1" for p in policies)
    for pod in _ray_pods(service).values():  # every Ray pod is selected: isolated for ingress
        assert any(_matches(p["spec"]["podSelector"], pod.label_dict()) for p in policies), pod
    spec = service["spec"]["rayClusterConfig"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        labels = group["template"]["metadata"]["labels"]
        assert labels == pod_labels(REGION)
        assert not [k for k in labels if k.startswith("ray.io/")], labels  # KubeRay's own keys


@pytest.mark.parametrize(
    ("source", "head_ports", "worker_ports"),
    [
        ("ray peer", EVERY_PORT, EVERY_PORT),
        ("ingress controller", {8000}, {8000}),
        ("labelled serve client", {8000}, {8000}),
        ("kuberay operator", {8265, 8000}, set()),
        ("prometheus", {8080}, {8080}),
        ("other pod, same namespace", set(), set()),
        ("pod in another namespace", set(), set()),
        ("operator's label in another namespace", set(), set()),
        ("serve-client label in another namespace", set(), set()),
    ],
)
def test_who_reaches_which_port_of_the_ray_pods(source, head_ports, worker_ports):
    """8000 only from the ingress controller and labelled clients; 8265, 6379, 10001 only from
    the cluster's own pods (and the operator's dashboard calls, on the head); metrics only from
    Prometheus; nothing from any other pod."""
    service, policies = _committed()
    pods = _ray_pods(service)
    head, workers = pods["headgroup"], [p for g, p in pods.items() if g != "headgroup"]
    operator = kuberay.OPERATOR_POD_LABELS
    sources = {
        "ray peer": workers[0],
        "ingress controller": _pod(kuberay.INGRESS_NAMESPACE, app="ingress-nginx"),
        "labelled serve client": _pod(APP_NAMESPACE, **{kuberay.SERVE_CLIENT_LABEL: "true"}),
        "kuberay operator": _pod(kuberay.OPERATOR_NAMESPACE, **operator),
        "prometheus": _pod(kuberay.MONITORING_NAMESPACE, app="prometheus"),
        "other pod, same namespace": _pod(APP_NAMESPACE, app="batch-job"),
        "pod in another namespace": _pod("default", app="anything"),
        "operator's label in another namespace": _pod("default", **operator),
        "serve-client label in another namespace": _pod(
            "default", **{kuberay.SERVE_CLIENT_LABEL: "true"}
        ),
    }
    assert reachable_ports(policies, sources[source], head) == head_ports
    for worker in workers:
        assert reachable_ports(policies, sources[source], worker) == worker_ports, worker


def test_the_evaluator_sees_an_unprotected_pod():
    """Control: without the policies (the manifest as it was) every pod reaches every port."""
    service, _ = _committed()
    head = _ray_pods(service)["headgroup"]
    assert reachable_ports([], _pod("default", app="anything"), head) == EVERY_PORT
