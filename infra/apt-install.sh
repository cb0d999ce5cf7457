#!/usr/bin/env bash
# Installs Debian packages (as root, or with sudo), updating the package lists only when
# the first attempt fails. Used by the test command's stages for what they need.
#   infra/apt-install.sh <package>...
set -euo pipefail
if [ "$(id -u)" = 0 ]; then apt_get=(apt-get); else apt_get=(sudo apt-get); fi
export DEBIAN_FRONTEND=noninteractive
"${apt_get[@]}" install -y -q "$@" >/dev/null \
  || { "${apt_get[@]}" update -q >/dev/null && "${apt_get[@]}" install -y -q "$@" >/dev/null; }
