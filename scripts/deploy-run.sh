#!/usr/bin/env bash
# Where register-supernodes.sh set up the CLI: run fedrec on the deployment and fail unless
# the run completed (`flwr run --stream` exits 0 even when a run fails).
# Usage: scripts/deploy-run.sh DIR ["run-config"]     e.g. scripts/deploy-run.sh /etc/fedrec "rounds=20"
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 1 ] || { sed -n '2,4p' "$0"; exit 2; }
export FLWR_HOME="$(cd "$1" && pwd)/flwr-home"
out=$(flwr run "$REPO" fedrec-deploy --stream --run-config "${2:-rounds=3}" | tee /dev/stderr)
run_id=$(sed -n 's/.*Successfully started run \([0-9]*\).*/\1/p' <<<"$out" | head -n1)
status=$(flwr ls fedrec-deploy --run-id "$run_id" --format json | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "run $run_id: $status"
[ "$status" = "finished:completed" ]
