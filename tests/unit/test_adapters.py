"""The recommender and text-embedding adapters on a tiny random BERT (no Ray): outputs match the
declared tensors, a dynamic batch gives each request what it would get alone, and
hyperparameters do what they say."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from app.adapters import NUMPY_DTYPES, ModelAdapter, adapter_class
from app.adapters.embedding import EmbeddingAdapter
from app.adapters.encoder import micro_batches
from app.adapters.recommender import RecommenderAdapter
from app.errors import InvalidInput, OverBudget, http_status
from tests.support.tiny_models import build_tiny_bert

ATOL = 1e-5


def texts(*values: str) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = list(values)
    return array


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("adapters") / "bert", seed=0)


def test_tiny_tokenizer_knows_the_words(recommender):
    ids = recommender.encoder.tokenizer("a space opera")["input_ids"]
    assert recommender.encoder.tokenizer.unk_token_id not in ids
    # different texts of the same length must not embed identically
    (result,) = recommender.predict(
        [{"user": texts("jazz music"), "items": texts("news sports", "jazz music")}], [{}]
    )
    assert abs(result["scores"][0, 0] - result["scores"][0, 1]) > 1e-3


def make(cls: type[ModelAdapter], directory: Path, **hyperparameters) -> ModelAdapter:
    return cls(directory, cls.parse_hyperparameters(hyperparameters), threads=1)


@pytest.fixture(scope="module")
def recommender(tiny_bert) -> RecommenderAdapter:
    return make(RecommenderAdapter, tiny_bert)


@pytest.fixture(scope="module")
def embedder(tiny_bert) -> EmbeddingAdapter:
    return make(EmbeddingAdapter, tiny_bert)


def assert_conforms(cls: type[ModelAdapter], result: dict[str, np.ndarray]) -> None:
    assert set(result) == {spec.name for spec in cls.outputs}
    for spec in cls.outputs:
        array = result[spec.name]
        assert isinstance(array, np.ndarray), spec.name
        assert array.dtype == NUMPY_DTYPES[spec.datatype], (spec.name, array.dtype)
        assert array.ndim == len(spec.shape), (spec.name, array.shape)
        for size, declared in zip(array.shape, spec.shape):
            assert declared == -1 or size == declared


# Three requests of different shapes whose texts overlap (within and across requests, and between
# one request's users and another's items).
BATCH = [
    {
        "user": texts("likes science fiction films"),
        "items": texts("a space opera", "a cooking show", "jazz music"),
    },
    {
        "user": texts("enjoys cooking", "loves jazz and rock music"),
        "items": texts("a cooking show"),
    },
    {
        "user": texts("a space opera", "likes science fiction films", "news about sports"),
        "items": texts("jazz music", "history documentary", "a space opera", "enjoys cooking"),
    },
]


# ----------------------------------------------------------------------------- registry


def test_registered_adapters_resolve():
    assert adapter_class("recommender") is RecommenderAdapter
    assert adapter_class("text-embedding") is EmbeddingAdapter
    assert adapter_class("app.adapters.embedding:EmbeddingAdapter") is EmbeddingAdapter
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        adapter_class("nope")


def test_declared_tensors():
    assert [(s.name, s.datatype, s.shape) for s in RecommenderAdapter.inputs] == [
        ("user", "BYTES", (-1,)),
        ("items", "BYTES", (-1,)),
    ]
    assert [(s.name, s.datatype, s.shape) for s in RecommenderAdapter.outputs] == [
        ("scores", "FP32", (-1, -1)),
        ("ranking", "INT64", (-1, -1)),
    ]
    assert [(s.name, s.datatype, s.shape) for s in EmbeddingAdapter.outputs] == [
        ("embedding", "FP32", (-1, -1)),
    ]


# ----------------------------------------------------------------------------- recommender


def test_recommender_outputs_conform_to_specs(recommender):
    results = recommender.predict(BATCH, [{}, {}, {}])
    assert len(results) == 3
    for request, result in zip(BATCH, results):
        assert_conforms(RecommenderAdapter, result)
        users, items = len(request["user"]), len(request["items"])
        assert result["scores"].shape == (users, items)
        assert result["ranking"].shape == (users, items)
        assert np.all(np.isfinite(result["scores"]))


def test_recommender_batch_matches_each_request_alone(recommender):
    parameters = [{"top_k": 2}, {}, {"top_k": 3}]
    together = recommender.predict(BATCH, parameters)
    for request, params, batched in zip(BATCH, parameters, together):
        (alone,) = recommender.predict([request], [params])
        assert batched["scores"].shape == alone["scores"].shape
        np.testing.assert_allclose(batched["scores"], alone["scores"], atol=ATOL, rtol=0)
        np.testing.assert_array_equal(batched["ranking"], alone["ranking"])


def test_recommender_batch_matches_alone_with_prefixes(tiny_bert):
    adapter = make(RecommenderAdapter, tiny_bert, query_prefix="a user who ", item_prefix="item: ")
    together = adapter.predict(BATCH, [{}, {}, {}])
    for request, batched in zip(BATCH, together):
        (alone,) = adapter.predict([request], [{}])
        np.testing.assert_allclose(batched["scores"], alone["scores"], atol=ATOL, rtol=0)


def test_recommender_request_order_does_not_matter(recommender):
    forward = recommender.predict(BATCH, [{}, {}, {}])
    backward = recommender.predict(BATCH[::-1], [{}, {}, {}])[::-1]
    for a, b in zip(forward, backward):
        np.testing.assert_allclose(a["scores"], b["scores"], atol=ATOL, rtol=0)


def test_recommender_scores_are_user_item_embedding_products(recommender, tiny_bert):
    embedder = make(EmbeddingAdapter, tiny_bert, pooling="mean", normalize=True)
    request = BATCH[2]
    (result,) = recommender.predict([request], [{}])
    (u,) = embedder.predict([{"text": request["user"]}], [{}])
    (m,) = embedder.predict([{"text": request["items"]}], [{}])
    expected = u["embedding"] @ m["embedding"].T
    np.testing.assert_allclose(result["scores"], expected, atol=ATOL, rtol=0)


def test_recommender_ranking_is_argsort_descending(recommender):
    (result,) = recommender.predict([BATCH[2]], [{}])
    scores, ranking = result["scores"], result["ranking"]
    for row_scores, row_ranking in zip(scores, ranking):
        assert sorted(row_ranking.tolist()) == list(range(len(row_scores)))  # a permutation
        ranked = row_scores[row_ranking]
        assert np.all(ranked[:-1] >= ranked[1:])
        assert row_ranking[0] == int(np.argmax(row_scores))
    np.testing.assert_array_equal(ranking, np.argsort(-scores, axis=1, kind="stable"))


def test_recommender_duplicate_items_tie_and_keep_order(recommender):
    request = {"user": texts("likes jazz"), "items": texts("jazz music", "news", "jazz music")}
    (result,) = recommender.predict([request], [{}])
    scores, ranking = result["scores"][0], result["ranking"][0].tolist()
    assert scores[0] == scores[2]
    assert ranking.index(0) < ranking.index(2)  # stable: equal scores keep item order


def test_recommender_top_k_truncates_ranking(recommender):
    request = BATCH[2]
    (full,) = recommender.predict([request], [{}])
    (top2,) = recommender.predict([request], [{"top_k": 2}])
    assert top2["ranking"].shape == (3, 2)
    np.testing.assert_array_equal(top2["ranking"], full["ranking"][:, :2])
    np.testing.assert_allclose(top2["scores"], full["scores"], atol=ATOL, rtol=0)  # all scores kept
    (big,) = recommender.predict([request], [{"top_k": 99}])
    np.testing.assert_array_equal(big["ranking"], full["ranking"])


@pytest.mark.parametrize("top_k", [0, -1, True, 1.5, "2"])
def test_recommender_rejects_bad_top_k(recommender, top_k):
    request = BATCH[0]
    with pytest.raises(InvalidInput, match="top_k"):
        RecommenderAdapter.check_parameters(request, {"top_k": top_k})
    (result,) = recommender.predict([request], [{"top_k": top_k}])
    assert isinstance(result, InvalidInput) and "top_k" in result.message


def test_recommender_check_parameters_accepts_valid(recommender):
    RecommenderAdapter.check_parameters(BATCH[0], {})
    RecommenderAdapter.check_parameters(BATCH[0], {"top_k": 1})
    RecommenderAdapter.check_parameters(BATCH[0], {"top_k": 100})


def test_recommender_normalized_scores_are_cosines(recommender):
    (result,) = recommender.predict([BATCH[2]], [{}])
    assert np.all(np.abs(result["scores"]) <= 1 + ATOL)
    same = {"user": texts("a space opera"), "items": texts("a space opera")}
    (result,) = recommender.predict([same], [{}])
    np.testing.assert_allclose(result["scores"], [[1.0]], atol=ATOL)


def test_recommender_temperature_scales_scores(tiny_bert):
    hot = make(RecommenderAdapter, tiny_bert, temperature=1.0)
    cold = make(RecommenderAdapter, tiny_bert, temperature=0.5)
    (a,) = hot.predict([BATCH[2]], [{}])
    (b,) = cold.predict([BATCH[2]], [{}])
    np.testing.assert_allclose(b["scores"], 2 * a["scores"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(a["ranking"], b["ranking"])


def test_recommender_query_prefix_changes_scores(tiny_bert, recommender):
    prefixed = make(RecommenderAdapter, tiny_bert, query_prefix="a user who enjoys ")
    (plain,) = recommender.predict([BATCH[2]], [{}])
    (with_prefix,) = prefixed.predict([BATCH[2]], [{}])
    assert not np.allclose(plain["scores"], with_prefix["scores"], atol=ATOL)


def test_recommender_item_prefix_changes_scores(tiny_bert, recommender):
    prefixed = make(RecommenderAdapter, tiny_bert, item_prefix="a show about ")
    (plain,) = recommender.predict([BATCH[2]], [{}])
    (with_prefix,) = prefixed.predict([BATCH[2]], [{}])
    assert not np.allclose(plain["scores"], with_prefix["scores"], atol=ATOL)


def test_recommender_configure_hot_swaps_hyperparameters(tiny_bert):
    adapter = make(RecommenderAdapter, tiny_bert)
    (before,) = adapter.predict([BATCH[0]], [{}])
    new = RecommenderAdapter.parse_hyperparameters({"temperature": 0.25, "query_prefix": "fan: "})
    adapter.configure(new)
    assert adapter.hyperparameters is new
    (during,) = adapter.predict([BATCH[0]], [{}])
    reference = make(RecommenderAdapter, tiny_bert, temperature=0.25, query_prefix="fan: ")
    (expected,) = reference.predict([BATCH[0]], [{}])
    np.testing.assert_allclose(during["scores"], expected["scores"], atol=ATOL, rtol=0)
    assert not np.allclose(during["scores"], before["scores"], atol=ATOL)
    adapter.configure(RecommenderAdapter.parse_hyperparameters({}))
    (after,) = adapter.predict([BATCH[0]], [{}])
    np.testing.assert_allclose(after["scores"], before["scores"], atol=ATOL, rtol=0)


def test_recommender_example_passes_through_predict(recommender):
    example = recommender.example()
    assert set(example) == {spec.name for spec in RecommenderAdapter.inputs}
    for spec in RecommenderAdapter.inputs:
        assert example[spec.name].dtype == NUMPY_DTYPES[spec.datatype]
        assert example[spec.name].ndim == len(spec.shape)
    (result,) = recommender.predict([example], [{}])
    assert_conforms(RecommenderAdapter, result)
    assert result["scores"].shape == (len(example["user"]), len(example["items"]))


def test_recommender_request_with_no_items(recommender):
    empty = {"user": texts("likes jazz"), "items": texts()}
    results = recommender.predict([empty, BATCH[0]], [{}, {}])
    assert results[0]["scores"].shape == (1, 0)
    assert results[0]["ranking"].shape == (1, 0)
    assert_conforms(RecommenderAdapter, results[0])
    (alone,) = recommender.predict([BATCH[0]], [{}])
    np.testing.assert_allclose(results[1]["scores"], alone["scores"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "values, field",
    [
        ({"temprature": 0.5}, "temprature"),
        ({"temperature": 0}, "temperature"),
        ({"pooling": "max"}, "pooling"),
        ({"max_length": 4}, "max_length"),
    ],
)
def test_recommender_hyperparameters_are_checked(values, field):
    with pytest.raises(ValidationError, match=field):
        RecommenderAdapter.parse_hyperparameters(values)


# ----------------------------------------------------------------------------- embedding


EMBED_BATCH = [
    {"text": texts("hello world", "a space opera")},
    {"text": texts("jazz music")},
    {"text": texts("a space opera", "news about sports and history", "hello world")},
]


def test_embedding_outputs_conform_to_specs(embedder, tiny_bert):
    results = embedder.predict(EMBED_BATCH, [{}, {}, {}])
    assert len(results) == 3
    for request, result in zip(EMBED_BATCH, results):
        assert_conforms(EmbeddingAdapter, result)
        assert result["embedding"].shape == (len(request["text"]), embedder.encoder.dimension)
    assert embedder.encoder.dimension == 32


def test_embedding_batch_matches_each_request_alone(embedder):
    together = embedder.predict(EMBED_BATCH, [{}, {}, {}])
    for request, batched in zip(EMBED_BATCH, together):
        (alone,) = embedder.predict([request], [{}])
        np.testing.assert_allclose(batched["embedding"], alone["embedding"], atol=ATOL, rtol=0)
    # the same text gets the same vector wherever it appears
    np.testing.assert_allclose(
        together[0]["embedding"][1], together[2]["embedding"][0], atol=ATOL, rtol=0
    )


def test_embedding_normalize(tiny_bert):
    unit = make(EmbeddingAdapter, tiny_bert, normalize=True)
    raw = make(EmbeddingAdapter, tiny_bert, normalize=False)
    (u,) = unit.predict([EMBED_BATCH[2]], [{}])
    (r,) = raw.predict([EMBED_BATCH[2]], [{}])
    np.testing.assert_allclose(np.linalg.norm(u["embedding"], axis=1), 1.0, atol=ATOL)
    assert not np.allclose(np.linalg.norm(r["embedding"], axis=1), 1.0, atol=1e-3)
    expected = r["embedding"] / np.linalg.norm(r["embedding"], axis=1, keepdims=True)
    np.testing.assert_allclose(u["embedding"], expected, atol=ATOL, rtol=0)


def test_embedding_pooling_cls_differs_from_mean(tiny_bert):
    mean = make(EmbeddingAdapter, tiny_bert, pooling="mean")
    cls = make(EmbeddingAdapter, tiny_bert, pooling="cls")
    (m,) = mean.predict([EMBED_BATCH[2]], [{}])
    (c,) = cls.predict([EMBED_BATCH[2]], [{}])
    assert m["embedding"].shape == c["embedding"].shape
    assert not np.allclose(m["embedding"], c["embedding"], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(c["embedding"], axis=1), 1.0, atol=ATOL)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embedding_pooling_matches_the_encoder_hidden_states(tiny_bert, pooling):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert))
    model = AutoModel.from_pretrained(str(tiny_bert)).eval()
    text = "loves jazz and rock music"
    with torch.inference_mode():
        hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0].numpy()
    expected = hidden[0] if pooling == "cls" else hidden.mean(axis=0)  # one text: no padding
    adapter = make(EmbeddingAdapter, tiny_bert, pooling=pooling, normalize=False)
    (result,) = adapter.predict([{"text": texts(text)}], [{}])
    np.testing.assert_allclose(result["embedding"][0], expected, atol=ATOL, rtol=0)


def test_embedding_pooling_cls_batch_matches_alone(tiny_bert):
    adapter = make(EmbeddingAdapter, tiny_bert, pooling="cls", normalize=False)
    together = adapter.predict(EMBED_BATCH, [{}, {}, {}])
    for request, batched in zip(EMBED_BATCH, together):
        (alone,) = adapter.predict([request], [{}])
        np.testing.assert_allclose(batched["embedding"], alone["embedding"], atol=ATOL, rtol=0)


def test_embedding_prefix_changes_vectors(embedder, tiny_bert):
    prefixed = make(EmbeddingAdapter, tiny_bert, prefix="query: ")
    (plain,) = embedder.predict([EMBED_BATCH[0]], [{}])
    (with_prefix,) = prefixed.predict([EMBED_BATCH[0]], [{}])
    assert not np.allclose(plain["embedding"], with_prefix["embedding"], atol=ATOL)
    (explicit,) = embedder.predict(
        [{"text": texts("query: hello world", "query: a space opera")}], [{}]
    )
    np.testing.assert_allclose(with_prefix["embedding"], explicit["embedding"], atol=ATOL, rtol=0)


def test_embedding_configure_hot_swaps(tiny_bert):
    adapter = make(EmbeddingAdapter, tiny_bert)
    (before,) = adapter.predict([EMBED_BATCH[0]], [{}])
    adapter.configure(EmbeddingAdapter.parse_hyperparameters({"pooling": "cls"}))
    (after,) = adapter.predict([EMBED_BATCH[0]], [{}])
    (expected,) = make(EmbeddingAdapter, tiny_bert, pooling="cls").predict([EMBED_BATCH[0]], [{}])
    np.testing.assert_allclose(after["embedding"], expected["embedding"], atol=ATOL, rtol=0)
    assert not np.allclose(after["embedding"], before["embedding"], atol=1e-3)


def test_embedding_example_passes_through_predict(embedder):
    example = embedder.example()
    assert set(example) == {"text"}
    assert example["text"].dtype == NUMPY_DTYPES["BYTES"]
    (result,) = embedder.predict([example], [{}])
    assert_conforms(EmbeddingAdapter, result)
    assert result["embedding"].shape == (len(example["text"]), 32)


def test_embedding_empty_request_in_batch(embedder):
    results = embedder.predict([{"text": texts()}, EMBED_BATCH[1]], [{}, {}])
    assert results[0]["embedding"].shape == (0, 32)
    assert results[0]["embedding"].dtype == np.float32
    (alone,) = embedder.predict([EMBED_BATCH[1]], [{}])
    np.testing.assert_allclose(results[1]["embedding"], alone["embedding"], atol=ATOL, rtol=0)


def test_embedding_hyperparameter_typo():
    with pytest.raises(ValidationError, match="normalise"):
        EmbeddingAdapter.parse_hyperparameters({"normalise": True})


def test_recommender_best_line_scores_each_item_by_its_best_clause(tiny_bert):
    adapter = make(RecommenderAdapter, tiny_bert, profile_scoring="best_line")
    embedder = make(EmbeddingAdapter, tiny_bert, pooling="mean", normalize=True)
    profile = "likes science fiction films, cooks pasta and plays jazz."
    request = {"user": texts(profile), "items": texts("a space opera", "a cooking show")}
    (result,) = adapter.predict([request], [{}])
    clauses = ["likes science fiction films", "cooks pasta", "plays jazz"]
    (u,) = embedder.predict([{"text": texts(*clauses)}], [{}])
    (m,) = embedder.predict([{"text": request["items"]}], [{}])
    expected = (u["embedding"] @ m["embedding"].T).max(axis=0, keepdims=True)
    np.testing.assert_allclose(result["scores"], expected, atol=ATOL, rtol=0)
    # Batched with other requests (and other scorings' texts) it answers the same.
    together = adapter.predict([request, *BATCH], [{}] * (1 + len(BATCH)))
    np.testing.assert_allclose(together[0]["scores"], result["scores"], atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    ("cuda_available", "in_ray_actor", "assigned_gpus", "device"),
    [
        (False, False, 0, "cpu"),  # CPU build or no GPU
        (False, True, 1, "cpu"),  # Ray's fake GPUs in tests: torch sees none
        (True, False, 0, "cuda"),  # offline run on a GPU box: torch decides
        (True, True, 1, "cuda"),  # a replica that reserved a GPU
        (True, True, 0, "cpu"),  # num_gpus: 0 on a GPU node: Ray 2.60 leaves CUDA visible to it
    ],
)
def test_encoder_uses_a_gpu_only_where_ray_assigned_one(
    cuda_available, in_ray_actor, assigned_gpus, device
):
    from app.adapters.encoder import pick_device

    assert pick_device(cuda_available, in_ray_actor, assigned_gpus) == device


def test_encoder_outside_ray_runs_where_torch_says(recommender):
    import torch

    assert recommender.encoder.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


# ----------------------------------------------------------------------------- per-request refusal


def test_a_text_the_tokenizer_refuses_fails_only_its_own_request(recommender, embedder):
    """F1 inside the model: a lone surrogate (validation would stop it; an adapter must not rely
    on that) makes the tokenizer raise. Only its request gets an InvalidInput (a 400 naming the
    input); the rest of the batch is encoded and answered as if alone. Before, the whole
    predict raised and every request of the batch failed."""
    poison = {"user": texts("likes jazz"), "items": texts("a space opera", "\ud800")}
    results = recommender.predict([BATCH[0], poison, BATCH[2]], [{}, {}, {}])
    assert isinstance(results[1], InvalidInput) and "'items'" in results[1].message
    for request, result in ((BATCH[0], results[0]), (BATCH[2], results[2])):
        (alone,) = recommender.predict([request], [{}])
        np.testing.assert_allclose(result["scores"], alone["scores"], atol=ATOL, rtol=0)
    embedded = embedder.predict([EMBED_BATCH[0], {"text": texts("\udfff")}], [{}, {}])
    assert isinstance(embedded[1], InvalidInput) and "'text'" in embedded[1].message
    assert embedded[0]["embedding"].shape == (2, embedder.encoder.dimension)


def test_a_request_over_the_token_budget_fails_alone_with_413(tiny_bert):
    adapter = make(RecommenderAdapter, tiny_bert)
    (small,) = adapter.predict([BATCH[1]], [{}])
    tokens = sum(len(ids) for ids in adapter.encoder.tokenize(
        [*BATCH[1]["user"], *BATCH[1]["items"]], max_length=128))  # fmt: skip
    adapter.max_tokens = tokens
    big = {"user": texts("likes jazz"), "items": texts(*(f"item number {i}" for i in range(40)))}
    results = adapter.predict([big, BATCH[1]], [{}, {}])
    assert isinstance(results[0], OverBudget) and "limits.max_tokens" in results[0].message
    assert http_status(results[0]) == 413
    np.testing.assert_allclose(results[1]["scores"], small["scores"], atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- micro-batches


@given(
    lengths=st.lists(st.integers(1, 600), max_size=300),
    max_texts=st.integers(1, 64),
    max_tokens=st.integers(1, 5000),
)
def test_micro_batches_cover_every_text_once_within_bounds(lengths, max_texts, max_tokens):
    batches = micro_batches(lengths, max_texts, max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert 1 <= len(b) <= max_texts
        if len(b) > 1:  # a text longer than the token bound goes alone
            assert len(b) * max(lengths[i] for i in b) <= max_tokens


def test_micro_batched_embeddings_match_one_pass(embedder):
    encoder = embedder.encoder
    sentences = [f"item {i} " + "word " * (i % 13) for i in range(50)]
    ids = encoder.tokenize(sentences, max_length=64)
    beats = []
    encoder.on_progress = lambda: beats.append(1)
    try:
        one_pass = encoder.embed(ids, pooling="mean", normalize=True, micro_batch_texts=10_000,
                                 micro_batch_tokens=10**9)  # fmt: skip
        beats.clear()
        micro = encoder.embed(ids, pooling="mean", normalize=True, micro_batch_texts=7,
                              micro_batch_tokens=60)  # fmt: skip
    finally:
        encoder.on_progress = embedder.beat
    np.testing.assert_allclose(micro, one_pass, atol=ATOL, rtol=0)
    assert len(beats) == len(micro_batches([len(t) for t in ids], 7, 60)) > 7
