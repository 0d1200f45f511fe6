#!/usr/bin/env bash
# On each SuperNode host of a cohort deployment: run one SuperNode in the foreground that
# hosts a contiguous share of the users, read from SHARD only (one node-PPPPP/ directory of
# a `fedrec partition` shard set, copied to this host; its meta.json gives the partition).
# TLS and authentication as in deploy-supernode.sh: it trusts only CA and signs with KEY,
# whose .pub must be registered. STATE_DIR keeps the users' private state on this host.
# Usage: scripts/deploy-cohort-supernode.sh CA KEY SUPERLINK_ADDRESS SHARD STATE_DIR [PORT]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 5 ] || { sed -n '2,7p' "$0"; exit 2; }
[ -f "$4/meta.json" ] || { echo "no shard at $4 (expected $4/meta.json)" >&2; exit 2; }
shard="$(cd "$4" && pwd)"; mkdir -p -m 700 "$5"; state="$(cd "$5" && pwd)"
exec flower-supernode --root-certificates "$1" --auth-supernode-private-key "$2" --superlink "$3" \
  --port "${6:-9094}" --node-config "shard='$shard' state-dir='$state'"
