#!/usr/bin/env bash
# Benchmark (not a test): the user-space stack behind the shim, side by side in one run with
# kernel BBR, kernel CUBIC and standalone stackroute-netperf, on netstack's emulated path
# (stackroute-linkemu: 100 Mbit/s and 15 ms each way, one-BDP queue, 1 % and 5 % loss), then on
# a plain veth path (throughput, 64-byte request/response p50/p99), and the instance's start
# (first Userspace connect of a namespace). Prints every run, the medians and the ratios
# against the issue's targets, met or not. About 8 minutes with the defaults.
#
#   sudo scripts/bench-userspace.sh [userspace-bench options]
#   sudo scripts/bench-userspace.sh --repeat 1 --seconds 5 --losses 0.05   # a quick look
#   (--help lists them: --seconds 10 --repeat 3 --losses 0.01,0.05 --rate-mbit 100 --delay-ms 15
#    --round-trips 5000 --connects 20 --skip-emulated --skip-plain)
#
# The instances use the agent's default packet engine (AF_XDP, falling back to AF_PACKET); set
# STACKROUTE_USERSPACE_PACKET_IO=af-packet to measure AF_PACKET instead. The engine the instances
# reported is printed with the instance-start figures.
#
# Needs root (network namespaces; all removed at exit, also on Ctrl-C), iproute2, iptables,
# ethtool, iperf3, python3, chrt. Builds the release binaries with cargo
# (CARGO_TARGET_DIR is honoured).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "bench-userspace.sh: needs root (network namespaces, veth, iptables). Run: sudo $0 $*" >&2
  exit 2
fi
for tool in ip iptables ethtool ss iperf3 python3 chrt; do
  command -v "$tool" >/dev/null 2>&1 || { echo "bench-userspace.sh: missing $tool" >&2; exit 2; }
done

target="${CARGO_TARGET_DIR:-target}"
echo "# bench-userspace.sh: building (cargo build --release)" >&2
cargo build --release --locked -q -p stackroute-controller -p stackroute-lrd -p stackroute-cli \
  -p nsocket-shim -p stackroute-e2e -p stackroute-stackd -p stackroute-netperf -p stackroute-linkemu

echo "# $(date -u '+%Y-%m-%d %H:%M UTC'), build $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- 2>/dev/null || echo '+changes'), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"

bench_pid=""
cleanup() {
  if [ -n "$bench_pid" ] && kill -0 "$bench_pid" 2>/dev/null; then
    kill -TERM "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
}
trap cleanup INT TERM EXIT
"$target/release/userspace-bench" "$@" &
bench_pid=$!
wait "$bench_pid"
