#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtual environment in .venv with the pinned packages
# and this project installed in editable mode. Uses the machine's python3 (3.11 or 3.12).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
