"""Real Open Inference Protocol clients against the router: tritonclient and kserve."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from tests.support.serving import APP, infer_body, model_config, serve_config

pytestmark = pytest.mark.integration

USERS = np.array(["user loves science fiction films"], dtype=object)
ITEMS = np.array(["space opera", "cooking show", "jazz music"], dtype=object)


@pytest.fixture(scope="module")
def deployed(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clients")
    v1 = model_config(tmp, tmp, "v1", tiny_models["a"])
    v2 = model_config(tmp, tmp, "v2", tiny_models["b"])
    # Ray actor calls from Router to model (router.model_transport "actor", Serve's default);
    # every other integration module runs the default, gRPC, so both transports serve real
    # V2 clients here.
    cluster.serve_deploy(serve_config([v1, v2], {"v1": 100, "v2": 0}, model_transport="actor"), tmp)
    cluster.wait_running()
    return cluster


def _direct_scores(deployed, version: str) -> list[float]:
    body = infer_body(USERS.tolist(), ITEMS.tolist())
    r = deployed.client.post(f"/v2/models/{APP}/versions/{version}/infer", json=body)
    return next(o for o in r.json()["outputs"] if o["name"] == "scores")["data"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_http(deployed, binary):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(url=f"127.0.0.1:{deployed.http_port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(APP) and client.is_model_ready(APP, "v2")
        meta = client.get_model_metadata(APP)
        assert meta["name"] == APP and meta["versions"] == ["v1", "v2"]
        inputs = [triton.InferInput("user", [1], "BYTES"), triton.InferInput("items", [3], "BYTES")]
        inputs[0].set_data_from_numpy(USERS, binary_data=binary)
        inputs[1].set_data_from_numpy(ITEMS, binary_data=binary)
        outputs = [
            triton.InferRequestedOutput(n, binary_data=binary) for n in ("scores", "ranking")
        ]
        for version in ("v1", "v2"):
            result = client.infer(
                APP, inputs, model_version=version, outputs=outputs, request_id="t-1"
            )
            response = result.get_response()
            assert response["model_version"] == version and response["id"] == "t-1"
            scores = result.as_numpy("scores")
            assert scores.shape == (1, 3) and scores.dtype == np.float32
            np.testing.assert_allclose(scores.ravel(), _direct_scores(deployed, version), rtol=1e-6)
            assert result.as_numpy("ranking").tolist() == [
                list(np.argsort(-scores[0], kind="stable"))
            ]
        # No outputs named: tritonclient asks for every output in binary (binary_data_output).
        result = client.infer(APP, inputs)
        assert result.as_numpy("scores").shape == (1, 3)
        with pytest.raises(triton.InferenceServerException, match="version 'v9'"):
            client.infer(APP, inputs, model_version="v9")
    finally:
        client.close()


def test_json_body_without_content_type(deployed):
    """tritonclient sends pure-JSON requests with no Content-Type; the router must not care."""
    import json

    body = json.dumps(infer_body(USERS.tolist(), ITEMS.tolist())).encode()
    request = httpx.Request("POST", f"{deployed.url}/v2/models/{APP}/infer", content=body)
    assert "content-type" not in request.headers  # httpx adds none for raw bytes
    with httpx.Client(timeout=30) as client:
        response = client.send(request)
    assert response.status_code == 200, response.text
    assert response.headers["x-model-version"] == "v1"
    assert deployed.router_status()["model_transport"] == "actor"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_kserve_rest_client(deployed, binary):
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    async def run():
        client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        user = InferInput("user", [1], "BYTES")
        items = InferInput("items", [3], "BYTES")
        user.set_data_from_numpy(USERS, binary_data=binary)
        items.set_data_from_numpy(ITEMS, binary_data=binary)
        request = InferRequest(model_name=APP, infer_inputs=[user, items], request_id="k-1")
        headers: dict[str, str] = {}
        try:
            response = await client.infer(
                deployed.url, request, model_name=APP, response_headers=headers
            )
        finally:
            await client._client.aclose()
        return response, headers

    response, headers = asyncio.run(run())
    assert headers["x-model-version"] == "v1"
    assert response.model_name == APP and response.id == "k-1"
    scores = {o.name: o.as_numpy() for o in response.outputs}["scores"]
    np.testing.assert_allclose(scores.ravel(), _direct_scores(deployed, "v1"), rtol=1e-6)
