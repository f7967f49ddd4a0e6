"""Section 8's garbage-collection probe, loaded into the watched serve process by putting this directory on
its PYTHONPATH (bench/watchers.py does, with BENCH_GC_LOG naming the file): one JSON line per full
(generation-2) collection, `{"start_ms": ..., "ms": ..., "collected": ...}`, start on the epoch clock the
clients' receive times use, so a pause can be matched with the versions that were late in the same moment.
"""

from __future__ import annotations

import gc
import json
import os
import time
from typing import Any

_path = os.environ.get("BENCH_GC_LOG")
_started: list[float] = []


def _record(phase: str, info: dict[str, Any]) -> None:
    if info["generation"] != 2 or _path is None:
        return
    if phase == "start":
        _started[:] = [time.time() * 1000, time.perf_counter()]
        return
    if not _started:
        return
    start_ms, t0 = _started
    line = {"start_ms": start_ms, "ms": (time.perf_counter() - t0) * 1000, "collected": info["collected"]}
    with open(_path, "a") as out:  # rare (a full collection): one line each, written at once
        out.write(json.dumps(line) + "\n")


if _path is not None:
    gc.callbacks.append(_record)
