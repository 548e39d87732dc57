#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtual environment in .venv with the pinned packages
# and this project installed in editable mode. Uses the machine's python3 (3.11 or 3.12).
# `bash setup.sh --no-oracle` skips the official-model venvs (only the parity tests need them).
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
# The official TF Object Detection API Deep-MAC in its own venv (parity tests); ~80 s, 1.8 GB.
deepmac_oracle=../shared/oracle/setup_deepmac_venv.sh
if [ "$with_oracle" = 1 ] && [ ! -x .venv-oracle-deepmac/bin/python ]; then
  if [ -f "$deepmac_oracle" ]; then
    bash "$deepmac_oracle" .venv-oracle-deepmac > .venv-oracle-deepmac.log 2>&1 \
      || { cat .venv-oracle-deepmac.log; exit 1; }
  else
    echo "setup.sh: $deepmac_oracle not found; the Deep-MAC parity tests need it" >&2
  fi
fi
