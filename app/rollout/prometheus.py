"""The Prometheus query gate's client: one instant query, one number, or a clear reason why not.

A rollout gate must not fail because the monitoring system is down: any problem here makes
the gate *skipped* (with the reason in status and history), never failed. A query must come
back as one number: a scalar, or a vector with exactly one series (wrap it in `sum(...)`).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PrometheusUnavailable", "parse_query_response", "query_scalar"]


class PrometheusUnavailable(Exception):
    """The query could not give one number (unreachable, an error, no or many series)."""


def parse_query_response(document: Any) -> float:
    """The one number in a `/api/v1/query` response body (already JSON-decoded)."""
    if not isinstance(document, dict) or document.get("status") != "success":
        error = document.get("error") if isinstance(document, dict) else None
        raise PrometheusUnavailable(f"query failed: {error or 'not a success response'}")
    data = document.get("data")
    if not isinstance(data, dict):
        raise PrometheusUnavailable("response has no data object")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        sample: Any = result  # anything unreadable fails below, as PrometheusUnavailable
    elif kind == "vector":
        if not result:
            raise PrometheusUnavailable("query returned no series")
        if len(result) > 1:
            raise PrometheusUnavailable(
                f"query returned {len(result)} series; wrap it in sum(...) or max(...)"
            )
        if not isinstance(result[0], dict):
            raise PrometheusUnavailable(f"unreadable series {result[0]!r}")
        sample = result[0].get("value")
    else:
        raise PrometheusUnavailable(f"query returned a {kind}, not a scalar or a vector")
    try:
        value = float(sample[1])
    except (TypeError, ValueError, IndexError):
        raise PrometheusUnavailable(f"unreadable sample {sample!r}") from None
    if not math.isfinite(value):  # NaN, or +-Inf (a ratio over zero): no reading to judge
        raise PrometheusUnavailable(f"query returned {value}")
    return value


def query_scalar(base_url: str, query: str, *, timeout_s: float = 1.0) -> float:
    """Run an instant query against Prometheus at `base_url`; PrometheusUnavailable if it can't."""
    import httpx

    try:
        response = httpx.get(
            f"{base_url.rstrip('/')}/api/v1/query", params={"query": query}, timeout=timeout_s
        )
        document = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        raise PrometheusUnavailable(f"{base_url} unreachable or not Prometheus: {exc}") from None
    try:
        return parse_query_response(document)
    except PrometheusUnavailable:
        raise
    except Exception as exc:  # any other shape: skip the gate, never break the controller's tick
        raise PrometheusUnavailable(
            f"unexpected response shape: {type(exc).__name__}: {exc}"
        ) from None
