"""app/ops/serving_mode.py: the environment every Ray node of a HAProxy-served cluster gets."""

from __future__ import annotations

import subprocess

import pytest

from app.ops.serving_mode import (
    HAPROXY_FLAG,
    HAPROXY_RETRY_ON,
    HaproxyPorts,
    serving_env,
    shell_exports,
)


def test_haproxy_re_sends_a_request_whose_router_died_without_an_answer():
    # Serve's default is `conn-failure` only: a Router killed mid-request (or a reused
    # keep-alive connection to it) then reaches the client as "server disconnected".
    assert HAPROXY_RETRY_ON.split() == ["conn-failure", "empty-response"]
    for env in (serving_env(), serving_env("/tmp/rh-x", HaproxyPorts(1, 2, 3, 4), drain_s=1)):
        assert env[HAPROXY_FLAG] == "1"
        assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == HAPROXY_RETRY_ON


def test_the_shell_exports_survive_a_shell_with_the_space_in_retry_on():
    env = serving_env("/tmp/rh-x", HaproxyPorts(1, 2, 3, 4), haproxy_threads=1)
    script = shell_exports(env) + 'printf "%s" "$RAY_SERVE_HAPROXY_RETRY_ON"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout == HAPROXY_RETRY_ON


@pytest.mark.parametrize("kwargs", [{"haproxy_threads": 0}, {"drain_s": -1}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        serving_env(**kwargs)
