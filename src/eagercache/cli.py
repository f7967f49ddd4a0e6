"""`eagercache serve` and `eagercache fetchers`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import glob
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence

import uvicorn
from starlette.applications import Starlette

from .access import check_access
from .app import create_app
from .errors import ConfigurationError, EagerCacheError
from .fetchers import build_registry
from .logs import configure
from .memstore import build_store
from .metrics import MULTIPROC_DIR_ENV
from .settings import ENV_PREFIX, Settings, from_env, load_settings, read_config, to_environ
from .store import MEMORY_URL

# Seconds past --shutdown-timeout after which uvicorn cancels requests still running (none should be).
SHUTDOWN_BACKSTOP_S = 2.0
COUNT_OPTIONS = ("max_entries", "max_concurrency")  # the other fetcher options are seconds
log = logging.getLogger(__name__)
# `--workers`' metrics directories: <tempdir>/eagercache-metrics-<server pid>-<random>.
METRICS_DIR_PREFIX = "eagercache-metrics-"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eagercache", description="A refresh-ahead cache server.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetcher_help = "an extra fetcher as package.module:function (repeatable); entry points are always loaded"

    serve = commands.add_parser("serve", help="run the HTTP server and the refresher")
    serve.add_argument("--config", metavar="FILE", help="TOML settings file (EAGERCACHE_CONFIG); flags and env win")
    serve.add_argument("--host", help="address to listen on (EAGERCACHE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (EAGERCACHE_PORT, default 8000)")
    serve.add_argument("--redis-url", help="redis://… or memory:// (EAGERCACHE_REDIS_URL, default memory://)")
    serve.add_argument("--namespace", help="prefix of every Redis key (EAGERCACHE_NAMESPACE, default eagercache:)")
    serve.add_argument("--redis-username", metavar="USER", help="Redis ACL user (EAGERCACHE_REDIS_USERNAME)")
    for setting, text in _TLS_FILES.items():
        flag = f"--{setting.replace('_', '-')}"
        serve.add_argument(flag, metavar="FILE", help=f"{text} (EAGERCACHE_{setting.upper()}); rediss:// only")
    serve.add_argument("--fetchers", action="append", metavar="SPEC", help=fetcher_help)
    for setting, (metavar, text) in _TUNING.items():
        default = _default(setting)
        serve.add_argument(
            f"--{setting.replace('_', '-')}", type=type(default), metavar=metavar, help=f"{text} ({default})"
        )
    serve.add_argument(
        "--buckets",
        type=int,
        metavar="N",
        help="buckets entries spread over (unset: the store's; else 1, 256 on a cluster)",
    )
    serve.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument("--access-log", action="store_true", default=None, help="log every request (off by default)")
    serve.add_argument(
        "--expiry-events",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="shadow keys and Redis expired events as early hints (EAGERCACHE_EXPIRY_EVENTS, on); "
        "--no-expiry-events: the schedule alone, ~143 bytes less per entry",
    )
    serve.add_argument(
        "--workers", type=int, default=1, metavar="N", help="worker processes sharing the store (1); not a setting"
    )
    serve.add_argument(
        "--loop",
        choices=["auto", "uvloop", "asyncio"],
        default="auto",
        help="event loop (auto: uvloop when installed); not a setting",
    )
    serve.add_argument(
        "--http",
        choices=["auto", "httptools", "h11"],
        default="auto",
        help="HTTP parser (auto: httptools when installed); not a setting",
    )

    listing = commands.add_parser("fetchers", help="list the registered fetchers")
    listing.add_argument("--fetchers", action="append", metavar="SPEC", help=fetcher_help)
    listing.add_argument("--config", metavar="FILE", help="TOML settings file (EAGERCACHE_CONFIG): shows its overrides")
    return parser


_TLS_FILES = {
    "redis_ca_file": "PEM file of the CA that signed the server's certificate",
    "redis_cert_file": "PEM client certificate (mutual TLS)",
    "redis_key_file": "PEM key of the client certificate",
}
# Numeric settings as flags: metavar and help; the default comes from Settings, the one place it is written.
_TUNING = {
    "redis_max_connections": ("N", "Redis connections per process"),
    "max_concurrent_fetches": ("N", "fetches at once per process"),
    "backstop_interval": ("S", "re-read the refresh schedule at least every S seconds"),
    "near_cache_ttl": ("S", "serve entries from process memory for S seconds"),
    "shutdown_timeout": ("S", "seconds from SIGTERM that readers and fetches get before exiting"),
    "read_budget": ("S", "seconds a reader waits for Redis before grace or 503"),
    "max_watchers": ("N", "open /watch streams per process; more get a 503"),
    "watch_ping": ("S", "seconds between pings on a /watch stream"),
}


def _default(setting: str) -> object:
    """A setting's default, from the one place defaults are written (settings.Settings)."""
    return getattr(Settings(), setting)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "fetchers":
            return _list_fetchers(args.fetchers or (), args.config or os.environ.get(f"{ENV_PREFIX}CONFIG"))
        return _serve(vars(args))
    except EagerCacheError as exc:  # configuration, or a store that cannot work: one line, no traceback
        print(f"eagercache: {exc.detail}", file=sys.stderr)
        return 2


def _serve(flags: dict[str, object]) -> int:
    flags.pop("command")
    workers = flags.pop("workers")
    assert isinstance(workers, int)
    loop, http = _stack(str(flags.pop("loop")), str(flags.pop("http")))
    if workers < 1:
        raise ConfigurationError(f"--workers must be at least 1, got {workers}")
    if flags["fetchers"] is not None:
        flags["fetchers"] = tuple(flags["fetchers"])  # type: ignore[arg-type]
    settings = load_settings(flags)
    configure(settings.log_level, settings.log_format)
    app = create_app(
        settings=settings, use_entry_points=True, handle_signals=True, date_header=True
    )  # checks fetchers now
    if workers > 1 and settings.redis_url.startswith(MEMORY_URL):
        raise ConfigurationError("--workers needs a shared store: memory:// belongs to one process (use redis://)")
    asyncio.run(_preflight(settings))
    log.info("server stack", extra={"loop": loop, "http": http, "workers": workers})
    common = {
        "loop": loop,
        "http": http,
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": settings.access_log,
        "lifespan": "on",
        "server_header": False,
        "date_header": False,  # the app sends Date from the store's clock (app.DateHeader)
        # The app answers waiting readers 503 at shutdown_timeout after SIGTERM; this is the server's backstop.
        "timeout_graceful_shutdown": settings.shutdown_timeout + SHUTDOWN_BACKSTOP_S,
    }
    if workers == 1:
        server = uvicorn.Server(uvicorn.Config(app, **common))  # type: ignore[arg-type]
        _freeze_startup_objects()
        server.run()
        return 0 if server.started else 1
    # Each worker is a new process that builds its own app: hand it the resolved settings through the
    # environment, where load_settings() finds them (flags > env > file is already applied).
    os.environ.update(to_environ(settings))
    with _metrics_directory():
        uvicorn.run("eagercache.cli:worker_app", factory=True, workers=workers, **common)  # type: ignore[arg-type]
    return 0


@contextlib.contextmanager
def _metrics_directory() -> Iterator[str]:
    """A new, empty directory for prometheus-client's multiprocess mode while the workers run.

    Set before uvicorn spawns the workers, which import prometheus_client afresh and so keep their values in
    files there, one set per worker pid; any worker's scrape merges them all (metrics.Metrics). New at every
    start, as prometheus-client requires (old files would be counted again), and removed at exit.
    """
    _remove_orphaned_metrics_directories()
    path = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    os.environ[MULTIPROC_DIR_ENV] = path  # a directory the user set is replaced: it may hold another run's files
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _remove_orphaned_metrics_directories() -> None:
    """Remove the metrics directories of servers that ended without removing their own (killed with SIGKILL,
    or a machine that lost power): each is named after its server's pid, and one whose pid no longer runs
    is nobody's. A pid reused since is taken to be alive: that directory stays, as it did before."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{METRICS_DIR_PREFIX}*-*")):
        pid = os.path.basename(path)[len(METRICS_DIR_PREFIX) :].partition("-")[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stack(loop: str, http: str) -> tuple[str, str]:
    """The event loop and HTTP parser to run: "auto" is the fast one when it is installed (uvicorn's own rule,
    resolved here so the start-up line names what runs); asking for one that is not installed is an error."""
    installed = {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools")}
    for wanted, fast in ((loop, "uvloop"), (http, "httptools")):
        if wanted == fast and not installed[fast]:
            raise ConfigurationError(f"{fast} is not installed here (pip install {fast}); use auto to fall back")
    loop = loop if loop != "auto" else "uvloop" if installed["uvloop"] else "asyncio"
    http = http if http != "auto" else "httptools" if installed["httptools"] else "h11"
    return loop, http


def worker_app() -> Starlette:
    """The app of one `--workers` process, from the settings the parent put in the environment."""
    settings = load_settings()
    configure(settings.log_level, settings.log_format)
    app = create_app(settings=settings, use_entry_points=True, handle_signals=True, date_header=True)
    _freeze_startup_objects()
    return app


def _freeze_startup_objects() -> None:
    """Leave what start-up built (modules, the app, the fetchers: ~50,000 objects) out of garbage collection.
    They live as long as the process, and every full collection would walk them again: tens of ms that
    land on the requests of that moment (a hit's p99)."""
    gc.collect()
    gc.freeze()


async def _preflight(settings: Settings) -> None:
    """Reach the store before uvicorn starts, so a bad URL or a server that is down is one clear line, not a traceback.

    (A server without expiry events is not an error: the refresher then runs on the schedule alone.)
    """
    store = build_store(
        settings.redis_url, namespace=settings.namespace, buckets=settings.buckets, auth=settings.redis_auth()
    )
    try:
        await store.open()
        await check_access(store)
        await store.prepare()  # a bucket count that differs from the store's is refused here
        await store.ping()
    finally:
        await store.aclose()


def _list_fetchers(specs: Sequence[str], config: str | None) -> int:
    # Only what the listing needs: an unrelated bad setting (a port) must not stop it.
    from_file = read_config(config)
    specs = specs or from_env("fetchers", os.environ.get(f"{ENV_PREFIX}FETCHERS", "")) or from_file.get("fetchers", ())
    registry = build_registry(specs=specs, use_entry_points=True, overrides=from_file.get("fetcher_overrides", {}))
    if not registry:
        print("no fetchers registered (entry-point group eagercache.fetchers, or --fetchers package.module:function)")
        return 0
    for f in registry.values():
        params = ", ".join(
            f"{p.name}: {_type_name(p.annotation)}" + ("" if p.required else f" = {p.default!r}")
            for p in f.signature.params
        )
        options = " ".join(
            _option(option, value)
            for option, value in f.options.as_dict().items()
            if value is not None and value is not False and value != ()
        )
        print(f"{f.name}({params})  {options}  [{f.source}]")
    return 0


def _option(option: str, value: object) -> str:
    if value is True:
        return option
    if isinstance(value, tuple):
        return f"{option}={','.join(value)}"
    if option == "max_rate":
        return f"{option}={value:g}/s"
    return f"{option}={value:g}{'' if option in COUNT_OPTIONS else 's'}"


def _type_name(annotation: object) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


if __name__ == "__main__":
    sys.exit(main())
