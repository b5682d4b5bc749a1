"""The one strict pydantic base every config model derives from, and the shared name patterns."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = [
    "CONTROLLER_DEPLOYMENT",
    "LABEL_VALUE_PATTERN",
    "NAME_PATTERN",
    "REGION_LABEL",
    "ROUTER_DEPLOYMENT",
    "SHA256_PATTERN",
    "FiniteStrictModel",
    "StrictModel",
]

NAME_PATTERN = r"^[a-z0-9]([a-z0-9_.-]{0,62}[a-z0-9])?$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ROUTER_DEPLOYMENT = "Router"
CONTROLLER_DEPLOYMENT = "RolloutController"
# The Ray node label a region overlay pins replicas to (cluster/*.yaml label every node type).
REGION_LABEL = "region"
# A Kubernetes-style label value, as Ray's label_selector accepts it.
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$"


class StrictModel(BaseModel):
    """Every config model: an unknown field is an error that names it; instances are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FiniteStrictModel(StrictModel):
    """A StrictModel whose floats must be finite (plans and gates: NaN or inf never compare)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
