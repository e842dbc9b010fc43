#!/usr/bin/env bash
# A real single-node Kubernetes 1.20 cluster on this machine, built from Debian packages: the
# lane the Kubernetes tests run on (README "Kubernetes on one machine").
#
#   e2e/kube/cluster.sh up        # build what is missing, start everything, wait for a Ready node
#   e2e/kube/cluster.sh env       # prints: export STACKROUTE_TEST_KUBECONFIG=… KUBECONFIG=… PATH=…
#   e2e/kube/cluster.sh images    # rebuild and re-import the stackroute images (after a code change)
#   e2e/kube/cluster.sh status    # what runs, the node, the egress counter
#   e2e/kube/cluster.sh egress    # packets the lane tried to send outside its own addresses (0 expected)
#   e2e/kube/cluster.sh egress-self-test   # shows the counter sees the lane's processes
#   e2e/kube/cluster.sh down      # stop everything, remove what up made, restore host settings
#
# Runs as root. Everything lives under $STACKROUTE_LANE_DIR (default /var/tmp/stackroute-lane);
# the Kubernetes binaries are built once into $STACKROUTE_KUBE_CACHE (build-kubernetes.sh).
# Addresses, all created here: node 10.200.0.1 on bridge sr-lane0 (this kernel has no dummy
# driver), pods 10.244.0.0/24 on bridge sr-lanecni0, Services 10.96.0.0/16. Pods get no default
# route and there is no DNS; processes of the lane run in the cgroup stackroute-lane, and any
# packet they or the pods address elsewhere is counted and rejected (`egress`).
#
# Environment:
#   STACKROUTE_LANE_DIR        state directory (/var/tmp/stackroute-lane)
#   STACKROUTE_KUBE_CACHE      Kubernetes build cache (/var/cache/stackroute-kube)
#   STACKROUTE_LANE_PROFILE    cargo profile of the stackroute images: release (default) or dev
#   STACKROUTE_LANE_SKIP_CARGO=1  use the binaries already in target/ as they are
set -Eeuo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/e2e/kube
LANE=${STACKROUTE_LANE_DIR:-/var/tmp/stackroute-lane}
PROFILE=${STACKROUTE_LANE_PROFILE:-release}
NODE=stackroute-lane
NODE_IP=10.200.0.1
PROBE_IP=10.200.0.2            # ours too, never allowed: the egress counter's self-test target
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
API_PORT=16443
# stackroute's own store for the controller replicas (never the cluster's etcd)
STORE_PORT=23792
NODE_BRIDGE=sr-lane0
CNI_BRIDGE=sr-lanecni0
CGROUP=/sys/fs/cgroup/unified/stackroute-lane
EGRESS_CHAIN=STACKROUTE-LANE-EGRESS
REGISTRY=localhost/stackroute
TAG=lane
# Host sysctls that kubelet, the bridge plugin and kube-proxy change; down restores them.
SYSCTLS=(vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes net.ipv4.ip_forward
  net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables
  net.bridge.bridge-nf-call-ip6tables)
# Paths outside $LANE that these Kubernetes and containerd versions hard-code.
HARDCODED=(/var/lib/kubelet /var/lib/cni /run/containerd)
DAEMONS=(kube-proxy kubelet kube-scheduler kube-controller-manager kube-apiserver store-etcd etcd containerd)

t0=$(date +%s.%N)
ts() { printf '[%6.1fs] %s\n' "$(echo "$(date +%s.%N) - $t0" | bc)" "$*"; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }
# No silent exit under set -e: say which command failed.
trap 'echo "cluster.sh: error: line $LINENO: $BASH_COMMAND failed" >&2' ERR
kc() { "$LANE/bin/kubectl" --kubeconfig "$LANE/etc/admin.kubeconfig" "$@"; }
running() { local f=$LANE/run/$1.pid; [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; }

need_root() { [ "$(id -u)" = 0 ] || die "run as root (the lane starts kubelet, containerd and iptables rules)"; }

# ------------------------------------------------------------------------ prerequisites
PACKAGES=(etcd-server containerd runc containernetworking-plugins busybox-static conntrack iptables
  iproute2 openssl curl bc gcc libc6-dev python3 util-linux)
prerequisites() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing packages: ${missing[*]}"
    echo "cluster.sh: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed (run apt-get update first?)"
  fi
  local f
  for f in /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/portmap /bin/busybox; do
    [ -x "$f" ] || die "$f is missing (containernetworking-plugins / busybox-static)"
  done
  [ -d /sys/fs/cgroup/unified ] || die "no cgroup2 hierarchy at /sys/fs/cgroup/unified (needed to account the lane's traffic)"
  ip link add sr-lane-probe type bridge 2>/dev/null && ip link del sr-lane-probe \
    || die "cannot create a bridge interface (CONFIG_BRIDGE)"
}

# ------------------------------------------------------------------------ images
# Copies the shared libraries that ldd lists for each file (and the loader) into a root.
libraries_of() { # root file...
  local root=$1 f lib
  shift
  for f in "$@"; do
    for lib in $(ldd "$f" 2>/dev/null | grep -o '/[^ ]*' | sort -u); do
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
}

busybox_root() { # dir
  local dir=$1 applet
  mkdir -p "$dir"/{bin,etc,tmp,proc,sys,dev,root,var,run}
  cp /bin/busybox "$dir/bin/busybox"
  for applet in $("$dir/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$dir/bin/$applet"
  done
  chmod 1777 "$dir/tmp"
  printf 'root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' > "$dir/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\nnobody:x:65534:\n' > "$dir/etc/group"
}

image() { # name:tag root [mkimage args]
  local ref=$1 root=$2
  shift 2
  python3 "$HERE/mkimage.py" "$ref" "$root" "$LANE/images/$(echo "${ref##*/}" | tr ':' '_').tar" "$@" >/dev/null
}

base_images() { # pause, busybox: built once
  local kdir=$1 w=$LANE/images/work
  [ -f "$LANE/images/pause_3.4-lane.tar" ] && [ -f "$LANE/images/busybox_1.35.tar" ] && return 0
  rm -rf "$w" && mkdir -p "$w/pause"
  gcc -Os -Wall -Werror -static -DVERSION=v3.4-lane -o "$w/pause/pause" "$kdir/pause.c"
  strip "$w/pause/pause"
  image registry.k8s.io/pause:3.4-lane "$w/pause" --entrypoint '["/pause"]'
  busybox_root "$w/busybox"
  image localhost/busybox:1.35 "$w/busybox" --cmd '["sh"]'
  rm -rf "$w"
}

stackroute_binaries() {
  local dir
  case "$PROFILE" in release) dir=release ;; dev|debug) dir=debug ;; *) dir=$PROFILE ;; esac
  BIN=$ROOT/target/$dir
  if [ "${STACKROUTE_LANE_SKIP_CARGO:-0}" != 1 ]; then
    (cd "$ROOT" && cargo build -q --locked --profile "$PROFILE" \
      -p stackroute-controller -p stackroute-lrd -p stackroute-stackd -p nsocket-shim) || die "cargo build of the stackroute binaries failed"
  fi
  local f
  for f in stackroute-controller stackroute-lrd stackroute-stackd libnsocket.so; do
    [ -f "$BIN/$f" ] || die "$BIN/$f missing (cargo build --profile $PROFILE -p stackroute-controller -p stackroute-lrd -p stackroute-stackd -p nsocket-shim)"
  done
}

# The stackroute images, as images/Dockerfile builds them but from this machine's binaries:
# controller and agent (glibc + the libraries they link), the shim carrier (busybox + the
# library), and a workload image with dynamically linked iperf3 and curl for the tests.
stackroute_images() {
  local w=$LANE/images/work
  rm -rf "$w" && mkdir -p "$w"
  libraries_of "$w/controller" "$BIN/stackroute-controller"
  mkdir -p "$w/controller/usr/local/bin" "$w/controller/tmp" && chmod 1777 "$w/controller/tmp"
  cp "$BIN/stackroute-controller" "$w/controller/usr/local/bin/"
  image "$REGISTRY/stackroute-controller:$TAG" "$w/controller" \
    --entrypoint '["/usr/local/bin/stackroute-controller"]' --user 65532:65532
  # The agent starts user-space stack instances in pods: stackroute-stackd beside it, and the
  # iptables/ip6tables (with their match modules), cat and tee it runs in a pod's namespace.
  busybox_root "$w/agent"
  local xtables
  xtables=$(readlink -f "$(command -v iptables)")
  libraries_of "$w/agent" "$BIN/stackroute-lrd" "$BIN/stackroute-stackd" "$xtables"
  mkdir -p "$w/agent/usr/local/bin" "$w/agent/usr/sbin" "$w/agent/usr/lib/$(uname -m)-linux-gnu"
  cp "$BIN/stackroute-lrd" "$BIN/stackroute-stackd" "$w/agent/usr/local/bin/"
  cp "$xtables" "$w/agent/usr/sbin/"
  ln -sf "$(basename "$xtables")" "$w/agent/usr/sbin/iptables"
  ln -sf "$(basename "$xtables")" "$w/agent/usr/sbin/ip6tables"
  cp -r "/usr/lib/$(uname -m)-linux-gnu/xtables" "$w/agent/usr/lib/$(uname -m)-linux-gnu/"
  image "$REGISTRY/stackroute-lrd:$TAG" "$w/agent" --entrypoint '["/usr/local/bin/stackroute-lrd"]'
  busybox_root "$w/shim"
  mkdir -p "$w/shim/stackroute/lib"
  cp "$BIN/libnsocket.so" "$w/shim/stackroute/lib/libnsocket.so"
  echo "built-on: $(. /etc/os-release; echo "$PRETTY_NAME") (lane, profile $PROFILE)" > "$w/shim/stackroute/lib/BUILD-INFO"
  image "$REGISTRY/stackroute-shim:$TAG" "$w/shim" --cmd '["sh", "-c", "cat /stackroute/lib/BUILD-INFO"]' --user 65532:65532
  busybox_root "$w/apps"
  # The shim loads into these programs: the libraries it needs come along.
  libraries_of "$w/apps" "$(command -v iperf3)" "$(command -v curl)" "$BIN/libnsocket.so"
  mkdir -p "$w/apps/usr/bin" && cp "$(command -v iperf3)" "$(command -v curl)" "$w/apps/usr/bin/"
  image "$REGISTRY/apps:$TAG" "$w/apps" --cmd '["sh"]'
  rm -rf "$w"
}

# containerd answers on its socket; if it exited instead, say why now rather than time out.
containerd_serving() {
  if ! running containerd; then
    tail -n 30 "$LANE/logs/containerd.log" >&2
    die "containerd exited (log above: $LANE/logs/containerd.log)"
  fi
  ctr -a "$LANE/run/containerd.sock" version
}

import_images() {
  local t
  for t in "$LANE"/images/*.tar; do
    ctr -a "$LANE/run/containerd.sock" -n k8s.io images import "$t" >/dev/null \
      || { tail -n 20 "$LANE/logs/containerd.log" >&2; die "ctr images import $t failed"; }
  done
}

# ------------------------------------------------------------------------ PKI and configs
pki() {
  [ -f "$LANE/pki/ca.crt" ] && return 0
  local p=$LANE/pki
  mkdir -p "$p"
  cat > "$p/openssl.cnf" <<EOF
[req]
distinguished_name = dn
[dn]
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:$NODE_IP,IP:127.0.0.1,IP:$API_SERVICE_IP
[kubelet]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:$NODE,IP:$NODE_IP
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
EOF
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$p/ca.key" -out "$p/ca.crt" -days 3650 \
    -subj /CN=stackroute-lane-ca -config "$p/openssl.cnf" -extensions ca 2>/dev/null
  cert() { # name subject extensions
    openssl req -newkey rsa:2048 -nodes -keyout "$p/$1.key" -out "$p/$1.csr" -subj "$2" -config "$p/openssl.cnf" 2>/dev/null
    openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -out "$p/$1.crt" \
      -days 3650 -extfile "$p/openssl.cnf" -extensions "$3" 2>/dev/null
  }
  cert apiserver /CN=kube-apiserver server
  cert kubelet "/O=system:nodes/CN=system:node:$NODE" kubelet
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" client
  cert admin "/O=system:masters/CN=admin" client
  cert kcm /CN=system:kube-controller-manager client
  cert scheduler /CN=system:kube-scheduler client
  cert kubelet-client "/O=system:nodes/CN=system:node:$NODE" client
  cert kube-proxy /CN=system:kube-proxy client
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2>/dev/null
}

kubeconfigs() {
  local u
  for u in admin kcm scheduler kubelet-client kube-proxy; do
    cat > "$LANE/etc/$u.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: stackroute-lane
  cluster: {server: "https://$NODE_IP:$API_PORT", certificate-authority: $LANE/pki/ca.crt}
users:
- name: $u
  user: {client-certificate: $LANE/pki/$u.crt, client-key: $LANE/pki/$u.key}
contexts:
- name: stackroute-lane
  context: {cluster: stackroute-lane, user: $u}
current-context: stackroute-lane
EOF
  done
}

runtime_configs() {
  cat > "$LANE/etc/containerd.toml" <<EOF
version = 2
root = "$LANE/containerd/root"
state = "$LANE/containerd/state"
[grpc]
  address = "$LANE/run/containerd.sock"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.4-lane"
    disable_apparmor = true
    netns_mounts_under_state_dir = true
    # No CAP_SYS_RESOURCE on these VMs: runc cannot lower oom_score_adj (the pause container
    # asks for -998), so clamp it to containerd's own.
    restrict_oom_score_adj = true
    stream_server_address = "127.0.0.1"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$LANE/cni/net.d"
EOF
  # Pods get routes to the Services and the node only: no default route off the machine.
  cat > "$LANE/cni/net.d/10-bridge.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "stackroute-lane",
  "plugins": [
    {
      "type": "bridge", "bridge": "$CNI_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "$SERVICE_CIDR"}, {"dst": "$NODE_IP/32"}],
        "dataDir": "$LANE/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

# ------------------------------------------------------------------------ egress accounting
# Every packet that a lane process (cgroup stackroute-lane) or a pod addresses outside loopback,
# the node address, the pod and Service ranges is counted, logged and rejected.
egress_rules() {
  iptables -N "$EGRESS_CHAIN" 2>/dev/null || iptables -F "$EGRESS_CHAIN"
  local allowed
  for allowed in 127.0.0.0/8 "$NODE_IP/32" "$POD_CIDR" "$SERVICE_CIDR"; do
    iptables -A "$EGRESS_CHAIN" -d "$allowed" -j RETURN
  done
  # The instrument's self-test: an address of ours outside the allowed set (egress-self-test).
  iptables -A "$EGRESS_CHAIN" -d "$PROBE_IP/32" -m comment --comment self-test -j REJECT
  iptables -A "$EGRESS_CHAIN" -j LOG --log-prefix "stackroute-lane-egress: " -m limit --limit 5/min
  iptables -A "$EGRESS_CHAIN" -m comment --comment leak -j REJECT
  iptables -C OUTPUT -m cgroup --path stackroute-lane -j "$EGRESS_CHAIN" 2>/dev/null \
    || iptables -I OUTPUT -m cgroup --path stackroute-lane -j "$EGRESS_CHAIN"
  iptables -C FORWARD -s "$POD_CIDR" -j "$EGRESS_CHAIN" 2>/dev/null \
    || iptables -I FORWARD -s "$POD_CIDR" -j "$EGRESS_CHAIN"
  if command -v ip6tables >/dev/null; then
    ip6tables -N "$EGRESS_CHAIN" 2>/dev/null || ip6tables -F "$EGRESS_CHAIN"
    ip6tables -A "$EGRESS_CHAIN" -d ::1/128 -j RETURN
    ip6tables -A "$EGRESS_CHAIN" -m comment --comment leak -j REJECT
    ip6tables -C OUTPUT -m cgroup --path stackroute-lane -j "$EGRESS_CHAIN" 2>/dev/null \
      || ip6tables -I OUTPUT -m cgroup --path stackroute-lane -j "$EGRESS_CHAIN"
  fi
}

# Packets counted by a rule of the chain, by its comment (IPv4 + IPv6 for "leak").
counted() { # iptables|ip6tables comment
  "$1" -L "$EGRESS_CHAIN" -v -n -x 2>/dev/null | awk -v c="/* $2 */" 'index($0, c) {print $1}'
}
egress_count() {
  local n4 n6=0
  n4=$(counted iptables leak)
  command -v ip6tables >/dev/null && n6=$(counted ip6tables leak)
  [ -n "$n4" ] || { echo "cluster.sh: no $EGRESS_CHAIN chain: is the lane up?" >&2; return 1; }
  echo $((n4 + ${n6:-0}))
}

# Shows that the instrument sees the lane's processes: a connection attempt from the lane's
# cgroup to $PROBE_IP (ours, on the node bridge, outside the allowed set) must be rejected and
# counted by the self-test rule. Nothing leaves the machine either way.
egress_self_test() {
  need_root
  local before after
  before=$(counted iptables self-test)
  [ -n "$before" ] || die "no $EGRESS_CHAIN chain: is the lane up?"
  (
    echo "$BASHPID" > "$CGROUP/cgroup.procs"
    curl -s -o /dev/null --connect-timeout 2 "http://$PROBE_IP:9/" && exit 1
    exit 0
  ) || die "self-test: a lane process reached $PROBE_IP: the egress rule did not reject it"
  after=$(counted iptables self-test)
  [ "$after" -gt "$before" ] || die "self-test: the probe from the lane's cgroup was not counted ($before → $after)"
  echo "egress self-test: a lane process's packet to $PROBE_IP was counted and rejected ($before → $after)"
}

remove_egress_rules() {
  while iptables -D OUTPUT -m cgroup --path stackroute-lane -j "$EGRESS_CHAIN" 2>/dev/null; do :; done
  while iptables -D FORWARD -s "$POD_CIDR" -j "$EGRESS_CHAIN" 2>/dev/null; do :; done
  iptables -F "$EGRESS_CHAIN" 2>/dev/null && iptables -X "$EGRESS_CHAIN"
  if command -v ip6tables >/dev/null; then
    while ip6tables -D OUTPUT -m cgroup --path stackroute-lane -j "$EGRESS_CHAIN" 2>/dev/null; do :; done
    ip6tables -F "$EGRESS_CHAIN" 2>/dev/null && ip6tables -X "$EGRESS_CHAIN"
  fi
  return 0
}

# ------------------------------------------------------------------------ up
start() { # name cmd...
  local name=$1
  shift
  running "$name" && return 0
  nohup "$@" > "$LANE/logs/$name.log" 2>&1 &
  echo $! > "$LANE/run/$name.pid"
}

waitfor() { # description timeout-seconds cmd...
  local what=$1 end=$(( $(date +%s) + $2 ))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$end" ]; then
      ts "TIMEOUT waiting for $what; last log lines:"
      tail -n 20 "$LANE"/logs/*.log >&2 || true
      exit 1
    fi
    sleep 0.2
  done
  ts "$what"
}

up() {
  need_root
  if running kube-apiserver && running kubelet; then
    echo "cluster.sh: the lane is already up ($LANE); 'cluster.sh down' first to restart it"
    return 0
  fi
  prerequisites
  mkdir -p "$LANE"/{bin,run,logs,etc,pki,cni/net.d,containerd,etcd,store-etcd,images} \
    "$LANE"/kubelet/{root,pki,volume-plugins,manifests}

  local kdir
  kdir=$("$HERE/build-kubernetes.sh") || die "building Kubernetes failed"
  ln -sf "$kdir"/bin/* "$LANE/bin/"
  ts "Kubernetes $("$LANE/bin/kube-apiserver" --version | cut -d' ' -f2) binaries ($kdir)"
  stackroute_binaries
  base_images "$kdir"
  stackroute_images
  ts "images built (stackroute from $BIN)"

  # Host state to restore at down.
  if [ ! -f "$LANE/run/host-before" ]; then
    local k p
    for k in "${SYSCTLS[@]}"; do echo "sysctl $k=$(sysctl -n "$k" 2>/dev/null)"; done > "$LANE/run/host-before.tmp"
    for p in "${HARDCODED[@]}"; do [ -e "$p" ] && echo "existed $p"; done >> "$LANE/run/host-before.tmp"
    mv "$LANE/run/host-before.tmp" "$LANE/run/host-before"
  fi

  # The lane's processes (everything started below) are accounted in their own cgroup.
  mkdir -p "$CGROUP"
  echo $$ > "$CGROUP/cgroup.procs"
  egress_rules

  ip link show "$NODE_BRIDGE" >/dev/null 2>&1 || ip link add "$NODE_BRIDGE" type bridge
  ip addr replace "$NODE_IP/32" dev "$NODE_BRIDGE"
  ip addr replace "$PROBE_IP/32" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  pki
  kubeconfigs
  runtime_configs
  ts "node address $NODE_IP on $NODE_BRIDGE, PKI, configs"

  # A socket left by a lane that was killed rather than brought down would pass for a live one.
  running containerd || rm -f "$LANE/run/containerd.sock" "$LANE/run/containerd.sock.ttrpc"
  start containerd containerd --config "$LANE/etc/containerd.toml"
  waitfor "containerd" 60 containerd_serving
  import_images
  ts "images imported: $(ctr -a "$LANE/run/containerd.sock" -n k8s.io images ls -q | grep -v '^sha256' | tr '\n' ' ')"

  start etcd etcd --name "$NODE" --data-dir "$LANE/etcd/data" \
    --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
    --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
    --initial-cluster "$NODE=http://127.0.0.1:23800"
  start store-etcd etcd --name stackroute-store --data-dir "$LANE/store-etcd/data" \
    --listen-client-urls "http://$NODE_IP:$STORE_PORT" --advertise-client-urls "http://$NODE_IP:$STORE_PORT" \
    --listen-peer-urls http://127.0.0.1:23801 --initial-advertise-peer-urls http://127.0.0.1:23801 \
    --initial-cluster "stackroute-store=http://127.0.0.1:23801"
  waitfor "etcd" 30 sh -c 'curl -s http://127.0.0.1:23790/health | grep -q true'
  waitfor "stackroute's store etcd on $NODE_IP:$STORE_PORT" 30 sh -c "curl -s http://$NODE_IP:$STORE_PORT/health | grep -q true"

  start kube-apiserver "$LANE/bin/kube-apiserver" --etcd-servers=http://127.0.0.1:23790 \
    --secure-port="$API_PORT" --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --insecure-port=0 \
    --tls-cert-file="$LANE/pki/apiserver.crt" --tls-private-key-file="$LANE/pki/apiserver.key" \
    --client-ca-file="$LANE/pki/ca.crt" \
    --kubelet-client-certificate="$LANE/pki/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$LANE/pki/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority="$LANE/pki/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$LANE/pki/sa.pub" \
    --service-account-signing-key-file="$LANE/pki/sa.key" --service-cluster-ip-range="$SERVICE_CIDR" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction --allow-privileged=true
  waitfor "kube-apiserver ready" 90 sh -c "[ \"\$(curl -s --cacert $LANE/pki/ca.crt https://$NODE_IP:$API_PORT/readyz)\" = ok ]"

  start kube-controller-manager "$LANE/bin/kube-controller-manager" --kubeconfig="$LANE/etc/kcm.kubeconfig" \
    --service-account-private-key-file="$LANE/pki/sa.key" --root-ca-file="$LANE/pki/ca.crt" \
    --use-service-account-credentials=true --leader-elect=false --bind-address=127.0.0.1 --port=0 \
    --secure-port=10257 --cluster-name="$NODE" --allocate-node-cidrs=false
  start kube-scheduler "$LANE/bin/kube-scheduler" --kubeconfig="$LANE/etc/scheduler.kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --port=0 --secure-port=10259
  # AWS_EC2_METADATA_DISABLED: kubelet 1.20's built-in ECR credential provider otherwise sends
  # SYNs to 169.254.169.254 at start-up, an address that is not ours. --eviction-hard: the lane
  # shares its disk with cargo's target directory; the default (10 % free) would taint the node
  # with disk-pressure on a busy build machine and leave every new pod Pending; no image garbage
  # collection either: the lane's images are imported, not pullable, and must stay.
  start kubelet env AWS_EC2_METADATA_DISABLED=true "$LANE/bin/kubelet" \
    --kubeconfig="$LANE/etc/kubelet-client.kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$LANE/run/containerd.sock" \
    --root-dir="$LANE/kubelet/root" --cert-dir="$LANE/kubelet/pki" \
    --volume-plugin-dir="$LANE/kubelet/volume-plugins" --pod-manifest-path="$LANE/kubelet/manifests" \
    --tls-cert-file="$LANE/pki/kubelet.crt" --tls-private-key-file="$LANE/pki/kubelet.key" \
    --client-ca-file="$LANE/pki/ca.crt" --anonymous-auth=false --authorization-mode=Webhook \
    --authentication-token-webhook=true --hostname-override="$NODE" --node-ip="$NODE_IP" \
    --address="$NODE_IP" --port=10250 --read-only-port=0 --healthz-bind-address=127.0.0.1 \
    --healthz-port=10248 --fail-swap-on=false --cgroup-driver=cgroupfs --resolv-conf= \
    --cluster-domain=cluster.local --node-status-update-frequency=2s \
    --eviction-hard='nodefs.available<1Gi,imagefs.available<1Gi,memory.available<100Mi' \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 \
    --node-labels=topology.kubernetes.io/zone=lane-zone-a,topology.kubernetes.io/region=lane
  start kube-proxy "$LANE/bin/kube-proxy" --kubeconfig="$LANE/etc/kube-proxy.kubeconfig" \
    --proxy-mode=iptables --hostname-override="$NODE" --cluster-cidr="$POD_CIDR" --bind-address="$NODE_IP" \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256 \
    --conntrack-max-per-core=0 --conntrack-tcp-timeout-established=0 --conntrack-tcp-timeout-close-wait=0
  waitfor "node $NODE registered" 90 kc get node "$NODE"
  kc wait --for=condition=Ready "node/$NODE" --timeout=90s >/dev/null || die "node $NODE not Ready (logs: $LANE/logs)"
  ts "node Ready"
  waitfor "default ServiceAccount token" 60 sh -c \
    "'$LANE/bin/kubectl' --kubeconfig '$LANE/etc/admin.kubeconfig' get sa default -o jsonpath='{.secrets[0].name}' | grep -q ."
  ts "up: $(kc get node "$NODE" --no-headers | tr -s ' ')"
  echo "cluster.sh: ready. For the tests:  eval \"\$($0 env)\""
}

env_cmd() {
  [ -f "$LANE/etc/admin.kubeconfig" ] || die "no lane at $LANE (cluster.sh up)"
  echo "export STACKROUTE_TEST_KUBECONFIG=$LANE/etc/admin.kubeconfig"
  echo "export KUBECONFIG=$LANE/etc/admin.kubeconfig"
  echo "export STACKROUTE_LANE_DIR=$LANE"
  echo "export PATH=$LANE/bin:\$PATH"
}

images_cmd() {
  need_root
  running containerd || die "the lane is not up (cluster.sh up)"
  stackroute_binaries
  stackroute_images
  import_images
  ts "stackroute images rebuilt and imported (from $BIN)"
}

status_cmd() {
  local d
  for d in "${DAEMONS[@]}"; do
    if running "$d"; then echo "running  $d (pid $(cat "$LANE/run/$d.pid"))"; else echo "stopped  $d"; fi
  done
  running kube-apiserver && kc get nodes -o wide || true
  echo "egress packets rejected: $(egress_count || echo '?')"
}

# ------------------------------------------------------------------------ down
stop() { # name
  local f=$LANE/run/$1.pid p
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill "$p" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    # kube-apiserver 1.20 can hang in graceful shutdown: a second SIGTERM ends it at once
    kill -0 "$p" 2>/dev/null && { kill "$p" 2>/dev/null; sleep 1; }
    kill -0 "$p" 2>/dev/null && kill -9 "$p" 2>/dev/null
  fi
  rm -f "$f"
}

down() {
  need_root
  # Best effort, step by step: one thing that is already gone must not stop the rest.
  set +e +o pipefail
  trap - ERR
  [ -d "$LANE" ] || { echo "cluster.sh: nothing to do ($LANE does not exist)"; remove_egress_rules; return 0; }
  stop kube-proxy
  stop kubelet
  # Every pod's containers, so that their shims exit before containerd does.
  if running containerd; then
    local c="ctr -a $LANE/run/containerd.sock -n k8s.io" t
    for t in $($c tasks ls -q 2>/dev/null); do $c tasks kill -s SIGKILL "$t" >/dev/null 2>&1 || true; done
    sleep 1
    for t in $($c tasks ls -q 2>/dev/null); do $c tasks delete -f "$t" >/dev/null 2>&1 || true; done
    for t in $($c containers ls -q 2>/dev/null); do $c containers delete "$t" >/dev/null 2>&1 || true; done
  fi
  local d
  for d in kube-scheduler kube-controller-manager kube-apiserver store-etcd etcd containerd; do stop "$d"; done
  # Shims and anything else still in the lane's cgroup (by PID).
  if [ -f "$CGROUP/cgroup.procs" ]; then
    local p
    for p in $(cat "$CGROUP/cgroup.procs"); do [ "$p" = $$ ] || kill -9 "$p" 2>/dev/null || true; done
  fi
  # Mounts below the lane (overlay roots, secret tmpfs, network namespaces), deepest first.
  grep -o " $LANE/[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for d in /run/containerd /var/lib/kubelet; do
    grep -o " $d/[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  done
  # kubelet's pod cgroups (cgroupfs driver), deepest first.
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/*/k8s.io; do
    [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  # iptables chains of kube-proxy and kubelet, then our accounting.
  [ -x "$LANE/bin/kube-proxy" ] && "$LANE/bin/kube-proxy" --cleanup >/dev/null 2>&1
  local tbl ch
  for tbl in filter nat mangle; do
    iptables-save -t "$tbl" | grep -E '^-A .*KUBE-' | sed 's/^-A/-D/' | while read -r r; do
      eval "iptables -t $tbl $r" 2>/dev/null || true
    done
    for ch in $(iptables-save -t "$tbl" | grep -oE '^:KUBE-[^ ]+' | tr -d :); do iptables -t "$tbl" -F "$ch" 2>/dev/null || true; done
    for ch in $(iptables-save -t "$tbl" | grep -oE '^:KUBE-[^ ]+' | tr -d :); do iptables -t "$tbl" -X "$ch" 2>/dev/null || true; done
  done
  remove_egress_rules
  # Interfaces: the two bridges and any pod veth left on the CNI bridge.
  local v
  for v in $(ip -o link show master "$CNI_BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do ip link del "$v" 2>/dev/null || true; done
  ip link del "$CNI_BRIDGE" 2>/dev/null || true
  ip link del "$NODE_BRIDGE" 2>/dev/null || true
  # Host settings and hard-coded paths, as they were before up.
  if [ -f "$LANE/run/host-before" ]; then
    local kind value
    while read -r kind value; do
      [ "$kind" = sysctl ] && [ -n "${value#*=}" ] && sysctl -qw "$value" 2>/dev/null || true
    done < "$LANE/run/host-before"
    for d in "${HARDCODED[@]}"; do grep -qx "existed $d" "$LANE/run/host-before" || rm -rf "$d"; done
  fi
  [ -d "$CGROUP" ] && rmdir "$CGROUP" 2>/dev/null || true
  rm -rf "$LANE"
  # What must be gone now.
  local left=()
  for d in "$NODE_BRIDGE" "$CNI_BRIDGE"; do ip link show "$d" >/dev/null 2>&1 && left+=("interface $d"); done
  iptables-save | grep -q -e 'KUBE-' -e "$EGRESS_CHAIN" && left+=("iptables rules")
  grep -q -e " $LANE" -e " /var/lib/kubelet" -e " /run/containerd/" /proc/self/mounts && left+=("mounts")
  [ -d "$CGROUP" ] && left+=("cgroup $CGROUP")
  if [ ${#left[@]} -gt 0 ]; then
    echo "cluster.sh: down left: ${left[*]}" >&2
    exit 1
  fi
  echo "cluster.sh: down (the Kubernetes build cache stays in ${STACKROUTE_KUBE_CACHE:-/var/cache/stackroute-kube})"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) env_cmd ;;
  images) images_cmd ;;
  status) status_cmd ;;
  egress) egress_count ;;
  egress-self-test) egress_self_test ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
