#!/usr/bin/env bash
# The Kubernetes scenarios on the single-node lane (e2e/kube/cluster.sh), one per argument, in
# the order given; `cargo test -p stackroute-e2e --test kube` runs them all as ordered trials.
#
#   e2e/kube/suite.sh install injection status transport userspace kernelhook validation agent-roll agent-handover \
#     controller-failover rbac trust egress uninstall
#
# install              both charts with the real Helm engine (helm.py), controller (2 replicas,
#                      Lease, stackroute's own etcd) and agent as Pods from the lane's images
# injection            namespace label and pod annotation opt in (init container, LD_PRELOAD,
#                      socket directory); a pod labelled disabled is left alone
# status               kubectl apply a StackRoute: Accepted and Programmed in `kubectl get sr`
# transport            the injected client's connection runs Reno as the StackRoute says, the
#                      opted-out pod's the node default (`ss -tin` in each pod's network namespace)
# userspace            an injected client with a Userspace rule: its curl and iperf3 to the server
#                      run on the stack instance the agent starts in its pod (AF_XDP, the pod's
#                      cgroups), no kernel TCP socket for them; the instance stops with the pod
# kernelhook           an injected pod whose program the shim cannot reach (static busybox) is
#                      hooked by the agent: its connection runs the policy's Reno (`ss -tin`),
#                      counted; the hook goes with the pod
# validation           the examples pass the API server's validation; an object breaking a CEL
#                      rule is rejected (CEL servers) or reported Accepted=False (Kubernetes < 1.25)
# agent-roll           the agent DaemonSet rolls while a client connects in a loop: no failure
# agent-handover       surge by hand (1.20 DaemonSets cannot): a second agent pod takes the socket
#                      directory over, then the DaemonSet's replacement from it; no failure
# controller-failover  the Lease holder is killed; the other replica takes the Lease and writes status
# rbac                 the controller runs as the chart's ServiceAccount, which is not an admin
# trust                the controller's gRPC (TLS) admits the agents' audience-bound token and
#                      refuses no credentials, another service account, another audience
# egress               the lane sent nothing outside its own addresses
# uninstall            both releases uninstall cleanly (the cluster is left as it was found)
#
# Needs KUBECONFIG (or STACKROUTE_TEST_KUBECONFIG) of the lane and root (nsenter, ctr).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/e2e/kube
LANE=${STACKROUTE_LANE_DIR:-/var/tmp/stackroute-lane}
export KUBECONFIG=${KUBECONFIG:-${STACKROUTE_TEST_KUBECONFIG:?set KUBECONFIG or STACKROUTE_TEST_KUBECONFIG (eval "$(e2e/kube/cluster.sh env)")}}
export PATH=$LANE/bin:$PATH
NS=stackroute-system
APPS=sr-lane-apps
REGISTRY=localhost/stackroute
TAG=lane
NODE_IP=10.200.0.1
STORE=http://$NODE_IP:23792
# No cluster DNS on the lane: the controller Service gets a fixed ClusterIP that agents dial.
CONTROLLER_IP=10.96.0.20

k() { kubectl "$@"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
pass() { echo "  ok    $*"; }
step() { printf '=== %s (%ss)\n' "$*" "$SECONDS"; }
retry() { # seconds cmd...: until cmd succeeds
  local end=$(( $(date +%s) + $1 ))
  shift
  until "$@"; do [ "$(date +%s)" -lt "$end" ] || return 1; sleep 1; done
}

# Python with helm-python-sdk: the charts' virtualenv (scripts/check-charts.sh makes it).
helm_py() {
  local venv=${STACKROUTE_CHART_VENV:-$ROOT/target/chart-venv}
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import helm_python' 2>/dev/null; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check -r "$ROOT/scripts/chart-requirements.txt" \
      || fail "cannot create the Helm virtualenv $venv"
  fi
  "$venv/bin/python" "$HERE/helm.py" "$@"
}

diagnostics() {
  echo "--- diagnostics"
  k get pods -A -o wide || true
  k -n "$NS" logs -l app.kubernetes.io/component=controller --tail=60 --all-containers --prefix || true
  k -n "$NS" logs -l app.kubernetes.io/component=agent --tail=40 --all-containers --prefix || true
  k get sr -A -o wide || true
}
on_exit() {
  local rc=$?
  [ "$rc" = 0 ] || diagnostics
  exit "$rc"
}
trap on_exit EXIT

# PID of a pod's container on this node (containerd task of its container ID).
pid_of() { # namespace pod [container index]
  local id
  id=$(k -n "$1" get pod "$2" -o jsonpath="{.status.containerStatuses[${3:-0}].containerID}")
  id=${id#containerd://}
  [ -n "$id" ] || fail "pod $1/$2 has no running container"
  ctr -a "$LANE/run/containerd.sock" -n k8s.io tasks ls | awk -v id="$id" '$1 == id {print $2}'
}
# `ss -tin` of a pod's connections to a destination, inside the pod's network namespace.
ss_of() { # namespace pod destination-ip port
  nsenter -t "$(pid_of "$1" "$2")" -n ss -tin state established "( dst $3 and dport = :$4 )"
}
server_ip() { k -n "$APPS" get pod server -o jsonpath='{.status.podIP}'; }

# ------------------------------------------------------------------------ scenarios
install() {
  step "install: stackroute-crds and stackroute charts (real Helm engine)"
  # A clean start for the workloads of an earlier run on the same lane.
  k delete namespace "$APPS" sr-lane-annotated --ignore-not-found --wait=true --timeout=120s >/dev/null
  helm_py install stackroute-crds "$ROOT/charts/stackroute-crds" default
  k wait --for=condition=Established crd/stackroutes.stackroute.dev crd/clusterstackroutes.stackroute.dev --timeout=60s >/dev/null
  helm_py install stackroute "$ROOT/charts/stackroute" "$NS" \
    --set-json "image.registry=\"$REGISTRY\"" --set-json "image.tag=\"$TAG\"" \
    --set-json 'image.pullPolicy="Never"' \
    --set-json 'controller.replicas=2' --set-json "etcd.endpoints=[\"$STORE\"]" \
    --set-json 'controller.antiAffinity="none"' --set-json "controller.serviceClusterIP=\"$CONTROLLER_IP\"" \
    --set-json "agent.socketDir=\"$LANE/node/run-stackroute\"" \
    --set-json "agent.stateDir=\"$LANE/node/lib-stackroute\""
  k -n "$NS" rollout status deploy/stackroute-controller --timeout=180s
  k -n "$NS" rollout status ds/stackroute-agent --timeout=180s
  pass "controller (2 replicas) and agent rolled out: $(k -n "$NS" get pods --no-headers | awk '{print $1 "=" $3}' | tr '\n' ' ')"
  # The webhook must be serving before any opted-in pod is created.
  retry 60 sh -c "kubectl get mutatingwebhookconfiguration stackroute-injector -o jsonpath='{.webhooks[0].clientConfig.caBundle}' | grep -q ." \
    || fail "the controller did not set caBundle on the MutatingWebhookConfiguration"
  pass "injector caBundle set by the controller"
}

injection() {
  step "injection: namespace label, pod annotation, opt-out"
  k apply -f "$HERE/manifests/apps.yaml" >/dev/null
  k -n "$APPS" wait --for=condition=Ready pod/server pod/client pod/control --timeout=120s >/dev/null
  k -n sr-lane-annotated wait --for=condition=Ready pod/annotated --timeout=120s >/dev/null
  local ns pod preload init mounts
  for ns_pod in "$APPS/client" "$APPS/server" "sr-lane-annotated/annotated"; do
    ns=${ns_pod%/*} pod=${ns_pod#*/}
    preload=$(k -n "$ns" get pod "$pod" -o jsonpath='{.spec.containers[0].env[?(@.name=="LD_PRELOAD")].value}')
    init=$(k -n "$ns" get pod "$pod" -o jsonpath='{.spec.initContainers[*].image}')
    mounts=$(k -n "$ns" get pod "$pod" -o jsonpath='{.spec.volumes[*].hostPath.path}')
    [ -n "$preload" ] || fail "$ns_pod not injected (no LD_PRELOAD)"
    [ "$init" = "$REGISTRY/stackroute-shim:$TAG" ] || fail "$ns_pod init container image '$init'"
    echo "$mounts" | grep -qw "$LANE/node/run-stackroute" || fail "$ns_pod does not mount the agent socket directory ($mounts)"
    k -n "$ns" exec "$pod" -- sh -c 'test -s "$LD_PRELOAD"' || fail "$ns_pod: the shim library is not in place"
    pass "$ns_pod injected: LD_PRELOAD=$preload, init $init, socket dir mounted"
  done
  [ -z "$(k -n "$APPS" get pod control -o jsonpath='{.metadata.annotations.stackroute\.dev/injected}{.spec.containers[0].env[?(@.name=="LD_PRELOAD")].value}{.spec.initContainers}')" ] \
    || fail "the control pod (label stackroute.dev/inject=disabled) was injected"
  pass "$APPS/control (label disabled) not injected"
}

status() {
  step "status: a StackRoute becomes Accepted and Programmed"
  k apply -f "$HERE/manifests/policy.yaml" >/dev/null
  k -n "$APPS" wait --for=condition=Accepted sr/client-to-server-reno --timeout=60s >/dev/null || fail "StackRoute not Accepted"
  k -n "$APPS" wait --for=condition=Programmed sr/client-to-server-reno --timeout=120s >/dev/null || fail "StackRoute not Programmed"
  k -n "$APPS" get sr
  pass "Accepted and Programmed"
}

transport() {
  step "transport: the policy's congestion control on the wire"
  local ip out cc
  ip=$(server_ip)
  # Decisions are pinned at connect: connect only after Programmed (status ran before).
  k -n "$APPS" exec client -- iperf3 -c "$ip" -p 5201 -t 8 -b 20M >/dev/null &
  local client_pid=$!
  retry 6 sh -c "nsenter -t $(pid_of "$APPS" client) -n ss -tin state established '( dst $ip and dport = :5201 )' | grep -q ." \
    || fail "no connection from the client to $ip:5201"
  out=$(ss_of "$APPS" client "$ip" 5201)
  echo "$out" | sed 's/^/        /'
  echo "$out" | grep -qw reno || fail "the injected client's connection to $ip:5201 does not run reno"
  pass "injected client → server:5201 runs reno (ss -tin in the client's network namespace)"
  wait "$client_pid" || fail "iperf3 in the client failed"
  # iperf3 serves one test at a time: the control pod's run follows the client's.
  k -n "$APPS" exec control -- iperf3 -c "$ip" -p 5201 -t 4 -b 5M >/dev/null &
  client_pid=$!
  retry 6 sh -c "nsenter -t $(pid_of "$APPS" control) -n ss -tin state established '( dst $ip and dport = :5201 )' | grep -q ." \
    || fail "no connection from the control pod to $ip:5201"
  out=$(ss_of "$APPS" control "$ip" 5201)
  echo "$out" | sed 's/^/        /'
  echo "$out" | grep -qw reno && fail "the opted-out pod also runs reno: the check cannot tell them apart"
  cc=$(echo "$out" | grep -ow 'cubic\|bbr' | head -1)
  [ -n "$cc" ] || fail "cannot read the control pod's congestion control"
  pass "opted-out control pod keeps the node default ($cc)"
  wait "$client_pid" || fail "iperf3 in the control pod failed"
}

userspace() {
  step "userspace: an injected client's connections run on the user-space stack in its pod"
  local ip state pid netns instance out kernel
  ip=$(server_ip)
  state=$LANE/node/lib-stackroute/instances.json
  k apply -f "$HERE/manifests/userspace.yaml" >/dev/null
  k -n "$APPS" wait --for=condition=Ready pod/usclient --timeout=120s >/dev/null || fail "usclient not Ready"
  k -n "$APPS" wait --for=condition=Programmed sr/usclient-to-server-userspace --timeout=120s >/dev/null \
    || fail "StackRoute usclient-to-server-userspace not Programmed"
  pid=$(pid_of "$APPS" usclient)
  netns=$(readlink "/proc/$pid/ns/net")
  # Decisions are pinned at connect: the first connection starts the pod's instance.
  out=$(k -n "$APPS" exec usclient -- curl -sS --max-time 20 "http://$ip:8080/") || fail "curl from usclient failed: $out"
  [ "$out" = stackroute-lane ] || fail "curl from usclient got '$out'"
  instance=$(python3 - "$state" "$netns" <<'PY'
import json, os, sys
for record in json.load(open(sys.argv[1])):
    try:
        if os.readlink(f"/proc/{record['pid']}/ns/net") == sys.argv[2]:
            print(record["pid"], record.get("engine", "unknown"))
    except OSError:
        pass
PY
) || fail "cannot read $state"
  [ -n "$instance" ] || fail "no user-space stack instance runs in usclient's network namespace ($state: $(cat "$state" 2>/dev/null))"
  set -- $instance
  pass "curl from usclient got the server's page; instance pid $1 in the pod's network namespace, engine $2"
  [ "$2" = af_xdp ] || fail "the instance's packet engine is $2, not af_xdp"
  grep -q "kubepods" "/proc/$1/cgroup" || fail "the instance is not in the pod's cgroups: $(cat "/proc/$1/cgroup")"
  [ "$(grep ':memory:' "/proc/$1/cgroup")" = "$(grep ':memory:' "/proc/$pid/cgroup")" ] \
    || fail "the instance's memory cgroup is not the pod's"
  pass "the instance runs in the pod's cgroups (memory: $(grep ':memory:' "/proc/$1/cgroup" | cut -d: -f3))"
  cli
  k -n "$APPS" exec usclient -- iperf3 -c "$ip" -p 5201 -t 4 -b 20M >/dev/null &
  local client_pid=$! listed=""
  while kill -0 "$client_pid" 2>/dev/null; do
    kernel=$(nsenter -t "$pid" -n ss -tn "( dst $ip and dport = :5201 )" | tail -n +2)
    [ -z "$kernel" ] || fail "usclient's kernel holds a TCP socket to $ip:5201: $kernel"
    if [ -z "$listed" ]; then
      listed=$("$CLI" connections --socket-dir "$LANE/node/run-stackroute" --output json 2>/dev/null \
        | python3 -c 'import json, sys; print(*[c["workload"] for c in json.load(sys.stdin) if c.get("remote") == sys.argv[1]][:1])' "$ip:5201" || true)
    fi
    sleep 0.1
  done
  wait "$client_pid" || fail "iperf3 in usclient failed"
  [ -n "$listed" ] || fail "stackroute connections never listed usclient's connection to $ip:5201"
  pass "iperf3 from usclient ran through the instance (stackroute connections: $listed → $ip:5201); usclient's kernel held no TCP socket to the server"
  # The agent stops the instance once the pod's container has exited (it is alone in that
  # cgroup), so the pod's teardown does not wait for kubelet to kill it.
  local deleting=$SECONDS
  k -n "$APPS" delete pod usclient --wait=true --timeout=120s >/dev/null || fail "pod usclient still there 120 s after its deletion"
  retry 90 sh -c "! kill -0 $1 2>/dev/null" || fail "the instance (pid $1) still runs after its pod was deleted"
  pass "the instance stopped once its pod was gone (pod deleted in $((SECONDS - deleting)) s)"
}

kernelhook() {
  step "kernelhook: a program the shim cannot reach gets the policy from the agent's kernel hook"
  local ip pid out cc listed
  ip=$(server_ip)
  cli
  # hooked's only process is busybox (static): injected (LD_PRELOAD) yet never reached by the
  # shim, so the agent hooks its pod cgroup by itself (--kernel-hook-pods unreachable).
  k apply -f "$HERE/manifests/kernelhook.yaml" >/dev/null
  k -n "$APPS" wait --for=condition=Ready pod/hooked --timeout=120s >/dev/null || fail "pod hooked not Ready"
  pid=$(pid_of "$APPS" hooked)
  listed=""
  for _ in $(seq 1 60); do
    listed=$("$CLI" connections --socket-dir "$LANE/node/run-stackroute" --output json 2>/dev/null \
      | python3 -c 'import json, sys; print(*[l["cgroup"] for l in json.load(sys.stdin) if l.get("path") == "kernel-hook" and l.get("workload") == sys.argv[1]][:1])' "$APPS/hooked" || true)
    [ -n "$listed" ] && break
    sleep 0.5
  done
  [ -n "$listed" ] || fail "the agent attached no kernel hook for $APPS/hooked"
  grep -q "$(echo "$listed" | sed 's/.*pod//')" "/proc/$pid/cgroup" || fail "the hook's cgroup $listed is not the pod's: $(cat "/proc/$pid/cgroup")"
  pass "the agent hooked pod hooked by itself (cgroup $listed)"
  # busybox nc (static) holds a connection to the server's httpd (which waits for a request)
  # for a few seconds.
  k -n "$APPS" exec hooked -- sh -c "sleep 5 | timeout 6 nc $ip 8080" >/dev/null 2>&1 &
  local client_pid=$!
  retry 6 sh -c "nsenter -t $pid -n ss -tinH state established '( dst $ip and dport = :8080 )' | grep -q ." \
    || fail "no connection from hooked to $ip:8080"
  out=$(nsenter -t "$pid" -n ss -tin state established "( dst $ip and dport = :8080 )")
  echo "$out" | sed 's/^/        /'
  echo "$out" | grep -qw reno || fail "the static client's connection to $ip:8080 does not run reno (the node default is bbr)"
  pass "busybox nc (static, no shim) → server:8080 runs reno, as the policy says (ss -tin in the pod's network namespace)"
  wait "$client_pid" || true
  cc=$("$CLI" connections --socket-dir "$LANE/node/run-stackroute" --output json \
    | python3 -c 'import json, sys; print(*[l["applied"] for l in json.load(sys.stdin) if l.get("path") == "kernel-hook" and l.get("workload") == sys.argv[1]][:1])' "$APPS/hooked")
  [ "${cc:-0}" -ge 1 ] || fail "the hook counted no applied connection ($cc)"
  pass "the hook counted $cc connection(s) given the policy's congestion control"
  k -n "$APPS" delete pod hooked --wait=true --timeout=60s >/dev/null
  retry 30 sh -c "! '$CLI' connections --socket-dir '$LANE/node/run-stackroute' --output json | grep -q '\"$APPS/hooked\"'" \
    || fail "the kernel hook of the deleted pod is still attached"
  pass "the hook went with its pod"
}

validation() {
  step "validation: the API server and the controller agree"
  local f ns minor out
  for ns in $(sed -n 's/.*namespace: *\([a-z0-9-]*\).*/\1/p' "$ROOT"/examples/policies/*.yaml | sort -u); do
    k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
  done
  for f in "$ROOT"/examples/policies/*.yaml; do
    out=$(k apply --dry-run=server -f "$f" 2>&1) || fail "the API server rejects $f: $out"
  done
  pass "examples/policies/*.yaml accepted by the API server (dry run)"
  out=$(k apply --dry-run=server --validate=true -f "$ROOT/examples/invalid/unknown-field.yaml" 2>&1) \
    && fail "the API server accepts examples/invalid/unknown-field.yaml"
  echo "$out" | grep -qi 'unknown field' || fail "unknown-field.yaml rejected for another reason: $out"
  pass "an unknown field is rejected"

  # A broken CEL rule (endPort below port).
  minor=$(k version -o json | python3 -c 'import json,sys; print(int("".join(c for c in json.load(sys.stdin)["serverVersion"]["minor"] if c.isdigit())))')
  local bad
  bad=$(sed 's/namespace: ml/namespace: sr-lane-apps/; s/name: nccl-ports/name: backwards-ports/' "$ROOT/examples/invalid/endport-below-port.yaml")
  if out=$(echo "$bad" | k apply -f - 2>&1); then
    [ "$minor" -lt 25 ] || fail "a 1.$minor API server accepted a StackRoute that breaks a CEL rule"
    retry 60 sh -c "kubectl -n $APPS get sr backwards-ports -o jsonpath='{.status.conditions[?(@.type==\"Accepted\")].status}' | grep -qx False" \
      || fail "the controller did not report Accepted=False for a StackRoute breaking a CEL rule"
    out=$(k -n "$APPS" get sr backwards-ports -o jsonpath='{.status.conditions[?(@.type=="Accepted")].message}')
    echo "$out" | grep -q 'endPort requires port and must be greater than or equal to it' \
      || fail "Accepted=False without the rule's message: $out"
    k -n "$APPS" delete sr backwards-ports >/dev/null
    pass "Kubernetes 1.$minor evaluates no CEL: the controller reports Accepted=False: $out"
  else
    echo "$out" | grep -q 'endPort requires port and must be greater than or equal to it' \
      || fail "rejected for another reason: $out"
    pass "the API server rejects the broken CEL rule: $out"
  fi
}

# Back-to-back HTTP connections from the injected client to the server for SECONDS, in the
# background; `loop_result` waits and checks that none failed.
LOOP_PID="" LOOP_LOG=""
connection_loop() { # seconds
  LOOP_LOG=/tmp/stackroute-lane-loop.$$
  k -n "$APPS" exec client -- sh -c "ok=0; failed=0; end=\$((\$(date +%s) + $1)); \
    while [ \$(date +%s) -lt \$end ]; do \
      if curl -s -m 3 -o /dev/null http://$(server_ip):8080/; then ok=\$((ok+1)); else failed=\$((failed+1)); fi; \
    done; echo \"\$ok \$failed\"" > "$LOOP_LOG" &
  LOOP_PID=$!
}
loop_result() { # what happened meanwhile
  local ok failed
  wait "$LOOP_PID" || fail "the connection loop in the client failed"
  read -r ok failed < "$LOOP_LOG"
  rm -f "$LOOP_LOG"
  echo "        $ok connections, $failed failed; $1"
  [ "${ok:-0}" -gt 50 ] || fail "too few connections to tell ($ok)"
  [ "$failed" = 0 ] || fail "$failed of $((ok + failed)) connections failed: $1"
  pass "$ok connections, none failed: $1"
}

# Connections in a loop from the injected client while the agent DaemonSet rolls.
agent_roll() {
  step "agent-roll: the agent DaemonSet rolls under load"
  local ip before after
  ip=$(server_ip)
  before=$(k -n "$NS" get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[*].metadata.name}')
  connection_loop 40
  sleep 3
  k -n "$NS" rollout restart ds/stackroute-agent >/dev/null
  k -n "$NS" rollout status ds/stackroute-agent --timeout=120s >/dev/null || fail "the agent DaemonSet did not roll"
  after=$(k -n "$NS" get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[*].metadata.name}')
  [ "$before" != "$after" ] || fail "the agent pod was not replaced ($before)"
  loop_result "the agent rolled ($before → $after)"
  # The new agent serves the policy: a new connection still runs Reno.
  k -n "$APPS" exec client -- iperf3 -c "$ip" -p 5201 -t 4 -b 5M >/dev/null &
  local client_pid=$!
  retry 6 sh -c "nsenter -t $(pid_of "$APPS" client) -n ss -tin state established '( dst $ip and dport = :5201 )' | grep -qw reno" \
    || fail "after the roll the client's new connection does not run reno"
  wait "$client_pid" || true
  pass "after the roll a new connection still runs reno"
}

# What a DaemonSet with maxSurge does (Kubernetes >= 1.22; this lane's 1.20 cannot surge), done
# by hand with the DaemonSet's own pod template: a second agent pod starts on the node, takes the
# socket directory over from the running one (hand-over), the old one turns unready and is
# deleted, the DaemonSet's replacement takes over from the surge pod, which then goes. A client
# connects in a loop all along.
agent_handover() {
  step "agent-handover: surge pods hand the socket directory over under load"
  local old new
  old=$(k -n "$NS" get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}')
  connection_loop 45
  sleep 2
  # The surge pod: the DaemonSet's template, under a label its selector does not match.
  k -n "$NS" get ds stackroute-agent -o json | python3 -c '
import json, sys
ds = json.load(sys.stdin)
t = ds["spec"]["template"]
labels = dict(t["metadata"].get("labels", {}), **{"app.kubernetes.io/component": "agent-surge"})
pod = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "stackroute-agent-surge", "namespace": ds["metadata"]["namespace"], "labels": labels},
       "spec": dict(t["spec"], nodeName=sys.argv[1])}
json.dump(pod, sys.stdout)' "$(k get nodes -o jsonpath='{.items[0].metadata.name}')" | k apply -f - >/dev/null
  k -n "$NS" wait --for=condition=Ready pod/stackroute-agent-surge --timeout=60s >/dev/null \
    || fail "the surge agent did not become ready (it serves only after a hand-over)"
  retry 20 sh -c "[ \"\$(kubectl -n $NS get pod $old -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}')\" = False ]" \
    || fail "the old agent $old still reports ready after handing over"
  k -n "$NS" logs "$old" | grep "handed the socket directory over" >/dev/null \
    || fail "the old agent's log does not show the hand-over"
  pass "surge pod took the socket directory over from $old, which turned unready"
  k -n "$NS" delete pod "$old" --wait=true >/dev/null
  retry 60 sh -c "kubectl -n $NS get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[*].status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True" \
    || fail "the DaemonSet's new agent did not become ready"
  new=$(k -n "$NS" get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}')
  k -n "$NS" logs stackroute-agent-surge | grep "handed the socket directory over" >/dev/null \
    || fail "the surge agent did not hand over to the DaemonSet's new pod $new"
  k -n "$NS" delete pod stackroute-agent-surge --wait=true >/dev/null
  pass "the DaemonSet's new pod $new took over from the surge pod"
  loop_result "two hand-overs ($old → surge → $new)"
}

controller_failover() {
  step "controller-failover: kill the Lease holder"
  local lease holder pods new gen
  lease=$(k -n "$NS" get lease -o name | grep controller-status | head -1)
  [ -n "$lease" ] || fail "no controller status Lease in $NS"
  holder=$(k -n "$NS" get "$lease" -o jsonpath='{.spec.holderIdentity}')
  pods=$(k -n "$NS" get pods -l app.kubernetes.io/component=controller -o jsonpath='{.items[*].metadata.name}')
  echo "        $lease held by '$holder'; replicas: $pods"
  echo "$pods" | grep -qw "$holder" || fail "the Lease holder '$holder' is not a controller pod"
  k -n "$NS" delete pod "$holder" --grace-period=0 --force >/dev/null 2>&1
  retry 90 sh -c "h=\$(kubectl -n $NS get $lease -o jsonpath='{.spec.holderIdentity}'); [ -n \"\$h\" ] && [ \"\$h\" != '$holder' ]" \
    || fail "no other replica took the Lease after $holder was killed"
  new=$(k -n "$NS" get "$lease" -o jsonpath='{.spec.holderIdentity}')
  pass "$new holds the Lease after $holder was killed"
  # The new holder writes status: change the policy and wait for its generation.
  k -n "$APPS" patch sr client-to-server-reno --type=json \
    -p '[{"op":"add","path":"/spec/rules/0/ports/-","value":{"port":8081}}]' >/dev/null
  gen=$(k -n "$APPS" get sr client-to-server-reno -o jsonpath='{.metadata.generation}')
  retry 60 sh -c "kubectl -n $APPS get sr client-to-server-reno -o jsonpath='{.status.conditions[?(@.type==\"Accepted\")].observedGeneration}' | grep -qx $gen" \
    || fail "status was not written for generation $gen after the failover"
  k -n "$APPS" wait --for=condition=Programmed sr/client-to-server-reno --timeout=60s >/dev/null || fail "not Programmed after the failover"
  pass "generation $gen Accepted and Programmed, written by the new holder"
  k -n "$NS" rollout status deploy/stackroute-controller --timeout=120s >/dev/null
}

rbac() {
  step "rbac: the controller is not an admin"
  local sa as
  sa=$(k -n "$NS" get deploy stackroute-controller -o jsonpath='{.spec.template.spec.serviceAccountName}')
  [ -n "$sa" ] && [ "$sa" != default ] || fail "the controller runs as '$sa'"
  as=system:serviceaccount:$NS:$sa
  [ "$(k auth can-i '*' '*' --all-namespaces --as="$as" 2>/dev/null || true)" = no ] || fail "$as is a cluster admin"
  [ "$(k auth can-i create pods --all-namespaces --as="$as" 2>/dev/null || true)" = no ] || fail "$as may create pods"
  [ "$(k auth can-i patch stackroutes.stackroute.dev --subresource=status --all-namespaces --as="$as" 2>/dev/null || true)" = yes ] \
    || fail "$as may not write StackRoute status (the status scenario passed, so how?)"
  pass "controller runs as $sa: not admin, cannot create pods, writes StackRoute status (every scenario above ran under it)"
}

egress() {
  step "egress: nothing left the lane's addresses"
  local n
  n=$("$HERE/cluster.sh" egress) || fail "cannot read the lane's egress counter"
  [ "$n" = 0 ] || fail "$n packets addressed outside the lane were rejected (dmesg | grep stackroute-lane-egress)"
  pass "0 packets to addresses outside loopback, $NODE_IP, the pod and the Service ranges"
  "$HERE/cluster.sh" egress-self-test || fail "the egress counter's self-test failed"
  pass "the counter works: a lane process's packet to an address outside the set was counted"
}

# A token from the TokenRequest API (kubectl create token is 1.24+): namespace, service
# account, the pod it is bound to, audience.
token_for() {
  local uid
  uid=$(k -n "$1" get pod "$3" -o jsonpath='{.metadata.uid}')
  printf '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":["%s"],"expirationSeconds":600,"boundObjectRef":{"kind":"Pod","apiVersion":"v1","name":"%s","uid":"%s"}}}' \
      "$4" "$3" "$uid" \
    | k create --raw "/api/v1/namespaces/$1/serviceaccounts/$2/token" -f - \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"]["token"])'
}

# `stackroute status` from the node against the controller Service, with the credentials in $1.
status_with() {
  "$CLI" status --controller "$CONTROLLER_IP:7420" --credentials "$1" \
    --controller-server-name "stackroute-controller.$NS.svc" 2>&1
}

# The stackroute CLI ($STACKROUTE_CLI, else built here) in $CLI.
cli() {
  CLI=${STACKROUTE_CLI:-}
  if [ -z "$CLI" ]; then
    (cd "$ROOT" && cargo build -q --locked -p stackroute-cli) || fail "cannot build the stackroute CLI"
    CLI=$ROOT/target/debug/stackroute
  fi
}

trust() {
  step "trust: the controller's gRPC takes an agent's audience-bound token and nothing less"
  cli
  local creds agent out
  creds=$(mktemp -d)
  # shellcheck disable=SC2064 # expand now: the directory is this function's
  trap "rm -rf '$creds'" RETURN
  k -n "$NS" get configmap stackroute-ca -o jsonpath='{.data.ca\.crt}' > "$creds/ca.crt"
  grep -q "BEGIN CERTIFICATE" "$creds/ca.crt" || fail "the controller did not publish its CA in ConfigMap stackroute-ca"
  out=$(status_with "$creds") && fail "no credentials: status answered: $out"
  echo "$out" | grep -q "no client certificate and no bearer token" || fail "no credentials: unclear refusal: $out"
  pass "no credentials: refused ($(echo "$out" | tail -1 | cut -c1-110))"
  token_for "$APPS" default client stackroute.dev/agent > "$creds/token"
  out=$(status_with "$creds") && fail "another service account's token: status answered: $out"
  echo "$out" | grep -q "is not the agents' service account" || fail "another service account: unclear refusal: $out"
  pass "a token of $APPS/default (audience stackroute.dev/agent) refused: not the agents' service account"
  agent=$(k -n "$NS" get pods -l app.kubernetes.io/component=agent -o jsonpath='{.items[0].metadata.name}')
  token_for "$NS" stackroute-agent "$agent" https://kubernetes.default.svc > "$creds/token"
  out=$(status_with "$creds") && fail "the API server's audience: status answered: $out"
  echo "$out" | grep -q "not valid for audience stackroute.dev/agent" || fail "another audience: unclear refusal: $out"
  pass "the agent's token for the API server's audience refused"
  token_for "$NS" stackroute-agent "$agent" stackroute.dev/agent > "$creds/token"
  out=$(status_with "$creds") || fail "the agent's own token was refused: $out"
  echo "$out" | grep -q "$(k get nodes -o jsonpath='{.items[0].metadata.name}')" || fail "status without the node: $out"
  pass "the agent's token for stackroute.dev/agent accepted (node identity; status lists the node)"
  # Each replica counts what it refused; the Service sent the calls to either.
  out=$(for ip in $(k -n "$NS" get pods -l app.kubernetes.io/component=controller -o jsonpath='{.items[*].status.podIP}'); do
    curl -s -m 5 "http://$ip:7421/metrics"; done)
  echo "$out" | grep -q 'stackroute_controller_denied_requests_total{method="GetStatus",reason="unauthenticated"}' \
    || fail "the refusals are not counted in the controllers' metrics"
  pass "refusals counted in stackroute_controller_denied_requests_total"
}

uninstall() {
  step "uninstall: both releases go, the cluster is as before"
  k delete namespace "$APPS" sr-lane-annotated --ignore-not-found --wait=true --timeout=120s >/dev/null
  helm_py uninstall stackroute "$NS"
  helm_py uninstall stackroute-crds default
  retry 60 sh -c "[ -z \"\$(kubectl -n $NS get pods -o name)\" ]" || fail "stackroute pods still running after uninstall"
  k get mutatingwebhookconfiguration stackroute-injector >/dev/null 2>&1 && fail "the injector's webhook configuration is still there"
  k get crd stackroutes.stackroute.dev clusterstackroutes.stackroute.dev >/dev/null \
    || fail "uninstalling stackroute-crds removed the CRDs (resource-policy: keep must leave them and every policy)"
  k delete crd stackroutes.stackroute.dev clusterstackroutes.stackroute.dev --wait=true >/dev/null
  pass "no stackroute pod or webhook configuration left; the CRDs stayed (resource-policy: keep) until deleted by hand"
}

[ $# -gt 0 ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
for scenario in "$@"; do
  case "$scenario" in
    install | injection | status | transport | userspace | kernelhook | validation | rbac | trust | egress | uninstall) "$scenario" ;;
    agent-roll) agent_roll ;;
    agent-handover) agent_handover ;;
    controller-failover) controller_failover ;;
    *) fail "unknown scenario '$scenario'" ;;
  esac
done
