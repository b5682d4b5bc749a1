"""`NoopAdapter`: a model that returns its input, so a benchmark measures the serving path only.

Named in a model config as `adapter: bench.noop:NoopAdapter` (the checkout must be importable:
`bench.router_overhead` puts it on the Ray workers' PYTHONPATH). It loads nothing; its artifact
directory still needs one weights file, because `ModelServer` checks the sha256 before it
builds the adapter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from app.adapters.base import ModelAdapter, Tensors, TensorSpec

__all__ = ["NoopAdapter"]


class NoopHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoopAdapter(ModelAdapter):
    """`x` (FP32 [N], N <= 1024) -> `y` = `x`."""

    task = "noop"
    inputs = (TensorSpec(name="x", datatype="FP32", shape=(-1,), max_dim=1024),)
    outputs = (TensorSpec(name="y", datatype="FP32", shape=(-1,), max_dim=1024),)
    Hyperparameters = NoopHyperparameters

    def predict(self, batch: list[Tensors], parameters: list[dict[str, Any]]) -> list[Tensors]:
        return [{"y": np.asarray(request["x"], dtype=np.float32)} for request in batch]

    def example(self) -> Tensors:
        return {"x": np.zeros(4, dtype=np.float32)}
