"""Model adapters: registered tasks, and `module:Class` for user-provided ones."""

from __future__ import annotations

import importlib

from app.adapters.base import NUMPY_DTYPES, ModelAdapter, Tensors, TensorSpec

__all__ = ["ADAPTERS", "NUMPY_DTYPES", "ModelAdapter", "Tensors", "TensorSpec", "adapter_class"]

# Registered names -> "module:Class", imported on demand so that naming a task loads only it.
ADAPTERS: dict[str, str] = {
    "recommender": "app.adapters.recommender:RecommenderAdapter",
    "text-embedding": "app.adapters.embedding:EmbeddingAdapter",
}


def adapter_class(name: str) -> type[ModelAdapter]:
    """The adapter class for a registered name or a `module:Class` path; ValueError if neither."""
    target = ADAPTERS.get(name, name)
    if ":" not in target:
        raise ValueError(
            f"unknown adapter {name!r}; registered: {sorted(ADAPTERS)}, or give module:Class"
        )
    module_name, _, class_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"adapter {name!r} cannot be imported: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise ValueError(f"adapter {name!r} is not a ModelAdapter subclass")
    return cls
