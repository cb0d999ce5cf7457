#!/usr/bin/env bash
# The browser check of the demo page: installs what it needs if missing (Chromium from
# Debian, playwright-core from npm into .cache/pw), starts a dev-mode embedded gateway on
# free loopback ports with a fresh data directory, runs infra/demo-check.mjs against it,
# and stops the gateway again.
#   infra/browser.sh <path to the gateway binary>
set -euo pipefail
cd "$(dirname "$0")/.."
gateway="${1:?usage: infra/browser.sh <path to the gateway binary>}"

if ! command -v chromium >/dev/null 2>&1; then
  echo "browser: installing Chromium (apt)" >&2
  infra/apt-install.sh chromium
fi
if ! command -v node >/dev/null 2>&1; then
  echo "browser: node is not installed (it runs the check): install Node.js" >&2
  exit 1
fi
if [ ! -d .cache/pw/node_modules/playwright-core ]; then
  echo "browser: installing playwright-core (npm) into .cache/pw" >&2
  mkdir -p .cache/pw
  (cd .cache/pw && npm install --no-audit --no-fund --silent playwright-core@1.65.1 >/dev/null)
fi

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port="$(free_port)"
admin="$(free_port)"
data="$(mktemp -d /tmp/chat-browser.XXXXXX)"
"$gateway" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --data-dir "$data" \
  > "$data/gateway.log" 2>&1 &
gw_pid=$!
trap 'kill "$gw_pid" 2>/dev/null || true; wait "$gw_pid" 2>/dev/null || true; rm -rf "$data"' EXIT

for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$gw_pid" 2>/dev/null; then
    cat "$data/gateway.log" >&2
    echo "browser: the gateway did not start (log above)" >&2
    exit 1
  fi
  sleep 0.1
done

if ! PLAYWRIGHT_DIR=.cache/pw node infra/demo-check.mjs "http://127.0.0.1:$port/"; then
  tail -n 50 "$data/gateway.log" >&2
  echo "browser: the demo page check failed (gateway log above)" >&2
  exit 1
fi
