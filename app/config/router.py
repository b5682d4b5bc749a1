"""The Router's build-time knobs (builder args `router:`): headers, limits, and the settings of
its breaker, cache, drift tracker and access log."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from app.config._base import StrictModel


class BreakerSettings(StrictModel):
    """When a version's breaker opens, and how it tries the version again."""

    consecutive_failures: int = Field(
        default=5, ge=1, description="Failures in a row that open the breaker."
    )
    error_rate: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Failure fraction over the last window_s that opens the breaker.",
    )
    window_s: float = Field(
        default=10.0, gt=0, description="How far back the error-rate rule looks, in seconds."
    )
    min_requests: int = Field(
        default=20,
        ge=1,
        description="Outcomes the window must hold before the error-rate rule judges at all.",
    )
    cooldown_s: float = Field(
        default=5.0, gt=0, description="How long an open breaker refuses before it probes, in s."
    )
    half_open_probes: int = Field(
        default=1, ge=1, description="Requests a half-open breaker lets through at once."
    )
    enabled: bool = Field(default=True, description="A disabled breaker admits everything.")


class CacheSettings(StrictModel):
    """The router's response cache (off by default: only deterministic models should use it)."""

    enabled: bool = Field(default=False, description="Serve repeated requests from the cache.")
    max_entries: int = Field(default=10_000, ge=1, description="Most responses kept.")
    max_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description="Most bytes kept (bodies plus headers); one entry may use at most a quarter.",
    )
    ttl_s: float = Field(
        default=60.0, gt=0, description="How long a response stays fresh after it is stored, in s."
    )


class MicroBatchSettings(StrictModel):
    """Router -> model micro-batching (app/serving/coalesce.py): while a version already has
    `max_calls_in_flight` calls out from this router per running replica of it, further
    requests for it wait for one of them to come back and then leave together as one call
    (`ModelServer.infer_many`), at most `max_batch_size` to a call; at most the version's
    `max_queued_requests` wait, one more is shed (503). Each request keeps its own deadline,
    breaker verdict, fallback, shadow copy and error; the replica batches them into forward
    passes as before."""

    enabled: bool = Field(
        default=False, description="Coalesce concurrent requests for one version when it is busy."
    )
    max_batch_size: int = Field(
        default=32, ge=1, le=1024, description="Most requests one call to a version carries."
    )
    max_calls_in_flight: int = Field(
        default=2, ge=1, le=1024,
        description="Calls per running replica of a version this router keeps out before it "
        "holds new requests to coalesce them; below it a request leaves at once, alone (no "
        "added latency).",
    )  # fmt: skip


class DriftSettings(StrictModel):
    """Where scores are binned and over how long they are compared (router builder args)."""

    enabled: bool = Field(default=True, description="Track output score drift per version.")
    low: float = Field(default=-8.0, description="Lower edge of the score grid.")
    high: float = Field(default=8.0, description="Upper edge of the score grid.")
    bins: int = Field(default=160, ge=10, le=10_000, description="Fine bins between low and high.")
    psi_bins: int = Field(default=10, ge=2, le=100, description="Quantile groups the PSI compares.")
    slots: int = Field(default=12, ge=1, le=1000, description="Time slots in the sliding window.")
    slot_s: float = Field(default=10.0, gt=0, le=3600, description="Seconds per time slot.")
    min_samples: int = Field(
        default=200, ge=1, description="Scores each side needs in the window before a PSI."
    )
    epsilon: float = Field(default=1e-4, gt=0, lt=0.01, description="Floor for an empty share.")

    @model_validator(mode="after")
    def _high_above_low(self) -> DriftSettings:
        if not self.high > self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self

    @model_validator(mode="after")
    def _psi_bins_within_bins(self) -> DriftSettings:
        if self.psi_bins > self.bins:
            raise ValueError(f"psi_bins ({self.psi_bins}) must be at most bins ({self.bins})")
        return self


class AccessLogSettings(StrictModel):
    """Router access log (builder args `router.access_log`)."""

    enabled: bool = Field(default=True, description="Log one structured record per inference.")
    payload_sample_rate: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Share of requests whose body is logged (0: never; bodies may hold personal data).",
    )  # fmt: skip
    max_payload_chars: int = Field(
        default=2000, ge=16, le=1_000_000, description="Longest logged payload, in characters."
    )


class CaptureSettings(StrictModel):
    """Router builder args `router.capture`: whether live requests are sampled to disk, how many,
    how big, how long they are kept, and what is dropped or hashed first. Off by default: request
    bodies may hold personal data."""

    enabled: bool = Field(default=False, description="Sample live requests to `directory`.")
    directory: str | None = Field(
        default=None,
        min_length=1,
        description="Where samples go (`{directory}/{model}/*.jsonl`); required when enabled. "
        "A shared filesystem when the Router has replicas on several nodes.",
    )
    sample_rate: float = Field(
        default=0.01, ge=0.0, le=1.0, description="Share of answered user requests offered."
    )
    max_records_per_s: float = Field(
        default=20.0,
        gt=0,
        le=100_000,
        description="Records each Router replica may capture per second (a token bucket of "
        "that many tokens); more are skipped and counted.",
    )
    max_record_bytes: int = Field(
        default=256 * 1024,
        ge=256,
        le=64 * 1024 * 1024,
        description="Largest record kept, in bytes (the body as received, then the encoded "
        "line); bigger ones are skipped and counted.",
    )
    max_file_bytes: int = Field(
        default=32 * 1024 * 1024, ge=4096, description="A writer starts a new file above this."
    )
    max_files: int = Field(
        default=8,
        ge=1,
        le=10_000,
        description="Files kept per model (oldest deleted): at most max_files x max_file_bytes "
        "on disk per model.",
    )
    max_queue_records: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="Records waiting for the writer thread (memory: at most this many x "
        "max_record_bytes); more are dropped and counted.",
    )
    drop_fields: tuple[str, ...] = Field(
        default=(),
        description="V2 input tensors and request `parameters` keys removed before storing.",
    )
    hash_fields: tuple[str, ...] = Field(
        default=(),
        description="V2 input tensors and request `parameters` keys replaced by HMAC-SHA256 "
        "hex digests (salt: $ROLLOUT_CAPTURE_SALT or the file named by "
        "$ROLLOUT_CAPTURE_SALT_FILE).",
    )

    @model_validator(mode="after")
    def _directory_when_enabled(self) -> CaptureSettings:
        if self.enabled and self.directory is None:
            raise ValueError("directory is required when enabled is true")
        return self

    @model_validator(mode="after")
    def _record_fits_a_file(self) -> CaptureSettings:
        if self.max_record_bytes > self.max_file_bytes:
            raise ValueError(
                f"max_record_bytes ({self.max_record_bytes}) must be at most max_file_bytes "
                f"({self.max_file_bytes})"
            )
        return self

    @model_validator(mode="after")
    def _field_names(self) -> CaptureSettings:
        for name, fields in (("drop_fields", self.drop_fields), ("hash_fields", self.hash_fields)):
            for value in fields:
                if not value:
                    raise ValueError(f"{name}: a field name must not be empty")
            repeated = sorted(n for n, count in Counter(fields).items() if count > 1)
            if repeated:
                raise ValueError(f"{name}: {repeated} listed more than once")
        both = sorted(set(self.drop_fields) & set(self.hash_fields))
        if both:
            raise ValueError(f"drop_fields and hash_fields both name {both}; choose one")
        return self


class RouterSettings(StrictModel):
    """Router knobs fixed at build time (builder args)."""

    routing_key_header: str = Field(
        default="x-user-id", min_length=1, description="Header that carries the routing key."
    )
    pin_header: str = Field(
        default="x-model-version", min_length=1, description="Header that pins a version."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest request body accepted (413 above)."
    )
    routing_key_parameter: str = Field(
        default="user_id", min_length=1,
        description="Request parameter that carries the routing key when the header is absent.",
    )  # fmt: skip
    fallback_header: str = Field(
        default="x-allow-fallback", min_length=1,
        description="Header (value 'true') that lets a pinned request fall back.",
    )  # fmt: skip
    timeout_header: str = Field(
        default="x-request-timeout-s", min_length=1,
        description="Header with the client's deadline in seconds (capped by request_timeout_s).",
    )  # fmt: skip
    open_feedback: bool = Field(
        default=False,
        description="Take feedback from anyone. Default: it needs the feedback token "
        "(ROLLOUT_FEEDBACK_TOKEN[_FILE], not the admin token) and is off without one, because "
        "outcomes decide promotions.",
    )
    feedback_rate_per_s: float = Field(
        default=1000.0, gt=0,
        description="Feedback items per second each client (address) may send; 429 above.",
    )  # fmt: skip
    feedback_burst: int = Field(
        default=5000, ge=1, description="Feedback items a client may send at once (bucket size)."
    )
    public_status: bool = Field(
        default=False,
        description="Serve GET /status to anyone. Default: it needs the admin token (it shows "
        "every deployed version, breaker states and rejected configs), and is off when the "
        "admin API is off.",
    )
    health_poll_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="How often the router refreshes version health."
    )
    access_log: AccessLogSettings = Field(
        default_factory=AccessLogSettings,
        description="One structured log record per inference (app/observability/access_log.py).",
    )
    capture: CaptureSettings = Field(
        default_factory=CaptureSettings,
        description="A sample of answered requests for load replays (app/serving/capture.py).",
    )
    drift: DriftSettings = Field(
        default_factory=DriftSettings,
        description="Output score drift per version against the stable version (app/observability/drift.py).",
    )
    model_transport: Literal["grpc", "actor"] = Field(
        default="grpc",
        description="How the Router calls model replicas: 'grpc' (Serve's inter-deployment gRPC "
        "server that every replica runs; handle option _by_reference=False) or 'actor' (Ray "
        "actor calls, Serve's default). bench/throughput.py measures both.",
    )
