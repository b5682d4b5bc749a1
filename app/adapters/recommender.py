"""The demo recommender: scores candidate items for user profiles with a text encoder.

Inputs: `user` (BYTES [U]: user-profile texts) and `items` (BYTES [M]: candidate item texts).
Outputs: `scores` (FP32 [U, M]: similarity / temperature) and `ranking` (INT64 [U, K]: item
indices, best first; K = M, or the request parameter `top_k`).

Scoring (`profile_scoring`): `whole` embeds each profile as one text; `best_line` splits it
into its clauses (at `,` `;` `.` and " and "), embeds each, and scores an item by its best
matching clause, so one line about a taste is not diluted by lines about the rest of a life.
In the demo world (bench/world.py) that rule puts an item of the user's hidden favourite genre
first 85% of the time against 52% for `whole` (2,000 slates, `rollout bench world`).

A dynamic batch is encoded in one forward pass over the distinct texts of all its requests.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.adapters.base import ModelAdapter, Tensors, TensorSpec
from app.adapters.encoder import TextEncoder
from app.errors import InvalidInput

__all__ = ["RecommenderAdapter"]


class RecommenderHyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pooling: Literal["mean", "cls"] = Field(default="mean", description="Token pooling.")
    normalize: bool = Field(default=True, description="L2-normalize embeddings (cosine scores).")
    query_prefix: str = Field(default="", max_length=200, description="Prepended to user texts.")
    item_prefix: str = Field(default="", max_length=200, description="Prepended to item texts.")
    max_length: int = Field(default=128, ge=8, le=512, description="Tokens kept per text.")
    temperature: float = Field(
        default=1.0, gt=0, le=100, description="Scores are sim / temperature."
    )
    profile_scoring: Literal["whole", "best_line"] = Field(
        default="whole",
        description="whole: one embedding per profile; best_line: best-matching clause per item.",
    )


_CLAUSES = re.compile(r"[,;.]| and ")


def _clauses(text: str) -> list[str]:
    parts = [p.strip() for p in _CLAUSES.split(text)]
    return [p for p in parts if p] or [text]


def _top_k(parameters: dict[str, Any], items: int) -> int:
    value = parameters.get("top_k")
    if value is None:
        return items
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"parameter 'top_k' must be a positive integer, got {value!r}")
    return min(value, items)


class RecommenderAdapter(ModelAdapter):
    task = "recommender"
    inputs = (
        TensorSpec(name="user", datatype="BYTES", shape=(-1,), max_dim=64),
        TensorSpec(name="items", datatype="BYTES", shape=(-1,), max_dim=1024),
    )
    outputs = (
        TensorSpec(name="scores", datatype="FP32", shape=(-1, -1)),
        TensorSpec(name="ranking", datatype="INT64", shape=(-1, -1)),
    )
    Hyperparameters = RecommenderHyperparameters

    def __init__(self, artifact_dir, hyperparameters, *, threads: int = 1) -> None:
        super().__init__(artifact_dir, hyperparameters, threads=threads)
        self.encoder = TextEncoder(artifact_dir, threads=threads)

    @classmethod
    def check_parameters(cls, inputs: Tensors, parameters: dict[str, Any]) -> None:
        _top_k(parameters, len(inputs["items"]))

    @classmethod
    def agreement(cls, primary: Tensors, shadow: Tensors) -> dict[str, float]:
        """Top-k overlap of the two rankings (k = min(5, items)) and mean |score difference|."""
        result = super().agreement(primary, shadow)
        a, b = primary["ranking"], shadow["ranking"]
        k = min(5, a.shape[1], b.shape[1])
        if k:
            overlaps = [len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a.tolist(), b.tolist())]
            result["top_k_overlap"] = float(np.mean(overlaps))
        return result

    def predict(self, batch: list[Tensors], parameters: list[dict[str, Any]]) -> list[Tensors]:
        hp: RecommenderHyperparameters = self.hyperparameters  # type: ignore[assignment]
        # Each user is a list of texts: the whole profile, or its clauses (best_line).
        split = hp.profile_scoring == "best_line"
        users = [
            [[hp.query_prefix + c for c in (_clauses(str(t)) if split else [str(t)])]
             for t in request["user"]]
            for request in batch
        ]  # fmt: skip
        items = [[hp.item_prefix + str(t) for t in request["items"]] for request in batch]
        texts = (t for group in users for user in group for t in user)
        distinct = list(dict.fromkeys([*texts, *(t for group in items for t in group)]))
        vectors = self.encoder.encode(
            distinct, pooling=hp.pooling, normalize=hp.normalize, max_length=hp.max_length
        )
        row = {text: i for i, text in enumerate(distinct)}
        results: list[Tensors] = []
        for user_texts, item_texts, params in zip(users, items, parameters):
            m = vectors[[row[t] for t in item_texts]]
            similarity = np.stack(
                [(vectors[[row[t] for t in user]] @ m.T).max(axis=0) for user in user_texts]
            )
            scores = (similarity / hp.temperature).astype(np.float32)
            k = _top_k(params, len(item_texts))
            ranking = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
            results.append({"scores": scores, "ranking": ranking})
        return results

    def example(self) -> Tensors:
        return {
            "user": np.array(["likes science fiction films"], dtype=object),
            "items": np.array(["a space opera", "a cooking show"], dtype=object),
        }
