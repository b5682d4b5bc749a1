"""The waves state a region takes on `POST /admin/waves` (app/config/waves.py): what the
orchestrator publishes parses back unchanged, and a document that does not fit is refused
with the field named, never a crash and never a partial document."""

from __future__ import annotations

import copy
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config.waves import (
    MAX_REGIONS,
    MAX_TEXT,
    WavesDocumentError,
    parse_waves_document,
)

STATES = ["pending", "starting", "running", "succeeded", "failed", "unreachable", "rolled_back"]


def good() -> dict[str, Any]:
    return {
        "name": "recommender-v2", "published_at": 1_700_000_000.5, "on_failure": "rollback_all",
        "phase": "baking", "current_wave": 0,
        "waves": [{"index": 0, "state": "baking", "bake_until": 1_700_001_800.0, "regions": [
            {"region": "us-east-1", "state": "succeeded", "phase": "succeeded",
             "step": "done", "weights": {"v1": 0, "v2": 100.0}, "reason": None}]}],
    }  # fmt: skip


def test_a_good_document_parses_and_dumps_as_it_came():
    parsed = parse_waves_document(good()).model_dump(mode="json")
    expected = good()
    expected["waves"][0]["regions"][0]["weights"] = {"v1": 0.0, "v2": 100.0}
    assert parsed == expected


def _set(path: list[Any], value: Any):
    def change(doc: dict[str, Any]) -> None:
        target = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return change


REGION = ["waves", 0, "regions", 0]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_set(["published_at"], math.inf), "published_at"),
        (_set(["published_at"], "yesterday"), "published_at"),
        (_set(["on_failure"], "shrug"), "on_failure"),
        (_set(["current_wave"], 1), "current_wave"),
        (_set(["current_wave"], 0.5), "current_wave"),
        (_set(["surprise"], 1), "surprise"),
        (_set(["waves"], []), "waves"),
        (_set(["name"], "x" * (MAX_TEXT + 1)), "name"),
        (_set([*REGION, "state"], "exploded"), "waves.0.regions.0.state"),
        (_set([*REGION, "reason"], "r" * (MAX_TEXT + 1)), "waves.0.regions.0.reason"),
        (_set([*REGION, "weights"], {"v2": 101}), "waves.0.regions.0.weights.v2"),
        (_set([*REGION, "weights"], {"v2": math.nan}), "waves.0.regions.0.weights.v2"),
        (_set([*REGION, "weights"], {"v" * (MAX_TEXT + 1): 1}), "waves.0.regions.0.weights"),
        (_set([*REGION, "region"], ""), "waves.0.regions.0.region"),
        (_set([*REGION, "tags"], []), "waves.0.regions.0.tags"),
        (_set(["waves", 0, "bake_until"], -math.inf), "waves.0.bake_until"),
        (_set(["waves", 0, "index"], -1), "waves.0.index"),
        (_set(["waves", 0, "regions"], [good()["waves"][0]["regions"][0]] * (MAX_REGIONS + 1)),
         "waves.0.regions"),
    ],
)  # fmt: skip
def test_a_bad_document_is_refused_naming_the_field(change, field):
    doc = good()
    change(doc)
    with pytest.raises(WavesDocumentError) as refused:
        parse_waves_document(doc)
    assert f"waves: {field}" in str(refused.value), str(refused.value)


def test_more_than_64_regions_in_all_waves_are_refused():
    doc = good()
    region = doc["waves"][0]["regions"][0]
    doc["waves"] = [
        {"index": i, "state": "pending", "bake_until": None,
         "regions": [{**region, "region": f"r{i}-{j}"} for j in range(33)]}
        for i in range(2)
    ]  # fmt: skip
    with pytest.raises(WavesDocumentError, match="66 regions in all; at most 64"):
        parse_waves_document(doc)


@pytest.mark.parametrize("body", [[], "waves", 3, None])
def test_a_document_that_is_not_an_object_is_refused(body):
    with pytest.raises(WavesDocumentError, match="expected a JSON object"):
        parse_waves_document(body)


text = st.text(max_size=MAX_TEXT)
region = st.fixed_dictionaries({
    "region": st.text(min_size=1, max_size=MAX_TEXT), "state": st.sampled_from(STATES),
    "phase": st.none() | text, "step": st.none() | text, "reason": st.none() | text,
    "weights": st.none() | st.dictionaries(text, st.floats(0, 100), max_size=4),
})  # fmt: skip


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 4))
    waves = [{"index": i, "state": draw(text.filter(bool)),
              "bake_until": draw(st.none() | st.floats(1, 2e9)),
              "regions": draw(st.lists(region, max_size=4))} for i in range(n)]  # fmt: skip
    return {"name": draw(text.filter(bool)), "published_at": draw(st.floats(1, 2e9)),
            "on_failure": draw(st.sampled_from(["halt", "rollback_all"])),
            "phase": draw(text.filter(bool)), "current_wave": draw(st.integers(0, n - 1)),
            "waves": waves}  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(documents())
def test_every_document_the_schema_allows_round_trips_through_json(doc):
    parsed = parse_waves_document(json.loads(json.dumps(doc))).model_dump(mode="json")
    assert parse_waves_document(parsed).model_dump(mode="json") == parsed
    assert json.dumps(parsed, allow_nan=False)


scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300)
junk = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(documents(), st.data())
def test_any_one_field_broken_is_refused_by_name_or_accepted_whole(doc, data):
    """Replace one field anywhere with junk: either the document still fits (and parses back
    whole) or the error names a field path; nothing else escapes."""
    paths: list[list[Any]] = []

    def walk(node: Any, path: list[Any]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                paths.append([*path, key])
                walk(value, [*path, key])
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, [*path, i])

    walk(doc, [])
    path = data.draw(st.sampled_from(paths))
    broken = copy.deepcopy(doc)
    _set(path, data.draw(junk))(broken)
    try:
        parsed = parse_waves_document(broken)
    except WavesDocumentError as exc:
        message = str(exc)
        assert message.startswith("waves: ")
        named = str(path[0])
        assert named in message, (path, message)
    else:
        assert json.dumps(parsed.model_dump(mode="json"), allow_nan=False)
