#!/usr/bin/env bash
# Runs a command against a dev-mode gateway of its own: starts the gateway on free loopback
# ports with a fresh data directory (embedded), or, given a dispatcher binary and the
# backends.env of running servers (infra/servers.sh up), a cluster of one gateway and one
# dispatcher on them with their own topics, keyspace and key prefix; waits for /readyz;
# runs the command with GATEWAY_URL (http://127.0.0.1:<port>) and GATEWAY_MODE (embedded
# or cluster) set; prints the processes' last log lines if it fails; stops them again.
#   infra/dev-gateway.sh <gateway binary> [<dispatcher binary> <backends.env>] -- <command…>
set -euo pipefail
usage="usage: infra/dev-gateway.sh <gateway binary> [<dispatcher binary> <backends.env>] -- <command…>"
gateway="${1:?$usage}"
shift
dispatcher="" backends=""
if [ "${1:-}" != "--" ]; then
  dispatcher="${1:?$usage}" backends="${2:?$usage}"
  shift 2
fi
[ "${1:-}" = "--" ] && [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
shift

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port="$(free_port)"
admin="$(free_port)"
data="$(mktemp -d /tmp/chat-dev-gateway.XXXXXX)"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait "${pids[@]}" 2>/dev/null || true; rm -rf "$data"' EXIT
mode=embedded
if [ -n "$dispatcher" ]; then
  set -a
  # shellcheck disable=SC1090
  . "$backends"
  tag="dev$(date +%s%N)"
  KAFKA_TOPIC_PREFIX="$tag." KAFKA_GROUP="$tag" KAFKA_PARTITIONS=4 SCYLLA_KEYSPACE="$tag" REDIS_PREFIX="$tag"
  STORAGE_KEYS="1:$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  set +a
  "$dispatcher" --admin-listen "127.0.0.1:$(free_port)" > "$data/dispatcher.log" 2>&1 &
  pids+=($!)
  mode=cluster
fi
"$gateway" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" --data-dir "$data" \
  ${dispatcher:+--dev true} > "$data/gateway.log" 2>&1 &
gw_pid=$!
pids+=("$gw_pid")

for _ in $(seq 1 100); do
  if curl -fsS "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$gw_pid" 2>/dev/null; then
    cat "$data/gateway.log" >&2
    echo "dev-gateway: the gateway did not start (log above)" >&2
    exit 1
  fi
  sleep 0.1
done

if ! GATEWAY_URL="http://127.0.0.1:$port" GATEWAY_MODE="$mode" "$@"; then
  tail -n 50 "$data/gateway.log" >&2
  [ -z "$dispatcher" ] || tail -n 30 "$data/dispatcher.log" >&2
  echo "dev-gateway: '$*' failed against the $mode gateway (its log above)" >&2
  exit 1
fi
