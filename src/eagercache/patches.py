"""RFC 6902 JSON Patches from one version of an entry's DataItem document to the next (jsonpatch makes them).

Only `data` is diffed; `last_retrieved` and `last_modified` are replaced outright. Two copies of one
version differ at most in `last_retrieved` (a refresh that brought the same data moves it and sends
nothing), so one patch serves every watcher of the version, whichever copy it holds, and leaves each with
the same document.

A patch is checked before it is sent: applied to the old document it must give the new one exactly, in
JSON (`1` and `1.0`, `true` and `1` are different values there, and not to Python's `==`). A patch that
does not, or that is no smaller than the new body, is not sent: the watchers get a snapshot instead.
"""

from __future__ import annotations

from typing import Any

import jsonpatch
import msgspec

# Bodies larger than this are not diffed (minutes of CPU for a large document): a change is a snapshot.
PATCH_MAX_BYTES = 1024 * 1024
# Bodies larger than this are diffed in a thread, so that other requests are served meanwhile.
PATCH_IN_THREAD_BYTES = 32 * 1024
_ENVELOPE = ("last_retrieved", "last_modified")
_canonical = msgspec.json.Encoder(order="sorted")
_encoder = msgspec.json.Encoder()


class _PatchData(msgspec.Struct):
    base: str
    patch: list[dict[str, Any]]


def diff(base_id: str, old_body: bytes, new_body: bytes) -> bytes | None:
    """The `data:` of a patch event (`{"base": base_id, "patch": [...]}`) turning the old body's document
    into the new one's, or None: send a snapshot (a body too large to diff, a patch no smaller than the
    new body, or one that would not rebuild it exactly)."""
    if max(len(old_body), len(new_body)) > PATCH_MAX_BYTES:
        return None
    try:
        old, new = msgspec.json.decode(old_body), msgspec.json.decode(new_body)
    except msgspec.DecodeError:
        return None
    if not all(isinstance(doc, dict) and {"data", *_ENVELOPE} <= doc.keys() for doc in (old, new)):
        return None  # not a DataItem document
    ops = [_under_data(op) for op in jsonpatch.make_patch(old["data"], new["data"]).patch]
    # Always replaced, even where the hub's copy has the new value already: a watcher's copy may not.
    ops += [{"op": "replace", "path": f"/{name}", "value": new[name]} for name in _ENVELOPE]
    try:
        rebuilt = jsonpatch.apply_patch(old, ops)
    except Exception:  # a patch that cannot be applied (a pointer to nothing, a conflict) is not sent
        return None
    if _canonical.encode(rebuilt) != _canonical.encode(new):
        return None
    data = _encoder.encode(_PatchData(base_id, ops))
    return data if len(data) < len(new_body) else None


def _under_data(op: dict[str, Any]) -> dict[str, Any]:
    """An operation on `data` as one on the whole document (its JSON Pointers under /data)."""
    op = {**op, "path": "/data" + op["path"]}
    if "from" in op:
        op["from"] = "/data" + op["from"]
    return op
