"""Traffic capture wired into the Router on a real cluster (issue 20 item 1): answered user
requests land in the sample with no client identity; pinned and refused requests do not; the
counters show in /status; `rollout capture export` reads the sample back."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.serving.capture import iter_sample
from tests.support.serving import APP, forget_rollouts, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def capturing(cluster, tiny_models, tmp_path_factory):
    forget_rollouts()
    tmp = tmp_path_factory.mktemp("capture")
    sample = tmp_path_factory.mktemp("sample")
    versions = [model_config(tmp, tmp, "v1", tiny_models["a"]),
                model_config(tmp, tmp, "v2", tiny_models["b"])]  # fmt: skip
    capture = {"enabled": True, "directory": str(sample), "sample_rate": 1.0,
               "max_records_per_s": 1000, "drop_fields": ["top_k"]}  # fmt: skip
    config = serve_config(versions, {"v1": 100}, capture=capture)
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    yield cluster, sample


def test_answered_user_requests_are_captured_without_identity_and_pins_are_not(capturing):
    cluster, sample = capturing
    for i in range(6):
        body = infer_body([f"user {i} likes jazz"], ["jazz", "rock"], parameters={"top_k": 1})
        r = cluster.client.post(f"/v2/models/{APP}/infer", json={**body, "id": f"req-{i}"},
                                headers={"x-user-id": f"user-{i}"})  # fmt: skip
        assert r.status_code == 200, r.text
    pinned = cluster.client.post(f"/v2/models/{APP}/versions/v2/infer",
                                 json=infer_body(["pinned user"], ["a", "b"]))  # fmt: skip
    assert pinned.status_code == 200
    refused = cluster.client.post(f"/v2/models/{APP}/infer", json={"inputs": []})
    assert refused.status_code == 400
    counters = wait_for_condition(
        lambda: (c := cluster.router_status()["capture"]).get("captured", 0) >= 6 and c,
        timeout_s=30, message="six captured records",
    )  # fmt: skip
    assert counters["write_errors"] == 0, counters
    records = list(iter_sample(sample, APP))
    assert len(records) == 6, records
    users = sorted(r.request["inputs"][0]["data"][0] for r in records)
    assert users == [f"user {i} likes jazz" for i in range(6)]  # not the pinned one, nor the 400
    for record in records:
        assert record.model == APP and record.version == "v1"
        assert "id" not in record.request  # the client's request id is not kept
        assert "top_k" not in record.request.get("parameters", {})  # drop_fields
    text = "".join(p.read_text() for p in (sample / APP).glob("*.jsonl"))
    assert "user-0" not in text  # the routing header never reaches the sample


def test_rollout_capture_export_reads_the_live_sample(capturing, tmp_path):
    cluster, sample = capturing
    out = tmp_path / "export.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "app.ops.cli", "capture", "export", "--dir", str(sample),
         "--model", APP, "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) >= 6 and all(line["model"] == APP for line in lines)
    assert all("inputs" in line["request"] for line in lines)
