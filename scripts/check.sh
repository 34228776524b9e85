#!/usr/bin/env bash
# The test command: every check CI runs, in order. Run it from anywhere after
# installing the project with its dev extras into .venv (see README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${SESSION_MANAGER_VENV:-.venv}/bin

# Node, chromium and the PostgreSQL server: installed here when missing (as
# root with apt), or named in one line with the command that installs them.
scripts/system-needs.sh

if [ ! -d client/node/node_modules ]; then
    echo "== Node client dependencies (npm ci, from client/node/package-lock.json)"
    npm ci --prefix client/node --ignore-scripts --no-audit --no-fund
fi
echo "== generated code matches protos/ (Python and Node)"
"$BIN/python" scripts/codegen.py --check
echo "== buf lint"
"$BIN/buf" lint
echo "== buf breaking (against the frozen v1 contract)"
"$BIN/buf" breaking --against .ci/contract-baseline.binpb
echo "== ruff"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
echo "== mypy"
"$BIN/mypy"
echo "== pytest"
"$BIN/python" -m pytest "$@"
echo "== Node client: tsc, then node --test against real servers"
SESSION_MANAGER_BIN="$PWD/$BIN/session-manager" npm test --prefix client/node
