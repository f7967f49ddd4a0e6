"""Section 5: refresh throughput and what it costs Redis, on one server and on a Redis Cluster, with 1 and 3
`eagercache serve` processes.

Per topology (the section's standalone redis-server; a LocalCluster of 3 primaries, no replicas, from the same
binary) and per number of serve processes P:
1. N no-op entries (fetcher `bench.fetchers:noop`, ttl 1 s, jitter 0) are written through eagercache's Store
   (as cold fetches would), each due 1 s after its write. The store settles its own bucket count: 1 on the
   standalone server, 256 on the cluster. N entries with a 1 s ttl offer N refreshes per second, far more than
   P processes on one core can do, so there is always a backlog: this measures capacity, not lag.
2. P `eagercache serve` processes (default settings: events + schedule) refresh them; after a warm-up, the
   harness takes two snapshots a window apart and reports the differences: refreshes (each process's
   `eagercache_fetches_total{outcome="ok"}` for causes schedule and event), the CPU time of every Redis node
   (INFO cpu, used_cpu_sys + used_cpu_user) and of every serve process (/proc/<pid>/stat), and per primary
   its commands (INFO commandstats calls, the harness's own INFO excluded; commands run inside scripts
   count) and INFO stats total_commands_processed.

Every process is pinned as in the other sections: the serve processes share the server core; Redis (every
node) and the harness share the other core.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis
from redis.crc import key_slot
from tests.redis_cluster import LocalCluster

from eagercache.item import build_entry, encode_data
from eagercache.store import STORED

from .capacity import open_store
from .config import Config
from .fetchers import NOOP_TTL_S
from .hitpath import eagercache_cmd
from .procs import CLOCK_TICKS, Cores, Proc, bench_env, free_port

NAMESPACE = "scale:"
FETCHER = "bench.fetchers:noop"
# Writes in flight while seeding: below the store's 64 connections per node, which redis-py's cluster client
# does not wait for (a 65th concurrent command to one node fails with MaxConnectionsError).
SEED_WRITERS = 48
IDLE_SECONDS = 2.0
BUSIEST_GOAL = 0.40
# The harness's own commands on the nodes it measures: left out of the command counts.
HARNESS_COMMANDS = ("info",)
_LABELS = re.compile(r'(\w+)="([^"]*)"')


def entry_id(i: int) -> str:
    return f"noop?i={i}"


def run_scaling(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "entries": cfg.scaling_entries,
        "ttl_s": NOOP_TTL_S,
        "processes": list(cfg.scaling_processes),
        "warmup_s": cfg.scaling_warmup_seconds,
        "window_s": cfg.scaling_window_seconds,
        "primaries": cfg.scaling_primaries,
        "busiest_goal": BUSIEST_GOAL,
        "placement": {
            "serve_core": cores.server,
            "redis_core": cores.load,
            "harness_core": cores.load,
            "cores": list(cores.available),
        },
        "topologies": {},
    }
    standalone = Nodes.standalone(redis_url)
    try:
        out["topologies"]["standalone"] = _topology(standalone, cfg, cores)
    finally:
        standalone.close()
    with LocalCluster(primaries=cfg.scaling_primaries, replicas=0) as cluster:
        nodes = Nodes.of_cluster(cluster)
        try:
            out["topologies"]["cluster"] = _topology(nodes, cfg, cores)
        finally:
            nodes.close()
    return out


@dataclass
class Nodes:
    """The Redis processes of one topology: a client per primary, and how to empty them all."""

    kind: str
    url: str
    clients: dict[int, redis.Redis]  # port -> plain client of that node
    cluster: LocalCluster | None = None

    @classmethod
    def standalone(cls, url: str) -> Nodes:
        client = redis.Redis.from_url(url)
        port = int(client.connection_pool.connection_kwargs["port"])
        return cls("standalone", url, {port: client})

    @classmethod
    def of_cluster(cls, cluster: LocalCluster) -> Nodes:
        return cls("cluster", cluster.url, {p: cluster.client(p) for p in cluster.primary_ports()}, cluster)

    def flushall(self) -> None:
        for client in self.clients.values():
            client.flushall()

    def owner(self, slot: int) -> int:
        return self.cluster.owner(slot) if self.cluster is not None else next(iter(self.clients))

    def slots(self, port: int) -> list[int]:
        return self.cluster.slots_of(port) if self.cluster is not None else []

    def server(self) -> dict[str, Any]:
        client = next(iter(self.clients.values()))
        info = client.info("server")
        return {
            "version": str(info.get("redis_version", "?")),
            "nodes": len(self.clients),
            "hz": client.config_get("hz").get("hz"),
        }

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


def _topology(nodes: Nodes, cfg: Config, cores: Cores) -> dict[str, Any]:
    nodes.flushall()
    out: dict[str, Any] = {"url": nodes.url, "server": nodes.server(), "idle": _idle(nodes), "runs": {}}
    for processes in cfg.scaling_processes:
        nodes.flushall()
        time.sleep(0.2)
        seeding = asyncio.run(seed(nodes.url, cfg.scaling_entries))
        seeding["buckets"] = _bucket_spread(nodes, seeding.pop("per_bucket"))
        run = _run(nodes, processes, cfg, cores)
        out["runs"][str(processes)] = {"seeding": seeding, **run}
    return out


def _idle(nodes: Nodes) -> dict[str, float]:
    """Redis CPU with nothing to do (cron, and on a cluster its bus), to set against the loaded figures."""
    before = {port: _node_stats(client) for port, client in nodes.clients.items()}
    started = time.monotonic()
    time.sleep(IDLE_SECONDS)
    seconds = time.monotonic() - started
    after = {port: _node_stats(client) for port, client in nodes.clients.items()}
    cpu = sum(after[p]["cpu_s"] - before[p]["cpu_s"] for p in nodes.clients)
    return {"seconds": seconds, "cpu_s": cpu, "cpu_util": cpu / seconds}


async def seed(redis_url: str, n: int) -> dict[str, Any]:
    """N entries written through eagercache's Store.write (cold, as a first read would), each due one ttl after
    its write; then the schedule's size in every bucket."""
    store = await open_store(redis_url, NAMESPACE)
    ttl_ms = int(NOOP_TTL_S * 1000)
    stored = 0
    todo = iter(range(n))

    async def writer() -> None:
        nonlocal stored
        for i in todo:
            now = store.clock.now_ms()
            value, _ = build_entry(encode_data({"i": i}, "noop"), now, now + ttl_ms)
            result = await store.write(entry_id(i), "noop", value, now + ttl_ms, mode="cold", max_entries=n)
            stored += result == STORED

    started = time.monotonic()
    try:
        await asyncio.gather(*(writer() for _ in range(SEED_WRITERS)))
        seconds = time.monotonic() - started
        buckets = store.keys.buckets
        pipe = store.client.pipeline(transaction=False)
        for bucket in buckets:
            pipe.zcard(bucket.due)
        sizes = await pipe.execute()
    finally:
        await store.aclose()
    per_bucket = [
        {"bucket": b.index, "key": b.due, "slot": key_slot(b.due.encode()), "entries": int(size)}
        for b, size in zip(buckets, sizes, strict=True)
    ]
    return {"stored": stored, "seconds": seconds, "rate": n / seconds, "per_bucket": per_bucket}


def _bucket_spread(nodes: Nodes, per_bucket: list[dict[str, Any]]) -> dict[str, Any]:
    """Entries per bucket, and per primary: its slots, buckets and entries."""
    for row in per_bucket:
        row["primary"] = nodes.owner(row["slot"])
    sizes = [row["entries"] for row in per_bucket]
    total = sum(sizes)
    primaries: dict[str, Any] = {}
    for port in nodes.clients:
        mine = [row for row in per_bucket if row["primary"] == port]
        primaries[str(port)] = {
            "slot_ranges": _ranges(nodes.slots(port)),
            "buckets": len(mine),
            "entries": sum(row["entries"] for row in mine),
            "entries_share": sum(row["entries"] for row in mine) / total if total else math.nan,
        }
    return {
        "count": len(per_bucket),
        "entries_min": min(sizes),
        "entries_max": max(sizes),
        "entries_mean": statistics.mean(sizes),
        "entries_stdev": statistics.pstdev(sizes),
        "slots_distinct": len({row["slot"] for row in per_bucket}),
        "primaries": primaries,
        "per_bucket": per_bucket,
    }


def _ranges(slots: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for slot in sorted(slots):
        if out and slot == out[-1][1] + 1:
            out[-1][1] = slot
        else:
            out.append([slot, slot])
    return out


def _run(nodes: Nodes, processes: int, cfg: Config, cores: Cores) -> dict[str, Any]:
    ports = [free_port() for _ in range(processes)]
    with _serving(nodes.url, ports, cores) as procs:
        started = time.monotonic()
        for proc, port in zip(procs, ports, strict=True):
            proc.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
        ready_s = time.monotonic() - started
        readyz = httpx.get(f"http://127.0.0.1:{ports[0]}/readyz", timeout=10).json()
        time.sleep(cfg.scaling_warmup_seconds)
        before = _snapshot(nodes, procs, ports)
        time.sleep(cfg.scaling_window_seconds)
        after = _snapshot(nodes, procs, ports)
        exits = [proc.stop(30) for proc in procs]
        errors = [proc.output()[-2000:] for proc in procs if "Traceback" in proc.output()]
    return {"ready_s": ready_s, "readyz": readyz, "exit_codes": exits, "tracebacks": errors, **_compare(before, after)}


@contextmanager
def _serving(url: str, ports: list[int], cores: Cores) -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        for i, port in enumerate(ports):
            procs.append(
                Proc(
                    f"eagercache-{i}", eagercache_cmd(port, url, NAMESPACE, FETCHER), core=cores.server, env=bench_env()
                )
            )
        yield procs
    finally:
        for proc in procs:
            proc.close()


@dataclass
class Snapshot:
    at: float
    fetches: list[dict[str, float]]  # per serve process: "cause/outcome" -> count
    proc_cpu_s: list[float]
    nodes: dict[int, dict[str, float]]
    harness_cpu_s: float
    system: dict[str, list[int]]  # /proc/stat per cpu: busy and total jiffies


def _snapshot(nodes: Nodes, procs: list[Proc], ports: list[int]) -> Snapshot:
    at = time.monotonic()
    fetches = [_fetches(port) for port in ports]
    proc_cpu = [proc.cpu_seconds() for proc in procs]
    node_stats = {port: _node_stats(client) for port, client in nodes.clients.items()}
    times = os.times()
    return Snapshot(at, fetches, proc_cpu, node_stats, times.user + times.system, _proc_stat())


def _fetches(port: int) -> dict[str, float]:
    """eagercache_fetches_total by cause and outcome, summed over fetchers, from the process's /metrics."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("eagercache_fetches_total{"):
            labels = dict(_LABELS.findall(line.split("}", 1)[0]))
            key = f"{labels.get('cause')}/{labels.get('outcome')}"
            out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _node_stats(client: redis.Redis) -> dict[str, float]:
    """CPU seconds, commands (total, and calls and µs per command as `calls:<name>`, `usec:<name>`)."""
    cpu = client.info("cpu")
    commands = client.info("commandstats")
    processed = client.info("stats")["total_commands_processed"]
    out = {
        "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        "commands": 0.0,
        "processed": float(processed),
    }
    for key, stat in commands.items():
        name = key.removeprefix("cmdstat_")
        if name.split("|")[0] in HARNESS_COMMANDS:
            continue
        out["commands"] += float(stat["calls"])
        out[f"calls:{name}"] = float(stat["calls"])
        out[f"usec:{name}"] = float(stat["usec"])
    return out


def _proc_stat() -> dict[str, list[int]]:
    """Busy and total jiffies per CPU (and `cpu`, all of them), from /proc/stat."""
    out: dict[str, list[int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu"):
            name, *values = line.split()
            ticks = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            idle = ticks[3] + ticks[4]
            out[name] = [sum(ticks) - idle, sum(ticks)]
    return out


def _compare(before: Snapshot, after: Snapshot) -> dict[str, Any]:
    seconds = after.at - before.at
    per_process: list[dict[str, Any]] = []
    for i in range(len(before.fetches)):
        delta = {k: after.fetches[i].get(k, 0.0) - before.fetches[i].get(k, 0.0) for k in after.fetches[i]}
        per_process.append(
            {
                "refreshes": delta.get("schedule/ok", 0.0) + delta.get("event/ok", 0.0),
                "by_cause": {k: v for k, v in sorted(delta.items()) if v},
                "cpu_s": after.proc_cpu_s[i] - before.proc_cpu_s[i],
            }
        )
    refreshes = sum(p["refreshes"] for p in per_process)
    failed = sum(v for p in per_process for k, v in p["by_cause"].items() if not k.endswith("/ok"))
    by_cause: dict[str, float] = {}
    for p in per_process:
        for k, v in p["by_cause"].items():
            by_cause[k] = by_cause.get(k, 0.0) + v
    serve_cpu = sum(p["cpu_s"] for p in per_process)
    node_rows: dict[str, dict[str, Any]] = {}
    by_command: dict[str, dict[str, float]] = {}
    for port in after.nodes:
        delta = {k: v - before.nodes[port].get(k, 0.0) for k, v in after.nodes[port].items()}
        for key, value in delta.items():
            kind, _, name = key.partition(":")
            if name and value:
                total = by_command.setdefault(name, {"calls": 0.0, "usec": 0.0})
                total[kind] += value
        node_rows[str(port)] = {k: v for k, v in delta.items() if ":" not in k}
    redis_cpu = sum(row["cpu_s"] for row in node_rows.values())
    commands = sum(row["commands"] for row in node_rows.values())
    processed = sum(row["processed"] for row in node_rows.values())
    for row in node_rows.values():
        row["commands_share"] = row["commands"] / commands if commands else math.nan
        row["processed_share"] = row["processed"] / processed if processed else math.nan
        row["cpu_share"] = row["cpu_s"] / redis_cpu if redis_cpu else math.nan
        row["cpu_util"] = row["cpu_s"] / seconds
    harness_cpu = after.harness_cpu_s - before.harness_cpu_s
    machine = {
        name: {
            "busy_util": (after.system[name][0] - before.system[name][0])
            / max(1, after.system[name][1] - before.system[name][1])
            * (1 if name != "cpu" else len(after.system) - 1)
        }
        for name in after.system
    }
    machine_busy_s = (after.system["cpu"][0] - before.system["cpu"][0]) / CLOCK_TICKS
    return {
        "seconds": seconds,
        "refreshes": refreshes,
        "refreshes_per_s": refreshes / seconds,
        "fetches_by_cause": by_cause,
        "fetches_failed": failed,
        "per_process": per_process,
        "serve_cpu_s": serve_cpu,
        "serve_cpu_util": serve_cpu / seconds,
        "serve_cpu_us_per_refresh": serve_cpu / refreshes * 1e6 if refreshes else math.nan,
        "redis_cpu_s": redis_cpu,
        "redis_cpu_util": redis_cpu / seconds,
        "redis_cpu_us_per_refresh": redis_cpu / refreshes * 1e6 if refreshes else math.nan,
        "commands_per_refresh": commands / refreshes if refreshes else math.nan,
        "nodes": node_rows,
        # per command, summed over the nodes: calls and µs (commandstats), and calls per refresh
        "commands": {
            name: {**stat, "per_refresh": stat["calls"] / refreshes if refreshes else math.nan}
            for name, stat in sorted(by_command.items(), key=lambda item: -item[1]["usec"])
        },
        "busiest_commands_share": max(row["commands_share"] for row in node_rows.values()),
        "busiest_processed_share": max(row["processed_share"] for row in node_rows.values()),
        "busiest_cpu_share": max(row["cpu_share"] for row in node_rows.values()),
        "harness_cpu_s": harness_cpu,
        "machine": machine,
        # CPU the machine spent on anything but the measured processes (other users' work shows up here)
        "other_cpu_util": (machine_busy_s - serve_cpu - redis_cpu - harness_cpu) / seconds,
    }
