#!/usr/bin/env bash
# Run fedrec with `flwr run .` on Flower's managed local SuperLink, offline, and fail
# unless the run really completed (`flwr run --stream` exits 0 even when a run fails).
# Usage: scripts/flwr-run.sh [extra run-config, e.g. "rounds=20 users-per-round=100"]
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_HOME="${FLWR_HOME:-$PWD/.flwr}"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"
[superlink.local]
address = ":local:"
TOML
nodes="${FEDREC_SUPERNODES:-2}"
flwr run . local --stream --run-config "${1:-rounds=20}" \
  --federation-config "num-supernodes=$nodes client-resources-num-cpus=1"
status=$(flwr ls local --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')
# The managed SuperLink outlives the run and no flwr command stops it: stop ours by PID.
pkill -f -- "--log-file $FLWR_HOME/local-superlink/superlink.log" || true
echo "run status: $status"
[ "$status" = "finished:completed" ]
