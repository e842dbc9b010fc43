//! Arbitrary bytes as a hand-over frame (and as a frame body): the parser must reject or accept
//! without panicking, and whatever it accepts must re-encode stably and pass through every
//! check either agent makes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| stackroute_lrd_fuzz::handover_message(data));
