"""Where a memory:// serve process's latency tail comes from: garbage collections and event-loop stalls (issue 17).

    python -m bench.gcstalls --entries 100000 --rounds 3 --seconds 6   # under flock /tmp/bench.lock

Starts `eagercache serve --redis-url memory://` (fast stack, server core) through `serve`, which records every
collection with gc.callbacks (generation, duration) and runs a heartbeat on the event loop; a thread samples
the main thread's stack while the heartbeat is older than --stall-ms. Fills --entries by HTTP cold fills, then
alternates rounds of uniform reads (wrk) between it and the dict app (bench/redis_get_app.py --dict, bodies
of the same size made up, no Redis). After each eagercache round the server writes what it saw (SIGUSR1):
collections per generation, stalls and their stacks, tracked objects and their types. GC_PROBE_OFF=1 turns
the collector off in the server (gc.disable where start-up would freeze), to compare the tail without it.
GC_PROBE_SAVEALL=1 keeps what each collection finds unreachable and reports its types (where cycles come
from); each dump also lists the large containers each generation holds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STACK_DEPTH = 8


class _Probe:
    """Inside the served process: collections and loop stalls since the last dump."""

    def __init__(self, out: Path, stall_ms: float) -> None:
        self.out = out
        self.stall_ms = stall_ms
        self.collections: list[tuple[int, float]] = []  # (generation, seconds)
        self.stalls: list[float] = []  # ms
        self.stacks: collections.Counter[str] = collections.Counter()
        self._started = 0.0
        self._beat = time.perf_counter()
        self._main = threading.main_thread().ident
        self.tasks: set[asyncio.Task[None]] = set()

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.collections.append((info["generation"], time.perf_counter() - self._started))

    async def heartbeat(self) -> None:
        while True:
            self._beat = time.perf_counter()
            await asyncio.sleep(0.001)

    def watch(self) -> None:
        worst = 0.0
        while True:
            time.sleep(0.001)
            age_ms = (time.perf_counter() - self._beat) * 1e3
            if age_ms <= self.stall_ms:
                if worst:
                    self.stalls.append(worst)
                worst = 0.0
                continue
            worst = max(worst, age_ms)
            frame = sys._current_frames().get(self._main or 0)
            if frame is not None:
                summary = traceback.extract_stack(frame)[-STACK_DEPTH:]
                self.stacks[" < ".join(f"{Path(f.filename).name}:{f.name}" for f in reversed(summary))] += 1

    def dump(self, *_: object) -> None:
        objects = gc.get_objects()
        by_gen: dict[int, list[float]] = {}
        for generation, seconds in self.collections:
            by_gen.setdefault(generation, []).append(seconds * 1e3)
        record = {
            "tracked": len(objects),
            "types": collections.Counter(type(o).__qualname__ for o in objects).most_common(12),
            "collections": {g: {"n": len(ms), "total_ms": sum(ms), "max_ms": max(ms)} for g, ms in by_gen.items()},
            "stalls_ms": sorted(self.stalls)[-10:],
            "stall_stacks": self.stacks.most_common(8),
            "per_generation": [len(gc.get_objects(generation)) for generation in range(3)],
            "big_containers": _big_containers(),
            "cyclic_garbage": collections.Counter(type(o).__qualname__ for o in gc.garbage).most_common(20),
        }
        gc.garbage.clear()
        del objects
        with self.out.open("a") as out:
            out.write(json.dumps(record) + "\n")
        self.collections.clear()
        self.stalls.clear()
        self.stacks.clear()


def _big_containers(at_least: int = 1000) -> list[tuple[int, str, int]]:
    """(generation, type, length) of the tracked containers a collection of their generation walks entry by entry."""
    found = []
    for generation in range(3):
        for obj in gc.get_objects(generation):
            try:
                length = len(obj)
            except TypeError:
                continue
            if length >= at_least:
                found.append((generation, type(obj).__qualname__, length))
    return sorted(found, key=lambda row: -row[2])[:20]


def serve(argv: list[str]) -> int:
    """`eagercache serve argv...` with the probe installed."""
    import uvicorn

    from eagercache.cli import main

    probe = _Probe(Path(os.environ["GC_PROBE_OUT"]), float(os.environ.get("GC_PROBE_STALL_MS", "12")))
    gc.callbacks.append(probe.on_gc)
    signal.signal(signal.SIGUSR1, probe.dump)
    if os.environ.get("GC_PROBE_SAVEALL"):
        gc.set_debug(gc.DEBUG_SAVEALL)  # keep what collections find, to tell where the cycles come from
    if os.environ.get("GC_PROBE_OFF"):
        gc.freeze = gc.disable  # the CLI freezes start-up objects: disable instead
    original = uvicorn.Server.serve

    async def serve_probed(self: uvicorn.Server, *args: Any, **kwargs: Any) -> None:
        probe.tasks.add(asyncio.get_running_loop().create_task(probe.heartbeat()))  # referenced: runs until exit
        threading.Thread(target=probe.watch, daemon=True).start()
        await original(self, *args, **kwargs)

    uvicorn.Server.serve = serve_probed  # type: ignore[method-assign]
    return main(argv)


def run(entries: int, rounds: int, seconds: float, stall_ms: float, out: Path) -> None:
    from . import manykeys as mk
    from .hitpath import stack_args
    from .procs import BIN, Proc, bench_env, free_port

    out.unlink(missing_ok=True)
    ports = {"eagercache": free_port(), "dict": free_port()}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env = bench_env(GC_PROBE_OUT=str(out), GC_PROBE_STALL_MS=str(stall_ms))
    ec_cmd = [str(BIN / "python"), "-m", "bench.gcstalls", "serve", "--port", str(ports["eagercache"])]
    ec_cmd += ["--redis-url", "memory://", "--namespace", mk.NAMESPACE, "--fetchers", mk.FETCHER_SPEC]
    procs = {
        "eagercache": Proc("eagercache", [*ec_cmd, "--log-level", "WARNING", *stack_args("fast")], core=0, env=env)
    }
    try:
        procs["eagercache"].wait_http(urls["eagercache"] + "/readyz", timeout=60)
        filled = asyncio.run(mk._http_fill_all({"eagercache": urls["eagercache"]}, entries))["eagercache"]
        print(f"filled {entries:,} at {filled['rate']:,.0f}/s", flush=True)
        headers = out.with_suffix(".headers.json")
        mk.capture_headers(urls["eagercache"], 1, headers)
        dict_cmd = [str(BIN / "python"), "-m", "bench.gcstalls", "dict", "--port", str(ports["dict"])]
        dict_cmd += ["--redis-url", "-", "--prefix", "-", "--headers", str(headers), "--dict", "--count", str(entries)]
        procs["dict"] = Proc("dict", [*dict_cmd, *stack_args("fast")], core=0, env=bench_env())
        procs["dict"].wait_http(urls["dict"] + "/healthz", timeout=60)
        ids = mk.uniform_ids(entries, 500_000, 7)
        workload = mk._workload("uniform", ids, out.parent, "gcstalls")
        for url in urls.values():
            workload.run(url, 2, 32, 1, seed=0)  # warm-up
        _dump(procs["eagercache"].pid)
        for r in range(rounds):
            for name in ("eagercache", "dict") if r % 2 == 0 else ("dict", "eagercache"):
                before = procs[name].cpu_seconds()
                result = workload.run(urls[name], seconds, 32, 1, seed=r + 1)
                cpu_us = (procs[name].cpu_seconds() - before) / max(1, result.requests) * 1e6
                p = {k: v / 1e3 for k, v in result.percentiles_us.items()}
                print(
                    f"round {r} {name:10} {result.requests / result.duration_s:8,.0f} req/s  p50 {p['50.0']:.1f}  "
                    f"p99 {p['99.0']:.1f}  p99.9 {p['99.9']:.1f}  max {result.max_us / 1e3:.1f} ms  "
                    f"{cpu_us:.0f} CPU µs/req",
                    flush=True,
                )
                if name == "eagercache":
                    _dump(procs[name].pid)
    finally:
        for proc in procs.values():
            proc.close()
    for line in out.read_text().splitlines()[1:]:
        print(line)


def _dump(pid: int) -> None:
    os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)  # the dump walks every tracked object: let it finish before the next round


def dict_app(argv: list[str]) -> None:
    """bench/redis_get_app.py --dict with bodies of the size eagercache serves, made up (no Redis to read)."""
    from . import redis_get_app

    def made_up(redis_url: str, prefix: str, count: int) -> dict[str, tuple[str, bytes]]:
        return {str(i): (f'"{i:022d}"', b"x" * 231) for i in range(count)}

    redis_get_app.load_dict = made_up
    sys.argv = ["bench.gcstalls dict", *argv]
    redis_get_app.main()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        return serve(args)
    if args[:1] == ["dict"]:
        dict_app(args[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.gcstalls")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--stall-ms", type=float, default=12.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/gcstalls.jsonl"))
    parsed = parser.parse_args(args)
    run(parsed.entries, parsed.rounds, parsed.seconds, parsed.stall_ms, parsed.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
