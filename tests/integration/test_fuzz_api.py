"""A bounded schemathesis run of docs/openapi.json against the live router.

Every operation of the document (server and model health and metadata, infer, feedback) gets
its schema examples, schemathesis's coverage cases (boundary and schema-violating values, one
field at a time) and `MAX_EXAMPLES` generated cases, positive and negative, with a fixed
derandomised seed. Each response must be:

* not a 5xx (a 504 answering the client's own tiny `x-request-timeout-s` is the protocol's
  answer, not a server error; a readiness probe answers 503 by design when not ready);
* for a 4xx or 5xx, a JSON body with `error` and `request_id` (docs/http-api.md, Errors);
* what the document says: a documented status, content type, headers and body schema.

Path parameters, pin headers and tensor names are drawn from small dictionaries of the
deployed model's real names most of the time, so generated bodies get past "unknown model"
into the V2 codec and, some of them, to the model; schema examples on the request fields make
the coverage cases' base a valid request, so each one-field mutation reaches the codec check
for that field. Budget: about 900 requests, ~20 s of requests and ~65 s for the module with the
deploy on a 2-core machine (docs/http-api.md, OpenAPI document).

An empty `x-request-id` is a case of its own (`test_an_empty_request_id_...`): in the run it
would stop each operation at its first case (Hypothesis stops at a failing explicit case) and
hide every other finding.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import requests
import schemathesis
from schemathesis import checks

from tests.support.serving import APP, forget_rollouts, model_config, serve_config

pytestmark = pytest.mark.integration

DOCUMENT = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
MAX_EXAMPLES = 25  # generated cases per operation, on top of examples and coverage cases
TIMEOUT_HEADER = "x-request-timeout-s"
REQUEST_ID_HEADER = "x-request-id"
# operation -> status -> responses, for test_the_run_reached_the_model
STATUSES: defaultdict[str, Counter[int]] = defaultdict(Counter)
FAILED: set[str] = set()  # operations whose run found a failure (it stops there)
READINESS = {
    "GET /v2/health/ready",
    "GET /v2/models/{model}/ready",
    "GET /v2/models/{model}/versions/{version}/ready",
}

CONFIG = schemathesis.Config.from_dict(
    {
        "generation": {
            "mode": "all",  # positive (schema-valid) and negative (schema-violating) cases
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,  # Hypothesis derandomize: the same cases on every run
            # Bounded time: a failure is reported as found (schemathesis prints its curl
            # command), not shrunk by hundreds of further requests.
            "no-shrink": True,
        },
        "phases": {"stateful": {"enabled": False}},
        # Bodies of a few kB, generated for operations whose requests take ~10 ms each.
        "suppress-health-check": ["too_slow", "data_too_large", "filter_too_much"],
        "dictionaries": {
            "model": {"values": [APP]},
            "version": {"values": ["v1", "v2"]},
            "input": {"values": ["user", "items"]},
            "output": {"values": ["scores", "ranking"]},
            "datatype": {"values": ["BYTES"]},
            "timeout": {"values": [30]},
        },
        "parameters": {
            "path.model": {"dictionary": "model", "probability": 0.9},
            "path.version": {"dictionary": "version", "probability": 0.7},
            "header.x-model-version": {"dictionary": "version", "probability": 0.5},
            "body.inputs[*].name": {"dictionary": "input", "probability": 0.8},
            "body.inputs[*].datatype": {"dictionary": "datatype", "probability": 0.7},
            "body.outputs[*].name": {"dictionary": "output", "probability": 0.8},
            # Most generated deadlines are tiny (a 408 before the body is read): keep some.
            "header.x-request-timeout-s": {"dictionary": "timeout", "probability": 0.7},
        },
    }
)
schema = schemathesis.openapi.from_path(DOCUMENT, config=CONFIG)


def no_server_error(ctx, response, case) -> None:
    status = response.status_code
    if status < 500:
        return
    if status == 504 and TIMEOUT_HEADER in (case.headers or {}):
        return  # the client's own deadline, as short as it asked
    if status == 503 and case.operation.label in READINESS:
        return  # "not ready" is the probe's answer, with its documented body
    raise AssertionError(f"server error {status}: {response.text[:500]!r}")


def error_body_is_json_with_request_id(ctx, response, case) -> None:
    status = response.status_code
    if status < 400 or (status == 503 and case.operation.label in READINESS):
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"{status} body is not JSON ({response.headers.get('content-type')}): "
            f"{response.content[:300]!r}"
        ) from None
    assert isinstance(body, dict), f"{status} body is not a JSON object: {body!r}"
    assert isinstance(body.get("error"), str), f"{status} body has no 'error' string: {body!r}"
    assert isinstance(body.get("request_id"), str) and body["request_id"], (
        f"{status} body has no 'request_id': {body!r}"
    )


CHECKS = [
    no_server_error,
    error_body_is_json_with_request_id,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
]


@pytest.fixture(scope="module")
def deployed(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    v1 = model_config(tmp, tmp, "v1", tiny_models["a"])
    v2 = model_config(tmp, tmp, "v2", tiny_models["b"])
    forget_rollouts()
    cluster.serve_deploy(serve_config([v1, v2], {"v1": 50, "v2": 50}), tmp)
    cluster.wait_running()
    return cluster


@pytest.fixture(scope="module")
def session():
    with requests.Session() as s:
        yield s


@schema.parametrize()
def test_api(case, deployed, session):
    if case.headers and case.headers.get(REQUEST_ID_HEADER) == "":
        del case.headers[REQUEST_ID_HEADER]  # tested on its own below (module docstring)
    response = case.call(base_url=deployed.url, session=session, timeout=30)
    STATUSES[case.operation.label][response.status_code] += 1
    try:
        case.validate_response(response, checks=CHECKS)
    except Exception:
        FAILED.add(case.operation.label)
        raise


@pytest.mark.parametrize("path", ["/v2/models/nope", f"/v2/models/{APP}/versions/v9/infer"])
def test_an_empty_request_id_still_gets_an_id_in_the_error_body(deployed, path):
    """Serve creates an x-request-id only when the header is absent; an empty one must not
    leave the error without an id to find it in the logs by."""
    method = deployed.client.post if path.endswith("/infer") else deployed.client.get
    response = method(path, headers={REQUEST_ID_HEADER: ""})
    assert response.status_code == 404
    request_id = response.json().get("request_id")
    # Serve's proxy echoes the empty header too (it fills in only an absent one), so the
    # response carries both; the router's fresh id is the one in the body.
    ids = response.headers.get_list(REQUEST_ID_HEADER)
    assert request_id and request_id in ids, f"body {response.text}, x-request-id headers {ids!r}"


def test_the_run_reached_the_model():
    """The fuzzing above is worth its time only if its requests get past "unknown model" into
    the codec and, some of them, to the model: a change to the document or the dictionaries that
    stops that must not leave a green run that tests nothing."""
    if len(STATUSES) < len(list(schema.get_all_operations())):
        pytest.skip("test_api did not run for every operation (deselected)")
    if FAILED:
        pytest.skip(f"test_api failed (and stopped) for {sorted(FAILED)}")
    for operation in (
        "POST /v2/models/{model}/infer",
        "POST /v2/models/{model}/versions/{version}/infer",
    ):
        assert STATUSES[operation][200] >= 5 and STATUSES[operation][400] >= 5, dict(STATUSES)
