#!/usr/bin/env bash
# stackroute kind e2e suite: builds the images, creates a kind cluster (one control plane, two
# workers in zones zone-a/zone-b), loads the images, installs the charts with Helm (upgrading
# from the previous chart version when git history has one), and checks:
#   1. a pod in a namespace labelled stackroute.dev/inject=enabled is injected, an opted-out
#      pod is not;
#   2. a StackRoute becomes Accepted and Programmed;
#   3. the opted-in client's connection runs with the congestion control the policy names
#      (`ss -tin` in the pod's network namespace, entered with nsenter on its kind node), and
#      the opted-out control pod's does not;
#   4. examples/policies pass the API server's validation (OpenAPI + CEL) on a dry run;
#   5. upgrade: the previous chart installs and accepts a StackRoute, `helm upgrade` to the
#      working tree keeps that StackRoute, and checks 1-4 run on the upgraded release.
#
# Needs docker (daemon reachable), kind, kubectl and helm. Without them it prints
# "SKIP: <reason>" and exits 0, or exits 1 when STACKROUTE_REQUIRE_KUBERNETES=1.
#
# Environment:
#   STACKROUTE_E2E_CLUSTER      kind cluster name (stackroute-e2e)
#   STACKROUTE_E2E_KEEP=1       keep the cluster afterwards (it is reused when it exists)
#   STACKROUTE_E2E_SKIP_BUILD=1 use already built stackroute.local/*:e2e images
#   STACKROUTE_E2E_PREVIOUS_REF git ref of the chart to upgrade from (default: the newest commit
#                               whose charts/stackroute/Chart.yaml has another version; else the
#                               commit that added the chart, if the chart changed since)
#   STACKROUTE_E2E_PYTHON_IMAGE test workload image (python:3.12-slim-bookworm)
#   SHIM_MUSL=1                 also build the musl shim
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
HERE=$ROOT/e2e/kind

CLUSTER=${STACKROUTE_E2E_CLUSTER:-stackroute-e2e}
NS=stackroute-system
APP_NS=stackroute-e2e
REGISTRY=stackroute.local
TAG=e2e
PYTHON_IMAGE=${STACKROUTE_E2E_PYTHON_IMAGE:-python:3.12-slim-bookworm}
WORK=$HERE/.work
KUBECONFIG_FILE=$WORK/kubeconfig

skip() {
  if [ "${STACKROUTE_REQUIRE_KUBERNETES:-0}" = 1 ]; then
    echo "FAIL: kind e2e cannot run and STACKROUTE_REQUIRE_KUBERNETES=1: $*" >&2
    exit 1
  fi
  echo "SKIP: kind e2e: $*"
  exit 0
}

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || skip "$tool not installed"
done
docker info >/dev/null 2>&1 || skip "the Docker daemon is not reachable"

step() { printf '\n=== e2e/kind: %s (%ss)\n' "$*" "$SECONDS"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "  ok    $*"; }

mkdir -p "$WORK"
export KUBECONFIG=$KUBECONFIG_FILE
k() { kubectl "$@"; }

diagnostics() {
  local rc=$?
  if [ "$rc" != 0 ]; then
    echo "--- diagnostics (exit $rc)"
    k get nodes -o wide --show-labels || true
    k get pods -A -o wide || true
    k -n "$NS" describe pods || true
    k -n "$NS" logs -l app.kubernetes.io/component=controller --tail=200 --all-containers || true
    k -n "$NS" logs -l app.kubernetes.io/component=agent --tail=100 --all-containers || true
    k -n "$APP_NS" describe pods || true
    k get sr -A -o yaml || true
  fi
  if [ "${STACKROUTE_E2E_KEEP:-0}" != 1 ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  else
    echo "cluster $CLUSTER kept: export KUBECONFIG=$KUBECONFIG_FILE"
  fi
}

# ----------------------------------------------------------------------------- images
if [ "${STACKROUTE_E2E_SKIP_BUILD:-0}" != 1 ]; then
  step "build images"
  make -C images build REGISTRY=$REGISTRY TAG=$TAG SHIM_MUSL="${SHIM_MUSL:-0}"
fi
IMAGES=("$REGISTRY/stackroute-controller:$TAG" "$REGISTRY/stackroute-lrd:$TAG" "$REGISTRY/stackroute-shim:$TAG")
docker pull -q "$PYTHON_IMAGE" >/dev/null

# ----------------------------------------------------------------------------- cluster
step "kind cluster $CLUSTER"
if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --config "$HERE/cluster.yaml" --kubeconfig "$KUBECONFIG_FILE" --wait 120s
else
  kind export kubeconfig --name "$CLUSTER" --kubeconfig "$KUBECONFIG_FILE"
fi
trap diagnostics EXIT
for zone in zone-a zone-b; do
  node=$(k get nodes -l stackroute.dev/e2e-zone=$zone -o jsonpath='{.items[0].metadata.name}')
  [ -n "$node" ] || fail "no worker labelled stackroute.dev/e2e-zone=$zone"
  k label node "$node" topology.kubernetes.io/zone=$zone --overwrite >/dev/null
done
pass "workers labelled topology.kubernetes.io/zone=zone-a and zone-b"
kind load docker-image --name "$CLUSTER" "${IMAGES[@]}" "$PYTHON_IMAGE"

# ----------------------------------------------------------------------------- tests
node_of() { k -n "$APP_NS" get pod "$1" -o jsonpath='{.spec.nodeName}'; }
pid_of() { # pid of a pod's first container on its kind node (kind nodes are docker containers)
  local node id
  node=$(node_of "$1")
  id=$(docker exec "$node" crictl ps -q --name "$2" --label io.kubernetes.pod.name="$1" --label io.kubernetes.pod.namespace="$APP_NS" | head -1)
  [ -n "$id" ] || fail "no running container $2 of pod $1 on $node"
  docker exec "$node" crictl inspect --output go-template --template '{{.info.pid}}' "$id"
}
ss_of() { # ss -tin of a pod's established connections to $SERVER_IP:8080, from inside its netns
  local node pid
  node=$(node_of "$1")
  pid=$(pid_of "$1" client)
  docker exec "$node" nsenter -t "$pid" -n ss -tin state established "( dst $SERVER_IP and dport = :8080 )"
}

run_tests() { # $1: label for the output
  step "tests ($1)"
  k delete namespace "$APP_NS" --ignore-not-found --wait=true --timeout=2m >/dev/null
  k create namespace "$APP_NS" >/dev/null
  k label namespace "$APP_NS" stackroute.dev/inject=enabled >/dev/null
  sed "s|PYTHON_IMAGE|$PYTHON_IMAGE|" "$HERE/manifests/workloads.yaml" | k apply -f - >/dev/null
  k apply -f "$HERE/manifests/policy.yaml" >/dev/null
  k -n "$APP_NS" wait --for=condition=Ready pod/server --timeout=2m >/dev/null
  SERVER_IP=$(k -n "$APP_NS" get pod server -o jsonpath='{.status.podIP}')
  sed "s|PYTHON_IMAGE|$PYTHON_IMAGE|; s|SERVER_IP|$SERVER_IP|" "$HERE/manifests/clients.yaml" | k apply -f - >/dev/null
  k -n "$APP_NS" wait --for=condition=Ready pod/client pod/control --timeout=2m >/dev/null

  # 1. injection
  local injected preload
  injected=$(k -n "$APP_NS" get pod client -o jsonpath='{.metadata.annotations.stackroute\.dev/injected}')
  preload=$(k -n "$APP_NS" get pod client -o jsonpath='{.spec.containers[0].env[?(@.name=="LD_PRELOAD")].value}')
  [ -n "$injected" ] && [ -n "$preload" ] || fail "client (namespace opt-in) not injected: annotation='$injected' LD_PRELOAD='$preload'"
  k -n "$APP_NS" get pod client -o jsonpath='{.spec.volumes[*].hostPath.path}' | grep -qw /run/stackroute \
    || fail "client does not mount the agent socket directory"
  pass "client injected (stackroute.dev/injected=$injected, LD_PRELOAD=$preload, /run/stackroute mounted)"
  [ -z "$(k -n "$APP_NS" get pod control -o jsonpath='{.metadata.annotations.stackroute\.dev/injected}{.spec.containers[0].env[?(@.name=="LD_PRELOAD")].value}')" ] \
    || fail "control pod (stackroute.dev/inject=disabled) was injected"
  pass "control pod (label disabled) not injected"

  # 2. status
  k -n "$APP_NS" wait --for=condition=Accepted sr/client-to-server-reno --timeout=60s >/dev/null \
    || fail "StackRoute not Accepted"
  k -n "$APP_NS" wait --for=condition=Programmed sr/client-to-server-reno --timeout=120s >/dev/null \
    || fail "StackRoute not Programmed"
  pass "StackRoute Accepted and Programmed: $(k -n "$APP_NS" get sr client-to-server-reno --no-headers)"

  # 3. transport on the wire. The client reconnects; wait for a connection made after Programmed.
  k -n "$APP_NS" delete pod client --wait=true >/dev/null
  sed "s|PYTHON_IMAGE|$PYTHON_IMAGE|; s|SERVER_IP|$SERVER_IP|" "$HERE/manifests/clients.yaml" | k apply -f - >/dev/null
  k -n "$APP_NS" wait --for=condition=Ready pod/client --timeout=2m >/dev/null
  local out="" _
  for _ in $(seq 30); do
    out=$(ss_of client || true)
    echo "$out" | grep -qw reno && break
    sleep 1
  done
  echo "$out" | sed 's/^/        /'
  echo "$out" | grep -qw reno || fail "client connection to $SERVER_IP:8080 does not use reno (policy Kernel/Reno)"
  pass "client's connection uses reno, as the StackRoute names (ss -tin in the pod's netns)"
  out=$(ss_of control)
  echo "$out" | sed 's/^/        /'
  echo "$out" | grep -q "$SERVER_IP" || fail "control pod has no connection to the server"
  echo "$out" | grep -qw reno && fail "control pod (not injected) also uses reno: the check cannot tell them apart"
  pass "control pod's connection keeps the node default ($(echo "$out" | grep -ow 'cubic\|bbr\|reno' | head -1))"

  # 4. the API server's own validation of the examples (OpenAPI + CEL)
  local f ns
  for ns in $(cat examples/policies/*.yaml examples/invalid/unknown-field.yaml | sed -n 's/.*namespace: *\([a-z0-9-]*\).*/\1/p' | sort -u); do
    k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
  done
  for f in examples/policies/*.yaml; do
    k apply --dry-run=server -f "$f" >/dev/null 2>"$WORK/err" || { cat "$WORK/err"; fail "API server rejects $f"; }
  done
  k apply --dry-run=server --validate=strict -f examples/invalid/unknown-field.yaml >/dev/null 2>"$WORK/err" \
    && fail "API server accepts examples/invalid/unknown-field.yaml"
  grep -qi 'unknown field' "$WORK/err" || { cat "$WORK/err"; fail "unknown-field.yaml rejected for another reason"; }
  pass "examples/policies accepted by the API server (dry run); an unknown field is rejected"
}

# ----------------------------------------------------------------------------- helm
HELM_ARGS=(--set "image.registry=$REGISTRY" --set "image.tag=$TAG" --set image.pullPolicy=Never)

install_chart() { # $1: charts directory, $2: description
  helm upgrade --install stackroute-crds "$1/stackroute-crds" --wait --timeout 2m
  k wait --for=condition=Established crd/stackroutes.stackroute.dev crd/clusterstackroutes.stackroute.dev --timeout=60s
  helm upgrade --install stackroute "$1/stackroute" -n "$NS" --create-namespace "${HELM_ARGS[@]}" \
    --wait --timeout 5m
  k -n "$NS" rollout status deploy/stackroute-controller --timeout=3m
  k -n "$NS" rollout status ds/stackroute-agent --timeout=3m
  pass "helm: $2 installed, controller and agents rolled out"
}

previous_ref() {
  if [ -n "${STACKROUTE_E2E_PREVIOUS_REF:-}" ]; then echo "$STACKROUTE_E2E_PREVIOUS_REF"; return; fi
  local current v c first
  current=$(sed -n 's/^version: *//p' charts/stackroute/Chart.yaml)
  for c in $(git log --format=%H -- charts/stackroute/Chart.yaml); do
    v=$(git show "$c:charts/stackroute/Chart.yaml" 2>/dev/null | sed -n 's/^version: *//p')
    if [ -n "$v" ] && [ "$v" != "$current" ]; then echo "$c"; return; fi
  done
  first=$(git log --format=%H --diff-filter=A -- charts/stackroute/Chart.yaml | tail -1)
  if [ -n "$first" ] && ! git diff --quiet "$first" -- charts; then echo "$first"; fi
}

prev=$(previous_ref || true)
if [ -n "$prev" ]; then
  step "install the previous chart ($(git log -1 --format='%h %s' "$prev" | cut -c1-70))"
  rm -rf "$WORK/previous" && mkdir -p "$WORK/previous"
  git archive "$prev" charts | tar -x -C "$WORK/previous"
  install_chart "$WORK/previous/charts" "previous chart $(sed -n 's/^version: *//p' "$WORK/previous/charts/stackroute/Chart.yaml") @ ${prev:0:10}"
  # A StackRoute written under the previous release must survive the upgrade (CRDs upgraded in
  # place, never deleted) and stay Accepted.
  k create namespace stackroute-e2e-upgrade --dry-run=client -o yaml | k apply -f - >/dev/null
  sed 's/namespace: stackroute-e2e$/namespace: stackroute-e2e-upgrade/' "$HERE/manifests/policy.yaml" | k apply -f - >/dev/null
  k -n stackroute-e2e-upgrade wait --for=condition=Accepted sr/client-to-server-reno --timeout=60s >/dev/null \
    || fail "previous chart: StackRoute not Accepted"
  pass "previous chart: a StackRoute is Accepted"
else
  echo "SKIP: upgrade test: git history has no earlier chart to upgrade from (set STACKROUTE_E2E_PREVIOUS_REF)"
fi

step "install the working tree's charts"
install_chart "$ROOT/charts" "chart $(sed -n 's/^version: *//p' charts/stackroute/Chart.yaml) (working tree)${prev:+, upgraded}"
k get crd stackroutes.stackroute.dev -o jsonpath='{.metadata.labels.helm\.sh/chart}' | grep -q stackroute-crds \
  || fail "CRDs not managed by the stackroute-crds chart"
pass "CRDs applied from the stackroute-crds chart templates"
if [ -n "$prev" ]; then
  k -n stackroute-e2e-upgrade wait --for=condition=Accepted sr/client-to-server-reno --timeout=60s >/dev/null \
    || fail "the StackRoute written before the upgrade is gone or no longer Accepted"
  pass "the StackRoute written before the upgrade survived it and is Accepted"
fi

if [ -n "$prev" ]; then run_tests "after the upgrade from ${prev:0:10}"; else run_tests "fresh install"; fi

step "done: kind e2e passed"
