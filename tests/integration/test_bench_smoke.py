"""The benchmarks still run end to end (smoke size). No timing is asserted: figures are for the
README, measured by the full runs; here only their shape and their error counts are checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from app.config import project_root
from tests.support.tiny_models import write_model_config

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "module,keys",
    [
        ("bench.rollback", {"trials", "median_s", "max_s", "client_errors"}),
        ("bench.hotpatch", {"patches", "failed_requests", "replicas_restarted_elsewhere"}),
        (
            "bench.throughput",
            {
                "routed_over_plain_proxy",
                "routed_over_plain_same_ingress",
                "forward_over_plain_same_ingress",
                "routed_over_plain_proxy_model",
                "served_over_offline_single",
                "served_over_offline_batched",
                "routed_over_direct",
                "router_added_p50_ms",
                "serve_hop_p50_ms",
                "cache_speedup",
                "scale",
                "peak_rss_mb",
                "cpu_ms_per_request",
            },
        ),
    ],
)
def test_bench_smoke(module, keys, tiny_models, tmp_path):
    extra = []
    if module == "bench.rollback":
        # Paired with a small feedback flood: the flood's path (the Router's feedback endpoint,
        # the controller's count and the bench's own probe around it) must work; the bench exits
        # 1 if the flood did not reach the controller.
        extra = ["--feedback-flood", "200"]
    if module == "bench.throughput":
        # A tiny BERT through --model-config (also checks that option): only the run's shape is
        # checked here; MiniLM is served in test_deploy and measured by the full run.
        extra = ["--model-config", str(write_model_config(tmp_path, "v1", tiny_models["a"]))]
    result = subprocess.run(
        [sys.executable, "-m", module, "--smoke", "--json", *extra],
        cwd=project_root(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert keys <= set(report), report
    if module == "bench.rollback":
        assert report["trials"] == 3 and report["client_errors"] == 0, report
        flood = report["feedback_flood"]
        assert flood["trials"] == 3 and flood["achieved_items_per_s"] > 0, flood
    elif module == "bench.throughput":
        assert report["failed_requests"] == 0, report
        assert [p["concurrency"] for p in report["scale"]] == [1, 16, 64], report
        arms = {"routed/haproxy", "routed/proxy", "plain/haproxy", "plain/proxy"}
        assert set(report["arms"]["noop"]) == set(report["arms"]["model"]) == arms, report["arms"]
        # Traffic through HAProxy bypassed Serve's Python proxy: it worked less per request
        # there than in the arm that goes through it.
        cpu = report["cpu_ms_per_request"]["noop"]
        assert cpu["routed/haproxy"]["proxy"] < cpu["routed/proxy"]["proxy"], cpu
        assert cpu["routed/proxy"]["proxy"] > 0 and cpu["routed/haproxy"]["router"] > 0, cpu
        assert set(report["peak_rss_mb"]) == {"router", "model"}, report
        assert report["cache"]["hit_rate"] > 0, report  # a Zipf stream repeats itself
        assert (
            report["settings"]["model_config"] == extra[1]
            and report["settings"]["offline_device"] == "cpu"
        ), report
    else:
        assert len(report["patches"]) == 9 and report["failed_requests"] == 0, report
        assert report["replicas_restarted_elsewhere"] == 0, report


def test_chaos_bench_smoke():
    """`bench.chaos` at smoke size (30 s of kills, a Router first, tiny models): a canary under
    load while replicas die. Which phase it ends in (succeeded, rolled back, or paused as an
    inconclusive analysis) depends on where the kills land (docs/benchmarks.md), so only that
    it ended is checked; no request may fail except those in flight on a killed Router or sent
    to it within 0.25 s of its death, before the ingress took it out (bench/chaos.py, rules 2
    and 4)."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--smoke", "--json"],
        cwd=project_root(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    keys = {"requests", "failed", "failed_outside_killed_router", "failed_sent_to_dead_router",
            "kills", "final_phase"}  # fmt: skip
    assert keys <= set(report), report
    assert report["requests"] > 0 and report["kills"]["router"] >= 1, report
    assert report["final_phase"] in ("succeeded", "rolled_back", "paused"), report
    assert report["failed_outside_killed_router"] == 0, report["outside_failures"]
