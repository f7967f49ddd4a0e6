"""The TOML config file: precedence under env and flags, per-fetcher overrides, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from eagercache import ConfigurationError, create_app, fetcher, load_settings


@fetcher(ttl=60, max_idle=3600)
async def rates(base: str = "EUR") -> str:
    return base


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "eagercache.toml"
    path.write_text(text)
    return str(path)


def test_flags_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, 'port = 9001\nnamespace = "file:"\nhost = "0.0.0.0"\nbackstop_interval = 2.5\n')
    environ = {"EAGERCACHE_CONFIG": path, "EAGERCACHE_PORT": "9002", "EAGERCACHE_NAMESPACE": "env:"}
    settings = load_settings({"port": 9003}, environ)
    assert settings.port == 9003  # flag
    assert settings.namespace == "env:"  # environment
    assert (settings.host, settings.backstop_interval) == ("0.0.0.0", 2.5)  # file
    assert settings.redis_url == "memory://"  # default
    assert load_settings({"config": path}, {}).port == 9001  # --config works like EAGERCACHE_CONFIG


async def test_fetcher_overrides_change_timing_without_code(tmp_path: Path) -> None:
    path = write(tmp_path, "[fetcher.rates]\nttl = 5\nmax_idle = 120\nmax_entries = 10\n")
    app = create_app([rates], settings=load_settings({"config": path}, {}))
    overridden = app.state.registry["rates"]
    assert (overridden.ttl, overridden.max_idle, overridden.max_entries, overridden.timeout) == (5, 120, 10, 10)
    assert "[fetcher.rates] in config" in overridden.source
    assert rates.__eagercache_options__.ttl == 60  # type: ignore[attr-defined]  # the code is untouched


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = [", "not valid TOML"),
        ("prot = 8000", "unknown setting `prot`"),
        ('port = "eighty"', "port (--port / EAGERCACHE_PORT / port in"),
        ("port = 0", "port must be 1-65535"),
        ("[fetcher.rates]\nttl = 'soon'", "[fetcher.rates]: ttl: Expected `float`"),
        ("[fetcher.rates]\nttll = 1", "[fetcher.rates]: unknown setting `ttll`"),
        ('config = "other.toml"', "`config` cannot be set inside a config file"),
    ],
)
def test_bad_config_names_the_setting(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({"config": write(tmp_path, text)}, {})
    assert message in caught.value.detail


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[fetcher.nope]\nttl = 1", "[fetcher.nope] names no registered fetcher (registered: rates)"),
        ("[fetcher.rates]\nttl = -1", "ttl must be > 0 seconds"),
        ("[fetcher.rates]\nmax_entries = 0", "max_entries must be >= 1"),
    ],
)
def test_overrides_are_validated_like_code(tmp_path: Path, text: str, message: str) -> None:
    settings = load_settings({"config": write(tmp_path, text)}, {})
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        create_app([rates], settings=settings)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read it: No such file or directory"):
        load_settings({"config": str(tmp_path / "absent.toml")}, {})
