#!/usr/bin/env bash
# On the SuperLink host: run the SuperLink in the foreground with TLS (DIR/server.pem,
# DIR/server.key, DIR/ca.crt from make-certs.sh), SuperNode authentication (only
# registered keys may connect) and its state in DIR/superlink.db (registrations and runs
# survive a restart). Listens on SUPERLINK_HOST:PORT (default 0.0.0.0:8000, Flower's default): this one port
# serves SuperNodes (Fleet API) and the `flwr` CLI (Control API). Firewall it to the
# SuperNode hosts and operators: in open-source Flower anyone who reaches it with ca.crt
# can register a key and start a run.
# Usage: scripts/deploy-superlink.sh DIR [PORT]
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 1 ] || { sed -n '2,9p' "$0"; exit 2; }
dir="$(cd "$1" && pwd)"
exec flower-superlink --ssl-ca-certfile "$dir/ca.crt" --ssl-certfile "$dir/server.pem" --ssl-keyfile "$dir/server.key" \
  --enable-supernode-auth --database "$dir/superlink.db" --host "${SUPERLINK_HOST:-0.0.0.0}" --port "${2:-8000}" \
  --disable-runtime-dependency-installation
