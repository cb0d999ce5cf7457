#!/usr/bin/env bash
# The project's test command (README "Quickstart"). It does all of its own set-up.
#
# Today every suite runs against the embedded backends, in process: no external server is
# needed. When the distributed backends land, this script is where the real Kafka,
# Cassandra and Redis servers are fetched (into .cache/, git-ignored), started on loopback
# and stopped again.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust (https://rustup.rs) and run this again" >&2
  exit 1
fi

# Build every test binary once, then run them all; --locked keeps CI on Cargo.lock.
cargo test --workspace --locked --no-run
cargo test --workspace --locked "$@"
