#!/usr/bin/env bash
# Chart checks (CI runs this from .ci/run before `cargo test`): Helm lint and render of
# charts/stackroute-crds and charts/stackroute with default, HA, cert-manager and external-etcd
# values through the real Helm engine (PyPI helm-python-sdk), every rendered object against the
# Kubernetes 1.28 and 1.37 schemas (PyPI kubernetes-validate, strict), the StackRoute examples
# against the CRDs' own OpenAPI schemas, the CRD chart against `stackroute crd`, and manifests/
# against the default render. Details: scripts/charts.py. Exit status non-zero on any failure.
#
# The Python packages go into a virtualenv (default target/chart-venv, override with
# STACKROUTE_CHART_VENV); versions are pinned here. `scripts/check-charts.sh refresh` regenerates
# the CRD chart template and manifests/install.yaml after a change to the charts or the CRDs.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_PYTHON_SDK=0.2.2
KUBERNETES_VALIDATE=1.37.0
PYYAML=6.0.3
JSONSCHEMA=4.26.0

venv="${STACKROUTE_CHART_VENV:-target/chart-venv}"
stamp="$venv/.stackroute-pins"
pins="helm-python-sdk==$HELM_PYTHON_SDK kubernetes-validate==$KUBERNETES_VALIDATE PyYAML==$PYYAML jsonschema==$JSONSCHEMA"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$pins" ]; then
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    else
      echo "check-charts: python3 -m venv is unavailable (Debian: apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $pins
  echo "$pins" > "$stamp"
fi
echo "check-charts: $pins ($venv)"
exec "$venv/bin/python" scripts/charts.py "${1:-check}"
