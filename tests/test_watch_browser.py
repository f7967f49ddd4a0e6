"""/watch in a real browser: headless Chromium's own `EventSource` against real `eagercache serve` processes.

The page comes from the server's origin (/healthz), so the EventSource is same-origin. It keeps every event,
applies each RFC 6902 patch to its copy of the document with the small applier below (the server's patches are
checked by code that is not the server's), and checks that each patch's base is the version it holds. The
fetcher (tests.fleet:ticking, ttl 0.3 s) changes its data on every refresh until the test freezes it.

On `last_retrieved`: it moves on every refresh, changed or not, but an unchanged refresh sends nothing, so a
watcher's copy keeps the `last_retrieved` of the version's own write (its `last_modified`), and `/data` may be
further on. Everything else must be exactly `/data`'s.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import redis

from .browser import Console, chromium_page, require_chromium
from .servers import ServeProcess

if TYPE_CHECKING:
    from playwright.sync_api import Page

FETCHER = "tests.fleet:ticking"
TTL_S = 0.3
SETTLE_S = 3 * TTL_S  # after a freeze: refreshes in flight have landed, and the near cache (0.25 s) has moved on
WAIT_MS = 20_000
# A reconnect's attempts while no server listens: Chromium logs each as a failed load of the stream.
REFUSED = "ERR_CONNECTION_REFUSED"
STOPPED = (0, -signal.SIGTERM)  # how `eagercache serve` ends on SIGTERM

# window.__watch: every event in order ("open" and "error" included), the document as the events build it,
# its version (the last event id), and anything that broke the contract, in words.
WATCH_JS = """
(url) => {
  const unescape = (s) => s.replace(/~1/g, '/').replace(/~0/g, '~');
  const pointer = (p) => {
    if (p === '') return [];
    if (p[0] !== '/') throw new Error(`not a JSON pointer: ${p}`);
    return p.slice(1).split('/').map(unescape);
  };
  const index = (array, key, adding) => {
    if (adding && key === '-') return array.length;
    if (!/^(0|[1-9][0-9]*)$/.test(key)) throw new Error(`bad array index ${key}`);
    const i = Number(key);
    if (i > array.length || (!adding && i === array.length)) throw new Error(`index ${i} out of range`);
    return i;
  };
  const walk = (doc, path) => {
    let node = doc;
    for (const key of path) {
      if (Array.isArray(node)) node = node[index(node, key, false)];
      else if (node !== null && typeof node === 'object' && Object.hasOwn(node, key)) node = node[key];
      else throw new Error(`no ${key} on the way`);
    }
    return node;
  };
  const equal = (a, b) => JSON.stringify(a) === JSON.stringify(b);
  // RFC 6902, section 4: each operation on the result of the previous one.
  const apply = (doc, op) => {
    const path = pointer(op.path);
    if (op.op === 'test') {
      if (!equal(walk(doc, path), op.value)) throw new Error(`test failed at ${op.path}`);
      return doc;
    }
    if (op.op === 'move' || op.op === 'copy') {
      const value = structuredClone(walk(doc, pointer(op.from)));
      if (op.op === 'move') doc = apply(doc, {op: 'remove', path: op.from});
      return apply(doc, {op: 'add', path: op.path, value});
    }
    if (path.length === 0) {
      if (op.op === 'remove') throw new Error('remove of the whole document');
      return structuredClone(op.value);
    }
    const parent = walk(doc, path.slice(0, -1));
    const key = path[path.length - 1];
    if (Array.isArray(parent)) {
      const i = index(parent, key, op.op === 'add');
      if (op.op === 'add') parent.splice(i, 0, structuredClone(op.value));
      else if (op.op === 'remove') parent.splice(i, 1);
      else if (op.op === 'replace') parent[i] = structuredClone(op.value);
      else throw new Error(`unknown op ${op.op}`);
    } else {
      if (op.op !== 'add' && !Object.hasOwn(parent, key)) throw new Error(`${op.op} of a missing ${op.path}`);
      if (op.op === 'add' || op.op === 'replace') parent[key] = structuredClone(op.value);
      else if (op.op === 'remove') delete parent[key];
      else throw new Error(`unknown op ${op.op}`);
    }
    return doc;
  };
  const state = {events: [], doc: null, id: null, problems: []};
  window.__watch = state;
  const source = new EventSource(url);
  window.__source = source;
  source.onopen = () => state.events.push({type: 'open'});
  source.onerror = () => state.events.push({type: 'error', readyState: source.readyState});
  source.onmessage = (e) => state.problems.push(`an event without a type: ${e.data}`);
  source.addEventListener('snapshot', (e) => {
    try {
      state.doc = JSON.parse(e.data);
      state.id = e.lastEventId;
      state.events.push({type: 'snapshot', id: e.lastEventId, data: e.data, doc: state.doc});
    } catch (err) {
      state.problems.push(`snapshot ${e.lastEventId}: ${err}`);
    }
  });
  source.addEventListener('patch', (e) => {
    try {
      const {base, patch} = JSON.parse(e.data);
      if (state.doc === null) throw new Error('a patch before any snapshot');
      if (base !== state.id) throw new Error(`base ${base}, but the document is at ${state.id}`);
      state.doc = patch.reduce(apply, structuredClone(state.doc));
      state.id = e.lastEventId;
      state.events.push({type: 'patch', id: e.lastEventId, base, patch, doc: structuredClone(state.doc)});
    } catch (err) {
      state.problems.push(`patch ${e.lastEventId}: ${err}`);
    }
  });
  source.addEventListener('status', (e) => state.events.push({type: 'status', data: e.data}));
}
"""


def watch(page: Page, server: ServeProcess, k: str) -> None:
    page.goto(f"{server.url}/healthz")  # the page's origin is the server's
    page.evaluate(WATCH_JS, f"/watch/ticking?k={k}")


def events(page: Page) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = page.evaluate("window.__watch.events")
    return found


def problems(page: Page) -> list[str]:
    found: list[str] = page.evaluate("window.__watch.problems")
    return found


def changes(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in found if e["type"] in ("snapshot", "patch")]


def wait_for(page: Page, condition: str, arg: Any = None, *, waiting_for: str) -> None:
    """Until the JS `condition(state, arg)` holds in the page (Playwright polls it on animation frames)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"(arg) => ({condition})(window.__watch, arg)", arg=arg, timeout=WAIT_MS)
    except PlaywrightTimeout:
        seen = [{k: v for k, v in e.items() if k in ("type", "id", "base")} for e in events(page)]
        pytest.fail(f"no {waiting_for} after {WAIT_MS} ms; the page saw {seen}; problems {problems(page)}")


def freeze(client: redis.Redis, k: str, frozen: bool) -> None:
    if frozen:
        client.set(f"fleet:tick:{k}:frozen", 1)
    else:
        client.delete(f"fleet:tick:{k}:frozen")


def settled(server: ServeProcess, k: str) -> httpx.Response:
    """/data once the frozen data has stopped changing."""
    time.sleep(SETTLE_S)  # refreshes in another process: nothing to await here
    answer = httpx.get(f"{server.url}/data/ticking?k={k}", timeout=10)
    assert answer.status_code == 200, answer.text
    return answer


def as_of_change(body: dict[str, Any]) -> dict[str, Any]:
    """/data's document as a watcher holds it: `last_retrieved` as of the write that changed the data."""
    return {**body, "last_retrieved": body["last_modified"]}


def assert_snapshot_is_data(event: dict[str, Any], answer: httpx.Response) -> None:
    """The snapshot is /data's body byte for byte, but for a `last_retrieved` of a refresh of that version."""
    assert event["id"] == answer.headers["etag"]
    body = answer.json()
    mine = json.loads(event["data"])
    assert "\n" not in event["data"]
    assert event["data"] == answer.text.replace(body["last_retrieved"], mine["last_retrieved"])
    assert mine["last_retrieved"] >= body["last_modified"]  # RFC 3339 in UTC with ms: text order is time order


def refused_only(console: Console) -> list[str]:
    """The page's errors other than refused stream connections (the test stopped the server)."""
    return [e for e in console.errors if not (REFUSED in e and "/watch/" in e)]


@pytest.fixture(autouse=True)
def chromium() -> str:
    """Skipped (failed in CI) before any server starts when there is no browser."""
    return require_chromium()


@pytest.fixture
def serve(redis_url: str, redis_sync: redis.Redis) -> Iterator[list[ServeProcess]]:
    """Serve processes of the fetcher on the test's Redis; every one started is closed at the end."""
    started: list[ServeProcess] = []
    yield started
    for server in started:
        server.close()


def start(started: list[ServeProcess], redis_url: str, port: int | None = None) -> ServeProcess:
    args = ("--redis-url", redis_url, "--fetchers", FETCHER, "--shutdown-timeout", "3")
    server = ServeProcess(*args, env={"FLEET_REDIS_URL": redis_url}, port=port)
    started.append(server)
    server.wait_ready()
    return server


@pytest.mark.timeout(120)
def test_a_browser_builds_each_version_of_data_from_the_snapshot_and_its_patches(
    serve: list[ServeProcess], redis_url: str, redis_sync: redis.Redis
) -> None:
    server = start(serve, redis_url)
    first = httpx.get(f"{server.url}/data/ticking?k=b", timeout=10)
    assert first.status_code == 200, first.text
    freeze(redis_sync, "b", True)
    before = settled(server, "b")
    with chromium_page() as (page, console):
        watch(page, server, "b")
        wait_for(page, "(s) => s.events.some((e) => e.type === 'snapshot')", waiting_for="snapshot")
        snapshot = changes(events(page))[0]
        assert [e["type"] for e in events(page)][:2] == ["open", "snapshot"]
        assert_snapshot_is_data(snapshot, before)

        freeze(redis_sync, "b", False)
        wait_for(page, "(s) => s.events.filter((e) => e.type === 'patch').length >= 4", waiting_for="4 patches")
        freeze(redis_sync, "b", True)
        after = settled(server, "b")
        wait_for(page, "(s, id) => s.id === id", after.headers["etag"], waiting_for="version /data has")
        doc: dict[str, Any] = page.evaluate("window.__watch.doc")
        found = events(page)
        assert problems(page) == []
        assert console.errors == []

    assert doc == as_of_change(after.json())
    versions = changes(found)
    assert versions[0] == snapshot and len(versions) >= 5
    assert [e["type"] for e in found if e["type"] not in ("snapshot", "patch", "status")] == ["open"]
    # In order (the hub may fold two changes that come while it reads the store into one event).
    counts = [e["doc"]["data"]["n"] for e in versions]
    assert counts == sorted(set(counts))
    ops = {op["op"] for e in versions if e["type"] == "patch" for op in e["patch"]}
    assert {"add", "remove", "replace"} <= ops  # the applier above was used for each
    for e in versions[1:]:
        assert e["doc"]["last_retrieved"] == e["doc"]["last_modified"]


@pytest.mark.timeout(180)
def test_a_browser_resumes_with_last_event_id_and_gets_a_snapshot_only_when_it_missed_a_change(
    serve: list[ServeProcess], redis_url: str, redis_sync: redis.Redis
) -> None:
    """A stream the server ends (its process stops) is resumed by the browser itself, sending Last-Event-ID."""
    server = start(serve, redis_url)
    port = server.port
    assert httpx.get(f"{server.url}/data/ticking?k=r", timeout=10).status_code == 200
    freeze(redis_sync, "r", True)
    before = settled(server, "r")
    with chromium_page() as (page, console):
        watch(page, server, "r")
        wait_for(page, "(s) => s.id !== null", waiting_for="snapshot")
        assert_snapshot_is_data(changes(events(page))[0], before)

        # 1. Nothing changed while the browser was away: it resumes at its version, with no snapshot.
        assert server.terminate() in STOPPED, server.stderr()
        server = start(serve, redis_url, port)
        wait_for(page, "(s) => s.events.filter((e) => e.type === 'open').length === 2", waiting_for="reconnect")
        time.sleep(SETTLE_S)  # a snapshot the server should not send would come at once
        freeze(redis_sync, "r", False)
        wait_for(page, "(s) => s.events.some((e) => e.type === 'patch')", waiting_for="patch after resuming")
        freeze(redis_sync, "r", True)
        kept = settled(server, "r")
        wait_for(page, "(s, id) => s.id === id", kept.headers["etag"], waiting_for="version /data has")
        found = events(page)
        reopened = max(i for i, e in enumerate(found) if e["type"] == "open")
        resumed = changes(found[reopened:])
        assert resumed and all(e["type"] == "patch" for e in resumed), resumed
        assert resumed[0]["base"] == before.headers["etag"]
        assert page.evaluate("window.__watch.doc") == as_of_change(kept.json())

        # 2. A change landed while it was away (another process refreshed it): a snapshot first.
        assert server.terminate() in STOPPED, server.stderr()
        freeze(redis_sync, "r", False)
        other = start(serve, redis_url)
        deadline = time.monotonic() + 10
        while httpx.get(f"{other.url}/data/ticking?k=r", timeout=10).headers["etag"] == kept.headers["etag"]:
            assert time.monotonic() < deadline, "the other process never refreshed the entry"
            time.sleep(0.05)  # refreshes in another process: nothing to await here
        freeze(redis_sync, "r", True)
        missed = settled(other, "r")
        assert other.terminate() in STOPPED, other.stderr()
        server = start(serve, redis_url, port)
        wait_for(page, "(s) => s.events.filter((e) => e.type === 'open').length === 3", waiting_for="reconnect")
        # Resumed at a version that is no longer the store's, the browser must be sent the store's.
        wait_for(page, "(s, id) => s.id === id", missed.headers["etag"], waiting_for="snapshot of the missed version")
        found = events(page)
        assert problems(page) == []
        assert refused_only(console) == []

    reopened = max(i for i, e in enumerate(found) if e["type"] == "open")
    after = changes(found[reopened:])
    assert after[0]["type"] == "snapshot"
    assert_snapshot_is_data(after[0], missed)
