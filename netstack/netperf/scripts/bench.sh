#!/usr/bin/env bash
# Side-by-side benchmark (not a test): goodput of netstack-BBR vs kernel CUBIC vs kernel BBR on
# one emulated path (stackroute-linkemu: RATE Mbit/s, DELAY ms each way, random loss on the data
# path), then netstack vs kernel on a plain veth (throughput and request/response latency).
#
#   sudo netstack/netperf/scripts/bench.sh            # defaults: 100 Mbit/s, 15 ms each way (30 ms RTT)
#   RATE=100 DELAY=25 RUN_SECONDS=10 LOSSES="0 0.01 0.05 0.1" sudo -E netstack/netperf/scripts/bench.sh
#
# Needs root, iproute2, iperf3, python3, ethtool (optional). Everything runs in namespaces the
# script creates (names include its PID) and removes on exit.
set -euo pipefail

RATE=${RATE:-100}
DELAY=${DELAY:-15}
SECONDS_PER_RUN=${RUN_SECONDS:-10}
LOSSES=${LOSSES:-"0 0.01 0.05 0.1"}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-netstack}
BIN=$CARGO_TARGET_DIR/release

[ "$(id -u)" = 0 ] || { echo "bench.sh needs root" >&2; exit 1; }
for tool in ip iperf3 python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
(cd "$ROOT" && cargo build --release -q -p stackroute-netperf -p stackroute-linkemu)

# The emulator and the user-space stack run under SCHED_FIFO when chrt exists: the emulator must
# keep accurate time for all three contenders, and a user-space stack is deployed on a core of its
# own; kernel TCP already runs in softirq context ahead of every user process. Without this, a
# busy 2-core machine measures the scheduler rather than the stack.
RT_EMU=""; RT_STACK=""
if command -v chrt >/dev/null; then RT_EMU="chrt -f 20"; RT_STACK="chrt -f 10"; fi

P=$$
C=bnC$P; E=bnE$P; S=bnS$P
SUB=10.$(( 100 + P % 150 )).0
KC=$SUB.1; KS=$SUB.2; NS_ADDR=$SUB.3
PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do [ -n "$pid" ] && kill "$pid" 2>/dev/null || true; done
  for ns in $C $E $S; do ip netns del "$ns" 2>/dev/null || true; done
}
trap cleanup EXIT

for ns in $C $E $S; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip link add c0 netns $C type veth peer name e0 netns $E
ip link add s0 netns $S type veth peer name e1 netns $E
ip -n $C addr add $KC/24 dev c0
ip -n $S addr add $KS/24 dev s0
for pair in "$C c0" "$E e0" "$E e1" "$S s0"; do
  set -- $pair
  ip -n "$1" link set "$2" up
  ip netns exec "$1" ethtool -K "$2" tso off gso off gro off >/dev/null 2>&1 || true
done
ip -n $E link set e0 promisc on
ip -n $E link set e1 promisc on

start_emu() { # loss delay rate
  ip netns exec $E $RT_EMU "$BIN/stackroute-linkemu" --left e0 --right e1 \
    --loss "$1" --delay-ms "$2" --rate-mbit "$3" 2>/dev/null &
  EMU=$!; PIDS+=("$EMU"); sleep 0.3
}
stop_emu() { kill "$EMU" 2>/dev/null || true; wait "$EMU" 2>/dev/null || true; }

SINK='
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print("READY", flush=True)
c, _ = s.accept()
while c.recv(1 << 20): pass
c.close()'
ECHO='
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(8); print("READY", flush=True)
c, _ = s.accept(); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while True:
    d = c.recv(65536)
    if not d: break
    c.sendall(d)'
RR='
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n = int(sys.argv[3]); lat = []
for _ in range(n):
    t = time.perf_counter(); c.sendall(b"q" * 64); got = 0
    while got < 64: got += len(c.recv(64 - got))
    lat.append(time.perf_counter() - t)
lat.sort(); print(int(sum(lat) / n * 1e6), int(lat[n // 2] * 1e6), int(lat[int(n * 0.99)] * 1e6))'

kernel_iperf() { # cc -> Mbit/s received
  ip netns exec $S iperf3 -s -1 -B $KS >/dev/null 2>&1 & local srv=$!; sleep 0.3
  ip netns exec $C iperf3 -c $KS -t "$SECONDS_PER_RUN" -C "$1" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))' || echo "fail"
  wait $srv 2>/dev/null || true
}

netstack_send() { # bytes -> Mbit/s goodput
  ip netns exec $S python3 -c "$SINK" $KS 5301 >/dev/null & local srv=$!; sleep 0.3
  ip netns exec $C $RT_STACK "$BIN/stackroute-netperf" client --engine af_packet --interface c0 \
    --address $NS_ADDR/24 --connect $KS:5301 --send "$1" --cc bbr --timeout 120 2>/dev/null |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print("%.1f" % (r["goodput_bps"]/1e6))' || echo "fail"
  kill $srv 2>/dev/null || true; wait $srv 2>/dev/null || true
}

BYTES=$(( RATE * 1000000 / 8 * SECONDS_PER_RUN ))
echo "# Emulated path: ${RATE} Mbit/s, ${DELAY} ms each way (RTT $((2 * DELAY)) ms), random loss on the data path"
echo "# kernel: iperf3 -t ${SECONDS_PER_RUN}; netstack: stackroute-netperf --send ${BYTES} (AF_PACKET)"
printf "%-6s %14s %14s %14s %12s %12s\n" loss netstack-bbr kernel-cubic kernel-bbr "ns/cubic" "ns/kbbr"
for loss in $LOSSES; do
  start_emu "$loss" "$DELAY" "$RATE"
  ns=$(netstack_send $BYTES)
  cubic=$(kernel_iperf cubic)
  kbbr=$(kernel_iperf bbr)
  stop_emu
  ratio() { python3 -c "a,b='$1','$2'; print('%.1fx' % (float(a)/float(b)) if b not in ('fail','0.0') and a!='fail' else '-')"; }
  printf "%-6s %11s Mb %11s Mb %11s Mb %12s %12s\n" "$(python3 -c "print('%g%%' % ($loss*100))")" \
    "$ns" "$cubic" "$kbbr" "$(ratio "$ns" "$cubic")" "$(ratio "$ns" "$kbbr")"
done

echo
echo "# Plain veth through the emulator with no impairment (unlimited rate, no delay)"
start_emu 0 0 0
ns=$(netstack_send 500000000)
cubic=$(kernel_iperf cubic)
printf "throughput: netstack-bbr %s Mbit/s, kernel-cubic %s Mbit/s\n" "$ns" "$cubic"
ip netns exec $S python3 -c "$ECHO" $KS 5302 >/dev/null & srv=$!; sleep 0.3
k=$(ip netns exec $C python3 -c "$RR" $KS 5302 5000)
wait $srv 2>/dev/null || true
ip netns exec $S python3 -c "$ECHO" $KS 5303 >/dev/null & srv=$!; sleep 0.3
n=$(ip netns exec $C $RT_STACK "$BIN/stackroute-netperf" client --interface c0 --address $NS_ADDR/24 \
  --connect $KS:5303 --rr 5000 --rr-size 64 --nodelay --timeout 60 2>/dev/null |
  python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(r["rtt_us_mean"], r["rtt_us_p50"], r["rtt_us_p99"])')
wait $srv 2>/dev/null || true
stop_emu
echo "request/response 64 B (µs mean p50 p99): kernel client $k; netstack client $n"
