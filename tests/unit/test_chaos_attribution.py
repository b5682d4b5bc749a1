"""bench/chaos.py's attribution of failed requests to Router kills (its module docstring's
rules), on hand-made records: no Ray."""

from __future__ import annotations

from bench.chaos import DEAD_ROUTER_WINDOW_S, Kill, Sent, attribute

DISCONNECT = "RemoteProtocolError: Server disconnected without sending a response."


def kill(t_kill: float = 10.0) -> Kill:
    return Kill(kind="router", deployment="Router", replica_id="abc123", actor_id=None,
                actor_name="SERVE_REPLICA::recommender#Router#abc123", t_kill=t_kill,
                t_dead=t_kill + 0.01)  # fmt: skip


def failed(request_id: str, start: float, end: float, router_error: bool = False) -> Sent:
    return Sent(request_id, start, end, status=None, error=DISCONNECT, router_error=router_error)


def test_in_flight_and_sent_just_after_the_death_are_the_kills_and_the_rest_is_outside():
    k = kill()
    records = [
        failed("in-flight", 9.9, 10.02),  # rule 2: in flight when it died
        failed("just-after", 10.05, 10.06),  # rule 4: sent before the ingress took it out
        failed("later", 10.01 + DEAD_ROUTER_WINDOW_S + 0.5, 12.0),  # too late: outside
        failed("before", 5.0, 5.1),  # nowhere near a kill: outside
        Sent("ok", 10.05, 10.06, status=200),
    ]
    outside = attribute(records, [k], {}, t0=0.0)
    assert k.attributed == ["in-flight"] and k.sent_after_death == ["just-after"]
    assert sorted(o["request_id"] for o in outside) == ["before", "later"]
    assert k.summary(0.0, records)["failed_sent_after_death"] == 1


def test_a_live_routers_error_is_never_the_kills():
    k = kill()
    records = [Sent("json", 10.05, 10.06, status=503, error='{"error": "x"}', router_error=True)]
    outside = attribute(records, [k], {}, t0=0.0)
    assert [o["request_id"] for o in outside] == ["json"] and not k.sent_after_death


def test_a_proxy_log_naming_another_actor_vetoes_rule_4():
    k = kill()
    records = [failed("other", 10.05, 10.06)]
    logs = {
        "other": "Request failed: The actor died ... name: SERVE_REPLICA::recommender#Router#zzz"
    }
    outside = attribute(records, [k], logs, t0=0.0)
    assert [o["request_id"] for o in outside] == ["other"] and not k.sent_after_death
