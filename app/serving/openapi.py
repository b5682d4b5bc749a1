"""The OpenAPI document of the router's public endpoints, generated from pydantic models.

    python -m app.serving.openapi -o docs/openapi.json     (or `make openapi`)

The models follow the Open Inference Protocol (KServe V2) REST API: server live/ready/metadata,
model and version metadata/ready, infer with a JSON body, plus this router's feedback endpoint
and its error body `{"error", "request_id"}`. The document is for clients, code generators and
the schemathesis run in `tests/integration/test_fuzz_api.py`; the router does not serve it (its
`/openapi.json` is a 404 on purpose: docs/http-api.md). `tests/unit/test_openapi.py` fails when
`docs/openapi.json` differs from what this module generates, and checks the constants copied
below against their sources in `app/`.

Pure on purpose (pydantic and the standard library): it runs without Ray, FastAPI or numpy.
What the document cannot say, because it depends on the deployed model (input names, shapes,
`max_dim`, parameters such as `top_k`), the router checks and answers with a 400.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from app import __version__

__all__ = [
    "DATATYPES",
    "ErrorResponse",
    "FeedbackBatch",
    "FeedbackBatchResult",
    "FeedbackItem",
    "FeedbackResult",
    "InferenceRequest",
    "InferenceResponse",
    "ModelMetadata",
    "ModelReady",
    "RequestInput",
    "RequestOutput",
    "ResponseOutput",
    "ServerLive",
    "ServerMetadata",
    "ServerReady",
    "TensorMetadata",
    "VersionReady",
    "openapi_document",
    "render",
]

# Copies of constants whose sources import numpy or the config loaders; test_openapi.py checks
# each against its source (app.adapters.base.Datatype, app.config.NAME_PATTERN,
# app.rollout.feedback).
Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip
DATATYPES: tuple[str, ...] = get_args(Datatype)
NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$"
MAX_FEEDBACK_ITEMS = 1000
MAX_REQUEST_ID_CHARS = 256

# The demo model (configs/models/recommender): the examples clients and the fuzzer start from.
EXAMPLE_MODEL = "recommender"
EXAMPLE_VERSION = "v1"
EXAMPLE_REQUEST: dict[str, Any] = {
    "id": "req-1",
    "inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [1], "data": ["loves science fiction"]},
        {
            "name": "items",
            "datatype": "BYTES",
            "shape": [2],
            "data": ["a space opera", "a cooking show"],
        },
    ],
    "outputs": [{"name": "ranking"}],
    "parameters": {"top_k": 2},
}

# Parameter values: the protocol's `$parameters` object holds strings, numbers and booleans.
Parameters = dict[str, str | int | float | bool]
# Tensor data in JSON: row-major, flat or nested lists; the element type follows `datatype`.
TensorData = list[bool | int | float | str | list[Any]]


class _Model(BaseModel):
    """Every document here is closed: a field the protocol does not name is refused (requests)
    or never sent (responses), so `additionalProperties` is false throughout."""

    model_config = ConfigDict(extra="forbid")


# -- inference request --------------------------------------------------------------------------


class RequestInput(_Model):
    """One input tensor of an inference request (`$request_input`)."""

    name: str = Field(
        description="The input's name, one the model declares (model metadata).",
        examples=["user"],
    )
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        description="The tensor's shape; its product is the number of elements in `data`.",
        examples=[[1]],
    )
    datatype: Datatype = Field(
        description="The element type; must be the one the model declares.", examples=["BYTES"]
    )
    parameters: Parameters | None = Field(default=None, description="Per-input parameters.")
    data: TensorData = Field(
        description="The elements in row-major order, flat or as nested lists: strings for "
        "BYTES, true/false for BOOL, numbers otherwise (finite; integers for INT and UINT types).",
        examples=[["loves science fiction"]],
    )


class RequestOutput(_Model):
    """An output the client asks for (`$request_output`); each name at most once."""

    name: str = Field(description="The output's name, one the model declares.",
                      examples=["ranking"])  # fmt: skip
    parameters: Parameters | None = Field(
        default=None, description="Per-output parameters (`binary_data`: the binary extension)."
    )


class InferenceRequest(_Model):
    """An inference request (`$inference_request`), JSON form."""

    id: str | None = Field(
        default=None, description="An identifier the response echoes (not the x-request-id)."
    )
    parameters: Parameters | None = Field(
        default=None,
        description="Request parameters, passed to the model (`top_k` for the recommender); "
        "`user_id` is the routing key when the routing-key header is absent.",
    )
    inputs: list[RequestInput] = Field(
        min_length=1,
        description="The input tensors, each input of the model exactly once.",
        examples=[EXAMPLE_REQUEST["inputs"]],
    )
    outputs: list[RequestOutput] | None = Field(
        default=None, description="The outputs to return, each at most once; absent: all."
    )
    # kserve's client sends these; the path decides both, so their values are not read.
    model_name: str | None = Field(default=None, description="Ignored: the path names the model.")
    model_version: str | None = Field(
        default=None, description="Ignored: the path or the pin header names the version."
    )


# -- inference response -------------------------------------------------------------------------


class ResponseOutput(_Model):
    """One output tensor of an inference response (`$response_output`)."""

    name: str = Field(description="The output's name.")
    shape: list[int] = Field(description="The tensor's shape.")
    datatype: Datatype = Field(description="The element type.")
    parameters: Parameters | None = Field(
        default=None, description="`binary_data_size` when the output is sent in binary form."
    )
    data: list[bool | int | float | str] | None = Field(
        default=None, description="The elements, flat, in row-major order (JSON outputs)."
    )


class InferenceResponse(_Model):
    """An inference response (`$inference_response`)."""

    model_name: str = Field(description="The model that answered.")
    model_version: str = Field(description="The version that answered (also x-model-version).")
    id: str | None = Field(default=None, description="The request's `id`, when it had one.")
    parameters: Parameters | None = Field(default=None, description="Response parameters.")
    outputs: list[ResponseOutput] = Field(description="The requested outputs, in request order.")


# -- health and metadata ------------------------------------------------------------------------


class ServerLive(_Model):
    """`GET /v2/health/live`."""

    live: bool = Field(description="Always true when the router answers.")


class ServerReady(_Model):
    """`GET /v2/health/ready`: 200 when ready, 503 when not (the same body)."""

    ready: bool = Field(description="A version with weight has a running replica.")


class ServerMetadata(_Model):
    """`GET /v2` (`$metadata_server_response`)."""

    name: str = Field(description="The server's name.")
    version: str = Field(description="The server's version.")
    extensions: list[str] = Field(description="Protocol extensions (`binary_tensor_data`).")


class TensorMetadata(_Model):
    """An input or output the model declares (`$metadata_tensor`)."""

    name: str = Field(description="The tensor's name.")
    datatype: Datatype = Field(description="The element type.")
    shape: list[int] = Field(description="The shape; -1 is a dimension of any length.")


class ModelMetadata(_Model):
    """`GET /v2/models/{model}` and `.../versions/{version}` (`$metadata_model_response`)."""

    name: str = Field(description="The model's name.")
    versions: list[str] = Field(description="The versions this router can serve.")
    platform: str = Field(description="`ray-rollout/<task>` (e.g. `ray-rollout/recommender`).")
    inputs: list[TensorMetadata] = Field(description="The inputs the model takes.")
    outputs: list[TensorMetadata] = Field(description="The outputs the model returns.")
    parameters: dict[str, str] | None = Field(
        default=None, description="`version`: the version whose tensors are described."
    )


class ModelReady(_Model):
    """`GET /v2/models/{model}/ready`: 200 when ready, 503 when not (the same body)."""

    name: str = Field(description="The model's name.")
    ready: bool = Field(description="A version with weight has a running replica.")


class VersionReady(_Model):
    """`GET /v2/models/{model}/versions/{version}/ready`: 200 or 503 (the same body)."""

    name: str = Field(description="The model's name.")
    version: str = Field(description="The version.")
    ready: bool = Field(description="The version has a running replica.")


# -- feedback -----------------------------------------------------------------------------------


class FeedbackItem(_Model):
    """One outcome for an earlier answer, named by the answer's x-request-id."""

    request_id: str = Field(
        min_length=1, max_length=MAX_REQUEST_ID_CHARS, examples=["req-7f3a"],
        description="The x-request-id of the answer the outcome is for.",
    )  # fmt: skip
    outcome: str = Field(
        pattern=NAME_PATTERN, examples=["click"],
        description="The outcome's name (`click`, `revenue`, ...).",
    )  # fmt: skip
    value: bool | float = Field(
        description="true/false for a binary outcome, a finite number for a continuous one; "
        "an outcome's first value fixes its kind.",
        examples=[True],
    )


class FeedbackBatch(_Model):
    """Several outcomes in one POST."""

    feedback: list[FeedbackItem] = Field(
        min_length=1, max_length=MAX_FEEDBACK_ITEMS, description="The outcomes."
    )


class FeedbackResult(_Model):
    """What became of one outcome."""

    request_id: str = Field(description="The request id the outcome named.")
    outcome: str = Field(description="The outcome's name.")
    version: str | None = Field(default=None, description="The version that answered.")
    counted: bool = Field(description="Whether the outcome was counted for that version.")
    duplicate: bool | None = Field(
        default=None, description="This (request id, outcome) was already counted."
    )
    excluded: str | None = Field(
        default=None,
        description="Why an accepted outcome is not in an A/B arm (a pinned or fallback "
        "answer, or one from before the current experiment).",
    )
    pre_period: bool | None = Field(
        default=None,
        description="An excluded outcome from before the current experiment that was kept "
        "for the next rollout's CUPED pre-period (feedback.pre_period_s set).",
    )
    status: int | None = Field(
        default=None, description="In a batch: the HTTP status this item alone would get."
    )
    error: str | None = Field(default=None, description="In a batch: why the item was refused.")


class FeedbackBatchResult(_Model):
    """The answer to a batch: one result per item, in order."""

    counted: int = Field(description="How many outcomes were counted.")
    results: list[FeedbackResult] = Field(description="One result per item.")


# -- errors -------------------------------------------------------------------------------------


class ErrorResponse(_Model):
    """Every error, whatever its status: JSON, never a plain-text page."""

    error: str = Field(
        description="What is wrong, naming the field or limit; internal detail stays in the log."
    )
    request_id: str = Field(
        description="The request's x-request-id (the client's, or the one Serve created)."
    )


# -- the document -------------------------------------------------------------------------------

_MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse,
    FeedbackBatch,
    FeedbackBatchResult,
    FeedbackItem,
    FeedbackResult,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    VersionReady,
)
_REF = "#/components/schemas/{model}"

_ERROR_DESCRIPTIONS = {
    400: "Bad input: malformed or deeply nested JSON, an unknown, missing or repeated input or "
    "output, a wrong datatype or shape, a bad parameter or header, text that is not valid "
    "Unicode.",
    404: "Unknown model or version (path or pin header); feedback for an unknown request id.",
    408: "The body did not arrive within the request's deadline.",
    410: "Feedback for a request id whose feedback window has closed.",
    413: "The body is over the router's max_body_bytes, or the request over the model's budget.",
    429: "Too many requests queued (Retry-After).",
    500: "The model failed on a valid request and no fallback could serve it.",
    503: "No version can serve it now (Retry-After).",
    504: "No answer within the request's deadline.",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json(schema: dict[str, Any], example: Any = None) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": _ERROR_DESCRIPTIONS[status],
            "content": _json(_ref(ErrorResponse)),
        }
        for status in statuses
    }


def _ok(model: type[BaseModel] | dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    schema = model if isinstance(model, dict) else _ref(model)
    return {"200": {"description": description, "content": _json(schema), **extra}}


def _readiness(model: type[BaseModel], what: str) -> dict[str, Any]:
    body = _json(_ref(model))
    return {
        "200": {"description": f"{what} is ready.", "content": body},
        "503": {"description": f"{what} is not ready (the same document).", "content": body},
    }


def _path_parameter(name: str, description: str, example: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "pattern": NAME_PATTERN},
        "example": example,
    }


def _header(name: str, description: str, schema: dict[str, Any], example: Any = None) -> dict:
    header = {"name": name, "in": "header", "required": False, "description": description,
              "schema": schema}  # fmt: skip
    return header if example is None else {**header, "example": example}


_MODEL = _path_parameter("model", "The model's name.", EXAMPLE_MODEL)
_VERSION = _path_parameter("version", "The version's name.", EXAMPLE_VERSION)
_REQUEST_ID = _header(
    "x-request-id", "Echoed in the response and in error bodies; Serve creates one if absent.",
    {"type": "string", "minLength": 1},
)  # fmt: skip
# The routing headers' names are the defaults of RouterSettings (configurable per app).
_INFER_HEADERS = [
    _REQUEST_ID,
    _header(
        "x-user-id",
        "Routing key: the same key stays on the same version while weights hold.",
        {"type": "string"},
        "alice",
    ),  # fmt: skip
    _header(
        "x-model-version",
        "Pins a version (no fallback unless x-allow-fallback).",
        {"type": "string"},
    ),  # fmt: skip
    _header(
        "x-allow-fallback",
        "`true` lets a pinned request fall back if its version fails.",
        {"type": "string", "enum": ["true", "false"]},
    ),  # fmt: skip
    _header(
        "x-request-timeout-s",
        "This request's deadline in seconds, capped by the "
        "router's request_timeout_s; 504 after it.",
        {"type": "number", "exclusiveMinimum": 0},
        2.5,
    ),  # fmt: skip
    _header("cache-control", "`no-cache` bypasses the response cache.", {"type": "string"}),
]
_INFER_RESPONSE_HEADERS = {
    "inference-header-content-length": {
        "description": "Binary responses: the length of the JSON part.",
        "required": False,
        "schema": {"type": "integer", "minimum": 1},
    },
    "x-model-version": {
        "description": "The version that served the request.",
        "required": True,
        "schema": {"type": "string"},
    },
    "x-routing-decision": {
        "description": "How the version was chosen: pinned, sticky, weighted, fallback, stable.",
        "required": True,
        "schema": {
            "type": "string",
            "enum": ["pinned", "sticky", "weighted", "fallback", "stable"],
        },
    },
}


_BINARY_RESPONSE = {
    "application/octet-stream": {
        "schema": {
            "type": "string",
            "format": "binary",
            "description": "An InferenceResponse as JSON, Inference-Header-Content-Length "
            "bytes long, then each binary output's bytes (its `binary_data_size`), in order.",
        }
    }
}


def _infer_operation(operation_id: str, summary: str, parameters: list[dict[str, Any]]) -> dict:
    return {
        "operationId": operation_id,
        "summary": summary,
        "tags": ["inference"],
        "parameters": [*parameters, *_INFER_HEADERS],
        "requestBody": {
            "required": True,
            "content": _json(_ref(InferenceRequest), EXAMPLE_REQUEST),
        },
        "responses": {
            "200": {
                "description": "The outputs: JSON, or the binary tensor extension when the "
                "request asks for binary outputs (`binary_data_output`, or an output's "
                "`binary_data`).",
                "headers": _INFER_RESPONSE_HEADERS,
                "content": {**_json(_ref(InferenceResponse)), **_BINARY_RESPONSE},
            },
            **_errors(400, 404, 408, 413, 429, 500, 503, 504),
        },
    }


def _get(operation_id: str, summary: str, parameters: list[dict[str, Any]],
         responses: dict[str, Any], tag: str) -> dict[str, Any]:  # fmt: skip
    return {"get": {"operationId": operation_id, "summary": summary, "tags": [tag],
                    "parameters": [*parameters, _REQUEST_ID], "responses": responses}}  # fmt: skip


def _paths() -> dict[str, Any]:
    feedback_body = {"anyOf": [_ref(FeedbackItem), _ref(FeedbackBatch)]}
    feedback_answer = {"anyOf": [_ref(FeedbackResult), _ref(FeedbackBatchResult)]}
    return {
        "/v2": _get("server_metadata", "Server metadata.", [],
                    _ok(ServerMetadata, "The server's metadata."), "health"),
        "/v2/health/live": _get("server_live", "Liveness.", [],
                                _ok(ServerLive, "The router is live."), "health"),
        "/v2/health/ready": _get("server_ready", "Readiness.", [],
                                 _readiness(ServerReady, "The server"), "health"),
        "/v2/models/{model}": _get(
            "model_metadata", "Model metadata (the stable version's tensors).", [_MODEL],
            {**_ok(ModelMetadata, "The model's metadata."), **_errors(404, 503)}, "metadata",
        ),
        "/v2/models/{model}/ready": _get(
            "model_ready", "Model readiness.", [_MODEL],
            {**_readiness(ModelReady, "The model"), **_errors(404)}, "health",
        ),
        "/v2/models/{model}/versions/{version}": _get(
            "version_metadata", "One version's metadata.", [_MODEL, _VERSION],
            {**_ok(ModelMetadata, "The version's metadata."), **_errors(404)}, "metadata",
        ),
        "/v2/models/{model}/versions/{version}/ready": _get(
            "version_ready", "One version's readiness.", [_MODEL, _VERSION],
            {**_readiness(VersionReady, "The version"), **_errors(404)}, "health",
        ),
        "/v2/models/{model}/infer": {"post": _infer_operation(
            "model_infer", "Inference; the version is chosen by pin header, key or weights.",
            [_MODEL],
        )},
        "/v2/models/{model}/versions/{version}/infer": {"post": _infer_operation(
            "version_infer", "Inference pinned to a version.", [_MODEL, _VERSION],
        )},
        "/v2/models/{model}/feedback": {"post": {
            "operationId": "feedback",
            "summary": "Outcomes for earlier answers, counted once per (request id, outcome).",
            "tags": ["feedback"],
            "parameters": [_MODEL, _REQUEST_ID],
            "requestBody": {"required": True, "content": _json(
                feedback_body, {"request_id": "req-7f3a", "outcome": "click", "value": True}
            )},
            "responses": {
                **_ok(feedback_answer, "The result (one item) or results (a batch)."),
                **_errors(400, 404, 410, 413, 503),
            },
        }},
    }  # fmt: skip


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document: paths above, schemas from the pydantic models."""
    _, definitions = models_json_schema(
        [(model, "validation") for model in _MODELS], ref_template=_REF
    )
    schemas = dict(sorted(definitions["$defs"].items()))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ray-rollout router: Open Inference Protocol (KServe V2)",
            "version": __version__,
            "description": "The router's public HTTP API (docs/http-api.md): the V2 endpoints "
            "with JSON bodies and the feedback endpoint. Generated by "
            "`python -m app.serving.openapi` from app/serving/openapi.py; not served by the "
            "router. The admin API (bearer token) is in docs/rollouts.md.",
        },
        "servers": [{"url": "http://127.0.0.1:8000"}],
        "paths": _paths(),
        "components": {"schemas": schemas},
    }


def render() -> str:
    """The document as docs/openapi.json holds it: indented, key order kept, a final newline."""
    return json.dumps(openapi_document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m app.serving.openapi", description=__doc__.splitlines()[0]
    )
    parser.add_argument("-o", "--output", help="write the document here instead of stdout")
    args = parser.parse_args(argv)
    text = render()
    if args.output is None:
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
