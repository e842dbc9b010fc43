#!/usr/bin/env bash
# Chart checks (CI runs this from .ci/run before `cargo test`): Helm lint and render of
# charts/stackroute-crds and charts/stackroute with default, HA, cert-manager and external-etcd
# values through the real Helm engine (PyPI helm-python-sdk), every rendered object against the
# Kubernetes 1.28 and 1.37 schemas (PyPI kubernetes-validate, strict), the same renders for
# Kubernetes 1.20.2 and where each of the charts' degrades starts or ends, the StackRoute examples
# against the CRDs' own OpenAPI schemas, the CRD chart against `stackroute crd`, and manifests/
# against the default render. Details: scripts/charts.py. Exit status non-zero on any failure.
#
# The Python packages go into a virtualenv (default target/chart-venv, override with
# STACKROUTE_CHART_VENV); every version is pinned in scripts/chart-requirements.txt.
# `scripts/check-charts.sh refresh` regenerates
# the CRD chart template and manifests/install.yaml after a change to the charts or the CRDs.
set -euo pipefail
cd "$(dirname "$0")/.."

requirements=scripts/chart-requirements.txt   # helm-python-sdk, kubernetes-validate, PyYAML, jsonschema + their dependencies, pinned
venv="${STACKROUTE_CHART_VENV:-target/chart-venv}"
stamp="$venv/.stackroute-requirements"
if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$stamp"; then
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
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi
echo "check-charts: $(grep -v "^#" "$requirements" | tr "\n" " ")($venv)"
exec "$venv/bin/python" scripts/charts.py "${1:-check}"
