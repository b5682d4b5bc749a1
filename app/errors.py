"""Domain errors and the one table that maps them to HTTP statuses.

ServingError
├── InvalidInput          400  malformed JSON, wrong datatype/shape, missing/extra input
├── ModelNotFound         404  unknown model or version
├── Unauthorized          401  admin API without the right bearer token
├── Conflict              409  the request is valid but not in the current state
│   └── CommandRefused    409  a rollout command that is not valid in the current phase
├── Gone                  410  feedback for a request id whose record has expired
├── PayloadTooLarge       413  body over the router's max_body_bytes
├── Overloaded            429  too many requests queued (carries Retry-After)
├── ModelFailure          500  the model raised while serving a valid request
│   └── InjectedFault     500  a fault injected on purpose (rollback rehearsals)
├── Unavailable           503  no replica of the chosen version can serve (Retry-After)
│   ├── ReplicaLost       503  the replica died mid-request (lost node); retried once
│   ├── LoadShed          503  the version's queue is full (Serve's max_queued_requests)
│   └── Fenced            503  a rollout controller replica superseded by a newer one
└── DeadlineExceeded      504  the request's deadline passed
    └── ReplicaWaitTimeout 504  ... while its version had no running replica (Serve replacing one)

ConfigError                    a config file or field is wrong (CLI / builder, never HTTP)
ArtifactError                  a model artifact is missing or fails its checksum
"""

from __future__ import annotations

__all__ = [
    "ArtifactError",
    "CommandRefused",
    "ConfigError",
    "Conflict",
    "DeadlineExceeded",
    "Fenced",
    "Gone",
    "InjectedFault",
    "InvalidInput",
    "LoadShed",
    "ModelFailure",
    "ModelNotFound",
    "OverBudget",
    "Overloaded",
    "PayloadTooLarge",
    "ReplicaLost",
    "ReplicaWaitTimeout",
    "RequestTimeout",
    "ServingError",
    "Unauthorized",
    "Unavailable",
    "http_status",
]


class ServingError(Exception):
    """Base of the errors a client can see. `retry_after_s` becomes a Retry-After header."""

    retry_after_s: float | None = None

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def __reduce__(self):  # keep the message and retry hint across Ray's pickling
        return (_rebuild, (type(self), self.message, self.retry_after_s))


def _rebuild(cls: type[ServingError], message: str, retry_after_s: float | None) -> ServingError:
    return cls(message, retry_after_s=retry_after_s)


class InvalidInput(ServingError):
    """400: the request does not match the protocol or the model's declared inputs."""


class OverBudget(InvalidInput):
    """413: the request is over the model's declared budget (`limits` in its model config:
    texts, characters, encoder texts, tokens). The client's to fix, never the version's fault."""


class RequestTimeout(ServingError):
    """408: the request body did not arrive within the request's deadline (a slow upload)."""


class ModelNotFound(ServingError):
    """404: no such model, or no such version of it."""


class Unauthorized(ServingError):
    """401: the admin API needs `Authorization: Bearer <token>`."""


class Conflict(ServingError):
    """409: the request is valid but not in the current state (e.g. resume when not paused)."""


class CommandRefused(Conflict):
    """409: the rollout refuses an operator command in its current phase (resume when not
    paused, start while a rollout runs); the message says why."""


class Gone(ServingError):
    """410: the thing named existed but is no longer kept (an expired request id)."""


class PayloadTooLarge(ServingError):
    """413: the request body is larger than the router accepts."""


class Overloaded(ServingError):
    """429: too many requests are waiting; retry after the given delay."""

    retry_after_s = 1.0


class ModelFailure(ServingError):
    """500: the model failed on a valid request."""


class InjectedFault(ModelFailure):
    """500: a fault injected by the version's `faults` config."""


class Unavailable(ServingError):
    """503: no healthy replica of the chosen version; retry after the given delay."""

    retry_after_s = 1.0


class ReplicaLost(Unavailable):
    """503: the replica working on the request died (its process or its node was lost). Not the
    version's fault: breakers ignore it; a version with a fallback falls back, one without (the
    stable version) is retried once on another replica of the same version."""


class LoadShed(Unavailable):
    """503: the version shed the request because its queue is full; not a fault of the model,
    so it neither opens breakers nor counts against a rollout."""


class Fenced(Unavailable):
    """503: this rollout controller replica has been superseded: a newer one claimed the
    controller epoch (Serve starts the new replica of an updated controller while the old one
    drains). It no longer ticks, publishes, stores or takes commands; retry, and the newer
    replica answers. The message names both epochs."""


class DeadlineExceeded(ServingError):
    """504: the request ran past its deadline."""


class ReplicaWaitTimeout(DeadlineExceeded):
    """504: the deadline passed while the version had no running replica: the request waited on
    Serve replacing one (a plain Serve deployment's clients wait the same way). Not the
    version's failure: it opens no breaker and counts against no rollout gate."""


class ConfigError(ValueError):
    """A config is invalid. The message names the file and the field."""


class ArtifactError(RuntimeError):
    """A model artifact is missing, unreadable, or does not match its declared sha256."""


# The one table from error type to HTTP status. Subclasses inherit their parent's row.
_STATUS: dict[type[ServingError], int] = {
    InvalidInput: 400,
    OverBudget: 413,
    RequestTimeout: 408,
    Unauthorized: 401,
    ModelNotFound: 404,
    Conflict: 409,
    Gone: 410,
    PayloadTooLarge: 413,
    Overloaded: 429,
    ModelFailure: 500,
    Unavailable: 503,
    DeadlineExceeded: 504,
}


def http_status(error: ServingError) -> int:
    """The HTTP status for `error`, found through its class hierarchy."""
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500
