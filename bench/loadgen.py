"""HTTP load: wrk when it is installed, else a Python load generator (slower: the report says which ran).

Both return the same `LoadResult`: request count, errors, latency percentiles and the share of requests
slower than a threshold, measured over every request of the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .procs import pinned

PERCENTILES = (50.0, 75.0, 90.0, 99.0, 99.9)
SLOW_US = 100_000


@dataclass
class LoadResult:
    tool: str
    requests: int
    duration_s: float
    errors: int
    non_2xx: int
    min_us: float
    max_us: float
    mean_us: float
    slow: int  # requests slower than SLOW_US
    percentiles_us: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    def p(self, q: float) -> float:
        return self.percentiles_us[str(q)]

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rps": self.rps}


def loadgen_name() -> str:
    forced = os.environ.get("BENCH_LOADGEN", "")
    if forced == "python" or (forced != "wrk" and shutil.which("wrk") is None):
        return "python"
    return "wrk"


def wrk_version() -> str:
    if shutil.which("wrk") is None:
        return "not installed"
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0].strip()


def run_load(
    base_url: str,
    paths: Sequence[str],
    *,
    duration_s: float,
    connections: int,
    core: int | None,
    lua_request: str | None = None,
    lua_args: Sequence[str] = (),
) -> LoadResult:
    """Closed-loop load: `connections` keep-alive connections, each sending its next request on the last answer.

    `lua_request` replaces wrk's choice of path (Lua defining `request`, and `init` if it reads `lua_args`);
    the Python load generator, which cannot run it, cycles through `paths` instead.
    """
    if loadgen_name() == "wrk":
        return _wrk(
            base_url,
            paths,
            duration_s=duration_s,
            connections=connections,
            core=core,
            lua_request=lua_request,
            lua_args=lua_args,
        )
    return asyncio.run(_python_load(base_url, paths, duration_s=duration_s, connections=connections))


_WRK_SCRIPT = """
local paths = {%(paths)s}
local n = 0
%(request)s
done = function(summary, latency, requests)
  local slow = 0
  local counted = 0
  for i = 1, #latency do
    local v, c = latency(i)
    counted = counted + c
    if v > %(slow_us)d then slow = slow + c end
  end
  local ps = {}
  for _, q in ipairs({%(percentiles)s}) do
    ps[#ps + 1] = string.format('"%%s": %%d', tostring(q), latency:percentile(q))
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %%d, "duration_us": %%d, "connect": %%d, "read": %%d, "write": %%d, ' ..
    '"status": %%d, "timeout": %%d, "min_us": %%d, "max_us": %%d, "mean_us": %%f, "slow": %%d, ' ..
    '"counted": %%d, "percentiles_us": {%%s}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, slow, counted, table.concat(ps, ", ")))
end
"""

_WRK_REQUEST = """
request = function()
  n = n + 1
  return wrk.format("GET", paths[(n % #paths) + 1])
end
"""


def _wrk(
    base_url: str,
    paths: Sequence[str],
    *,
    duration_s: float,
    connections: int,
    core: int | None,
    lua_request: str | None = None,
    lua_args: Sequence[str] = (),
) -> LoadResult:
    script = _WRK_SCRIPT % {
        "paths": ", ".join(json.dumps(p) for p in (paths[:1] if lua_request else paths)),
        "request": lua_request or (_WRK_REQUEST if len(paths) > 1 else ""),
        "slow_us": SLOW_US,
        "percentiles": ", ".join(str(q) for q in PERCENTILES),
    }
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        seconds = max(1, round(duration_s))
        cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "-s", f.name]
        args = ["--", *lua_args] if lua_args else []
        out = subprocess.run(
            pinned([*cmd, base_url + paths[0], *args], core),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    finally:
        Path(f.name).unlink()
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {out.stdout}\n{out.stderr}")
    doc = json.loads(line.removeprefix("BENCHJSON "))
    return LoadResult(
        tool="wrk",
        requests=doc["requests"],
        duration_s=doc["duration_us"] / 1e6,
        errors=doc["connect"] + doc["read"] + doc["write"] + doc["timeout"],
        non_2xx=doc["status"],
        min_us=doc["min_us"],
        max_us=doc["max_us"],
        mean_us=doc["mean_us"],
        slow=doc["slow"],
        percentiles_us={str(float(k)): float(v) for k, v in doc["percentiles_us"].items()},
    )


def summarize(latencies_us: list[float], *, tool: str, duration_s: float, errors: int, non_2xx: int) -> LoadResult:
    ordered = sorted(latencies_us)
    n = len(ordered)

    def pct(q: float) -> float:
        return ordered[min(n - 1, max(0, int(q / 100 * n + 0.5) - 1))] if n else 0.0

    return LoadResult(
        tool=tool,
        requests=n,
        duration_s=duration_s,
        errors=errors,
        non_2xx=non_2xx,
        min_us=ordered[0] if n else 0.0,
        max_us=ordered[-1] if n else 0.0,
        mean_us=sum(ordered) / n if n else 0.0,
        slow=sum(1 for v in ordered if v > SLOW_US),
        percentiles_us={str(q): pct(q) for q in PERCENTILES},
    )


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(status, headers, body)


def request_bytes(host: str, port: int, path: str, *, close: bool = False) -> bytes:
    connection = "close" if close else "keep-alive"
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: {connection}\r\n\r\n".encode()


def _host_port(base_url: str) -> tuple[str, int]:
    hostport = base_url.split("://", 1)[1].rstrip("/")
    host, _, port = hostport.partition(":")
    return host, int(port)


async def _python_load(base_url: str, paths: Sequence[str], *, duration_s: float, connections: int) -> LoadResult:
    host, port = _host_port(base_url)
    latencies: list[float] = []
    errors = non_2xx = 0
    requests = [request_bytes(host, port, p) for p in paths]
    deadline = time.perf_counter() + duration_s

    async def client(offset: int) -> None:
        nonlocal errors, non_2xx
        reader, writer = await asyncio.open_connection(host, port)
        i = offset
        try:
            while time.perf_counter() < deadline:
                i += 1
                started = time.perf_counter()
                writer.write(requests[i % len(requests)])
                try:
                    reply = await read_reply(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    errors += 1
                    return
                latencies.append((time.perf_counter() - started) * 1e6)
                if not 200 <= reply.status < 400:
                    non_2xx += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(connections)))
    return summarize(latencies, tool="python", duration_s=time.perf_counter() - started, errors=errors, non_2xx=non_2xx)


@dataclass
class StampedeReply:
    latency_us: float
    sent_after_us: float  # when this request was sent, after the first one
    status: int
    cache: str


async def stampede(targets: Sequence[tuple[str, int]], path: str, count: int) -> list[StampedeReply]:
    """Open `count` connections (spread over `targets`), then send one request on each at once."""
    go = asyncio.Event()
    connected: list[int] = []
    first_sent: list[float] = []

    async def one(i: int) -> StampedeReply:
        host, port = targets[i % len(targets)]
        reader, writer = await asyncio.open_connection(host, port)
        try:
            connected.append(i)
            if len(connected) == count:
                go.set()
            await go.wait()
            sent = time.perf_counter()
            if not first_sent:
                first_sent.append(sent)
            writer.write(request_bytes(host, port, path, close=True))
            reply = await read_reply(reader)
            done = time.perf_counter()
            return StampedeReply(
                (done - sent) * 1e6, (sent - first_sent[0]) * 1e6, reply.status, reply.headers.get("x-cache", "")
            )
        finally:
            writer.close()

    return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(count))), timeout=120)
