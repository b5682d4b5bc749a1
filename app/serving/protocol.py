"""Open Inference Protocol (KServe V2) over HTTP: parse and check requests, encode responses.

Supports the JSON form and the binary tensor extension (`Inference-Header-Content-Length`)
that tritonclient and kserve's client use by default. Every way a request can be wrong raises
`InvalidInput` with a message that names the input and what was expected: the router turns it
into a 400, and nothing malformed ever reaches a model replica.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.adapters.base import NUMPY_DTYPES, Tensors, TensorSpec
from app.errors import InvalidInput
from app.unicode import is_unicode

__all__ = [
    "INFERENCE_HEADER",
    "InferRequest",
    "RawRequest",
    "check_request",
    "decode_body",
    "encode_infer_response",
    "model_metadata",
    "parse_infer_request",
]

INFERENCE_HEADER = "inference-header-content-length"
# kserve's client also sends model_name (and may send model_version); the path decides both.
_REQUEST_FIELDS = frozenset(
    {"id", "inputs", "outputs", "parameters", "model_name", "model_version"}
)
# Request parameters that steer the protocol, not the model.
_PROTOCOL_PARAMETERS = frozenset(
    {"binary_data_output", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout"}
)


@dataclass(frozen=True)
class InferRequest:
    """A checked inference request: inputs as numpy arrays, in the model's declared order."""

    id: str | None
    inputs: Tensors
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()  # requested outputs; empty means all
    binary_outputs: frozenset[str] = frozenset()


def _fail(message: str) -> InvalidInput:
    return InvalidInput(message)


def _check_text(text: str, where: str) -> None:
    if not is_unicode(text):
        raise _fail(f"{where} is not valid Unicode (it holds a lone UTF-16 surrogate)")


def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise _fail(
            f"Inference-Header-Content-Length must be an integer, got {header_length!r}"
        ) from None
    if not 0 < length <= len(body):
        raise _fail(
            f"Inference-Header-Content-Length ({length}) must be between 1 and the body size "
            f"({len(body)})"
        )
    return body[:length], body[length:]


def _flatten(data: Any, where: str) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            if isinstance(item, dict):
                raise _fail(f"{where}: data must hold values or lists, not objects")
            flat.append(item)
        else:
            stack.pop()
    return flat


def _json_tensor(flat: list[Any], spec: TensorSpec, where: str) -> np.ndarray:
    dtype = NUMPY_DTYPES[spec.datatype]
    if spec.datatype == "BYTES":
        for i, item in enumerate(flat):
            if not isinstance(item, str):
                raise _fail(
                    f"{where} (BYTES): element {i} is {type(item).__name__}, expected a string"
                )
            _check_text(item, f"{where} (BYTES): element {i}")
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array
    if spec.datatype == "BOOL":
        if not all(isinstance(item, bool) for item in flat):
            raise _fail(f"{where} (BOOL): every element must be true or false")
        return np.asarray(flat, dtype=np.bool_)
    if any(isinstance(item, bool) or not isinstance(item, (int, float)) for item in flat):
        bad = next(i for i in flat if isinstance(i, bool) or not isinstance(i, (int, float)))
        raise _fail(f"{where} ({spec.datatype}): element {bad!r} is not a number")
    if dtype.kind in "iu":
        if any(isinstance(item, float) for item in flat):
            raise _fail(f"{where} ({spec.datatype}): elements must be integers")
        wide = np.asarray(flat, dtype=object if flat and max(map(abs, flat)) >= 2**63 else np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise _fail(f"{where} ({spec.datatype}): value out of range [{info.min}, {info.max}]")
        return wide.astype(dtype)
    try:
        array = np.asarray(flat, dtype=dtype)
    except OverflowError:
        raise _fail(
            f"{where} ({spec.datatype}): a value is too large for {spec.datatype}"
        ) from None
    return _finite(array, spec, where)


def _finite(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    if array.dtype.kind == "f" and array.size and not np.all(np.isfinite(array)):
        raise _fail(f"{where} ({spec.datatype}): values must be finite")
    return array


def _binary_tensor(chunk: bytes, count: int, spec: TensorSpec, where: str) -> np.ndarray:
    if spec.datatype != "BYTES":
        dtype = NUMPY_DTYPES[spec.datatype]
        if len(chunk) != count * dtype.itemsize:
            raise _fail(
                f"{where}: binary_data_size is {len(chunk)} bytes but shape needs "
                f"{count * dtype.itemsize} ({count} x {dtype.itemsize})"
            )
        if spec.datatype == "BOOL":
            raw = np.frombuffer(chunk, dtype=np.uint8)
            if raw.size and raw.max() > 1:
                raise _fail(f"{where} (BOOL): binary elements must be 0 or 1")
            return raw.astype(np.bool_)
        return _finite(np.frombuffer(chunk, dtype=dtype).copy(), spec, where)
    items, offset = [], 0
    for i in range(count):
        if offset + 4 > len(chunk):
            raise _fail(f"{where}: binary BYTES data ends before element {i}")
        (length,) = struct.unpack_from("<I", chunk, offset)
        offset += 4
        if offset + length > len(chunk):
            raise _fail(f"{where}: binary BYTES element {i} runs past its data")
        try:
            items.append(chunk[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise _fail(f"{where}: binary BYTES element {i} is not valid UTF-8") from None
        offset += length
    if offset != len(chunk):
        raise _fail(
            f"{where}: binary BYTES data has {len(chunk) - offset} bytes after {count} elements"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def _check_shape(raw: Any, spec: TensorSpec, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    ):
        raise _fail(f"{where}: shape must be a list of non-negative integers, got {raw!r}")
    if len(raw) != len(spec.shape):
        raise _fail(
            f"{where}: shape {raw} has {len(raw)} dimensions, expected {len(spec.shape)} "
            f"({list(spec.shape)})"
        )
    for got, want in zip(raw, spec.shape):
        if want == -1 and not 1 <= got <= spec.max_dim:
            raise _fail(
                f"{where}: shape {raw}: dimension {got} must be between 1 and {spec.max_dim}"
            )
        if want != -1 and got != want:
            raise _fail(f"{where}: shape {raw} does not match the model's {list(spec.shape)}")
    return tuple(raw)


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(f"{where}: parameters must be an object")
    for key, value in raw.items():
        _check_text(key, f"{where}: a parameter name")
        if not isinstance(value, (str, int, float, bool)):
            raise _fail(f"{where}: parameter {key!r} must be a string, number or boolean")
        if isinstance(value, str):
            _check_text(value, f"{where}: parameter {key!r}")
    return raw


@dataclass(frozen=True)
class RawRequest:
    """A decoded body whose envelope is checked; its tensors are checked by `check_request`
    once the version (and so the declared tensors) is known."""

    document: dict[str, Any]
    binary: bytes
    parameters: dict[str, Any]


def decode_body(body: bytes, *, header_length: str | None) -> RawRequest:
    """Split off binary data, parse the JSON envelope, and check its top-level fields."""
    head, binary = _split_body(body, header_length)
    try:
        document = json.loads(head)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int-digit limits
        raise _fail(f"request body is not valid JSON: {exc}") from None
    except RecursionError:  # json's C decoder recurses once per nested array or object
        raise _fail("request body is nested too deeply to be a V2 request") from None
    if not isinstance(document, dict):
        raise _fail("request body must be a JSON object with an 'inputs' list")
    unknown = sorted(set(document) - _REQUEST_FIELDS)
    for name in unknown:
        _check_text(name, "a request field name")
    if unknown:
        raise _fail(
            f"unknown request field(s) {unknown}; expected {', '.join(sorted(_REQUEST_FIELDS))}"
        )
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _fail("id must be a string")
    if request_id is not None:
        _check_text(request_id, "id")
    parameters = _parameters(document.get("parameters"), "request")
    return RawRequest(document=document, binary=binary, parameters=parameters)


def parse_infer_request(
    body: bytes,
    *,
    header_length: str | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> InferRequest:
    """Parse a V2 infer body against the model's declared tensors."""
    return check_request(decode_body(body, header_length=header_length), inputs, outputs)


def check_request(
    raw_request: RawRequest,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    drop_parameters: Collection[str] = (),
) -> InferRequest:
    """Check a decoded request's tensors against a version's declared inputs and outputs.

    `drop_parameters` are consumed by the router (e.g. a routing key) and not passed on."""
    document, binary = raw_request.document, raw_request.binary
    request_id = document.get("id")
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise _fail("inputs must be a non-empty list of tensors")

    specs = {spec.name: spec for spec in inputs}
    tensors: Tensors = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise _fail(f"inputs[{index}] must be an object")
        name = raw.get("name")
        if not isinstance(name, str):
            raise _fail(f"inputs[{index}].name must be a string")
        where = f"input '{name}'"
        if name not in specs:
            _check_text(name, f"inputs[{index}].name")
            raise _fail(f"unexpected {where}; the model takes: {', '.join(specs)}")
        if name in tensors:
            raise _fail(f"{where} is given twice")
        spec = specs[name]
        extra = sorted(set(raw) - {"name", "shape", "datatype", "data", "parameters"})
        if extra:
            raise _fail(f"{where}: unknown field(s) {extra}")
        if raw.get("datatype") != spec.datatype:
            raise _fail(f"{where} has datatype {raw.get('datatype')!r}, expected {spec.datatype!r}")
        shape = _check_shape(raw.get("shape"), spec, where)
        count = math.prod(shape)
        params = _parameters(raw.get("parameters"), where)
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in raw:
                raise _fail(f"{where}: give either data or binary_data_size, not both")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise _fail(f"{where}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise _fail(
                    f"{where}: binary_data_size ({size}) runs past the binary data "
                    f"({len(binary) - offset} bytes left)"
                )
            array = _binary_tensor(binary[offset : offset + size], count, spec, where)
            offset += size
        else:
            if "data" not in raw:
                raise _fail(f"{where} has no data")
            flat = _flatten(raw["data"], where)
            if len(flat) != count:
                raise _fail(
                    f"{where} has {len(flat)} elements but shape {list(shape)} needs {count}"
                )
            array = _json_tensor(flat, spec, where)
        tensors[name] = array.reshape(shape)
    if offset != len(binary):
        raise _fail(f"{len(binary) - offset} bytes of binary data are not claimed by any input")
    missing = [name for name in specs if name not in tensors]
    if missing:
        raise _fail(f"missing input(s) {missing}; the model takes: {', '.join(specs)}")
    tensors = {name: tensors[name] for name in specs}  # the model's declared order

    parameters = raw_request.parameters
    all_binary = parameters.get("binary_data_output") is True
    output_names = [spec.name for spec in outputs]
    requested: list[str] = []
    binary_outputs = set(output_names) if all_binary else set()
    raw_outputs = document.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise _fail("outputs must be a list")
        for index, raw in enumerate(raw_outputs):
            if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
                raise _fail(f"outputs[{index}] must be an object with a name")
            if raw["name"] not in output_names:
                _check_text(raw["name"], f"outputs[{index}].name")
                raise _fail(
                    f"unknown output '{raw['name']}'; the model has: {', '.join(output_names)}"
                )
            if raw["name"] in requested:  # each copy would be encoded again: a 1,000x answer
                raise _fail(f"outputs[{index}]: output '{raw['name']}' is requested twice")
            requested.append(raw["name"])
            out_params = _parameters(raw.get("parameters"), f"output '{raw['name']}'")
            if out_params.get("binary_data") is True:
                binary_outputs.add(raw["name"])
            elif out_params.get("binary_data") is False:
                binary_outputs.discard(raw["name"])
    model_parameters = {
        k: v
        for k, v in parameters.items()
        if k not in _PROTOCOL_PARAMETERS and k not in drop_parameters
    }
    return InferRequest(
        id=request_id,
        inputs=tensors,
        parameters=model_parameters,
        outputs=tuple(requested),
        binary_outputs=frozenset(binary_outputs),
    )


def _binary_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype != "BYTES":
        return np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype]).tobytes()
    parts = []
    for item in array.ravel():
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_infer_response(
    *,
    model: str,
    version: str,
    request: InferRequest,
    result: Tensors,
    outputs: Sequence[TensorSpec],
) -> tuple[bytes, dict[str, str]]:
    """Encode `result` as a V2 response; returns (body, headers to add)."""
    names = request.outputs or tuple(spec.name for spec in outputs)
    datatypes = {spec.name: spec.datatype for spec in outputs}
    tensors, chunks = [], []
    for name in names:
        array = np.asarray(result[name])
        tensor: dict[str, Any] = {
            "name": name,
            "datatype": datatypes[name],
            "shape": list(array.shape),
        }
        if name in request.binary_outputs:
            chunk = _binary_bytes(array, datatypes[name])
            tensor["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            tensor["data"] = array.ravel().tolist()
        tensors.append(tensor)
    document: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": tensors}
    if request.id is not None:
        document["id"] = request.id
    head = json.dumps(document, separators=(",", ":")).encode("utf-8")
    if not chunks:
        return head, {"content-type": "application/json"}
    return head + b"".join(chunks), {
        "content-type": "application/octet-stream",
        INFERENCE_HEADER: str(len(head)),
    }


def model_metadata(
    name: str, versions: Sequence[str], platform: str, inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> dict[str, Any]:  # fmt: skip
    """The V2 model metadata document."""
    return {
        "name": name,
        "versions": list(versions),
        "platform": platform,
        "inputs": [spec.metadata() for spec in inputs],
        "outputs": [spec.metadata() for spec in outputs],
    }
