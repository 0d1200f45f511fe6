#!/usr/bin/env bash
# On the SuperLink host, once: a CA and the SuperLink's TLS certificate, valid for
# 127.0.0.1, localhost and every HOST given (the names or IPs the SuperNodes dial).
# Writes DIR/ca.crt, DIR/server.pem, DIR/server.key and DIR/ca.key (keys 0600); refuses to
# overwrite. Copy only DIR/ca.crt to the SuperNode hosts; keep ca.key offline.
# Usage: scripts/make-certs.sh DIR HOST...      e.g. scripts/make-certs.sh /etc/fedrec superlink.lab 10.0.0.5
set -euo pipefail
source "$(dirname "$0")/_env.sh"
[ $# -ge 1 ] || { sed -n '2,7p' "$0"; exit 2; }
exec "$PYTHON" -m fedrec.deploy.deploy certs "$@"
