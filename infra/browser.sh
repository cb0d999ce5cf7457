#!/usr/bin/env bash
# The browser check of the demo page: installs what it needs if missing (Chromium from
# Debian, playwright-core from npm into .cache/pw), starts a dev-mode embedded gateway on
# free loopback ports with a fresh data directory, runs infra/demo-check.mjs against it,
# and stops the gateway again. With a dispatcher binary and a backends.env of running
# servers (infra/servers.sh up), it starts a dev-mode cluster of one gateway and one
# dispatcher on them instead and runs the media check alone (pictures through S3).
#   infra/browser.sh <path to the gateway binary> [<dispatcher binary> <backends.env>]
set -euo pipefail
cd "$(dirname "$0")/.."
gateway="${1:?usage: infra/browser.sh <path to the gateway binary> [<dispatcher binary> <backends.env>]}"
dispatcher="${2:-}"
backends="${3:-}"

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
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; rm -rf "$data"' EXIT
only=""
if [ -n "$dispatcher" ]; then
  # A cluster of its own on the shared servers: its own topics, keyspace and key prefix.
  set -a
  # shellcheck disable=SC1090
  . "$backends"
  tag="browser$(date +%s)"
  KAFKA_TOPIC_PREFIX="$tag." KAFKA_GROUP="$tag" KAFKA_PARTITIONS=4 SCYLLA_KEYSPACE="$tag" REDIS_PREFIX="$tag"
  STORAGE_KEYS="1:$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  set +a
  "$dispatcher" --admin-listen "127.0.0.1:$(free_port)" > "$data/dispatcher.log" 2>&1 &
  pids+=($!)
  only=media
fi
"$gateway" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --data-dir "$data" \
  ${dispatcher:+--dev true} > "$data/gateway.log" 2>&1 &
gw_pid=$!
pids+=("$gw_pid")

for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$gw_pid" 2>/dev/null; then
    cat "$data/gateway.log" >&2
    echo "browser: the gateway did not start (log above)" >&2
    exit 1
  fi
  sleep 0.1
done

if ! ONLY="$only" PLAYWRIGHT_DIR=.cache/pw node infra/demo-check.mjs "http://127.0.0.1:$port/"; then
  tail -n 50 "$data/gateway.log" >&2
  [ -z "$dispatcher" ] || tail -n 30 "$data/dispatcher.log" >&2
  echo "browser: the demo page check failed (gateway log above)" >&2
  exit 1
fi
