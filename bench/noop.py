"""`NoopAdapter`: a model that returns its input, so a benchmark measures the serving path only.

Named in a model config as `adapter: bench.noop:NoopAdapter` (the checkout must be importable:
bench/localapp.py puts it on the Ray workers' PYTHONPATH). It loads nothing; its artifact
directory still needs one weights file, because `ModelServer` checks the sha256 before it
builds the adapter. `write_model` writes such a version, `request_body` a request for it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from app.adapters.base import ModelAdapter, Tensors, TensorSpec

__all__ = ["NoopAdapter", "request_body", "write_model"]

MODEL, VERSION = "noop", "v1"
FLOATS = 16


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


def write_model(root: Path, batch_wait_s: float) -> Path:
    """A no-op model version: an artifact dir with one random weights file, and its config."""
    import yaml

    from app.serving.artifacts import artifact_digests

    artifact = root / "noop-artifact"
    artifact.mkdir()
    (artifact / "noop.safetensors").write_bytes(os.urandom(4096))
    config = {
        "name": MODEL,
        "version": VERSION,
        "artifact": str(artifact),
        "sha256": artifact_digests(artifact)["noop.safetensors"],
        "adapter": "bench.noop:NoopAdapter",
        "resources": {"num_cpus": 0.5},
        "max_ongoing_requests": 32,
        "batching": {"max_batch_size": 16, "batch_wait_timeout_s": batch_wait_s},
    }
    path = root / f"{VERSION}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def request_body(rng: np.random.Generator) -> tuple[bytes, list[float]]:
    """A V2 request of FLOATS random FP32 values (the encoded body, and the values)."""
    data = [float(v) for v in rng.standard_normal(FLOATS).astype(np.float32)]
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [FLOATS], "data": data}]}
    return json.dumps(body).encode(), data
