//! The hand-over protocol on `DIR/handover.sock`: messages, framing and the checks each side
//! makes. Pure: no I/O, so every malformed input is unit-tested here.
//!
//! ```text
//! new agent                                   running agent
//!   request {version, node, netns}      ──►   checks the peer (uid, comm) and the request
//!                                       ◄──   refused {message}            (keeps serving)
//!                                             or: stops accepting, drains, stops publishing
//!                                       ◄──   state {generation, registrations, …}
//!                                             + SCM_RIGHTS: the agent.sock listening socket
//!   taken                               ──►   stops for good (waits for SIGTERM, or exits 0)
//! ```
//! Frames: a little-endian `u32` body length, then one JSON object of at most [`MAX_FRAME`]
//! bytes.

use serde::{Deserialize, Serialize};

use crate::registry::{ListenerRecord, RegistrationRecords};

/// The hand-over socket in the socket directory (mode 0600: root's agents only).
pub const HANDOVER_SOCKET_FILE: &str = "handover.sock";
/// Protocol version; both sides must speak the same.
pub const VERSION: u32 = 1;
/// Largest frame body: registrations of a busy node fit with room to spare.
pub const MAX_FRAME: usize = 16 << 20;
/// Length of the frame header.
pub const HEADER_LEN: usize = 4;
/// `/proc/PID/comm` of an agent process.
pub const AGENT_COMM: &str = "stackroute-lrd";

/// One message on the hand-over socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Message {
    /// New → running: hand over this socket directory.
    #[serde(rename_all = "camelCase")]
    Request {
        /// [`VERSION`].
        version: u32,
        /// The node the new agent serves; must be the running agent's.
        node: String,
        /// Inode of the new agent's network namespace (`/proc/self/ns/net`), 0 if unknown:
        /// when it is the running agent's, the running agent also releases its metrics port.
        #[serde(default)]
        netns: u64,
        /// The new agent's metrics address, if any.
        #[serde(default)]
        metrics_addr: Option<String>,
    },
    /// Running → new: no hand-over, and why. The running agent keeps serving.
    Refused {
        /// Why.
        message: String,
    },
    /// Running → new, with the listening socket attached.
    State(Box<HandedState>),
    /// New → running: the new agent holds the socket; the running one stops for good.
    Taken,
}

/// What the running agent hands over besides its listening socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandedState {
    /// [`VERSION`].
    pub version: u32,
    /// The running agent's node.
    pub node: String,
    /// The last generation it published (the new agent continues above it).
    pub generation: u64,
    /// Registrations it holds for local processes, with their owners.
    pub registrations: RegistrationRecords,
    /// The cluster's listener registry from its last snapshot update.
    pub cluster_listeners: Vec<ListenerRecord>,
}

/// Encodes one frame.
pub fn encode(message: &Message) -> Result<Vec<u8>, String> {
    let mut bytes = vec![0; HEADER_LEN];
    serde_json::to_writer(&mut bytes, message).map_err(|e| format!("cannot encode: {e}"))?;
    let len = bytes.len() - HEADER_LEN;
    if len > MAX_FRAME {
        return Err(format!("message of {len} bytes exceeds {MAX_FRAME}"));
    }
    bytes[..HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(bytes)
}

/// The body length a header announces, refused above [`MAX_FRAME`].
pub fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, String> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(format!(
            "frame announces {len} bytes, more than the limit of {MAX_FRAME}"
        ));
    }
    Ok(len)
}

/// Decodes a frame body.
pub fn decode(body: &[u8]) -> Result<Message, String> {
    serde_json::from_slice(body).map_err(|e| format!("malformed hand-over message: {e}"))
}

/// Whether the caller may ask for a hand-over: same user as this agent, and an agent process.
/// (Root-only file permissions on the socket are the real gate; this refuses confused callers.)
pub fn check_peer(peer_uid: u32, own_uid: u32, peer_comm: Option<&str>) -> Result<(), String> {
    if peer_uid != own_uid {
        return Err(format!(
            "peer runs as uid {peer_uid}, this agent as uid {own_uid}"
        ));
    }
    match peer_comm {
        Some(AGENT_COMM) => Ok(()),
        Some(other) => Err(format!(
            "peer is not a {AGENT_COMM} process (its command is {other:?})"
        )),
        None => Err("peer process is not visible (no pid or no /proc entry)".into()),
    }
}

/// The running agent's check of a request.
pub fn check_request(message: &Message, node: &str) -> Result<(), String> {
    match message {
        Message::Request { version, .. } if *version != VERSION => Err(format!(
            "hand-over protocol version {version} is not supported (this agent speaks {VERSION})"
        )),
        Message::Request { node: theirs, .. } if theirs != node => Err(format!(
            "the requester serves node {theirs:?}, this agent serves {node:?}"
        )),
        Message::Request { .. } => Ok(()),
        other => Err(format!("expected a hand-over request, got {}", kind(other))),
    }
}

/// The new agent's check of the running agent's answer.
pub fn check_answer(message: Message, node: &str) -> Result<HandedState, String> {
    match message {
        Message::State(state) if state.version != VERSION => Err(format!(
            "the running agent answered with protocol version {}, not {VERSION}",
            state.version
        )),
        Message::State(state) if state.node != node => Err(format!(
            "the running agent serves node {:?}, not {node:?}",
            state.node
        )),
        Message::State(state) => Ok(*state),
        Message::Refused { message } => Err(format!("the running agent refused: {message}")),
        other => Err(format!("expected the agent's state, got {}", kind(&other))),
    }
}

/// The running agent's check of the new agent's confirmation.
pub fn check_taken(message: &Message) -> Result<(), String> {
    match message {
        Message::Taken => Ok(()),
        other => Err(format!("expected \"taken\", got {}", kind(other))),
    }
}

fn kind(message: &Message) -> &'static str {
    match message {
        Message::Request { .. } => "\"request\"",
        Message::Refused { .. } => "\"refused\"",
        Message::State(_) => "\"state\"",
        Message::Taken => "\"taken\"",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: u32, node: &str) -> Message {
        Message::Request {
            version,
            node: node.into(),
            netns: 0,
            metrics_addr: None,
        }
    }

    fn state(version: u32, node: &str) -> Message {
        Message::State(Box::new(HandedState {
            version,
            node: node.into(),
            generation: 7,
            registrations: RegistrationRecords::default(),
            cluster_listeners: Vec::new(),
        }))
    }

    fn round_trip(message: &Message) -> Message {
        let bytes = encode(message).unwrap();
        let len = body_len(bytes[..HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - HEADER_LEN);
        decode(&bytes[HEADER_LEN..]).unwrap()
    }

    #[test]
    fn messages_round_trip_and_are_checked() {
        assert!(check_request(&round_trip(&request(VERSION, "n1")), "n1").is_ok());
        let answer = check_answer(round_trip(&state(VERSION, "n1")), "n1").unwrap();
        assert_eq!(answer.generation, 7);
        assert!(check_taken(&round_trip(&Message::Taken)).is_ok());
    }

    #[test]
    fn wrong_versions_nodes_and_kinds_are_refused_with_a_reason() {
        let error = check_request(&request(VERSION + 1, "n1"), "n1").unwrap_err();
        assert!(error.contains("version 2 is not supported"), "{error}");
        let error = check_request(&request(VERSION, "n2"), "n1").unwrap_err();
        assert!(error.contains("serves node \"n2\""), "{error}");
        let error = check_request(&Message::Taken, "n1").unwrap_err();
        assert!(error.contains("expected a hand-over request"), "{error}");
        let error = check_answer(state(VERSION + 1, "n1"), "n1").unwrap_err();
        assert!(error.contains("protocol version 2"), "{error}");
        let error = check_answer(state(VERSION, "n2"), "n1").unwrap_err();
        assert!(error.contains("serves node \"n2\""), "{error}");
        let refused = Message::Refused {
            message: "busy".into(),
        };
        let error = check_answer(refused, "n1").unwrap_err();
        assert!(error.contains("refused: busy"), "{error}");
        let error = check_answer(request(VERSION, "n1"), "n1").unwrap_err();
        assert!(error.contains("expected the agent's state"), "{error}");
        assert!(check_taken(&request(VERSION, "n1")).is_err());
    }

    #[test]
    fn malformed_and_oversized_frames_are_errors_not_panics() {
        for body in [
            &b""[..],
            b"{",
            b"null",
            b"[]",
            b"{\"kind\":\"nope\"}",
            b"{\"kind\":\"state\"}",
            b"{\"kind\":\"request\",\"version\":\"one\",\"node\":\"n1\"}",
            b"\xff\xfe\x00garbage",
        ] {
            let error = decode(body).unwrap_err();
            assert!(error.starts_with("malformed hand-over message"), "{error}");
        }
        let error = body_len(u32::MAX.to_le_bytes()).unwrap_err();
        assert!(error.contains("more than the limit"), "{error}");
        assert_eq!(body_len(12u32.to_le_bytes()), Ok(12));
    }

    #[test]
    fn only_an_agent_of_the_same_user_may_ask() {
        assert!(check_peer(0, 0, Some(AGENT_COMM)).is_ok());
        let error = check_peer(1000, 0, Some(AGENT_COMM)).unwrap_err();
        assert!(error.contains("uid 1000"), "{error}");
        let error = check_peer(0, 0, Some("python3")).unwrap_err();
        assert!(error.contains("not a stackroute-lrd process"), "{error}");
        assert!(check_peer(0, 0, None).is_err());
    }
}
