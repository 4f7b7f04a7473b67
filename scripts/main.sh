#!/usr/bin/env bash
# The main job: install, run the whole pipeline on the embedded demo data with `dvc repro`
# (demo data -> prepare -> validate -> train on Ray -> evaluate -> register in MLflow), then serve
# the champion with Ray Serve on 127.0.0.1 and leave the endpoint running.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" GX_ANALYTICS_ENABLED=false RAY_USAGE_STATS_ENABLED=0
if [ ! -d .dvc ]; then
  dvc init --quiet $( [ -d .git ] || echo --no-scm )
fi
plantad lock --repair --quiet  # a crash while DVC rewrote dvc.lock leaves it unreadable to DVC
dvc repro "$@"
echo
echo "== metrics (outputs/metrics.json; dvc metrics show / dvc metrics diff for all of them)"
plantad metrics outputs/metrics.json
echo
echo "== registered model (outputs/registration.json)"
python - <<'PY'
import json
r = json.load(open("outputs/registration.json"))
print(f"{r['registered_model']} v{r['version']} aliases={r['aliases']}: {r['decision']['reason']}")
PY
echo
echo "== online scoring (Ray Serve, models:/plantad-anomaly@champion)"
plantad serve --detach 2> outputs/serve.log || { tail -n 30 outputs/serve.log >&2; exit 1; }
image=$(python - <<'PY'
import pandas as pd
m = pd.read_parquet("outputs/manifest.parquet")
print(m[(m["split"] == "test") & (m["label"] == 1)].iloc[0]["path"])
PY
)
root=$(plantad config | python -c 'import json,sys; print(json.load(sys.stdin)["data"]["root"])')
echo "Score a demo image:"
echo "  curl -s -F image=@$root/$image http://127.0.0.1:8000/score"
echo "Cluster, what holds its CPUs, the served version:  .venv/bin/plantad status"
echo "Retrain with the endpoint up (the daily move):     source .venv/bin/activate && dvc repro"
echo "Stop the endpoint and the local Ray cluster:       bash scripts/stop.sh"
echo
echo "MLflow UI over the embedded store: make mlflow-ui   (then open http://127.0.0.1:5000)"
echo "Plots: outputs/plots/*.png, or: .venv/bin/dvc plots show"
