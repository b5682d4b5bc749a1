"""The adapter interface: the small seam between the serving machinery and a model.

An adapter declares its tensors and hyperparameters, loads an artifact directory, and turns a
*list* of requests into a list of responses, so that one forward pass can serve a whole dynamic
batch. Everything else (HTTP, validation against the declared tensors, batching, health checks,
hot patching, fault injection) is done for it.

To plug in another model, subclass `ModelAdapter` and name it in a model config as
`adapter: my_package.my_module:MyAdapter`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from app.errors import InvalidInput

__all__ = ["Datatype", "ModelAdapter", "Tensors", "TensorSpec", "NUMPY_DTYPES"]

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip

# V2 datatype -> numpy dtype (little-endian, as the binary extension requires).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

Tensors = dict[str, np.ndarray]


class TensorSpec(BaseModel):
    """One input or output tensor. `-1` in `shape` means any length, up to `max_dim`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    datatype: Datatype
    shape: tuple[int, ...]
    max_dim: int = Field(default=4096, ge=1, description="Longest length a -1 dimension takes.")

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class ModelAdapter(ABC):
    """Loads one artifact and serves batches of requests.

    Subclasses set `task`, `inputs`, `outputs` and `Hyperparameters` (a pydantic model with
    `extra="forbid"`, so config typos fail validation), and implement `predict`.
    """

    task: ClassVar[str]
    inputs: ClassVar[tuple[TensorSpec, ...]]
    outputs: ClassVar[tuple[TensorSpec, ...]]
    Hyperparameters: ClassVar[type[BaseModel]]

    def __init__(self, artifact_dir: Path, hyperparameters: BaseModel, *, threads: int = 1) -> None:
        self.artifact_dir = artifact_dir
        self.hyperparameters = hyperparameters
        self.threads = threads
        # The model config's `limits.max_tokens` (set by the replica; None: no token budget).
        self.max_tokens: int | None = None
        # time.monotonic() of the last sign of progress inside `predict` (see `beat`).
        self.heartbeat = time.monotonic()

    def beat(self) -> None:
        """Call from a long `predict` (after each micro-batch): the replica's health check
        passes while a batch runs, as long as it beats (deployments/model_server.py)."""
        self.heartbeat = time.monotonic()

    @classmethod
    def parse_hyperparameters(cls, values: dict[str, Any]) -> BaseModel:
        """Validate raw hyperparameters; raises pydantic.ValidationError naming the field."""
        return cls.Hyperparameters.model_validate(values)

    @classmethod  # noqa: B027 (a hook, a no-op unless an adapter overrides it)
    def check_parameters(cls, inputs: Tensors, parameters: dict[str, Any]) -> None:
        """Reject request parameters this model cannot take by raising `InvalidInput`.

        Runs in the router, before the request reaches a replica."""

    @classmethod
    def encoder_texts(cls, inputs: Tensors) -> int:
        """How many texts serving `inputs` makes the model encode, at most over every
        hyperparameter setting (checked against the model config's `limits.max_encoder_texts`
        in the router). Default: one per BYTES element."""
        return sum(
            inputs[spec.name].size for spec in cls.inputs
            if spec.datatype == "BYTES" and spec.name in inputs
        )  # fmt: skip

    @classmethod
    def agreement(cls, primary: Tensors, shadow: Tensors) -> dict[str, float]:
        """How closely a shadow version's answer matches the primary's (for shadow traffic).

        Default: the mean absolute difference of each floating-point output of equal shape.
        Keys become metric and status names, so keep them few and fixed."""
        result: dict[str, float] = {}
        for spec in cls.outputs:
            a, b = primary.get(spec.name), shadow.get(spec.name)
            if a is None or b is None or a.dtype.kind != "f" or a.shape != b.shape:
                continue
            result[f"{spec.name}_mean_abs_diff"] = float(np.mean(np.abs(a - b))) if a.size else 0.0
        return result

    def configure(self, hyperparameters: BaseModel) -> None:
        """Apply new hyperparameters in place (a hot patch). Override if work is needed."""
        self.hyperparameters = hyperparameters

    @abstractmethod
    def predict(
        self, batch: list[Tensors], parameters: list[dict[str, Any]]
    ) -> Sequence[Tensors | InvalidInput]:
        """Serve a batch: one dict of input arrays (and of parameters) per request, one dict of
        output arrays per request, in the same order.

        A request the model cannot take gets an `InvalidInput` in its place (a 400 for that
        request alone; the others are answered). Raising fails the whole call; the batcher
        then re-runs the batch's requests one by one, so the exception reaches only the
        request that caused it, at the cost of an extra forward pass each."""

    @abstractmethod
    def example(self) -> Tensors:
        """A small valid request, used for health checks and `rollout validate`'s smoke test."""
