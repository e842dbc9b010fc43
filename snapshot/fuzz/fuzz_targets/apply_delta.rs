//! `delta::apply` on deltas between sample snapshots, altered or arbitrary.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| stackroute_snapshot_fuzz::apply_delta(data));
