#!/usr/bin/env bash
# The main job: install, then run the whole pipeline on the embedded demo data with `dvc repro`
# (demo data -> prepare -> validate -> train on Ray -> evaluate -> register in MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" GX_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
if [ ! -d .dvc ]; then
  dvc init --quiet $( [ -d .git ] || echo --no-scm )
fi
dvc repro "$@"
echo
echo "== metrics (outputs/metrics.json; dvc metrics show / dvc metrics diff for all of them)"
plantad metrics outputs/metrics.json
echo
echo "== registered model (outputs/registration.json)"
cat outputs/registration.json
echo
echo "MLflow UI over the embedded store: make mlflow-ui   (then open http://127.0.0.1:5000)"
echo "Plots: outputs/plots/*.png, or: dvc plots show"
