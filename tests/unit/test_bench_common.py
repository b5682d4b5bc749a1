"""bench/common.py's shared pieces: the parser every bench starts from and the background
threads its loads and pollers run on."""

from __future__ import annotations

import threading

from bench.common import Background, bench_parser


def test_bench_parser_names_the_module_and_takes_json():
    parser = bench_parser("bench.demo", "First line.\n\nMore.", json_help="JSON only")
    assert parser.prog == "python -m bench.demo" and parser.description == "First line."
    assert parser.parse_args(["--json"]).json is True
    assert parser.parse_args([]).json is False


def test_background_runs_each_thread_until_the_block_ends():
    class Counter(Background):
        def __init__(self) -> None:
            super().__init__(3)
            self.seen: set[int] = set()
            self.running = threading.Barrier(4)

        def _run(self, index: int) -> None:
            with self.lock:
                self.seen.add(index)
            self.running.wait(timeout=10)  # all three started inside the block
            self.stop.wait()

    with Counter() as counter:
        counter.running.wait(timeout=10)
        assert all(t.is_alive() for t in counter.threads)
    assert counter.stop.is_set() and counter.seen == {0, 1, 2}
    assert not any(t.is_alive() for t in counter.threads)


def test_machine_names_the_os_cpus_and_python():
    import platform

    from bench.common import cpu_count, machine

    assert machine() == (f"{platform.system()} {platform.release()} {platform.machine()}, "
                         f"{cpu_count()} CPUs, python {platform.python_version()}")  # fmt: skip
