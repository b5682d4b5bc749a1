"""A text-embedding adapter: `text` (BYTES [N]) -> `embedding` (FP32 [N, D])."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.adapters.base import ModelAdapter, Tensors, TensorSpec
from app.adapters.encoder import TextEncoder

__all__ = ["EmbeddingAdapter"]


class EmbeddingHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    prefix: str = Field(default="", max_length=200)
    max_length: int = Field(default=128, ge=8, le=512)


class EmbeddingAdapter(ModelAdapter):
    task = "text-embedding"
    inputs = (TensorSpec(name="text", datatype="BYTES", shape=(-1,), max_dim=256),)
    outputs = (TensorSpec(name="embedding", datatype="FP32", shape=(-1, -1)),)
    Hyperparameters = EmbeddingHyperparameters

    def __init__(self, artifact_dir, hyperparameters, *, threads: int = 1) -> None:
        super().__init__(artifact_dir, hyperparameters, threads=threads)
        self.encoder = TextEncoder(artifact_dir, threads=threads)

    def predict(self, batch: list[Tensors], parameters: list[dict[str, Any]]) -> list[Tensors]:
        hp: EmbeddingHyperparameters = self.hyperparameters  # type: ignore[assignment]
        texts = [hp.prefix + str(t) for request in batch for t in request["text"]]
        vectors = self.encoder.encode(
            texts, pooling=hp.pooling, normalize=hp.normalize, max_length=hp.max_length
        )
        out, start = [], 0
        for request in batch:
            n = len(request["text"])
            out.append({"embedding": vectors[start : start + n].astype(np.float32)})
            start += n
        return out

    def example(self) -> Tensors:
        return {"text": np.array(["hello world"], dtype=object)}
