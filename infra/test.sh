#!/usr/bin/env bash
# The project's test command (README "Quickstart"). It does all of its own set-up:
# fetches Redis (apt), Apache Kafka and Apache Cassandra (Maven Central, cached in .cache/),
# builds SeaweedFS (the S3-compatible server for media; Go module proxy, cached in .cache/),
# Chromium (apt) and playwright-core (npm, cached in .cache/pw) for the browser check,
# HAProxy (apt) and the manifest validators (PyPI, cached in .cache/validate), kosoku
# (the Autobahn|Testsuite cases; PyPI, cached in .cache/autobahn),
# starts them on free loopback ports, runs every suite (embedded and distributed) and
# stops the servers again, also when a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

# Starts a set of test servers (`infra/servers.sh <up-…> <dir>`), printing its log. The
# servers' ports are picked free just before they bind, so another process can take one
# in between (a Kafka controller once found its port in use): a failed start is stopped,
# cleared and tried once more on fresh ports; a second failure stops the run with the log.
start_servers() { # <up command> <state dir>
  local attempt
  for attempt in 1 2; do
    if infra/servers.sh "$1" "$2" > "$2/up.log" 2>&1; then
      cat "$2/up.log" >&2
      return 0
    fi
    cat "$2/up.log" >&2
    infra/servers.sh down "$2" || true
    find "$2" -mindepth 1 -delete
    if [ "$attempt" = 1 ]; then
      echo "test servers ($1) did not start (logs above); trying once more" >&2
    fi
  done
  echo "test servers ($1) did not start twice (logs above)" >&2
  exit 1
}

# Each stage prints how long it took.
stage_started=$SECONDS
stage() { # <name of the stage that just ended>
    echo "== stage '$1' took $((SECONDS - stage_started)) s" >&2
    stage_started=$SECONDS
}

# A clean run needs about 8 GB of disk: the test build (about 4 GB in target/), the cached
# servers and tools (.cache/, under 1 GB) and the servers' data in /tmp. A full disk shows
# up as a linker killed by SIGBUS, so say it first.
target_dir="${CARGO_TARGET_DIR:-.}"
[ -d "$target_dir" ] || target_dir=.
free_kb=$(df -Pk "$target_dir" | awk 'NR == 2 { print $4 }') || free_kb=
if [ -n "$free_kb" ] && [ "$free_kb" -lt $((8 * 1024 * 1024)) ]; then
  echo "warning: only $((free_kb / 1024)) MB free for target/; a clean run needs about 8 GB" >&2
fi

# librdkafka is built with OpenSSL (TLS and SASL/SCRAM to Kafka): its headers, from apt.
if ! pkg-config --exists openssl 2>/dev/null; then
  infra/apt-install.sh libssl-dev pkg-config
fi

# Build every test binary once (while the servers start), then run them all; --locked
# keeps CI on Cargo.lock.
infra/servers.sh fetch
stage "fetch servers"
# The deployment files (Kubernetes manifests, the compose file, HAProxy's configuration),
# validated offline.
infra/validate.sh
stage "validate deployment files"
state="$(mktemp -d /tmp/chat-servers.XXXXXX)"
trap 'infra/servers.sh down "$state"; rm -rf "$state"' EXIT
infra/servers.sh up "$state" > "$state/up.log" 2>&1 &
up_pid=$!
cargo test --workspace --locked --no-run
stage "build tests"
if ! wait "$up_pid"; then
  cat "$state/up.log" >&2
  echo "test servers did not start (logs above)" >&2
  exit 1
fi
cat "$state/up.log" >&2
stage "start servers (after the build)"
set -a
# shellcheck disable=SC1091
. "$state/servers.env"
set +a
cargo test --workspace --locked "$@"
stage "workspace tests"

# The demo page, a small real client, in headless Chromium (installed if missing) against
# a dev-mode embedded gateway: every case that once broke it.
cargo build -p gateway -p dispatcher --locked
infra/browser.sh target/debug/gateway
# And a picture between two demo-page users through a cluster, its media on the S3 server.
infra/browser.sh target/debug/gateway target/debug/dispatcher "$state/backends.env"
stage "browser check"

# WebSocket conformance: the Autobahn|Testsuite cases (kosoku, PyPI, cached in
# .cache/autobahn) against an embedded gateway and against a cluster on the servers, each
# result compared with infra/autobahn-expected.json.
infra/autobahn.sh target/debug/gateway
infra/autobahn.sh target/debug/gateway target/debug/dispatcher "$state/backends.env"
stage "autobahn"

# The end-to-end protocol suite again, against a cluster of 2 gateways and 2 dispatchers
# on the real servers, its clients through HAProxy (installed by validate.sh); each test
# its own keyspace, topics, group and key prefix; two at a time, to keep the single
# Cassandra node's schema changes quick.
CHAT_TEST_CLUSTER=1 cargo test -p gateway --locked \
  --test connecting --test frames --test guarantees --test inbox --test limits --test push --test e2ee \
  --test media \
  "$@" -- --test-threads=2
stage "cluster suite"

# Fault tests on the cluster: SIGKILLed dispatchers and gateways, a restarted Redis, a
# stopped broker. One at a time: they start processes and servers of their own.
CHAT_TEST_CLUSTER=1 cargo test -p gateway --locked --test faults "$@" -- --test-threads=1
stage "fault tests"

# The replicated stage: its own servers (three Kafka brokers, three Cassandra nodes on
# 127.0.0.1/.2/.3, a Redis Cluster of three masters), after the single-node ones are
# stopped (memory and CPU are tight on two cores). Presence's conformance suite on the
# Redis Cluster, the cluster's protocol guarantees and limits on all of them, then a
# broker, a Cassandra node and a Redis master SIGKILLed under load.
infra/servers.sh down "$state"
# No S3 server in the next stages: their gateways run without media.
unset TEST_S3_ENDPOINT TEST_S3_BUCKET TEST_S3_ACCESS_KEY_ID TEST_S3_SECRET_ACCESS_KEY

# The secure stage: Redis (an ACL user, TLS only), Kafka (SASL/SCRAM over TLS) and
# Cassandra (PasswordAuthenticator, client encryption required), with a CA and a server
# certificate made for the run. The cluster's guarantees over them, and start-up refused
# quickly, naming the backend, for each wrong password, missing CA or plain connection.
secure="$(mktemp -d /tmp/chat-secure.XXXXXX)"
trap 'infra/servers.sh down "$state"; infra/servers.sh down "$secure"; rm -rf "$state" "$secure"' EXIT
start_servers up-secure "$secure"
(
  set -a
  # shellcheck disable=SC1091
  . "$secure/servers.env"
  set +a
  CHAT_TEST_CLUSTER=1 cargo test -p gateway --locked --test secure --test guarantees "$@" -- --test-threads=2
)
infra/servers.sh down "$secure"
stage "secure servers suite"

replicated="$(mktemp -d /tmp/chat-replicated.XXXXXX)"
trap 'infra/servers.sh down "$state"; infra/servers.sh down "$secure"; infra/servers.sh down "$replicated"; rm -rf "$state" "$secure" "$replicated"' EXIT
start_servers up-replicated "$replicated"
stage "start replicated servers"
set -a
# shellcheck disable=SC1091
. "$replicated/servers.env"
set +a
cargo test -p presence --locked --test conformance "$@"
CHAT_TEST_CLUSTER=1 cargo test -p gateway --locked --test guarantees --test limits "$@" -- --test-threads=1
CHAT_TEST_CLUSTER=1 cargo test -p gateway --locked --test replicated "$@" -- --test-threads=1
# Node liveness expiry on the Redis Cluster: a SIGKILLed gateway's users go offline.
CHAT_TEST_CLUSTER=1 cargo test -p gateway --locked --test faults "$@" -- --test-threads=1 \
  killing_a_gateway
stage "replicated suite"
