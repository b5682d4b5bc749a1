"""Helpers shared by the test suites and the benches: waiting, tiny models, load, fakes."""
