//! Arbitrary bytes as a cluster-state YAML file: load, compile, encode every node's snapshot,
//! parse each back and explain connections from it. Nothing may panic, every encoded snapshot
//! must parse, and every scheduled pod must be found in its node's snapshot.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| stackroute_policy_fuzz::load_yaml(data));
