"""`rollout capture export | import | stats` through the real entry point (app.ops.cli.main)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.ops.cli import main
from app.serving.capture import Capturer, CaptureRecord, CaptureSettings, iter_sample

MODEL = "recommender"
NOW = 1_765_000_000.0


class Always:
    def random(self) -> float:
        return 0.0


def request(text: str) -> dict[str, Any]:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}


def capture(directory: Path, texts: list[str], version: str = "v1") -> None:
    c = Capturer(
        CaptureSettings(enabled=True, directory=str(directory), sample_rate=1.0,
                        max_records_per_s=1000.0),
        rng=Always(),  # type: ignore[arg-type]
    )  # fmt: skip
    for i, text in enumerate(texts):
        assert c.offer(MODEL, version, json.dumps(request(text)).encode(), NOW + i)
    c.close()


def dump(directory: Path) -> list[dict[str, Any]]:
    return [r.to_json() for r in iter_sample(directory, MODEL)]


def test_export_then_import_round_trips_the_sample(tmp_path, capsys):
    source, target, out = tmp_path / "a", tmp_path / "b", tmp_path / "sample.jsonl"
    capture(source, ["one", "two", "three"])
    capture(source, ["four"], version="v2")
    assert (
        main(["capture", "export", "--dir", str(source), "--model", MODEL, "--out", str(out)]) == 0
    )
    assert "4 records of recommender" in capsys.readouterr().err
    assert len(out.read_bytes().splitlines()) == 4
    assert main(["capture", "import", "--dir", str(target), "--model", MODEL, str(out)]) == 0
    assert "imported 4 records" in capsys.readouterr().err
    assert dump(target) == dump(source)
    assert [r["version"] for r in dump(target)] == ["v1", "v1", "v1", "v2"]


def test_export_to_stdout_with_a_limit(tmp_path, capsys):
    capture(tmp_path, ["one", "two", "three"])
    assert (
        main(["capture", "export", "--dir", str(tmp_path), "--model", MODEL, "--limit", "2"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["request"] for line in lines] == [request("one"), request("two")]


def test_a_bad_line_rejects_the_whole_file_naming_the_line_and_the_field(tmp_path, capsys):
    good = CaptureRecord(MODEL, "v1", NOW, request("fine")).to_line().decode()
    wrong_shape = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + good + json.dumps(wrong_shape) + "\n" + good)
    target = tmp_path / "capture"
    argv = ["capture", "import", "--dir", str(target), "--model", MODEL, "--version", "v1"]
    assert main([*argv, str(path)]) == 1
    err = capsys.readouterr().err
    assert "line 4" in err and "input 'text' has 1 elements but shape [3] needs 3" in err
    assert "nothing was written" in err
    assert not target.exists() or not any(target.rglob("*"))


@pytest.mark.parametrize(
    "line, named",
    [
        ('{"model": "other", "version": "v1", "captured_at": 1, "request": {}}', "request"),
        ('{"model": "other", "version": "v1", "captured_at": 1, "request": '
         '{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}}',
         "model is 'other'"),
        ('{"model": "recommender", "version": "v1", "captured_at": 1, "client": "10.0.0.1", '
         '"request": {}}', "unknown field(s) ['client']"),
        ("not json", "not valid JSON"),
        ('{"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}',
         "give --version"),
    ],
)  # fmt: skip
def test_import_rejections_name_the_field(tmp_path, capsys, line, named):
    path = tmp_path / "in.jsonl"
    path.write_text(line + "\n")
    assert (
        main(["capture", "import", "--dir", str(tmp_path / "c"), "--model", MODEL, str(path)]) == 1
    )
    err = capsys.readouterr().err
    assert "line 1" in err and named in err
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.jsonl"))


def test_bare_requests_become_records_of_the_named_version(tmp_path, capsys):
    path = tmp_path / "dataset.jsonl"
    body = {"id": "client-7", "model_name": MODEL, **request("own data")}
    path.write_text(json.dumps(body) + "\n\n")
    target = tmp_path / "capture"
    argv = ["capture", "import", "--dir", str(target), "--model", MODEL, "--version", "v3"]
    assert main([*argv, str(path)]) == 0
    (record,) = dump(target)
    # stored exactly as the capturer stores a body: no client id, no model fields in it
    assert record["version"] == "v3" and record["request"] == request("own data")


def test_an_oversized_line_is_rejected(tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    path.write_text(CaptureRecord(MODEL, "v1", NOW, request("x" * 2000)).to_line().decode())
    argv = ["capture", "import", "--dir", str(tmp_path / "c"), "--model", MODEL]
    assert main([*argv, "--max-record-bytes", "1000", str(path)]) == 1
    assert "line 1" in capsys.readouterr().err


def test_stats_counts_records_versions_and_corrupt_lines(tmp_path, capsys):
    capture(tmp_path, ["a", "b"])
    capture(tmp_path, ["c"], version="v2")
    newest = sorted((tmp_path / MODEL).glob("*.jsonl"), key=lambda p: p.stat().st_mtime)[-1]
    with open(newest, "ab") as f:
        f.write(b'{"model": "recommender", "vers')  # a torn last line
    assert main(["capture", "stats", "--dir", str(tmp_path), "--model", MODEL, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["records"], stats["corrupt"], stats["files"]) == (3, 1, 2)
    assert stats["versions"] == {"v1": 2, "v2": 1}
    assert main(["capture", "stats", "--dir", str(tmp_path), "--model", MODEL]) == 0
    assert "v1: 2, v2: 1" in capsys.readouterr().out


def test_a_model_name_that_is_a_path_is_refused(tmp_path, capsys):
    assert main(["capture", "stats", "--dir", str(tmp_path), "--model", "../etc"]) == 2
    assert "not a valid model name" in capsys.readouterr().err
