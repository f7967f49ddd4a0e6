"""Section 10 of docs/benchmarks.md: memory:// (the native store) against redis:// (bench/memstore.py).

Kept apart from report.py, which imports it inside `write_report` (it imports report.py's helpers).
"""

from __future__ import annotations

from .memstore import GOAL_BYTES_BEYOND_BODY, GOAL_RATIO
from .report import Doc, _failed, num, table, verdict


def section_memstore(s10: Doc, targets: list[list[str]]) -> str:
    failed = _failed(s10)
    if failed:
        return f"## 10. memory:// against redis://\n\n{failed}\n"
    rows = []
    for stack in s10["cold"]:
        cold, cap = s10["cold"][stack], s10["capacity"][stack]
        cold_ratio = cold["memory"]["misses_per_s"] / cold["redis"]["misses_per_s"]
        cap_ratio = cap["memory"]["refreshes_per_s"] / cap["redis"]["refreshes_per_s"]
        # A store that kept up with every entry due refreshed as fast as they fell due: its rate (and so the
        # ratio) is a lower bound.
        bound = "" if cap["memory"].get("saturated", True) else "≥ "
        rows.append(
            [
                stack,
                num(cold["memory"]["misses_per_s"]),
                num(cold["redis"]["misses_per_s"]),
                f"{cold_ratio:.2f}x",
                bound + num(cap["memory"]["refreshes_per_s"]),
                num(cap["redis"]["refreshes_per_s"]),
                f"{bound}{cap_ratio:.2f}x",
                f"{num(cap['memory']['cpu_us_per_refresh'])} / {num(cap['redis']['cpu_us_per_refresh'])}",
            ]
        )
        targets.append(
            [
                f"memory:// cold fills ≥ {GOAL_RATIO:g}x redis:// ({stack})",
                f"{num(cold['memory']['misses_per_s'])}/s vs {num(cold['redis']['misses_per_s'])}/s: {cold_ratio:.2f}x",
                verdict(cold_ratio >= GOAL_RATIO),
            ]
        )
        targets.append(
            [
                f"memory:// refresh capacity ≥ {GOAL_RATIO:g}x redis:// ({stack})",
                f"{bound}{num(cap['memory']['refreshes_per_s'])}/s vs {num(cap['redis']['refreshes_per_s'])}/s: "
                f"{bound}{cap_ratio:.2f}x" + (" (memory:// kept up with every entry due)" if bound else ""),
                verdict(cap_ratio >= GOAL_RATIO),
            ]
        )
    fp = s10["footprint"]
    targets.append(
        [
            f"memory:// memory per entry at {fp['entries']:,} entries ≤ {GOAL_BYTES_BEYOND_BODY} B beyond the body",
            f"{num(fp['beyond_body'])} B beyond the body ({num(fp['beyond_stored_value'])} B beyond the stored value)"
            + (
                ""
                if fp["beyond_body"] <= GOAL_BYTES_BEYOND_BODY
                else "; the id, its dict slot, the value's bytes header and its header line alone are ~200 B"
            ),
            verdict(fp["beyond_body"] <= GOAL_BYTES_BEYOND_BODY),
        ]
    )
    return "\n".join(
        [
            "## 10. memory:// against redis://",
            "",
            "Issue 17's figures: `memory://` is memstore.py's native store (plain dicts and a schedule in slots, "
            "no fakeredis, no Lua). Cold fills: section 7's method (never-seen ids, 32 connections, misses/s from "
            "`/metrics`) on a serve process of each store. Refresh capacity: a serve process of each store with "
            f"the fetcher's ttl at 1 s gets {_entries(s10)} by cold fills, so that more fall due each second "
            "than one process refreshes; refreshes/s "
            "from `/metrics` over a window once every entry has been due (the same method for both stores: "
            "section 7 arms its schedule through Redis, which memory:// has not). Both stacks, same run. How it "
            "is measured: `bench/memstore.py`. A rate marked ≥ is a store that kept up with every entry due (they "
            "fell due no faster than it refreshed them): its rate and ratio are lower bounds.",
            "",
            table(
                [
                    "stack",
                    "cold fills/s memory://",
                    "redis://",
                    "ratio",
                    "refreshes/s memory://",
                    "redis://",
                    "ratio",
                    "CPU µs per refresh (memory / redis)",
                ],
                rows,
            ),
            "",
            _ratio_text(s10),
            "",
            f"Memory per entry, {fp['entries']:,} entries written through `MemoryStore.write` in a process of "
            f"their own (RSS delta): {num(fp['per_entry'])} B per entry, of which the stored value (header line "
            f"and body) is {num(fp['stored_value_per_entry'])} B and the body a reader gets "
            f"{num(fp['body_per_entry'])} B: {num(fp['beyond_stored_value'])} B beyond the stored value, "
            f"{num(fp['beyond_body'])} B beyond the body. Where it goes (CPython 3.11 objects, allocated in 16 B "
            "steps): the entry id as a str (64 B) and its dict slot (~41 B at a million entries, the dict's spare "
            "room included), the value's bytes object header (33 B, ~40 B with the rounding), the record (value, "
            "schedule score, last read, stale marker: 48 B as a gc=False Struct, 64 B as a __slots__ object) and "
            "the id's place in its schedule slot (8 B; the schedule was a heap of (score, id) pairs, 72 B per "
            "entry, before issue 17's last changes). Read times "
            "share one int per ms. What is left to cut is the record: the id, its dict slot, the value's header "
            "and the stored header line (59 B here: ETag, three times, the tags) are already ~200 B, so 200 B "
            "beyond the body would take a store that keeps neither ids as str nor the header line as text.",
            "",
        ]
    )


def _entries(s10: Doc) -> str:
    """How many entries each store's capacity run had (the same for both stores in runs before 9bf090b)."""
    run = s10["capacity"][next(iter(s10["capacity"]))]
    memory, redis = run["memory"]["entries"], run["redis"]["entries"]
    if memory == redis:
        return f"{memory:,} entries"
    return f"{memory:,} entries on memory:// and {redis:,} on redis://"


def _ratio_text(s10: Doc) -> str:
    """What the cold-fill and refresh ratios say, from this run's figures (which goals are missed, where)."""

    def ratio(stack: str, part: str, rate: str) -> float:
        return float(s10[part][stack]["memory"][rate] / s10[part][stack]["redis"][rate])

    missed = [
        f"{what} ({stack})"
        for stack in s10["cold"]
        for what, part, rate in (("cold fills", "cold", "misses_per_s"), ("refreshes", "capacity", "refreshes_per_s"))
        if ratio(stack, part, rate) < GOAL_RATIO
    ]
    common = (
        "a memory:// refresh or cold fill spends its CPU time in the engine and the HTTP server (the fetch task, "
        "the entry's encoding, metrics, the response), all of which redis:// pays too, while redis:// moves its "
        "store work to the redis-server on the other core (the CPU µs per refresh and per miss are this "
        "process's only). The figures are from one run, not a median: other work on the machine (tests of other "
        "sessions) moves a round's figure by tens of per cent."
    )
    if not missed:
        return f"Every {GOAL_RATIO:g}x goal is met in this run. What is left per operation: {common}"
    return f"Where the {GOAL_RATIO:g}x is missed ({', '.join(missed)}), the store is no longer the cost: {common}"
