"""A request's budget on a model (`limits` in its model config), and the body limit it implies.

The router checks `check_budget` on every request after parsing, before it dispatches: a
request over a text, character or encoder-text limit is a 413 that names the limit, and never
reaches a replica, a breaker or a rollout gate. Tokens need the model's tokenizer, so the
replica counts them, per request and before the forward pass (app/adapters/encoder.py).

`body_limit` is the largest body a request within the limits can take, in JSON (where one
UTF-8 byte of text can take up to six characters, as a `\\u00XX` escape) or in binary form;
the router refuses bigger bodies while reading them, before it parses anything. Nothing a
model accepts is ever refused by the body limit, and nothing much bigger is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from app.adapters import ModelAdapter, Tensors, TensorSpec
from app.config import RequestLimits
from app.errors import OverBudget

__all__ = ["ENVELOPE_BYTES", "body_limit", "check_budget"]

# Room for everything in a body that is not tensor data: field names, shapes, parameters, the id.
ENVELOPE_BYTES = 64 * 1024
# Longest JSON rendering of one number (a float64 in full precision, a separator, spaces).
_NUMBER_CHARS = 32
# JSON characters per UTF-8 byte of text, at worst (a control character as \u00XX).
_ESCAPE = 6


def check_budget(inputs: Tensors, limits: RequestLimits, adapter: type[ModelAdapter]) -> None:
    """Raise `OverBudget` (413) naming the first limit `inputs` exceed."""
    total = 0
    for spec in adapter.inputs:
        array = inputs.get(spec.name)
        if array is None or spec.datatype != "BYTES":
            continue
        for i, text in enumerate(array.flat):
            size = len(text.encode()) if isinstance(text, str) else len(text)
            if size > limits.max_text_bytes:
                raise OverBudget(
                    f"input {spec.name!r}: element {i} is {size} bytes of text; this model's "
                    f"limits.max_text_bytes is {limits.max_text_bytes}"
                )
            total += size
    if total > limits.max_total_text_bytes:
        raise OverBudget(
            f"the request holds {total} bytes of text; this model's "
            f"limits.max_total_text_bytes is {limits.max_total_text_bytes}"
        )
    texts = adapter.encoder_texts(inputs)
    if texts > limits.max_encoder_texts:
        raise OverBudget(
            f"the request needs {texts} texts encoded; this model's limits.max_encoder_texts "
            f"is {limits.max_encoder_texts}"
        )


def _elements(spec: TensorSpec) -> int:
    return math.prod(spec.max_dim if d == -1 else d for d in spec.shape)


def body_limit(limits: RequestLimits, specs: Iterable[TensorSpec]) -> int:
    """The largest body, in bytes, of a request within `limits` on tensors `specs`."""
    size = ENVELOPE_BYTES
    text_elements = 0
    for spec in specs:
        if spec.datatype == "BYTES":
            text_elements += _elements(spec)
        else:
            size += _elements(spec) * _NUMBER_CHARS
    if text_elements:
        # Each element: its quotes and separator in JSON, or its 4-byte length in binary.
        text = min(limits.max_total_text_bytes, text_elements * limits.max_text_bytes)
        size += text * _ESCAPE + text_elements * 4
    return size
