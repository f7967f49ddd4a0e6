"""Merge sections of a later run (of those sections alone) into docs/benchmarks.json, and re-render the report.

.venv/bin/python -m bench.merge /tmp/clone/docs/benchmarks.json many_keys invalidation

`bench.run` writes only the sections it ran; a run of one section would replace the whole results. Merged
sections keep where they came from (`rerun`: command, commit, start), and the report says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .report import write_report
from .run import DOCS, RESULTS


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    later = json.loads(Path(argv[0]).read_text())
    results = json.loads(RESULTS.read_text())
    for name in argv[1:]:
        if name not in later["sections"]:
            print(f"bench.merge: section {name!r} is not in {argv[0]}", file=sys.stderr)
            return 1
        section = dict(later["sections"][name])
        section["rerun"] = {"command": later["command"], "git": later["git"], "started": later["started"]}
        results["sections"][name] = section
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    print(f"bench.merge: {', '.join(argv[1:])} merged; wrote {write_report(results, DOCS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
