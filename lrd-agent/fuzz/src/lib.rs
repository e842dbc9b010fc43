//! Fuzz harness logic for the hand-over protocol of `stackroute-lrd`
//! (`stackroute_lrd::handover::protocol`), shared by the libFuzzer target
//! (`fuzz_targets/handover_message.rs`) and the stable-toolchain replay tests below.
//!
//! [`handover_message`] feeds the input to the parser both agents use on the hand-over socket:
//! as a whole frame ([`protocol::parse_frame`]: the `u32` length header, the bound, the JSON
//! body) and as a bare body ([`protocol::decode`]). Whatever parses must encode again, parse
//! back to the same encoding, and go through every check a running agent makes of a request
//! ([`protocol::check_request`], with a fixed node key: only that key's secret may pass) and a
//! new agent makes of an answer ([`protocol::check_answer`], then the listener records it
//! adopts) or of a confirmation ([`protocol::check_taken`]) without panicking.

use stackroute_lrd::handover::protocol::{
    self, HEADER_LEN, KEY_LEN, Key, MAX_FRAME, Message, Refusal,
};

/// The key the running agent of the harness holds.
pub fn key() -> Key {
    Key::from_bytes(std::array::from_fn(|i| (i as u8).wrapping_mul(31) ^ 0x5a))
}

/// The node the running agent of the harness serves.
pub const NODE: &str = "node-a1";

/// Target `handover_message`.
pub fn handover_message(data: &[u8]) {
    if data.len() >= HEADER_LEN {
        let header: [u8; HEADER_LEN] = data[..HEADER_LEN].try_into().expect("4 bytes");
        if let Ok(len) = protocol::body_len(header) {
            assert!(len <= MAX_FRAME);
        }
    }
    if let Ok(message) = protocol::parse_frame(data) {
        exercise(message, data.len());
    }
    if let Ok(message) = protocol::decode(data) {
        exercise(message, data.len());
    }
}

/// Re-encoding and every check, for a message that parsed from `input_len` bytes.
pub fn exercise(message: Message, input_len: usize) {
    let bytes = match protocol::encode(&message) {
        Ok(bytes) => bytes,
        // Defaults the input left out are written back (`"netns":0`, …): only a body close to
        // the limit may grow past it.
        Err(error) if input_len > MAX_FRAME / 2 => {
            assert!(error.contains("exceeds"), "{error}");
            return;
        }
        Err(error) => panic!("a parsed message does not encode again: {error}"),
    };
    let again = protocol::parse_frame(&bytes)
        .unwrap_or_else(|e| panic!("an encoded message does not parse: {e}"));
    assert_eq!(
        protocol::encode(&again).expect("encodes"),
        bytes,
        "encoding is not stable"
    );

    let key = key();
    let secret = key.secret().0;
    // A requester that put the secret into its own node name gets that name back in the
    // "node" refusal (it had the secret already); no other refusal may show it.
    let carried = matches!(&message, Message::Request { node, .. } if node.contains(&secret));
    match protocol::check_request(&message, NODE, &key) {
        Ok(()) => match &message {
            Message::Request {
                version,
                node,
                secret,
                ..
            } => {
                assert_eq!(*version, protocol::VERSION);
                assert_eq!(node, NODE);
                assert_eq!(
                    secret.as_ref(),
                    Some(&key.secret()),
                    "a wrong secret passed"
                );
            }
            other => panic!("accepted as a request: {other:?}"),
        },
        Err(Refusal { reason, message }) => {
            assert!(Refusal::REASONS.contains(&reason), "{reason}");
            assert!(!message.is_empty());
            assert!(
                carried || !message.contains(&secret),
                "a refusal shows the secret"
            );
        }
    }
    if let Message::Request { node, .. } = &message {
        // The same request to an agent of its own node, with another key.
        let other = Key::from_bytes([0; KEY_LEN]);
        let _ = protocol::check_request(&message, node, &other);
    }
    let _ = protocol::check_taken(&message);
    if let Ok(state) = protocol::check_answer(message, NODE) {
        assert_eq!(state.node, NODE);
        for record in state.cluster_listeners {
            let _ = record.into_listener();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Stable-toolchain checks of the harness: the committed seeds replay without a panic, each
    //! of them reaches the parser's accepting path or a known rejection, and a deterministic
    //! mutation sweep runs clean. Regenerate the seeds with
    //! `STACKROUTE_WRITE_SEEDS=1 cargo test --manifest-path lrd-agent/fuzz/Cargo.toml`.

    use super::*;
    use std::path::{Path, PathBuf};

    fn seeds() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/handover_message")
    }

    fn frame(json: &str) -> Vec<u8> {
        let mut bytes = (json.len() as u32).to_le_bytes().to_vec();
        bytes.extend_from_slice(json.as_bytes());
        bytes
    }

    /// Valid frames of every kind, and the interesting near misses.
    fn seed_inputs() -> Vec<(&'static str, Vec<u8>)> {
        let secret = key().secret().0;
        let request = format!(
            r#"{{"kind":"request","version":2,"node":"{NODE}","secret":"{secret}","netns":4026531840,"metricsAddr":"127.0.0.1:9420"}}"#
        );
        let state = format!(
            r#"{{"kind":"state","version":2,"node":"{NODE}","generation":7,"registrations":{{"listeners":[{{"owner":{{"pid":1,"start":1}},"node":"{NODE}","ip":"10.0.0.1","port":8080,"protocol":6,"namespace":"shop","workload":"web-1","stacks":[0],"endpoints":{{}}}}],"workloads":[],"removals":[]}},"clusterListeners":[{{"owner":{{"pid":0,"start":0}},"node":"{NODE}","ip":"10.0.0.2","port":53,"protocol":17,"namespace":"kube-system","workload":"dns","stacks":[],"endpoints":{{"RDMA":"gid/4791"}}}}]}}"#
        );
        vec![
            ("request", frame(&request)),
            (
                "request-v1",
                frame(r#"{"kind":"request","version":1,"node":"node-a1"}"#),
            ),
            (
                "request-no-secret",
                frame(r#"{"kind":"request","version":2,"node":"node-a1"}"#),
            ),
            ("state", frame(&state)),
            (
                "refused",
                frame(r#"{"kind":"refused","message":"not today"}"#),
            ),
            ("taken", frame(r#"{"kind":"taken"}"#)),
            ("body-only", request.into_bytes()),
            ("oversized-header", b"\xff\xff\xff\xff{}".to_vec()),
            ("truncated", frame(r#"{"kind":"taken"}"#)[..9].to_vec()),
            // Found by the CI fuzz smoke: the right secret, and a node name that carries it.
            (
                "request-node-carries-secret",
                frame(&format!(
                    r#"{{"kind":"request","version":2,"node":"n{secret}.[-a1","secret":"{secret}","netns":4026531840,"metricsAddr":"127.0.0.1:9420"}}"#
                )),
            ),
        ]
    }

    #[test]
    fn seeds_replay_and_valid_frames_pass_the_checks() {
        if std::env::var_os("STACKROUTE_WRITE_SEEDS").is_some() {
            std::fs::create_dir_all(seeds()).unwrap();
            for (name, bytes) in seed_inputs() {
                std::fs::write(seeds().join(name), bytes).unwrap();
            }
        }
        let mut files: Vec<_> = std::fs::read_dir(seeds())
            .expect("seeds directory")
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 10, "seeds missing: {files:?}");
        for path in &files {
            handover_message(&std::fs::read(path).unwrap());
        }
        // The valid request is accepted with the harness key; the state is adopted.
        let inputs = seed_inputs();
        let request = protocol::parse_frame(&inputs[0].1).unwrap();
        assert!(protocol::check_request(&request, NODE, &key()).is_ok());
        let state = protocol::parse_frame(&inputs[3].1).unwrap();
        let state = protocol::check_answer(state, NODE).unwrap();
        assert_eq!(state.cluster_listeners.len(), 1);
        let old = protocol::parse_frame(&inputs[1].1).unwrap();
        assert_eq!(
            protocol::check_request(&old, NODE, &key())
                .unwrap_err()
                .reason,
            "version"
        );
    }

    /// A small deterministic sweep (byte flips, truncations and insertions of the seeds), so
    /// the harness runs on stable without libFuzzer. `STACKROUTE_FUZZ_ITERATIONS` raises it.
    #[test]
    fn deterministic_mutation_sweep() {
        let iterations: u64 = std::env::var("STACKROUTE_FUZZ_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5_000);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let inputs = seed_inputs();
        let mut parsed = 0u64;
        for _ in 0..iterations {
            let mut bytes = inputs[next() as usize % inputs.len()].1.clone();
            for _ in 0..=next() % 3 {
                if bytes.is_empty() {
                    bytes.push(next() as u8);
                    continue;
                }
                let at = next() as usize % bytes.len();
                match next() % 4 {
                    0 => bytes[at] ^= 1 << (next() % 8),
                    1 => bytes[at] = b"{}[]\",:0 \\\"u"[next() as usize % 12],
                    2 => bytes.truncate(at),
                    _ => bytes.insert(at, next() as u8),
                }
            }
            if protocol::parse_frame(&bytes).is_ok() {
                parsed += 1;
            }
            handover_message(&bytes);
        }
        eprintln!("{parsed} of {iterations} mutated frames parsed");
    }
}
