#!/usr/bin/env bash
# Validates the deployment files offline: every Kubernetes manifest in infra/k8s with
# kubernetes-validate (strict: unknown fields are errors), the compose file with the
# compose-spec JSON schema (check-jsonschema ships it), the HAProxy configuration with
# haproxy itself (installed with apt when missing), and the observability files (alert
# rules, dashboard) against the metric catalogue and the code (check-observability.py).
# Both validators are pinned and installed into
# .cache/validate (git-ignored) the first time; they carry their schemas, so nothing is
# fetched while validating.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.cache/validate
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/check-jsonschema" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    kubernetes-validate==1.37.0 check-jsonschema==0.39.0
fi

manifests=(infra/k8s/*.yaml)
"$venv/bin/kubernetes-validate" --strict --quiet "${manifests[@]}"
echo "validate: ${#manifests[@]} Kubernetes manifest files pass (strict, Kubernetes 1.37)"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec infra/compose.yaml
if ! command -v haproxy >/dev/null 2>&1; then
  echo "validate: installing HAProxy (apt)" >&2
  infra/apt-install.sh haproxy
fi
# Service names resolve only inside compose: check the syntax, not the addresses.
sed 's/ gateway-\([12]\):8080/ 127.0.0.1:808\1/' infra/haproxy.cfg > "$venv/haproxy.cfg"
haproxy -c -q -f "$venv/haproxy.cfg"
echo "validate: infra/haproxy.cfg passes haproxy -c"
"$venv/bin/python" infra/check-observability.py
