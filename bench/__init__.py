"""Benchmarks. Run from the checkout: `.venv/bin/python -m bench.throughput` (or `rollout bench NAME`)."""
