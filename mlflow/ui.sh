#!/usr/bin/env bash
# MLflow UI over the embedded store of this project: runs and models in mlflow/mlflow.db (SQLite),
# artifacts in mlflow/artifacts. Listens on 127.0.0.1 only. Usage: [PORT=5000] mlflow/ui.sh
# Uses .venv/bin/mlflow when the project has a .venv, else `mlflow` from PATH.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
port="${PORT:-5000}"
if [ -x "$root/.venv/bin/mlflow" ]; then
  mlflow_bin="$root/.venv/bin/mlflow"
elif command -v mlflow >/dev/null 2>&1; then
  mlflow_bin="$(command -v mlflow)"
else
  echo "error: mlflow not found: run scripts/setup.sh (creates .venv) or put mlflow on PATH" >&2
  exit 1
fi
# MLflow 3 also starts a job runner (GenAI scorers; ~8 extra processes); plantad does not use it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "MLflow UI: http://127.0.0.1:${port}  (store: $here/mlflow.db)" >&2
exec "$mlflow_bin" server \
  --backend-store-uri "sqlite:///$here/mlflow.db" \
  --default-artifact-root "file://$here/artifacts" \
  --host 127.0.0.1 --port "$port" --workers 1
