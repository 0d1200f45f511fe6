#!/usr/bin/env bash
# On each SuperNode host: run one SuperNode in the foreground. It trusts only CA (ca.crt
# from the SuperLink host), proves its identity with KEY (make-node-key.sh; its .pub must
# be registered), hosts partition I of N, reads its data from DATA_DIR and keeps its
# private state in STATE_DIR (both on this host; the server never names a path). It
# reconnects by itself when the SuperLink restarts. PORT: local ClientApp port (9094).
# Usage: scripts/deploy-supernode.sh CA KEY SUPERLINK_ADDRESS I N DATA_DIR STATE_DIR [PORT]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 7 ] || { sed -n '2,7p' "$0"; exit 2; }
data="$(cd "$6" && pwd)"; mkdir -p -m 700 "$7"; state="$(cd "$7" && pwd)"
exec flower-supernode --root-certificates "$1" --auth-supernode-private-key "$2" --superlink "$3" \
  --port "${8:-9094}" --node-config "partition-id=$4 num-partitions=$5 data-dir='$data' state-dir='$state'"
