#!/usr/bin/env bash
# The test command: install into .venv, then run the whole suite (e2e included) on tiny models.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export GX_ANALYTICS_ENABLED=false MLFLOW_ENABLE_ASYNC_LOGGING=false RAY_USAGE_STATS_ENABLED=0
.venv/bin/python -m pytest -p no:cacheprovider --timeout=900 --durations=30 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
