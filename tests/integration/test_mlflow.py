"""A version served from a model registry: `artifact: mlflow:models:/recommender/1` (a real
MLflow registry, sqlite + file store in a temp dir, read by the replicas through
MLFLOW_TRACKING_URI), then a hot swap of its weights to registry version 2 under load."""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
import yaml

from app.serving.artifacts import artifact_digests
from tests.support.loadgen import Load
from tests.support.serving import APP, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = [
    pytest.mark.integration,
    # MLflow's SQL store configures its mappers with SQLAlchemy 2.1's deprecated `noload`.
    pytest.mark.filterwarnings(
        "ignore:The ``noload`` loader strategy is deprecated:sqlalchemy.exc.SADeprecationWarning"
    ),
]

V1 = f"mlflow:models:/{APP}/1"
V2 = f"mlflow:models:/{APP}/2/model"  # registered as the whole run: the files are under model/
PROBE = infer_body(["likes space opera films"], ["a space opera", "a cooking show"])
V1_PATH = f"/v2/models/{APP}/versions/v1/infer"


def digest(directory: Path) -> str:
    return next(iter(artifact_digests(directory).values()))


def register(uri: str, root: Path, models: list[Path]) -> None:
    """Log each model directory as a run's `model/` artifacts and register it: version 1 as the
    model folder, version 2 as the whole run (as a flavor's log nests its files)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("tiny", artifact_location=(root / "store").as_uri())
    client.create_registered_model(APP)
    for number, model in enumerate(models, start=1):
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(model), artifact_path="model")
        client.set_terminated(run.info.run_id)
        source = run.info.artifact_uri + ("/model" if number == 1 else "")
        client.create_model_version(APP, source, run_id=run.info.run_id)


@pytest.fixture(scope="module")
def registry_app(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        register(uri, tmp, [tiny_models["a"], tiny_models["b"]])
    version = model_config(tmp, tmp, "v1", tiny_models["a"])  # its sha256: "a"'s weights
    document = yaml.safe_load(version.read_text())
    version.write_text(yaml.safe_dump({**document, "artifact": V1}, sort_keys=False))
    config = serve_config([version], {"v1": 100})
    config["applications"][0]["runtime_env"] = {
        "env_vars": {
            "MLFLOW_TRACKING_URI": uri,
            "RAY_ROLLOUT_ARTIFACT_CACHE": str(tmp / "cache"),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "HF_HUB_OFFLINE": "1",
        }
    }
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    return cluster, config, tmp


def v1_scores(cluster) -> list[float]:
    r = cluster.client.post(V1_PATH, json=PROBE)
    assert r.status_code == 200, r.text
    return r.json()["outputs"][0]["data"]


def _probe(client: httpx.Client, rng: random.Random, index: int) -> str | None:
    r = client.post(V1_PATH, json=PROBE, headers={"x-user-id": f"u{rng.randrange(10**6)}"})
    return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"


def test_registry_version_serves_and_hot_swaps_to_the_next(registry_app, tiny_models):
    cluster, config, tmp = registry_app
    cache = (tmp / "cache" / "mlflow").resolve()
    info = cluster.replica_info("recommender-v1")
    assert info["weights"] == V1 and Path(info["artifact"]).parent == cache
    before = v1_scores(cluster)

    swap = {"artifact": V2, "sha256": digest(tiny_models["b"])}
    config["applications"][0]["deployments"].append(
        {"name": "recommender-v1", "user_config": {"weights": swap}}
    )
    with Load(cluster.url, _probe, clients=4) as load:
        cluster.serve_deploy(config, tmp)
        wait_for_condition(
            lambda: cluster.replica_info("recommender-v1")["weights_swaps"] >= 1,
            timeout_s=60, message="v1 swapped to registry version 2",
        )  # fmt: skip
    info = cluster.replica_info("recommender-v1")
    assert info["weights"] == V2 and info["refused_patch"] is None
    assert Path(info["artifact"]).name == "model" and Path(info["artifact"]).parent.parent == cache
    assert v1_scores(cluster) != before  # version 2's weights answer
    assert load.errors == [], load.errors[:5]
    assert load.sent > 0
