#!/usr/bin/env bash
# On each SuperNode host: the node's key pair, FILE (private, 0600, never leaves the host)
# and FILE.pub (send it to the SuperLink operator, who registers it).
# Usage: scripts/make-node-key.sh FILE          e.g. scripts/make-node-key.sh ~/.fedrec/node-key
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -eq 1 ] || { sed -n '2,4p' "$0"; exit 2; }
exec "$PYTHON" -m fedrec.deploy.deploy node-key "$1"
