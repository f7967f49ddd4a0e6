"""`load_settings`: flags over `EAGERCACHE_*` environment variables over defaults."""

from __future__ import annotations

from typing import Any

import pytest

from eagercache import ConfigurationError, Settings, load_settings


def test_defaults() -> None:
    settings = load_settings({}, {})
    assert settings == Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8000
    assert settings.redis_url == "memory://"
    assert settings.namespace == "eagercache:"
    assert settings.fetchers == ()
    assert settings.max_concurrent_fetches == 64
    assert (settings.backstop_interval, settings.shutdown_timeout) == (1.0, 10.0)
    assert (settings.log_level, settings.log_format, settings.access_log) == ("INFO", "text", False)
    assert load_settings(None, {}) == settings


def test_environment_values_are_parsed() -> None:
    settings = load_settings(
        {},
        {
            "EAGERCACHE_HOST": "0.0.0.0",
            "EAGERCACHE_PORT": "9123",
            "EAGERCACHE_REDIS_URL": "redis://cache.internal:6380/2",
            "EAGERCACHE_NAMESPACE": "ns:",
            "EAGERCACHE_FETCHERS": "pkg.mod:one,pkg.mod:two",
            "EAGERCACHE_MAX_CONCURRENT_FETCHES": "8",
            "EAGERCACHE_BACKSTOP_INTERVAL": "0.25",
            "EAGERCACHE_SHUTDOWN_TIMEOUT": "3",
            "EAGERCACHE_LOG_LEVEL": "DEBUG",
            "EAGERCACHE_LOG_FORMAT": "json",
            "EAGERCACHE_ACCESS_LOG": "true",
        },
    )
    assert settings == Settings(
        host="0.0.0.0",
        port=9123,
        redis_url="redis://cache.internal:6380/2",
        namespace="ns:",
        fetchers=("pkg.mod:one", "pkg.mod:two"),
        max_concurrent_fetches=8,
        backstop_interval=0.25,
        shutdown_timeout=3.0,
        log_level="DEBUG",
        log_format="json",
        access_log=True,
    )
    assert isinstance(settings.port, int)
    assert isinstance(settings.shutdown_timeout, float)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("a.b:c", ("a.b:c",)),
        (" a.b:c , ,d:e,", ("a.b:c", "d:e")),
    ],
)
def test_fetchers_variable_is_comma_separated(text: str, expected: tuple[str, ...]) -> None:
    assert load_settings({}, {"EAGERCACHE_FETCHERS": text}).fetchers == expected


@pytest.mark.parametrize(("text", "expected"), [("debug", "DEBUG"), ("Warning", "WARNING"), ("ERROR", "ERROR")])
def test_log_level_variable_is_case_insensitive(text: str, expected: str) -> None:
    assert load_settings({}, {"EAGERCACHE_LOG_LEVEL": text}).log_level == expected


@pytest.mark.parametrize(("text", "expected"), [("JSON", "json"), ("Text", "text"), ("json", "json")])
def test_log_format_variable_is_case_insensitive(text: str, expected: str) -> None:
    assert load_settings({}, {"EAGERCACHE_LOG_FORMAT": text}).log_format == expected


def test_flags_override_environment() -> None:
    environ = {"EAGERCACHE_PORT": "9000", "EAGERCACHE_HOST": "0.0.0.0", "EAGERCACHE_FETCHERS": "env.mod:f"}
    settings = load_settings({"port": 9001, "fetchers": ("flag.mod:g",)}, environ)
    assert settings.port == 9001
    assert settings.fetchers == ("flag.mod:g",)
    assert settings.host == "0.0.0.0"  # no flag given: the environment still applies


def test_none_overrides_are_ignored() -> None:
    # What argparse hands over for flags that were not given.
    flags: dict[str, Any] = {field: None for field in Settings.__struct_fields__}
    settings = load_settings(flags, {"EAGERCACHE_PORT": "9000", "EAGERCACHE_LOG_FORMAT": "json"})
    assert settings == Settings(port=9000, log_format="json")
    assert load_settings(flags, {}) == Settings()


def test_environ_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EAGERCACHE_PORT", "9555")
    assert load_settings().port == 9555
    assert load_settings({}, {}).port == 8000  # an explicit mapping replaces os.environ entirely


def test_unknown_variables_are_ignored() -> None:
    environ = {
        "EAGERCACHE_NOPE": "1",
        "EAGERCACHE_TEST_REDIS_URL": "redis://elsewhere:1/0",  # the test suite's own variable
        "EAGERCACHE_": "x",
        "PORT": "1",
        "REDIS_URL": "http://not-even-valid",
    }
    assert load_settings({}, environ) == Settings()


def test_unknown_override_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="nope"):
        load_settings({"nope": 1}, {})


@pytest.mark.parametrize(
    ("overrides", "environ", "flag", "variable"),
    [
        ({}, {"EAGERCACHE_PORT": "abc"}, "--port", "EAGERCACHE_PORT"),
        ({"port": "abc"}, {}, "--port", "EAGERCACHE_PORT"),
        ({}, {"EAGERCACHE_LOG_LEVEL": "verbose"}, "--log-level", "EAGERCACHE_LOG_LEVEL"),
        ({}, {"EAGERCACHE_LOG_FORMAT": "xml"}, "--log-format", "EAGERCACHE_LOG_FORMAT"),
        ({}, {"EAGERCACHE_ACCESS_LOG": "maybe"}, "--access-log", "EAGERCACHE_ACCESS_LOG"),
        (
            {},
            {"EAGERCACHE_MAX_CONCURRENT_FETCHES": "many"},
            "--max-concurrent-fetches",
            "EAGERCACHE_MAX_CONCURRENT_FETCHES",
        ),
        ({}, {"EAGERCACHE_BACKSTOP_INTERVAL": "soon"}, "--backstop-interval", "EAGERCACHE_BACKSTOP_INTERVAL"),
    ],
)
def test_invalid_value_names_the_flag_and_variable(
    overrides: dict[str, Any], environ: dict[str, str], flag: str, variable: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings(overrides, environ)
    assert flag in caught.value.detail
    assert variable in caught.value.detail


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"namespace": ""}, "namespace"),
        ({"namespace": "a b"}, "namespace"),
        ({"max_concurrent_fetches": 0}, "max_concurrent_fetches"),
        ({"backstop_interval": 0}, "backstop_interval"),
        ({"backstop_interval": 61}, "backstop_interval"),
        ({"shutdown_timeout": -1}, "shutdown_timeout"),
    ],
)
def test_out_of_range_value_is_rejected(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        load_settings(overrides, {})


@pytest.mark.parametrize(
    ("environ", "flag", "variable"),
    [
        ({"EAGERCACHE_PORT": "70000"}, "--port", "EAGERCACHE_PORT"),
        ({"EAGERCACHE_NAMESPACE": "a b"}, "--namespace", "EAGERCACHE_NAMESPACE"),
        ({"EAGERCACHE_REDIS_URL": "http://cache:6379"}, "--redis-url", "EAGERCACHE_REDIS_URL"),
    ],
)
def test_out_of_range_value_names_the_flag_and_variable(environ: dict[str, str], flag: str, variable: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        load_settings({}, environ)
    assert flag in caught.value.detail
    assert variable in caught.value.detail


@pytest.mark.parametrize("url", ["http://cache:6379", "localhost:6379", "", "memory:/", "REDIS://cache:6379"])
def test_bad_redis_url_scheme_is_rejected(url: str) -> None:
    with pytest.raises(ConfigurationError, match="redis_url"):
        load_settings({"redis_url": url}, {})


@pytest.mark.parametrize(
    "url", ["memory://", "redis://127.0.0.1:6379/0", "rediss://user:pw@cache:6380/1", "unix:///run/redis.sock"]
)
def test_supported_redis_url_schemes_are_accepted(url: str) -> None:
    assert load_settings({}, {"EAGERCACHE_REDIS_URL": url}).redis_url == url
