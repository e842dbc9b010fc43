#!/usr/bin/env bash
# The DPDK engine's tests: builds with `--features dpdk` (DPDK >= 22.11 and libclang needed:
# on Debian 12, apt-get install libdpdk-dev dpdk clang pkg-config) and runs every DPDK trial,
# which must run, not be ignored (STACKROUTE_REQUIRE_DPDK=1). Most trials need root (network
# namespaces, AF_PACKET/AF_XDP under DPDK); `cargo test --workspace` runs the same trials
# ignored, with the reason, in its feature-less build.
#
#   scripts/test-dpdk.sh            (as root; about two minutes after the build)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! pkg-config --atleast-version=22.11 libdpdk 2>/dev/null; then
  echo "test-dpdk.sh: DPDK >= 22.11 not found by pkg-config (apt-get install libdpdk-dev dpdk)" >&2
  exit 2
fi
export STACKROUTE_REQUIRE_DPDK=1
if [ "$(id -u)" = 0 ]; then
  export STACKROUTE_REQUIRE_NETNS="${STACKROUTE_REQUIRE_NETNS:-1}"
fi
cargo test --locked -p stackroute-dpdk-sys --features dpdk
cargo test --locked -p stackroute-pktio --features dpdk
cargo test --locked -p stackroute-netperf --features dpdk --test dpdk
cargo test --locked -p stackroute-netperf --features dpdk --test interop -- dpdk_
cargo test --locked -p stackroute-stackd --features dpdk --test relay -- dpdk
