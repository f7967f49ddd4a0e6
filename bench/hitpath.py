"""Section 1: warm hits of one entry on one uvicorn worker, against a bare Starlette app, in alternating rounds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from .config import Config
from .loadgen import run_load
from .procs import BIN, Cores, Proc, bench_env, free_port

PATH = "/data/quote"
# Headers that differ per answer or that Starlette sets itself.
_DYNAMIC_HEADERS = {"date", "content-length", "server"}


def eagercache_cmd(port: int, redis_url: str, namespace: str, fetchers: str) -> list[str]:
    return [
        str(BIN / "eagercache"),
        "serve",
        "--port",
        str(port),
        "--redis-url",
        redis_url,
        "--namespace",
        namespace,
        "--fetchers",
        fetchers,
        "--log-level",
        "WARNING",
    ]


def run_hit_path(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    env = bench_env(BENCH_REDIS_URL=redis_url)
    ec_port, bare_port = free_port(), free_port()
    ec_cmd = eagercache_cmd(ec_port, redis_url, "hit:", "bench.fetchers:quote")
    ec = Proc("eagercache", ec_cmd, core=cores.server, env=env)
    bare: Proc | None = None
    try:
        ec.wait_http(f"http://127.0.0.1:{ec_port}/readyz")
        ec_url = f"http://127.0.0.1:{ec_port}"
        first = httpx.get(ec_url + PATH, timeout=10)
        warm = httpx.get(ec_url + PATH, timeout=10)
        if warm.status_code != 200 or warm.headers.get("x-cache") != "HIT":
            raise RuntimeError(f"no warm hit: {warm.status_code} {warm.headers}")
        headers = {k: v for k, v in warm.headers.items() if k not in _DYNAMIC_HEADERS}
        response_file = workdir / "hit-response.json"
        response_file.write_text(json.dumps({"body": warm.content.decode(), "headers": headers}))
        bare_cmd = [
            str(BIN / "python"),
            "-m",
            "bench.bare_app",
            "--port",
            str(bare_port),
            "--response",
            str(response_file),
        ]
        bare = Proc("bare", bare_cmd, core=cores.server)
        bare.wait_http(f"http://127.0.0.1:{bare_port}/healthz")
        bare_url = f"http://127.0.0.1:{bare_port}"
        check = httpx.get(bare_url + PATH, timeout=10)
        same = (
            check.content == warm.content
            and {k: v for k, v in check.headers.items() if k not in _DYNAMIC_HEADERS} == headers
        )
        systems = {"eagercache": ec_url, "bare": bare_url}
        for url in systems.values():
            run_load(url, [PATH], duration_s=cfg.hit_warmup_seconds, connections=cfg.hit_connections, core=cores.load)
        rounds: list[dict[str, Any]] = []
        for r in range(cfg.hit_rounds):
            order = ["eagercache", "bare"] if r % 2 == 0 else ["bare", "eagercache"]
            row: dict[str, Any] = {"order": order}
            for name in order:
                row[name] = run_load(
                    systems[name], [PATH], duration_s=cfg.hit_seconds, connections=cfg.hit_connections, core=cores.load
                ).to_json()
            rounds.append(row)
        cpu = {"eagercache": ec.cpu_seconds(), "bare": bare.cpu_seconds()}
    finally:
        ec.close()
        if bare is not None:
            bare.close()
    profile = profile_hit_path(cfg, cores, [*ec_cmd[:2], "--port", str(free_port()), *ec_cmd[4:]], env, workdir)
    return {
        "path": PATH,
        "body_bytes": len(warm.content),
        "body": warm.content.decode(),
        "headers": headers,
        "first_cache": first.headers.get("x-cache"),
        "bare_same_bytes": same,
        "connections": cfg.hit_connections,
        "seconds": cfg.hit_seconds,
        "rounds": rounds,
        "ratios": _ratios(rounds),
        "server_cpu_seconds": cpu,
        "profile": profile,
    }


def _ratios(rounds: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per round: eagercache / bare, for req/s, p50 and p99."""
    out: dict[str, list[float]] = {"rps": [], "p50": [], "p99": []}
    for row in rounds:
        ec, bare = row["eagercache"], row["bare"]
        out["rps"].append(ec["rps"] / bare["rps"])
        out["p50"].append(ec["percentiles_us"]["50.0"] / bare["percentiles_us"]["50.0"])
        out["p99"].append(ec["percentiles_us"]["99.0"] / bare["percentiles_us"]["99.0"])
    return out


def profile_hit_path(
    cfg: Config, cores: Cores, ec_cmd: list[str], env: dict[str, str], workdir: Path
) -> dict[str, Any]:
    """py-spy attaches to a fresh eagercache server (same command) while wrk sends it warm hits."""
    pyspy = BIN / "py-spy"
    if not pyspy.exists():
        return {"error": "py-spy is not installed in the venv"}
    port = int(ec_cmd[ec_cmd.index("--port") + 1])
    raw = workdir / "hit-profile.txt"
    rate = 250
    server = Proc("eagercache (profiled)", ec_cmd, core=cores.server, env=env)
    output = ""
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_http(url + "/readyz")
        httpx.get(url + PATH, timeout=10)
        run_load(url, [PATH], duration_s=1, connections=cfg.hit_connections, core=cores.load)
        cmd = [
            str(pyspy),
            "record",
            "--pid",
            str(server.pid),
            "--function",
            "--rate",
            str(rate),
            "--duration",
            str(round(cfg.profile_seconds)),
            "--format",
            "raw",
            "--output",
            str(raw),
        ]
        spy = Proc("py-spy", cmd, core=cores.load, env=env)
        try:
            load = run_load(
                url, [PATH], duration_s=cfg.profile_seconds + 1, connections=cfg.hit_connections, core=cores.load
            )
            spy.process.wait(60)
            output = spy.output()
        finally:
            spy.close()
    finally:
        server.close()
    if not raw.exists():
        return {"error": f"py-spy wrote no profile: {output[-2000:]}"}
    summary = summarize_profile(raw.read_text())
    summary["rps_while_profiling"] = load.rps
    summary["rate_hz"] = rate
    summary["command"] = "py-spy record --pid <eagercache serve> --function --rate 250 --format raw"
    return summary


def _frame_name(frame: str) -> str:
    """`func (path/to/module.py:line)` -> `func (package/module.py)`, without the site-packages prefix."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{func} ({path})"


def _package(frame: str) -> str:
    path = frame.partition(" (")[2]
    top = path.split("/", 1)[0] if "/" in path else path.rstrip(")")
    if top.startswith("<frozen") or top.endswith(".py)") or top.endswith(".py"):
        return "python stdlib"
    return {
        "asyncio": "asyncio (stdlib)",
        "logging": "python stdlib",
        "email": "python stdlib",
        "http": "python stdlib",
        "urllib": "python stdlib",
    }.get(top, top)


def summarize_profile(text: str, top: int = 25) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, c / total) for name, c in counter.most_common(n)] if total else []

    ours = Counter({k: v for k, v in inclusive.items() if k.split(" (", 1)[1].startswith("eagercache/")})
    return {
        "samples": total,
        "self": share(own, top),
        "inclusive": share(inclusive, top),
        "eagercache_inclusive": share(ours, top),
        "packages_self": share(packages, 15),
    }
