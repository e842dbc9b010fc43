#!/usr/bin/env bash
# Fuzz smoke test: builds the cargo-fuzz targets of policy/fuzz, snapshot/fuzz, netstack/fuzz,
# proto/fuzz (the controller's request decoding) and lrd-agent/fuzz (the agent's local API and
# hand-over protocol) with the
# *stable* toolchain and runs each for a bounded time. Exits non-zero when a target crashes
# (panics, times out or runs out of memory) or does not build; the crashing input is left in
# <crate>/fuzz/artifacts/<target>/ and its path printed.
#
#   FUZZ_SECONDS=20     seconds per target (load_yaml, decode, mutate, parse_frame,
#                       operation_sequence, grpc_request, local_request, handover_message)
#   FUZZ_TARGETS="..."  a subset, e.g. "decode mutate"
#   FUZZ_SANITIZER=none none (default: the crates are #![forbid(unsafe_code)], so the bugs to
#                       find are panics; plain stable builds it) or address (ASan: needs
#                       -Zsanitizer, which this script enables on stable with RUSTC_BOOTSTRAP=1)
#   FUZZ_TARGET_DIR=... cargo target dir (default: target-fuzz/cargo-fuzz, git-ignored)
#
# Needs: cargo-fuzz (installed here with `cargo install` when missing) and a C++ compiler for
# libFuzzer (g++, installed with apt-get when missing and running as root).
# See policy/fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

seconds="${FUZZ_SECONDS:-20}"
sanitizer="${FUZZ_SANITIZER:-none}"
target_dir="${FUZZ_TARGET_DIR:-$root/target-fuzz/cargo-fuzz}"
all_targets="load_yaml decode mutate apply_delta parse_frame operation_sequence grpc_request local_request handover_message"
targets="${FUZZ_TARGETS:-$all_targets}"
cargo_fuzz_version="0.13.2"

log() { printf 'fuzz-smoke: %s\n' "$*" >&2; }

case "$seconds" in
  '' | *[!0-9]*) log "FUZZ_SECONDS must be a whole number of seconds, not '$seconds'"; exit 2 ;;
esac

# --- tools ------------------------------------------------------------------------------------
if ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 && ! command -v clang++ >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing g++ (libFuzzer is C++)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ >/dev/null
  else
    log "a C++ compiler is needed to build libFuzzer: install g++"; exit 2
  fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz $cargo_fuzz_version"
  cargo install --locked cargo-fuzz --version "$cargo_fuzz_version"
fi
log "$(cargo fuzz --version), $(rustc --version)"

fuzz_flags=(--release --debug-assertions --sanitizer "$sanitizer" --target-dir "$target_dir")
if [ "$sanitizer" != none ]; then
  # -Zsanitizer is unstable; the stable compiler accepts it with RUSTC_BOOTSTRAP=1.
  export RUSTC_BOOTSTRAP=1
fi

crate_of() {
  case "$1" in
    load_yaml) echo policy ;;
    decode | mutate | apply_delta) echo snapshot ;;
    parse_frame | operation_sequence) echo netstack ;;
    grpc_request) echo proto ;;
    local_request | handover_message) echo lrd-agent ;;
    *) echo unknown ;;
  esac
}
for target in $targets; do
  if [ "$(crate_of "$target")" = unknown ]; then
    log "unknown fuzz target '$target' (known: $all_targets)"; exit 2
  fi
done
# cargo fuzz SUBCOMMAND ARGS... for <crate>/fuzz: from inside a crate directory, or with
# --fuzz-dir where <crate> is a folder of crates (netstack/) with no Cargo.toml of its own.
fuzz_in() {
  local crate=$1 subcommand=$2; shift 2
  if [ -f "$crate/Cargo.toml" ]; then
    (cd "$crate" && cargo fuzz "$subcommand" "$@")
  else
    cargo fuzz "$subcommand" --fuzz-dir "$crate/fuzz" "$@"
  fi
}
logs="$target_dir/logs"
mkdir -p "$logs"

# --- build everything first, so a build error is reported as such -------------------------------
for crate in policy snapshot netstack proto lrd-agent; do
  wanted=()
  for target in $targets; do
    if [ "$(crate_of "$target")" = "$crate" ]; then wanted+=("$target"); fi
  done
  if [ "${#wanted[@]}" = 0 ]; then continue; fi
  log "building $crate/fuzz: ${wanted[*]}"
  started=$SECONDS
  for target in "${wanted[@]}"; do
    fuzz_in "$crate" build "${fuzz_flags[@]}" "$target"
  done
  log "built $crate/fuzz in $((SECONDS - started))s"
done

# --- run ---------------------------------------------------------------------------------------
failed=()
for target in $targets; do
  crate=$(crate_of "$target")
  dir="$root/$crate/fuzz"
  corpus="$dir/corpus/$target"   # git-ignored working corpus, grows across local runs
  mkdir -p "$corpus"
  extra=()
  case "$target" in
    load_yaml) extra=(-dict="$dir/load_yaml.dict" -max_len=16384) ;;
  esac
  log "running $target for ${seconds}s"
  started=$SECONDS
  if fuzz_in "$crate" run "${fuzz_flags[@]}" "$target" "$corpus" "$dir/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        "${extra[@]}" >"$logs/$target.log" 2>&1; then
    runs=$(grep -o 'Done [0-9]* runs' "$logs/$target.log" | tail -1 || true)
    log "$target: ok (${runs:-no run count}, $((SECONDS - started))s)"
  else
    failed+=("$target")
    log "$target: FAILED — last lines of $logs/$target.log:"
    grep -v '^"' "$logs/$target.log" | tail -40 >&2
    ls -1 "$dir/artifacts/$target" 2>/dev/null | sed "s|^|fuzz-smoke:   artifact $crate/fuzz/artifacts/$target/|" >&2 || true
  fi
done

if [ "${#failed[@]}" != 0 ]; then
  log "crashed: ${failed[*]} (reproduce: cd <crate> && cargo fuzz run ${fuzz_flags[*]} TARGET ARTIFACT)"
  exit 1
fi
log "all targets ran ${seconds}s without a crash: $targets"
