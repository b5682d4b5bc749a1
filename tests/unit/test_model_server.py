"""The model replica's health check and per-request refusals, on the deployment's own class with
a tiny BERT (no Ray cluster: the class is driven directly, its metrics go to a fake)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.config import load_model_config
from app.errors import InvalidInput, OverBudget
from app.observability.metrics import Metrics
from deployments.model_server import ModelServer
from tests.support.tiny_models import build_tiny_bert, write_model_config


class _NoMetric:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return build_tiny_bert(tmp_path_factory.mktemp("server") / "bert", seed=0)


def _server(tmp_path, tiny_bert, **overrides) -> ModelServer:
    config = load_model_config(write_model_config(tmp_path, "v1", tiny_bert, **overrides))
    server = ModelServer.func_or_class(config)  # type: ignore[attr-defined]
    server.metrics = Metrics(config.name, factory=lambda spec: _NoMetric())
    return server


def _request(*items: str) -> dict[str, np.ndarray]:
    def texts(values):
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array

    return {"user": texts(["likes jazz"]), "items": texts(items)}


def test_health_check_does_not_wait_behind_a_batch_that_makes_progress(tmp_path, tiny_bert):
    """F4: the health check used to take the model lock, so it waited behind a long batch and
    Serve killed a replica that was working. Now it answers at once while the batch beats."""
    server = _server(tmp_path, tiny_bert)

    async def scenario():
        await server.check_health()  # loads the model
        release = threading.Event()
        predict = server.adapter.predict

        def slow(batch, parameters):
            while not release.wait(0.05):
                server.adapter.beat()  # as the encoder does after each micro-batch
            return predict(batch, parameters)

        server.adapter.predict = slow
        answer = asyncio.create_task(server._infer(_request("a space opera"), {}))
        while not server._model_lock.locked():
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.wait_for(server.check_health(), timeout=2.0)
        waited = time.monotonic() - started
        release.set()
        outputs, _ = await answer
        return waited, outputs

    waited, outputs = asyncio.run(scenario())
    assert waited < 2.0 and outputs["scores"].shape == (1, 1)


def test_health_check_fails_when_the_running_batch_stops_making_progress(tmp_path, tiny_bert):
    server = _server(tmp_path, tiny_bert, health_check_timeout_s=0.2)

    async def scenario():
        await server.check_health()
        release = threading.Event()
        server.adapter.predict = lambda batch, parameters: release.wait(10) and []
        answer = asyncio.create_task(server._infer(_request("a space opera"), {}))
        while not server._model_lock.locked():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.4)  # no beat for longer than health_check_timeout_s
        try:
            with pytest.raises(RuntimeError, match="no progress"):
                await server.check_health()
        finally:
            release.set()
            answer.cancel()

    asyncio.run(scenario())


def test_a_request_the_model_refuses_is_a_400_and_its_batch_mates_are_answered(tmp_path, tiny_bert):
    server = _server(tmp_path, tiny_bert, limits={"max_tokens": 40})

    async def scenario():
        await server.check_health()
        good = [server._infer(_request("a space opera"), {}) for _ in range(3)]
        poison = server._infer(_request("jazz", "\ud800"), {})
        over = server._infer(_request(*(f"item number {i}" for i in range(30))), {})
        return await asyncio.gather(*good, poison, over, return_exceptions=True)

    *good, poison, over = asyncio.run(scenario())
    assert all(outputs["scores"].shape == (1, 1) for outputs, _ in good)
    assert isinstance(poison, InvalidInput) and "tokenized" in poison.message
    assert isinstance(over, OverBudget) and "limits.max_tokens is 40" in over.message
    assert server.batcher.isolated == 0  # refused in place: no batch was re-run
