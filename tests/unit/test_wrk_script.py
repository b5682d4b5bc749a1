"""bench/wrk/infer.lua run by the real wrk (Debian package `wrk`) for 1 s against a tiny HTTP
server in this process: what it sends (V2 inference requests, a new user on each) and the JSON
line its done() prints. No Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench/wrk/infer.lua"


class Server:
    """Answers every POST with `status` and a small JSON body; keeps what it received."""

    def __init__(self, status: int) -> None:
        self.lock = threading.Lock()
        self.received: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
            disable_nagle_algorithm = True

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with server.lock:
                    server.received.append({"method": self.command, "path": self.path,
                                            "headers": dict(self.headers.items()), "body": body})  # fmt: skip
                answer = b'{"model_name": "recommender", "outputs": []}'
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        pytest.fail(
            "wrk is not installed: apt-get install wrk (Debian package; .ci/run installs it)"
        )
    return found


def run_wrk(wrk: str, url: str, env: dict[str, str]) -> dict[str, Any]:
    """wrk for 1 s with the script; the JSON line done() printed (the last line of stdout)."""
    done = subprocess.run([wrk, "-t2", "-c4", "-d1s", "-s", str(SCRIPT), url], env=env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    return json.loads(last)


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(200) as running:
        yield running


def test_sends_v2_requests_each_from_a_new_user(wrk: str, server: Server) -> None:
    result = run_wrk(wrk, server.url, {"WRK_MODEL": "recommender", "WRK_VERSION": "v2"})
    received = list(server.received)
    assert received, "the server received no request"
    assert {r["method"] for r in received} == {"POST"}
    assert {r["path"] for r in received} == {"/v2/models/recommender/infer"}
    for r in received:
        headers = {k.lower(): v for k, v in r["headers"].items()}
        assert headers["content-type"] == "application/json"
        assert headers["x-model-version"] == "v2"
        doc = json.loads(r["body"])
        inputs = {t["name"]: t for t in doc["inputs"]}
        assert set(inputs) == {"user", "items"}
        for tensor in inputs.values():
            assert tensor["datatype"] == "BYTES"
            assert tensor["shape"] == [len(tensor["data"])]
            assert all(isinstance(v, str) for v in tensor["data"])
        assert len(inputs["items"]["data"]) == 6
        assert doc["parameters"] == {"top_k": 1}
    users = [{k.lower(): v for k, v in r["headers"].items()}["x-user-id"] for r in received]
    assert len(set(users)) == len(users), "a user id came twice"

    assert result["path"] == "/v2/models/recommender/infer"
    assert result["model"] == "recommender" and result["version"] == "v2"
    assert 0 < result["requests"] <= len(received)
    assert result["duration_s"] > 0.9
    assert result["rps"] == pytest.approx(result["requests"] / result["duration_s"], rel=0.01)
    assert 0 < result["p50_ms"] <= result["p90_ms"] <= result["p99_ms"] <= result["max_ms"]
    assert result["mean_ms"] > 0
    assert result["socket_errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert result["non_2xx"] == 0


def test_route_prefix_bodies_file_users_and_non_2xx(wrk: str, tmp_path: Path) -> None:
    bodies = [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [float(i)]}]}
              for i in range(3)]  # fmt: skip
    file = tmp_path / "bodies.jsonl"
    file.write_text("".join(json.dumps(b) + "\n" for b in bodies) + "\n")
    with Server(503) as failing:
        env = {"WRK_MODEL": "noop", "WRK_BODIES": str(file), "WRK_USERS": "3"}
        result = run_wrk(wrk, failing.url + "/direct", env)
        received = list(failing.received)
    assert {r["path"] for r in received} == {"/direct/v2/models/noop/infer"}
    assert {json.loads(r["body"])["inputs"][0]["data"][0] for r in received} == {0.0, 1.0, 2.0}
    users = {{k.lower(): v for k, v in r["headers"].items()}["x-user-id"] for r in received}
    assert users <= {"wrk-user-1", "wrk-user-2", "wrk-user-3"}
    assert all("x-model-version" not in {k.lower() for k in r["headers"]} for r in received)
    assert result["version"] is None
    assert result["requests"] > 0
    assert result["non_2xx"] == result["requests"]  # every answer was a 503


def test_wrkload_without_wrk_exits_2_saying_how_to_install(monkeypatch, capsys) -> None:
    from bench import wrkload

    monkeypatch.setattr(wrkload.shutil, "which", lambda name: None)
    assert wrkload.main(["--smoke"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install wrk" in err[0]


def test_pooled_sums_counts_and_averages_percentiles() -> None:
    from bench.wrkload import pooled

    def run(requests: int, p50: float, max_ms: float, timeouts: int) -> dict[str, Any]:
        return {"requests": requests, "duration_s": 10.0, "p50_ms": p50, "p90_ms": p50 * 2,
                "p99_ms": p50 * 3, "max_ms": max_ms, "non_2xx": 1,
                "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": timeouts}}  # fmt: skip

    figure = pooled([run(100, 10.0, 50.0, 0), run(300, 20.0, 90.0, 2)])
    assert figure["requests"] == 400 and figure["duration_s"] == 20.0 and figure["rps"] == 20.0
    assert (figure["p50_ms"], figure["p90_ms"], figure["p99_ms"]) == (15.0, 30.0, 45.0)
    assert figure["max_ms"] == 90.0
    assert figure["non_2xx"] == 2 and figure["socket_errors"]["timeout"] == 2
    # A round in which nothing answered (all in flight at wrk's deadline) has no percentiles.
    assert pooled([run(0, 0.0, 0.0, 0), run(100, 10.0, 50.0, 0)])["p50_ms"] == 10.0
    assert pooled([run(0, 0.0, 0.0, 0)])["p99_ms"] is None
