"""Metrics on the hit path and under `--workers`: the plain-int counts of reads expose the series the labelled
prometheus children did, and one scrape of `serve --workers 2` reports the whole server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from eagercache.item import Entry
from eagercache.keys import Keys
from eagercache.metrics import Metrics

from .servers import ServeProcess

Scrape = dict[str, float]
REQUESTS = "eagercache_requests_total"
AGE_COUNT = "eagercache_served_data_age_seconds_count"
IN_FLIGHT = "eagercache_fetches_in_flight"


def _families(exposition: bytes, *names: str) -> list[str]:
    """The lines of these metric families, `_created` timestamps left out (they are the creation times)."""
    lines = []
    for line in exposition.decode().splitlines():
        if any(line.startswith((name, f"# HELP {name}", f"# TYPE {name}")) for name in names):
            lines.append(re.sub(r"^(\S+_created\{.*\}) \S+$", r"\1", line))
    return lines


def test_plain_int_counts_expose_what_the_labelled_prometheus_series_did() -> None:
    # The series as metrics.py defined them before the hot path counted in plain ints: the scrapers' contract.
    old = CollectorRegistry(auto_describe=True)
    requests = Counter(
        "eagercache_requests",
        "Reads of /data by fetcher and result (hit, stale, miss, error).",
        ["fetcher", "result"],
        registry=old,
    )
    ages = Histogram(
        "eagercache_served_data_age_seconds",
        "Age of the data in answers (now - last_retrieved).",
        ["fetcher"],
        buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
        registry=old,
    )
    metrics = Metrics()
    # Ages on bucket bounds (`le` is inclusive), between them, 0 and past the last bound; all exact in binary,
    # so that the sums agree to the last digit whatever the order of additions.
    reads = [("a", "hit", 0.0), ("a", "hit", 0.1), ("a", "stale", 0.5), ("a", "miss", 1.0), ("b", "hit", 7.5)]
    reads += [("b", "hit", 3600.0), ("b", "stale", 4000.0), ("a", "hit", 0.25), ("a", "hit", 0.125)]
    names = ("eagercache_requests", "eagercache_served_data_age_seconds")
    for round_ in range(2):  # the second round adds to what the first flushed, without counting it again
        for fetcher, result, age in reads:
            requests.labels(fetcher, result).inc()
            ages.labels(fetcher).observe(age)
            metrics.served(fetcher, result).record(age)
        for fetcher in ("a", "(unknown)"):  # errors count a request and observe no age
            requests.labels(fetcher, "error").inc()
            metrics.request_count(fetcher, "error").inc()
        assert _families(metrics.exposition(), *names) == _families(generate_latest(old), *names), round_
    assert metrics.sample(REQUESTS, fetcher="a", result="hit") == 8
    assert metrics.sample("eagercache_served_data_age_seconds_bucket", fetcher="b", le="+Inf") == 6
    assert metrics.sample("eagercache_served_data_age_seconds_sum", fetcher="b") == 2 * (7.5 + 3600 + 4000)


def _parse(text: str) -> Scrape:
    return {
        series: float(value)
        for series, value in (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    }


def _scrape(url: str) -> Scrape:
    """One /metrics scrape on a new connection (whichever worker accepts it), as {series: value}."""
    return _parse(httpx.get(f"{url}/metrics", timeout=5).text)


def _read_files(directory: Path) -> Scrape:
    """What the workers' multiprocess files hold, merged here: no worker's scrape flushed anything for it."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return _parse(generate_latest(registry).decode())


def _total(scrape: Scrape, name: str) -> float:
    return sum(value for series, value in scrape.items() if series == name or series.startswith(f"{name}{{"))


def _await_scrape(
    url: str | Callable[[], Scrape], condition: Callable[[Scrape], bool], seen: list[Scrape], timeout: float = 5.0
) -> Scrape:
    """Scrape (or call `url`) until `condition` holds; every scrape is kept in `seen` for the caller's invariants."""
    deadline = time.monotonic() + timeout
    while True:
        scrape = _scrape(url) if isinstance(url, str) else url()
        seen.append(scrape)
        if condition(scrape):
            return scrape
        if time.monotonic() > deadline:
            raise AssertionError(f"no scrape met the condition in {timeout} s; the last: {scrape}")
        time.sleep(0.05)  # another process's state: there is no event to await


def _read_until_both_workers_served(url: str, first_key: int = 0, at_least: int = 20) -> tuple[int, set[str]]:
    """Cold reads of new keys, each on a new connection so that the kernel picks the worker, until both
    workers have answered some: `counted` answers with the pid of the process that fetched, the reader's."""
    pids: set[str] = set()
    reads = 0
    deadline = time.monotonic() + 10
    while (len(pids) < 2 or reads < at_least) and time.monotonic() < deadline:
        answer = httpx.get(f"{url}/data/counted?k={first_key + reads}", timeout=5)
        assert answer.status_code == 200, answer.text
        pids.add(answer.json()["data"]["pid"])
        reads += 1
    return reads, pids


def _children(process: ServeProcess) -> set[str]:
    pid = process.process.pid
    return set(Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


@pytest.fixture
def workers(redis_url: str, redis_sync: redis.Redis, tmp_path: Path) -> Iterator[ServeProcess]:
    """`serve --workers 2`, its temporary files (the metrics directory among them) under tmp_path. `counted`
    with an hour's ttl: no refresh runs during a test, so the fetches in flight are the tests' own."""
    env = {"FLEET_REDIS_URL": redis_url, "TMPDIR": str(tmp_path)}
    fetchers = ("--fetchers", "tests.fleet:counted", "--fetchers", "tests.fleet:held")
    config = tmp_path / "eagercache.toml"
    config.write_text("[fetcher.counted]\nttl = 3600\n")
    server = ServeProcess("--redis-url", redis_url, *fetchers, "--workers", "2", "--config", str(config), env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.close()


def test_one_scrape_reports_the_reads_of_every_worker(workers: ServeProcess, tmp_path: Path) -> None:
    (directory,) = tmp_path.glob("eagercache-metrics-*")  # made by the parent before the workers started
    reads, pids = _read_until_both_workers_served(workers.url)
    assert len(pids) == 2, pids  # both workers answered reads: the sum below adds two processes' counts
    assert pids <= _children(workers)
    seen: list[Scrape] = []
    # Before any scrape: each worker's background flush alone brings its counts to its files within a second.
    files = _await_scrape(lambda: _read_files(directory), lambda s: _total(s, REQUESTS) == reads, seen)
    assert files[f'{AGE_COUNT}{{fetcher="counted"}}'] == reads
    assert all(_total(s, REQUESTS) <= reads for s in seen)
    for _ in range(6):  # so every scrape, whichever worker answers it, reports all of them
        scrape = _scrape(workers.url)
        assert _total(scrape, REQUESTS) == reads
        assert scrape[f'{REQUESTS}{{fetcher="counted",result="miss"}}'] == reads  # each key read once, cold
        assert scrape[f'{AGE_COUNT}{{fetcher="counted"}}'] == reads
    # Gauges merged by their multiprocess mode, none per process (a `pid` label is the default "all" mode).
    assert not [series for series in scrape if "pid=" in series]
    assert 0 <= scrape[IN_FLIGHT] <= 2
    assert scrape["eagercache_background_loops_down"] == 0
    assert scrape["eagercache_expiry_subscription_up"] == 1
    assert scrape['eagercache_store_topology{buckets="1",topology="standalone"}'] == 1  # not 1 per worker
    assert scrape['eagercache_refresh_mode{mode="events+schedule"}'] == 1
    assert 0 <= scrape.get('eagercache_entries{fetcher="counted"}', 0) <= reads
    assert workers.terminate() == 0
    assert not directory.exists()  # removed at exit


@pytest.mark.fault
def test_a_killed_worker_neither_rewinds_counters_nor_stays_in_live_gauges(
    workers: ServeProcess, redis_sync: redis.Redis
) -> None:
    reads, _ = _read_until_both_workers_served(workers.url)
    _await_scrape(workers.url, lambda s: _total(s, REQUESTS) == reads, [])
    seen: list[Scrape] = []  # every scrape from here on: none may count fewer reads

    def read_held() -> None:
        with contextlib.suppress(httpx.HTTPError):  # its worker is killed under it
            httpx.get(f"{workers.url}/data/held?k=x", timeout=30)

    reader = threading.Thread(target=read_held)
    reader.start()
    deadline = time.monotonic() + 5
    while not (held_by := redis_sync.lrange("fleet:held", 0, -1)):
        assert time.monotonic() < deadline, "the held fetch did not start"
        time.sleep(0.05)
    victim = int(held_by[0])
    _await_scrape(workers.url, lambda s: s[IN_FLIGHT] == 1, seen)  # whichever worker answers sees it
    os.kill(victim, signal.SIGKILL)
    reader.join(10)
    # uvicorn reaps the dead worker and starts another; the dead one's fetch leaves the in-flight sum.
    after = _await_scrape(workers.url, lambda s: s[IN_FLIGHT] == 0, seen, timeout=10)
    assert _total(after, REQUESTS) == reads
    more, pids = _read_until_both_workers_served(workers.url, first_key=reads, at_least=10)
    assert len(pids) == 2 and str(victim) not in pids, pids  # uvicorn started a worker in the dead one's place
    _await_scrape(workers.url, lambda s: _total(s, REQUESTS) == reads + more, seen)
    assert all(_total(s, REQUESTS) >= reads for s in seen)  # never back: the dead worker's counts stay
    assert all(s[IN_FLIGHT] <= 1 for s in seen)


STALE_OVERDUE = "eagercache_stale_overdue_seconds"


def _per_process(directory: Path, name: str) -> dict[int, float]:
    """One gauge's value in each process's file (what the scrape merges by the gauge's multiprocess mode)."""
    found: dict[int, float] = {}
    for path in directory.glob("gauge_*.db"):
        values = MmapedDict.read_all_values_from_file(str(path))  # type: ignore[no-untyped-call]
        for key, value, _, _ in values:
            if json.loads(key)[0] == name:
                found[int(path.stem.rsplit("_", 1)[1])] = value
    return found


def test_stale_overdue_is_the_most_overdue_worker_not_the_sum(
    redis_url: str, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    env = {"FLEET_REDIS_URL": redis_url, "TMPDIR": str(tmp_path)}
    server = ServeProcess(
        "--redis-url", redis_url, "--fetchers", "tests.failing_fleet:failing", "--workers", "2", env=env
    )
    try:
        server.wait_ready()
        (directory,) = tmp_path.glob("eagercache-metrics-*")
        assert httpx.get(f"{server.url}/data/failing", timeout=5).status_code == 200
        redis_sync.set("fleet:failing", 1)
        deadline = time.monotonic() + 15
        while len(values := _per_process(directory, STALE_OVERDUE)) < 2 or not all(values.values()):
            # Stale reads on new connections (the kernel picks the worker) until both workers have served one
            # and flushed it (every second).
            assert time.monotonic() < deadline, values
            httpx.get(f"{server.url}/data/failing", timeout=5)
            time.sleep(0.05)  # another process's state: no event to await
        # No more reads: each worker's value stays (it is the max of the last minute), once flushed.
        seen: list[Scrape] = []
        scrape = _await_scrape(
            server.url,
            lambda s: (
                s[f'{STALE_OVERDUE}{{fetcher="failing"}}'] == max(_per_process(directory, STALE_OVERDUE).values())
            ),
            seen,
        )
        values = _per_process(directory, STALE_OVERDUE)
        raw = redis_sync.get(Keys().item("failing?"))
        assert isinstance(raw, bytes)
        seconds, micros = redis_sync.time()
        overdue = (seconds * 1000 + micros // 1000 - Entry.parse(raw).due_ms) / 1000
        merged = scrape[f'{STALE_OVERDUE}{{fetcher="failing"}}']
        assert not [series for series in scrape if series.startswith(STALE_OVERDUE) and "pid=" in series]
        # The most overdue read of any worker, within the entry's overdue time now; not the workers' sum.
        assert len(values) == 2 and 0 < merged == max(values.values()) < sum(values.values())
        assert merged <= overdue
        assert server.terminate() == 0
    finally:
        server.close()


def test_a_killed_servers_metrics_directory_is_removed_by_the_next_start(redis_url: str, tmp_path: Path) -> None:
    """A server killed with SIGKILL cannot remove its metrics directory; the next start on the machine
    removes the directories of servers no longer running, and leaves those of servers still running."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names a server that is no longer running
    orphaned = tmp_path / f"eagercache-metrics-{gone.pid}-x1"
    alive = tmp_path / f"eagercache-metrics-{os.getpid()}-x2"  # this process runs: as another live server
    for directory in (orphaned, alive):
        directory.mkdir()
        (directory / "counter_1.db").write_bytes(b"\0" * 64)
    server = ServeProcess(
        "--redis-url", redis_url, "--fetchers", "tests.fleet:counted", "--workers", "2", env={"TMPDIR": str(tmp_path)}
    )
    try:
        server.wait_ready()
        own = {p.name for p in tmp_path.glob("eagercache-metrics-*")} - {alive.name}
        assert not orphaned.exists()
        assert (alive / "counter_1.db").exists()
        assert len(own) == 1 and own.pop().startswith(f"eagercache-metrics-{server.process.pid}-")
    finally:
        server.close()
