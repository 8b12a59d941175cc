#!/usr/bin/env bash
# Sets up qrm in .venv and runs it on the embedded SQLite default
# (README: "Quick start"). Data goes to ~/.local/share/qrm unless QRM_DATA_DIR is set.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then bash scripts/system-packages.sh run; fi
if [ ! -x .venv/bin/qrm ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  plugins=()
  for p in plugins/qrm_*/; do [ -f "$p/pyproject.toml" ] && plugins+=(-e "$p"); done
  .venv/bin/pip install -q -e ./qrm_core "${plugins[@]}"
fi
qrm=.venv/bin/qrm
$qrm init
echo
echo "== qrm is ready. A short walk through the CLI (openQRM's verbs):"
demo() { echo "\$ qrm $*"; $qrm "$@" || true; }
demo plugins list
$qrm storage show demo-storage >/dev/null 2>&1 || demo storage add -n demo-storage -t fake -i 10.0.11.35 -c "QRMSRC"
$qrm filesystem-image show demo-root >/dev/null 2>&1 || demo filesystem-image add -n demo-root -s demo-storage -l /exports/demo
demo storage list
demo filesystem-image list
demo boot-image list
demo resource list
demo events --limit 5
