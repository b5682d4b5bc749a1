"""A model version's config file (`configs/models/<model>/<version>.yaml`) and its hot-patchable part."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from app.config._base import NAME_PATTERN, SHA256_PATTERN, StrictModel

# Serve 2.60's default push interval for autoscaling metrics (ray.serve.config
# DEFAULT_METRICS_INTERVAL_S); app.config does not import Ray.
DEFAULT_METRICS_INTERVAL_S = 10.0


class Resources(StrictModel):
    """Ray resources for each replica of a version."""

    num_cpus: float = Field(default=1.0, ge=0, description="Logical CPUs per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per replica (fractions allowed).")
    memory_mb: int | None = Field(
        default=None, ge=1, description="Memory reserved per replica, in MiB (Ray's `memory`)."
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="torch intra-op threads per replica; default: ceil(num_cpus), at least 1.",
    )

    def ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_mb is not None:
            options["memory"] = self.memory_mb * 1024 * 1024
        return options

    def threads(self) -> int:
        return self.torch_threads or max(1, math.ceil(self.num_cpus))


class Autoscaling(StrictModel):
    """Serve autoscaling for a version's replicas: bounds, target load, and how fast Serve reacts.

    The timing fields default to Serve's own defaults (Ray 2.60 `AutoscalingConfig`): a version
    scales up after 30 s of sustained load and down after 10 minutes of less. Each Router
    replica's handle to the version samples its ongoing requests and pushes them to Serve's
    controller every `metrics_interval_s`; the controller averages them over
    `look_back_period_s` and acts once the same decision has held for the delay. So the time to
    scale up is about metrics_interval_s + upscale_delay_s + a replica's start, and the fields
    that make a test or a spiky workload scale in seconds are the four below (see
    docs/configuration.md#autoscaling).
    """

    min_replicas: int = Field(default=1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="How long the load must call for more replicas before Serve adds them, in s.",
    )
    downscale_delay_s: float = Field(
        default=600.0,
        ge=0,
        le=86_400,
        description="How long the load must call for fewer replicas before Serve removes them, "
        "in s (never below min_replicas).",
    )
    look_back_period_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="Window over which the ongoing-request samples are averaged, in s.",
    )
    metrics_interval_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="How often each caller's handle (and replica) pushes its load samples to "
        "Serve's controller, in s. Serve 2.60 marks this field deprecated (a future release "
        "replaces it with environment variables) but it is the only push interval it reads; "
        "a value other than 10 makes Serve log a DeprecationWarning where it builds the config.",
    )
    capacity_aware: bool = Field(
        default=False,
        description="Capacity-aware rollout steps (docs/capacity-aware-steps.md): before a "
        "rollout raises this version's weight, the controller asks for the replicas the new "
        "share needs and the step waits until they run. Serve's upscale delay is then applied "
        "by the version's own autoscaling policy, to the load only.",
    )
    replica_capacity_rps: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        allow_inf_nan=False,
        description="Requests per second one replica sustains within its latency goal; "
        "required when capacity_aware is true.",
    )
    capacity_headroom: float = Field(
        default=1.5,
        ge=1,
        le=10,
        allow_inf_nan=False,
        description="Factor over the projected traffic that a capacity-aware step asks "
        "replicas for (bursts, traffic growing while the step holds).",
    )

    @model_validator(mode="after")
    def _max_at_least_min(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be greater than or equal to "
                f"min_replicas ({self.min_replicas})"
            )
        return self

    @model_validator(mode="after")
    def _window_longer_than_push(self) -> Autoscaling:
        # A window no longer than the push interval averages one sample at most, so a single
        # late push swings the decision; Serve 2.60 warns and says a later release will refuse it.
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError(
                f"look_back_period_s ({self.look_back_period_s:g}) must be greater than "
                f"metrics_interval_s ({self.metrics_interval_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _capacity_aware_needs_a_rate(self) -> Autoscaling:
        if self.capacity_aware and self.replica_capacity_rps is None:
            raise ValueError(
                "replica_capacity_rps is required when capacity_aware is true "
                "(requests per second one replica sustains)"
            )
        return self

    def serve_config(self) -> dict[str, Any]:
        """Serve's `autoscaling_config` for the version's deployment."""
        config: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "look_back_period_s": self.look_back_period_s,
        }
        # Left out at Serve's default, so that Serve warns about the deprecated field only for
        # a config that changes it.
        if self.metrics_interval_s != DEFAULT_METRICS_INTERVAL_S:
            config["metrics_interval_s"] = self.metrics_interval_s
        return config


class Batching(StrictModel):
    """Dynamic batching inside each replica (app/serving/batching.py: a batch forms when the model is
    free); hot-patchable."""

    max_batch_size: int = Field(default=16, ge=1, le=1024, description="Requests per batch.")
    batch_wait_timeout_s: float = Field(
        default=0.005, ge=0, le=10, description="Longest wait for a batch to fill, in seconds."
    )


class FaultInjection(StrictModel):
    """Faults injected on purpose, like a service mesh's, to rehearse rollbacks; hot-patchable."""

    error_rate: float = Field(
        default=0.0, ge=0, le=1, description="Fraction of requests that fail with a 500."
    )
    added_latency_ms: float = Field(
        default=0.0, ge=0, le=600_000, description="Latency added to delayed requests, in ms."
    )
    latency_rate: float = Field(
        default=1.0, ge=0, le=1, description="Fraction of requests that get added_latency_ms."
    )


class RequestLimits(StrictModel):
    """One request's budget on this model, checked before the model runs: the router refuses a
    request over a text, character or encoder-text limit (413 naming the limit) before it
    reaches a replica; the replica counts tokens after tokenizing the request on its own and
    refuses it alone (413) before the forward pass. The router's body limit for the model is
    derived from these (app/serving/budget.py), so a request that fits them always fits the
    body limit, in JSON or binary form."""

    max_text_bytes: int = Field(
        default=8192, ge=1, le=1 << 20, description="UTF-8 bytes of one BYTES element."
    )
    max_total_text_bytes: int = Field(
        default=256 * 1024, ge=1, le=64 << 20,
        description="UTF-8 bytes of all BYTES elements of one request together.",
    )  # fmt: skip
    max_encoder_texts: int = Field(
        default=2048, ge=1, le=1_000_000,
        description="Texts the model encodes for one request (the recommender counts every "
        "clause of every profile, as `profile_scoring: best_line` encodes them, plus the items).",
    )  # fmt: skip
    max_response_bytes: int = Field(
        default=8 << 20, ge=1024, le=1 << 30,
        description="Largest response body; a bigger one is a 413 (ask for fewer outputs, a "
        "smaller top_k, or binary outputs).",
    )  # fmt: skip
    max_tokens: int | None = Field(
        default=16384, ge=1,
        description="Tokens of one request after tokenization (null: no limit); checked by "
        "the replica, before the forward pass.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _total_holds_one(self) -> RequestLimits:
        if self.max_total_text_bytes < self.max_text_bytes:
            raise ValueError(
                f"max_total_text_bytes ({self.max_total_text_bytes}) must be at least "
                f"max_text_bytes ({self.max_text_bytes})"
            )
        return self


def _check_digests(value: str | dict[str, str]) -> str | dict[str, str]:

    digests = value.values() if isinstance(value, dict) else [value]
    if isinstance(value, dict) and not value:
        raise ValueError("sha256 mapping must name at least one weights file")
    for digest in digests:
        if not re.fullmatch(SHA256_PATTERN, digest):
            raise ValueError(f"{digest!r} is not a lowercase hex sha256 (64 characters)")
    return value


class WeightsPatch(StrictModel):
    """New weights for a running version: loaded beside the old ones, checked, smoke-tested,
    then swapped in at once. Anything wrong and the old weights keep serving."""

    artifact: str = Field(
        min_length=1,
        description=(
            "Model directory (relative to the model config's folder), package:<module>, or "
            "mlflow:models:/<name>/<version>[/<sub-path>] (a registry version, never an alias)."
        ),
    )
    sha256: str | dict[str, str] = Field(
        description="sha256 of the weights file, or a mapping file -> sha256, as in a model config."
    )

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        return _check_digests(value)


class ModelUserConfig(StrictModel):
    """The part of a version that Serve changes in place (`user_config` -> `reconfigure`)."""

    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="Adapter hyperparameters; checked by the adapter."
    )
    batching: Batching = Field(default_factory=Batching)
    faults: FaultInjection = Field(default_factory=FaultInjection)
    weights: WeightsPatch | None = Field(
        default=None,
        description="Hot-swap the weights (null: the model config's own artifact and sha256).",
    )


class ModelConfig(StrictModel):
    """One model version: `configs/models/<name>/<version>.yaml`."""

    name: str = Field(pattern=NAME_PATTERN, description="Model name, as in /v2/models/<name>.")
    version: str = Field(pattern=NAME_PATTERN, description="Version label, e.g. v1.")
    artifact: str = Field(
        min_length=1,
        description=(
            "Model directory (save_pretrained or sentence-transformers layout). Relative paths are "
            "resolved from the config file's folder; `package:<module>` uses a Python package "
            "that ships its model (its get_model_path()); `mlflow:models:/<name>/<version>"
            "[/<sub-path>]` a model registry version (numbers only: aliases and stages move)."
        ),
    )
    sha256: str | dict[str, str] = Field(
        description=(
            "sha256 of the weights file, or a mapping from each weights file (relative path) to its "
            "sha256. Checked when a replica loads. `rollout checksum <dir>` prints it."
        )
    )
    adapter: str = Field(
        min_length=1,
        description="Adapter (task): a registered name such as `recommender`, or `module:Class`.",
    )
    description: str = Field(default="", description="Free text shown in model metadata.")
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    max_ongoing_requests: int = Field(
        default=32, ge=1, le=10_000, description="Requests a replica works on at once."
    )
    max_queued_requests: int = Field(
        default=64,
        ge=-1,
        description="Requests each caller (each Router replica) may queue for this version "
        "beyond what its replicas work on; more are shed with a 503 and Retry-After "
        "(-1: unbounded, which lets an overload grow memory and latency without end).",
    )
    limits: RequestLimits = Field(
        default_factory=RequestLimits,
        description="One request's budget (texts, characters, encoder texts, tokens).",
    )
    batching: Batching = Field(default_factory=Batching)
    faults: FaultInjection = Field(default_factory=FaultInjection)
    cacheable: bool = Field(
        default=True,
        description="Whether the router may cache this version's responses (when its cache is on).",
    )
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=0)

    # Where the file was read from; used to resolve a relative artifact path. Not a YAML field.
    source: str | None = Field(default=None, exclude=True, repr=False)

    @field_validator("sha256")
    @classmethod
    def _hex_digests(cls, value: str | dict[str, str]) -> str | dict[str, str]:
        return _check_digests(value)

    @model_validator(mode="after")
    def _batch_fits_in_flight(self) -> ModelConfig:
        if self.max_ongoing_requests < self.batching.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be greater than or equal "
                f"to batching.max_batch_size ({self.batching.max_batch_size}), or batches never fill"
            )
        return self

    @property
    def deployment_name(self) -> str:
        return f"{self.name}-{self.version}"

    def user_config(self) -> ModelUserConfig:
        return ModelUserConfig(
            hyperparameters=self.hyperparameters, batching=self.batching, faults=self.faults
        )

    def base_dir(self) -> Path:
        return Path(self.source).resolve().parent if self.source else Path.cwd()
