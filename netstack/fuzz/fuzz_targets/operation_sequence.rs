//! Arbitrary socket operations and link changes on a simulated two-stack network; asserts that
//! every byte read is the byte written at that offset.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stackroute_netstack::fuzzing::run_operations(data);
});
