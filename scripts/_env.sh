# Sourced by the deploy-*.sh scripts: use the repository's virtualenv if there is one.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$REPO/.venv/bin/flower-superlink" ]; then export PATH="$REPO/.venv/bin:$PATH"; fi
PYTHON="$(command -v python)"
# Never `uv sync` an app's dependencies at run time: install fedrec on every host beforehand.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
