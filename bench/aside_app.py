"""eagercache with its refresher off: plain cache-aside, for section 2.

The app is eagercache's own (`create_app`: same routes, engine, store, single-flight miss path and
response), with two changes made from outside: the lifespan never starts the Refresher (it only prepares
the store), and every stored entry's item key (in its bucket: `Keys.item`) gets a Redis TTL equal to its
fetcher's ttl (PEXPIRE right after eagercache's own write), so an expired entry is simply gone and the next
read is a miss that waits for the fetcher (with eagercache's single flight). Nothing refreshes ahead.

    python -m bench.aside_app --port 8002 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette

from eagercache import create_app
from eagercache.store import Store

from .fetchers import slow


def create_aside_app(redis_url: str, namespace: str) -> Starlette:
    app = create_app([slow], redis_url=redis_url, namespace=namespace)
    store: Store = app.state.store
    ttl_ms = {name: int(f.ttl * 1000) for name, f in app.state.registry.items()}

    original_write = store.write

    async def write(entry_id: str, fetcher: str, *args: Any, **kwargs: Any) -> int:
        # Cache-aside: the stored item itself expires after ttl (the schedule is never followed).
        result: int = await original_write(entry_id, fetcher, *args, **kwargs)
        await store.client.pexpire(store.keys.item(entry_id), ttl_ms[fetcher])
        return result

    store.write = write  # type: ignore[method-assign]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await store.prepare()  # connect, load the scripts, settle the bucket count (as eagercache's own lifespan)
            await store.ping()
            yield
        finally:
            await store.aclose()

    app.router.lifespan_context = lifespan
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--namespace", default="aside:")
    args = parser.parse_args()
    app = create_aside_app(args.redis_url, args.namespace)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, log_config=None, access_log=False, lifespan="on", server_header=False
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
