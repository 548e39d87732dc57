#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtual environment in .venv with the pinned packages
# and this project installed in editable mode. Uses the machine's python3 (3.11 or 3.12).
# `bash setup.sh --no-oracle` skips the official-model venv (only the parity tests need it).
set -euo pipefail
with_oracle=1
for arg in "$@"; do
  case "$arg" in
    --no-oracle) with_oracle=0 ;;
    *) echo "setup.sh: unknown argument $arg (allowed: --no-oracle)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
# The official TF Model Garden Deep-MARC in its own venv (parity tests); built once, ~70 s.
oracle=../shared/oracle/setup_venv.sh
if [ "$with_oracle" = 1 ] && [ ! -x .venv-oracle/bin/python ]; then
  if [ -f "$oracle" ]; then
    bash "$oracle" .venv-oracle > .venv-oracle.log 2>&1 || { cat .venv-oracle.log; exit 1; }
  else
    echo "setup.sh: $oracle not found; the parity tests need the official-model venv" >&2
  fi
fi
