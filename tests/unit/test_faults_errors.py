"""Fault plans, the error -> HTTP status table, error pickling, adapter lookup, top_k."""

from __future__ import annotations

import pickle
import random
import re
import sys
import textwrap
import uuid

import numpy as np
import pytest

from app.adapters import ADAPTERS, ModelAdapter, adapter_class
from app.adapters.recommender import RecommenderAdapter, _top_k
from app.config import FaultInjection
from app.errors import (
    DeadlineExceeded,
    InjectedFault,
    InvalidInput,
    ModelFailure,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    ServingError,
    Unavailable,
    http_status,
)
from app.serving.faults import FaultPlan, plan_fault

DRAWS = 20_000


def fault_rates(faults: FaultInjection, seed: int = 99) -> tuple[float, float, set[float]]:
    rng = random.Random(seed)
    plans = [plan_fault(faults, rng) for _ in range(DRAWS)]
    failed = sum(p.fail for p in plans) / DRAWS
    delayed = sum(p.delay_s > 0 for p in plans) / DRAWS
    return failed, delayed, {p.delay_s for p in plans}


# ----------------------------------------------------------------------------- plan_fault


def test_no_faults():
    failed, delayed, delays = fault_rates(FaultInjection())
    assert failed == 0 and delayed == 0 and delays == {0.0}


def test_error_rate_zero_never_fails():
    failed, _, _ = fault_rates(FaultInjection(error_rate=0.0, added_latency_ms=5))
    assert failed == 0


def test_error_rate_one_always_fails():
    failed, delayed, _ = fault_rates(FaultInjection(error_rate=1.0))
    assert failed == 1.0
    assert delayed == 0


@pytest.mark.parametrize("seed", [1, 2])
def test_error_rate_fraction(seed):
    failed, delayed, _ = fault_rates(FaultInjection(error_rate=0.3), seed)
    assert failed == pytest.approx(0.3, abs=0.015)
    assert delayed == 0


def test_latency_rate_fraction_and_delay_in_seconds():
    failed, delayed, delays = fault_rates(FaultInjection(added_latency_ms=250, latency_rate=0.25))
    assert delayed == pytest.approx(0.25, abs=0.015)
    assert delays == {0.0, 0.25}
    assert failed == 0


def test_latency_rate_one_delays_every_request():
    _, delayed, delays = fault_rates(
        FaultInjection(added_latency_ms=40)
    )  # latency_rate defaults to 1
    assert delayed == 1.0
    assert delays == {0.04}


def test_latency_rate_without_added_latency_delays_nothing():
    _, delayed, _ = fault_rates(FaultInjection(added_latency_ms=0, latency_rate=1.0))
    assert delayed == 0


def test_latency_and_errors_drawn_independently():
    rng = random.Random(3)
    faults = FaultInjection(error_rate=0.5, added_latency_ms=100, latency_rate=0.5)
    plans = [plan_fault(faults, rng) for _ in range(DRAWS)]
    both = sum(p.fail and p.delay_s > 0 for p in plans) / DRAWS
    assert both == pytest.approx(0.25, abs=0.015)


def test_plan_fault_is_deterministic_for_a_seed():
    faults = FaultInjection(error_rate=0.3, added_latency_ms=10, latency_rate=0.3)

    def plans(seed):
        rng = random.Random(seed)
        return [plan_fault(faults, rng) for _ in range(200)]

    assert plans(8) == plans(8)
    assert plans(8) != plans(9)
    assert all(isinstance(p, FaultPlan) for p in plans(8))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InvalidInput("x"), 400),
        (ModelNotFound("x"), 404),
        (PayloadTooLarge("x"), 413),
        (Overloaded("x"), 429),
        (ModelFailure("x"), 500),
        (InjectedFault("x"), 500),
        (Unavailable("x"), 503),
        (DeadlineExceeded("x"), 504),
        (ServingError("x"), 500),
    ],
)
def test_http_status_table(error, status):
    assert http_status(error) == status


def test_http_status_of_user_subclasses_follows_the_parent():
    class BadTopK(InvalidInput):
        pass

    class Draining(Unavailable):
        pass

    class DeeperFault(InjectedFault):
        pass

    assert http_status(BadTopK("x")) == 400
    assert http_status(Draining("x")) == 503
    assert http_status(DeeperFault("x")) == 500
    assert issubclass(InjectedFault, ModelFailure)


def test_retry_after_defaults():
    assert Overloaded("busy").retry_after_s == 1.0
    assert Unavailable("down").retry_after_s == 1.0
    assert InvalidInput("bad").retry_after_s is None
    assert Unavailable("down", retry_after_s=5).retry_after_s == 5
    # an instance's hint does not leak into the class default
    assert Unavailable("again").retry_after_s == 1.0


@pytest.mark.parametrize(
    "error",
    [
        InvalidInput("input 'user' has no data"),
        ModelNotFound("version 'v9' not found"),
        InjectedFault("injected fault (error_rate 0.3)"),
        Overloaded("queue full", retry_after_s=2.5),
        Unavailable("no replica"),
        Unavailable("draining", retry_after_s=30.0),
        DeadlineExceeded("too slow"),
    ],
)
def test_serving_error_survives_pickle(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert copy.message == error.message
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert copy.retry_after_s == error.retry_after_s
    assert http_status(copy) == http_status(error)


def test_pickled_retry_hint_value():
    copy = pickle.loads(pickle.dumps(Overloaded("full", retry_after_s=7.0)))
    assert copy.retry_after_s == 7.0
    assert pickle.loads(pickle.dumps(InvalidInput("bad"))).retry_after_s is None


# ----------------------------------------------------------------------------- adapter_class


def test_registered_adapters():
    from app.adapters.embedding import EmbeddingAdapter

    assert adapter_class("recommender") is RecommenderAdapter
    assert adapter_class("text-embedding") is EmbeddingAdapter
    assert set(ADAPTERS) == {"recommender", "text-embedding"}


def test_module_class_path():
    assert adapter_class("app.adapters.recommender:RecommenderAdapter") is RecommenderAdapter


def test_user_module_class_path(tmp_path, monkeypatch):
    name = f"user_adapters_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from app.adapters.base import ModelAdapter

            class EchoAdapter(ModelAdapter):
                task = "echo"
                inputs = ()
                outputs = ()

                def predict(self, batch, parameters):
                    return batch

                def example(self):
                    return {}

            class NotAnAdapter:
                pass

            def factory():
                return EchoAdapter
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    cls = adapter_class(f"{name}:EchoAdapter")
    assert issubclass(cls, ModelAdapter) and cls.task == "echo"
    with pytest.raises(
        ValueError, match=re.escape(f"adapter '{name}:NotAnAdapter' is not a ModelAdapter subclass")
    ):
        adapter_class(f"{name}:NotAnAdapter")
    with pytest.raises(
        ValueError, match=re.escape(f"adapter '{name}:factory' is not a ModelAdapter subclass")
    ):
        adapter_class(f"{name}:factory")


@pytest.mark.parametrize("name", ["recomender", "RecommenderAdapter", "app.adapters.recommender"])
def test_unknown_adapter_name(name):
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"unknown adapter {name!r}; registered: ['recommender', 'text-embedding'], or give module:Class"
        ),
    ):
        adapter_class(name)


@pytest.mark.parametrize(
    "name", ["no_such_module_xyz:Adapter", "app.adapters.recommender:NoSuchAdapter"]
)
def test_adapter_that_cannot_be_imported(name):
    with pytest.raises(ValueError, match=re.escape(f"adapter {name!r} cannot be imported")):
        adapter_class(name)


@pytest.mark.parametrize("name", ["json:JSONDecoder", "json:dumps", "app.errors:InvalidInput"])
def test_non_adapter_classes_rejected(name):
    with pytest.raises(
        ValueError, match=re.escape(f"adapter {name!r} is not a ModelAdapter subclass")
    ):
        adapter_class(name)


# ----------------------------------------------------------------------------- top_k


def items(n: int) -> dict[str, np.ndarray]:
    return {"items": np.array([f"item {i}" for i in range(n)], dtype=object)}


@pytest.mark.parametrize(
    "parameters", [{}, {"top_k": None}, {"top_k": 1}, {"top_k": 3}, {"top_k": 50}]
)
def test_check_parameters_accepts_valid_top_k(parameters):
    RecommenderAdapter.check_parameters(items(3), parameters)


@pytest.mark.parametrize("value", [0, -1, True, False, 2.0, "2", [2]])
def test_check_parameters_rejects_bad_top_k(value):
    with pytest.raises(
        InvalidInput,
        match=re.escape(f"parameter 'top_k' must be a positive integer, got {value!r}"),
    ) as info:
        RecommenderAdapter.check_parameters(items(3), {"top_k": value})
    assert http_status(info.value) == 400


def test_top_k_is_capped_at_the_item_count():
    assert _top_k({}, 5) == 5
    assert _top_k({"top_k": None}, 5) == 5
    assert _top_k({"top_k": 2}, 5) == 2
    assert _top_k({"top_k": 5}, 5) == 5
    assert _top_k({"top_k": 9}, 5) == 5
