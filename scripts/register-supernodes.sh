#!/usr/bin/env bash
# On the SuperLink host (or wherever you run `flwr`): point the CLI at the SuperLink over
# TLS (connection "fedrec-deploy" in DIR/flwr-home/config.toml) and
# register each SuperNode's public key. Registrations live in the SuperLink's database.
# Usage: scripts/register-supernodes.sh DIR ADDRESS NODE.pub...   e.g. ... /etc/fedrec superlink.lab:8000 keys/*.pub
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 3 ] || { sed -n '2,5p' "$0"; exit 2; }
dir="$(cd "$1" && pwd)"; address="$2"; shift 2  # the rest: public keys
export FLWR_HOME="$dir/flwr-home"  # its own: config.toml is rewritten, never ~/.flwr
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "fedrec-deploy"
[superlink.fedrec-deploy]
address = "$address"
root-certificates = '$dir/ca.crt'
TOML
for pub in "$@"; do flwr supernode register "$pub" fedrec-deploy; done
flwr supernode list fedrec-deploy
echo "CLI connection in FLWR_HOME=$FLWR_HOME; run with scripts/deploy-run.sh $dir"
