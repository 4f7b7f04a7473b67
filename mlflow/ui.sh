#!/usr/bin/env bash
# MLflow UI over the embedded store of this project: runs and models in mlflow/mlflow.db (SQLite),
# artifacts in mlflow/artifacts. Listens on mlflow.ui_host of params.yaml (127.0.0.1: this machine
# only). Usage: [PORT=5000] mlflow/ui.sh [more `mlflow server` options, e.g. --app-name basic-auth]
# Uses .venv/bin/{mlflow,plantad} when the project has a .venv, else the ones on PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
port="${PORT:-5000}"
bin="$root/.venv/bin"
if [ -x "$bin/mlflow" ] && [ -x "$bin/plantad" ]; then
  mlflow_bin="$bin/mlflow" plantad_bin="$bin/plantad"
elif command -v mlflow >/dev/null 2>&1 && command -v plantad >/dev/null 2>&1; then
  mlflow_bin="$(command -v mlflow)" plantad_bin="$(command -v plantad)"
else
  echo "error: mlflow or plantad not found: run scripts/setup.sh (creates .venv) or put both on PATH" >&2
  exit 1
fi
host="$("$plantad_bin" config --config "$root/params.yaml" --get mlflow.ui_host)"
# MLflow 3 also starts a job runner (GenAI scorers; ~8 extra processes); plantad does not use it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "MLflow UI: http://${host}:${port}  (store: $here/mlflow.db)" >&2
exec "$mlflow_bin" server \
  --backend-store-uri "sqlite:///$here/mlflow.db" \
  --default-artifact-root "file://$here/artifacts" \
  --host "$host" --port "$port" --workers 1 "$@"
