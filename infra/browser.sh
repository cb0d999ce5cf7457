#!/usr/bin/env bash
# The browser check of the demo page: installs what it needs if missing (Chromium from
# Debian, playwright-core from npm into .cache/pw) and runs infra/demo-check.mjs against a
# dev-mode embedded gateway of its own (infra/dev-gateway.sh). With a dispatcher binary
# and a backends.env of running servers (infra/servers.sh up), it runs the media check
# alone (pictures through S3) against a dev-mode cluster of one gateway and one dispatcher
# on them instead.
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

only=""
[ -z "$dispatcher" ] || only=media
exec infra/dev-gateway.sh "$gateway" ${dispatcher:+"$dispatcher" "$backends"} -- \
  env ONLY="$only" PLAYWRIGHT_DIR=.cache/pw sh -c 'node infra/demo-check.mjs "$GATEWAY_URL/"'
