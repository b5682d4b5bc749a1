"""cluster/kuberay/rayservice.yaml: generated from serve_config.yaml + a region overlay; the
committed file must match what the generator makes now (drift fails here)."""

from __future__ import annotations

import shutil

import yaml

from app.config import load_yaml, project_root
from app.ops.cli import main
from app.ops.kuberay import generate, manifest_text, project_version
from app.ops.overlay import load_overlay, render
from app.ops.placement import load_launcher, node_types
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

    manifest = yaml.safe_load(MANIFEST.read_text())
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
