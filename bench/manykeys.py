"""Section 6: warm hits spread over many entries, on both server stacks, against the simplest app that could serve them.

Section 1 reads one entry: it always comes from eagercache's near cache (process memory, 0.25 s), so it says
nothing about a read that has to go to the store. Here `GET /data/item?id=N` (fetcher `bench.fetchers:item`,
a ~230-byte body, never due during the run) is read over many warm entries:

1. redis:// with 100,000 entries, seeded through eagercache's own `Store.write` (as a first request's fetch
   would write them; in one process per core, before any server starts), then read by wrk with ids
   (a) uniformly at random over all of them and (b) Zipf-distributed (s = 1: the id of rank k is read with
   probability proportional to 1/k; ranks are a seeded shuffle of the ids). Baseline: a plain Starlette app
   (bench/redis_get_app.py) doing one redis.asyncio GET per request of a key holding the same body, sent with
   the same headers. Goals (issues 15, 16): uniform >= 0.9x the baseline's req/s with p99 <= 1.3x; Zipf >= 1.5x
   (a read a process answers from memory should beat any read that asks Redis).
2. memory:// (eagercache's in-process store) with its entries filled by HTTP cold fills, read uniformly and
   as one key, against the same app answering from a Python dict of the same bodies (no Redis at all).
   Goal: uniform >= 0.9x the dict app's req/s, p99 <= 1.3x.

Both stacks (fast = uvloop + httptools, plain = asyncio + h11; every app of a stack runs on it) in the same
run, in alternating rounds (the order of workloads, stacks and systems changes every round), 32 keep-alive
connections from one wrk thread on the load core, every server on the server core. wrk walks a precomputed
sequence of ids (seeded RNG, written to a file) from a random start: per request, one table lookup. Which
answers were hits comes from eagercache's own /metrics (`eagercache_requests_total`) before and after.
py-spy samples eagercache on the fast stack under the uniform redis:// load.

    python -m bench.manykeys seed --redis-url URL --start 0 --stop 50000   # one seeding process (internal)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aredis

from eagercache.item import build_entry, encode_data

from .capacity import open_store
from .config import Config
from .fetchers import item_data
from .hitpath import PROFILE_STACK, STACKS, profile_during, ratios, stack_args, with_cpu
from .loadgen import LoadResult, read_reply, request_bytes, run_load
from .procs import BIN, Cores, Proc, bench_env, free_port

NAMESPACE = "many:"
BASELINE_PREFIX = "rg:"  # rg:<id> holds <ETag>\n<body>, the body eagercache stores for item?id=<id>
FETCHER = "item"
FETCHER_SPEC = "bench.fetchers:item"
PATH_PREFIX = "/data/item?id="
DUE_IN_MS = 3_600_000  # seeded entries are not due during the run
MAX_ENTRIES = 1_000_000  # bench.fetchers.item's
SEED_BATCH = 512
SEED_CONNECTIONS = 32
VERIFY_SAMPLE = 200
RNG_SEED = 20261125
# Headers that differ per answer or per entry, or that Starlette sets itself: the baselines get the rest.
PER_ANSWER_HEADERS = {"date", "content-length", "server", "etag"}
GOALS = {
    "redis_uniform": {"rps_ratio": 0.9, "p99_ratio": 1.3},
    "redis_zipf": {"rps_ratio": 1.5},
    "memory_uniform": {"rps_ratio": 0.9, "p99_ratio": 1.3},
}
# phase -> workloads; each workload is read from eagercache and from the phase's baseline.
PHASES: dict[str, dict[str, Any]] = {
    "redis": {"baseline": "redis_get", "workloads": ("uniform", "zipf")},
    "memory": {"baseline": "dict", "workloads": ("uniform", "one_key")},
}

# wrk: the ids file is read once per thread (init); a request is one table lookup, and the request string
# of an id is formatted once and kept.
_LUA_REQUEST = """
local ids = {}
local count = 0
local n = 0
local requests = {}
init = function(args)
  for line in io.lines(args[1]) do
    count = count + 1
    ids[count] = line
  end
  math.randomseed(tonumber(args[2]))
  n = math.random(count) - 1
end
request = function()
  n = n + 1
  if n > count then n = 1 end
  local id = ids[n]
  local r = requests[id]
  if r == nil then
    r = wrk.format("GET", "%(prefix)s" .. id)
    requests[id] = r
  end
  return r
end
"""


# -- request sequences -------------------------------------------------------------------------------------------


def uniform_ids(n: int, samples: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(n) for _ in range(samples)]


def zipf_ids(n: int, samples: int, s: float, seed: int) -> tuple[list[int], list[int]]:
    """`samples` ids drawn with P(rank k) ~ 1/k^s over n ids; the ids by rank are a seeded shuffle. Returns
    (ids drawn, ids by rank)."""
    rng = random.Random(seed)
    by_rank = list(range(n))
    rng.shuffle(by_rank)
    cum = list(itertools.accumulate(1 / k**s for k in range(1, n + 1)))
    ranks = rng.choices(range(n), cum_weights=cum, k=samples)
    return [by_rank[r] for r in ranks], by_rank


def zipf_shares(n: int, s: float, tops: Sequence[int] = (1, 10, 100, 1_000, 10_000)) -> dict[str, float]:
    """Share of requests that go to the `top` most read ids, for each top."""
    weights = [1 / k**s for k in range(1, n + 1)]
    total = sum(weights)
    cum = list(itertools.accumulate(weights))
    return {str(top): cum[min(top, n) - 1] / total for top in tops}


def write_ids(path: Path, ids: Sequence[int]) -> Path:
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


class Workload:
    """What wrk reads: a file of ids walked from a random start, or one path."""

    def __init__(self, name: str, ids_file: Path | None, paths: list[str]) -> None:
        self.name = name
        self.ids_file = ids_file
        self.paths = paths  # the Python load generator's fallback (and the single path of one_key)

    def run(self, url: str, seconds: float, connections: int, core: int | None, seed: int) -> LoadResult:
        if self.ids_file is None:
            return run_load(url, self.paths, duration_s=seconds, connections=connections, core=core)
        return run_load(
            url,
            self.paths,
            duration_s=seconds,
            connections=connections,
            core=core,
            lua_request=_LUA_REQUEST % {"prefix": PATH_PREFIX},
            lua_args=[str(self.ids_file), str(seed)],
        )


def _workload(name: str, ids: list[int], workdir: Path, tag: str) -> Workload:
    return Workload(
        name, write_ids(workdir / f"many-{tag}-{name}.ids", ids), [f"{PATH_PREFIX}{i}" for i in ids[:20_000]]
    )


# -- seeding -------------------------------------------------------------------------------------------------------


async def seed_range(redis_url: str, start: int, stop: int) -> dict[str, Any]:
    """Write entries start..stop-1 through eagercache's Store.write, and the baseline's keys with the same bytes."""
    store = await open_store(redis_url, NAMESPACE)
    baseline = aredis.Redis.from_url(redis_url)
    now_ms = store.clock.now_ms
    results: dict[int, int] = {}
    started = time.monotonic()

    async def one(i: int) -> tuple[int, bytes]:
        now = now_ms()
        value, _ = build_entry(encode_data(item_data(i), FETCHER), now, now + DUE_IN_MS)
        results[i] = await store.write(
            f"{FETCHER}?id={i}", FETCHER, value, now + DUE_IN_MS, mode="cold", max_entries=MAX_ENTRIES
        )
        head, _, body = value.partition(b"\n")
        return i, b'"' + head.split(b" ", 1)[0] + b'"\n' + body

    try:
        for batch in range(start, stop, SEED_BATCH):
            written = await asyncio.gather(*(one(i) for i in range(batch, min(stop, batch + SEED_BATCH))))
            async with baseline.pipeline(transaction=False) as pipe:
                for i, value in written:
                    pipe.set(f"{BASELINE_PREFIX}{i}", value)
                await pipe.execute()
    finally:
        await store.aclose()
        await baseline.aclose()
    outcomes: dict[str, int] = {}
    for outcome in results.values():
        outcomes[str(outcome)] = outcomes.get(str(outcome), 0) + 1
    return {"entries": stop - start, "seconds": time.monotonic() - started, "outcomes": outcomes}


def seed_store(redis_url: str, n: int, cores: Cores) -> dict[str, Any]:
    """Seed n entries with one process per usable core (Store.write is a script call and a round trip each:
    the client's CPU time is the limit), before any server starts."""
    started = time.monotonic()
    workers = max(1, len(cores.available))
    bounds = [n * w // workers for w in range(workers + 1)]
    procs = [
        Proc(
            f"seed {w}",
            [
                str(BIN / "python"),
                "-m",
                "bench.manykeys",
                "seed",
                "--redis-url",
                redis_url,
                "--start",
                str(bounds[w]),
                "--stop",
                str(bounds[w + 1]),
            ],
            core=cores.available[w % len(cores.available)] if cores.server is not None else None,
            env=bench_env(),
        )
        for w in range(workers)
    ]
    outcomes: dict[str, int] = {}
    try:
        for proc in procs:
            if proc.process.wait(600) != 0:
                raise RuntimeError(f"seeding failed: {proc.output()[-3000:]}")
            line = next(ln for ln in proc.output().splitlines() if ln.startswith("SEEDED "))
            for outcome, count in json.loads(line.removeprefix("SEEDED "))["outcomes"].items():
                outcomes[outcome] = outcomes.get(outcome, 0) + count
    finally:
        for proc in procs:
            proc.close()
    seconds = time.monotonic() - started
    return {"entries": n, "processes": workers, "seconds": seconds, "rate": n / seconds, "outcomes": outcomes}


async def _http_fill(url: str, ids: Sequence[int], connections: int) -> dict[str, Any]:
    """GET every id once (cold fills), `connections` at a time; counts the X-Cache of the answers."""
    host, _, port = url.split("://", 1)[1].partition(":")
    todo = iter(ids)
    caches: dict[str, int] = {}
    errors: list[str] = []

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in todo:
                writer.write(request_bytes(host, int(port), f"{PATH_PREFIX}{i}"))
                reply = await read_reply(reader)
                if reply.status != 200 and len(errors) < 5:
                    errors.append(f"{reply.status} {reply.body[:200]!r}")
                cache = reply.headers.get("x-cache", "?") if reply.status == 200 else str(reply.status)
                caches[cache] = caches.get(cache, 0) + 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(connections)))
    seconds = time.monotonic() - started
    return {"entries": len(ids), "seconds": seconds, "rate": len(ids) / seconds, "x_cache": caches, "errors": errors}


async def _http_fill_all(urls: dict[str, str], n: int) -> dict[str, dict[str, Any]]:
    order = list(range(n))
    random.Random(RNG_SEED).shuffle(order)
    results = await asyncio.gather(*(_http_fill(url, order, SEED_CONNECTIONS) for url in urls.values()))
    return dict(zip(urls, results, strict=True))


# -- servers -----------------------------------------------------------------------------------------------------


@contextmanager
def servers(specs: dict[str, tuple[list[str], int, str, int | None]]) -> Iterator[dict[str, Proc]]:
    """name -> (command, port, ready path, core): started together, stopped together."""
    procs: dict[str, Proc] = {}
    try:
        for name, (cmd, _, _, core) in specs.items():
            procs[name] = Proc(name, cmd, core=core, env=bench_env())
        for name, (_, port, ready, _) in specs.items():
            procs[name].wait_http(f"http://127.0.0.1:{port}{ready}", timeout=60)
        yield procs
    finally:
        for proc in procs.values():
            proc.close()


def _eagercache(store_url: str, stack: str, port: int) -> list[str]:
    return [
        str(BIN / "eagercache"),
        "serve",
        "--port",
        str(port),
        "--redis-url",
        store_url,
        "--namespace",
        NAMESPACE,
        "--fetchers",
        FETCHER_SPEC,
        "--log-level",
        "WARNING",
        *stack_args(stack),
    ]


def _baseline(redis_url: str, stack: str, port: int, headers_file: Path, dict_of: int | None) -> list[str]:
    cmd = [
        str(BIN / "python"),
        "-m",
        "bench.redis_get_app",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
        "--prefix",
        BASELINE_PREFIX,
        "--headers",
        str(headers_file),
        *stack_args(stack),
    ]
    return [*cmd, "--dict", "--count", str(dict_of)] if dict_of is not None else cmd


def pin(proc: Proc, core: int | None) -> None:
    """Move every thread of a running server to `core` (its start-up core was another, to seed in parallel)."""
    if core is None:
        return
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {core})


_METRIC = re.compile(r"^eagercache_requests_total\{([^}]*)\} (\S+)$", re.MULTILINE)


def request_counts(url: str) -> dict[str, float]:
    """eagercache_requests_total of fetcher item, by result (hit, stale, miss, error)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for labels, value in _METRIC.findall(text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("fetcher") == FETCHER:
            out[found.get("result", "?")] = out.get(found.get("result", "?"), 0.0) + float(value)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(set(after) | set(before))}


def verify(urls: dict[str, str], ids: Sequence[int], redis_url: str) -> dict[str, Any]:
    """A sample of ids on every server: 200, X-Cache HIT on eagercache, the baseline's body for that id on
    redis:// (the same bytes were seeded), the same size and data on memory:// (fetched at another time)."""
    client = redis.Redis.from_url(redis_url)
    out: dict[str, Any] = {}
    try:
        expected = dict(zip(ids, client.mget([f"{BASELINE_PREFIX}{i}" for i in ids]), strict=True))
        for name, url in urls.items():
            caches: dict[str, int] = {}
            same_body = same_size = 0
            with httpx.Client(base_url=url, timeout=10) as http:
                for i in ids:
                    answer = http.get(f"{PATH_PREFIX}{i}")
                    cache = (
                        answer.headers.get("x-cache", "none") if answer.status_code == 200 else str(answer.status_code)
                    )
                    caches[cache] = caches.get(cache, 0) + 1
                    value = expected[i]
                    body = value.partition(b"\n")[2] if isinstance(value, bytes) else b""
                    same_body += answer.content == body
                    same_size += len(answer.content) == len(body)
            out[name] = {"sample": len(ids), "x_cache": caches, "same_body": same_body, "same_size": same_size}
    finally:
        client.close()
    return out


def capture_headers(url: str, i: int, path: Path) -> tuple[dict[str, str], int]:
    """The headers eagercache sends with a hit, less those that differ per answer or per entry; the body's size."""
    answer = httpx.get(f"{url}{PATH_PREFIX}{i}", timeout=10)
    if answer.status_code != 200 or answer.headers.get("x-cache") != "HIT":
        raise RuntimeError(f"no warm hit for id {i}: {answer.status_code} {answer.headers}")
    headers = {k: v for k, v in answer.headers.items() if k not in PER_ANSWER_HEADERS}
    path.write_text(json.dumps(headers))
    return headers, len(answer.content)


# -- the section -------------------------------------------------------------------------------------------------


def run_many_keys(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    if cfg.many_memory_keys > cfg.many_keys:
        raise ValueError("many_memory_keys must not exceed many_keys (the dict app reads the seeded bodies)")
    n, n_mem = cfg.many_keys, cfg.many_memory_keys
    zipf, by_rank = zipf_ids(n, cfg.many_samples, cfg.many_zipf_s, RNG_SEED)
    workloads = {
        "redis": {
            "uniform": _workload("uniform", uniform_ids(n, cfg.many_samples, RNG_SEED + 1), workdir, "redis"),
            "zipf": _workload("zipf", zipf, workdir, "redis"),
        },
        "memory": {
            "uniform": _workload("uniform", uniform_ids(n_mem, cfg.many_samples, RNG_SEED + 2), workdir, "memory"),
            "one_key": Workload("one_key", None, [f"{PATH_PREFIX}{by_rank[0] % n_mem}"]),
        },
    }
    out: dict[str, Any] = {
        "keys": n,
        "memory_keys": n_mem,
        "samples": cfg.many_samples,
        "zipf_s": cfg.many_zipf_s,
        "zipf_top_shares": zipf_shares(n, cfg.many_zipf_s),
        "zipf_distinct_in_sample": len(set(zipf)),
        "zipf_hottest_id": by_rank[0],
        "connections": cfg.many_connections,
        "seconds": cfg.many_seconds,
        "rounds_per_phase": cfg.many_rounds,
        "stacks": {name: {"loop": loop, "http": http} for name, (loop, http) in STACKS.items()},
        "goals": GOALS,
    }
    out["seed_redis"] = seed_store(redis_url, n, cores)
    out["redis"] = _redis_phase(cfg, cores, redis_url, workdir, workloads["redis"])
    out["response_bytes"] = out["redis"]["response_bytes"]
    out["memory"] = _memory_phase(cfg, cores, redis_url, workdir, workloads["memory"])
    return out


def _measure(
    cfg: Config,
    cores: Cores,
    urls: dict[str, dict[str, str]],
    procs: dict[str, Proc],
    workloads: dict[str, Workload],
    baseline: str,
) -> dict[str, Any]:
    """Warm-up (the first workload, on every server), then rounds: every workload on every stack on eagercache
    and the baseline, the orders alternating. `procs` are the servers by name, `<system> (<stack>)`."""
    first = next(iter(workloads.values()))
    for systems in urls.values():
        for url in systems.values():
            first.run(url, cfg.many_warmup_seconds, cfg.many_connections, cores.load, seed=0)
    before = {stack: request_counts(systems["eagercache"]) for stack, systems in urls.items()}
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {w: {s: [] for s in urls} for w in workloads}
    for r in range(cfg.many_rounds):
        names = list(workloads) if r % 2 == 0 else list(reversed(workloads))
        for w, name in enumerate(names):
            stacks = list(urls) if (r + w) % 2 == 0 else list(reversed(urls))
            for s, stack in enumerate(stacks):
                order = ["eagercache", baseline] if (r + w + s) % 2 == 0 else [baseline, "eagercache"]
                row: dict[str, Any] = {"order": order}
                for system in order:
                    load = partial(
                        workloads[name].run,
                        urls[stack][system],
                        cfg.many_seconds,
                        cfg.many_connections,
                        cores.load,
                        seed=r + 1,
                    )
                    row[system] = with_cpu(procs[f"{system} ({stack})"], load)
                rounds[name][stack].append(row)
    after = {stack: request_counts(systems["eagercache"]) for stack, systems in urls.items()}
    return {
        "rounds": rounds,
        "ratios": {
            name: {stack: ratios(rows, "eagercache", baseline) for stack, rows in by_stack.items()}
            for name, by_stack in rounds.items()
        },
        "eagercache_requests": {stack: _delta(after[stack], before[stack]) for stack in urls},
    }


def _redis_phase(
    cfg: Config, cores: Cores, redis_url: str, workdir: Path, workloads: dict[str, Workload]
) -> dict[str, Any]:
    ports = {(stack, system): free_port() for stack in STACKS for system in ("eagercache", "redis_get")}
    headers_file = workdir / "many-headers.json"
    ec_specs = {
        f"eagercache ({stack})": (
            _eagercache(redis_url, stack, ports[stack, "eagercache"]),
            ports[stack, "eagercache"],
            "/readyz",
            cores.server,
        )
        for stack in STACKS
    }
    sample = random.Random(RNG_SEED + 3).sample(range(cfg.many_keys), min(VERIFY_SAMPLE, cfg.many_keys))
    with servers(ec_specs) as ec_procs:
        first = f"http://127.0.0.1:{ports[PROFILE_STACK, 'eagercache']}"
        headers, response_bytes = capture_headers(first, sample[0], headers_file)
        rg_specs = {
            f"redis_get ({stack})": (
                _baseline(redis_url, stack, ports[stack, "redis_get"], headers_file, None),
                ports[stack, "redis_get"],
                "/healthz",
                cores.server,
            )
            for stack in STACKS
        }
        with servers(rg_specs) as rg_procs:
            urls = {
                stack: {system: f"http://127.0.0.1:{ports[stack, system]}" for system in ("eagercache", "redis_get")}
                for stack in STACKS
            }
            checked = verify(
                {f"{system} ({stack})": u for stack, s in urls.items() for system, u in s.items()}, sample, redis_url
            )
            measured = _measure(cfg, cores, urls, {**ec_procs, **rg_procs}, workloads, "redis_get")
            cpu = {name: proc.cpu_seconds() for name, proc in {**ec_procs, **rg_procs}.items()}
            uniform = workloads["uniform"]
            profile = profile_during(
                ec_procs[f"eagercache ({PROFILE_STACK})"].pid,
                cfg.profile_seconds,
                workdir / "many-profile.txt",
                cores,
                bench_env(),
                lambda seconds: uniform.run(
                    urls[PROFILE_STACK]["eagercache"], seconds, cfg.many_connections, cores.load, seed=99
                ),
            )
    return {
        "headers": headers,
        "response_bytes": response_bytes,
        "verify": checked,
        **measured,
        "server_cpu_seconds": cpu,
        "profile": profile,
    }


def _memory_phase(
    cfg: Config, cores: Cores, redis_url: str, workdir: Path, workloads: dict[str, Workload]
) -> dict[str, Any]:
    ports = {(stack, system): free_port() for stack in STACKS for system in ("eagercache", "dict")}
    headers_file = workdir / "many-headers-memory.json"
    # Seeded by HTTP cold fills, one server per core at once; pinned to the server core before any measurement.
    spare: list[int | None] = [c for c in cores.available if c != cores.server] or [cores.server]
    seed_cores = {stack: (cores.server if i == 0 else spare[0]) for i, stack in enumerate(STACKS)}
    ec_specs = {
        f"eagercache ({stack})": (
            _eagercache("memory://", stack, ports[stack, "eagercache"]),
            ports[stack, "eagercache"],
            "/readyz",
            seed_cores[stack],
        )
        for stack in STACKS
    }
    sample = random.Random(RNG_SEED + 4).sample(range(cfg.many_memory_keys), min(VERIFY_SAMPLE, cfg.many_memory_keys))
    with servers(ec_specs) as ec_procs:
        ec_urls = {stack: f"http://127.0.0.1:{ports[stack, 'eagercache']}" for stack in STACKS}
        filled = asyncio.run(_http_fill_all(ec_urls, cfg.many_memory_keys))
        for proc in ec_procs.values():
            pin(proc, cores.server)
        headers, response_bytes = capture_headers(ec_urls[PROFILE_STACK], sample[0], headers_file)
        dict_specs = {
            f"dict ({stack})": (
                _baseline(redis_url, stack, ports[stack, "dict"], headers_file, cfg.many_memory_keys),
                ports[stack, "dict"],
                "/healthz",
                cores.server,
            )
            for stack in STACKS
        }
        with servers(dict_specs) as dict_procs:
            urls = {
                stack: {system: f"http://127.0.0.1:{ports[stack, system]}" for system in ("eagercache", "dict")}
                for stack in STACKS
            }
            checked = verify(
                {f"{system} ({stack})": u for stack, s in urls.items() for system, u in s.items()}, sample, redis_url
            )
            measured = _measure(cfg, cores, urls, {**ec_procs, **dict_procs}, workloads, "dict")
            cpu = {name: proc.cpu_seconds() for name, proc in {**ec_procs, **dict_procs}.items()}
    return {
        "seed_http": filled,
        "headers": headers,
        "response_bytes": response_bytes,
        "verify": checked,
        **measured,
        "server_cpu_seconds": cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.manykeys")
    sub = parser.add_subparsers(dest="command", required=True)
    seed = sub.add_parser("seed", help="write entries start..stop-1 and their baseline keys (one seeding process)")
    seed.add_argument("--redis-url", required=True)
    seed.add_argument("--start", type=int, required=True)
    seed.add_argument("--stop", type=int, required=True)
    args = parser.parse_args(argv)
    result = asyncio.run(seed_range(args.redis_url, args.start, args.stop))
    print("SEEDED " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
