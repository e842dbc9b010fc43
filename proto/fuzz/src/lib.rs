//! Fuzz harness logic for the controller's request decoding and validation
//! (`stackroute_proto::validate`, `stackroute_proto::identity`), shared by the libFuzzer target
//! and the replay test below.
//!
//! The first byte picks the message; the rest is decoded as that message with prost (as tonic
//! does at the controller's edge) and, when it decodes, checked by the validator the controller
//! and the agent share. A validated message must survive the checks again unchanged (the
//! validators normalise; normalising twice changes nothing), and its encoding must stay within
//! what the controller accepts.

use prost::Message;
use stackroute_proto::identity::Caller;
use stackroute_proto::v1alpha1::{
    AckRequest, Listener, ListenerKey, NodeCapabilities, WatchRequest, Workload, WorkloadKey,
};
use stackroute_proto::validate::{
    check_listener, check_listener_key, check_name, check_workload, check_workload_key,
};

/// Target `grpc_request`.
pub fn grpc_request(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(listener) = Listener::decode(body)
                && let Ok(checked) = check_listener(listener)
            {
                let again = check_listener(checked.clone()).expect("a valid listener stays valid");
                assert_eq!(again, checked, "normalising twice changes nothing");
            }
        }
        1 => {
            if let Ok(workload) = Workload::decode(body)
                && let Ok(checked) = check_workload(workload)
            {
                let again = check_workload(checked.clone()).expect("a valid workload stays valid");
                assert_eq!(again, checked, "normalising twice changes nothing");
            }
        }
        2 => {
            if let Ok(key) = ListenerKey::decode(body) {
                let _ = check_listener_key(Some(&key));
            }
        }
        3 => {
            if let Ok(key) = WorkloadKey::decode(body) {
                let _ = check_workload_key(Some(&key));
            }
        }
        4 => {
            if let Ok(request) = WatchRequest::decode(body) {
                let _ = check_name("node", &request.node);
            }
        }
        5 => {
            if let Ok(request) = AckRequest::decode(body) {
                let _ = check_name("node", &request.node);
            }
        }
        6 => {
            let _ = NodeCapabilities::decode(body);
        }
        _ => {
            // Certificate URI SANs: a caller parsed from a URI names itself the same way.
            if let Ok(uri) = std::str::from_utf8(body)
                && let Some(caller) = Caller::from_uri(uri)
            {
                assert_eq!(Caller::from_uri(&caller.uri()), Some(caller));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Replays the seeds (and any corpus) on the stable toolchain.
    #[test]
    fn seeds_replay_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/grpc_request");
        let mut count = 0;
        for entry in std::fs::read_dir(dir).expect("seeds") {
            super::grpc_request(&std::fs::read(entry.expect("entry").path()).expect("seed"));
            count += 1;
        }
        assert!(count > 0, "no seeds");
    }
}
