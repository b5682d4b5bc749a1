"""Small pure helpers of the Router deployment (deployments/router.py), without a cluster."""

from __future__ import annotations

import subprocess
import sys

from starlette.requests import Request

from deployments.router import _caller, routing_unit


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
