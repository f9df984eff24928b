#!/usr/bin/env bash
# Validates every Kubernetes manifest serin ships or generates:
#   - the injected golden outputs (tests/fixtures/inject/*.golden.yaml, with the fleets'
#     ServiceAccounts, Roles and RoleBindings), the examples and the webhook manifests,
#     against the Kubernetes OpenAPI schema (kubernetes-validate, strict);
#   - the SerinRollout CRD (deploy/crds/, the chart's crds/) as a CustomResourceDefinition,
#     and every SerinRollout (the example, the chart's) against the CRD's openAPIV3Schema
#     (jsonschema, strict);
#   - the RBAC: no cluster role, no wildcard, names on rules, a fleet Role that is exactly
#     what a member calls, and every fleet pod bound to it;
#   - the Helm chart, linted and rendered with Helm's engine (fleet mode on and off), then
#     validated the same way, and the values it must refuse.
# The goldens are kept current by `cargo test -p serin-tests --test inject`, so run this
# after the tests. Idempotent; needs only Debian packages and PyPI. Takes about a minute
# (the first run downloads ~80 MB of wheels, cached afterwards).
#
# Environment:
#   SERIN_VALIDATE_VENV  where to keep the Python venv (default ~/.cache/serin-validate-venv)
#   SERIN_RENDERED_DIR   where to write the rendered chart (default target/deploy-rendered)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${SERIN_VALIDATE_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/serin-validate-venv}"
rendered="${SERIN_RENDERED_DIR:-target/deploy-rendered}"

# Pinned so that a new schema or Helm release cannot change a green run.
requirements=(
  "kubernetes-validate==1.37.0"
  "helm-python-sdk==0.2.2"
  "jsonschema==4.26.0"
  "PyYAML>=6"
)

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "deploy/ci.sh: installing python3-venv (Debian)" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
if [[ ! -x "$venv/bin/python" ]]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}"; then
  echo "deploy/ci.sh: cannot install ${requirements[*]} from PyPI" >&2
  exit 1
fi

"$venv/bin/python" deploy/validate.py \
  --chart deploy/helm/serin \
  --out "$rendered" \
  tests/fixtures/inject/*.golden.yaml \
  deploy/examples/*.yaml \
  deploy/webhook/*.yaml \
  deploy/crds/*.yaml

# promtool, from Debian's prometheus package: downloaded and unpacked under the cache,
# once, so no Prometheus service is installed or started.
promtool_dir="${XDG_CACHE_HOME:-$HOME/.cache}/serin-promtool"
promtool="$promtool_dir/usr/bin/promtool"
if [[ ! -x "$promtool" ]]; then
  echo "deploy/ci.sh: fetching promtool (Debian package prometheus)" >&2
  mkdir -p "$promtool_dir"
  (cd "$promtool_dir" && { apt-get download prometheus >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get download prometheus >/dev/null; }; } \
    && dpkg-deb -x prometheus_*.deb . && rm -f prometheus_*.deb)
fi
(cd deploy/prometheus && "$promtool" check rules serin-alerts.yaml && "$promtool" test rules serin-alerts.test.yaml)
