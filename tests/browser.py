"""Headless Chromium for the browser tests: the system's browser (Debian's `chromium`), driven by Playwright.

Playwright's own browser download is never used (this project's machines cannot fetch it): the tests launch
the executable found on PATH, or the one EAGERCACHE_TEST_CHROMIUM names. Without a browser the tests are
skipped on a developer's machine, and fail in CI (`CI=true`), where `.ci/run` installs one: they must run there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import ConsoleMessage, Page

EXECUTABLES = ("chromium", "chromium-browser")
# As root in a container Chromium's sandbox cannot start (--no-sandbox). The rest keep it from reaching out
# at start-up (update checks, sync, QUIC probes): this machine's network refuses them, and they are noise.
FLAGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",  # a container's small /dev/shm would crash the renderer
)
LAUNCH_TIMEOUT_MS = 30_000


def chromium_executable() -> str | None:
    """EAGERCACHE_TEST_CHROMIUM, else the first of EXECUTABLES on PATH."""
    if named := os.environ.get("EAGERCACHE_TEST_CHROMIUM"):
        return named
    return next((found for name in EXECUTABLES if (found := shutil.which(name))), None)


def no_browser(reason: str) -> NoReturn:
    """Fail in CI (the browser tests must run there), skip elsewhere."""
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}; CI must run the browser tests (.ci/run installs Debian's chromium as root)")
    pytest.skip(reason)


@dataclass
class Console:
    """What the page logged: console messages of type error, and uncaught exceptions."""

    errors: list[str] = field(default_factory=list)

    def message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            location = message.location.get("url", "")
            self.errors.append(f"{message.text} ({location})" if location else message.text)

    def exception(self, error: Exception) -> None:
        self.errors.append(f"uncaught: {error}")


def require_chromium() -> str:
    """The browser's executable, with Playwright installed to drive it; else skip (fail in CI)."""
    executable = chromium_executable()
    if executable is None:
        no_browser(f"no Chromium found (looked for {', '.join(EXECUTABLES)} on PATH and EAGERCACHE_TEST_CHROMIUM)")
    if importlib.util.find_spec("playwright") is None:
        no_browser("playwright is not installed (the test extra: make install)")
    return executable


@contextmanager
def chromium_page() -> Iterator[tuple[Page, Console]]:
    """A fresh headless Chromium (own empty profile) with one page, and what that page logs as errors."""
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="eagercache-chromium-") as profile, sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=executable,
            headless=True,
            args=list(FLAGS),
            timeout=LAUNCH_TIMEOUT_MS,
        )
        try:
            # The browser asks every origin for an icon; the server has none, and its 404 would be a console error.
            context.route("**/favicon.ico", lambda route: route.fulfill(status=204))
            page = context.pages[0] if context.pages else context.new_page()
            console = Console()
            page.on("console", console.message)
            page.on("pageerror", console.exception)
            yield page, console
        finally:
            context.close()
