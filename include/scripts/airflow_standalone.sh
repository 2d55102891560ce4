#!/usr/bin/env bash
# Airflow standalone for this project, ready from a fresh clone: what `make airflow` runs, and
# what tests/dags/test_standalone.py runs with a free port and a throwaway AIRFLOW_HOME.
#
#   include/scripts/airflow_standalone.sh [--prepare-only]
#
# Environment (defaults in brackets): VENV [.venv], AIRFLOW_HOME [var/airflow],
# AIRFLOW_HOST [localhost], AIRFLOW_PORT [8080], RECSYS_TENANTS_DIR [include/tenants].
# Steps: metadata DB (SQLite), the `training` pool the train/refit tasks need, every tenant file
# parsed (a bad file is reported here, before the UI; `python -m pipeline check-tenant` checks its data too),
# then `airflow standalone` (scheduler, dag-processor, triggerer, api-server) with the venv's bin on
# the PATH: standalone starts each component as an `airflow ...` subprocess found there.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
VENV="$(cd "${VENV:-$ROOT/.venv}" && pwd)"
export PATH="$VENV/bin:$PATH"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/var/airflow}"
export AIRFLOW__CORE__DAGS_FOLDER="${AIRFLOW__CORE__DAGS_FOLDER:-$ROOT/dags}"
export AIRFLOW__CORE__PLUGINS_FOLDER="${AIRFLOW__CORE__PLUGINS_FOLDER:-$ROOT/plugins}"
export AIRFLOW__CORE__LOAD_EXAMPLES="${AIRFLOW__CORE__LOAD_EXAMPLES:-False}"
export AIRFLOW__CORE__PARALLELISM="${AIRFLOW__CORE__PARALLELISM:-4}"
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="${AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION:-True}"
HOST="${AIRFLOW_HOST:-localhost}"
PORT="${AIRFLOW_PORT:-8080}"
export AIRFLOW__API__PORT="$PORT"
export AIRFLOW__API__HOST="${AIRFLOW__API__HOST:-127.0.0.1}"  # this machine only; set 0.0.0.0 to share it
# the UI's links and the task workers' execution API both follow the base URL
export AIRFLOW__API__BASE_URL="${AIRFLOW__API__BASE_URL:-http://$HOST:$PORT}"
# task workers call the API server on every state change: on a busy laptop or CI box (SQLite) the
# default 5 s timeout fails tasks before they start
export AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT="${AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT:-60}"
export GX_ANALYTICS_ENABLED=false MLFLOW_ENABLE_ASYNC_LOGGING=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TENANTS="${RECSYS_TENANTS_DIR:-$ROOT/include/tenants}"
mkdir -p "$AIRFLOW_HOME"

echo ">>> metadata DB: $AIRFLOW_HOME (SQLite)"
airflow db migrate > "$AIRFLOW_HOME/db-migrate.log" 2>&1 || { tail -40 "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
echo ">>> pool training (1 slot): train and refit run one at a time"
airflow pools set training 1 "torch training jobs (one at a time on a laptop)" > /dev/null
for f in "$TENANTS"/*.yaml; do
  [ -e "$f" ] || continue
  python -c 'import sys; from pipeline.config import load_tenant_file; load_tenant_file(sys.argv[1])' "$f" \
    || { echo "!!! $f does not validate (its DAG will fail with that reason); details: python -m pipeline check-tenant $f"; }
  echo ">>> tenant $(basename "$f" .yaml): config valid (DAG recsys_$(basename "$f" .yaml))"
done
if [ "${1:-}" = "--prepare-only" ]; then exit 0; fi

echo ">>> Airflow on $AIRFLOW__API__BASE_URL  user admin, password in"
echo "    $AIRFLOW_HOME/simple_auth_manager_passwords.json.generated (written at first start)"
echo "    dashboard: Browse > Recsys tenants; DAGs start paused: unpause one and trigger it"
exec airflow standalone
