"""Settings: command-line flags over `EAGERCACHE_*` environment variables over a TOML file over defaults.

The file (`--config eagercache.toml`) takes the same names as the flags, with underscores, and one
`[fetcher.NAME]` table per fetcher whose timing or limits the operator overrides without touching code:

    redis_url = "redis://cache:6379/0"
    [fetcher.rates]
    ttl = 10
    max_idle = 600
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from .errors import ConfigurationError
from .fetchers import OPTION_NAMES, FetcherOptions
from .keys import DEFAULT_NAMESPACE, MAX_BUCKETS, check_namespace
from .store import DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_BUDGET_S, MEMORY_URL, Auth, redact
from .topology import URL_SCHEMES

ENV_PREFIX = "EAGERCACHE_"
# Settings with no command-line flag: a secret in argv is visible to every user of the machine (ps),
# and per-fetcher tables only make sense in the file.
NO_FLAG = frozenset({"admin_token", "redis_password", "fetcher_overrides"})
# Secrets: never logged, shown or put in a problem document; each can also come from a file, named by
# EAGERCACHE_<NAME>_FILE (container platforms mount secrets as files).
SECRETS = frozenset({"admin_token", "redis_password"})
FILE_SUFFIX = "_FILE"
LogFormat = Literal["text", "json"]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    config: str | None = None
    """A TOML file with settings and `[fetcher.NAME]` overrides."""
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str = MEMORY_URL
    redis_username: str | None = None
    """The ACL user (instead of one in the URL)."""
    redis_password: str | None = None
    """The ACL user's password: EAGERCACHE_REDIS_PASSWORD or EAGERCACHE_REDIS_PASSWORD_FILE, never a flag."""
    redis_ca_file: str | None = None
    """PEM file of the CA that signed the server's certificate (rediss://); the system's CAs otherwise."""
    redis_cert_file: str | None = None
    """PEM client certificate, for servers that require one (mutual TLS)."""
    redis_key_file: str | None = None
    """PEM private key of the client certificate."""
    namespace: str = DEFAULT_NAMESPACE
    buckets: int | None = None
    """Buckets the entries are spread over (Redis Cluster slots); unset: what the store already uses, else 1
    on one server and 256 on a cluster. Fixed for the life of the namespace's data."""
    fetchers: tuple[str, ...] = ()
    """Extra fetchers as `package.module:function`, besides the `eagercache.fetchers` entry points."""
    redis_max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Connections to Redis per process (the pub/sub one included); commands wait for a free one."""
    max_concurrent_fetches: int = 64
    """Fetches running at once in this process (reads and refreshes); more wait their turn."""
    near_cache_ttl: float = 0.25
    """Seconds an entry read from Redis is served from process memory; another replica's write shows this late."""
    expiry_events: bool = True
    """Keep a shadow key per entry and follow Redis `expired` events as early hints that entries are due.
    false: the schedule alone (one backstop interval at most later for an entry written by a replica that
    died), ~143 bytes less per entry in Redis and no event traffic to parse. memory:// never has them."""
    backstop_interval: float = 1.0
    """Seconds: the schedule is re-read at least this often, bounding how late a lost event makes a refresh."""
    shutdown_timeout: float = 10.0
    """Seconds from SIGTERM that readers and in-flight fetches get; then readers get a 503 and the process exits."""
    read_budget: float = DEFAULT_READ_BUDGET_S
    """Seconds a reader waits for Redis; past it a recently served entry is answered from memory (STALE), else 503."""
    max_watchers: int = 10_000
    """Open /watch streams per process; past it a 503 `too-many-watchers` with Retry-After."""
    watch_ping: float = 15.0
    """Seconds between `: ping` comments on a /watch stream, so that proxies keep it open."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: LogFormat = "text"
    access_log: bool = False
    admin_token: str | None = None
    """Bearer token for /admin; the admin API is off without one."""
    fetcher_overrides: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    """From the config file's `[fetcher.NAME]` tables."""

    def redis_auth(self) -> Auth:
        return Auth(
            self.redis_username, self.redis_password, self.redis_ca_file, self.redis_cert_file, self.redis_key_file
        )

    def __repr__(self) -> str:
        shown = {
            field: ("***" if field in SECRETS and value is not None else value)
            for field in self.__struct_fields__
            if (value := getattr(self, field)) is not None
        }
        shown["redis_url"] = redact(self.redis_url)
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        check_namespace(self.namespace)
        if self.buckets is not None and not 1 <= self.buckets <= MAX_BUCKETS:
            raise ValueError(f"buckets must be 1-{MAX_BUCKETS}, got {self.buckets}")
        if self.redis_max_connections < 2:
            raise ValueError(f"redis_max_connections must be at least 2, got {self.redis_max_connections}")
        if self.max_concurrent_fetches < 1:
            raise ValueError(f"max_concurrent_fetches must be at least 1, got {self.max_concurrent_fetches}")
        if not 0 < self.backstop_interval <= 60:
            raise ValueError(f"backstop_interval must be > 0 and <= 60 seconds, got {self.backstop_interval}")
        if self.admin_token is not None and (len(self.admin_token) < 16 or any(c.isspace() for c in self.admin_token)):
            raise ValueError("admin_token must be at least 16 characters, without whitespace (or unset: no admin API)")
        if not 0 <= self.near_cache_ttl <= 60:
            raise ValueError(f"near_cache_ttl must be >= 0 and <= 60 seconds, got {self.near_cache_ttl}")
        if not 0.01 <= self.read_budget <= 10:
            raise ValueError(f"read_budget must be >= 0.01 and <= 10 seconds, got {self.read_budget}")
        if self.max_watchers < 0:
            raise ValueError(f"max_watchers must be >= 0, got {self.max_watchers}")
        if not 0 < self.watch_ping <= 300:
            raise ValueError(f"watch_ping must be > 0 and <= 300 seconds, got {self.watch_ping}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if not self.redis_url.startswith(URL_SCHEMES):
            raise ValueError(
                f"redis_url must start with {', '.join(URL_SCHEMES[:-1])} or {URL_SCHEMES[-1]}, "
                f"got {redact(self.redis_url)!r}"
            )
        tls_files = [f for f in ("redis_ca_file", "redis_cert_file", "redis_key_file") if getattr(self, f)]
        if tls_files and not self.redis_url.startswith(("rediss://", "rediss+sentinel://")):
            raise ValueError(f"{tls_files[0]} needs a rediss:// (TLS) redis_url, got {redact(self.redis_url)!r}")
        if (self.redis_cert_file is None) != (self.redis_key_file is None):
            raise ValueError("redis_cert_file and redis_key_file go together (a client certificate and its key)")


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings: `overrides` (flags; None values ignored) over the environment over the config file."""
    environ = os.environ if environ is None else environ
    fields = set(Settings.__struct_fields__) - {"fetcher_overrides"}
    from_environ: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and (field := name[len(ENV_PREFIX) :].lower()) in fields:
            from_environ[field] = from_env(field, value)
    for field in SECRETS:
        variable = f"{ENV_PREFIX}{field.upper()}{FILE_SUFFIX}"
        if (path := environ.get(variable)) is not None:
            if field in from_environ:
                raise ConfigurationError(f"set {ENV_PREFIX}{field.upper()} or {variable}, not both")
            from_environ[field] = _read_secret(variable, path)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    path = flags.get("config", from_environ.get("config"))
    raw = {**read_config(path), **from_environ, **flags}
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"invalid setting: {_with_env_name(str(exc), path)}") from exc


def _read_secret(variable: str, path: str) -> str:
    """A secret from the file `variable` names, without the line end editors and `echo` add."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{variable}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc


def read_config(path: str | None) -> dict[str, Any]:
    """The config file's settings, its `[fetcher.NAME]` tables as FetcherOverrides under `fetcher_overrides`."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as file:
            raw = msgspec.toml.decode(file.read())
    except OSError as exc:
        raise ConfigurationError(f"config file {path}: cannot read it: {exc.strerror}") from exc
    except msgspec.DecodeError as exc:
        raise ConfigurationError(f"config file {path}: not valid TOML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigurationError(f"config file {path}: expected a TOML table")
    if "config" in raw:
        raise ConfigurationError(f"config file {path}: `config` cannot be set inside a config file")
    if "fetcher_overrides" in raw:
        raise ConfigurationError(f"config file {path}: unknown setting `fetcher_overrides` (use [fetcher.NAME])")
    for field in ("log_level", "log_format"):
        if isinstance(raw.get(field), str):
            raw[field] = from_env(field, raw[field])
    tables = raw.pop("fetcher", {})
    if not isinstance(tables, dict):
        raise ConfigurationError(f"config file {path}: `fetcher` must be tables, [fetcher.NAME]")
    overrides = {}
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise ConfigurationError(f"config file {path}: [fetcher.{name}] must be a table")
        if unknown := sorted(set(table) - OPTION_NAMES):
            raise ConfigurationError(f"config file {path}: [fetcher.{name}]: unknown setting `{unknown[0]}`")
        try:
            msgspec.convert(table, FetcherOptions)  # types only; ranges are checked when the fetcher is built
        except msgspec.ValidationError as exc:
            raise ConfigurationError(f"config file {path}: [fetcher.{name}]: {_plain(str(exc))}") from exc
        overrides[name] = table
    if overrides:
        raw["fetcher_overrides"] = overrides
    return raw


def _plain(message: str) -> str:
    """msgspec's "Object contains unknown field `x`" / "... - at `$.ttl`", in operators' words."""
    if message.startswith("Object contains unknown field"):
        return f"unknown setting {message.rsplit(' ', 1)[-1]}"
    head, _, tail = message.partition(" - at `$.")
    return f"{tail.rstrip('`')}: {head}" if tail else message


def to_environ(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """EAGERCACHE_* variables that load_settings() turns back into these settings (for worker processes).

    The config file's per-fetcher tables travel as EAGERCACHE_CONFIG, the file's path; a secret read
    from a file stays there (its _FILE variable travels), so it is never copied into the environment.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for field in Settings.__struct_fields__:
        value = getattr(settings, field)
        if field == "fetcher_overrides" or value is None:
            continue
        if field in SECRETS and f"{ENV_PREFIX}{field.upper()}{FILE_SUFFIX}" in environ:
            continue
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        out[f"{ENV_PREFIX}{field.upper()}"] = str(value)
    return out


def from_env(field: str, value: str) -> Any:
    """Parse one setting's environment text (comma-separated lists, case-insensitive enums)."""
    if field == "fetchers":
        return tuple(spec.strip() for spec in value.split(",") if spec.strip())
    if field in ("log_level", "log_format"):
        return value.upper() if field == "log_level" else value.lower()
    return value


def _with_env_name(message: str, config_path: str | None) -> str:
    """Name the setting as operators know it: --port / EAGERCACHE_PORT / port in the config file."""
    if "`$." in message:  # a type error: msgspec says "... - at `$.port`"
        head, _, tail = message.partition("`$.")
        field = tail.split("`", 1)[0]
        detail = head.removesuffix(" - at ")
    else:  # a range check from __post_init__, which starts with the field's name
        field = message.split(" ", 1)[0]
        detail = message
        if field not in Settings.__struct_fields__:
            return _plain(message) + (f" in {config_path}" if config_path is not None else "")
    where = (
        f"{ENV_PREFIX}{field.upper()}"
        if field in NO_FLAG
        else f"--{field.replace('_', '-')} / {ENV_PREFIX}{field.upper()}"
    )
    if config_path is not None:
        where += f" / {field} in {config_path}"
    return f"{field} ({where}): {detail}"
