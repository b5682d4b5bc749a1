"""The Prometheus gate's client, against a real HTTP server on loopback playing Prometheus."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from app.rollout.prometheus import PrometheusUnavailable, parse_query_response, query_scalar


def vector(*values):
    return {"status": "success", "data": {"resultType": "vector",
            "result": [{"metric": {}, "value": [1.0, str(v)]} for v in values]}}  # fmt: skip


def test_parse_scalar_and_single_series():
    assert (
        parse_query_response(
            {"status": "success", "data": {"resultType": "scalar", "result": [1, "2.5"]}}
        )
        == 2.5
    )
    assert parse_query_response(vector(0.125)) == 0.125


@pytest.mark.parametrize(
    "document,needle",
    [
        ({"status": "error", "error": "parse error at char 3"}, "parse error at char 3"),
        (vector(), "no series"),
        (vector(1, 2), "2 series; wrap it in sum"),
        (vector("NaN"), "returned nan"),
        (vector("+Inf"), "returned inf"),  # a ratio over zero: no reading, and not JSON
        (vector("-Inf"), "returned -inf"),  # would pass any max
        ({"status": "success", "data": {"resultType": "matrix", "result": []}}, "matrix"),
        (
            {"status": "success", "data": {"resultType": "vector", "result": [{"value": [1]}]}},
            "unreadable",
        ),
        ([], "not a success"),
    ],
)
def test_parse_refuses_what_is_not_one_number(document, needle):
    with pytest.raises(PrometheusUnavailable, match=needle):
        parse_query_response(document)


@pytest.fixture()
def fake_prometheus():
    seen: list[str] = []
    answer = {"body": vector(3.0), "status": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            url = urlparse(self.path)
            seen.append(parse_qs(url.query).get("query", [""])[0])
            payload = (
                json.dumps(answer["body"]).encode() if url.path == "/api/v1/query" else b"nope"
            )
            self.send_response(answer["status"] if url.path == "/api/v1/query" else 404)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen, answer
    server.shutdown()
    server.server_close()


def test_query_scalar_over_http(fake_prometheus):
    url, seen, answer = fake_prometheus
    assert query_scalar(url + "/", 'sum(rate(errors_total{version="v2"}[1m]))') == 3.0
    assert seen == ['sum(rate(errors_total{version="v2"}[1m]))']
    answer["body"] = {"status": "error", "error": "bad query"}
    answer["status"] = 400
    with pytest.raises(PrometheusUnavailable, match="bad query"):
        query_scalar(url, "x")


def test_unreachable_prometheus_is_unavailable_not_an_exception_storm():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    with pytest.raises(PrometheusUnavailable, match="unreachable"):
        query_scalar(f"http://127.0.0.1:{port}", "up", timeout_s=0.5)
