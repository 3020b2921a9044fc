#!/bin/sh
# The compose stack's Prefect worker: make sure its process work pool exists, register its deployments of
# prefect.yaml (PREFECT_DEPLOYMENTS; from /app, so flow runs execute there), then poll the pool for runs
# started from the UI. A health server on :8080 backs the container health check.
#
# Concurrency: at most KIMIVL_WORKER_LIMIT flow runs at a time (default 1), both as the work pool's
# concurrency limit (Prefect's own: more runs wait in the queue) and the worker's --limit; each flow run
# inherits OMP_NUM_THREADS / MKL_NUM_THREADS = CPUs // limit (unless set), so runs sharing the container
# never spin threads against each other.
set -eu
POOL="${PREFECT_WORK_POOL:-kimivl-process}"
LIMIT="${KIMIVL_WORKER_LIMIT:-1}"
case "$LIMIT" in '' | *[!0-9]* | 0) echo "KIMIVL_WORKER_LIMIT=$LIMIT: expected a whole number >= 1" >&2; exit 2 ;; esac
THREADS=$(( $(nproc) / LIMIT ))
[ "$THREADS" -ge 1 ] || THREADS=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-$THREADS}"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
prefect work-pool set-concurrency-limit "$POOL" "$LIMIT"
cd "${KIMIVL_APP_DIR:-/app}"
set --
for d in ${PREFECT_DEPLOYMENTS:-pipeline stage data}; do set -- "$@" -n "$d"; done
prefect --no-prompt deploy "$@"
echo "worker: at most $LIMIT flow run(s) at a time, OMP_NUM_THREADS=$OMP_NUM_THREADS MKL_NUM_THREADS=$MKL_NUM_THREADS"
exec prefect worker start --pool "$POOL" --type process --limit "$LIMIT" --with-healthcheck --name "worker-$(hostname)"
