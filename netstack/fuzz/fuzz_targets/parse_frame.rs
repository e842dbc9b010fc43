//! Arbitrary bytes as an Ethernet frame and as a TCP segment behind valid lower layers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stackroute_netstack::fuzzing::feed_frame(data);
});
