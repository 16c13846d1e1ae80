#!/usr/bin/env bash
# The README's screenshots: optuna-dashboard on a study and the study's parent run in the MLflow UI,
# taken with headless Chromium. Run after `make sweep` and `make report`:
#   docs/screenshots.sh [CONFIG]        (writes docs/dashboard.png and docs/mlflow-parent-run.png)
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-experiments/mnist.toml}
read -r experiment parent < <(.venv/bin/python - "$config" <<'PY'
import sys
import optuna
from pipeline.config import load_config
from pipeline.tracking import Tracker
name = load_config(sys.argv[1]).name
parent = optuna.load_study(study_name=name, storage="sqlite:///mlruns/optuna.db").user_attrs["mlflow_parent_run_id"]
print(Tracker("sqlite:///mlruns/mlflow.db").experiment_of(parent), parent)
PY
)
shot() {  # URL OUT: a 1400x1100 screenshot once the page's scripts have run
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$(mktemp -d)" --hide-scrollbars --window-size=1400,1100 \
    --virtual-time-budget=20000 --screenshot="$2" "$1" 2>/dev/null
}
wait_for() { for _ in $(seq 1 120); do curl -s -o /dev/null "$1" && return; sleep 1; done; echo "no answer from $1" >&2; exit 1; }
setsid make dashboard >/tmp/synops-dashboard.log 2>&1 & dashboard=$!
setsid make ui >/tmp/synops-ui.log 2>&1 & ui=$!
trap 'kill -- -$dashboard -$ui 2>/dev/null || true' EXIT
wait_for http://127.0.0.1:8080/ && wait_for http://127.0.0.1:5000/health
shot "http://127.0.0.1:8080/dashboard/studies/1" docs/dashboard.png
shot "http://127.0.0.1:5000/#/experiments/$experiment/runs/$parent?workflowType=machine_learning" \
  docs/mlflow-parent-run.png
