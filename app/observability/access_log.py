"""The router's access log record: one structured line per inference request.

Serve writes its own access line per request (method, route, status, latency). The router
adds what only it knows: which model and version answered, why (the routing decision), and
where a fallback came from. With Serve's `logging_config: {encoding: JSON}` every field below
is a top-level JSON key next to Serve's own (`request_id`, `deployment`, `replica`, ...).

Payloads are never logged by default: request bodies can hold personal data. Set
`payload_sample_rate` above 0 to log a sampled share of request bodies (truncated to
`max_payload_chars`), e.g. to debug a version's answers on real traffic.
"""

from __future__ import annotations

import logging
import logging.handlers
import random
from typing import Any

from app.config.router import AccessLogSettings

__all__ = [
    "ACCESS_MESSAGE",
    "AccessLogSettings",
    "access_record",
    "flush_serve_logs",
    "outcome_for_status",
]

# The log message of every access record: grep for it in text logs, filter on it in JSON.
ACCESS_MESSAGE = "rollout access"


def outcome_for_status(status: int) -> str:
    """The metric/log outcome of an HTTP status: ok, client_error (4xx but 429), or error."""
    if status < 400:
        return "ok"
    if status < 500 and status != 429:
        return "client_error"
    return "error"


def access_record(
    *,
    settings: AccessLogSettings,
    rng: random.Random,
    request_id: str | None,
    model: str,
    version: str | None,
    decision: str | None,
    status: int,
    latency_ms: float,
    fallback_from: str | None = None,
    fallback_reason: str | None = None,
    cache: str | None = None,
    error_type: str | None = None,
    body: bytes | None = None,
) -> dict[str, Any]:
    """The `extra` fields of one access log record (JSON-safe, flat, no payload unless sampled).

    Key names avoid the attributes of logging.LogRecord (`message`, `name`, ...), which the
    logging module refuses as extras."""
    record: dict[str, Any] = {
        "request_id": request_id,
        "model": model,
        "model_version": version,
        "routing_decision": decision,
        "status": status,
        "outcome": outcome_for_status(status),
        "latency_ms": round(latency_ms, 3),
    }
    if fallback_from is not None:
        record["fallback_from"] = fallback_from
        record["fallback_reason"] = fallback_reason
    if cache is not None:
        record["cache"] = cache
    if error_type is not None:
        record["error_type"] = error_type
    rate = settings.payload_sample_rate
    if body is not None and rate > 0 and rng.random() < rate:
        text = body.decode("utf-8", errors="replace")
        record["payload"] = text[: settings.max_payload_chars]
        record["payload_truncated"] = len(text) > settings.max_payload_chars
    return record


def flush_serve_logs(logger_name: str = "ray.serve") -> None:
    """Write the records Serve holds back for this replica to its log file now.

    Serve puts a replica's log records in a `MemoryHandler` that writes them only when it is full
    or on an ERROR. Its capacity is 1 by default, but 1,000 under
    `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` (`RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE`): a rollout
    controller's rare events (a rollback) would wait for 999 more records, or die with the
    replica. The controller calls this after each event it logs; the router's access records,
    one per request, may stay buffered."""
    for handler in logging.getLogger(logger_name).handlers:
        if isinstance(handler, logging.handlers.MemoryHandler):
            handler.flush()
