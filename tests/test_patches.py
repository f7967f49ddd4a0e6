"""RFC 6902 patches between versions of a DataItem: they rebuild the new document exactly, or are not sent."""

from __future__ import annotations

import json
from typing import Any

import jsonpatch
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eagercache import patches
from eagercache.item import new_entry

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.sampled_from([0.0, 1.0, 2.5])
    | st.sampled_from(["", "a", "~/"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "b", "c/d", "e~f"]), inner),
    max_leaves=12,
)


def body(data: Any, now_ms: int) -> bytes:
    """The /data body of this data, fetched at now_ms (as the engine builds it)."""
    entry, _ = new_entry(msgspec.json.encode(data, order="sorted"), now_ms, now_ms + 60_000)
    return entry.body


def exactly(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(old=json_values, new=json_values)
def test_a_patch_rebuilds_the_new_document_exactly(old: Any, new: Any) -> None:
    before, after = body({"rows": old, "pad": "x" * 200}, 1_000), body({"rows": new, "pad": "x" * 200}, 2_000)
    data = patches.diff('"base"', before, after)
    if data is None:  # a snapshot instead: allowed only when a patch would not be smaller
        return
    sent = json.loads(data)
    assert sent["base"] == '"base"'
    assert exactly(jsonpatch.apply_patch(json.loads(before), sent["patch"])) == exactly(json.loads(after))


def test_values_pythons_equality_confuses_are_changes() -> None:
    pad = "x" * 500
    for old, new in [(1, True), (True, 1), (1, 1.0), (0, False), ([1], [1.0])]:
        before, after = body({"v": old, "pad": pad}, 1_000), body({"v": new, "pad": pad}, 2_000)
        data = patches.diff('"b"', before, after)
        assert data is not None
        rebuilt = jsonpatch.apply_patch(json.loads(before), json.loads(data)["patch"])
        assert exactly(rebuilt) == exactly(json.loads(after)), (old, new)


def test_the_envelope_is_replaced_outright() -> None:
    """A watcher whose copy has another last_retrieved of the base version ends with the new one anyway."""
    pad = "x" * 500
    before, after = body({"v": 1, "pad": pad}, 1_000), body({"v": 2, "pad": pad}, 9_000)
    data = patches.diff('"b"', before, after)
    assert data is not None
    ops = json.loads(data)["patch"]
    other_copy = {**json.loads(before), "last_retrieved": "2001-01-01T00:00:00.000Z"}
    assert jsonpatch.apply_patch(other_copy, ops) == json.loads(after)
    assert {"op": "replace", "path": "/data/v", "value": 2} in ops


def test_no_patch_when_it_would_not_be_smaller_or_the_body_is_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    assert patches.diff('"b"', body(1, 1_000), body(2, 2_000)) is None  # the patch is longer than the body
    monkeypatch.setattr(patches, "PATCH_MAX_BYTES", 1_000)
    big = "x" * 2_000
    assert patches.diff('"b"', body({"v": 1, "p": big}, 1), body({"v": 2, "p": big}, 2)) is None


def test_a_patch_that_would_not_rebuild_the_new_document_is_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    pad = "x" * 500
    before, after = body({"v": 1, "pad": pad}, 1_000), body({"v": 2, "pad": pad}, 2_000)
    assert patches.diff('"b"', before, after) is not None

    def wrong(src: Any, dst: Any) -> jsonpatch.JsonPatch:
        return jsonpatch.JsonPatch([{"op": "replace", "path": "/v", "value": 3}])

    monkeypatch.setattr(jsonpatch, "make_patch", wrong)
    assert patches.diff('"b"', before, after) is None
