"""Least privilege on a shared Redis: the documented ACL rule is enough, one permission less is a clear
start-up error, and two services with their own users and namespaces cannot touch each other's entries."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator

import pytest
import redis

from eagercache import create_app, fetcher
from eagercache.access import REQUIRED_COMMANDS, acl_rule
from eagercache.errors import ConfigurationError
from eagercache.settings import Settings

from .helpers import Counter
from .test_redis import running

ADMIN = "admin-token-0123456789"
PASSWORD = "s3cret-pass-word"


@fetcher(ttl=0.5, jitter=0)
async def item(k: str = "a") -> str:
    return f"{k}!"


class Users:
    """ACL users made for one test, removed after it."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.made: list[str] = []

    def make(self, rule: str) -> str:
        name = f"ec-{uuid.uuid4().hex[:8]}"
        self.client.execute_command("ACL", "SETUSER", name, "reset", f">{PASSWORD}", *rule.split())  # type: ignore[no-untyped-call]
        self.made.append(name)
        return name


@pytest.fixture
def users(redis_sync: redis.Redis) -> Iterator[Users]:
    """ACL users on the session server, which publishes expiry events: the rule has no CONFIG, so the
    operator turns them on, as the README says."""
    made = Users(redis_sync)
    redis_sync.config_set("notify-keyspace-events", "Ex")
    try:
        yield made
    finally:
        for name in made.made:
            redis_sync.execute_command("ACL", "DELUSER", name)  # type: ignore[no-untyped-call]


def settings_for(redis_url: str, user: str, namespace: str = "eagercache:") -> Settings:
    return Settings(
        redis_url=redis_url,
        redis_username=user,
        redis_password=PASSWORD,
        namespace=namespace,
        admin_token=ADMIN,
    )


async def test_a_user_with_exactly_the_documented_rule_does_everything(redis_url: str, users: Users) -> None:
    user = users.make(acl_rule("eagercache:"))
    app = create_app([item], settings=settings_for(redis_url, user))
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    auth = {"authorization": f"Bearer {ADMIN}"}
    async with running(app) as client:
        assert app.state.refresher.mode == "events+schedule"
        assert app.state.refresher.subscribed
        assert (await client.get("/data/item?k=x")).headers["x-cache"] == "MISS"
        assert (await client.get("/data/item?k=x")).headers["x-cache"] == "HIT"
        await writes.reach(3)  # refreshed, twice, as this user
        assert (await client.get("/readyz")).status_code == 200
        listing = (await client.get("/admin/fetchers/item/entries", headers=auth)).json()
        assert [e["query"] for e in listing["entries"]] == ["k=x"]
        assert (await client.post("/admin/fetchers/item/refresh?k=x", headers=auth)).status_code == 200
        assert (await client.delete("/admin/fetchers/item/entries", headers=auth)).json() == {"removed": 1}


@pytest.mark.parametrize("command", REQUIRED_COMMANDS)
async def test_a_user_missing_one_permission_gets_a_start_up_error_naming_it(
    redis_url: str, users: Users, command: str
) -> None:
    user = users.make(f"{acl_rule('eagercache:')} -{command}")
    app = create_app([item], settings=settings_for(redis_url, user))
    with pytest.raises(ConfigurationError) as raised:
        async with running(app):
            pass
    named = command.upper().replace("|", " ")
    assert f"may not run {named}" in raised.value.detail
    assert f"ACL SETUSER {user} " in raised.value.detail  # and says what to grant
    assert PASSWORD not in raised.value.detail


async def test_a_user_limited_to_other_keys_gets_a_start_up_error_naming_the_namespace(
    redis_url: str, users: Users
) -> None:
    user = users.make(acl_rule("someone-else:"))
    with pytest.raises(ConfigurationError) as raised:
        async with running(create_app([item], settings=settings_for(redis_url, user))):
            pass
    assert "may not access keys under 'eagercache:'" in raised.value.detail


async def test_without_the_event_channel_the_service_runs_on_the_schedule_alone(
    redis_url: str, users: Users, caplog: pytest.LogCaptureFixture
) -> None:
    rule = acl_rule("eagercache:").replace("&__keyevent@0__:expired ", "")
    user = users.make(rule)
    app = create_app([item], settings=settings_for(redis_url, user))
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    with caplog.at_level(logging.WARNING, logger="eagercache"):
        async with running(app) as client:
            assert app.state.refresher.mode == "schedule"
            assert (await client.get("/data/item")).status_code == 200
            await writes.reach(2)
            assert (await client.get("/readyz")).status_code == 200
    assert any("__keyevent@0__:expired" in str(getattr(r, "why", "")) for r in caplog.records)


async def test_two_services_cannot_touch_each_others_entries(
    redis_url: str, redis_sync: redis.Redis, users: Users
) -> None:
    """Same fetcher names, different namespaces and users: every eagercache path stays in its own keys."""
    user_a, user_b = users.make(acl_rule("svc-a:")), users.make(acl_rule("svc-b:"))
    app_a = create_app([item], settings=settings_for(redis_url, user_a, "svc-a:"))
    app_b = create_app([item], settings=settings_for(redis_url, user_b, "svc-b:"))
    auth = {"authorization": f"Bearer {ADMIN}"}
    async with running(app_a) as a, running(app_b) as b:
        assert (await b.get("/data/item?k=shared")).headers["x-cache"] == "MISS"
        assert (await b.get("/data/item?k=only-b")).status_code == 200
        # A reads the same URL: its own entry, fetched for itself, never B's.
        assert (await a.get("/data/item?k=shared")).headers["x-cache"] == "MISS"
        listed = (await a.get("/admin/fetchers/item/entries", headers=auth)).json()["entries"]
        assert [e["query"] for e in listed] == ["k=shared"]
        assert (await a.delete("/admin/fetchers/item/entry?k=only-b", headers=auth)).status_code == 404
        assert (await a.delete("/admin/fetchers/item/entries", headers=auth)).json() == {"removed": 1}
        assert (await a.post("/admin/fetchers/item/refresh?k=only-b", headers=auth)).status_code == 404
        assert redis_sync.exists("svc-b:{b0}:item:item?k=shared", "svc-b:{b0}:item:item?k=only-b") == 2
        assert (await b.get("/data/item?k=only-b")).headers["x-cache"] in ("HIT", "STALE")
    # And A's user pointed at B's namespace cannot even start.
    with pytest.raises(ConfigurationError):
        async with running(create_app([item], settings=settings_for(redis_url, user_a, "svc-b:"))):
            pass


def test_the_rule_names_only_the_namespace_and_its_channel() -> None:
    rule = acl_rule("svc:", db=3)
    assert "~svc:*" in rule and "&__keyevent@3__:expired" in rule
    assert "-@all" in rule and "+@all" not in rule and "allkeys" not in rule and "~*" not in rule
    assert "config" not in rule and "multi" not in rule  # nothing the service does not run
    assert "+config|get +config|set" in acl_rule("svc:", config=True)  # opt-in


async def test_access_check_leaves_no_probe_keys(redis_url: str, redis_sync: redis.Redis, users: Users) -> None:
    user = users.make(acl_rule("eagercache:"))
    async with running(create_app([item], settings=settings_for(redis_url, user))):
        await asyncio.sleep(0)
    assert not list(redis_sync.scan_iter("eagercache:probe:*"))


@pytest.mark.parametrize(("server_flags", "mode"), [("", "schedule"), ("Ex", "events+schedule")])
async def test_without_config_the_service_uses_what_the_server_publishes(
    redis_url: str, redis_sync: redis.Redis, users: Users, server_flags: str, mode: str
) -> None:
    """A user without CONFIG cannot turn expiry events on: it finds out by a probe whether they arrive."""
    user = users.make(acl_rule("eagercache:"))
    redis_sync.config_set("notify-keyspace-events", server_flags)
    try:
        app = create_app([item], settings=settings_for(redis_url, user))
        async with running(app) as client:
            assert app.state.refresher.mode == mode
            assert (await client.get("/data/item")).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            flags = redis_sync.config_get("notify-keyspace-events")["notify-keyspace-events"]
            assert set(str(flags)) == set(server_flags)  # the service could change nothing, and did not try
    finally:
        redis_sync.config_set("notify-keyspace-events", "")


async def test_another_database_needs_select_and_its_own_channel(redis_url: str, users: Users) -> None:
    """The client sends SELECT on every new connection to a database other than 0: the rule for that
    database grants it, and one without it is refused at start-up naming SELECT, not some other command."""
    url = redis_url.rsplit("/", 1)[0] + "/3"
    with_select = users.make(acl_rule("eagercache:", db=3))
    app = create_app([item], settings=settings_for(url, with_select))
    async with running(app) as client:
        assert (await client.get("/data/item")).status_code == 200
        assert app.state.refresher.mode == "events+schedule"  # its channel is __keyevent@3__
    without = users.make(acl_rule("eagercache:", db=0))
    with pytest.raises(ConfigurationError) as raised:
        async with running(create_app([item], settings=settings_for(url, without))):
            pass
    assert "may not run SELECT" in raised.value.detail
    assert "+select" in raised.value.detail and "&__keyevent@3__:expired" in raised.value.detail


async def test_a_check_that_stops_half_way_leaves_no_probe_keys(
    redis_url: str, redis_sync: redis.Redis, users: Users
) -> None:
    user = users.make(f"{acl_rule('eagercache:')} -scan")  # refused after the probe hash was written
    with pytest.raises(ConfigurationError, match="may not run SCAN"):
        async with running(create_app([item], settings=settings_for(redis_url, user))):
            pass
    assert not list(redis_sync.scan_iter("eagercache:probe:*"))
