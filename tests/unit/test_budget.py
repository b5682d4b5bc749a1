"""A model's request budget (`limits`) and the body limit derived from it (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.adapters.embedding import EmbeddingAdapter
from app.adapters.recommender import RecommenderAdapter
from app.config import RequestLimits
from app.errors import OverBudget, http_status
from app.serving.budget import body_limit, check_budget


def texts(*values: str) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


def test_a_request_within_the_limits_passes():
    check_budget({"user": texts("likes jazz, rock"), "items": texts("a", "b")}, RequestLimits(),
                 RecommenderAdapter)  # fmt: skip


@pytest.mark.parametrize(
    ("inputs", "limits", "named"),
    [
        ({"user": texts("é" * 5), "items": texts("a")}, {"max_text_bytes": 9},
         "input 'user': element 0 is 10 bytes of text; this model's limits.max_text_bytes is 9"),
        ({"user": texts("a" * 8), "items": texts("b" * 8, "c" * 8)},
         {"max_text_bytes": 8, "max_total_text_bytes": 20}, "limits.max_total_text_bytes is 20"),
        # F4: one short profile of many clauses is many encoder texts under best_line
        ({"user": texts(", ".join(["x"] * 50)), "items": texts("a")},
         {"max_encoder_texts": 40}, "needs 51 texts encoded; this model's limits.max_encoder_texts"),
    ],
)  # fmt: skip
def test_each_limit_is_a_413_that_names_it(inputs, limits, named):
    with pytest.raises(OverBudget) as caught:
        check_budget(inputs, RequestLimits(**limits), RecommenderAdapter)
    assert named in caught.value.message and http_status(caught.value) == 413


def test_encoder_texts_count_what_the_model_would_encode():
    request = {"user": texts("likes jazz and rock; reads a lot", "x"), "items": texts("a", "b")}
    assert RecommenderAdapter.encoder_texts(request) == 4 + 2
    assert EmbeddingAdapter.encoder_texts({"text": texts("a", "b", "c")}) == 3


def test_the_demo_limits_make_the_body_limit_far_below_the_old_8_mib():
    limit = body_limit(RequestLimits(), RecommenderAdapter.inputs)
    assert limit < 2 * 1024 * 1024


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40),
        min_size=1,
        max_size=64,
    )  # fmt: skip
)
def test_any_request_within_the_limits_fits_the_derived_body_limit(items):
    """Whatever the client's JSON encoder escapes (ensure_ascii, control characters), a request
    the model accepts is never refused for its body size."""
    limits = RequestLimits(max_text_bytes=160, max_total_text_bytes=64 * 160, max_encoder_texts=99)
    inputs = {"text": texts(*items)}
    check_budget(inputs, limits, EmbeddingAdapter)
    body = json.dumps({
        "id": "x" * 64,
        "inputs": [{"name": "text", "shape": [len(items)], "datatype": "BYTES", "data": items}],
    }, ensure_ascii=True).encode()  # fmt: skip
    assert len(body) <= body_limit(limits, EmbeddingAdapter.inputs)


def test_the_body_limit_covers_the_worst_escaping():
    limits = RequestLimits(max_text_bytes=100, max_total_text_bytes=100 * 256)
    worst = ["\x01" * 100] * 256  # every byte a 6-character \u0001 escape
    body = json.dumps({"inputs": [{"name": "text", "shape": [256], "datatype": "BYTES",
                                   "data": worst}]}).encode()  # fmt: skip
    assert len(body) <= body_limit(limits, EmbeddingAdapter.inputs)


def test_limits_are_checked_as_config():
    with pytest.raises(ValueError, match="max_total_text_bytes"):
        RequestLimits(max_text_bytes=100, max_total_text_bytes=10)
