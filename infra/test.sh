#!/usr/bin/env bash
# The project's test command (README "Quickstart"). It does all of its own set-up:
# fetches Redis (apt), Apache Kafka and Apache Cassandra (Maven Central, cached in .cache/),
# starts them on free loopback ports, runs every suite (embedded and distributed) and
# stops the servers again, also when a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

# Build every test binary once (while the servers start), then run them all; --locked
# keeps CI on Cargo.lock.
infra/servers.sh fetch
state="$(mktemp -d /tmp/chat-servers.XXXXXX)"
trap 'infra/servers.sh down "$state"; rm -rf "$state"' EXIT
infra/servers.sh up "$state" > "$state/up.log" 2>&1 &
up_pid=$!
cargo test --workspace --locked --no-run
if ! wait "$up_pid"; then
  cat "$state/up.log" >&2
  echo "test servers did not start (logs above)" >&2
  exit 1
fi
cat "$state/up.log" >&2
set -a
# shellcheck disable=SC1091
. "$state/servers.env"
set +a
cargo test --workspace --locked "$@"

# The end-to-end protocol suite again, against a cluster of 2 gateways and 2 dispatchers
# on the real servers (each test its own keyspace, topics, group and key prefix; two at a
# time, to keep the single Cassandra node's schema changes quick).
CHAT_TEST_CLUSTER=1 cargo test -p gateway --locked \
  --test connecting --test frames --test guarantees --test limits --test push \
  "$@" -- --test-threads=2

# Fault tests on the cluster: SIGKILLed dispatchers and gateways, a restarted Redis, a
# stopped broker. One at a time: they start processes and servers of their own.
CHAT_TEST_CLUSTER=1 cargo test -p gateway --locked --test faults "$@" -- --test-threads=1
