"""Settings, from command-line flags over `EAGERCACHE_*` environment variables over defaults."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from .errors import ConfigurationError
from .keys import DEFAULT_NAMESPACE
from .store import DEFAULT_MAX_CONNECTIONS, MEMORY_URL

ENV_PREFIX = "EAGERCACHE_"
LogFormat = Literal["text", "json"]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8000
    redis_url: str = MEMORY_URL
    namespace: str = DEFAULT_NAMESPACE
    fetchers: tuple[str, ...] = ()
    """Extra fetchers as `package.module:function`, besides the `eagercache.fetchers` entry points."""
    redis_max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Connections to Redis per process (the pub/sub one included); commands wait for a free one."""
    max_concurrent_fetches: int = 64
    """Fetches running at once in this process (reads and refreshes); more wait their turn."""
    backstop_interval: float = 1.0
    """Seconds: the schedule is re-read at least this often, bounding how late a lost event makes a refresh."""
    shutdown_timeout: float = 10.0
    """Seconds that in-flight fetches get to finish at shutdown."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: LogFormat = "text"
    access_log: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not self.namespace or any(c.isspace() for c in self.namespace):
            raise ValueError(f"namespace must be non-empty without whitespace, got {self.namespace!r}")
        if self.redis_max_connections < 2:
            raise ValueError(f"redis_max_connections must be at least 2, got {self.redis_max_connections}")
        if self.max_concurrent_fetches < 1:
            raise ValueError(f"max_concurrent_fetches must be at least 1, got {self.max_concurrent_fetches}")
        if not 0 < self.backstop_interval <= 60:
            raise ValueError(f"backstop_interval must be > 0 and <= 60 seconds, got {self.backstop_interval}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if not self.redis_url.startswith((MEMORY_URL, "redis://", "rediss://", "unix://")):
            raise ValueError(
                f"redis_url must start with memory://, redis://, rediss:// or unix://, got {self.redis_url!r}"
            )


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings: `overrides` (flags; None values ignored) win over the environment."""
    environ = os.environ if environ is None else environ
    fields = set(Settings.__struct_fields__)
    raw: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and (field := name[len(ENV_PREFIX) :].lower()) in fields:
            raw[field] = from_env(field, value)
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigurationError(f"invalid setting: {_with_env_name(str(exc))}") from exc


def from_env(field: str, value: str) -> Any:
    """Parse one setting's environment text (comma-separated lists, case-insensitive enums)."""
    if field == "fetchers":
        return tuple(spec.strip() for spec in value.split(",") if spec.strip())
    if field in ("log_level", "log_format"):
        return value.upper() if field == "log_level" else value.lower()
    return value


def _with_env_name(message: str) -> str:
    """Name the setting as operators know it: --port / EAGERCACHE_PORT."""
    if "`$." in message:  # a type error: msgspec says "... - at `$.port`"
        head, _, tail = message.partition("`$.")
        field = tail.split("`", 1)[0]
        detail = head.removesuffix(" - at ")
    else:  # a range check from __post_init__, which starts with the field's name
        field = message.split(" ", 1)[0]
        detail = message
        if field not in Settings.__struct_fields__:
            return message
    return f"{field} (--{field.replace('_', '-')} / {ENV_PREFIX}{field.upper()}): {detail}"
