#!/usr/bin/env bash
# Side-by-side benchmark (not a test): goodput of netstack-BBR vs kernel CUBIC vs kernel BBR on
# one emulated path (stackroute-linkemu: RATE Mbit/s, DELAY ms each way, random loss on the data
# path), then netstack vs kernel on a plain veth (throughput and request/response latency).
#
#   sudo netstack/netperf/scripts/bench.sh            # defaults: 100 Mbit/s, 15 ms each way (30 ms RTT)
#   RATE=100 DELAY=25 RUN_SECONDS=10 LOSSES="0 0.01 0.05 0.1" REPEAT=3 sudo -E netstack/netperf/scripts/bench.sh
#   SKIP_EMULATED=1 ... runs only the plain-veth part; SKIP_PLAIN=1 only the emulated part
#   PLAIN_ARGS="--busy-poll-us 0" ... extra stackroute-netperf arguments for the plain-veth runs
#   TRACE_DIR=/tmp/t [TRACE_MS=50] ... keeps each netstack run's STACKROUTE_NETPERF_TRACE output (min_rtt_us,
#                        cwnd, bandwidth estimate once a second) in /tmp/t/netstack-LOSS-TIME.err
#
# Needs root, iproute2, iperf3, python3, ethtool (optional). Everything runs in namespaces the
# script creates (names include its PID) and removes on exit.
set -euo pipefail

RATE=${RATE:-100}
DELAY=${DELAY:-15}
SECONDS_PER_RUN=${RUN_SECONDS:-10}
LOSSES=${LOSSES:-"0 0.01 0.05 0.1"}
REPEAT=${REPEAT:-1}   # runs per cell; the median is reported (this machine's noise is large)
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-netstack}
BIN=$CARGO_TARGET_DIR/release

[ "$(id -u)" = 0 ] || { echo "bench.sh needs root" >&2; exit 1; }
for tool in ip iperf3 python3; do
  command -v "$tool" >/dev/null || { echo "missing $tool" >&2; exit 1; }
done
# The plain-veth engines: our AF_XDP and AF_PACKET, and DPDK over its net_af_packet and
# net_af_xdp virtual devices on the same veth when DPDK is installed (the build then has the
# `dpdk` feature).
FEATURES=()
if pkg-config --atleast-version=22.11 libdpdk 2>/dev/null; then
  ENGINES=${ENGINES:-"af_xdp af_packet dpdk:af_packet dpdk:af_xdp"}
  FEATURES=(--features stackroute-netperf/dpdk)
else
  ENGINES=${ENGINES:-"af_xdp af_packet"}
  echo "# DPDK not installed (pkg-config libdpdk): no DPDK rows" >&2
fi
(cd "$ROOT" && cargo build --release -q -p stackroute-netperf -p stackroute-linkemu "${FEATURES[@]}")

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
  rm -rf "${TMP:-/nonexistent}"
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
# A plain veth between the same two namespaces, no emulator, for the no-loss comparison.
SUB2=10.$(( 100 + P % 150 )).1
ip link add c1 netns $C type veth peer name s1 netns $S
ip -n $C addr add $SUB2.1/24 dev c1
ip -n $S addr add $SUB2.2/24 dev s1
for pair in "$C c1" "$S s1"; do
  set -- $pair
  ip -n "$1" link set "$2" up
  ip netns exec "$1" ethtool -K "$2" tso off gso off gro off >/dev/null 2>&1 || true
done

TMP=$(mktemp -d)
# Starts a Python server in a namespace and waits (bounded) until it prints READY; sets SRV.
start_py() { # ns script ip port
  rm -f "$TMP/srv.$4"   # else the previous server's READY is seen before this one listens
  ip netns exec "$1" python3 -c "$2" "$3" "$4" > "$TMP/srv.$4" 2>&1 &
  SRV=$!; PIDS+=("$SRV")
  for _ in $(seq 200); do grep -q READY "$TMP/srv.$4" && return 0; sleep 0.05; done
  echo "server on port $4 did not start" >&2; return 1
}
# Waits (bounded) for a server to exit, then makes sure it is gone.
stop_srv() { # pid
  for _ in $(seq 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.05; done
  kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true
}

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

# The kernel doing exactly what `stackroute-netperf client --send` does, timed the same way: from
# the established connection until the peer has closed after the last byte (iperf3 -t instead
# stops its clock when the sender stops, so the data still in flight and the repair of the last
# losses are not in its figure).
SEND='
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, sys.argv[4].encode())
left = int(sys.argv[3]); block = memoryview(bytes(range(256)) * 4096); t = time.perf_counter()
while left:
    n = c.send(block[:min(left, len(block))]); left -= n
c.shutdown(socket.SHUT_WR)
while c.recv(65536): pass
print("%.1f" % (int(sys.argv[3]) * 8 / (time.perf_counter() - t) / 1e6))'
kernel_send() { # bytes cc -> Mbit/s goodput
  start_py $S "$SINK" $KS 5302 || { echo fail; return; }; local srv=$SRV
  timeout 120 ip netns exec $C python3 -c "$SEND" $KS 5302 "$1" "$2" 2>/dev/null || echo "fail"
  stop_srv $srv
}

kernel_iperf() { # cc -> Mbit/s received
  ip netns exec $S iperf3 -s -1 -B $KS >/dev/null 2>&1 & local srv=$!; PIDS+=("$srv"); sleep 0.5
  ip netns exec $C iperf3 -c $KS -t "$SECONDS_PER_RUN" -C "$1" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.1f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))' 2>/dev/null || echo "fail"
  stop_srv $srv
}

netstack_send() { # bytes loss -> Mbit/s goodput
  start_py $S "$SINK" $KS 5301 || { echo fail; return; }; local srv=$SRV
  local err=/dev/null
  if [ -n "${TRACE_DIR:-}" ]; then
    mkdir -p "$TRACE_DIR"; err="$TRACE_DIR/netstack-$2-$(date +%H%M%S%N).err"
    export STACKROUTE_NETPERF_TRACE=${TRACE_MS:-1}
  fi
  ip netns exec $C $RT_STACK "$BIN/stackroute-netperf" client --engine af_packet --interface c0 \
    --address $NS_ADDR/24 --connect $KS:5301 --send "$1" --cc bbr --no-checksum --timeout 120 2>"$err" |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print("%.1f" % (r["goodput_bps"]/1e6))' 2>/dev/null || echo "fail"
  stop_srv $srv
}

median() { python3 -c "
import statistics, sys
v = [float(x) for x in sys.argv[1:] if x != 'fail']
print('%.1f' % statistics.median(v) if v else 'fail')" "$@"; }
repeat() { # command... -> median of REPEAT runs
  local out=()
  for _ in $(seq "$REPEAT"); do out+=("$("$@")"); done
  echo "#   $1 ${2:-} ${3:-}: ${out[*]}" >&2   # every run, for the spread
  median "${out[@]}"
}

BYTES=$(( RATE * 1000000 / 8 * SECONDS_PER_RUN ))
if [ -z "${SKIP_EMULATED:-}" ]; then
echo "# Emulated path: ${RATE} Mbit/s, ${DELAY} ms each way (RTT $((2 * DELAY)) ms), random loss on the data path"
echo "# netstack: stackroute-netperf --send ${BYTES} (AF_PACKET); kernel: iperf3 -t ${SECONDS_PER_RUN}, and"
echo "# kbbr-send: the same ${BYTES} bytes timed to the peer's close like netstack; median of ${REPEAT} run(s)"
printf "%-6s %14s %14s %14s %14s %9s %9s %11s\n" loss netstack-bbr kernel-cubic kernel-bbr kbbr-send \
  "ns/cubic" "ns/kbbr" "ns/kbbr-send"
for loss in $LOSSES; do
  start_emu "$loss" "$DELAY" "$RATE"
  ns=$(repeat netstack_send $BYTES "$loss")
  cubic=$(repeat kernel_iperf cubic)
  kbbr=$(repeat kernel_iperf bbr)
  ksend=$(repeat kernel_send $BYTES bbr)
  stop_emu
  ratio() { python3 -c "a,b='$1','$2'; print('%.2fx' % (float(a)/float(b)) if b not in ('fail','0.0') and a!='fail' else '-')"; }
  printf "%-6s %11s Mb %11s Mb %11s Mb %11s Mb %9s %9s %11s\n" "$(python3 -c "print('%g%%' % ($loss*100))")" \
    "$ns" "$cubic" "$kbbr" "$ksend" "$(ratio "$ns" "$cubic")" "$(ratio "$ns" "$kbbr")" "$(ratio "$ns" "$ksend")"
done

fi

[ -n "${SKIP_PLAIN:-}" ] && exit 0
echo
echo "# Plain veth (no emulator, no loss), TSO/GSO/GRO off on both ends"
# `--engine` arguments for an ENGINES entry: an engine name, or dpdk:PMD for DPDK's net_PMD
# virtual device on c1.
engine_args() {
  case "$1" in
    dpdk:af_xdp) echo "--engine dpdk --dpdk-args --vdev=net_af_xdp0,iface=c1,start_queue=0,queue_count=1" ;;
    dpdk:*) echo "--engine dpdk --dpdk-args --vdev=net_${1#dpdk:}0,iface=c1" ;;
    *) echo "--engine $1" ;;
  esac
}
# DPDK's af_xdp PMD removes its XDP program when it closes; if it was killed, this does.
after_engine() { case "$1" in dpdk:af_xdp) ip -n $C link set c1 xdp off 2>/dev/null || true ;; esac; }
plain_send() { # engine -> Mbit/s
  start_py $S "$SINK" $SUB2.2 5311 || { echo fail; return; }; local srv=$SRV
  # shellcheck disable=SC2046 # engine_args prints words on purpose
  ip netns exec $C $RT_STACK "$BIN/stackroute-netperf" client $(engine_args "$1") --interface c1 \
    --address $SUB2.3/24 --connect $SUB2.2:5311 --send 1000000000 --no-checksum --timeout 120 ${PLAIN_ARGS:-} 2>/dev/null |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print("%.0f" % (r["goodput_bps"]/1e6))' 2>/dev/null || echo "fail"
  after_engine "$1"
  stop_srv $srv
}
plain_kernel() {
  ip netns exec $S iperf3 -s -1 -B $SUB2.2 >/dev/null 2>&1 & local srv=$!; PIDS+=("$srv"); sleep 0.5
  ip netns exec $C iperf3 -c $SUB2.2 -t "$SECONDS_PER_RUN" -C cubic -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))' 2>/dev/null || echo "fail"
  stop_srv $srv
}
plain_rr() { # engine -> "mean p50 p99"
  start_py $S "$ECHO" $SUB2.2 5312 || { echo fail; return; }; local srv=$SRV
  # No SCHED_FIFO here: a real-time task busy-polling would keep ksoftirqd, which delivers the
  # veth's packets, off its CPU and add milliseconds to the tail.
  # shellcheck disable=SC2046
  ip netns exec $C "$BIN/stackroute-netperf" client $(engine_args "$1") --interface c1 \
    --address $SUB2.3/24 --connect $SUB2.2:5312 --rr 5000 --rr-size 64 --nodelay --timeout 60 ${PLAIN_ARGS:-} 2>/dev/null |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(r["rtt_us_mean"], r["rtt_us_p50"], r["rtt_us_p99"])' 2>/dev/null || echo "fail"
  after_engine "$1"
  stop_srv $srv
}
rr_median() { # engine -> median of REPEAT runs of "mean p50 p99", field by field
  local runs=()
  for _ in $(seq "$REPEAT"); do runs+=("$(plain_rr "$1")"); done
  echo "#   plain_rr $1: ${runs[*]}" >&2
  python3 -c "
import statistics, sys
rows = [r.split() for r in sys.argv[1:] if r != 'fail']
print(' '.join('%.0f' % statistics.median(float(r[i]) for r in rows) for i in range(3)) if rows else 'fail')" "${runs[@]}"
}
k=$(repeat plain_kernel)
start_py $S "$ECHO" $SUB2.2 5313; srv=$SRV
krr=$(timeout 60 ip netns exec $C python3 -c "$RR" $SUB2.2 5313 5000 || echo fail)
stop_srv $srv
echo "# throughput: one connection sending 1 GB (kernel: iperf3 CUBIC ${SECONDS_PER_RUN} s); request/response:"
echo "# 5000 round trips of 64 B against a Python kernel echo server (kernel row: a Python client,"
echo "# one run); medians of ${REPEAT} run(s), every run on stderr"
printf "%-22s %12s %9s %10s %8s %8s\n" engine "Mbit/s" "x kernel" "rr mean" "rr p50" "rr p99"
read -r kmean kp50 kp99 _ <<<"$krr - - -"
printf "%-22s %12s %9s %10s %8s %8s\n" "kernel (CUBIC)" "$k" "1.00x" "$kmean µs" "$kp50 µs" "$kp99 µs"
for engine in $ENGINES; do
  tput=$(repeat plain_send "$engine")
  read -r mean p50 p99 _ <<<"$(rr_median "$engine") - - -"
  ratio=$(python3 -c "print('%.2fx' % ($tput/$k))" 2>/dev/null || echo -)
  printf "%-22s %12s %9s %10s %8s %8s\n" "netstack $engine" "$tput" "$ratio" "$mean µs" "$p50 µs" "$p99 µs"
done
