"""Section 8 of docs/benchmarks.md: watchers on one serve process, the versions written by another
(bench/watchers.py), its chart and its goal.

Kept apart from report.py, which imports it inside `write_report` (it imports report.py's helpers).
"""

from __future__ import annotations

import math
from pathlib import Path

from .report import Doc, _failed, _pyplot, num, table, verdict

CHART = "bench-watchers.png"
QS = ("50", "90", "99", "99.9", "max")


def _name(run: Doc) -> str:
    entries = run["entries"]
    where = "on one entry" if entries == 1 else f"over {entries:,} entries"
    return f"{run['watchers']:,} {where}, a version each {run.get('ttl_s', math.nan):g} s"


def chart_watchers(s8: Doc, path: Path) -> bool:
    """Delivery lag percentiles per run, every watcher's and each version's last watcher's."""
    plt = _pyplot()
    runs = [r for r in s8.get("runs", {}).values() if "lag_ms" in r]
    if plt is None or not runs:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        ax.plot(QS, [run["lag_ms"][q] for q in QS], marker="o", label=f"{_name(run)}: every delivery")
        last_qs = [q for q in QS if q in run["last_watcher_lag_ms"]]
        ax.plot(
            last_qs,
            [run["last_watcher_lag_ms"][q] for q in last_qs],
            marker="x",
            linestyle="--",
            label=f"{_name(run)}: last watcher of each version",
        )
    ax.axhline(s8["goal_p99_ms"], color="red", linestyle=":", label=f"goal p99 {s8['goal_p99_ms']:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("ms from the write (log scale)")
    ax.set_title("Delivery lag to watchers on another serve process")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _kib(value: float) -> str:
    return num(value / 1024, 1)


def _qs(figures: Doc, qs: tuple[str, ...] = ("50", "99", "max")) -> str:
    return " / ".join(num(figures.get(q, math.nan), 1) for q in qs)


def _row(run: Doc) -> list[str]:
    memory = run["memory"]
    clients = run.get("clients", [])
    return [
        _name(run),
        f"{run['streams']:,}" + (f" ({run['connect_failed']:,} failed)" if run["connect_failed"] else ""),
        num(run["connect_s"], 1),
        f"{_kib(memory['per_watcher_bytes'])} ({_kib(memory['per_watcher_window_max_bytes'])})",
        num(run["versions_per_s"], 1),
        f"{run['deliveries']:,} / {run['deliveries_expected']:,}",
        _qs(run.get("announced_ms", {})),
        _qs(run.get("first_watcher_lag_ms", {})),
        _qs(run["last_watcher_lag_ms"]),
        _qs(run["lag_ms"]),
        num(run["watched_cpu_us_per_delivery"], 1),
        num(run["cpu_s"]["watched"] / run["window_s"] * 100) + " %",
        num(sum(c["cpu_s"] for c in clients)),
    ]


def _floor_line(floor: Doc) -> str:
    """One floor measurement (bench/watch_floor.py) in words: its rounds, time and CPU per write."""
    readers = floor.get("readers", 1)
    text = (
        f"one {floor['bytes']}-byte write to each of {floor['count']:,} loopback connections (uvloop, the server "
        f"core; {'a reader process' if readers == 1 else f'{readers} reader processes'} on the load core) takes "
        f"{num(floor['median_round_ms'], 1)} ms (median of {len(floor['round_ms'])} rounds: "
        + ", ".join(num(ms, 1) for ms in floor["round_ms"])
        + f" ms), {num(floor['median_round_ms'] * 1000 / floor['count'], 1)} µs a write(2)"
    )
    if "median_cpu_us_per_write" in floor:
        text += f", {num(floor['median_cpu_us_per_write'], 1)} µs of it the process's own CPU"
    return text


def _causes(runs: dict[str, Doc], goal: float, floor: Doc | None, floor_readers: Doc | None = None) -> list[str]:
    """Where the lag of each run that missed the goal went, from its own figures: Redis's pub/sub hop, the
    watched process before its first send, and the fan-out from the first watcher to the last; the machine's
    floor (bench/watch_floor.py) and the watched process's profile when the run has them."""
    lines = ["**Where the lag goes, from this run's figures** (p99 of each part over the versions):", ""]
    if floor and "error" not in floor:
        lines += [
            f"- This machine's floor, with no server at all (`bench/watch_floor.py`): {_floor_line(floor)}: the "
            "least one version's fan-out to that many watchers can take in one process here."
            + (
                f" The same read by {floor_readers['readers']} processes, as many as the runs' clients: "
                f"{num(floor_readers['median_round_ms'], 1)} ms, "
                f"{num(floor_readers['median_round_ms'] * 1000 / floor_readers['count'], 1)} µs a write(2), "
                f"{num(floor_readers.get('median_cpu_us_per_write', math.nan), 1)} µs of it the process's CPU."
                if floor_readers and "error" not in floor_readers and "readers" in floor_readers
                else ""
            ),
        ]
    for run in runs.values():
        last = run.get("last_watcher_lag_ms", {})
        if "error" in run or not last.get("99", math.nan) > goal:
            continue
        announced = run.get("announced_ms", {}).get("99", math.nan)
        first = run.get("first_watcher_lag_ms", {}).get("99", math.nan)
        fanout_cpu_ms = run["watched_cpu_us_per_delivery"] * run["per_entry"] / 1000
        late = run.get("late_first_by_second", {})
        late_text = (
            f" Versions whose first watcher waited more than {goal:g} ms: {sum(late.values()):,}, written in "
            f"{len(late)} of the window's {math.ceil(run['window_s'])} seconds (second: versions — "
            + ", ".join(f"{k}: {v}" for k, v in late.items())
            + ")."
            if late
            else ""
        )
        lines.append(
            f"- {_name(run)}: the announcement reached a subscriber {num(announced, 1)} ms after the write; the "
            f"first watcher had the version {num(first, 1)} ms after it (so {num(first - announced, 1)} ms in "
            f"the watched process: the re-read from Redis, the diff, the wake-up of its streams); the last "
            f"{num(last['99'], 1)} ms after it. At the {num(run['watched_cpu_us_per_delivery'], 1)} µs of the "
            f"watched process's CPU per delivery in this run, one version's {run['per_entry']:,} watchers take "
            f"{num(fanout_cpu_ms, 1)} ms of its one core to send; the clients share the load core with the "
            "refresher and Redis, so part of the spread is their own reading." + late_text
        )
        profile = run.get("profile")
        if profile and profile.get("self"):
            top = "; ".join(f"{name} {share * 100:.1f} %" for name, share in profile["self"][:6])
            lines.append(f"  The watched process's profile over the window (py-spy, own time): {top}.")
    return [*lines, ""]


def _cause(run: Doc, ok: bool | None, floor: Doc | None) -> str:
    """For the summary table, why a run missed the goal, in one clause: the fan-out of its versions (CPU per
    delivery times watchers per version, against a bare write's), or the seconds its late versions fell in."""
    if ok is not False:
        return ""
    per_delivery = run["watched_cpu_us_per_delivery"]
    text = (
        f". Cause: the fan-out, {num(per_delivery, 1)} µs of the watched process's CPU per delivery x "
        f"{run['per_entry']:,} watchers = {num(per_delivery * run['per_entry'] / 1000, 1)} ms a version"
    )
    core = run.get("server_core_s")
    if core and run["deliveries"]:
        softirq_us = core["softirq"] * 1e6 / run["deliveries"]
        text += f"; its core's softirq time (network work, any process's) {num(softirq_us, 1)} µs a delivery"
    if floor and "error" not in floor:
        bare_us = floor["median_round_ms"] * 1000 / floor["count"]
        cpu = f", {num(floor['median_cpu_us_per_write'], 1)} µs of it CPU" if "median_cpu_us_per_write" in floor else ""
        text += f" (a bare write(2) to a loopback socket here: {num(bare_us, 1)} µs{cpu}, bench/watch_floor.py)"
    late = run.get("late_first_by_second", {})
    if late:
        text += f"; versions late at once in {len(late)} second(s) of the window (a stall of the watched process)"
    return text


def _core_line(run: Doc) -> list[str]:
    """Who had the server core over the window (/proc/stat), against the watched process's own CPU."""
    core = run.get("server_core_s")
    if not core:
        return []
    busy = core["user"] + core["nice"] + core["system"] + core["irq"] + core["softirq"]
    return [
        f"  The server core over the window: busy {num(busy, 1)} s (user {num(core['user'] + core['nice'], 1)}, "
        f"system {num(core['system'], 1)}, softirq {num(core['softirq'], 1)}), idle {num(core['idle'], 1)} s; "
        f"the watched process's own CPU {num(run['cpu_s']['watched'], 1)} s (busy time beyond it: other "
        "processes on the core, and interrupts)."
    ]


def _gc_line(gc_full: Doc | None) -> list[str]:
    """The watched process's full garbage collections (bench/gcprobe), when the run recorded them."""
    if not gc_full or "error" in gc_full:
        return []
    pauses = gc_full["in_window"]
    each = ", ".join(f"at {num(p['at_s'], 1)} s {num(p['ms'], 1)} ms" for p in pauses) or "none"
    last = gc_full.get("last_before")
    last_text = f", the last {num(last['s'], 1)} s before it, {num(last['ms'], 1)} ms long" if last else ""
    return [
        f"  Full (generation-2) garbage collections of the watched process (`bench/gcprobe`): "
        f"{gc_full['before_window']} before the window (start-up, streams opening{last_text}), {len(pauses)} in "
        f"it ({each})."
    ]


def section_watchers(s8: Doc, docs: Path, targets: list[list[str]]) -> str:
    title = "## 8. Watchers: streams on one process, versions written by another"
    failed = _failed(s8)
    if failed:
        targets.append(["8. watchers: last-watcher lag p99 ≤ 100 ms", "section failed", verdict(False)])
        return f"{title}\n\n{failed}"
    goal = s8["goal_p99_ms"]
    runs: dict[str, Doc] = s8["runs"]
    parts = [
        title,
        "",
        "Issue 11's figures. Two `eagercache serve` processes share the section's redis-server and namespace, "
        "both with the fetcher `bench.watch_fetchers:tick` (a new version on every fetch, tagged with its "
        "writer). The **refresher** (load core) refreshes every entry each ttl (per run: the first column); "
        "the **watched** process (server core) holds the streams and only relays what reaches "
        "it through Redis: started on the empty store with `--no-expiry-events --backstop-interval 60`, it claims "
        "nothing to refresh before a run is over (checked below: the versions each process wrote). "
        f"{s8['clients']} client processes (`bench/watch_client.py`: raw asyncio sockets on uvloop, the load core, "
        "shared with the refresher and Redis) open the streams, watcher j on entry j mod E. Memory per watcher: "
        "the watched process's RSS with every stream open, less its RSS before (after /data of every entry and "
        "one stream opened and closed), / streams; in brackets the same with the window's highest RSS. "
        f"Then a window of {s8['window_s']:g} s: a version counts when its write time (`last_modified`) falls in "
        "it. Lag = receive time (once per socket read, before parsing) - write time, one machine clock. "
        "Per version: 'announced' = when its announcement on the change channel (`<namespace>watch`) reached a "
        "plain subscriber in the harness; 'first watcher' = the lag of its fastest watcher (the change reached "
        "the watched process and went out); 'last watcher' = the lag of its slowest, the goal's figure (last - "
        "first is the fan-out).",
        "",
    ]
    rows, verdicts = [], []
    for name, run in runs.items():
        if "error" in run:
            parts += [f"**Run {name} failed:** `{run['error']}`", "", "```", run.get("traceback", ""), "```", ""]
            targets.append(
                [f"8. watchers, {_name(run)}: last-watcher lag p99 ≤ {goal:g} ms", "run failed", verdict(False)]
            )
            continue
        rows.append(_row(run))
        p99 = run["last_watcher_lag_ms"]["99"]
        ok = None if math.isnan(p99) else p99 <= goal and run["missed"] == 0
        verdicts.append(ok)
        targets.append(
            [
                f"8. watchers, {_name(run)}, on another process than the writer: last-watcher lag p99 ≤ {goal:g} ms",
                f"{num(p99, 1)} ms over {run['versions_judged']:,} versions; every delivery p99 "
                f"{num(run['lag_ms']['99'], 1)} ms; {run['missed']:,} missed; "
                f"{_kib(run['memory']['per_watcher_bytes'])} KiB RSS per watcher" + _cause(run, ok, s8.get("floor")),
                verdict(ok),
            ]
        )
    parts += [
        table(
            [
                "watchers",
                "streams",
                "connect s",
                "KiB RSS per watcher (window max)",
                "versions/s",
                "deliveries / expected",
                "announced ms p50 / p99 / max",
                "first watcher ms p50 / p99 / max",
                "last watcher ms p50 / p99 / max",
                "every delivery ms p50 / p99 / max",
                "watched CPU µs per delivery",
                "watched CPU",
                "clients CPU s (whole run)",
            ],
            rows,
        ),
        "",
    ]
    if chart_watchers(s8, docs / CHART):
        parts += [f"![watchers]({CHART})", ""]
    for run in runs.values():
        if "error" in run:
            continue
        writers = ", ".join(f"{by} {count:,}" for by, count in run["versions_by_writer"].items()) or "none"
        events = {k: sum(c.get(k, 0) for c in run.get("clients", [])) for k in ("patches", "snapshots", "status")}
        closed = sum(c.get("closed", 0) for c in run.get("clients", []))
        parts.append(
            f"- {_name(run)}: versions written in the window by {writers}; fetches the watched process ran "
            f"{num(run['watched_fetches'])}; events after the first snapshot: {events['patches']:,} patches, "
            f"{events['snapshots']:,} snapshots, {events['status']:,} status; streams the server closed "
            f"{closed:,}; window {num(run['window_s'], 1)} s, {num(run['budget_used_s'])} s of the "
            f"{num(60)} s before the watched process's next claim round."
        )
        server = run.get("server")
        if server:
            sent = ", ".join(f"{num(v)} {k}" for k, v in server["events"].items())
            slow = ", ".join(f"{num(v)} {k}" for k, v in server["slow_clients"].items())
            parts.append(
                f"  The watched process's own /metrics over the window: events sent {sent}; slow clients {slow}; "
                f"its delivery lag (write to event sent, `eagercache_watch_delivery_lag_seconds`) p50 "
                f"{num(server['lag_ms']['50'], 1)} ms, p99 {num(server['lag_ms']['99'], 1)} ms."
            )
        parts += _gc_line(run.get("gc_full"))
        parts += _core_line(run)
    parts.append("")
    if any(ok is False for ok in verdicts):
        parts += _causes(runs, goal, s8.get("floor"), s8.get("floor_readers"))
    if "elapsed_s" in s8:
        parts += [f"Time taken by this section: {s8['elapsed_s']:.0f} s.", ""]
    return "\n".join(parts)
