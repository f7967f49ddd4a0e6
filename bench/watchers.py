"""Section 8: watchers. Many `GET /watch/...` streams on one `eagercache serve` process, the changes they get
written by another process through the same Redis (issue 11's figures).

Two serve processes share the section's redis-server and namespace, both serving `bench.watch_fetchers:tick`
(a new version on every fetch, tagged with the writer's role):

- the **refresher** (load core) refreshes every entry each ttl (set per run), as any replica would;
- the **watched** process (server core) holds the streams and only relays what arrives through Redis. It is
  started on the empty store with `--no-expiry-events --backstop-interval 60`, so it claims nothing at start-up
  (there is nothing yet) and nothing for the next 60 s, and a run ends before then; every version says who
  wrote it, and the figures count any version the watched process wrote itself and judge only the others.

Per run (N watchers over E entries, watcher j on entry j % E): the refresher fills the E entries (cold reads),
the watched process serves each once over /data and one stream is opened and closed (so lazily built state
is not counted per watcher), then its RSS is read. Client processes (bench/watch_client.py, raw asyncio
sockets, on the load core) open the N streams, 64 connecting at a time, and report once each stream has its
snapshot. After a second to settle, RSS again: memory per watcher = (RSS with the streams - RSS before) / N.
Then a window in which the refresher brings a new version of every entry each ttl; a version counts
when its write time (`last_modified`, the refresh's clock reading before the write) falls in the window.
Delivery lag = receive time (taken once per socket read, before parsing) - write time, on the same clock. Per
version, the lag of its last watcher (the slowest) is the figure of the goal: p99 <= 100 ms. A watcher that
did not get a version it should have (by the end of the window plus a grace period) counts as missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import select
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import httpx
import redis

from .capacity import percentiles
from .config import Config
from .engine import Samples, cpu_s, histogram_quantile, scrape, total
from .hitpath import eagercache_cmd, summarize_profile
from .procs import BIN, ROOT, Cores, Proc, bench_env, free_port, pinned, pyspy_record
from .watch_client import raise_open_files
from .watch_fetchers import JITTER_ENV, NAME, ROLE_ENV, TTL_ENV

FETCHER_SPEC = "bench.watch_fetchers:tick"
GOAL_P99_MS = 100.0
# The watched process claims in every bucket at start-up and then every BACKSTOP_S: a run must end before that.
BACKSTOP_S = 60.0
RUN_BUDGET_S = BACKSTOP_S - 5.0
SETTLE_S = 1.0
GRACE_S = 2.0  # after the window: deliveries of its last versions still on their way
FILL_CONNECTIONS = 32
CONNECT_TIMEOUT_S = 40.0  # the streams must be open with time left for the window before the backstop
RSS_EVERY_S = 0.5
MAX_WATCHERS_FLAG = "--max-watchers"
CHANNEL = "watch"  # the change channel is `<namespace>watch` (eagercache/changes.py)
# BENCH_WATCH_PROFILE=1: py-spy samples the watched process over each run's window (off by default: py-spy
# shares the load core with the clients and would add to their lag).
PROFILE_ENV = "BENCH_WATCH_PROFILE"
PROFILE_RATE_HZ = 200
# The watched process logs its full (generation-2) garbage collections there (bench/gcprobe/sitecustomize.py).
GC_PROBE = ROOT / "bench" / "gcprobe"
GC_LOG_ENV = "BENCH_GC_LOG"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def server_figures(before: Samples, after: Samples) -> dict[str, Any]:
    """What the watched process says of the window in its /metrics: events sent by kind, slow clients, open
    streams, and its own delivery lag (write to event sent, a histogram: Prometheus's estimate)."""
    buckets: dict[float, float] = {}
    for sign, samples in ((-1, before), (1, after)):
        for name, labels, value in samples:
            if name == "eagercache_watch_delivery_lag_seconds_bucket":
                buckets[float(labels["le"])] = buckets.get(float(labels["le"]), 0.0) + sign * value
    cumulative = sorted(buckets.items())
    return {
        "events": {
            kind: total(after, "eagercache_watch_events_total", event=kind)
            - total(before, "eagercache_watch_events_total", event=kind)
            for kind in ("snapshot", "patch", "status")
        },
        "slow_clients": {
            action: total(after, "eagercache_watch_slow_clients_total", action=action)
            - total(before, "eagercache_watch_slow_clients_total", action=action)
            for action in ("snapshot", "disconnect")
        },
        "watchers": total(after, "eagercache_watchers"),
        "lag_ms": {f"{q * 100:g}": histogram_quantile(cumulative, q) for q in (0.5, 0.99)},
        "lag_observations": cumulative[-1][1] if cumulative else 0.0,
    }


def core_times(core: int | None) -> dict[str, float]:
    """The core's time so far by kind (/proc/stat: user, system, softirq, idle...), in seconds."""
    if core is None:
        return {}
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    hz = os.sysconf("SC_CLK_TCK")
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields[0] == f"cpu{core}":
            return {name: int(value) / hz for name, value in zip(names, fields[1:], strict=False)}
    return {}


def full_collections(log: Path, start_ms: float, end_ms: float) -> dict[str, Any]:
    """The watched process's full garbage collections (bench/gcprobe): how many before the window (start-up,
    the streams opening) and each one in it (seconds into the window, pause ms, objects collected)."""
    if not log.exists():
        return {"error": "no log (the probe did not load)"}
    pauses = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    before = [p for p in pauses if p["start_ms"] < start_ms]
    return {
        "before_window": len(before),
        # the last one before the window: how long before it began, and its pause (with every stream open?)
        "last_before": {"s": round((start_ms - before[-1]["start_ms"]) / 1000, 1), "ms": round(before[-1]["ms"], 1)}
        if before
        else None,
        "in_window": [
            {"at_s": round((p["start_ms"] - start_ms) / 1000, 2), "ms": round(p["ms"], 1), "collected": p["collected"]}
            for p in pauses
            if start_ms <= p["start_ms"] < end_ms
        ],
    }


def serves_flag(flag: str) -> bool:
    """Whether this eagercache's `serve` has the flag (the watch options arrived with issue 11)."""
    text = subprocess.run([str(BIN / "eagercache"), "serve", "--help"], capture_output=True, text=True).stdout
    return flag in text


async def _fill(url: str, entries: int) -> dict[str, int]:
    """GET /data of every entry once, FILL_CONNECTIONS at a time; status counts."""
    todo = iter(range(entries))
    statuses: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:

        async def worker() -> None:
            for i in todo:
                answer = await http.get(f"/data/{NAME}?id={i}")
                statuses[str(answer.status_code)] = statuses.get(str(answer.status_code), 0) + 1

        await asyncio.gather(*(worker() for _ in range(FILL_CONNECTIONS)))
    return statuses


def _open_one(url: str) -> None:
    """One stream opened and closed: whatever the first watcher builds lazily is not counted per watcher."""
    with httpx.Client(base_url=url, timeout=10) as http, http.stream("GET", f"/watch/{NAME}?id=0") as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if line.startswith("data:"):
                return


def run_watchers(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    open_files = raise_open_files()  # the serve processes inherit it: a socket per stream
    out: dict[str, Any] = {
        "goal_p99_ms": GOAL_P99_MS,
        "window_s": cfg.watch_window_seconds,
        "clients": cfg.watch_clients,
        "open_files_limit": open_files,
        "max_watchers_flag": serves_flag(MAX_WATCHERS_FLAG),
        "runs": {},
    }
    for number, (watchers, entries, ttl_s) in enumerate(cfg.watch_runs):
        name = f"{watchers}x{entries}"
        print(f"bench: section 8 {watchers:,} watchers over {entries:,} entries ...", flush=True)
        try:
            out["runs"][name] = _run(cfg, cores, redis_url, workdir, (watchers, entries, ttl_s), number, out)
        except Exception as exc:  # one run failing leaves the other's figures
            out["runs"][name] = {
                "watchers": watchers,
                "entries": entries,
                "ttl_s": ttl_s,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
            print(f"bench: section 8 {name} failed: {exc}", flush=True)
    out["floor"] = write_floor(max(w for w, _, _ in cfg.watch_runs), cores)
    # ... and with as many reader processes as the runs have clients (their readers wake up as theirs do)
    out["floor_readers"] = write_floor(max(w for w, _, _ in cfg.watch_runs), cores, cfg.watch_clients)
    return out


def write_floor(count: int, cores: Cores, readers: int = 1) -> dict[str, Any]:
    """bench/watch_floor.py: one bare socket write to each of `count` loopback connections, no server (the
    least a version's fan-out can take here), read by `readers` processes; its error if it failed."""
    cmd = [str(BIN / "python"), "-m", "bench.watch_floor", "--count", str(count), "--readers", str(readers)]
    if cores.load is not None:
        cmd += ["--reader-core", str(cores.load)]
    done = subprocess.run(pinned(cmd, cores.server), cwd=ROOT, env=bench_env(), capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    floor: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    floor["median_round_ms"] = sorted(floor["round_ms"])[len(floor["round_ms"]) // 2]
    floor["median_cpu_us_per_write"] = sorted(floor["cpu_us_per_write"])[len(floor["cpu_us_per_write"]) // 2]
    return floor


def _serve(
    role: str,
    port: int,
    redis_url: str,
    namespace: str,
    core: int | None,
    ttl_s: float,
    extra: list[str],
    gc_log: Path | None = None,
) -> Proc:
    env = bench_env(**{ROLE_ENV: role, TTL_ENV: repr(ttl_s), JITTER_ENV: "0"})
    if gc_log is not None:
        env.update({"PYTHONPATH": os.pathsep.join((str(GC_PROBE), env["PYTHONPATH"])), GC_LOG_ENV: str(gc_log)})
    return Proc(role, [*eagercache_cmd(port, redis_url, namespace, FETCHER_SPEC), *extra], core=core, env=env)


def _run(
    cfg: Config,
    cores: Cores,
    redis_url: str,
    workdir: Path,
    shape: tuple[int, int, float],
    number: int,
    section: dict[str, Any],
) -> dict[str, Any]:
    watchers, entries, ttl_s = shape
    namespace = f"watch{number}:"
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    client.close()
    run: dict[str, Any] = {"watchers": watchers, "entries": entries, "ttl_s": ttl_s, "per_entry": watchers // entries}
    watched_port, refresher_port = free_port(), free_port()
    extra = ["--no-expiry-events", "--backstop-interval", str(BACKSTOP_S)]
    if section["max_watchers_flag"]:
        extra += [MAX_WATCHERS_FLAG, str(watchers * 2)]
    procs: list[Proc] = []
    clients: list[WatchClient] = []
    announcements: Announcements | None = None
    gc_log = workdir / f"{namespace.rstrip(':')}-gc.jsonl"
    try:
        watched = _serve("watched", watched_port, redis_url, namespace, cores.server, ttl_s, extra, gc_log)
        procs.append(watched)
        watched.wait_http(f"http://127.0.0.1:{watched_port}/readyz", timeout=60)
        started = time.monotonic()  # its start-up claim round is behind it: the budget runs from here
        refresher = _serve("refresher", refresher_port, redis_url, namespace, cores.load, ttl_s, [])
        procs.append(refresher)
        refresher.wait_http(f"http://127.0.0.1:{refresher_port}/readyz", timeout=60)
        watched_url = f"http://127.0.0.1:{watched_port}"
        run["fill"] = asyncio.run(_fill(f"http://127.0.0.1:{refresher_port}", entries))
        run["warm"] = asyncio.run(_fill(watched_url, entries))
        _open_one(watched_url)
        time.sleep(SETTLE_S)
        rss_before = rss_bytes(watched.pid)

        # The streams, from client processes on the load core.
        t0 = time.monotonic()
        bounds = [watchers * c // cfg.watch_clients for c in range(cfg.watch_clients + 1)]
        for c in range(cfg.watch_clients):
            out = workdir / f"{namespace.rstrip(':')}-client-{c}.json"
            cmd = [str(BIN / "python"), "-m", "bench.watch_client", "--port", str(watched_port)]
            cmd += ["--entries", str(entries), "--first", str(bounds[c]), "--count", str(bounds[c + 1] - bounds[c])]
            clients.append(WatchClient(f"watch client {c}", [*cmd, "--out", str(out)], cores.load, out))
        connected = [proc.connected(CONNECT_TIMEOUT_S) for proc in clients]
        run["connect_s"] = time.monotonic() - t0
        run["streams"] = sum(ok for ok, _ in connected)
        run["connect_failed"] = sum(failed for _, failed in connected)
        time.sleep(SETTLE_S)
        rss_connected = rss_bytes(watched.pid)

        # The window: as long as configured, or what the budget leaves before the backstop claim.
        window_s = min(cfg.watch_window_seconds, RUN_BUDGET_S - GRACE_S - (time.monotonic() - started))
        if window_s < 3:
            raise RuntimeError(f"connecting took {run['connect_s']:.0f} s: no time left before the backstop")
        announcements = Announcements(redis_url, f"{namespace}{CHANNEL}")
        metrics_before = scrape(watched_port)
        cpu_before = {"watched": cpu_s(watched.pid), "refresher": cpu_s(refresher.pid)}
        core_before = core_times(cores.server)
        window_start_ms = time.time() * 1000
        spy = _profiler(watched.pid, window_s, workdir / f"{namespace.rstrip(':')}-profile.txt", cores)
        rss_samples = []
        deadline = time.monotonic() + window_s
        while time.monotonic() < deadline:
            rss_samples.append(rss_bytes(watched.pid))
            time.sleep(RSS_EVERY_S)  # sampling another process: nothing to await
        window_end_ms = time.time() * 1000
        cpu_window = {"watched": cpu_s(watched.pid), "refresher": cpu_s(refresher.pid)}
        core_window = core_times(cores.server)
        if spy is not None:
            run["profile"] = _profile(spy, workdir / f"{namespace.rstrip(':')}-profile.txt")
        time.sleep(GRACE_S)
        run["budget_used_s"] = time.monotonic() - started
        metrics_after = scrape(watched_port)
        run["watched_fetches"] = total(metrics_after, "eagercache_fetches_total")  # since it started
        reports = [proc.stop() for proc in clients]
        announcements.close()
        run["window_s"] = (window_end_ms - window_start_ms) / 1000
        run["memory"] = {
            "rss_before": rss_before,
            "rss_connected": rss_connected,
            "rss_window_max": max(rss_samples, default=math.nan),
            "per_watcher_bytes": (rss_connected - rss_before) / max(1, run["streams"]),
            "per_watcher_window_max_bytes": (max(rss_samples, default=math.nan) - rss_before) / max(1, run["streams"]),
        }
        run["cpu_s"] = {k: cpu_window[k] - cpu_before[k] for k in cpu_before}
        # The server core over the window, whoever used it: the watched process's CPU is part of user + system;
        # the kernel's network work for its sockets may be counted as softirq; the rest is other processes.
        run["server_core_s"] = {k: round(core_window[k] - core_before[k], 2) for k in core_before}
        run["gc_full"] = full_collections(gc_log, window_start_ms, window_end_ms)
        run["server"] = server_figures(metrics_before, metrics_after)
        run.update(_analyze(reports, window_start_ms, window_end_ms, watchers // entries, announcements.heard))
        delivered = run["deliveries"]
        run["watched_cpu_us_per_delivery"] = run["cpu_s"]["watched"] * 1e6 / delivered if delivered else math.nan
        run["clients"] = [{k: v for k, v in r.items() if k != "changes"} for r in reports]
        run["logs"] = {p.name: p.output()[-2000:] for p in procs if "Traceback" in p.output()}
    finally:
        if announcements is not None:
            announcements.close()
        for client_proc in clients:
            client_proc.close()
        for proc in procs:
            proc.close()
    return run


def _profiler(pid: int, seconds: float, raw: Path, cores: Cores) -> Proc | None:
    """py-spy on the watched process for the window, when asked for (PROFILE_ENV) and installed."""
    if os.environ.get(PROFILE_ENV) != "1":
        return None
    cmd = pyspy_record(pid, seconds, raw, PROFILE_RATE_HZ)
    return None if cmd is None else Proc("py-spy", cmd, core=cores.load, env=bench_env())


def _profile(spy: Proc, raw: Path) -> dict[str, Any]:
    try:
        spy.process.wait(30)
        output = spy.output()
    finally:
        spy.close()
    if not raw.exists():
        return {"error": f"py-spy wrote no profile: {output[-2000:]}"}
    summary = summarize_profile(raw.read_text())
    summary["rate_hz"] = PROFILE_RATE_HZ
    return summary


class Announcements:
    """A plain subscriber to the namespace's change channel (the one the serve processes share), in a thread of
    the harness: when each new version's announcement reached a subscriber, to split the lag in two."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.heard: dict[str, float] = {}  # ETag (no quotes) -> ms since the epoch, its first announcement
        self._client = redis.Redis.from_url(redis_url)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(channel)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="announcements", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            message = self._pubsub.get_message(timeout=0.1)
            if message is None:
                continue
            now_ms = time.time() * 1000
            for line in message["data"].split(b"\n"):
                change, etag, _ = line.split(b" ", 2)
                if change == b"data":
                    self.heard.setdefault(etag.decode(), now_ms)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(5)
        self._pubsub.close()
        self._client.close()


class WatchClient:
    """A bench/watch_client.py process on the load core: it says on stdout when its streams are open, and
    writes its results when told on stdin."""

    def __init__(self, name: str, cmd: list[str], core: int | None, out: Path) -> None:
        self.name = name
        self.out = out
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            pinned(cmd, core),
            env=bench_env(),
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )

    def errors(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-3000:]

    def connected(self, timeout: float) -> tuple[int, int]:
        """(streams open, streams that failed), once the client says so."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.process.stdout], [], [], left)[0]:
                continue
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} exited: {self.errors()}")
            if line.startswith("CONNECTED "):
                ok, failed = line.split()[1:3]
                return int(ok), int(failed)
        raise TimeoutError(f"{self.name}: streams not open after {timeout} s")

    def stop(self) -> dict[str, Any]:
        """Its results, once it has written them."""
        assert self.process.stdin is not None
        self.process.stdin.write("STOP\n")
        self.process.stdin.flush()
        self.process.wait(60)
        if not self.out.exists():
            raise RuntimeError(f"{self.name} wrote no results: {self.errors()}")
        report: dict[str, Any] = json.loads(self.out.read_text())
        return report

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()


def _analyze(
    reports: list[dict[str, Any]], start_ms: float, end_ms: float, per_entry: int, heard: dict[str, float]
) -> dict[str, Any]:
    """Versions written in the window: who wrote them, their deliveries' lags, their first and last watcher's
    lag, and when their announcement reached a subscriber of the channel."""
    changes: dict[str, list[Any]] = {}  # key -> [write ms, by, lags, snapshots]
    for report in reports:
        for key, (write_ms, by, lags, snapshots) in report["changes"].items():
            change = changes.setdefault(key, [write_ms, by, [], 0])
            change[2].extend(lags)
            change[3] += snapshots
    in_window = {k: c for k, c in changes.items() if start_ms <= c[0] < end_ms}
    by_writer: dict[str, int] = {}
    for c in in_window.values():
        by_writer[c[1]] = by_writer.get(c[1], 0) + 1
    judged = {k: c for k, c in in_window.items() if c[1] == "refresher"}
    lags = [lag for c in judged.values() for lag in c[2]]
    # Versions whose first watcher waited past the goal, by the second of the window they were written in: a
    # few seconds holding most of them is a stall of the watched process, not a steady lack of CPU.
    late: dict[int, int] = {}
    for c in judged.values():
        if min(c[2], default=0.0) > GOAL_P99_MS:
            second = int((c[0] - start_ms) // 1000)
            late[second] = late.get(second, 0) + 1
    announced = []  # write -> the announcement heard by the harness's subscriber
    for key, c in judged.items():
        etag = key.split(" ", 1)[1].strip('"')
        if etag in heard:
            announced.append(heard[etag] - c[0])
    return {
        "versions": len(in_window),
        "versions_by_writer": by_writer,
        "versions_judged": len(judged),
        "deliveries": len(lags),
        "deliveries_expected": len(judged) * per_entry,
        "missed": sum(max(0, per_entry - len(c[2])) for c in judged.values()),
        "snapshots_instead_of_patches": sum(c[3] for c in judged.values()),
        "lag_ms": percentiles(lags, (50, 90, 99, 99.9)),
        "first_watcher_lag_ms": percentiles([min(c[2]) for c in judged.values()], (50, 90, 99)),
        "last_watcher_lag_ms": percentiles([max(c[2]) for c in judged.values()], (50, 90, 99)),
        "announced_ms": percentiles(announced, (50, 90, 99)),
        "late_first_by_second": {str(k): v for k, v in sorted(late.items())},
        "versions_per_s": len(judged) / ((end_ms - start_ms) / 1000),
    }
