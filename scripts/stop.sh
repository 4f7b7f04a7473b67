#!/usr/bin/env bash
# Stop what the main job left running: the Serve app, then this machine's Ray cluster (`ray start
# --head`). Works from a new shell: it uses the project's .venv, as the main job does.
set -uo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
if [ ! -x "$bin/plantad" ]; then
  echo "error: $PWD/$bin/plantad not found: run bash scripts/setup.sh (or scripts/main.sh) first" >&2
  exit 1
fi
"$bin/plantad" serve --stop
if out=$("$bin/ray" stop 2>&1); then
  echo "stopped this machine's Ray cluster"
else
  echo "$out" >&2
  exit 1
fi
