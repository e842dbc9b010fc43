#!/usr/bin/env bash
# The stackroute demo: three paths (same node, same zone, a lossy rate-limited internet path:
# 50 Mbit/s, 1 % loss, +40 ms), first without policy (kernel CUBIC everywhere), then with a
# StackRoute that picks kernel BBR for the internet path, then with the internet rule on the
# user-space stack (BBR, read from the stack instance's own report); tables of transfer time,
# throughput and speed-up. About a minute and a half.
#
#   scripts/demo.sh [stackroute-demo options]     (--help lists them; --calibrate checks the link)
#   scripts/demo.sh --output json                 (the runs as a JSON array on stdout)
#
# Needs root (network namespaces, veth, tc, iptables — all created for the run and removed
# after it, also on Ctrl-C): run it in a root shell, or as a user, and it re-runs itself with
# sudo. Installs iperf3/iproute2/iptables/ethtool with apt if missing and builds the release
# binaries with cargo.
set -euo pipefail

if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "demo.sh: needs root — it creates network namespaces, veth pairs, tc and iptables rules" >&2
    echo "         (removed when it ends) — and there is no sudo here: run it in a root shell." >&2
    exit 2
  fi
  # sudo resets PATH (secure_path) and HOME: hand the caller's toolchain on, or root would not
  # find rustup's cargo in ~/.cargo/bin, or its toolchains in ~/.rustup.
  keep=("PATH=$PATH")
  [ -n "${RUSTUP_HOME:-}" ] || [ ! -d "${HOME:-}/.rustup" ] || keep+=("RUSTUP_HOME=$HOME/.rustup")
  for var in RUSTUP_HOME RUSTUP_TOOLCHAIN CARGO_HOME CARGO_TARGET_DIR; do
    [ -z "${!var:-}" ] || keep+=("$var=${!var}")
  done
  echo "demo.sh: needs root; running it with sudo" >&2
  exec sudo env "${keep[@]}" "$(realpath "$0")" "$@"
fi
# For the test of the lines above (e2e/tests/demo_script.rs): stop before installing or building.
if [ -n "${DEMO_STOP_AFTER_ROOT_CHECK:-}" ]; then
  echo "demo.sh: running as root"
  exit 0
fi
cd "$(dirname "$0")/.."

missing=()
for tool in ip:iproute2 iptables:iptables tc:iproute2 ethtool:ethtool ss:iproute2 iperf3:iperf3 python3:python3 clang:clang; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
# The AF_XDP engine's XDP program is C, built by clang with libbpf's headers.
[ -f /usr/include/bpf/bpf_helpers.h ] || missing+=(libbpf-dev)
if [ "${#missing[@]}" -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1; then
    echo "demo.sh: installing ${missing[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "demo.sh: please install: ${missing[*]}" >&2
    exit 2
  fi
fi
command -v protoc >/dev/null 2>&1 || {
  command -v apt-get >/dev/null 2>&1 && apt-get update -qq >&2 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
}

target="${CARGO_TARGET_DIR:-target}"
echo "demo.sh: building (cargo build --release; the first build takes a few minutes)" >&2
cargo build --release --locked -q -p stackroute-controller -p stackroute-lrd -p stackroute-cli \
  -p nsocket-shim -p stackroute-e2e -p stackroute-stackd

# The demo binary cleans up after itself (drop guards; SIGINT/SIGTERM are caught). If it is
# killed outright, the next run removes namespaces whose creating process is gone.
demo_pid=""
cleanup() {
  if [ -n "$demo_pid" ] && kill -0 "$demo_pid" 2>/dev/null; then
    kill -TERM "$demo_pid" 2>/dev/null || true
    wait "$demo_pid" 2>/dev/null || true
  fi
}
trap cleanup INT TERM EXIT
"$target/release/stackroute-demo" "$@" &
demo_pid=$!
wait "$demo_pid"
