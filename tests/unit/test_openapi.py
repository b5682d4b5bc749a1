"""docs/openapi.json: up to date with app/serving/openapi.py, and the models agree with the code
that serves them (the protocol codec, the router's routes, the feedback parser)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from app.adapters.base import Datatype
from app.adapters.recommender import RecommenderAdapter
from app.config import NAME_PATTERN
from app.rollout.feedback import MAX_ITEMS_PER_REQUEST, MAX_REQUEST_ID_CHARS, parse_feedback
from app.serving import openapi
from app.serving.protocol import (
    encode_infer_response,
    model_metadata,
    parse_infer_request,
)

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "openapi.json"


def test_docs_openapi_json_is_up_to_date():
    assert DOCUMENT.read_text(encoding="utf-8") == openapi.render(), (
        "docs/openapi.json is out of date with app/serving/openapi.py: run `make openapi` "
        "(python -m app.serving.openapi -o docs/openapi.json)"
    )


def test_main_writes_the_document(tmp_path, capsys):
    assert openapi.main([]) == 0
    assert capsys.readouterr().out == openapi.render()
    assert openapi.main(["-o", str(tmp_path / "openapi.json")]) == 0
    assert json.loads((tmp_path / "openapi.json").read_text()) == openapi.openapi_document()


def test_copied_constants_match_their_sources():
    assert openapi.DATATYPES == get_args(Datatype)
    assert openapi.NAME_PATTERN == NAME_PATTERN
    assert openapi.MAX_FEEDBACK_ITEMS == MAX_ITEMS_PER_REQUEST
    assert openapi.MAX_REQUEST_ID_CHARS == MAX_REQUEST_ID_CHARS


def test_request_fields_are_the_ones_the_codec_accepts():
    from app.serving import protocol

    assert set(openapi.InferenceRequest.model_fields) == protocol._REQUEST_FIELDS
    # check_request's list of an input's fields
    assert set(openapi.RequestInput.model_fields) == {
        "name", "shape", "datatype", "data", "parameters"
    }  # fmt: skip


def test_the_example_request_is_valid_for_the_demo_model():
    openapi.InferenceRequest.model_validate(openapi.EXAMPLE_REQUEST)
    parsed = parse_infer_request(
        json.dumps(openapi.EXAMPLE_REQUEST).encode(),
        header_length=None,
        inputs=RecommenderAdapter.inputs,
        outputs=RecommenderAdapter.outputs,
    )
    assert parsed.outputs == ("ranking",) and parsed.parameters == {"top_k": 2}


def test_an_encoded_response_matches_the_response_model():
    parsed = parse_infer_request(
        json.dumps(openapi.EXAMPLE_REQUEST).encode(),
        header_length=None,
        inputs=RecommenderAdapter.inputs,
        outputs=RecommenderAdapter.outputs,
    )
    result = {"scores": np.array([[0.3, 0.1]], np.float32), "ranking": np.array([[0, 1]])}
    for request in (parsed, parsed.__class__(id=None, inputs=parsed.inputs)):
        body, _ = encode_infer_response(model="recommender", version="v1", request=request,
                                        result=result, outputs=RecommenderAdapter.outputs)  # fmt: skip
        openapi.InferenceResponse.model_validate_json(body)


def test_model_metadata_matches_its_model():
    document = model_metadata("recommender", ["v1", "v2"], "ray-rollout/recommender",
                              RecommenderAdapter.inputs, RecommenderAdapter.outputs)  # fmt: skip
    document["parameters"] = {"version": "v1"}  # as the router adds it
    openapi.ModelMetadata.model_validate(document)


@pytest.mark.parametrize(
    "body",
    [
        {"request_id": "r-1", "outcome": "click", "value": True},
        {"request_id": "r-1", "outcome": "revenue", "value": 12.5},
        {"feedback": [{"request_id": "r-1", "outcome": "click", "value": False}]},
    ],
)
def test_feedback_bodies_valid_for_the_model_are_valid_for_the_parser(body):
    model = openapi.FeedbackBatch if "feedback" in body else openapi.FeedbackItem
    model.model_validate(body)
    parse_feedback(body)


def test_feedback_results_match_their_models():
    """Results as the controller's desk makes them and the router sends them: one item with its
    status popped (router.feedback), or the batch envelope."""
    from app.rollout.feedback import FeedbackDesk, FeedbackSettings

    desk = FeedbackDesk(["v1", "v2"], FeedbackSettings(pre_period_s=600.0))
    desk.record_served([("old", "v1", 99.0, "sticky", "u1")], now=99.0)
    desk.reset(now=100.0, stable="v1")
    desk.record_served([("a", "v2", 101.0, "weighted"), ("p", "v1", 101.0, "pinned")], now=101.0)
    items = [
        {"request_id": rid, "outcome": "click", "value": True, "kind": "binary"}
        for rid in ("a", "a", "p", "nope", "old")
    ]
    results = desk.count(items, {}, now=102.0)
    keys = {k for r in results for k in r}
    assert {"counted", "duplicate", "excluded", "status", "pre_period"} <= keys
    for result in results:
        if "status" not in result:
            openapi.FeedbackResult.model_validate(result)
    openapi.FeedbackBatchResult.model_validate({"counted": 1, "results": results})


def _routes(routes):
    """FastAPI's routes, through the routers `serve.ingress` includes the app's routes with."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from _routes(included.routes)
        elif getattr(route, "methods", None):
            yield route


def test_the_document_names_the_routers_public_routes():
    """Every public route of the router is in the document, and nothing else is: the admin API
    (bearer token) and /status (operators) are left out on purpose."""
    from deployments.router import api

    private = {
        "/status",
        "/admin/rollout",
        "/admin/rollout/history",
        "/admin/rollout/{command}",
        "/admin/waves",
    }
    routes = {(route.path, method.lower()) for route in _routes(api.routes)
              for method in route.methods}  # fmt: skip
    documented = {
        (path, method)
        for path, operations in openapi.openapi_document()["paths"].items()
        for method in operations
    }
    assert documented == {(path, method) for path, method in routes if path not in private}


def test_schemathesis_loads_every_operation():
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_dict(openapi.openapi_document())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(openapi.openapi_document()["paths"])
