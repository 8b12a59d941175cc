#!/usr/bin/env bash
# Runs the whole test suite (README: "Quick start"). Arguments go to nox,
# e.g. scripts/test.sh -s core -- -k storage
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then bash scripts/system-packages.sh test; fi
venv=.venv-nox
if [ ! -x "$venv/bin/nox" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "nox>=2024.4" "uv>=0.4"
fi
export PATH="$PWD/$venv/bin:$PATH"
exec nox "$@"
