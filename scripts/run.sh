#!/usr/bin/env bash
# README "Quick start", first command: set up qrm in .venv and run it on the
# embedded SQLite default: `qrm init`, then `qrm server` on 127.0.0.1:8080
# (foreground; Ctrl-C stops it). Data goes to ~/.local/share/qrm unless
# QRM_DATA_DIR is set. Extra arguments go to `qrm server` (e.g. --port 8081).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then bash scripts/system-packages.sh run; fi
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  echo "python3-venv is missing: apt-get install python3-venv (or run this script as root)" >&2
  exit 1
fi
stamp=.venv/.qrm-installed
if [ ! -x .venv/bin/qrm ] || [ ! -f "$stamp" ] || [ -n "$(find qrm_core plugins -name pyproject.toml -newer "$stamp" 2>/dev/null)" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  packages=(-e ./qrm_core)
  for p in plugins/qrm_*/; do [ -f "$p/pyproject.toml" ] && packages+=(-e "$p"); done
  .venv/bin/pip install -q "${packages[@]}"
  touch "$stamp"
fi
.venv/bin/qrm init
# The address the server will listen on: the last --host/--port given wins, as in qrm server.
host=127.0.0.1 port=8080 prev=
for arg in "$@"; do
  case "$prev" in --host) host=$arg ;; --port) port=$arg ;; esac
  case "$arg" in --host=*) host=${arg#--host=} ;; --port=*) port=${arg#--port=} ;; esac
  prev=$arg
done
case "$host" in *:*) shown="[$host]" ;; *) shown=$host ;; esac
echo "qrm server: http://$shown:$port (API /api/v1, docs /docs; user qrm, password qrm unless changed). Ctrl-C stops it."
echo "Everything (HTTP, TFTP, DHCP) serves this machine only until you change the admin password" \
  "(qrm init --admin-password ...) and name the provisioning address (QRM_PROVISIONING_ADDRESS=...)."
exec .venv/bin/qrm server --host 127.0.0.1 --port 8080 "$@"
