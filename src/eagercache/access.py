"""What eagercache needs of its Redis user, and a start-up check that it has it.

Managed Redis services and shared servers give an application an ACL user limited to its own key
prefix and the commands it needs. `acl_rule()` is that rule (the README's "Least privilege" section
prints it). At start-up every command the service runs is tried once, on probe keys under the
namespace, so a missing permission is one clear error naming it instead of a 503 on the first read.
CONFIG and the expiry-event channel are optional: without them the service runs on the schedule alone.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.exceptions import NoPermissionError, RedisError, ResponseError

from . import scripts
from .changes import CHANNEL_SUFFIX
from .errors import ConfigurationError, StoreUnavailable
from .store import Store, redact, store_errors


def parse_url_username(url: str) -> str | None:
    return unquote(urlsplit(url).username or "") or None


# Every command the service runs on its keys. `script|load` and `evalsha` run the Lua scripts; the
# scripts themselves only touch keys under the namespace.
REQUIRED_COMMANDS = (
    "ping",
    "info",
    "time",
    "get",
    "mget",
    "set",
    "del",
    "exists",
    "getrange",
    "zadd",
    "zrange",
    "zrangebyscore",
    "zscore",
    "zrem",
    "zscan",
    "hget",
    "hgetall",
    "hset",
    "hincrby",
    "scan",
    "evalsha",
    "script|load",
)
# What redis-py's cluster client runs to learn the slot map and command keys, and to follow an ASK
# redirection during a reshard; only on a cluster.
CLUSTER_COMMANDS = ("cluster|slots", "cluster|shards", "cluster|nodes", "command", "asking", "readonly")
# Used when allowed: expiry events (subscribe), and the change channel of /watch (publish, subscribe;
# without them a watcher hears of another replica's change at the hub's next check, within a second).
# (redis-py also sends CLIENT SETINFO on connect and ignores a refusal; Redis before 7.2 does not know it,
# so the rule leaves it out.)
OPTIONAL_COMMANDS = ("subscribe", "unsubscribe", "publish")
# Opt-in: lets eagercache turn expiry events on itself and warn about an eviction policy. CONFIG cannot
# be limited to one parameter, so it gives the user the whole server's configuration (masterauth,
# requirepass, maxmemory-policy): left out unless asked for.
CONFIG_COMMANDS = ("config|get", "config|set")


def acl_rule(namespace: str, db: int = 0, *, config: bool = False, cluster: bool = False) -> str:
    """The ACL rule for eagercache's user: its keys, its channels, its commands, nothing else (and SELECT
    for a database other than 0, which the client sends on every new connection; the cluster client's
    commands on a cluster; CONFIG if asked for)."""
    granted = (
        *REQUIRED_COMMANDS,
        *(("select",) if db else ()),
        *(CLUSTER_COMMANDS if cluster else ()),
        *OPTIONAL_COMMANDS,
        *(CONFIG_COMMANDS if config else ()),
    )
    commands = " ".join(f"+{c}" for c in granted)
    channels = f"&__keyevent@{db}__:expired &{namespace}{CHANNEL_SUFFIX}"
    return f"on resetkeys ~{namespace}* resetchannels {channels} -@all {commands}"


async def check_access(store: Store) -> None:
    """Run each required command once; ConfigurationError naming the first one the user may not run.

    Connects first (`Store.open`), which already needs INFO (and the cluster client's commands).
    """
    if store.is_memory:
        return
    try:
        await store.open()
    except StoreUnavailable as exc:
        if (refused := _refusal(exc)) is not None:
            raise _denied(store, "info", refused) from exc
        raise
    client = store.client
    # One hash tag: on a cluster the probe keys share a slot, as the multi-key commands need.
    probe = f"{store.keys.probe_prefix}{{access-{uuid.uuid4().hex}}}"
    zset, table = f"{probe}:z", f"{probe}:h"
    sha: list[str] = []

    async def load() -> None:
        for script in (scripts.CLAIM_DUE, scripts.CLAIM_MANY, scripts.WRITE, "return 1"):
            sha.append(await client.script_load(script))

    steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("ping", client.ping),
        ("time", client.time),
        ("set", lambda: client.set(probe, b"", px=60_000)),
        ("get", lambda: client.get(probe)),
        ("mget", lambda: client.mget(probe, probe)),
        ("getrange", lambda: client.getrange(probe, 0, 1)),
        ("exists", lambda: client.exists(probe)),
        ("zadd", lambda: client.zadd(zset, {"x": 1})),
        ("zrange", lambda: client.zrange(zset, 0, 0, withscores=True)),
        ("zrangebyscore", lambda: client.zrangebyscore(zset, "-inf", 1)),
        ("zscore", lambda: client.zscore(zset, "x")),
        ("zscan", lambda: client.zscan(zset, 0)),
        ("zrem", lambda: client.zrem(zset, "x")),
        ("hset", lambda: client.hset(table, "n", 0)),
        ("hget", lambda: client.hget(table, "n")),
        ("hgetall", lambda: client.hgetall(table)),
        ("hincrby", lambda: client.hincrby(table, "n", 1)),
        ("scan", lambda: client.scan(0, match=f"{probe}*", count=10)),
        ("script|load", load),
        ("evalsha", lambda: client.evalsha(sha[-1], 0)),
        ("del", lambda: client.delete(probe, zset, table)),
    ]
    with store_errors(store.url):
        try:
            for command, step in steps:
                try:
                    await step()
                except ResponseError as exc:  # NoPermissionError is one
                    if "NOPERM" not in str(exc) and not isinstance(exc, NoPermissionError):
                        raise
                    raise _denied(store, command, exc) from exc
        finally:
            with contextlib.suppress(RedisError, OSError):  # a check that stopped half-way leaves no probe
                await client.delete(probe, zset, table)


def _refusal(exc: BaseException) -> BaseException | None:
    """The NOPERM behind an error, however deep the client wrapped it (the cluster client does)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, NoPermissionError) or (isinstance(seen, ResponseError) and "NOPERM" in str(seen)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _denied(store: Store, command: str, exc: BaseException) -> ConfigurationError:
    user = (store.auth.username if store.auth else None) or parse_url_username(store.url) or "default"
    if named := re.search(r"run the '([^']+)' command", str(exc)):
        command = named.group(1)  # the server names the command it refused (SELECT on connect, say)
    what = (
        f"access keys under {store.keys.namespace!r}"
        if "key" in str(exc).lower()
        else f"run {command.upper().replace('|', ' ')}"
    )
    return ConfigurationError(
        f"the Redis user {user!r} at {redact(store.url)} may not {what} ({exc}). eagercache needs "
        f"this rule: ACL SETUSER {user} {acl_rule(store.keys.namespace, store.db, cluster=store.kind == 'cluster')} "
        "(and a password)"
    )
