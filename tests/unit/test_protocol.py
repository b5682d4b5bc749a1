"""The Open Inference Protocol (V2) codec: JSON and binary-extension requests, responses."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from app.adapters.base import NUMPY_DTYPES, TensorSpec
from app.errors import InvalidInput, http_status
from app.serving.protocol import (
    INFERENCE_HEADER,
    InferRequest,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
)

USER = TensorSpec(name="user", datatype="BYTES", shape=(-1,), max_dim=4)
ITEMS = TensorSpec(name="items", datatype="BYTES", shape=(-1,), max_dim=8)
EMB = TensorSpec(name="emb", datatype="FP32", shape=(-1, 3), max_dim=4)
CODES = TensorSpec(name="codes", datatype="INT8", shape=(-1,))
IDS = TensorSpec(name="ids", datatype="INT64", shape=(-1,))
FLAGS = TensorSpec(name="flags", datatype="BOOL", shape=(-1,))

INPUTS = (USER, ITEMS, EMB)
OUTPUTS = (
    TensorSpec(name="scores", datatype="FP32", shape=(-1, -1)),
    TensorSpec(name="ranking", datatype="INT64", shape=(-1, -1)),
    TensorSpec(name="labels", datatype="BYTES", shape=(-1,)),
)


# ----------------------------------------------------------------------------- helpers


def valid_inputs() -> list[dict]:
    return [
        {"name": "user", "datatype": "BYTES", "shape": [1], "data": ["likes films"]},
        {"name": "items", "datatype": "BYTES", "shape": [2], "data": ["space opera", "cooking"]},
        {"name": "emb", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]},
    ]


def parse(document, *, inputs=INPUTS, outputs=OUTPUTS, binary: bytes = b"", header_length=None):
    """Parse a JSON document (or raw bytes) as a request body."""
    if isinstance(document, bytes):
        head = document
    else:
        head = json.dumps(document, separators=(",", ":")).encode()
    if binary and header_length is None:
        header_length = str(len(head))
    return parse_infer_request(
        head + binary, header_length=header_length, inputs=inputs, outputs=outputs
    )


def with_input(name: str, **changes) -> dict:
    """The valid request with one input's fields changed (a value of None removes the field)."""
    tensors = valid_inputs()
    for tensor in tensors:
        if tensor["name"] == name:
            for key, value in changes.items():
                if value is None:
                    tensor.pop(key, None)
                else:
                    tensor[key] = value
    return {"inputs": tensors}


def invalid(document, match: str | None, **kwargs) -> InvalidInput:
    with pytest.raises(InvalidInput, match=match) as info:
        parse(document, **kwargs)
    assert http_status(info.value) == 400
    return info.value


def bytes_chunk(strings) -> bytes:
    """BYTES elements as tritonclient serializes them: 4-byte LE length, then the utf-8 bytes."""
    parts = []
    for text in strings:
        data = text.encode("utf-8")
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def binary_request(tensors, *, outputs=None, parameters=None, request_id=None):
    """A body built like tritonclient's: JSON header (binary_data_size per binary input), then
    every binary input's bytes in input order. Returns (body, Inference-Header-Content-Length).

    `tensors`: (name, datatype, shape, chunk-bytes or JSON data list, is_binary)."""
    document: dict = {}
    if request_id is not None:
        document["id"] = request_id
    document["inputs"] = []
    chunks = []
    for name, datatype, shape, payload, is_binary in tensors:
        tensor = {"name": name, "shape": shape, "datatype": datatype}
        if is_binary:
            tensor["parameters"] = {"binary_data_size": len(payload)}
            chunks.append(payload)
        else:
            tensor["data"] = payload
        document["inputs"].append(tensor)
    if outputs is not None:
        document["outputs"] = outputs
    if parameters is not None:
        document["parameters"] = parameters
    head = json.dumps(document, separators=(",", ":")).encode()
    return head + b"".join(chunks), str(len(head))


def decode_response(body: bytes, headers: dict[str, str]) -> tuple[dict, dict[str, np.ndarray]]:
    """Decode a V2 response (JSON or binary form) into its document and numpy arrays."""
    if INFERENCE_HEADER in headers:
        length = int(headers[INFERENCE_HEADER])
        head, binary = body[:length], body[length:]
    else:
        head, binary = body, b""
    document = json.loads(head)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in document["outputs"]:
        shape = tuple(tensor["shape"])
        size = tensor.get("parameters", {}).get("binary_data_size")
        if size is None:
            dtype = NUMPY_DTYPES[tensor["datatype"]]
            arrays[tensor["name"]] = np.array(tensor["data"], dtype=dtype).reshape(shape)
            continue
        chunk = binary[offset : offset + size]
        offset += size
        if tensor["datatype"] == "BYTES":
            items, pos = [], 0
            while pos < len(chunk):
                (n,) = struct.unpack_from("<I", chunk, pos)
                items.append(chunk[pos + 4 : pos + 4 + n].decode("utf-8"))
                pos += 4 + n
            arrays[tensor["name"]] = np.array(items, dtype=object).reshape(shape)
        else:
            dtype = NUMPY_DTYPES[tensor["datatype"]]
            arrays[tensor["name"]] = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    assert offset == len(binary), "response has binary bytes no output claims"
    return document, arrays


def result_tensors() -> dict[str, np.ndarray]:
    return {
        "scores": np.array([[0.5, -1.25, 3.0]], dtype=np.float32),
        "ranking": np.array([[2, 0, 1]], dtype=np.int64),
        "labels": np.array(["héllo", "", "world"], dtype=object),
    }


# ----------------------------------------------------------------------------- valid JSON


def test_valid_json_request_flat_data():
    request = parse({"id": "req-1", "inputs": valid_inputs()})
    assert request.id == "req-1"
    assert set(request.inputs) == {"user", "items", "emb"}
    user, items, emb = request.inputs["user"], request.inputs["items"], request.inputs["emb"]
    assert user.dtype == object and user.shape == (1,) and user.tolist() == ["likes films"]
    assert items.dtype == object and items.tolist() == ["space opera", "cooking"]
    assert emb.dtype == np.float32 and emb.shape == (2, 3)
    np.testing.assert_array_equal(emb, [[1, 2, 3], [4, 5, 6]])
    assert request.parameters == {}
    assert request.outputs == ()
    assert request.binary_outputs == frozenset()


def test_valid_json_request_nested_data_equals_flat():
    flat = parse({"inputs": valid_inputs()})
    nested = parse(with_input("emb", data=[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    assert nested.inputs["emb"].shape == (2, 3)
    np.testing.assert_array_equal(nested.inputs["emb"], flat.inputs["emb"])
    assert nested.id is None


def test_inputs_may_come_in_any_order():
    tensors = valid_inputs()[::-1]
    request = parse({"inputs": tensors})
    assert request.inputs["user"].tolist() == ["likes films"]
    assert request.inputs["emb"].shape == (2, 3)


def test_int_and_bool_tensors_parse_to_their_dtypes():
    request = parse(
        {
            "inputs": [
                {"name": "codes", "datatype": "INT8", "shape": [3], "data": [-128, 0, 127]},
                {"name": "flags", "datatype": "BOOL", "shape": [2], "data": [True, False]},
            ]
        },
        inputs=(CODES, FLAGS),
    )
    assert request.inputs["codes"].dtype == np.int8
    assert request.inputs["codes"].tolist() == [-128, 0, 127]
    assert request.inputs["flags"].dtype == np.bool_
    assert request.inputs["flags"].tolist() == [True, False]


def test_model_parameters_are_kept_and_protocol_parameters_dropped():
    request = parse(
        {
            "inputs": valid_inputs(),
            "parameters": {"top_k": 2, "binary_data_output": False, "priority": 1, "timeout": 5},
        }
    )
    assert request.parameters == {"top_k": 2}


# ----------------------------------------------------------------------------- invalid requests


def test_malformed_json():
    invalid(b'{"inputs": [', "request body is not valid JSON")


def test_body_not_utf8():
    invalid(b"\xff\xfe\x00{", "request body is not valid JSON")


@pytest.mark.parametrize("document", [[], "inputs", 3, None])
def test_body_not_an_object(document):
    invalid(document, "request body must be a JSON object with an 'inputs' list")


def test_unknown_top_level_field():
    error = invalid({"inputs": valid_inputs(), "input": []}, "unknown request field")
    assert "['input']" in error.message


def test_id_must_be_a_string():
    invalid({"id": 7, "inputs": valid_inputs()}, "id must be a string")


@pytest.mark.parametrize("inputs", [None, [], {}, "user"])
def test_inputs_missing_or_not_a_nonempty_list(inputs):
    document = {} if inputs is None else {"inputs": inputs}
    invalid(document, "inputs must be a non-empty list of tensors")


def test_input_not_an_object():
    invalid({"inputs": [valid_inputs()[0], "items"]}, re.escape("inputs[1] must be an object"))


def test_input_name_not_a_string():
    tensors = valid_inputs()
    tensors[2]["name"] = 5
    invalid({"inputs": tensors}, re.escape("inputs[2].name must be a string"))


def test_unknown_input():
    tensors = valid_inputs() + [{"name": "age", "datatype": "INT8", "shape": [1], "data": [3]}]
    error = invalid({"inputs": tensors}, "unexpected input 'age'")
    assert "user, items, emb" in error.message


def test_duplicate_input():
    tensors = valid_inputs() + [valid_inputs()[1]]
    invalid({"inputs": tensors}, "input 'items' is given twice")


def test_missing_input():
    error = invalid({"inputs": valid_inputs()[:2]}, re.escape("missing input(s) ['emb']"))
    assert "user, items, emb" in error.message


def test_unknown_field_in_input():
    invalid(
        with_input("user", contents=["x"]), re.escape("input 'user': unknown field(s) ['contents']")
    )


@pytest.mark.parametrize("datatype", ["FP64", "fp32", None])
def test_wrong_datatype(datatype):
    document = with_input("emb", datatype=datatype)  # None removes the field
    error = invalid(document, "input 'emb' has datatype")
    assert f"{datatype!r}" in error.message
    assert "expected 'FP32'" in error.message


@pytest.mark.parametrize("shape", [None, "2,3", [2, -3], [2.0, 3], [True, 3]])
def test_shape_not_a_list_of_nonnegative_ints(shape):
    document = with_input("emb", shape=shape)  # None removes the field
    invalid(document, "input 'emb': shape must be a list of non-negative integers")


def test_wrong_shape_rank():
    error = invalid(
        with_input("emb", shape=[6]),
        re.escape("input 'emb': shape [6] has 1 dimensions, expected 2"),
    )
    assert "[-1, 3]" in error.message


def test_fixed_dimension_mismatch():
    invalid(
        with_input("emb", shape=[3, 2]),
        re.escape("input 'emb': shape [3, 2] does not match the model's [-1, 3]"),
    )


def test_dimension_over_max_dim():
    items = ["x"] * 9
    invalid(
        with_input("items", shape=[9], data=items),
        re.escape("input 'items': shape [9]: dimension 9 must be between 1 and 8"),
    )


def test_dimension_at_max_dim_is_accepted():
    items = [f"item {i}" for i in range(8)]
    request = parse(with_input("items", shape=[8], data=items))
    assert request.inputs["items"].tolist() == items


def test_zero_dimension():
    invalid(
        with_input("items", shape=[0], data=[]),
        re.escape("input 'items': shape [0]: dimension 0 must be between 1 and 8"),
    )


def test_no_data():
    invalid(with_input("user", data=None), "input 'user' has no data")


@pytest.mark.parametrize(
    ("data", "count"), [([1, 2, 3, 4, 5], 5), ([[1, 2, 3], [4, 5, 6], [7]], 7), (1.5, 1)]
)
def test_element_count_does_not_match_shape(data, count):
    invalid(
        with_input("emb", data=data),
        re.escape(f"input 'emb' has {count} elements but shape [2, 3] needs 6"),
    )


def test_data_holding_objects():
    invalid(
        with_input("emb", data=[1, 2, 3, {"x": 4}, 5, 6]),
        "input 'emb': data must hold values or lists",
    )


@pytest.mark.parametrize(
    ("bad", "kind"), [(3, "int"), (None, "NoneType"), (True, "bool"), (1.5, "float")]
)
def test_bytes_element_not_a_string(bad, kind):
    invalid(
        with_input("items", data=["ok", bad]),
        re.escape(f"input 'items' (BYTES): element 1 is {kind}, expected a string"),
    )


def test_bytes_nested_lists_are_flattened():
    request = parse(with_input("items", data=[["ok"], ["x"]]))
    assert request.inputs["items"].tolist() == ["ok", "x"]


def test_integer_tensor_given_floats():
    invalid(
        {"inputs": [{"name": "codes", "datatype": "INT8", "shape": [2], "data": [1, 2.0]}]},
        re.escape("input 'codes' (INT8): elements must be integers"),
        inputs=(CODES,),
    )


@pytest.mark.parametrize("spec", [CODES, EMB])
def test_bool_given_for_a_number(spec):
    shape = [1] if spec is CODES else [1, 3]
    data = [True] if spec is CODES else [1.0, True, 2.0]
    invalid(
        {"inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": shape, "data": data}]},
        re.escape(f"input '{spec.name}' ({spec.datatype}): element True is not a number"),
        inputs=(spec,),
    )


def test_string_given_for_a_number():
    invalid(
        {"inputs": [{"name": "codes", "datatype": "INT8", "shape": [1], "data": ["7"]}]},
        re.escape("input 'codes' (INT8): element '7' is not a number"),
        inputs=(CODES,),
    )


def test_number_given_for_bool():
    invalid(
        {"inputs": [{"name": "flags", "datatype": "BOOL", "shape": [2], "data": [True, 1]}]},
        re.escape("input 'flags' (BOOL): every element must be true or false"),
        inputs=(FLAGS,),
    )


@pytest.mark.parametrize("value", [128, -129, 2**63, -(2**70)])
def test_int_out_of_range_for_int8(value):
    invalid(
        {"inputs": [{"name": "codes", "datatype": "INT8", "shape": [2], "data": [0, value]}]},
        re.escape("input 'codes' (INT8): value out of range [-128, 127]"),
        inputs=(CODES,),
    )


def test_int64_extremes_are_accepted():
    request = parse(
        {
            "inputs": [
                {"name": "ids", "datatype": "INT64", "shape": [2], "data": [-(2**63), 2**63 - 1]}
            ]
        },
        inputs=(IDS,),
    )
    assert request.inputs["ids"].dtype == np.int64
    assert request.inputs["ids"].tolist() == [-(2**63), 2**63 - 1]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_floats(literal):
    body = (
        '{"inputs":[{"name":"emb","datatype":"FP32","shape":[1,3],"data":[1.0,'
        + literal
        + ",2.0]}]}"
    ).encode()
    invalid(body, re.escape("input 'emb' (FP32): values must be finite"), inputs=(EMB,))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_float_overflowing_fp32_is_non_finite():
    invalid(
        {
            "inputs": [
                {"name": "emb", "datatype": "FP32", "shape": [1, 3], "data": [1.0, 1e39, 2.0]}
            ]
        },
        re.escape("input 'emb' (FP32): values must be finite"),
        inputs=(EMB,),
    )


def test_integer_too_large_for_any_float_is_invalid_input():
    # A 400-digit JSON integer for an FP32 input is a client error (400), not a server crash.
    body = (
        '{"inputs":[{"name":"emb","datatype":"FP32","shape":[1,3],"data":[1,%s,2]}]}' % ("9" * 400)
    ).encode()
    invalid(body, "input 'emb'", inputs=(EMB,))


def test_integer_with_too_many_digits_is_invalid_input():
    # Python refuses to parse ints over 4300 digits (ValueError, not JSONDecodeError).
    body = (
        '{"inputs":[{"name":"ids","datatype":"INT64","shape":[1],"data":[%s]}]}' % ("9" * 5000)
    ).encode()
    invalid(body, None, inputs=(IDS,))  # any InvalidInput (400) will do; today a ValueError escapes


@pytest.mark.parametrize(
    ("parameters", "match"),
    [
        ([1], "request: parameters must be an object"),
        ({"top_k": [1]}, "request: parameter 'top_k' must be a string, number or boolean"),
        ({"opts": {"a": 1}}, "request: parameter 'opts' must be a string, number or boolean"),
        ({"x": None}, "request: parameter 'x' must be a string, number or boolean"),
    ],
)
def test_bad_request_parameters(parameters, match):
    invalid({"inputs": valid_inputs(), "parameters": parameters}, re.escape(match))


def test_bad_input_parameters():
    invalid(
        with_input("user", parameters="binary"),
        re.escape("input 'user': parameters must be an object"),
    )
    invalid(
        with_input("user", parameters={"p": [1]}),
        re.escape("input 'user': parameter 'p' must be a string, number or boolean"),
    )


def test_bad_output_parameters():
    invalid(
        {"inputs": valid_inputs(), "outputs": [{"name": "scores", "parameters": 3}]},
        re.escape("output 'scores': parameters must be an object"),
    )


# ----------------------------------------------------------------------------- binary extension


def test_binary_bytes_fp32_int64_inputs():
    users = ["likes science fiction", "héllo wörld ✓"]
    emb = np.array([[1.5, -2.0, 3.25], [0.0, 1e-3, -7.5]], dtype=np.float32)
    ids = np.array([-(2**40), 7, 2**62], dtype=np.int64)
    inputs = (USER, EMB, IDS)
    body, length = binary_request(
        [
            ("user", "BYTES", [2], bytes_chunk(users), True),
            ("emb", "FP32", [2, 3], emb.astype("<f4").tobytes(), True),
            ("ids", "INT64", [3], ids.astype("<i8").tobytes(), True),
        ]
    )
    request = parse_infer_request(body, header_length=length, inputs=inputs, outputs=OUTPUTS)
    assert request.inputs["user"].dtype == object
    assert request.inputs["user"].tolist() == users
    assert request.inputs["emb"].dtype == np.float32
    np.testing.assert_array_equal(request.inputs["emb"], emb)
    assert request.inputs["ids"].dtype == np.int64
    np.testing.assert_array_equal(request.inputs["ids"], ids)
    # the parsed arrays are writable copies, not views of the request body
    assert request.inputs["emb"].flags.writeable


def test_binary_bytes_empty_string_element():
    body, length = binary_request([("user", "BYTES", [3], bytes_chunk(["", "a", ""]), True)])
    request = parse_infer_request(body, header_length=length, inputs=(USER,), outputs=OUTPUTS)
    assert request.inputs["user"].tolist() == ["", "a", ""]


def test_binary_and_json_inputs_mixed():
    emb = np.arange(6, dtype=np.float32).reshape(2, 3)
    body, length = binary_request(
        [
            ("user", "BYTES", [1], ["json user"], False),
            ("items", "BYTES", [2], bytes_chunk(["a", "b"]), True),
            ("emb", "FP32", [2, 3], emb.tobytes(), True),
        ]
    )
    request = parse_infer_request(body, header_length=length, inputs=INPUTS, outputs=OUTPUTS)
    assert request.inputs["user"].tolist() == ["json user"]
    assert request.inputs["items"].tolist() == ["a", "b"]
    np.testing.assert_array_equal(request.inputs["emb"], emb)


def test_binary_request_built_by_tritonclient():
    httpclient = pytest.importorskip("tritonclient.http")
    users = np.array(["u1", "ü2"], dtype=object)
    emb = np.array([[1, 2, 3]], dtype=np.float32)
    user_in = httpclient.InferInput("user", [2], "BYTES")
    user_in.set_data_from_numpy(users, binary_data=True)
    items_in = httpclient.InferInput("items", [1], "BYTES")
    items_in.set_data_from_numpy(np.array(["it"], dtype=object), binary_data=False)
    emb_in = httpclient.InferInput("emb", [1, 3], "FP32")
    emb_in.set_data_from_numpy(emb, binary_data=True)
    body, length = httpclient.InferenceServerClient.generate_request_body(
        [user_in, items_in, emb_in],
        outputs=[httpclient.InferRequestedOutput("scores", binary_data=True)],
        request_id="tc-1",
        parameters={"top_k": 1},
    )
    request = parse_infer_request(
        body, header_length=None if length is None else str(length), inputs=INPUTS, outputs=OUTPUTS
    )
    assert request.id == "tc-1"
    assert request.inputs["user"].tolist() == ["u1", "ü2"]
    assert request.inputs["items"].tolist() == ["it"]
    np.testing.assert_array_equal(request.inputs["emb"], emb)
    assert request.outputs == ("scores",)
    assert request.binary_outputs == {"scores"}
    assert request.parameters == {"top_k": 1}


def test_binary_fp32_size_does_not_match_shape():
    emb = np.zeros(5, dtype=np.float32).tobytes()  # shape [2, 3] needs 24 bytes
    body, length = binary_request([("emb", "FP32", [2, 3], emb, True)])
    with pytest.raises(
        InvalidInput,
        match=re.escape("input 'emb': binary_data_size is 20 bytes but shape needs 24 (6 x 4)"),
    ):
        parse_infer_request(body, header_length=length, inputs=(EMB,), outputs=OUTPUTS)


def test_binary_int64_overlong():
    ids = np.arange(3, dtype=np.int64).tobytes() + b"\x00" * 8
    body, length = binary_request([("ids", "INT64", [3], ids, True)])
    with pytest.raises(
        InvalidInput,
        match=re.escape("input 'ids': binary_data_size is 32 bytes but shape needs 24 (3 x 8)"),
    ):
        parse_infer_request(body, header_length=length, inputs=(IDS,), outputs=OUTPUTS)


def test_binary_bytes_truncated_before_element():
    chunk = bytes_chunk(["one"])  # shape says 2 elements
    body, length = binary_request([("user", "BYTES", [2], chunk, True)])
    with pytest.raises(
        InvalidInput, match=re.escape("input 'user': binary BYTES data ends before element 1")
    ):
        parse_infer_request(body, header_length=length, inputs=(USER,), outputs=OUTPUTS)


def test_binary_bytes_truncated_length_prefix():
    chunk = bytes_chunk(["one"]) + b"\x02\x00"  # half a length prefix for element 1
    body, length = binary_request([("user", "BYTES", [2], chunk, True)])
    with pytest.raises(
        InvalidInput, match=re.escape("input 'user': binary BYTES data ends before element 1")
    ):
        parse_infer_request(body, header_length=length, inputs=(USER,), outputs=OUTPUTS)


def test_binary_bytes_element_runs_past_data():
    chunk = bytes_chunk(["one"]) + struct.pack("<I", 10) + b"abc"
    body, length = binary_request([("user", "BYTES", [2], chunk, True)])
    with pytest.raises(
        InvalidInput, match=re.escape("input 'user': binary BYTES element 1 runs past its data")
    ):
        parse_infer_request(body, header_length=length, inputs=(USER,), outputs=OUTPUTS)


def test_binary_bytes_overlong():
    chunk = bytes_chunk(["one", "two", "three"])  # shape says 2 elements
    body, length = binary_request([("user", "BYTES", [2], chunk, True)])
    with pytest.raises(
        InvalidInput,
        match=re.escape("input 'user': binary BYTES data has 9 bytes after 2 elements"),
    ):
        parse_infer_request(body, header_length=length, inputs=(USER,), outputs=OUTPUTS)


def test_binary_bytes_not_utf8():
    chunk = bytes_chunk(["ok"]) + struct.pack("<I", 2) + b"\xff\xfe"
    body, length = binary_request([("user", "BYTES", [2], chunk, True)])
    with pytest.raises(
        InvalidInput, match=re.escape("input 'user': binary BYTES element 1 is not valid UTF-8")
    ):
        parse_infer_request(body, header_length=length, inputs=(USER,), outputs=OUTPUTS)


def test_binary_data_size_runs_past_body():
    emb = np.zeros(6, dtype=np.float32).tobytes()
    body, length = binary_request([("emb", "FP32", [2, 3], emb, True)])
    with pytest.raises(
        InvalidInput,
        match=re.escape(
            "input 'emb': binary_data_size (24) runs past the binary data (20 bytes left)"
        ),
    ):
        parse_infer_request(body[:-4], header_length=length, inputs=(EMB,), outputs=OUTPUTS)


def test_unclaimed_trailing_binary_bytes():
    emb = np.zeros(6, dtype=np.float32).tobytes()
    body, length = binary_request([("emb", "FP32", [2, 3], emb, True)])
    with pytest.raises(
        InvalidInput, match=re.escape("5 bytes of binary data are not claimed by any input")
    ):
        parse_infer_request(body + b"extra", header_length=length, inputs=(EMB,), outputs=OUTPUTS)


def test_binary_bytes_with_json_only_request():
    head = json.dumps({"inputs": [valid_inputs()[0]]}).encode()
    with pytest.raises(
        InvalidInput, match=re.escape("3 bytes of binary data are not claimed by any input")
    ):
        parse_infer_request(
            head + b"abc", header_length=str(len(head)), inputs=(USER,), outputs=OUTPUTS
        )


def test_both_data_and_binary_data_size():
    document = with_input("user", parameters={"binary_data_size": 7})
    invalid(
        document,
        re.escape("input 'user': give either data or binary_data_size, not both"),
        binary=bytes_chunk(["abc"]),
    )


@pytest.mark.parametrize("size", [-1, 1.5, True, "7"])
def test_bad_binary_data_size(size):
    document = with_input("user", data=None, parameters={"binary_data_size": size})
    invalid(
        document,
        re.escape("input 'user': binary_data_size must be a non-negative integer"),
        binary=bytes_chunk(["abc"]),
    )


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ("abc", "Inference-Header-Content-Length must be an integer, got 'abc'"),
        ("", "Inference-Header-Content-Length must be an integer, got ''"),
        ("0", "Inference-Header-Content-Length (0) must be between 1 and the body size"),
        ("-4", "Inference-Header-Content-Length (-4) must be between 1 and the body size"),
        ("100000", "Inference-Header-Content-Length (100000) must be between 1 and the body size"),
    ],
)
def test_bad_header_length(header, match):
    body, _ = binary_request([("user", "BYTES", [1], bytes_chunk(["a"]), True)])
    with pytest.raises(InvalidInput, match=re.escape(match)) as info:
        parse_infer_request(body, header_length=header, inputs=(USER,), outputs=OUTPUTS)
    if header == "100000":
        assert f"({len(body)})" in info.value.message


def test_header_length_cutting_the_json_short():
    body, length = binary_request([("user", "BYTES", [1], bytes_chunk(["a"]), True)])
    with pytest.raises(InvalidInput, match="request body is not valid JSON"):
        parse_infer_request(
            body, header_length=str(int(length) - 1), inputs=(USER,), outputs=OUTPUTS
        )


def test_header_length_equal_to_body_is_a_plain_json_request():
    head = json.dumps({"inputs": valid_inputs()}).encode()
    request = parse_infer_request(
        head, header_length=str(len(head)), inputs=INPUTS, outputs=OUTPUTS
    )
    assert request.inputs["items"].tolist() == ["space opera", "cooking"]


# ----------------------------------------------------------------------------- requested outputs


def test_unknown_output_is_400():
    error = invalid(
        {"inputs": valid_inputs(), "outputs": [{"name": "scores"}, {"name": "logits"}]},
        re.escape("unknown output 'logits'; the model has: scores, ranking, labels"),
    )
    assert http_status(error) == 400


@pytest.mark.parametrize(
    ("outputs", "match"),
    [
        ({"name": "scores"}, "outputs must be a list"),
        (["scores"], re.escape("outputs[0] must be an object with a name")),
        (
            [{"name": "scores"}, {"nam": "ranking"}],
            re.escape("outputs[1] must be an object with a name"),
        ),
    ],
)
def test_malformed_outputs(outputs, match):
    invalid({"inputs": valid_inputs(), "outputs": outputs}, match)


def test_requested_outputs_and_binary_data_per_output():
    request = parse(
        {
            "inputs": valid_inputs(),
            "outputs": [
                {"name": "ranking", "parameters": {"binary_data": True}},
                {"name": "scores"},
            ],
        }
    )
    assert request.outputs == ("ranking", "scores")
    assert request.binary_outputs == {"ranking"}


def test_binary_data_output_applies_to_every_output():
    request = parse({"inputs": valid_inputs(), "parameters": {"binary_data_output": True}})
    assert request.outputs == ()
    assert request.binary_outputs == {"scores", "ranking", "labels"}
    assert request.parameters == {}


def test_binary_data_false_overrides_binary_data_output():
    request = parse(
        {
            "inputs": valid_inputs(),
            "parameters": {"binary_data_output": True},
            "outputs": [
                {"name": "scores", "parameters": {"binary_data": False}},
                {"name": "labels"},
            ],
        }
    )
    assert request.outputs == ("scores", "labels")
    assert request.binary_outputs == {"ranking", "labels"}


def test_binary_data_output_must_be_true_not_truthy():
    request = parse({"inputs": valid_inputs(), "parameters": {"binary_data_output": 1}})
    assert request.binary_outputs == frozenset()


# ----------------------------------------------------------------------------- responses


def test_encode_json_response():
    request = InferRequest(id="r-9", inputs={})
    body, headers = encode_infer_response(
        model="recommender", version="v2", request=request, result=result_tensors(), outputs=OUTPUTS
    )
    assert headers == {"content-type": "application/json"}
    document = json.loads(body)
    assert document["model_name"] == "recommender"
    assert document["model_version"] == "v2"
    assert document["id"] == "r-9"
    assert [t["name"] for t in document["outputs"]] == ["scores", "ranking", "labels"]
    scores, ranking, labels = document["outputs"]
    assert scores == {
        "name": "scores",
        "datatype": "FP32",
        "shape": [1, 3],
        "data": [0.5, -1.25, 3.0],
    }
    assert ranking == {"name": "ranking", "datatype": "INT64", "shape": [1, 3], "data": [2, 0, 1]}
    assert labels == {
        "name": "labels",
        "datatype": "BYTES",
        "shape": [3],
        "data": ["héllo", "", "world"],
    }


def test_encode_json_response_without_id_and_only_requested_outputs():
    request = InferRequest(id=None, inputs={}, outputs=("ranking",))
    body, headers = encode_infer_response(
        model="m", version="v1", request=request, result=result_tensors(), outputs=OUTPUTS
    )
    document = json.loads(body)
    assert "id" not in document
    assert [t["name"] for t in document["outputs"]] == ["ranking"]
    assert INFERENCE_HEADER not in headers


def test_encode_binary_response_decodes_back():
    request = InferRequest(
        id=None, inputs={}, binary_outputs=frozenset({"scores", "ranking", "labels"})
    )
    result = result_tensors()
    body, headers = encode_infer_response(
        model="m", version="v1", request=request, result=result, outputs=OUTPUTS
    )
    assert headers["content-type"] == "application/octet-stream"
    length = int(headers[INFERENCE_HEADER])
    head = json.loads(body[:length])
    sizes = {t["name"]: t["parameters"]["binary_data_size"] for t in head["outputs"]}
    assert sizes == {"scores": 12, "ranking": 24, "labels": 4 + 6 + 4 + 4 + 5}
    assert all("data" not in t for t in head["outputs"])
    assert len(body) == length + sum(sizes.values())
    # the raw bytes are little-endian, in output order
    assert body[length : length + 12] == struct.pack("<3f", 0.5, -1.25, 3.0)
    assert body[length + 12 : length + 36] == struct.pack("<3q", 2, 0, 1)
    _, arrays = decode_response(body, headers)
    assert arrays["scores"].dtype == np.float32
    np.testing.assert_array_equal(arrays["scores"], result["scores"])
    assert arrays["ranking"].dtype == np.int64
    np.testing.assert_array_equal(arrays["ranking"], result["ranking"])
    assert arrays["labels"].tolist() == result["labels"].tolist()


def test_encode_mixed_binary_and_json_response():
    request = InferRequest(
        id="x", inputs={}, outputs=("labels", "scores"), binary_outputs=frozenset({"scores"})
    )
    body, headers = encode_infer_response(
        model="m", version="v1", request=request, result=result_tensors(), outputs=OUTPUTS
    )
    document, arrays = decode_response(body, headers)
    labels, scores = document["outputs"]
    assert labels["data"] == ["héllo", "", "world"]
    assert scores["parameters"] == {"binary_data_size": 12}
    np.testing.assert_array_equal(arrays["scores"], result_tensors()["scores"])


def test_encode_casts_to_the_declared_dtype():
    request = InferRequest(
        id=None,
        inputs={},
        outputs=("scores", "ranking"),
        binary_outputs=frozenset({"scores", "ranking"}),
    )
    result = {
        "scores": np.array([[1.0, 2.0]], dtype=np.float64),
        "ranking": np.array([[1, 0]], dtype=np.int32),
    }
    body, headers = encode_infer_response(
        model="m", version="v1", request=request, result=result, outputs=OUTPUTS
    )
    _, arrays = decode_response(body, headers)
    assert arrays["scores"].dtype == np.float32 and arrays["scores"].tolist() == [[1.0, 2.0]]
    assert arrays["ranking"].dtype == np.int64 and arrays["ranking"].tolist() == [[1, 0]]


def test_binary_response_parsed_by_tritonclient():
    httpclient = pytest.importorskip("tritonclient.http")
    request = InferRequest(
        id="t", inputs={}, binary_outputs=frozenset({"scores", "ranking", "labels"})
    )
    result = result_tensors()
    body, headers = encode_infer_response(
        model="m", version="v1", request=request, result=result, outputs=OUTPUTS
    )
    parsed = httpclient.InferResult.from_response_body(
        body, header_length=int(headers[INFERENCE_HEADER])
    )
    np.testing.assert_array_equal(parsed.as_numpy("scores"), result["scores"])
    np.testing.assert_array_equal(parsed.as_numpy("ranking"), result["ranking"])
    assert [b.decode() for b in parsed.as_numpy("labels").tolist()] == ["héllo", "", "world"]


def test_round_trip_request_to_response():
    """A tritonclient-style binary request in, the same tensors echoed back out in binary."""
    emb = np.array([[0.25, -0.5, 8.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    users = ["ä user"]
    items = ["x", "yy"]
    body, length = binary_request(
        [
            ("user", "BYTES", [1], bytes_chunk(users), True),
            ("items", "BYTES", [2], bytes_chunk(items), True),
            ("emb", "FP32", [2, 3], emb.tobytes(), True),
        ],
        outputs=[
            {"name": "labels", "parameters": {"binary_data": True}},
            {"name": "scores", "parameters": {"binary_data": True}},
        ],
        request_id="rt",
    )
    request = parse_infer_request(body, header_length=length, inputs=INPUTS, outputs=OUTPUTS)
    result = {
        "labels": request.inputs["items"],
        "scores": request.inputs["emb"],
        "ranking": np.zeros((1, 1), dtype=np.int64),
    }
    out_body, headers = encode_infer_response(
        model="recommender", version="v1", request=request, result=result, outputs=OUTPUTS
    )
    document, arrays = decode_response(out_body, headers)
    assert document["id"] == "rt"
    assert [t["name"] for t in document["outputs"]] == ["labels", "scores"]
    assert arrays["labels"].tolist() == items
    np.testing.assert_array_equal(arrays["scores"], emb)

    # and the JSON form of the same response carries the same values
    json_request = InferRequest(id="rt", inputs=request.inputs, outputs=request.outputs)
    json_body, json_headers = encode_infer_response(
        model="recommender", version="v1", request=json_request, result=result, outputs=OUTPUTS
    )
    _, json_arrays = decode_response(json_body, json_headers)
    assert json_arrays["labels"].tolist() == items
    np.testing.assert_array_equal(json_arrays["scores"], emb)


def test_model_metadata():
    assert model_metadata("recommender", ["v1", "v2"], "rollout", [USER, EMB], OUTPUTS[:1]) == {
        "name": "recommender",
        "versions": ["v1", "v2"],
        "platform": "rollout",
        "inputs": [
            {"name": "user", "datatype": "BYTES", "shape": [-1]},
            {"name": "emb", "datatype": "FP32", "shape": [-1, 3]},
        ],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, -1]}],
    }
