"""Section 9: targeted invalidation at scale (issue 13): by tag, by an indexed parameter, by a scanned one.

In this process, against the section's redis-server: an eagercache app (its lifespan run, no HTTP) with one
fetcher, `weather(city, days)`, `indexed=("city",)`, whose results carry a tag `region:<r>`. N entries are
stored through `Store.write` (the WRITE script keeps the tag index), 1,000 cities x N / 1,000 values of
`days`, ten regions. Then each kind of call is timed once, each on entries no earlier call removed:

- a tag's entries (N / 10), found by the tag index;
- an indexed parameter's (city: N / 1,000 entries), by the index;
- an indexed parameter with another one (city and days: one entry), by the index then checked;
- a parameter without an index (days: 1,000 entries), by a scan of the fetcher's N entries;
- `refresh` by a tag (N / 10 entries made due now), by the index.

Memory: INFO used_memory before seeding, after seeding, and after the index sets are deleted: what the
index costs per entry (two tags each: the region and the indexed city).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis

from eagercache import Result, create_app, fetcher, invalidate, refresh
from eagercache.item import encode_tags, new_entry

from .config import Config
from .procs import Cores

CITIES = 1_000
REGIONS = 10
NAMESPACE = "inval:"


@fetcher(ttl=3600, indexed=("city",))
async def weather(city: str, days: int = 1) -> Result[dict[str, object]]:
    return Result({"city": city, "days": days}, tags=[f"region:{int(city[1:]) % REGIONS}"])


def run_invalidation(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    return asyncio.run(_run(cfg.invalidation_entries, redis_url))


async def _run(n: int, redis_url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    app = create_app([weather], redis_url=redis_url, namespace=NAMESPACE)
    out: dict[str, Any] = {"entries": n, "cities": CITIES, "regions": REGIONS, "calls": []}
    async with app.router.lifespan_context(app):
        before = int(client.info("memory")["used_memory"])
        started = time.perf_counter()
        await _seed(app, n)
        out["seed_s"] = time.perf_counter() - started
        after = int(client.info("memory")["used_memory"])
        out["bytes_per_entry"] = (after - before) / n
        days = n // CITIES
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("invalidate", "tag (index)", {"tag": "region:3"}),
            ("invalidate", "indexed parameter", {"fetcher": "weather", "where": {"city": "c7"}}),
            ("invalidate", "indexed + other parameter", {"fetcher": "weather", "where": {"city": "c8", "days": 2}}),
            ("invalidate", "parameter without index (scan)", {"fetcher": "weather", "where": {"days": days // 2}}),
            ("refresh", "tag (index), made due now", {"tag": "region:4"}),
        ]
        for action, label, kwargs in calls:
            t = time.perf_counter()
            done = await (invalidate if action == "invalidate" else refresh)(app, **kwargs)
            elapsed = time.perf_counter() - t
            out["calls"].append({"action": action, "what": label, "matched": done, "ms": elapsed * 1000})
        index_keys = list(client.scan_iter(match=f"{NAMESPACE}*:tag:*", count=1000))
        in_use = int(client.info("memory")["used_memory"])
        for start in range(0, len(index_keys), 1000):
            client.delete(*index_keys[start : start + 1000])
        out["index_keys"] = len(index_keys)
        out["index_bytes_per_entry"] = (in_use - int(client.info("memory")["used_memory"])) / n
    client.flushall()
    client.close()
    return out


async def _seed(app: Any, n: int) -> None:
    engine = app.state.engine
    f = engine.registry["weather"]
    window = asyncio.Semaphore(512)

    async def one(i: int) -> None:
        async with window:
            city = i % CITIES
            _, call = engine.registry.call("weather", f"city=c{city}&days={i // CITIES}")
            now = engine.clock.now_ms()
            tags = encode_tags(f.tags_of(call, (f"region:{city % REGIONS}",)))
            entry, _ = new_entry(b'{"x":1}', now, now + 3_600_000, tags=tags)
            await engine.store.write(
                call.entry_id, "weather", entry.encode(), now + 3_600_000, mode="cold", max_entries=10**7
            )

    await asyncio.gather(*(one(i) for i in range(n)))
