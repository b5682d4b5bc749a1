"""The request path on a real Ray cluster: V2 endpoints, weighted split, pinning, bad input."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.serving import APP, infer_body, model_config, serve_config

pytestmark = pytest.mark.integration

USERS = ["user loves science fiction films"]
ITEMS = ["space opera", "cooking show", "jazz music"]


@pytest.fixture(scope="module")
def deployed(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    v1 = model_config(tmp, tmp, "v1", tiny_models["a"])
    v2 = model_config(tmp, tmp, "v2", tiny_models["b"], hyperparameters={"temperature": 0.5},
                      limits={"max_response_bytes": 200_000})  # fmt: skip
    config = serve_config([v1, v2], {"v1": 50, "v2": 50})
    # A typo in the admin token's path (F10): the admin API must go off, inference stay up.
    config["applications"][0]["runtime_env"] = {
        "env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": str(tmp / "no-such-token-file")}
    }
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    return cluster


def test_a_broken_admin_token_config_turns_the_admin_api_off_not_inference(deployed):
    c = deployed.client
    assert c.get("/status").json()["admin_api"] == "broken token config"
    r = c.post("/admin/rollout/abort", headers={"authorization": "Bearer " + "x" * 32})
    assert r.status_code == 503 and "token config for it is broken" in r.json()["error"]
    assert "no-such-token-file" not in r.text  # the path is for the log, not for clients
    body = infer_body(USERS, ITEMS)
    assert c.post(f"/v2/models/{APP}/infer", json=body).status_code == 200


def test_the_api_schema_is_not_published_on_the_inference_port(deployed):
    for path in ("/openapi.json", "/docs", "/redoc"):
        r = deployed.client.get(path)
        assert r.status_code == 404 and "error" in r.json(), path


def test_server_and_health_endpoints(deployed):
    c = deployed.client
    assert c.get("/v2").json()["extensions"] == ["binary_tensor_data"]
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").status_code == 200
    assert c.get(f"/v2/models/{APP}/ready").status_code == 200
    assert c.get(f"/v2/models/{APP}/versions/v2/ready").status_code == 200
    status = deployed.router_status()
    assert status["model_transport"] == "grpc"  # the default
    # router_main_loop (default): the Router and its handles on the replica's main loop.
    assert status["serve_loops"] == {"user_code_on_main_loop": True, "handles_on_main_loop": True}


def test_model_metadata(deployed):
    meta = deployed.client.get(f"/v2/models/{APP}").json()
    assert meta["name"] == APP
    assert meta["versions"] == ["v1", "v2"]
    assert meta["platform"] == "ray-rollout/recommender"
    assert [i["name"] for i in meta["inputs"]] == ["user", "items"]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "scores": "FP32",
        "ranking": "INT64",
    }
    version = deployed.client.get(f"/v2/models/{APP}/versions/v2").json()
    assert version["parameters"] == {"version": "v2"}


@pytest.mark.parametrize(
    "path",
    ["/v2/models/nope", f"/v2/models/{APP}/versions/v9", f"/v2/models/{APP}/versions/v9/ready"],
)
def test_unknown_model_or_version_is_404(deployed, path):
    response = deployed.client.get(path)
    assert response.status_code == 404
    assert "not found" in response.json()["error"]


def test_unknown_model_or_version_infer_is_404(deployed):
    body = infer_body(USERS, ITEMS)
    r = deployed.client.post("/v2/models/nope/infer", json=body)
    assert r.status_code == 404 and "'nope'" in r.json()["error"]
    r = deployed.client.post(f"/v2/models/{APP}/versions/v9/infer", json=body)
    assert r.status_code == 404 and "'v9'" in r.json()["error"]
    r = deployed.client.post(
        f"/v2/models/{APP}/infer", json=body, headers={"x-model-version": "v9"}
    )
    assert r.status_code == 404 and "'v9'" in r.json()["error"]


def test_infer_response_shape_and_version_header(deployed):
    r = deployed.client.post(f"/v2/models/{APP}/infer", json=infer_body(USERS, ITEMS, id="req-1"))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "req-1"
    assert doc["model_name"] == APP
    assert doc["model_version"] == r.headers["x-model-version"]
    outputs = {o["name"]: o for o in doc["outputs"]}
    assert outputs["scores"]["shape"] == [1, 3] and outputs["scores"]["datatype"] == "FP32"
    ranking = outputs["ranking"]["data"]
    scores = outputs["scores"]["data"]
    assert sorted(ranking) == [0, 1, 2]
    assert [scores[i] for i in ranking] == sorted(scores, reverse=True)


def test_weighted_split_serves_both_versions(deployed):
    counts = Counter()
    body = infer_body(USERS, ITEMS)
    for _ in range(200):
        r = deployed.client.post(f"/v2/models/{APP}/infer", json=body)
        assert r.status_code == 200, r.text
        counts[r.headers["x-model-version"]] += 1
        assert r.headers["x-routing-decision"] == "weighted"
    # 50/50 over 200 draws: P(outside 60..140) < 1e-8 for a fair split.
    assert 60 <= counts["v1"] <= 140, counts
    assert counts["v1"] + counts["v2"] == 200


def test_pinning_by_path_and_header(deployed):
    body = infer_body(USERS, ITEMS)
    by_path = {}
    for version in ("v1", "v2"):
        for _ in range(10):
            r = deployed.client.post(f"/v2/models/{APP}/versions/{version}/infer", json=body)
            assert r.status_code == 200 and r.headers["x-model-version"] == version
            assert r.headers["x-routing-decision"] == "pinned"
        by_path[version] = r.json()["outputs"][0]["data"]
        r = deployed.client.post(
            f"/v2/models/{APP}/infer", json=body, headers={"x-model-version": version}
        )
        assert r.headers["x-model-version"] == version
        assert r.json()["outputs"][0]["data"] == by_path[version]
    # Different weights and temperature: the two versions really are different models.
    assert by_path["v1"] != by_path["v2"]


def test_request_id_passed_through_or_created(deployed):
    body = infer_body(USERS, ITEMS)
    r = deployed.client.post(
        f"/v2/models/{APP}/infer", json=body, headers={"x-request-id": "abc-123"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    r = deployed.client.post(f"/v2/models/{APP}/infer", json=body)
    assert len(r.headers["x-request-id"]) >= 16


def test_top_k_parameter(deployed):
    body = infer_body(USERS, ITEMS, parameters={"top_k": 2})
    r = deployed.client.post(f"/v2/models/{APP}/versions/v1/infer", json=body)
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert outputs["ranking"]["shape"] == [1, 2]
    bad = deployed.client.post(
        f"/v2/models/{APP}/versions/v1/infer",
        json=infer_body(USERS, ITEMS, parameters={"top_k": 0}),
    )
    assert bad.status_code == 400 and "top_k" in bad.json()["error"]


def _bad(body):
    return json.dumps(body).encode()


GOOD = infer_body(USERS, ITEMS)
BAD_INPUTS = [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (_bad({"inputs": []}), 400, "inputs"),
    (_bad({"inputs": GOOD["inputs"][:1]}), 400, "missing input(s) ['items']"),
    (_bad({"inputs": GOOD["inputs"] + [{"name": "extra", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}), 400, "unexpected input 'extra'"),
    (_bad({"inputs": [{**GOOD["inputs"][0], "datatype": "FP32"}, GOOD["inputs"][1]]}), 400, "input 'user' has datatype 'FP32', expected 'BYTES'"),
    (_bad({"inputs": [{**GOOD["inputs"][0], "shape": [2]}, GOOD["inputs"][1]]}), 400, "input 'user' has 1 elements but shape [2] needs 2"),
    (_bad({"inputs": [{**GOOD["inputs"][0], "shape": [1, 1]}, GOOD["inputs"][1]]}), 400, "2 dimensions"),
    (_bad({"inputs": [{**GOOD["inputs"][0], "data": [7]}, GOOD["inputs"][1]]}), 400, "expected a string"),
    (_bad({"inputs": GOOD["inputs"], "outputs": [{"name": "nope"}]}), 400, "unknown output 'nope'"),
    (_bad({"inputs": [{**GOOD["inputs"][1], "shape": [1025], "data": ["x"] * 1025}, GOOD["inputs"][0]]}), 400, "between 1 and 1024"),
    # Hostile bodies (issue 17): a lone surrogate in a BYTES element, in the id, deep nesting,
    # a repeated output name. Each a 400 naming the field, never a 500.
    (_bad({"inputs": [GOOD["inputs"][0], {**GOOD["inputs"][1], "data": ["ok", "x\ud800", "y"]}]}), 400, "input 'items' (BYTES): element 1 is not valid Unicode"),
    (_bad({"inputs": GOOD["inputs"], "id": "\udfff"}), 400, "id is not valid Unicode"),
    (b'{"inputs":' + b"[" * 200_000 + b"]" * 200_000 + b"}", 400, "nested too deeply"),
    (_bad({"inputs": GOOD["inputs"], "outputs": [{"name": "scores"}, {"name": "scores"}]}), 400, "output 'scores' is requested twice"),
]  # fmt: skip


@pytest.mark.parametrize("body,status,needle", BAD_INPUTS)
def test_bad_input_is_a_clear_4xx(deployed, body, status, needle):
    r = deployed.client.post(
        f"/v2/models/{APP}/infer", content=body, headers={"x-request-id": "bad-input-1"}
    )
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]
    assert r.json()["request_id"] == "bad-input-1"  # every error body names its request


def test_one_poison_request_beside_fifteen_good_ones_costs_them_nothing(deployed):
    """Sixteen concurrent requests to one version (one dynamic batch's worth), one of them with
    a lone surrogate: the poison is a 400 at the router and the fifteen get their answers."""
    poison = _bad(
        {"inputs": [GOOD["inputs"][0], {**GOOD["inputs"][1], "data": ["a", "\ud800", "b"]}]}
    )
    good = json.dumps(GOOD).encode()
    bodies = [poison if i == 7 else good for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(
            lambda b: httpx.post(f"{deployed.url}/v2/models/{APP}/versions/v2/infer", content=b, timeout=60).status_code,
            bodies,
        ))  # fmt: skip
    assert statuses[7] == 400
    assert statuses[:7] + statuses[8:] == [200] * 15, statuses


def test_body_over_limit_is_413_and_nothing_crashes(deployed):
    before = {d: deployed.replica_info(f"{APP}-{d}")["replica"] for d in ("v1", "v2")}
    big = b'{"inputs": [' + b" " * (8 * 1024 * 1024) + b"]}"
    r = deployed.client.post(f"/v2/models/{APP}/infer", content=big)
    assert r.status_code == 413 and "limit" in r.json()["error"]
    for body, _, _ in BAD_INPUTS:
        deployed.client.post(f"/v2/models/{APP}/infer", content=body)
    r = deployed.client.post(f"/v2/models/{APP}/infer", json=GOOD)
    assert r.status_code == 200
    after = {d: deployed.replica_info(f"{APP}-{d}")["replica"] for d in ("v1", "v2")}
    assert before == after  # same replicas: bad input crashed nothing


# -- admission and budgets (issue 17 items 2, 4 and 5) ----------------------------------------


def _padded(body: bytes, size: int) -> bytes:
    """`body` (a JSON object) padded with JSON whitespace to exactly `size` bytes."""
    assert body.endswith(b"}") and len(body) <= size
    return body[:-1] + b" " * (size - len(body)) + b"}"


def _binary_body(users: list[str], items: list[str]) -> tuple[bytes, bytes]:
    """(JSON header, binary data) of a V2 request with both inputs in binary form."""

    def pack(values: list[str]) -> bytes:
        out = b""
        for text in values:
            data = text.encode()
            out += len(data).to_bytes(4, "little") + data
        return out

    data = [pack(users), pack(items)]
    header = json.dumps({"inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [len(users)],
         "parameters": {"binary_data_size": len(data[0])}},
        {"name": "items", "datatype": "BYTES", "shape": [len(items)],
         "parameters": {"binary_data_size": len(data[1])}},
    ]}).encode()  # fmt: skip
    return header, data[0] + data[1]


def test_body_size_limit_just_under_at_and_over_the_boundary_json_and_binary(deployed):
    """Triton's http_input_size_limit_test, both sides of the limit: the limit comes from the
    model's declared request budget (/status body_limit_bytes), far below the old 8 MiB."""
    limit = deployed.router_status()["body_limit_bytes"]
    assert limit < 2 * 1024 * 1024
    url = f"/v2/models/{APP}/versions/v1/infer"
    good = json.dumps(GOOD).encode()
    for size in (limit - 1, limit):
        r = deployed.client.post(url, content=_padded(good, size))
        assert r.status_code == 200, (size, r.text[:200])
    r = deployed.client.post(url, content=_padded(good, limit + 1))
    assert r.status_code == 413 and f"limit is {limit}" in r.json()["error"]
    # The same without a content-length (chunked): refused while reading, past the limit.
    over = _padded(good, limit + 1)
    r = deployed.client.post(url, content=(over[i : i + 65536] for i in range(0, len(over), 65536)))
    assert r.status_code == 413 and "over the limit" in r.json()["error"]

    header, data = _binary_body(USERS, ITEMS)
    for size, status in ((limit - 1, 200), (limit, 200), (limit + 1, 413)):
        padded = _padded(header, size - len(data))
        r = deployed.client.post(url, content=padded + data,
                                 headers={"inference-header-content-length": str(len(padded))})  # fmt: skip
        assert r.status_code == status, (size, r.text[:200])


def test_a_body_sent_in_very_many_tiny_chunks_is_served(deployed):
    """Triton's http_request_many_chunks: a body in one-byte chunks is read into one buffer
    and answered; the router stays healthy."""
    body = _padded(json.dumps(GOOD).encode(), 20_000)
    r = deployed.client.post(
        f"/v2/models/{APP}/infer", content=(body[i : i + 1] for i in range(len(body)))
    )
    assert r.status_code == 200, r.text[:200]
    feedback = b'{"request_id": "never-served", "outcome": "click", "value": true}'
    r = deployed.client.post(
        f"/v2/models/{APP}/feedback", content=(feedback[i : i + 1] for i in range(len(feedback)))
    )
    assert r.status_code in (404, 503) and "error" in r.json()  # read whole, then judged


def test_a_slow_upload_gets_a_408_within_its_deadline(deployed):
    """A body that has not arrived by the request's deadline is refused (408), so a slow or
    stalled upload holds a router slot no longer than a request may run."""
    import time

    body = json.dumps(GOOD).encode()

    def trickle():
        yield body[:10]
        time.sleep(3)
        yield body[10:]

    started = time.monotonic()
    r = deployed.client.post(f"/v2/models/{APP}/infer", content=trickle(),
                             headers={"x-request-timeout-s": "1"})  # fmt: skip
    assert r.status_code == 408, r.text[:200]
    assert "did not arrive" in r.json()["error"]
    assert time.monotonic() - started < 3 + 2


def test_requests_over_the_models_budget_are_413s_naming_the_limit(deployed):
    """F4: one short request must not become an unbounded forward pass. Too many clauses is
    refused by the router before dispatch; too many tokens by the replica before its forward
    pass; both are the client's (413), counted against no breaker."""
    url = f"/v2/models/{APP}/versions/v2/infer"
    many_clauses = infer_body([", ".join(["x"] * 2100)], ITEMS)
    r = deployed.client.post(url, json=many_clauses)
    assert r.status_code == 413, r.text
    assert "limits.max_encoder_texts is 2048" in r.json()["error"]
    long_item = "item " + "word " * 30
    many_tokens = infer_body(USERS, [f"{long_item} {i}" for i in range(600)])
    for _ in range(8):  # more than the breaker's consecutive_failures
        r = deployed.client.post(url, json=many_tokens)
        assert r.status_code == 413, r.text[:300]
        assert "limits.max_tokens is 16384" in r.json()["error"]
    assert deployed.router_status()["versions"]["v2"]["breaker"]["state"] == "closed"
    assert deployed.client.post(url, json=GOOD).status_code == 200


def test_a_response_over_the_models_cap_is_a_413_naming_it(deployed):
    """v2's `limits.max_response_bytes` is 200,000 here. 64 users x 200 items: ~250 KB as JSON
    (refused, naming the limit), 153,600 bytes in binary form (served)."""
    body = infer_body([f"user {i} likes films" for i in range(64)],
                      [f"item {i}" for i in range(200)])  # fmt: skip
    url = f"/v2/models/{APP}/versions/v2/infer"
    r = deployed.client.post(url, json=body)
    assert r.status_code == 413, r.text[:200]
    assert "limits.max_response_bytes is 200000" in r.json()["error"]
    binary = {**body, "outputs": [{"name": n, "parameters": {"binary_data": True}}
                                  for n in ("scores", "ranking")]}  # fmt: skip
    r = deployed.client.post(url, json=binary)
    assert r.status_code == 200 and len(r.content) < 200_000
