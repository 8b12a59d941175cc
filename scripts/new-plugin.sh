#!/usr/bin/env bash
# Creates a new plugin from plugins/_template (docs/plugins.md, "Start from the template").
#   scripts/new-plugin.sh NAME [DIRECTORY]     # default DIRECTORY: plugins/qrm_NAME
# NAME becomes the entry-point name (NAME), the import package (qrm_NAME), the
# distribution (qrm-NAME), the settings prefix (QRM_NAME_) and class names (Name...).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
name=${1:-}
if ! [[ $name =~ ^[a-z][a-z0-9]{1,29}$ ]]; then
  echo "usage: $0 NAME [DIRECTORY]; NAME is 2-30 lower-case letters and digits, starting with a letter (e.g. xen)" >&2
  exit 2
fi
dest=${2:-$root/plugins/qrm_$name}
if [ -e "$dest" ]; then
  echo "error: $dest already exists" >&2
  exit 1
fi
class="${name^}"
upper="${name^^}"
mkdir -p "$(dirname "$dest")"
cp -r "$root/plugins/_template" "$dest"
# Build and test leftovers of the template itself must not be copied along.
find "$dest" \( -name __pycache__ -o -name '*.egg-info' -o -name .pytest_cache -o -name .mypy_cache \) \
  -prune -exec rm -rf {} +
mv "$dest/src/qrm_myplugin" "$dest/src/qrm_$name"
grep -rlZ -e myplugin -e MyPlugin -e MYPLUGIN "$dest" |
  xargs -0 sed -i -e "s/myplugin/$name/g" -e "s/MyPlugin/$class/g" -e "s/MYPLUGIN/$upper/g"
echo "created $dest (distribution qrm-$name, package qrm_$name, entry point $name)"
echo "next: fill in the TODOs, then: nox -s \"plugin(qrm_$name)\""
