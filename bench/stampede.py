"""Section 4: 1,000 concurrent requests for one cold key, on one `eagercache serve` process and on three."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import msgspec
import redis

from .config import Config
from .fetchers import CALLS_KEY, QUOTE
from .hitpath import eagercache_cmd
from .loadgen import stampede, summarize
from .procs import BIN, Cores, Proc, bench_env, free_port


def run_stampede(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    out: dict[str, Any] = {"requests": cfg.stampede_requests, "fetch_s": cfg.stampede_fetch_seconds, "setups": {}}
    try:
        for processes in (1, cfg.stampede_processes):
            client.flushdb()
            env = bench_env(BENCH_REDIS_URL=redis_url, BENCH_FETCH_S=str(cfg.stampede_fetch_seconds))
            ports = [free_port() for _ in range(processes)]
            procs = [
                Proc(
                    f"eagercache-{i}",
                    eagercache_cmd(p, redis_url, "stampede:", "bench.fetchers:cold"),
                    core=cores.server,
                    env=env,
                )
                for i, p in enumerate(ports)
            ]
            try:
                for proc, port in zip(procs, ports, strict=True):
                    proc.wait_http(f"http://127.0.0.1:{port}/readyz")
                rounds = []
                for _ in range(cfg.stampede_rounds):
                    key = uuid.uuid4().hex[:12]
                    before = int(client.get(CALLS_KEY.format(name="cold")) or 0)
                    replies = asyncio.run(
                        stampede([("127.0.0.1", p) for p in ports], f"/data/cold?k={key}", cfg.stampede_requests)
                    )
                    after = int(client.get(CALLS_KEY.format(name="cold")) or 0)
                    latencies = [r.latency_us for r in replies]
                    stats = summarize(
                        latencies,
                        tool="python",
                        duration_s=1.0,
                        errors=0,
                        non_2xx=sum(1 for r in replies if r.status != 200),
                    )
                    caches: dict[str, int] = {}
                    for r in replies:
                        caches[r.cache or "-"] = caches.get(r.cache or "-", 0) + 1
                    rounds.append(
                        {
                            "fetcher_calls": after - before,
                            "latency": stats.to_json(),
                            "x_cache": caches,
                            "send_spread_us": max(r.sent_after_us for r in replies),
                        }
                    )
            finally:
                for proc in procs:
                    proc.close()
            out["setups"][str(processes)] = rounds
    finally:
        client.close()
    out["bare"] = _bare_reference(cfg, cores, workdir)
    return out


def _bare_reference(cfg: Config, cores: Cores, workdir: Path) -> list[dict[str, Any]]:
    """The same 1,000 concurrent requests answered from memory by the bare Starlette app: the server's floor."""
    body = msgspec.json.encode({"data": {"k": "bare", **QUOTE}, "last_retrieved": "-", "last_modified": "-"})
    response = workdir / "stampede-bare.json"
    response.write_text(json.dumps({"body": body.decode(), "headers": {"content-type": "application/json"}}))
    port = free_port()
    cmd = [str(BIN / "python"), "-m", "bench.bare_app", "--port", str(port), "--response", str(response)]
    proc = Proc("bare", cmd, core=cores.server)
    rounds = []
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/healthz")
        for _ in range(cfg.stampede_rounds):
            replies = asyncio.run(stampede([("127.0.0.1", port)], "/data/cold?k=bare", cfg.stampede_requests))
            stats = summarize(
                [r.latency_us for r in replies],
                tool="python",
                duration_s=1.0,
                errors=0,
                non_2xx=sum(1 for r in replies if r.status != 200),
            )
            rounds.append({"latency": stats.to_json(), "send_spread_us": max(r.sent_after_us for r in replies)})
    finally:
        proc.close()
    return rounds
