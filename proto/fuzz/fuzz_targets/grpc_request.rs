//! Every request the controller decodes, from arbitrary bytes, through the shared validators.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| stackroute_proto_fuzz::grpc_request(data));
