"""Small pure helpers of the Router deployment (deployments/router.py), without a cluster."""

from __future__ import annotations

import subprocess
import sys

import pytest
from starlette.requests import Request

from app.errors import InvalidInput, http_status
from deployments.router import _caller, _idempotency_key, routing_unit


def _request(headers: dict[str, str], client=("10.1.2.3", 5555)) -> Request:
    return Request({
        "type": "http", "method": "POST", "path": "/admin/rollout/abort",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()], "client": client,
    })  # fmt: skip


def test_the_ab_unit_is_a_stable_hash_of_the_routing_key():
    assert routing_unit(None) is None  # keyless: each request is its own unit
    unit = routing_unit("user-42")
    assert unit == routing_unit("user-42") != routing_unit("user-43") and len(unit) == 16
    # the same in another process (every router replica must agree): not the salted hash()
    other = subprocess.run(
        [sys.executable, "-c", "from deployments.router import routing_unit as u; print(u('user-42'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert other == unit
    assert routing_unit("\ud800") is not None  # any key a header can carry hashes


def test_the_caller_of_a_command_is_named_and_located():
    assert _caller(_request({"x-rollout-actor": "alice@laptop"})) == "alice@laptop from 10.1.2.3"
    forwarded = _request({"x-forwarded-for": "203.0.113.9, 10.0.0.1"})
    assert _caller(forwarded) == "unnamed from 203.0.113.9"
    hostile = _caller(_request({"x-rollout-actor": "x" * 500 + "\n"}, client=None))
    assert hostile == "x" * 80 + " from unknown"


def test_an_idempotency_key_is_passed_on_or_refused_naming_the_header():
    assert _idempotency_key(_request({})) is None
    assert _idempotency_key(_request({"idempotency-key": "3f2a-9c"})) == "3f2a-9c"
    assert _idempotency_key(_request({"idempotency-key": "k" * 256})) == "k" * 256
    for bad in ("", "k" * 257, "two words", "caf\u00e9"):
        headers = [(b"idempotency-key", bad.encode("latin-1"))]
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": headers})
        with pytest.raises(InvalidInput, match="header idempotency-key") as refused:
            _idempotency_key(request)
        assert http_status(refused.value) == 400


def test_a_command_client_sends_a_fresh_idempotency_key_each_time():
    import httpx

    from app.ops.cli.admin_client import AdminClient

    keys = []

    def answer(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers.get("idempotency-key"))
        return httpx.Response(200, json={"phase": "paused"})

    client = AdminClient("http://router", "t" * 16, timeout_s=1)
    client._client = httpx.Client(base_url="http://router", transport=httpx.MockTransport(answer))
    client.command("pause")
    client.command("pause")
    client.status()
    assert keys[0] and keys[1] and keys[0] != keys[1]  # a retry of one call reuses its own
    assert keys[2] is None  # reads need none
