"""Section 7 of docs/benchmarks.md: the refresh engine of a real `eagercache serve` process (bench/engine.py).

Kept apart from report.py, which imports it inside `write_report` (it imports report.py's helpers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from .report import Doc, _failed, _pyplot, median, num, spread, table, verdict

CAPACITY_CHART = "bench-engine-capacity.png"
LAG_CHART = "bench-engine-lag.png"


def _goals(s7: Doc) -> Doc:
    goals: Doc = s7.get("goals", {})
    return goals


def section_engine(s7: Doc, docs: Path, targets: list[list[str]]) -> str:
    failed = _failed(s7)
    if failed:
        targets.append(["7. refresh engine (capacity, lag, memory, cold fills)", "section failed", verdict(False)])
        return "## 7. Refresh engine of a serve process\n\n" + failed
    parts = [
        "## 7. Refresh engine of a serve process",
        "",
        "Issue 16's figures, all from real `eagercache serve` processes (fetcher `bench.engine_fetchers:engine`: "
        'returns `{"i": i}`, no upstream, no I/O; default settings; the section\'s redis-server, '
        f"`hz {s7['server_config'].get('hz')}`, allocator {s7.get('allocator', '?')}), observed from outside: "
        "Redis (the schedule, the stored headers, INFO), each process's `/metrics`, and its CPU time "
        "(`/proc/<pid>/task/*/schedstat`, ns). Stacks: "
        + ", ".join(f"**{name}** = `--loop {s['loop']} --http {s['http']}`" for name, s in s7["stacks"].items())
        + " (fast is what `auto` picks where both are installed). How each figure is taken is in "
        "`bench/engine.py`'s docstring.",
        "",
    ]
    parts += _layout_note(s7)
    for name, error in s7.get("errors", {}).items():
        parts += [
            f"**Phase `{name}` failed in this run:** `{error['error']}`",
            "",
            "```",
            error["traceback"],
            "```",
            "",
        ]
    parts += _capacity(s7, docs, targets)
    parts += _profile(s7)
    parts += _lag(s7, docs, targets)
    parts += _memory(s7, targets)
    parts += _cold(s7, targets)
    parts += _causes(s7)
    phases = s7.get("phases", {})
    parts += [
        "Time taken by this section: "
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
        + (f"; {s7['elapsed_s']:.0f} s in all." if "elapsed_s" in s7 else "."),
        "",
    ]
    return "\n".join(parts)


def _layout_note(s7: Doc) -> list[str]:
    layout = s7.get("layout")
    if not layout:
        return []
    if layout["bulk"]:
        return [
            "Entries are seeded with pipelined plain commands along the key layout (a probe entry written by "
            "`Store.write` and one written that way matched key by key: names, types, expiries, values, "
            f"sorted-set members, counts; {layout['buckets']} bucket(s), shadow keys "
            f"{'yes' if layout['shadows'] else 'no'}, read times {'yes' if layout['reads'] else 'no'}).",
            "",
        ]
    return [
        "**The plain-command seeding did not match what `Store.write` leaves in Redis, so every entry was "
        "written with `Store.write` (slower).** Differences:",
        "",
        *(f"- `{d}`" for d in layout["differences"]),
        "",
    ]


# -- capacity --------------------------------------------------------------------------------------------------


def _redis_spread(rounds: list[Doc], key: str, scale: float, unit: str = "") -> str:
    """A Redis-side figure of the drains (runs before it was measured have none)."""
    values = [r[key] * scale for r in rounds if key in r]
    return spread(values) + unit if values else "not measured"


def _capacity(s7: Doc, docs: Path, targets: list[list[str]]) -> list[str]:
    capacity = s7.get("capacity", {})
    goal = float(_goals(s7).get("refreshes_per_s", 20_000))
    n = s7["capacity_entries"]
    rows = []
    for stack, run in capacity.items():
        rounds = run["rounds"]
        rates = [r["refreshes_per_s"] for r in rounds]
        ok: bool | None = median(rates) >= goal if stack in s7["stacks"] else None  # not the default's slots
        rows.append(
            [
                stack,
                str(len(rounds)),
                spread(rates) + " /s",
                spread([r["cpu_us_per_refresh"] for r in rounds]),
                spread([r["cpu_util"] * 100 for r in rounds]) + " %",
                spread([1e6 / r["cpu_us_per_refresh"] for r in rounds if r["cpu_us_per_refresh"] > 0]) + " /s",
                _redis_spread(rounds, "redis_cpu_us_per_refresh", 1),
                _redis_spread(rounds, "redis_cpu_util", 100, " %"),
                spread([r["whole_drain_per_s"] for r in rounds]) + " /s",
                spread([r["first_seen_ms"] for r in rounds]) + " ms",
                num(sum(r["fetches"].get("schedule/ok", 0) for r in rounds) / len(rounds)),
                verdict(ok),
            ]
        )
        if ok is not None:
            targets.append(
                [
                    f"7. refresh capacity ≥ {goal:,.0f} refreshes/s per process ({n:,} entries due at once), "
                    f"{stack} stack",
                    spread(rates) + " /s",
                    verdict(ok),
                ]
            )
    for stack in s7["stacks"]:
        if stack not in capacity:
            targets.append([f"7. refresh capacity, {stack} stack", "phase failed", verdict(False)])
    if not rows:
        return []
    out = [
        f"### 7.1 Refresh capacity: {n:,} entries due at once",
        "",
        f"{n:,} entries seeded due an hour ahead, the process started (fetcher ttl an hour), then every entry made "
        "due at once (`ZADD XX` to now in its bucket's `{ns}{b<n>}:due`); the harness polls Redis every 10 ms for "
        "the entries refreshed (score moved an hour ahead by their write). **Refreshes/s** = the middle 80 % of the "
        "drain (10 % → 90 % refreshed) / its duration, the process saturated; **CPU µs per refresh** = the "
        "process's CPU time over the same interval / those refreshes. Median (min-max) over rounds; both stacks' "
        "processes run at once, each with its own entries, and the rounds alternate between them. The whole "
        "drain (first → last refresh) and when the first refresh was seen (the schedule loop wakes at most one "
        "backstop interval after the arming) are for reference; the fetch count per round is "
        'the process\'s own `eagercache_fetches_total{cause="schedule",outcome="ok"}`. Process CPU below 100 % '
        "means it waited (for Redis, which shares the other core with the harness and, on a shared machine, other "
        "work); 1 / CPU per refresh is then the rate the process would reach with a core of its own. "
        + "".join(
            f"A third process, **{name}** (the fast stack with `--max-concurrent-fetches {run['slots']}`; the "
            "default is 64, and the goal is judged on it), shows how far more refreshes in flight take it. "
            for name, run in capacity.items()
            if run.get("slots")
        )
        + "**Redis "
        "CPU** is redis-server's own CPU time (/proc schedstat) over the same interval, the harness's polls (one "
        "`ZCOUNT` per bucket every 10 ms) included: Redis runs on one core, so 1e6 / its µs per refresh bounds "
        "what any number of processes can refresh through one server.",
        "",
        table(
            [
                "stack",
                "rounds",
                "refreshes/s (10-90 %)",
                "CPU µs per refresh",
                "process CPU",
                "1 / CPU per refresh",
                "Redis CPU µs per refresh",
                "Redis CPU",
                "whole drain",
                "first refresh after",
                "schedule fetches per round",
                f"≥ {goal:,.0f}/s",
            ],
            rows,
        ),
        "",
    ]
    if _chart_capacity(s7, docs / CAPACITY_CHART):
        out += [f"![refresh capacity]({CAPACITY_CHART})", ""]
    return out


def _chart_capacity(s7: Doc, path: Path) -> bool:
    plt = _pyplot()
    capacity = s7.get("capacity", {})
    if plt is None or not capacity:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = {"fast": "#1f77b4", "plain": "#ff7f0e"}
    for stack, run in capacity.items():
        for i, r in enumerate(run["rounds"]):
            xs = [p[0] / 1000 for p in r["series"]]
            ys = [p[1] for p in r["series"]]
            ax.plot(xs, ys, color=colors.get(stack), alpha=0.8, label=stack if i == 0 else None)
    goal = float(_goals(s7).get("refreshes_per_s", 20_000))
    n = s7["capacity_entries"]
    ax.plot([0, n / goal], [0, n], color="green", linestyle=":", label=f"goal slope {goal:,.0f}/s")
    ax.set_xlabel("s since every entry was made due")
    ax.set_ylabel("entries refreshed")
    ax.set_title(f"Draining {n:,} due entries, one serve process per stack, each round")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _profile(s7: Doc) -> list[str]:
    fast = s7.get("capacity", {}).get("fast", {})
    drain = fast.get("profile") or {}
    lag_runs = s7.get("lag", {})
    steady_n = min(lag_runs, key=int) if lag_runs else None
    steady = (lag_runs[steady_n].get("profile") or {}) if steady_n else {}
    if "groups" not in drain and "groups" not in steady:
        return [f"(no profile: {drain.get('error') or steady.get('error') or 'not taken'})", ""]
    cpu = median(r["cpu_us_per_refresh"] for r in fast.get("rounds", []))
    steady_cpu = lag_runs[steady_n]["cpu_us_per_refresh"] if steady_n else math.nan
    columns: list[tuple[str, Doc, float]] = []
    if "groups" in drain:
        columns.append(("draining (7.1)", drain, cpu))
    if "groups" in steady and steady_n:
        columns.append((f"backlog with events ({int(steady_n):,} entries, 7.2)", steady, steady_cpu))
    names: list[str] = []
    for _, profile, _ in columns:
        names += [g for g, _ in profile["groups"]["groups"] if g not in names]
    rows = []
    for name in names:
        row = [name]
        for _, profile, us in columns:
            share = dict(profile["groups"]["groups"]).get(name, 0.0)
            row.append(f"{share * 100:.1f} % ≈ {share * us:.0f} µs")
        rows.append(row)
    out = [
        "#### Where a refresh's CPU time goes (fast stack)",
        "",
        "py-spy (`--function`, "
        f"{drain.get('rate_hz', steady.get('rate_hz', 250))} Hz, non-idle samples) on the serve process, in runs "
        "apart from the measured ones (sampling slows the process): while it drains one round after another as "
        "in 7.1, and, after 7.2's window, while it refreshes the lag run's backlog with expiry events arriving. "
        "Each sample goes to one group: the fetcher call (its task, timeout and the function) and encoding "
        "(canonical JSON, BLAKE2b ETag, the stored header) as whole subtrees; otherwise the library the sample "
        "was in (redis-py: command packing, connections, reply parsing; asyncio/uvloop; prometheus-client), "
        "and eagercache's own code counts to what it ran for (scripts: `Store` building script calls and "
        "reading their replies; scheduling: the Refresher's loops and events; engine: the refresh task's "
        "bookkeeping). µs = share x that run's CPU µs per refresh (7.1's median; 7.2's window).",
        "",
        table(["group", *(f"{label}" for label, _, _ in columns)], rows),
        "",
    ]
    for label, profile, _ in columns:
        ops = ", ".join(f"{name} {share * 100:.0f} %" for name, share in profile["groups"]["operations"][:8])
        out += [
            f"By operation ({label}; the deepest eagercache step on the sampled stack): {ops}. "
            f"{profile['samples']:,} samples"
            + (
                f", {profile['refreshes']:,.0f} refreshes, "
                f"{num(profile['cpu_us_per_refresh_while_profiled'])} CPU µs per refresh while sampled."
                if profile.get("refreshes")
                else "."
            ),
            "",
        ]
    if "self" in drain:
        out += [
            "Top functions by own time while draining:",
            "",
            "```",
            *(f"{share * 100:5.1f}%  {name}" for name, share in drain["self"][:15]),
            "```",
            "",
        ]
    return out


# -- lag -------------------------------------------------------------------------------------------------------


def _lag_ok(run: Doc) -> bool | None:
    goal = run.get("goal_ms")
    if goal is None:
        return None
    p99 = run["lag_ms"]["99"]
    share = run["server_histogram"]["share_within_goal"]
    return bool(p99 <= goal and not (isinstance(share, float) and math.isnan(share)) and share >= 0.99)


def _lag(s7: Doc, docs: Path, targets: list[list[str]]) -> list[str]:
    runs = s7.get("lag", {})
    rate = s7["due_per_second"]
    goals = {int(n): float(ms) for n, ms in _goals(s7).get("lag_p99_ms", {}).items()}
    rows = []
    for n, run in runs.items():
        lag = run["lag_ms"]
        bound = ">= " if run["lag_is_lower_bound"] else ""
        hist = run["server_histogram"]
        ok = _lag_ok(run)
        rows.append(
            [
                f"{int(n):,}",
                f"{run['ttl_s']:g}",
                f"{run['window_s']:g}",
                num(run["refreshes_per_s"]),
                num(run["cpu_util"] * 100) + " %",
                num(run["cpu_us_per_refresh"]),
                bound + num(lag["50"], 1),
                bound + num(lag["99"], 1),
                bound + num(lag["max"], 1),
                f"{run['not_refreshed']:,} of {int(lag['count']):,}",
                f"{num(hist['p50_ms'], 1)} / {num(hist['p99_ms'], 1)}",
                num(hist["share_within_goal"] * 100, 1) + " %",
                verdict(ok),
            ]
        )
    for n, goal in sorted(goals.items()):
        run = runs.get(str(n))
        label = f"7. refresh lag p99 ≤ {goal:g} ms at {n:,} entries, {rate:,} due/s"
        if run is None:
            why = (
                "phase failed"
                if f"lag/{n}" in s7.get("errors", {})
                else f"not run (sizes run: {', '.join(runs) or 'none'}; BENCH_ENGINE_LAG_SIZES)"
            )
            targets.append([label, why, verdict(False) if why == "phase failed" else "n/a"])
            continue
        bound = ">= " if run["lag_is_lower_bound"] else ""
        targets.append(
            [
                label,
                f"{bound}{num(run['lag_ms']['99'], 1)} ms ({num(run['server_histogram']['share_within_goal'] * 100, 1)}"
                f" % ≤ {goal:g} ms by the process's histogram)",
                verdict(_lag_ok(run)),
            ]
        )
    if not rows:
        return []
    out = [
        f"### 7.2 Refresh lag: {rate:,} entries due per second (fast stack)",
        "",
        f"N entries with ttl = N / {rate:,} s, seeded, then (process running) re-armed in due order so that "
        f"{rate:,} fall due per second, each entry's shadow key expiring 250 ms after its due time, as a "
        "write leaves it (an entry not claimed by then sends its expiry event, as in steady state). Window: "
        "from 1 s after re-arming, at most ttl - 4 s long (no entry is due twice in it). **Lag** of every "
        "entry due in the window = the `last_retrieved` time in its stored "
        "header (the refresh's clock reading after the fetch returned, before the write) - its due time; entries "
        "not yet refreshed when their header was read count with lag = read time - due, and then the "
        "percentiles are lower bounds (>=). The process's own `eagercache_refresh_lag_seconds` histogram "
        "(due → stored) over the window is the cross-check: its p50/p99 are estimates within its buckets, its "
        "share at or below the goal is exact (the goals are bucket bounds). Met = p99 ≤ goal by both. Refreshes/s "
        "and process CPU are over the window (schedule and event causes, `/metrics`).",
        "",
        table(
            [
                "entries",
                "ttl s",
                "window s",
                "refreshed/s",
                "process CPU",
                "CPU µs per refresh",
                "lag p50 ms",
                "lag p99 ms",
                "lag max ms",
                "not refreshed by read",
                "histogram p50 / p99 ms",
                "histogram ≤ goal",
                "goal",
            ],
            rows,
        ),
        "",
    ]
    for n, run in runs.items():
        causes = ", ".join(f"{k} {v:,.0f}" for k, v in run["fetches"].items())
        out += [
            f"{int(n):,} entries: seeded in {run['seeding']['seconds']:.1f} s ({run['seeding']['rate']:,.0f}/s, "
            f"{run['seeding']['method']}), re-armed in {run['rearm_s']:.1f} s "
            f"({run['rearm_late_chunks']} chunk(s) sent after their first due time); fetches in the window: "
            f"{causes or 'none'}."
            + (
                f" The process refreshed {run['refreshes_per_s']:,.0f}/s against {rate:,} falling due: entries "
                "queue, and lag grows for as long as the load lasts (the figures measure the queue)."
                if run["refreshes_per_s"] < 0.95 * rate
                else ""
            ),
            "",
        ]
    if _chart_lag(s7, docs / LAG_CHART):
        out += [f"![refresh lag]({LAG_CHART})", ""]
    if str(1_000_000) not in runs:
        out += [
            "The 1,000,000-entry lag run is part of the full run (`BENCH_SECTIONS=7 make bench`); in a quick run "
            "add it with `BENCH_QUICK=1 BENCH_SECTIONS=7 BENCH_ENGINE_LAG_SIZES=100000,1000000 make bench`.",
            "",
        ]
    return out


def _chart_lag(s7: Doc, path: Path) -> bool:
    plt = _pyplot()
    runs = s7.get("lag", {})
    if plt is None or not runs:
        return False
    qs = ["50", "90", "99", "99.9", "max"]
    fig, ax = plt.subplots(figsize=(8, 4))
    for n, run in runs.items():
        ax.plot(qs, [max(run["lag_ms"][q], 0.1) for q in qs], marker="o", label=f"{int(n):,} entries")
        goal = run.get("goal_ms")
        if goal:
            ax.axhline(goal, linestyle=":", color=ax.lines[-1].get_color(), label=f"goal p99 {goal:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("ms after due (log scale)")
    ax.set_title(f"Refresh lag, {s7['due_per_second']:,} due/s, one serve process (fast stack)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- memory ----------------------------------------------------------------------------------------------------


def _memory(s7: Doc, targets: list[list[str]]) -> list[str]:
    runs = s7.get("lag", {})
    if not runs:
        targets.append(["7. memory ≤ 200 bytes per entry beyond its body", "not measured", verdict(False)])
        return []
    goal = float(_goals(s7).get("overhead_bytes", 200))
    rows, parts_rows = [], []
    for n, run in runs.items():
        m = run["memory"]
        rows.append(
            [
                f"{int(n):,}",
                num(m["per_entry"]),
                num(m["body_bytes"]),
                num(m["stored_value_bytes"] - m["body_bytes"]),
                num(m["overhead"]),
                num(m["shadow_bytes_per_entry"]),
                num(m["overhead_without_shadow"]),
                num(m["per_entry_steady"]),
                verdict(m["overhead"] <= goal),
            ]
        )
        b = m["breakdown"]
        listed = b["item_key"] + b["shadow_key"] + b["due_zset"] + b["read_zset"] + b["counts_hash"]
        parts_rows.append(
            [
                f"{int(n):,}",
                num(b["item_key"]),
                num(b["shadow_key"]),
                num(b["due_zset"]),
                num(b["read_zset"]),
                num(b["counts_hash"], 2),
                num(m["per_entry"] - listed),
                num(b["keys"] / int(n), 2),
            ]
        )
    largest = runs[max(runs, key=int)]["memory"]
    n_largest = int(max(runs, key=int))
    targets.append(
        [
            f"7. memory ≤ {goal:g} bytes per entry beyond its body ({n_largest:,} entries)",
            f"{num(largest['overhead'])} bytes",
            verdict(largest["overhead"] <= goal),
        ]
    )
    targets.append(
        [
            f"7. the same without shadow keys ({n_largest:,} entries; what making them optional would save)",
            f"{num(largest['overhead_without_shadow'])} bytes (shadow keys: {num(largest['shadow_bytes_per_entry'])}"
            " bytes per entry)",
            verdict(largest["overhead_without_shadow"] <= goal),
        ]
    )
    return [
        "### 7.3 Memory per entry",
        "",
        "In each lag run, before its process starts: INFO `used_memory` of the empty store (layout and scripts "
        "loaded), after seeding N entries, and after deleting every shadow key (`DEL`); divided by N. **Overhead** "
        "= bytes per entry - the body a reader gets (the JSON after the stored header line). **Shadow keys** = "
        "what deleting them freed per entry (the key, its expiry, their hash-table slots): what making them "
        "optional would save. The steady figure is `used_memory` at the end of the lag window, process running "
        "(shadow keys of entries past due and not yet refreshed are gone by then).",
        "",
        table(
            [
                "entries",
                "bytes per entry",
                "body",
                "stored header line",
                "overhead",
                "shadow keys",
                "overhead without shadow keys",
                "steady bytes per entry",
                f"overhead ≤ {goal:g}",
            ],
            rows,
        ),
        "",
        "Breakdown, MEMORY USAGE in bytes per entry (sampled item and shadow keys; the bucket's sorted sets and "
        "hash whole, divided by N); the rest is what MEMORY USAGE does not count (the keyspace's and the expires "
        "table's slots, allocator rounding):",
        "",
        table(
            [
                "entries",
                "item key (name + value)",
                "shadow key",
                "due zset",
                "read zset",
                "counts hash",
                "rest",
                "keys per entry",
            ],
            parts_rows,
        ),
        "",
    ]


# -- cold fills ------------------------------------------------------------------------------------------------


def _cold(s7: Doc, targets: list[list[str]]) -> list[str]:
    cold = s7.get("cold", {})
    rows = []
    for stack, run in cold.items():
        load = run["load"]
        rows.append(
            [
                stack,
                num(run["misses_per_s"]),
                num(run["cpu_us_per_miss"]),
                num(run["cpu_util"] * 100) + " %",
                num(load["percentiles_us"]["50.0"] / 1000, 1),
                num(load["percentiles_us"]["99.0"] / 1000, 1),
                f"{load['requests']:,}",
                f"{load['errors']} / {load['non_2xx']}",
                _hits(run),
            ]
        )
    if rows:
        targets.append(
            [
                "7. cold fills per process (misses/s; a figure, no goal)",
                "; ".join(f"{stack} {num(run['misses_per_s'])}/s" for stack, run in cold.items()),
                verdict(None),
            ]
        )
    if not rows:
        return []
    load_tool = next(iter(cold.values()))["load"]["tool"]
    return [
        "### 7.4 Cold fills",
        "",
        f"GETs of ids never requested before (`/data/engine?i=<new id>`, each path sent once), "
        f"{s7['cold_connections']} connections, {s7['cold_seconds']:g} s after a 1 s warm-up of other new ids, "
        f"{load_tool}; each one a miss: the read, the fill lock, the fetch, the cold write. Misses/s from the "
        'process\'s `eagercache_requests_total{result="miss"}`; CPU µs per miss = its CPU time over the run / '
        "misses.",
        "",
        table(
            [
                "stack",
                "misses/s",
                "CPU µs per miss",
                "process CPU",
                "p50 ms",
                "p99 ms",
                "requests",
                "errors / non-2xx",
                "other answers",
            ],
            rows,
        ),
        "",
    ]


def _hits(run: Doc) -> str:
    others: Sequence[tuple[str, float]] = [(k, v) for k, v in run["by_result"].items() if k != "miss" and v]
    return ", ".join(f"{k} {v:,.0f}" for k, v in others) or "none"


def _causes(s7: Doc) -> list[str]:
    """Why a goal of this section is not met, from this run's own figures."""
    goals = _goals(s7)
    capacity_goal = float(goals.get("refreshes_per_s", 20_000))
    out: list[str] = []
    fast = s7.get("capacity", {}).get("fast")
    if fast and fast.get("rounds"):
        cpu_us = median([r["cpu_us_per_refresh"] for r in fast["rounds"]])
        rate = median([r["refreshes_per_s"] for r in fast["rounds"]])
        util = median([r["cpu_util"] for r in fast["rounds"]])
        if rate < capacity_goal:
            out.append(
                f"- **Capacity**: a refresh costs the process {num(cpu_us)} µs of CPU (fast stack), so one core "
                f"refreshes at most {num(1e6 / cpu_us)} per second; {num(capacity_goal)}/s needs "
                f"{num(1e6 / capacity_goal)} µs. A claim round's refreshes already share one task (one timer "
                "for their fetches, their writes in one round trip under one timeout, roundtrip.py); per refresh "
                "there remain the fetcher's own task (it isolates the fetcher: a fetcher may raise anything, "
                "ignore cancellation or hang past its timeout), the claim's reply made into a claim and its "
                "header parsed, the entry id read into a call (no longer validated again: 85b50bb), canonical "
                "JSON and a BLAKE2b ETag, the `WRITE` "
                "script's 17 keys and arguments packed, and reading its reply: the profile above. The process "
                f"also waits: its CPU was {num(util * 100)} % while draining. A fetcher run that is over gives "
                "its slot back at once, so the next round is claimed while the last one's entries are made and "
                "written (9b8de6a; before, once they had all been made: 66cd9bf); but claims are sized to the "
                "slots no run holds (claiming further ahead would let claimed entries queue for a slot against "
                "their lease), so each round of 64 still waits for its claim's round trip before its fetches, "
                "and the process then has only the last round's entries to work on. "
                "What is left is per-refresh Python work spread over those steps; 50 µs would take a fetch "
                "without a task of its own (Python 3.12's eager tasks; eagercache supports 3.11) and less per "
                "claim."
            )
            for name, run in s7.get("capacity", {}).items():
                wide = run["rounds"] if run.get("slots") else []
                if wide and all("redis_cpu_util" in r for r in wide):
                    out.append(
                        f"- **More in flight ({name})**: "
                        f"{spread([r['refreshes_per_s'] for r in wide])}/s at "
                        f"{num(median([r['cpu_us_per_refresh'] for r in wide]))} µs per refresh, the process at "
                        f"{num(median([r['cpu_util'] for r in wide]) * 100)} % CPU and redis-server at "
                        f"{num(median([r['redis_cpu_util'] for r in wide]) * 100)} % of its core "
                        f"({num(median([r['redis_cpu_us_per_refresh'] for r in wide]))} µs per refresh). With the "
                        "default's 64 slots a round waits for its claim's round trip before its fetches; with "
                        f"{run['slots']}, rounds of 256 follow one another and both sides stay busy. More slots "
                        "mean more fetcher runs at once against the upstream, which is why the default stays."
                    )
            redis_us = [r["redis_cpu_us_per_refresh"] for r in fast["rounds"] if "redis_cpu_us_per_refresh" in r]
            if redis_us:
                need = capacity_goal * median(redis_us) / 1e6
                out.append(
                    f"- **Redis's side of capacity**: redis-server spent {num(median(redis_us))} µs of its own CPU "
                    f"per refresh (the claim and the `WRITE` script, Lua included), so {num(capacity_goal)}/s "
                    f"through one server needs {need:.2f} of its single-threaded core"
                    + (
                        ": more than one core can give, whatever the process does. "
                        if need > 1
                        else f"; it bounds one server at {num(1e6 / median(redis_us))} refreshes/s. "
                    )
                    + "On a cluster the buckets spread this over the primaries (section 5)."
                )
    for n, run in sorted(s7.get("lag", {}).items(), key=lambda kv: int(kv[0])):
        due = run.get("due_per_second", s7.get("due_per_second", 0))
        if run.get("refreshes_per_s", 0) < 0.98 * due:  # within 2 %: the window's edges, not a backlog
            out.append(
                f"- **Lag at {int(n):,} entries**: {num(due)} entries fall due per second and the process "
                f"refreshed {num(run['refreshes_per_s'])} per second over the window (CPU "
                f"{num(run['cpu_util'] * 100)} %, {num(run['cpu_us_per_refresh'])} µs per refresh): a backlog "
                "grows, and lag grows with it. The lag goals follow from capacity: at the goal's rate, one "
                "process keeps up only at ≤ 100 µs per refresh with its core to itself, and once entries are "
                "more than 250 ms late their shadow keys expire and send events again (read straight off the "
                "connection; those of buckets the schedule has due cost no claim). Entries refreshed on time "
                "send none (1e94324: before, every refresh sent one, and the same process at 10,000 due/s took "
                "87-93 µs per refresh and fell behind where it now takes 59-70 and keeps up); several "
                "processes share the rate (section 5)."
            )
            break
        if _lag_ok(run) is False:  # it kept up over the window, and lag still passed the goal at times
            lag = run["lag_ms"]
            out.append(
                f"- **Lag at {int(n):,} entries**: the process kept up over the window ({num(due)} due and "
                f"{num(run['refreshes_per_s'])} refreshed per second, CPU {num(run['cpu_util'] * 100)} %, "
                f"{num(run['cpu_us_per_refresh'])} µs per refresh), but not at every moment: lag p50 "
                f"{num(lag['50'])} ms, p90 {num(lag['90'])} ms, p99 {num(lag['99'])} ms. With its CPU below 100 % "
                "it waits: each claim round's round trip to Redis, whose core the harness shares (and, on a "
                "shared machine, other work); a round delayed there delays every entry due in it. At this "
                "rate a process has at most 100 µs per refresh, and lag stays low only with room to spare. "
                "(Entries refreshed on time send no expiry event since 1e94324; before, every refresh sent one, "
                "and the same process at 10,000 due/s took 87-93 µs per refresh and fell behind, lag p99 "
                "0.8-1.1 s, where it now takes 59-70 µs and keeps up: alternated quick runs.)"
            )
    for n, run in sorted(s7.get("lag", {}).items(), key=lambda kv: int(kv[0])):
        m = run.get("memory")
        goal = float(goals.get("overhead_bytes", 200))
        if m and m["overhead"] > goal:
            out.append(
                f"- **Memory at {int(n):,} entries**: {num(m['overhead'])} bytes per entry beyond the body, "
                f"of which the shadow key {num(m['shadow_bytes_per_entry'])} (`--no-expiry-events` leaves it "
                f"out: {num(m['overhead_without_shadow'])}). What is left is Redis's per-key cost of a string "
                "key (its dictionary entry, key object and the key name, which carries the namespace and "
                "bucket tag) and one member in each of two sorted sets (the schedule and the read times: a "
                "skiplist node and a dictionary entry each, with the entry id stored again). Reaching 200 "
                "bytes takes a different layout, e.g. entries packed into per-bucket hashes with their "
                "schedule, which gives up per-key expiry and eviction (a hash field's own TTL, HEXPIRE, needs "
                "Redis 7.4; this machine's server is 7.0) and the per-key `allkeys-*` eviction operators rely "
                "on: a product decision, not taken here."
            )
            break
    if not out:
        return []
    return ["### Why the goals not met are not met", "", *out, ""]
