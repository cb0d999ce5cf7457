#!/usr/bin/env bash
# WebSocket conformance: the Autobahn|Testsuite cases (replayed by kosoku, from PyPI into
# .cache/autobahn the first time) against a dev-mode gateway of its own
# (infra/dev-gateway.sh), embedded, or a cluster on running servers when given a
# dispatcher binary and their backends.env; the results are compared with
# infra/autobahn-expected.json (infra/autobahn.py says how).
#   infra/autobahn.sh <gateway binary> [<dispatcher binary> <backends.env>]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.cache/autobahn
if [ ! -x "$venv/bin/kosoku" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kosoku==0.1.0
fi
exec infra/dev-gateway.sh "$@" -- \
  sh -c "$venv/bin/python infra/autobahn.py \"\$GATEWAY_URL\" infra/autobahn-expected.json"
