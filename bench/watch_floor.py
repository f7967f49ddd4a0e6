"""Section 8's floor: what one fan-out costs this machine with no server at all. N loopback TCP connections,
accepted by this process (uvloop, on the server core), their other ends held by a reader process (the load
core) that reads and discards (or by R reader processes, like section 8's R client processes); then rounds
of one write of a patch-sized chunk to each connection, as uvicorn's send does for an event (`transport.write`,
one write(2) each). The time per round is the least a version's fan-out to N watchers can take in one process
here, whatever the server does above the socket; the process's own CPU per write compares with section 8's
CPU per delivery (both leave out the kernel's softirq time, which the round's time includes).

    python -m bench.watch_floor --count N [--rounds R] [--bytes B] [--reader-core C] [--readers R]

prints one JSON line: {"count": N, "bytes": B, "readers": R, "round_ms": [...], "us_per_write": [...],
"cpu_us_per_write": [...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from typing import cast

from .procs import pinned
from .watch_client import raise_open_files

_READER = """
import asyncio, sys
from bench.watch_client import raise_open_files
class Sink(asyncio.Protocol):
    def data_received(self, data): pass
async def main():
    loop = asyncio.get_running_loop()
    for _ in range(int(sys.argv[2])):
        await loop.create_connection(Sink, "127.0.0.1", int(sys.argv[1]))
    await asyncio.sleep(3600)
raise_open_files()
import uvloop
uvloop.run(main())
"""


async def measure(count: int, rounds: int, size: int, reader_core: int | None, readers: int = 1) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(cast(asyncio.Transport, transport))

    server = await loop.create_server(Accepted, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    shares = [count * (i + 1) // readers - count * i // readers for i in range(readers)]
    procs = [
        subprocess.Popen(pinned([sys.executable, "-c", _READER, str(port), str(share)], reader_core))
        for share in shares
    ]
    try:
        deadline = time.monotonic() + 60
        while len(transports) < count:
            if time.monotonic() > deadline or any(reader.poll() is not None for reader in procs):
                raise RuntimeError(f"{len(transports)} of {count} connections after 60 s")
            await asyncio.sleep(0.01)
        chunk = b"%x\r\n" % size + b"x" * size + b"\r\n"  # one event, as uvicorn frames it (chunked)
        round_ms, cpu_ms = [], []
        for _ in range(rounds):
            await asyncio.sleep(0.5)  # the reader has drained the last round
            started, cpu = time.perf_counter(), time.process_time()
            for transport in transports:
                transport.write(chunk)
            round_ms.append((time.perf_counter() - started) * 1000)
            cpu_ms.append((time.process_time() - cpu) * 1000)
    finally:
        for reader in procs:
            reader.kill()
            reader.wait()
        for transport in transports:
            transport.abort()
        server.close()
    return {
        "count": count,
        "bytes": size,
        "readers": readers,
        "round_ms": [round(ms, 2) for ms in round_ms],
        "us_per_write": [round(ms * 1000 / count, 2) for ms in round_ms],
        "cpu_us_per_write": [round(ms * 1000 / count, 2) for ms in cpu_ms],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.watch_floor")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--bytes", type=int, default=250)
    parser.add_argument("--reader-core", type=int, default=None)
    parser.add_argument("--readers", type=int, default=1)
    args = parser.parse_args(argv)
    raise_open_files()
    import uvloop

    result = uvloop.run(measure(args.count, args.rounds, args.bytes, args.reader_core, args.readers))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
