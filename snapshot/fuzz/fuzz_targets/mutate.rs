//! Valid snapshots, mutated past the checksum: parse must reject or accept without panicking,
//! and lookups on whatever it accepts must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| stackroute_snapshot_fuzz::mutate(data));
