//! `Snapshot::parse` on arbitrary bytes; whatever parses is looked up every way there is.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| stackroute_snapshot_fuzz::decode(data));
