"""Traffic capture (app/serving/capture.py): settings, sampling, the rate and size caps, field
dropping and hashing, rotation, the bounded queue, the reader, and the importer's line checks."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from app.errors import ConfigError
from app.ops.cli.capture import ImportRejected, read_import
from app.serving.capture import (
    SALT_ENV,
    Capturer,
    CaptureRecord,
    CaptureSettings,
    RecordError,
    SampleStats,
    iter_sample,
    parse_line,
    parse_record,
    redact_request,
)

MODEL = "recommender"
SALT = b"s" * 16
NOW = 1_765_000_000.0


class ScriptedRng:
    """random.Random's `random()` with the values a test chooses (then 0.0: always sampled)."""

    def __init__(self, values: list[float] | None = None) -> None:
        self.values = list(values or [])

    def random(self) -> float:
        return self.values.pop(0) if self.values else 0.0


def body(text: str = "hello", **parameters: Any) -> bytes:
    document: dict[str, Any] = {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]
    }
    if parameters:
        document["parameters"] = parameters
    return json.dumps(document).encode()


def capturer(tmp_path: Path, rng: ScriptedRng | None = None, **overrides: Any) -> Capturer:
    fields: dict[str, Any] = {
        "enabled": True,
        "directory": str(tmp_path / "capture"),
        "sample_rate": 1.0,
        "max_records_per_s": 1000.0,
    }
    fields.update(overrides)
    return Capturer(
        CaptureSettings(**fields),
        identity_parameters=("user_id",),
        salt=SALT,
        rng=rng or ScriptedRng(),  # type: ignore[arg-type]
    )


def records(tmp_path: Path, stats: SampleStats | None = None) -> list[CaptureRecord]:
    return list(iter_sample(tmp_path / "capture", MODEL, stats=stats))


def files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "capture" / MODEL).glob("*.jsonl"))


# ----------------------------------------------------------------------------- settings


def test_capture_is_off_by_default_and_an_off_capturer_takes_nothing(tmp_path):
    assert CaptureSettings().enabled is False
    c = Capturer(CaptureSettings(directory=str(tmp_path / "capture")))
    assert c.offer(MODEL, "v1", body(), NOW) is False
    c.close()
    assert c.counters()["offered"] == 0
    assert not (tmp_path / "capture").exists()


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"enabled": True}, "directory"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"max_records_per_s": 0}, "max_records_per_s"),
        ({"max_record_bytes": 10}, "max_record_bytes"),
        ({"max_record_bytes": 8192, "max_file_bytes": 4096}, "max_record_bytes (8192)"),
        ({"max_files": 0}, "max_files"),
        ({"drop_fields": ["a"], "hash_fields": ["a", "b"]}, "both name ['a']"),
        ({"hash_fields": ["a", "a"]}, "hash_fields"),
        ({"drop_fields": [""]}, "drop_fields"),
        ({"sample_rat": 0.5}, "sample_rat"),
    ],
)
def test_bad_settings_name_the_field(fields, named):
    with pytest.raises(ValidationError) as info:
        CaptureSettings(**fields)
    assert named in str(info.value)


def test_hash_fields_without_a_salt_refuse_to_start(tmp_path):
    settings_ = CaptureSettings(enabled=True, directory=str(tmp_path), hash_fields=("email",))
    with pytest.raises(ConfigError, match=SALT_ENV):
        Capturer(settings_, env={})
    assert Capturer(settings_, env={SALT_ENV: "x" * 16}).enabled
    with pytest.raises(ConfigError, match="16"):  # the token files' rules: short is guessable
        Capturer(settings_, env={SALT_ENV: "short"})


# ----------------------------------------------------------------------------- what is stored


def test_a_record_is_the_request_body_with_model_version_and_time_and_no_client_identity(
    tmp_path,
):
    c = capturer(tmp_path)
    document = json.loads(body("hi", user_id="alice", top_k=3))
    document.update(id="trace-42", model_name=MODEL, model_version="v1")
    assert c.offer(MODEL, "v2", json.dumps(document).encode(), NOW + 0.25)
    c.close()
    (record,) = records(tmp_path)
    assert (record.model, record.version, record.captured_at) == (MODEL, "v2", NOW + 0.25)
    assert record.request == {
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}],
        "parameters": {"top_k": 3},
    }
    assert c.counters()["captured"] == 1


def test_a_binary_extension_body_is_stored_as_json_data(tmp_path):
    c = capturer(tmp_path)
    head = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}
    ).encode()  # fmt: skip
    assert c.offer(MODEL, "v1", head + struct.pack("<2f", 1.5, -2.0), NOW,
                   header_length=str(len(head)))  # fmt: skip
    c.close()
    (record,) = records(tmp_path)
    assert record.request["inputs"] == [
        {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.5, -2.0]}
    ]


def test_a_decoded_document_is_accepted_too(tmp_path):
    c = capturer(tmp_path)
    assert c.offer(MODEL, "v1", json.loads(body("doc")), NOW)
    c.close()
    assert [r.request["inputs"][0]["data"] for r in records(tmp_path)] == [["doc"]]


# ----------------------------------------------------------------------------- the caps


def test_sampling_keeps_the_share_the_coin_allows(tmp_path):
    rng = ScriptedRng([0.1, 0.3, 0.29, 0.9, 0.0])
    c = capturer(tmp_path, rng, sample_rate=0.3)
    taken = [c.offer(MODEL, "v1", body(str(i)), NOW) for i in range(5)]
    c.close()
    assert taken == [True, False, True, False, True]
    assert [r.request["inputs"][0]["data"][0] for r in records(tmp_path)] == ["0", "2", "4"]
    assert c.counters()["skipped_sample"] == 2


def test_sample_rate_zero_captures_nothing(tmp_path):
    c = capturer(tmp_path, ScriptedRng([0.0] * 10), sample_rate=0.0)
    assert not any(c.offer(MODEL, "v1", body(), NOW) for _ in range(10))
    c.close()
    assert c.counters()["skipped_sample"] == 10 and not files(tmp_path)


def test_the_token_bucket_caps_records_per_second(tmp_path):
    c = capturer(tmp_path, max_records_per_s=2.0)
    at_once = [c.offer(MODEL, "v1", body(), NOW) for _ in range(5)]
    assert at_once == [True, True, False, False, False]
    assert c.offer(MODEL, "v1", body(), NOW + 0.5)  # half a second refills one token
    assert not c.offer(MODEL, "v1", body(), NOW + 0.5)
    assert not c.offer(MODEL, "v1", body(), NOW - 100)  # a clock stepped back refills nothing
    c.close()
    counters = c.counters()
    assert (counters["captured"], counters["skipped_rate"]) == (3, 5)


def test_a_body_over_max_record_bytes_is_skipped_and_counted(tmp_path):
    c = capturer(tmp_path, max_record_bytes=512)
    assert not c.offer(MODEL, "v1", body("x" * 600), NOW)
    assert c.offer(MODEL, "v1", body("small"), NOW)
    c.close()
    assert c.counters()["skipped_size"] == 1 and len(records(tmp_path)) == 1


def test_a_record_that_grows_past_the_cap_when_encoded_is_skipped_too(tmp_path):
    # 100 float32 thirds: 400 bytes of binary, but about 2,000 bytes as JSON data
    c = capturer(tmp_path, max_record_bytes=600)
    head = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [100], "parameters": {"binary_data_size": 400}}]}
    ).encode()  # fmt: skip
    whole = head + struct.pack("<100f", *[1 / 3] * 100)
    assert len(whole) <= 600
    assert c.offer(MODEL, "v1", whole, NOW, header_length=str(len(head)))
    c.close()
    assert c.counters()["skipped_size"] == 1 and c.counters()["captured"] == 0


def test_a_full_queue_drops_and_counts_and_close_writes_what_was_queued(tmp_path, monkeypatch):
    c = capturer(tmp_path, max_queue_records=2)
    monkeypatch.setattr(c, "_ensure_writer", lambda: None)  # the writer has not run yet
    taken = [c.offer(MODEL, "v1", body(str(i)), NOW) for i in range(4)]
    assert taken == [True, True, False, False]
    monkeypatch.undo()
    c.close()
    assert c.counters()["dropped_queue"] == 2
    assert [r.request["inputs"][0]["data"][0] for r in records(tmp_path)] == ["0", "1"]


# ----------------------------------------------------------------------------- never raises


def test_an_unwritable_directory_costs_records_not_requests(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the capture directory should be")
    c = capturer(tmp_path, directory=str(blocker))
    assert c.offer(MODEL, "v1", body(), NOW)
    c.close()
    counters = c.counters()
    assert (counters["captured"], counters["write_errors"]) == (0, 1)
    assert "recommender" in (counters["last_error"] or "")


def test_offer_never_raises_into_the_caller(tmp_path):
    class Broken:
        def random(self) -> float:
            raise RuntimeError("broken rng")

    c = capturer(tmp_path)
    c._rng = Broken()  # type: ignore[assignment]
    assert c.offer(MODEL, "v1", body(), NOW) is False
    assert c.counters()["write_errors"] == 1
    c = capturer(tmp_path)
    assert c.offer(MODEL, "v1", b"{not json", NOW)  # decoded on the writer: skipped there
    assert c.offer(MODEL, "v1", None, NOW)  # type: ignore[arg-type]
    assert c.offer("../escape", "v1", body(), NOW)
    c.close()
    counters = c.counters()
    assert (counters["skipped_invalid"], counters["write_errors"]) == (2, 1)
    assert not (tmp_path / "escape").exists()


# ----------------------------------------------------------------------------- rotation


def test_rotation_bounds_the_files_and_bytes_on_disk_and_keeps_the_newest(tmp_path):
    c = capturer(tmp_path, max_file_bytes=4096, max_record_bytes=512, max_files=3,
                 max_queue_records=1000)  # fmt: skip
    for i in range(200):  # about 190 bytes each: ~40 KB in all, ten times the bound
        assert c.offer(MODEL, "v1", body(f"record-{i:04d}" + "x" * 50), NOW + i)
    c.close()
    kept = files(tmp_path)
    assert len(kept) == 3
    assert all(p.stat().st_size <= 4096 for p in kept)
    texts = [r.request["inputs"][0]["data"][0][:11] for r in records(tmp_path)]
    assert texts[-1] == "record-0199" and "record-0000" not in texts
    assert c.counters()["captured"] == 200


def test_rotation_prunes_stale_files_of_other_writers(tmp_path):
    folder = tmp_path / "capture" / MODEL
    folder.mkdir(parents=True)
    for i in range(5):  # left by replicas that are gone
        (folder / f"old-host-{i}-0.jsonl").write_text("")
    c = capturer(tmp_path, max_files=2)
    assert c.offer(MODEL, "v1", body(), NOW)
    c.close()
    names = [p.name for p in files(tmp_path)]
    assert len(names) == 2 and sum(not n.startswith("old-host") for n in names) == 1


def test_a_deleted_open_file_is_noticed_on_the_next_batch(tmp_path):
    c = capturer(tmp_path)
    c._write_batch([_offer("before")])
    (first,) = files(tmp_path)
    first.unlink()
    c._write_batch([_offer("after")])
    c._close_files()
    assert [r.request["inputs"][0]["data"] for r in records(tmp_path)] == [["after"]]


def _offer(text: str) -> Any:
    from app.serving.capture import _Offer

    return _Offer(MODEL, "v1", NOW, body(text), None)


# ----------------------------------------------------------------------------- the reader


def test_a_torn_last_line_and_garbage_are_skipped_and_counted(tmp_path):
    c = capturer(tmp_path)
    for text in ("a", "b"):
        c.offer(MODEL, "v1", body(text), NOW)
    c.close()
    (path,) = files(tmp_path)
    whole = path.read_bytes()
    lines = whole.splitlines(keepends=True)
    path.write_bytes(lines[0] + b"\x00garbage\n" + whole + lines[1][: len(lines[1]) // 2])
    stats = SampleStats()
    texts = [r.request["inputs"][0]["data"][0] for r in records(tmp_path, stats)]
    assert texts == ["a", "a", "b"]
    assert stats.corrupt == 2 and stats.records == 3
    assert "line 2" in (stats.first_error or "")


def test_the_reader_honours_limit_and_skips_other_models_records(tmp_path):
    c = capturer(tmp_path)
    for i in range(5):
        c.offer(MODEL, "v1", body(str(i)), NOW)
    c.close()
    (path,) = files(tmp_path)
    stranger = CaptureRecord("other", "v1", NOW, json.loads(body()))
    path.write_bytes(stranger.to_line() + path.read_bytes())
    stats = SampleStats()
    got = list(iter_sample(tmp_path / "capture", MODEL, limit=2, stats=stats))
    assert [r.request["inputs"][0]["data"][0] for r in got] == ["0", "1"]
    assert stats.corrupt == 1
    assert list(iter_sample(tmp_path / "nowhere", MODEL)) == []


# ----------------------------------------------------------------------------- properties

_names = st.sampled_from(["text", "email", "user_id", "age", "top_k", "q"])
_scalars = st.one_of(
    st.text(max_size=8), st.integers(-(2**40), 2**40), st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)  # fmt: skip
_tensors = st.builds(
    lambda name, data, bytes_: {
        "name": name, "datatype": "BYTES" if bytes_ else "INT64", "shape": [len(data)],
        "data": [str(d) for d in data] if bytes_ else data,
    },
    _names, st.lists(st.integers(-100, 100), min_size=1, max_size=4), st.booleans(),
)  # fmt: skip


def _digest(value: Any, salt: bytes) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hmac.new(salt, canonical.encode(), hashlib.sha256).hexdigest()


@settings(max_examples=200, deadline=None)
@given(
    inputs=st.lists(_tensors, max_size=4),
    parameters=st.dictionaries(_names, _scalars, max_size=4),
    drop=st.sets(_names, max_size=3),
    hashed=st.sets(_names, max_size=3),
    salt=st.binary(min_size=16, max_size=20),
)
def test_dropped_fields_vanish_and_hashed_ones_are_keyed_digests(
    inputs, parameters, drop, hashed, salt
):
    hashed -= drop
    document = {"id": "x", "inputs": inputs, "parameters": parameters}
    before = json.dumps(document, sort_keys=True)
    out = redact_request(document, drop=drop, hash_=hashed, salt=salt, identity={"user_id"})
    assert json.dumps(document, sort_keys=True) == before  # the input is not modified
    assert "id" not in out
    kept = [t for t in inputs if t["name"] not in drop
            and not (t["name"] in hashed and t["datatype"] != "BYTES")]  # fmt: skip
    assert [t["name"] for t in out["inputs"]] == [t["name"] for t in kept]
    for got, want in zip(out["inputs"], kept):
        if want["name"] in hashed:
            assert got["data"] == [_digest(v, salt) for v in want["data"]]
            assert (got["shape"], got["datatype"]) == (want["shape"], "BYTES")
        else:
            assert got == want
    expected = {
        k: (_digest(v, salt) if k in hashed else v)
        for k, v in parameters.items()
        if k not in drop and k != "user_id"
    }
    assert out.get("parameters", {}) == expected
    other_salt = redact_request(document, hash_=hashed, salt=salt + b"!", identity={"user_id"})
    if any(k in hashed for k in parameters if k not in drop and k != "user_id"):
        assert other_salt.get("parameters") != out.get("parameters")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)  # fmt: skip
_record_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([MODEL, "other", "", 3]),
        "version": st.sampled_from(["v1", "V1", None]),
        "captured_at": st.one_of(st.floats(), st.integers(), st.just(10**400)),
        "request": st.one_of(_json_values, st.fixed_dictionaries({"inputs": st.lists(_tensors | _json_values, max_size=2)})),
    },
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    line=st.one_of(
        st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),  # one line
        _json_values.map(lambda v: json.dumps(v).encode()),
        _record_like.map(lambda v: json.dumps(v).encode()),
    )
)
def test_the_importer_accepts_or_rejects_any_line_and_never_crashes(line):
    source = io.BytesIO(line + b"\n")
    try:
        got = list(read_import(source, model=MODEL, version="v1", now=NOW, name="f"))
    except ImportRejected as exc:
        assert str(exc).startswith("f line 1: ")
        return
    for record in got:  # what it accepts reads back as the same record
        assert parse_record(parse_line(record.to_line())) == record
        assert record.model == MODEL


def test_the_importer_names_the_line_and_the_field():
    good = CaptureRecord(MODEL, "v1", NOW, json.loads(body())).to_line()
    bad = json.loads(good)
    bad["captured_at"] = "yesterday"
    source = io.BytesIO(good + b"\n" + json.dumps(bad).encode() + b"\n")
    with pytest.raises(ImportRejected, match=r"^f line 3: captured_at must be"):
        list(read_import(source, model=MODEL, version=None, now=NOW, name="f"))


def test_parse_record_rejects_what_a_replayer_could_not_send():
    request = json.loads(body())
    ok = {"model": MODEL, "version": "v1", "captured_at": NOW, "request": request}
    assert parse_record(ok).request == request
    cases = {
        "unknown field(s) ['user']": {**ok, "user": "alice"},
        "missing field(s) ['request']": {k: v for k, v in ok.items() if k != "request"},
        "version must be": {**ok, "version": "V 1"},
        "request: inputs must be a non-empty list": {**ok, "request": {"inputs": []}},
        "datatype must be one of": {
            **ok, "request": {"inputs": [{**request["inputs"][0], "datatype": "STRING"}]},
        },
        "request: input 'text' has 1 elements but shape [2] needs 2": {
            **ok, "request": {"inputs": [{**request["inputs"][0], "shape": [2]}]},
        },
    }  # fmt: skip
    for message, obj in cases.items():
        with pytest.raises(RecordError) as info:
            parse_record(obj)
        assert message in str(info.value), (message, str(info.value))
