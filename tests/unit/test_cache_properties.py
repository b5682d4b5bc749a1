"""Properties of the response cache key (`app/serving/cache.py` `cache_key`), with hypothesis.

The key must be equal for two requests exactly when they ask the same thing: the model, the
version, the config digest (the `generation` argument), every input tensor (name, datatype,
shape, values; BYTES element by element), the parameters (in any order) and the outputs. The
central test draws a request and a near-miss variant of it and checks `key(a) == key(b)` against
an independent description of "the same request"; the others check one field at a time, that
no valid request makes the key raise, and that another process (another `hash()` salt) computes
the same key.
"""

from __future__ import annotations

import base64
import math
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.adapters.base import NUMPY_DTYPES
from app.serving.cache import cache_key

ROOT = Path(__file__).resolve().parents[2]
HEX_KEY = re.compile(r"[0-9a-f]{64}")
NUMERIC = sorted(name for name in NUMPY_DTYPES if name != "BYTES")


class Request(NamedTuple):
    model: str
    version: str
    generation: str | int  # the config digest the router names the version's config by
    inputs: dict[str, np.ndarray]
    parameters: dict[str, Any]
    outputs: list[str]


def key(request: Request) -> str:
    return cache_key(*request)


def bytes_array(items: list[Any], shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A BYTES tensor as the protocol decodes one: a numpy object array."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape if shape is not None else (len(items),))


def same_request(request: Request) -> tuple:
    """What makes two requests the same, written without the key's encoding: values with their
    types (so 1, 1.0, True and "1" differ), arrays by datatype, shape and C-order contents,
    parameters and inputs in name order, outputs in their order."""

    def tensor(array: np.ndarray) -> tuple:
        if array.dtype == object:
            items = tuple((type(item).__name__, item) for item in array.ravel())
            return ("BYTES", array.shape, items)
        return (array.dtype.str, array.shape, array.tobytes())

    return (
        request.model,
        request.version,
        str(request.generation),
        sorted((name, tensor(array)) for name, array in request.inputs.items()),
        sorted((name, type(v).__name__, repr(v)) for name, v in request.parameters.items()),
        tuple(request.outputs),
    )


# -- strategies -----------------------------------------------------------------------------

# Small on purpose: short texts and tiny tensors make near-misses (equal by accident, or one
# character apart) common, which is where an ambiguous encoding would show.
TEXT = st.text(max_size=5)  # valid Unicode: hypothesis leaves lone surrogates out
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)
PARAMETER_VALUES = (
    st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | TEXT
)  # what JSON parameters decode to (json.loads accepts NaN and Infinity)


def numeric_tensors(datatype: str) -> st.SearchStrategy[np.ndarray]:
    dtype = NUMPY_DTYPES[datatype]
    finite = {"allow_nan": False, "allow_infinity": False} if dtype.kind == "f" else None
    return hnp.arrays(dtype, SHAPES, elements=finite)


def numeric_tensors_element(dtype: np.dtype) -> st.SearchStrategy[Any]:
    finite = {"allow_nan": False, "allow_infinity": False} if dtype.kind == "f" else {}
    return hnp.from_dtype(dtype, **finite)


@st.composite
def bytes_tensors(
    draw: st.DrawFn, shapes: st.SearchStrategy[tuple[int, ...]] = SHAPES
) -> np.ndarray:
    shape = draw(shapes)
    size = math.prod(shape)
    return bytes_array(draw(st.lists(TEXT, min_size=size, max_size=size)), shape)


TENSORS = st.sampled_from(sorted(NUMPY_DTYPES)).flatmap(
    lambda datatype: bytes_tensors() if datatype == "BYTES" else numeric_tensors(datatype)
)

REQUESTS = st.builds(
    Request,
    model=TEXT,
    version=TEXT,
    generation=TEXT | st.integers(min_value=0),
    inputs=st.dictionaries(TEXT, TENSORS, max_size=3),
    parameters=st.dictionaries(TEXT, PARAMETER_VALUES, max_size=4),
    outputs=st.lists(TEXT, max_size=3, unique=True),
)


def rebuilt(request: Request) -> Request:
    """The same request built afresh: new arrays (Fortran order where that differs), dicts in
    reverse order, a numeric config digest as an int."""
    generation = request.generation
    if isinstance(generation, str) and generation.isascii() and generation.isdigit():
        generation = int(generation)
    return Request(
        model=str(request.model),
        version=str(request.version),
        generation=generation,
        inputs={n: fortran_copy(a) for n, a in reversed(request.inputs.items())},
        parameters=dict(reversed(request.parameters.items())),
        outputs=list(request.outputs),
    )


def fortran_copy(array: np.ndarray) -> np.ndarray:
    # Memory order only exists from 2-d up (and np.asfortranarray would make a 0-d array 1-d).
    return np.array(array, order="F", copy=True) if array.ndim >= 2 else array.copy()


def fresh(existing: dict[str, Any]) -> st.SearchStrategy[str]:
    return TEXT.filter(lambda name: name not in existing)


def other_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Shapes with the same element count as `shape` but different from it."""
    size = math.prod(shape)
    options = {(size,), (1, *shape), (*shape, 1), tuple(reversed(shape)), (size, 1)}
    return sorted(s for s in options if s != shape)


def other_datatype(draw: st.DrawFn, array: np.ndarray) -> np.ndarray:
    """`array` as another datatype: the same bytes where the item size allows, else a cast;
    a BYTES tensor as a numpy unicode array or as bytes elements."""
    if array.dtype == object:
        as_bytes = bytes_array([s.encode() for s in array.ravel()], array.shape)
        return draw(st.sampled_from([np.array(array.tolist(), dtype=str), as_bytes]))
    targets = [NUMPY_DTYPES[d] for d in NUMERIC if NUMPY_DTYPES[d] != array.dtype]
    target = draw(st.sampled_from([d for d in targets if d.kind != "b"]))
    if target.itemsize == array.dtype.itemsize and array.dtype.kind != "b":
        return array.view(target)
    with np.errstate(all="ignore"):  # a float too large for an int casts to junk: still a change
        return array.astype(target)


def retyped(value: Any) -> list[Any]:
    """`value` as other JSON types that Python compares equal or prints alike: True -> 1,
    1 -> 1.0, True and "1", 2.0 -> 2 and "2.0", "7" -> 7."""
    if isinstance(value, bool):
        return [int(value), str(value).lower()]
    if isinstance(value, int):
        exact = [float(value)] if abs(value) < 2**53 else []
        return [value != 0, str(value), *exact]
    if isinstance(value, float):
        return [str(value), *([int(value)] if value.is_integer() else [])]
    return [int(value)] if value.isascii() and value.isdigit() else [value]


TENSOR_KINDS = ("value", "datatype", "shape", "rename", "drop input", "split bytes")
KINDS = ("model", "version", "generation", "boundary", "parameter", "outputs", "add input", *TENSOR_KINDS, "rebuilt")  # fmt: skip
SPLITTABLE = bytes_tensors(hnp.array_shapes(min_dims=1, max_dims=2, min_side=2, max_side=3))


@st.composite
def variants(draw: st.DrawFn) -> tuple[Request, Request, str]:
    """A request, and a variant of it that usually differs in exactly one small way."""
    kind = draw(st.sampled_from(KINDS))
    a = draw(REQUESTS)
    name = ""
    if kind in TENSOR_KINDS:  # a change to one tensor: make sure there is one to change
        name = draw(TEXT)
        a.inputs[name] = draw(SPLITTABLE if kind == "split bytes" else TENSORS)
    b = rebuilt(a)
    if kind in ("model", "version", "generation"):
        b = b._replace(**{kind: draw(TEXT)})
    elif kind == "boundary":
        # Move one character across a field boundary: model "ab", version "c" -> "a", "bc".
        fields = [b.model, b.version, str(b.generation), *b.outputs]
        i = draw(st.integers(0, len(fields) - 2))
        if fields[i]:
            fields[i], fields[i + 1] = fields[i][:-1], fields[i][-1] + fields[i + 1]
        b = Request(fields[0], fields[1], fields[2], b.inputs, b.parameters, fields[3:])
    elif kind == "parameter":
        params = b.parameters
        how = draw(st.sampled_from(["set", "retype", "drop"] if params else ["set"]))
        target = draw(st.sampled_from(sorted(params))) if how != "set" else draw(TEXT)
        if how == "set":
            params[target] = draw(PARAMETER_VALUES)
        elif how == "drop":
            del params[target]
        else:
            params[target] = draw(st.sampled_from(retyped(params[target])))
    elif kind == "outputs":
        b = b._replace(outputs=draw(st.permutations(a.outputs)) + draw(st.lists(TEXT, max_size=1)))
    elif kind == "add input":
        b.inputs[draw(fresh(a.inputs))] = draw(TENSORS)
    elif kind == "drop input":
        del b.inputs[name]
    elif kind == "rename":
        b.inputs[draw(fresh(a.inputs))] = b.inputs.pop(name)
    elif kind == "shape":
        array = b.inputs[name]
        b.inputs[name] = array.reshape(draw(st.sampled_from(other_shapes(array.shape))))
    elif kind == "datatype":
        b.inputs[name] = other_datatype(draw, b.inputs[name])
    elif kind == "value":
        array = np.array(b.inputs[name], order="C", copy=True)  # keeps a 0-d array 0-d
        if array.size:
            flat = array.reshape(-1)
            i = draw(st.integers(0, flat.size - 1))
            if array.dtype == object:
                flat[i] = draw(TEXT)
            else:
                flat[i] = draw(numeric_tensors_element(array.dtype))
            b.inputs[name] = array
    elif kind == "split bytes":
        # Move one character across an element boundary: ["ab", "c"] -> ["a", "bc"].
        flat = list(b.inputs[name].ravel())
        i = draw(st.integers(0, len(flat) - 2))
        if flat[i]:
            flat[i], flat[i + 1] = flat[i][:-1], flat[i][-1] + flat[i + 1]
        b.inputs[name] = bytes_array(flat, b.inputs[name].shape)
    return a, b, kind


# -- another process, with another hash() salt ----------------------------------------------

WORKER = """
import base64, pickle, sys
from app.serving.cache import cache_key
print(hash("salt probe"), flush=True)
for line in sys.stdin:
    print(cache_key(*pickle.loads(base64.b64decode(line))), flush=True)
"""


@pytest.fixture(scope="module")
def key_in_other_process() -> Iterator[Callable[[Request], str]]:
    """`cache_key` computed by one long-lived subprocess whose str hashes are salted differently
    from this process's (checked), so a key that leaned on `hash()` would come out different."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert worker.stdin is not None and worker.stdout is not None
    try:
        assert int(worker.stdout.readline()) != hash("salt probe"), "the salts must differ"

        def ask(request: Request) -> str:
            worker.stdin.write(base64.b64encode(pickle.dumps(tuple(request))).decode() + "\n")
            worker.stdin.flush()
            return worker.stdout.readline().strip()

        yield ask
    finally:
        worker.stdin.close()
        worker.stdout.close()
        worker.wait(timeout=30)


# -- the properties -------------------------------------------------------------------------


ODD = Request(
    model="ünïcode 模型",
    version="",
    generation=0,
    inputs={
        "text": bytes_array(["", "\x00", "\U0010ffff" * 1000, "é", "\u200b"]),
        "empty": np.zeros((0, 3), np.float16),
        "scalar": np.array(-0.0),
        "none": bytes_array([], (2, 0)),
    },
    parameters={"nan": float("nan"), "inf": float("-inf"), "big": 2**200, "": ""},
    outputs=[],
)


@settings(derandomize=True, deadline=None, max_examples=150)
@given(request=REQUESTS)
@example(request=ODD)
def test_key_is_deterministic_bounded_and_never_raises(request, key_in_other_process):
    k = key(request)
    assert HEX_KEY.fullmatch(k)
    assert key(request) == k
    assert key(rebuilt(request)) == k  # dict order, memory layout, int vs str digest
    assert key_in_other_process(request) == k


@settings(derandomize=True, deadline=None, max_examples=300)
@given(case=variants())
def test_keys_are_equal_exactly_when_requests_are_the_same(case):
    a, b, kind = case
    event(kind)
    assert (key(a) == key(b)) == (same_request(a) == same_request(b)), kind


BASE = Request(
    model="m",
    version="v1",
    generation="digest-1",
    inputs={"x": np.zeros(2, np.float32)},
    parameters={"p": 1},
    outputs=["y"],
)


@settings(derandomize=True, deadline=None, max_examples=100)
@given(array=TENSORS, data=st.data())
def test_any_change_to_a_tensor_changes_the_key(array, data):
    def k(tensor: np.ndarray, name: str = "t") -> str:
        return key(BASE._replace(inputs={name: tensor}))

    if array.size:
        changed = np.array(array, copy=True).reshape(-1)
        i = data.draw(st.integers(0, changed.size - 1), label="index")
        new = data.draw(TEXT if array.dtype == object else numeric_tensors_element(array.dtype))
        changed[i] = new
        changed = changed.reshape(array.shape)
        if same_request(BASE._replace(inputs={"t": changed})) != same_request(
            BASE._replace(inputs={"t": array})
        ):
            assert k(changed) != k(array), "value"
    assert k(other_datatype(data.draw, array)) != k(array), "datatype"
    for shape in other_shapes(array.shape):
        assert k(array.reshape(shape)) != k(array), f"shape {shape}"
    assert k(array, "u") != k(array), "name"


@settings(derandomize=True, deadline=None, max_examples=100)
@given(
    parameters=st.dictionaries(TEXT, PARAMETER_VALUES, min_size=1, max_size=6),
    data=st.data(),
)
def test_parameter_order_does_not_matter_but_every_value_does(parameters, data):
    base = key(BASE._replace(parameters=parameters))
    order = data.draw(st.permutations(list(parameters.items())), label="order")
    assert key(BASE._replace(parameters=dict(order))) == base
    name = data.draw(st.sampled_from(sorted(parameters)), label="name")
    new = data.draw(PARAMETER_VALUES, label="new value")
    changed = {**parameters, name: new}
    if (type(new), repr(new)) != (type(parameters[name]), repr(parameters[name])):
        assert key(BASE._replace(parameters=changed)) != base
    assert key(BASE._replace(parameters={k: v for k, v in parameters.items() if k != name})) != base


@settings(derandomize=True, deadline=None, max_examples=100)
@given(version=TEXT, digest=TEXT, other=TEXT)
def test_version_and_config_digest_are_part_of_the_key(version, digest, other):
    base = key(BASE._replace(version=version, generation=digest))
    if other != version:
        assert key(BASE._replace(version=other, generation=digest)) != base
    if other != digest:
        assert key(BASE._replace(version=version, generation=other)) != base
    # The two fields are length-prefixed: moving text from one to the other is a change.
    if version:
        moved = BASE._replace(version=version[:-1], generation=version[-1] + digest)
        assert key(moved) != base


@settings(derandomize=True, deadline=None, max_examples=100)
@given(items=st.lists(st.text(max_size=4), max_size=6))
def test_bytes_strings_differ_from_the_same_bytes_as_any_other_datatype(items):
    strings = bytes_array(items)
    raw = b"".join(s.encode() for s in items)
    others = {
        "BYTES": strings,
        "numpy unicode": np.array(items, dtype=str),
        "UINT8": np.frombuffer(raw, np.uint8),
        "INT8": np.frombuffer(raw, np.int8),
    }
    if items:  # with no elements, a str and a bytes object array are the same tensor
        others["bytes elements"] = bytes_array([s.encode() for s in items])
    keys = {label: key(BASE._replace(inputs={"t": array})) for label, array in others.items()}
    assert len(set(keys.values())) == len(keys), keys
