"""`rollout status | start | promote | pause | resume | abort | history` against a fake router.

A stdlib http.server on 127.0.0.1:0, in a thread, plays the router's admin API: it records each
request (method, path, Authorization), answers 404 when it has no token (admin API off), 401 for
a wrong bearer token, and otherwise the scripted answers. No other network is used."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from app.ops.cli import commands as cli
from app.ops.cli import main, render_history, render_status
from app.ops.cli.render import redraw

TOKEN = "test-admin-token-0123456789abcdef"
UNAUTHORIZED = (
    "error: unauthorized: set ROLLOUT_ADMIN_TOKEN (or ROLLOUT_ADMIN_TOKEN_FILE) to the router's "
    "admin token"
)
ADMIN_OFF = "error: the admin API is off: the router has no admin token configured"


def make_status(phase: str = "progressing", **changes: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "model": "recommender",
        "phase": phase,
        "strategy": "canary",
        "candidate": "v2",
        "stable": "v1",
        "step_index": 2,
        "steps_total": 8,
        "step": "analysis 60s",
        "weights": {"v1": 75.0, "v2": 25.0},
        "time_in_step_s": 42.0,
        "generation": 7,
        "verdicts": [
            {
                "gate": "min_requests",
                "status": "passed",
                "value": 130.0,
                "threshold": 100.0,
                "reason": "130 of 100 candidate requests in this step",
            },
            {
                "gate": "max_error_rate",
                "status": "failed",
                "value": 0.2,
                "threshold": 0.05,
                "reason": "candidate error rate 0.2000 (26/130) > 0.05",
            },
            {
                "gate": "max_p99_latency_ratio",
                "status": "pending",
                "value": None,
                "threshold": 1.5,
                "reason": "no candidate p99",
            },
            {
                "gate": "min_shadow_agreement",
                "status": "skipped",
                "value": None,
                "threshold": 0.8,
                "reason": "no shadow",
            },
        ],  # fmt: skip
        "versions": {
            "v1": {
                "requests": 390,
                "errors": 1,
                "error_rate": 0.00256,
                "rps": 13.0,
                "p50_ms": 12.5,
                "p99_ms": 48.25,
            },
            "v2": {
                "requests": 130,
                "errors": 26,
                "error_rate": 0.2,
                "rps": 4.33,
                "p50_ms": None,
                "p99_ms": None,
            },
        },  # fmt: skip
        "plan_digest": "3f2a1b9c",
        "updated_at": 1_700_000_000.0,
        "message": None,
    }
    status.update(changes)
    return status


EVENTS = [
    {"time_s": 1_700_000_000.0, "from_phase": "idle", "to_phase": "progressing",
     "step_index": 0, "weight": 0.0, "reason": "started: canary rollout of v2", "gates": {}},
    {"time_s": 1_700_000_061.0, "from_phase": "progressing", "to_phase": "rolled_back",
     "step_index": 2, "weight": 0.0,
     "reason": "rolled back: gate max_error_rate failed: candidate error rate 0.2",
     "gates": {
         "max_error_rate": {"status": "failed", "value": 0.2, "threshold": 0.05,
                            "reason": "candidate error rate 0.2000 (26/130) > 0.05"},
         "min_requests": {"status": "passed", "value": 130.0, "threshold": 100.0,
                          "reason": "130 of 100"},
     }},
]  # fmt: skip


# ----------------------------------------------------------------------------- the fake router


class FakeRouter:
    """Scripted admin API. `on(method, path, (status, body), ...)`: answers in order, the last
    one repeating. `requests` holds (method, path, authorization header) per request. Past
    MAX_REQUESTS it answers 500, so a --watch that never stops fails instead of hanging."""

    MAX_REQUESTS = 20

    def __init__(self, token: str | None = TOKEN) -> None:
        self.token = token
        self.requests: list[tuple[str, str, str | None]] = []
        self.keys: list[str | None] = []  # each request's Idempotency-Key
        self.script: dict[tuple[str, str], list[tuple[int, Any]]] = {}
        self.release = threading.Event()  # a `hang` answer waits on this
        router = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                router._answer(self)

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                router._answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.005}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def on(self, method: str, path: str, *answers: tuple[int, Any]) -> None:
        self.script[(method, path)] = list(answers)

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        auth = handler.headers.get("authorization")
        self.requests.append((handler.command, handler.path, auth))
        self.keys.append(handler.headers.get("idempotency-key"))
        if len(self.requests) > self.MAX_REQUESTS:
            status, body = 500, {"error": "too many requests: the client should have stopped"}
        elif self.token is None and handler.path.startswith("/admin"):
            status, body = 404, {"error": "the admin API is off"}
        elif auth != f"Bearer {self.token}":
            status, body = 401, {"error": "unauthorized"}
        else:
            answers = self.script.get((handler.command, handler.path))
            if not answers:
                status, body = 404, {"error": f"no route {handler.path}"}
            else:
                status, body = answers.pop(0) if len(answers) > 1 else answers[0]
        if body == "hang":
            self.release.wait(5)
            return
        if body == "drop":  # the connection closes with no answer (the Router replica died)
            handler.close_connection = True
            return
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        handler.send_response(status)
        if isinstance(body, dict) and "retry_after" in body:
            handler.send_header("retry-after", str(body["retry_after"]))
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No token, URL or proxy from the developer's shell leaks into these tests."""
    for name in (
        "ROLLOUT_URL", "ROLLOUT_ADMIN_TOKEN", "ROLLOUT_ADMIN_TOKEN_FILE",
        "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def router(monkeypatch) -> Iterator[FakeRouter]:
    fake = FakeRouter()
    monkeypatch.setenv("ROLLOUT_ADMIN_TOKEN", TOKEN)
    monkeypatch.setenv("ROLLOUT_URL", fake.url)
    yield fake
    fake.close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- status


def test_status_gets_the_admin_api_with_the_bearer_token(router, capsys):
    router.on("GET", "/admin/rollout", (200, make_status()))
    assert main(["status"]) == 0
    assert router.requests == [("GET", "/admin/rollout", f"Bearer {TOKEN}")]
    out = capsys.readouterr().out
    assert "progressing" in out
    assert "recommender" in out
    assert "3/8: analysis 60s" in out
    assert "75%" in out and "25%" in out


def test_status_json_prints_the_raw_status(router, capsys):
    router.on("GET", "/admin/rollout", (200, make_status()))
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == make_status()


def test_url_option_wins_over_the_environment(router, monkeypatch, capsys):
    monkeypatch.setenv("ROLLOUT_URL", f"http://127.0.0.1:{free_port()}")
    router.on("GET", "/admin/rollout", (200, make_status()))
    assert main(["status", "--url", router.url + "/"]) == 0  # a trailing slash is fine
    assert [r[1] for r in router.requests] == ["/admin/rollout"]


def test_token_option_wins_over_the_environment(router, monkeypatch):
    monkeypatch.setenv("ROLLOUT_ADMIN_TOKEN", "some-other-token-0123456789")
    router.on("GET", "/admin/rollout", (200, make_status()))
    assert main(["status", "--token", TOKEN]) == 0
    assert router.requests[0][2] == f"Bearer {TOKEN}"


def test_token_from_the_token_file(router, monkeypatch, tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    monkeypatch.delenv("ROLLOUT_ADMIN_TOKEN")
    monkeypatch.setenv("ROLLOUT_ADMIN_TOKEN_FILE", str(path))
    router.on("GET", "/admin/rollout", (200, make_status()))
    assert main(["status"]) == 0
    assert router.requests[0][2] == f"Bearer {TOKEN}"


def test_a_bad_token_config_is_an_error_before_any_request(router, monkeypatch, capsys):
    monkeypatch.setenv("ROLLOUT_ADMIN_TOKEN", "short")
    assert main(["status"]) == 2
    assert "ROLLOUT_ADMIN_TOKEN" in capsys.readouterr().err
    assert router.requests == []


# ----------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("argv", "path"),
    [
        (["start"], "/admin/rollout/start"),
        (["promote"], "/admin/rollout/promote"),
        (["promote", "--full"], "/admin/rollout/promote-full"),
        (["pause"], "/admin/rollout/pause"),
        (["resume"], "/admin/rollout/resume"),
        (["abort"], "/admin/rollout/abort"),
    ],
)
def test_commands_post_to_their_path(router, capsys, argv, path):
    router.on("POST", path, (200, make_status("paused")))
    assert main(argv) == 0
    assert router.requests == [("POST", path, f"Bearer {TOKEN}")]
    out = capsys.readouterr().out
    assert "paused" in out
    assert "Gates" in out  # the status after the command


def test_command_json_prints_the_status(router, capsys):
    router.on("POST", "/admin/rollout/abort", (200, make_status("aborted")))
    assert main(["abort", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["phase"] == "aborted"


def test_409_prints_the_servers_error_and_exits_1(router, capsys):
    refusal = "cannot resume: the rollout is progressing (it is not paused)"
    router.on("POST", "/admin/rollout/resume", (409, {"error": refusal}))
    assert main(["resume"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: {refusal}"
    assert captured.out == ""
    assert len(router.requests) == 1  # a refusal is not sent again


def test_wrong_token_is_unauthorized_exit_2(router, capsys):
    router.on("POST", "/admin/rollout/promote", (200, make_status()))
    assert main(["promote", "--token", "wrong-token-but-long-enough"]) == 2
    assert capsys.readouterr().err.strip() == UNAUTHORIZED


def test_no_token_sends_no_header_and_is_unauthorized(router, monkeypatch, capsys):
    monkeypatch.delenv("ROLLOUT_ADMIN_TOKEN")
    router.on("GET", "/admin/rollout", (200, make_status()))
    assert main(["status"]) == 2
    assert router.requests == [("GET", "/admin/rollout", None)]
    assert capsys.readouterr().err.strip() == UNAUTHORIZED


def test_404_means_the_admin_api_is_off(router, capsys):
    router.token = None
    assert main(["pause"]) == 2
    assert capsys.readouterr().err.strip() == ADMIN_OFF


def test_connection_refused_names_the_url(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "--url", url, "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert url in err
    assert "ROLLOUT_URL" in err


def test_timeout_exits_2(router, capsys):
    router.on("GET", "/admin/rollout", (200, "hang"))
    assert main(["status", "--timeout", "0.2"]) == 2
    assert "no answer within 0.2s" in capsys.readouterr().err
    assert len(router.requests) == 1  # nor a timeout (the server may still be at it)


def test_server_error_exits_2_with_its_detail(router, capsys):
    router.on("GET", "/admin/rollout", (500, {"error": "controller unavailable"}))
    assert main(["status"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "controller unavailable" in err
    assert len(router.requests) == 1  # the app's own error: not sent again


def test_a_command_whose_connection_dropped_is_sent_again_with_the_same_key(router, capsys):
    # Its Router replica died under it (HAProxy re-sends some of those itself, not all): the
    # CLI sends it again with the same Idempotency-Key, which the controller applies once.
    router.on("POST", "/admin/rollout/promote", (200, "drop"), (200, make_status()))
    assert main(["promote"]) == 0
    assert [r[1] for r in router.requests] == ["/admin/rollout/promote"] * 2
    assert router.keys[0] and router.keys[0] == router.keys[1]
    err = capsys.readouterr().err
    assert "the connection dropped before an answer" in err
    assert "sending it again with the same Idempotency-Key" in err
    router.on("POST", "/admin/rollout/promote", (200, make_status()))
    assert main(["promote"]) == 0
    assert router.keys[2] not in (None, router.keys[0])  # a new command, a new key


def test_a_503_and_the_ingress_own_500_are_sent_again_until_retry_for_runs_out(router, capsys):
    unavailable = {"error": "promote is not stored yet", "retry_after": 0}
    router.on("POST", "/admin/rollout/promote", (503, unavailable),
              (500, "Internal Server Error"), (200, make_status()))  # fmt: skip
    assert main(["promote"]) == 0
    assert len(router.requests) == 3 and len(set(router.keys)) == 1
    err = capsys.readouterr().err
    # The Retry-After of 0 set the pause (at its 0.1 s floor); the 500 got the first pause.
    assert "HTTP 503: promote is not stored yet; sending it again with the same " in err
    assert "Idempotency-Key in 0.1s" in err and "HTTP 500 from the ingress" in err

    router.requests.clear()
    router.on("GET", "/admin/rollout", (503, {"error": "the controller is restarting"}))
    assert main(["status", "--retry-for", "0.3"]) == 2
    assert 2 <= len(router.requests) <= 3  # after 0.25 s, then the next pause would pass 0.3 s
    err = capsys.readouterr().err
    assert err.strip().endswith("HTTP 503: the controller is restarting")

    router.requests.clear()
    assert main(["status", "--retry-for", "0"]) == 2
    assert len(router.requests) == 1


def test_an_answer_that_is_not_json_exits_2(router, capsys):
    router.on("GET", "/admin/rollout", (200, "<html>hello</html>"))
    assert main(["status"]) == 2
    assert "not JSON" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon"])
def test_interval_and_timeout_must_be_positive(value):
    with pytest.raises(SystemExit) as info:
        main(["status", "--watch", "--interval", value])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["status", "--timeout", value])


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "soon"])
def test_retry_for_must_be_zero_or_positive(value, capsys):
    with pytest.raises(SystemExit) as info:
        main(["status", "--retry-for", value])
    assert info.value.code == 2 and "--retry-for" in capsys.readouterr().err


# ----------------------------------------------------------------------------- history


def test_history_gets_its_path_and_renders_events(router, capsys):
    router.on("GET", "/admin/rollout/history", (200, {"events": EVENTS}))
    assert main(["history"]) == 0
    assert router.requests == [("GET", "/admin/rollout/history", f"Bearer {TOKEN}")]
    out = capsys.readouterr().out
    assert "started: canary rollout of v2" in out
    assert "rolled_back" in out
    assert "✖ max_error_rate" in out
    assert "✖ min_requests" not in out  # only failed gates are listed under an event


def test_history_json(router, capsys):
    router.on("GET", "/admin/rollout/history", (200, {"events": EVENTS}))
    assert main(["history", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"events": EVENTS}


def test_history_without_events_list_exits_2(router, capsys):
    router.on("GET", "/admin/rollout/history", (200, {"history": []}))
    assert main(["history"]) == 2
    assert "events" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --watch


def test_watch_stops_after_printing_a_terminal_phase(router, capsys):
    router.on(
        "GET", "/admin/rollout",
        (200, make_status("progressing")), (200, make_status("succeeded", message="done")),
    )  # fmt: skip
    assert main(["status", "--watch", "--interval", "0.01"]) == 0
    assert [r[1] for r in router.requests] == ["/admin/rollout", "/admin/rollout"]
    out = capsys.readouterr().out
    assert out.index("progressing") < out.index("succeeded")
    assert "-" * 72 in out  # not a tty: frames separated by a line, no screen clearing
    assert "\x1b[" not in out


@pytest.mark.parametrize("phase", ["rolled_back", "aborted"])
def test_watch_exits_1_when_the_rollout_ends_without_success(router, capsys, phase):
    router.on("GET", "/admin/rollout", (200, make_status("progressing")), (200, make_status(phase)))
    assert main(["status", "--watch", "--interval", "0.01"]) == 1
    assert len(router.requests) == 2
    assert phase in capsys.readouterr().out


def test_watch_redraws_in_place_on_a_tty_without_clearing_the_screen(router, monkeypatch, capsys):
    """No full clear (a blank screen each frame is the flicker): each frame moves the cursor
    home, ends every line with erase-to-end-of-line and itself with erase-to-end-of-screen."""
    monkeypatch.setattr(cli, "_stdout_is_tty", lambda: True)
    router.on(
        "GET", "/admin/rollout", (200, make_status("progressing")), (200, make_status("succeeded"))
    )
    assert main(["status", "--watch", "--interval", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[2J" not in out  # never the whole screen
    frames = out.split("\x1b[H")
    assert frames[0] == "" and len(frames) == 3  # each frame starts at the cursor home
    for frame, phase in zip(frames[1:], ["progressing", "succeeded"]):
        assert phase in frame
        body, tail = frame.rsplit("\x1b[J", 1)
        assert tail == "\n"  # the frame ends by erasing whatever the last one left below it
        lines = body.split("\n")
        assert len(lines) > 3 and all(line.endswith("\x1b[K") for line in lines)


def test_redraw_bytes():
    assert redraw("a\nbb") == "\x1b[Ha\x1b[K\nbb\x1b[K\x1b[J"


def test_watch_json_prints_one_object_per_line(router, capsys):
    router.on(
        "GET", "/admin/rollout", (200, make_status("paused")), (200, make_status("succeeded"))
    )
    assert main(["status", "--watch", "--json", "--interval", "0.01"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["phase"] for line in lines] == ["paused", "succeeded"]


def test_watch_ctrl_c_exits_0(router, monkeypatch, capsys):
    router.on("GET", "/admin/rollout", (200, make_status("progressing")))

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", interrupted)
    assert main(["status", "--watch"]) == 0
    assert len(router.requests) == 1
    assert "progressing" in capsys.readouterr().out


def test_watch_stops_on_an_error(router, capsys):
    router.on("GET", "/admin/rollout", (200, make_status("progressing")), (401, {}))
    router.token = TOKEN
    assert main(["status", "--watch", "--interval", "0.01", "--token", "x" * 20]) == 2


def test_watch_once_terminal_prints_once(router, capsys):
    router.on("GET", "/admin/rollout", (200, make_status("succeeded")))
    assert main(["status", "--watch", "--interval", "0.01"]) == 0
    assert len(router.requests) == 1


# ----------------------------------------------------------------------------- render_status


def test_render_status_shows_identity_phase_and_step():
    text = render_status(make_status(), now=1_700_000_003.5)
    assert "recommender" in text
    assert "progressing" in text
    assert "canary" in text
    assert "3/8: analysis 60s" in text
    assert "42s in step" in text
    assert "3f2a1b9c" in text
    assert "3.5s ago" in text


def test_render_status_has_a_weight_bar_per_version():
    lines = render_status(make_status()).splitlines()
    v1 = next(line for line in lines if line.strip().startswith("v1 (stable)"))
    v2 = next(line for line in lines if line.strip().startswith("v2 (candidate)"))
    assert v1.count("█") == 30 and v1.rstrip().endswith("75%")
    assert v2.count("█") == 10 and v2.rstrip().endswith("25%")


def test_render_status_shows_each_verdict_with_its_symbol():
    lines = render_status(make_status()).splitlines()
    expected = {
        "min_requests": "✔",
        "max_error_rate": "✖",
        "max_p99_latency_ratio": "…",
        "min_shadow_agreement": "-",
    }
    for gate, symbol in expected.items():
        line = next(line for line in lines if f" {gate} " in line)
        assert line.strip().startswith(symbol), line
    failed = next(line for line in lines if " max_error_rate " in line)
    assert "0.2 (max 0.05)" in failed
    assert "26/130" in failed
    assert "130 (min 100)" in next(line for line in lines if " min_requests " in line)


def test_render_status_version_table_handles_none_latencies():
    lines = render_status(make_status()).splitlines()
    v1 = next(line for line in lines if line.startswith("v1 "))
    v2 = next(line for line in lines if line.startswith("v2 "))
    assert "12.5ms" in v1 and "48.2ms" in v1 and "13.0" in v1 and "0.26%" in v1
    assert "20.00%" in v2 and "4.3" in v2
    assert v2.split()[-2:] == ["-", "-"]  # p50 and p99 unknown


def test_render_status_of_a_partial_status_does_not_fail():
    text = render_status({"model": "recommender", "phase": "idle"})
    assert "idle" in text
    assert "no verdicts yet" in text
    text = render_status(make_status(step_index=8, steps_total=8, time_in_step_s=None))
    assert "8/8 (all steps done)" in text
    assert "in step" not in text


def test_render_status_shows_the_message():
    assert "waiting for promote" in render_status(make_status(message="waiting for promote"))


def test_render_history_of_nothing():
    assert render_history([]) == "no events"


def test_render_history_counts_steps_from_one_and_shows_utc_times():
    lines = render_history(EVENTS).splitlines()
    assert lines[0].split()[:3] == ["TIME", "FROM", "TO"]
    assert lines[1].startswith("2023-11-14 22:13:20Z")
    assert lines[1].split()[4] == "1"  # step_index 0 is step 1
    assert lines[2].split()[4] == "3"


def test_status_shows_feedback_and_the_ab_verdict_with_its_interval():
    status = {
        "model": "recommender", "phase": "progressing",
        "verdicts": [{"gate": "improvement", "status": "passed", "value": 0.241, "threshold": 0.0,
                      "reason": "click: lift +24.1% ...", "conclusion": "better", "outcome": "click",
                      "scale": "relative", "lift": 0.241, "low": 0.083, "high": 0.41,
                      "confidence": 0.95},
                     {"gate": "non_inferiority", "status": "pending", "value": None, "threshold": -0.05,
                      "reason": "click: no feedback yet", "conclusion": "not_yet_known",
                      "outcome": "click"}],
        "outcomes": {"click": {"v1": {"kind": "binary", "n": 5102, "mean": 0.361, "low": 0.348,
                                      "high": 0.374},
                               "v2": {"kind": "binary", "n": 1, "mean": 1.0}}},
    }  # fmt: skip
    text = render_status(status)
    assert "A/B verdict" in text and "Feedback" in text
    line = next(
        x for x in text.splitlines() if x.strip().startswith("improvement") and "BETTER" in x
    )
    assert "lift +24.1%" in line and "[+8.3%, +41.0%] (95% always-valid)" in line
    assert any("NOT YET KNOWN" in x for x in text.splitlines())
    v1 = next(x for x in text.splitlines() if x.strip().startswith("click") and " v1 " in x)
    assert "5102" in v1 and "[0.348, 0.374]" in v1


def test_bench_runs_a_benchmark_module_with_its_arguments(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main(["bench", "abtest", "--smoke", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("aa_false_promotion_rate", "lift_detection_rate", "drop_stop_rate",
                "median_samples_to_decision"):  # fmt: skip
        assert key in result
    with pytest.raises(SystemExit):
        main(["bench", "no-such-bench"])


def test_rollout_alertmanager_renders_the_shipped_template_with_urls_from_files(tmp_path, capsys):
    """`rollout alertmanager` is `python -m app.ops.alertmanager`, options and exit codes."""
    from pathlib import Path

    import yaml

    template = Path(__file__).parents[2] / "configs" / "prometheus" / "alertmanager.yml"
    (tmp_path / "page").write_text("https://hooks.example.test/page?token=s3cret\n")
    (tmp_path / "warn").write_text("https://hooks.example.test/warn\n")
    out = tmp_path / "alertmanager.yml"
    argv = ["alertmanager", "--template", str(template), "--url-file", f"page={tmp_path / 'page'}"]
    assert main([*argv, "--output", str(out)]) == 2  # the warn receiver has no URL
    assert "warn" in capsys.readouterr().err and not out.exists()
    assert main([*argv, "--url-file", f"warn={tmp_path / 'warn'}", "--output", str(out)]) == 0
    urls = [h["url"] for r in yaml.safe_load(out.read_text())["receivers"]
            for h in r["webhook_configs"]]  # fmt: skip
    assert urls == [
        "https://hooks.example.test/page?token=s3cret",
        "https://hooks.example.test/warn",
    ]
    assert "s3cret" not in capsys.readouterr().out
