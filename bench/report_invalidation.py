"""Section 9 of docs/benchmarks.md: targeted invalidation at scale (bench/invalidation.py).

Kept apart from report.py, which imports it inside `write_report` (it imports report.py's helpers).
"""

from __future__ import annotations

from .report import Doc, _failed, num, table, verdict

# Issue 13: "efficient at 100,000 entries (no full scan per call where an index can do)". Taken here as: a
# call answered by an index costs a few round trips plus a little per entry it matches, whatever the number
# of entries stored.
INDEXED_FIXED_MS = 5.0
INDEXED_MS_PER_ENTRY = 0.1


def section_invalidation(s9: Doc, targets: list[list[str]]) -> str:
    failed = _failed(s9)
    if failed:
        return f"## 9. Targeted invalidation\n\n{failed}\n"
    n = s9["entries"]
    rows = []
    indexed_ok = True
    for call in s9["calls"]:
        per_entry = call["ms"] / call["matched"] if call["matched"] else float("nan")
        if "index" in call["what"] and "without" not in call["what"]:
            indexed_ok = indexed_ok and call["ms"] <= INDEXED_FIXED_MS + INDEXED_MS_PER_ENTRY * call["matched"]
        rows.append(
            [
                call["action"],
                call["what"],
                num(call["matched"]),
                num(call["ms"], 1),
                num(per_entry * 1000, 1) if call["matched"] else "-",
            ]
        )
    targets.append(
        [
            f"targeted invalidation by an index at {n:,} entries: ≤ {INDEXED_FIXED_MS:g} ms + "
            f"{INDEXED_MS_PER_ENTRY * 1000:g} µs per entry matched",
            ", ".join(f"{c['what']}: {num(c['ms'], 1)} ms for {num(c['matched'])}" for c in s9["calls"][:3]),
            verdict(indexed_ok),
        ]
    )
    return "\n".join(
        [
            "## 9. Targeted invalidation",
            "",
            f"Issue 13's figures. One eagercache app in the harness's process (no HTTP), its fetcher `weather(city, "
            f'days)` with `indexed=("city",)` and a tag `region:<r>` on each result; {n:,} entries stored through '
            f"`Store.write` ({s9['cities']:,} cities, {s9['regions']} regions) in {s9['seed_s']:.1f} s. Each call "
            "once, on entries no earlier call removed; the time is the whole call as a caller sees it (the index "
            "or scan, the TARGET script per bucket batch of 500, and this process's bookkeeping: its near cache "
            "and the change announcements). How it is measured: `bench/invalidation.py`.",
            "",
            table(["action", "found by", "entries", "ms", "µs per entry"], rows),
            "",
            f"Memory: {s9['bytes_per_entry']:.0f} bytes of Redis `used_memory` per entry in all; the tag index "
            f"({s9['index_keys']:,} sets, two tags per entry: its region and its indexed city) "
            f"{s9['index_bytes_per_entry']:.0f} bytes per entry of it (freed by deleting the sets).",
            "",
            "A parameter without an index is matched by a scan of the fetcher's stored entries (`SCAN`, 500 at a "
            "time): its cost follows the fetcher's entry count, not what it matches. Index the parameters you "
            "invalidate by.",
            "",
        ]
    )
