"""Hostile V2 bodies: invalid Unicode, deep nesting, duplicated outputs, and a property test
that decoding anything at all raises nothing but InvalidInput (a 400), never a 500."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.adapters.base import TensorSpec
from app.errors import InvalidInput, http_status
from app.serving.protocol import check_request, decode_body, encode_infer_response
from app.unicode import is_unicode, printable

TEXT = TensorSpec(name="text", datatype="BYTES", shape=(-1,), max_dim=8)
VEC = TensorSpec(name="vec", datatype="FP32", shape=(-1, 2), max_dim=4)
OUTPUTS = (
    TensorSpec(name="scores", datatype="FP32", shape=(-1,)),
    TensorSpec(name="labels", datatype="BYTES", shape=(-1,)),
)
SURROGATE = "\ud800"  # what json.loads makes of the escape "\\ud800"


def body(**document) -> bytes:
    # ensure_ascii (the default) writes a lone surrogate as the escape a client would send.
    return json.dumps(document).encode()


def request(**fields) -> dict:
    return {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}],
        **fields,
    }


def refused(raw: bytes, match: str) -> InvalidInput:
    with pytest.raises(InvalidInput, match=match) as info:
        check_request(decode_body(raw, header_length=None), (TEXT,), OUTPUTS)
    assert http_status(info.value) == 400
    return info.value


@pytest.mark.parametrize(
    ("document", "field"),
    [
        (request(inputs=[{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["ok", "a" + SURROGATE]}]),
         r"input 'text' \(BYTES\): element 1 is not valid Unicode"),
        (request(id="req-" + SURROGATE), r"^id is not valid Unicode"),
        (request(parameters={"user_id": SURROGATE}), r"parameter 'user_id' is not valid Unicode"),
        (request(parameters={SURROGATE: 1}), r"a parameter name is not valid Unicode"),
        (request(outputs=[{"name": SURROGATE}]), r"outputs\[0\]\.name is not valid Unicode"),
        ({**request(), SURROGATE: 1}, r"a request field name is not valid Unicode"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(document, field):
    refused(body(**document), field)


def test_deeply_nested_json_is_a_400_not_a_recursion_error():
    deep = b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    refused(deep, "nested too deeply")


def test_a_repeated_output_name_is_a_400():
    refused(
        body(**request(outputs=[{"name": "scores"}, {"name": "scores"}])),
        r"outputs\[1\]: output 'scores' is requested twice",
    )


def test_printable_escapes_what_utf8_cannot_carry():
    assert printable("José") == "José"
    assert printable("a" + SURROGATE) == "a\\ud800"
    assert is_unicode(printable("a" + SURROGATE))


# -- property tests ---------------------------------------------------------------------------

# Any code point, lone surrogates included (hypothesis leaves them out by default).
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()))
JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | ANY_TEXT
JSON = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4)
    ),
    max_leaves=20,
)
TENSOR = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["text", "vec", "other"]),
        "datatype": st.sampled_from(["BYTES", "FP32", "INT8"]),
    },
    optional={
        "shape": st.lists(st.integers(-2, 5) | st.booleans(), max_size=3),
        "data": JSON,
        "parameters": JSON,
    },
)
DOCUMENT = st.fixed_dictionaries(
    {"inputs": st.lists(TENSOR, max_size=3) | JSON},
    optional={"id": JSON, "outputs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["scores", "labels", "x"])}), max_size=3) | JSON,
              "parameters": JSON},
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=DOCUMENT | JSON)
def test_decoding_any_json_raises_nothing_but_invalid_input(document):
    raw = json.dumps(document).encode()
    try:
        request = check_request(decode_body(raw, header_length=None), (TEXT, VEC), OUTPUTS)
    except InvalidInput as exc:
        assert is_unicode(printable(exc.message))
        return
    for array in request.inputs.values():  # what passes reaches a model: it must be clean
        if array.dtype == object:
            assert all(isinstance(x, str) and is_unicode(x) for x in array.ravel())
        else:
            assert np.all(np.isfinite(array))


@settings(max_examples=300, deadline=None)
@given(
    raw=st.binary(max_size=256),
    header=st.none() | st.text(max_size=6) | st.integers(-5, 300).map(str),
)
def test_decoding_any_bytes_raises_nothing_but_invalid_input(raw, header):
    try:
        check_request(decode_body(raw, header_length=header), (TEXT, VEC), OUTPUTS)
    except InvalidInput:
        pass


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.text().filter(is_unicode), min_size=1, max_size=8),
    scores=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=8
    ),
    binary=st.booleans(),
    request_id=st.none() | st.text(max_size=20).filter(is_unicode),
)
def test_encode_then_decode_round_trips_exactly(texts, scores, binary, request_id):
    document = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]
    }
    if request_id is not None:
        document["id"] = request_id
    if binary:
        document["parameters"] = {"binary_data_output": True}
    parsed = check_request(
        decode_body(json.dumps(document).encode(), header_length=None), (TEXT,), OUTPUTS
    )
    assert list(parsed.inputs["text"]) == texts and parsed.id == request_id
    result = {
        "scores": np.asarray(scores, dtype=np.float32),
        "labels": np.asarray(texts, dtype=object),
    }
    content, headers = encode_infer_response(
        model="m", version="v1", request=parsed, result=result, outputs=OUTPUTS
    )
    length = headers.get("inference-header-content-length")
    head = json.loads(content[: int(length)] if length else content)
    assert head.get("id") == request_id and [o["name"] for o in head["outputs"]] == [
        "scores",
        "labels",
    ]
    if not binary:  # the labels tensor is itself a valid V2 BYTES input that decodes back
        labels = {**head["outputs"][1], "name": "text"}
        again = check_request(
            decode_body(json.dumps({"inputs": [labels]}).encode(), header_length=None),
            (TEXT,),
            OUTPUTS,
        )
        assert list(again.inputs["text"]) == texts
        assert np.array_equal(
            np.asarray(head["outputs"][0]["data"], dtype=np.float32), result["scores"]
        )
    else:
        tail = content[int(length) :]
        sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
        assert sum(sizes) == len(tail)
        assert np.array_equal(np.frombuffer(tail[: sizes[0]], dtype=np.float32), result["scores"])
