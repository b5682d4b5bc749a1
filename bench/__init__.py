"""Benchmarks. Run from the checkout: `.venv/bin/python -m bench.router_overhead`."""
