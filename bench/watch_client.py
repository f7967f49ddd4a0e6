"""Section 8's watchers: many `GET /watch/...` Server-Sent Events streams from one process, on raw sockets.

An asyncio Protocol per connection (uvloop when installed): the HTTP/1.1 head, then the body (chunked or
not) split into events on blank lines, and per event only what the harness needs: its type, its id, and the
`last_modified` and `data.by` of the version it brings (the new version's own write time and writer: a
patch replaces both, a snapshot holds them). The receive time is taken once per socket read, before parsing,
so parsing does not add to the measured lag. Lag = receive time - `last_modified`, both from this machine's
wall clock (the store's clock is synchronised with it; on one machine they are the same clock).

    python -m bench.watch_client --port P --entries E --first F --count C --out FILE

Watcher j (F <= j < F + C) watches entry j % E. The client prints `CONNECTED <streams> <failed>` once every
stream has its first event (the initial snapshot), then records until a line `STOP` on stdin, writes its
results to FILE as JSON, prints `DONE` and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from datetime import datetime
from typing import Any, cast

import msgspec

FETCHER = "tick"
CONNECTING_AT_ONCE = 64  # streams between connect and their first event: below the server's listen backlog
CONNECT_TIMEOUT_S = 60.0

_decode = msgspec.json.decode
_times: dict[str, float] = {}
# What each distinct event says (its type, id, write time and writer, or None: unparsed), by its bytes: every
# watcher of a version gets the same bytes, so a version is parsed once per client process, not per watcher
# (10,000 JSON parses of one version would hold the load core longer than the server takes to send them).
Parsed = tuple[bytes, str, float, str | None]
_parsed: dict[bytes, Parsed | None] = {}


def epoch_ms(rfc3339: str) -> float:
    """ms since the epoch of `2026-11-24T10:00:00.123Z`; every watcher of a version reads the same string."""
    found = _times.get(rfc3339)
    if found is None:
        found = _times[rfc3339] = datetime.fromisoformat(rfc3339).timestamp() * 1000
    return found


class Results:
    """Per version delivered (entry, event id): its write time, its writer and every watcher's lag."""

    def __init__(self) -> None:
        self.changes: dict[str, list[Any]] = {}  # "<entry> <id>" -> [write ms, by, [lag ms...], snapshots]
        self.initial = 0
        self.patches = 0
        self.snapshots = 0  # after the initial one: the server's choice over a patch
        self.status = 0
        self.failed: list[str] = []
        self.closed = 0
        self.unparsed = 0

    def delivered(self, entry: int, event_id: str, write_ms: float, by: str, recv_ms: float, snapshot: bool) -> None:
        key = f"{entry} {event_id}"
        change = self.changes.get(key)
        if change is None:
            change = self.changes[key] = [write_ms, by, [], 0]
        change[2].append(round(recv_ms - write_ms, 2))
        change[3] += snapshot


class Watcher(asyncio.Protocol):
    def __init__(self, entry: int, request: bytes, results: Results, first: asyncio.Future[None]) -> None:
        self.entry = entry
        self.request = request
        self.results = results
        self.first = first
        self.head = b""
        self.chunked: bool | None = None  # None until the head is read
        self.raw = b""  # body bytes not yet de-chunked
        self.need_data = 0
        self.need_crlf = 0
        self.text = b""  # de-chunked bytes not yet split into events
        self.separator = b""
        self.by = ""
        self.got_first = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not asyncio's classes
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        self.results.closed += 1
        if not self.first.done():
            self.first.set_exception(ConnectionError(f"closed before the first event: {exc}"))

    def data_received(self, data: bytes) -> None:
        recv_ms = time.time() * 1000
        if self.chunked is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end].decode("latin-1"), self.head[end + 4 :]
            status = head.split(" ", 2)[1]
            if status != "200":
                self.first.set_exception(RuntimeError(f"HTTP {status}: {head.splitlines()[0]} {data[:200]!r}"))
                assert self.transport is not None
                self.transport.close()
                return
            self.chunked = "transfer-encoding: chunked" in head.lower()
        self.text += self._dechunk(data) if self.chunked else data
        if not self.separator:
            if b"\r\n" in self.text:
                self.separator = b"\r\n\r\n"
            elif b"\n\n" in self.text:
                self.separator = b"\n\n"
            else:
                return
        *events, self.text = self.text.split(self.separator)
        for event in events:
            self._event(event, recv_ms)

    def _dechunk(self, data: bytes) -> bytes:
        buf, pos, out = self.raw + data, 0, []
        while pos < len(buf):
            if self.need_data:
                take = min(self.need_data, len(buf) - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.need_data -= take
                if not self.need_data:
                    self.need_crlf = 2
            elif self.need_crlf:
                take = min(self.need_crlf, len(buf) - pos)
                pos += take
                self.need_crlf -= take
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                self.need_data = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if not self.need_data:  # the last chunk: the server ended the stream
                    break
        self.raw = buf[pos:]
        return b"".join(out)

    def _event(self, event: bytes, recv_ms: float) -> None:
        try:
            parsed = _parsed[event]
        except KeyError:
            parsed = _parsed[event] = parse(event)
        results = self.results
        if parsed is None:
            results.unparsed += 1
            return
        kind, event_id, write_ms, by = parsed
        if kind == b"status":
            results.status += 1
            return
        if kind not in (b"snapshot", b"patch"):
            return  # a comment (": ping") or retry: only
        if by is not None:
            self.by = by
        if not self.got_first:
            self.got_first = True
            results.initial += 1
            if not self.first.done():
                self.first.set_result(None)
            return
        if kind == b"patch":
            results.patches += 1
        else:
            results.snapshots += 1
        results.delivered(self.entry, event_id, write_ms, self.by, recv_ms, kind == b"snapshot")


def parse(event: bytes) -> Parsed | None:
    """An event's type, id, and for a snapshot or patch the write time and writer of the version it brings (the
    writer None if a patch does not change it); None if its data cannot be read."""
    kind, event_id, data = b"message", "", b""
    for line in event.splitlines():
        if line.startswith(b"data:"):
            data += line[6:] if line[5:6] == b" " else line[5:]
        elif line.startswith(b"event:"):
            kind = line[6:].strip()
        elif line.startswith(b"id:"):
            event_id = line[3:].strip().decode()
    if kind not in (b"snapshot", b"patch"):
        return kind, event_id, 0.0, None
    by: str | None = None
    try:
        doc = _decode(data)
        if kind == b"snapshot":
            return kind, event_id, epoch_ms(doc["last_modified"]), doc["data"]["by"]
        write_ms = 0.0
        for op in doc["patch"]:
            path = op["path"]
            if path == "/last_modified":
                write_ms = epoch_ms(op["value"])
            elif path == "/data/by":
                by = op["value"]
            elif path in ("", "/data"):  # the whole document or its data replaced
                value = op["value"]
                by = (value.get("data", value) or {}).get("by", by)
                if "last_modified" in value:
                    write_ms = epoch_ms(value["last_modified"])
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return kind, event_id, write_ms, by


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    results = Results()
    gate = asyncio.Semaphore(CONNECTING_AT_ONCE)
    transports: list[asyncio.Transport] = []

    async def connect(j: int) -> None:
        entry = j % args.entries
        path = f"/watch/{FETCHER}?id={entry}"
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nAccept: text/event-stream\r\n"
            "Cache-Control: no-cache\r\n\r\n"
        ).encode()
        async with gate:
            first: asyncio.Future[None] = loop.create_future()
            try:
                transport, _ = await loop.create_connection(
                    lambda: Watcher(entry, request, results, first), args.host, args.port
                )
                transports.append(transport)
                await asyncio.wait_for(first, CONNECT_TIMEOUT_S)
            except Exception as exc:
                if len(results.failed) < 20:
                    results.failed.append(f"watcher {j}: {type(exc).__name__}: {exc}")
                else:
                    results.failed.append("")

    started = time.monotonic()
    await asyncio.gather(*(connect(j) for j in range(args.first, args.first + args.count)))
    connect_s = time.monotonic() - started
    failed = len(results.failed)
    print(f"CONNECTED {args.count - failed} {failed}", flush=True)
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "STOP":
        print(f"unexpected input {line!r}", file=sys.stderr)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    with open(args.out, "w") as out:
        json.dump(
            {
                "streams": args.count - failed,
                "failed": failed,
                "failures": [f for f in results.failed if f],
                "connect_s": connect_s,
                "initial": results.initial,
                "patches": results.patches,
                "snapshots": results.snapshots,
                "status": results.status,
                "closed": results.closed,
                "unparsed": results.unparsed,
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "max_rss_kib": usage.ru_maxrss,
                "changes": results.changes,
            },
            out,
        )
    for transport in transports:
        transport.abort()
    print("DONE", flush=True)
    return 0


def raise_open_files(want: int = 1 << 16) -> int:
    """Raise this process's open-file limit (a socket per stream) as far as its hard limit allows; the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return max(soft, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watch_client")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--entries", type=int, required=True)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    raise_open_files()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
