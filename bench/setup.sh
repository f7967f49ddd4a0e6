#!/usr/bin/env bash
# Installs what `make bench` needs besides the project's venv: wrk (Debian package, when missing and apt-get
# may be used) and the Python packages the harness uses. Nothing here is fatal: without wrk the harness falls
# back to its Python load generator and says so in the report.
set -uo pipefail
VENV_BIN=${1:-.venv/bin}

if ! command -v wrk >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "bench: installing wrk with apt-get"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) >/dev/null 2>&1 \
            || echo "bench: could not install wrk; the Python load generator will be used"
    else
        echo "bench: wrk is not installed and apt-get cannot be used here; the Python load generator will be used"
    fi
fi

"$VENV_BIN/python" -m pip install --quiet "matplotlib>=3.8" "py-spy>=0.4" "cashews>=7.0" \
    || echo "bench: could not install matplotlib/py-spy/cashews; charts, profiles or the cashews comparison will be missing"
