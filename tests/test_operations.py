"""Metrics that move, structured log lines, and operational guard rails."""

from __future__ import annotations

import json
import logging
import subprocess

from eagercache import fetcher
from eagercache.logs import JsonFormatter, TextFormatter

from .conftest import AppFactory
from .helpers import Counter
from .servers import EAGERCACHE


def sample(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_move_with_requests_and_refreshes(make_app: AppFactory) -> None:
    @fetcher(ttl=0.2, jitter=0, max_idle=1)
    async def ticker(k: str = "a") -> str:
        return k

    app, client = await make_app([ticker])
    writes = Counter()
    app.state.engine.on_write(writes.hit)
    await client.get("/data/ticker")
    await client.get("/data/ticker")
    await client.get("/data/ticker?k=b")
    await writes.reach(5)
    for _ in range(3):  # keep both entries read, so that neither goes idle
        await client.get("/data/ticker")
        await client.get("/data/ticker?k=b")
        await writes.reach(writes.count + 1)
    text = (await client.get("/metrics")).text
    assert sample(text, 'eagercache_requests_total{fetcher="ticker",result="miss"}') == 2
    assert sample(text, 'eagercache_requests_total{fetcher="ticker",result="hit"}') >= 4
    refreshes = sum(  # whichever signal claimed them: the schedule, or an expiry event that came first
        sample(text, f'eagercache_fetches_total{{cause="{cause}",fetcher="ticker",outcome="ok"}}')
        for cause in ("schedule", "event")
    )
    assert refreshes >= 3
    assert sample(text, 'eagercache_refresh_lag_seconds_count{fetcher="ticker"}') >= 3
    assert sample(text, 'eagercache_served_data_age_seconds_count{fetcher="ticker"}') >= 6
    assert sample(text, 'eagercache_fetch_seconds_count{fetcher="ticker"}') >= 5
    assert sample(text, 'eagercache_entries{fetcher="ticker"}') == 2
    assert "eagercache_fetches_in_flight 0.0" in text
    assert "eagercache_refresh_mode{mode=" in text


def _record(**extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "eagercache.engine", "levelname": "WARNING", "msg": "fetch failed"})
    record.__dict__.update(extra)
    return record


def test_json_log_lines_carry_the_event_fields() -> None:
    line = JsonFormatter().format(_record(fetcher="rates", entry="rates?base=USD", error="boom"))
    doc = json.loads(line)
    assert doc["message"] == "fetch failed"
    assert doc["level"] == "WARNING"
    assert (doc["fetcher"], doc["entry"], doc["error"]) == ("rates", "rates?base=USD", "boom")
    assert "\n" not in line


def test_text_log_lines_are_key_value() -> None:
    line = TextFormatter().format(_record(fetcher="rates", error="two words"))
    assert line.endswith("WARNING eagercache.engine fetch failed | fetcher=rates error='two words'")


def test_workers_refuse_the_memory_store() -> None:
    result = subprocess.run(
        [EAGERCACHE, "serve", "--workers", "2"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 2
    assert "--workers needs a shared store" in result.stderr
