"""A text-embedding adapter: `text` (BYTES [N]) -> `embedding` (FP32 [N, D])."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.adapters.base import ModelAdapter, Tensors, TensorSpec
from app.adapters.encoder import TextEncoder, TokenBook
from app.errors import InvalidInput

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
        self.encoder.on_progress = self.beat  # after each micro-batch

    def predict(
        self, batch: list[Tensors], parameters: list[dict[str, Any]]
    ) -> list[Tensors | InvalidInput]:
        hp: EmbeddingHyperparameters = self.hyperparameters  # type: ignore[assignment]
        tokens = TokenBook(self.encoder, hp.max_length, self.max_tokens)
        prepared: list[list[str] | InvalidInput] = []
        for request in batch:
            texts = [hp.prefix + str(t) for t in request["text"]]
            try:  # a request the tokenizer refuses, or over budget, fails alone (400)
                tokens.admit({"text": texts})
            except InvalidInput as exc:
                prepared.append(exc)
                continue
            prepared.append(texts)
        vectors = tokens.embed(pooling=hp.pooling, normalize=hp.normalize)
        return [
            entry if isinstance(entry, InvalidInput)
            else {"embedding": vectors[[tokens.row[t] for t in entry]]}
            for entry in prepared
        ]  # fmt: skip

    def example(self) -> Tensors:
        return {"text": np.array(["hello world"], dtype=object)}
