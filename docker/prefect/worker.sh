#!/bin/sh
# The compose stack's Prefect worker: make sure its process work pool exists, register its deployments of
# prefect.yaml (PREFECT_DEPLOYMENTS; from /app, so flow runs execute there), then poll the pool for runs
# started from the UI. A health server on :8080 backs the container health check.
set -eu
POOL="${PREFECT_WORK_POOL:-kimivl-process}"
prefect work-pool inspect "$POOL" >/dev/null 2>&1 || prefect work-pool create "$POOL" --type process
cd /app
set --
for d in ${PREFECT_DEPLOYMENTS:-pipeline stage data}; do set -- "$@" -n "$d"; done
prefect --no-prompt deploy "$@"
exec prefect worker start --pool "$POOL" --type process --with-healthcheck --name "worker-$(hostname)"
