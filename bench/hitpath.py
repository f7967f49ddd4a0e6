"""Section 1: warm hits of one entry on one uvicorn worker, against a bare Starlette app, in alternating rounds.

On both server stacks, in the same run: fast = uvloop + httptools (what `eagercache serve` picks by default where
they are installed), plain = asyncio + h11. Each stack's bare app runs on the same loop and parser.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from .config import Config
from .loadgen import LoadResult, run_load
from .procs import BIN, Cores, Proc, bench_env, free_port, pyspy_record

PATH = "/data/quote"
# Headers that differ per answer or that Starlette sets itself.
_DYNAMIC_HEADERS = {"date", "content-length", "server"}
# name -> (--loop, --http), for `eagercache serve` and the baseline apps alike.
STACKS: dict[str, tuple[str, str]] = {"fast": ("uvloop", "httptools"), "plain": ("asyncio", "h11")}
PROFILE_STACK = "fast"
# Issues 15 and 16: on the fast stack, eagercache's warm hits at >= 0.90x the bare app's req/s, p99 <= 1.3x.
GOAL = {"stack": "fast", "rps_ratio": 0.90, "p99_ratio": 1.3}
PROFILE_RATE_HZ = 250


def stack_args(stack: str) -> list[str]:
    loop, http = STACKS[stack]
    return ["--loop", loop, "--http", http]


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


def _static(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in _DYNAMIC_HEADERS}


def run_hit_path(cfg: Config, cores: Cores, redis_url: str, workdir: Path) -> dict[str, Any]:
    env = bench_env(BENCH_REDIS_URL=redis_url)
    procs: list[Proc] = []
    by_system: dict[tuple[str, str], Proc] = {}  # (stack, system) -> its server
    ec_cmds: dict[str, list[str]] = {}
    urls: dict[str, dict[str, str]] = {}  # stack -> system -> base URL
    firsts: dict[str, str | None] = {}
    warms: dict[str, httpx.Response] = {}
    try:
        for stack in STACKS:
            port = free_port()
            ec_cmds[stack] = [*eagercache_cmd(port, redis_url, "hit:", "bench.fetchers:quote"), *stack_args(stack)]
            ec = Proc(f"eagercache ({stack})", ec_cmds[stack], core=cores.server, env=env)
            procs.append(ec)
            by_system[stack, "eagercache"] = ec
            url = f"http://127.0.0.1:{port}"
            ec.wait_http(url + "/readyz")
            firsts[stack] = httpx.get(url + PATH, timeout=10).headers.get("x-cache")
            warm = httpx.get(url + PATH, timeout=10)
            if warm.status_code != 200 or warm.headers.get("x-cache") != "HIT":
                raise RuntimeError(f"no warm hit on the {stack} stack: {warm.status_code} {warm.headers}")
            warms[stack] = warm
            urls[stack] = {"eagercache": url}
        warm = warms[PROFILE_STACK]
        headers = _static(warm)
        response_file = workdir / "hit-response.json"
        response_file.write_text(json.dumps({"body": warm.content.decode(), "headers": headers}))
        same: dict[str, bool] = {}
        for stack in STACKS:
            port = free_port()
            bare_cmd = [
                str(BIN / "python"),
                "-m",
                "bench.bare_app",
                "--port",
                str(port),
                "--response",
                str(response_file),
                *stack_args(stack),
            ]
            bare = Proc(f"bare ({stack})", bare_cmd, core=cores.server)
            procs.append(bare)
            by_system[stack, "bare"] = bare
            url = f"http://127.0.0.1:{port}"
            bare.wait_http(url + "/healthz")
            check = httpx.get(url + PATH, timeout=10)
            # The bare apps send what the fast stack's eagercache answered (Age and max-age may have moved on
            # since on the other stack's); each stack's eagercache sends the same body.
            same[stack] = check.content == warm.content == warms[stack].content and _static(check) == headers
            urls[stack]["bare"] = url
        for systems in urls.values():
            for url in systems.values():
                run_load(
                    url, [PATH], duration_s=cfg.hit_warmup_seconds, connections=cfg.hit_connections, core=cores.load
                )
        rounds: dict[str, list[dict[str, Any]]] = {stack: [] for stack in STACKS}
        for r in range(cfg.hit_rounds):
            stacks = list(STACKS) if r % 2 == 0 else list(reversed(STACKS))
            for i, stack in enumerate(stacks):
                order = ["eagercache", "bare"] if (r + i) % 2 == 0 else ["bare", "eagercache"]
                row: dict[str, Any] = {"order": order}
                for name in order:
                    load = partial(
                        run_load,
                        urls[stack][name],
                        [PATH],
                        duration_s=cfg.hit_seconds,
                        connections=cfg.hit_connections,
                        core=cores.load,
                    )
                    row[name] = with_cpu(by_system[stack, name], load)
                rounds[stack].append(row)
        cpu = {proc.name: proc.cpu_seconds() for proc in procs}
    finally:
        for proc in procs:
            proc.close()
    fast_cmd = ec_cmds[PROFILE_STACK]
    profile = profile_hit_path(cfg, cores, [*fast_cmd[:2], "--port", str(free_port()), *fast_cmd[4:]], env, workdir)
    by_stack = {
        stack: {
            "loop": STACKS[stack][0],
            "http": STACKS[stack][1],
            "first_cache": firsts[stack],
            "bare_same_bytes": same[stack],
            "rounds": rounds[stack],
            "ratios": _ratios(rounds[stack]),
            "server_cpu_seconds": {
                "eagercache": cpu[f"eagercache ({stack})"],
                "bare": cpu[f"bare ({stack})"],
            },
        }
        for stack in STACKS
    }
    fast = by_stack[PROFILE_STACK]
    return {
        "path": PATH,
        "body_bytes": len(warm.content),
        "body": warm.content.decode(),
        "headers": headers,
        "first_cache": firsts[next(iter(STACKS))],
        "connections": cfg.hit_connections,
        "seconds": cfg.hit_seconds,
        "goal": GOAL,
        "stacks": by_stack,
        # The fast stack's figures at the top level too, where earlier reports read them.
        "bare_same_bytes": fast["bare_same_bytes"],
        "rounds": fast["rounds"],
        "ratios": fast["ratios"],
        "server_cpu_seconds": fast["server_cpu_seconds"],
        "profile": profile,
    }


def with_cpu(server: Proc, load: Callable[[], LoadResult]) -> dict[str, Any]:
    """A load run's results, with the server's CPU time over it: CPU µs per request does not depend on what
    else the machine runs, where req/s and latency do."""
    before = server.cpu_seconds()
    result = load()
    cpu = server.cpu_seconds() - before
    per_request = cpu / result.requests * 1e6 if result.requests else 0.0
    return {**result.to_json(), "server_cpu_s": cpu, "cpu_us_per_request": per_request}


def _ratios(rounds: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per round: eagercache / bare, for req/s, p50 and p99."""
    return ratios(rounds, "eagercache", "bare")


def ratios(rounds: list[dict[str, Any]], system: str, baseline: str) -> dict[str, list[float]]:
    """Per round: system / baseline, for req/s, p50 and p99 (rounds hold LoadResult.to_json() by name)."""
    out: dict[str, list[float]] = {"rps": [], "p50": [], "p99": []}
    for row in rounds:
        ec, bare = row[system], row[baseline]
        out["rps"].append(ec["rps"] / bare["rps"])
        out["p50"].append(ec["percentiles_us"]["50.0"] / bare["percentiles_us"]["50.0"])
        out["p99"].append(ec["percentiles_us"]["99.0"] / bare["percentiles_us"]["99.0"])
    return out


def profile_hit_path(
    cfg: Config, cores: Cores, ec_cmd: list[str], env: dict[str, str], workdir: Path
) -> dict[str, Any]:
    """py-spy attaches to a fresh eagercache server (same command) while wrk sends it warm hits."""
    if not (BIN / "py-spy").exists():
        return {"error": "py-spy is not installed in the venv"}
    port = int(ec_cmd[ec_cmd.index("--port") + 1])
    server = Proc("eagercache (profiled)", ec_cmd, core=cores.server, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_http(url + "/readyz")
        httpx.get(url + PATH, timeout=10)
        run_load(url, [PATH], duration_s=1, connections=cfg.hit_connections, core=cores.load)
        return profile_during(
            server.pid,
            cfg.profile_seconds,
            workdir / "hit-profile.txt",
            cores,
            env,
            lambda seconds: run_load(url, [PATH], duration_s=seconds, connections=cfg.hit_connections, core=cores.load),
        )
    finally:
        server.close()


def profile_during(
    pid: int,
    seconds: float,
    raw: Path,
    cores: Cores,
    env: dict[str, str],
    load: Callable[[float], LoadResult],
) -> dict[str, Any]:
    """`py-spy record --function --format raw` on a running server for `seconds`, while `load(seconds + 1)` runs."""
    cmd = pyspy_record(pid, seconds, raw, PROFILE_RATE_HZ)
    if cmd is None:
        return {"error": "py-spy is not installed in the venv"}
    spy = Proc("py-spy", cmd, core=cores.load, env=env)
    try:
        result = load(seconds + 1)
        spy.process.wait(60)
        output = spy.output()
    finally:
        spy.close()
    if not raw.exists():
        return {"error": f"py-spy wrote no profile: {output[-2000:]}"}
    summary = summarize_profile(raw.read_text())
    summary["rps_while_profiling"] = result.rps
    summary["rate_hz"] = PROFILE_RATE_HZ
    summary["command"] = f"py-spy record --pid <eagercache serve> --function --rate {PROFILE_RATE_HZ} --format raw"
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
