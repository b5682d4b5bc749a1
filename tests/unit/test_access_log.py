"""The router's access log record (no Ray)."""

from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from app.config import RouterSettings
from app.observability.access_log import AccessLogSettings, access_record, outcome_for_status


def _record(settings: AccessLogSettings, body: bytes | None = b'{"inputs": []}', **kw):
    base = dict(settings=settings, rng=random.Random(0), request_id="r-1", model="rec",
                version="v2", decision="sticky", status=200, latency_ms=12.3456, body=body)  # fmt: skip
    return access_record(**{**base, **kw})


def test_default_record_has_the_fields_and_no_payload():
    record = _record(AccessLogSettings())
    assert record == {
        "request_id": "r-1", "model": "rec", "model_version": "v2", "routing_decision": "sticky",
        "status": 200, "outcome": "ok", "latency_ms": 12.346,
    }  # fmt: skip
    json.dumps(record)  # JSON-safe
    assert not set(record) & {"message", "msg", "name", "args", "levelname"}  # LogRecord's own


def test_fallback_cache_and_error_fields_when_present():
    record = _record(AccessLogSettings(), fallback_from="v2", fallback_reason="error",
                     cache="miss", error_type="model_error", status=500)  # fmt: skip
    assert record["fallback_from"] == "v2" and record["fallback_reason"] == "error"
    assert record["cache"] == "miss" and record["error_type"] == "model_error"
    assert record["outcome"] == "error"


def test_payload_sampling_is_opt_in_and_truncated():
    settings = AccessLogSettings(payload_sample_rate=1.0, max_payload_chars=16)
    record = _record(settings, body=b"x" * 40)
    assert record["payload"] == "x" * 16 and record["payload_truncated"] is True
    sampled = sum("payload" in _record(AccessLogSettings(payload_sample_rate=0.25),
                                       rng=random.Random(i)) for i in range(400))  # fmt: skip
    assert 50 < sampled < 150  # about a quarter; seeded, so the same every run


@pytest.mark.parametrize("status, outcome", [(200, "ok"), (404, "client_error"), (413, "client_error"),
                                             (429, "error"), (500, "error"), (504, "error")])  # fmt: skip
def test_outcome_for_status(status, outcome):
    assert outcome_for_status(status) == outcome


def test_bad_settings_name_the_field():
    with pytest.raises(ValidationError, match="payload_sample_rate"):
        RouterSettings.model_validate({"access_log": {"payload_sample_rate": 2}})
    with pytest.raises(ValidationError, match="access_log.verbose"):
        RouterSettings.model_validate({"access_log": {"verbose": True}})


def test_flush_serve_logs_writes_what_a_buffering_handler_holds():
    import logging
    import logging.handlers

    from app.observability.access_log import flush_serve_logs

    written: list[str] = []

    class Target(logging.Handler):
        def emit(self, record):
            written.append(record.getMessage())

    logger = logging.getLogger("test.serve.buffered")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    # What Serve installs under RAY_SERVE_THROUGHPUT_OPTIMIZED=1: 1,000 records held back.
    buffered = logging.handlers.MemoryHandler(
        capacity=1000, target=Target(), flushLevel=logging.ERROR
    )
    logger.addHandler(buffered)
    try:
        logger.info("rolled_back")
        assert written == []  # held back: without a flush the event waits for 999 more records
        flush_serve_logs("test.serve.buffered")
        assert written == ["rolled_back"]
        flush_serve_logs(
            "test.serve.nothing-configured"
        )  # a logger without handlers: nothing to do
    finally:
        logger.removeHandler(buffered)
