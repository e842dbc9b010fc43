//! The hand-over protocol on `STATE_DIR/handover.sock`: messages, framing and the checks each
//! side makes. Pure: no I/O, so every malformed input is unit-tested here (and fuzzed:
//! `lrd-agent/fuzz`, target `handover_message`, through [`parse_frame`]).
//!
//! ```text
//! new agent                                   running agent
//!   request {version, node, secret, netns} ──► checks the peer (uid) and the request
//!                                              (version, the node's secret, node)
//!                                       ◄──   refused {message}            (keeps serving)
//!                                             or: stops accepting, drains, stops publishing
//!                                       ◄──   state {generation, registrations, …}
//!                                             + SCM_RIGHTS: the agent.sock listening socket
//!   taken                               ──►   stops for good (waits for SIGTERM, or exits 0)
//! ```
//! Frames: a little-endian `u32` body length, then one JSON object of at most [`MAX_FRAME`]
//! bytes.
//!
//! The successor proves it is one by the node's hand-over secret ([`Key`], the file
//! [`KEY_FILE`] in the state directory, which only the agents mount): the secret, not the
//! caller's process name, is what authenticates it.

use serde::{Deserialize, Serialize};

use crate::registry::{ListenerRecord, RegistrationRecords};

/// The hand-over socket, in the state directory (a directory only the agent mounts; the
/// socket itself is mode 0600).
pub const HANDOVER_SOCKET_FILE: &str = "handover.sock";
/// The node's hand-over secret, in the state directory: [`KEY_LEN`] random bytes, mode 0600.
pub const KEY_FILE: &str = "handover.key";
/// Length of the hand-over secret in bytes.
pub const KEY_LEN: usize = 32;
/// Protocol version; both sides must speak the same. 2: the request carries the node's
/// hand-over secret, and the socket is in the state directory (version 1 had neither).
pub const VERSION: u32 = 2;
/// Largest frame body: registrations of a busy node fit with room to spare.
pub const MAX_FRAME: usize = 16 << 20;
/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// The node's hand-over secret. Its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// The key of these bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The key as stored in [`KEY_FILE`]; `None` unless it is exactly [`KEY_LEN`] bytes.
    pub fn from_file_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The raw bytes (what [`KEY_FILE`] holds).
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The secret as a request carries it (lowercase hex).
    pub fn secret(&self) -> Secret {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(KEY_LEN * 2);
        for byte in self.0 {
            text.push(char::from(HEX[usize::from(byte >> 4)]));
            text.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
        Secret(text)
    }

    /// Whether `secret` is this key's, compared in constant time (for a secret of the right
    /// length; the length is no secret).
    pub fn matches(&self, secret: &Secret) -> bool {
        constant_time_eq(self.secret().0.as_bytes(), secret.0.as_bytes())
    }
}

/// Equality of two byte strings whose time depends on their lengths only.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(difference) == 0
}

/// A hand-over secret as sent in a request: the key in hex. Its `Debug` form does not show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} characters>)", self.0.len())
    }
}

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
        /// The node's hand-over secret ([`Key::secret`]). Optional in the message so that a
        /// request without one is refused with a reason instead of as malformed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret: Option<Secret>,
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

/// Why the running agent refused a hand-over request: `reason` is the metric label
/// (`stackroute_lrd_handover_refused_total{reason}`), `message` what the caller is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// One of [`Refusal::REASONS`].
    pub reason: &'static str,
    /// The explanation sent to the caller and logged.
    pub message: String,
}

impl Refusal {
    /// Every `reason` there is. `malformed`: no complete, well-formed message within the request timeout (garbage,
    /// oversized, silent, cut off).
    pub const REASONS: [&'static str; 8] = [
        "malformed",
        "kind",
        "version",
        "missing-secret",
        "wrong-secret",
        "node",
        "uid",
        "not-serving",
    ];

    /// A refusal for `reason` (one of [`Refusal::REASONS`]).
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        debug_assert!(Self::REASONS.contains(&reason), "{reason}");
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
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

/// One whole frame, as the reader on either side takes it off the socket: the header, a body
/// of exactly the announced length, the message. Bytes after the frame are an error here (on
/// the socket they would be the next read's).
pub fn parse_frame(bytes: &[u8]) -> Result<Message, String> {
    let (header, body) = bytes
        .split_first_chunk::<HEADER_LEN>()
        .ok_or_else(|| format!("a frame of {} bytes has no header", bytes.len()))?;
    let len = body_len(*header)?;
    match body.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(format!(
            "the frame announces {len} bytes and ends after {}",
            body.len()
        )),
        std::cmp::Ordering::Greater => {
            Err(format!("{} bytes after a frame of {len}", body.len() - len))
        }
        std::cmp::Ordering::Equal => decode(body),
    }
}

/// Whether the caller may ask for a hand-over at all: it runs as the same user as this agent.
/// (The secret is the proof that it is an agent of this node; see [`check_request`].)
pub fn check_peer(peer_uid: u32, own_uid: u32) -> Result<(), Refusal> {
    if peer_uid != own_uid {
        return Err(Refusal::new(
            "uid",
            format!("peer runs as uid {peer_uid}, this agent as uid {own_uid}"),
        ));
    }
    Ok(())
}

/// The running agent's check of a request: a request, of this version, carrying this node's
/// secret (`key`), from an agent of the same node. The secret is checked before the node, so
/// a caller without it learns nothing more.
pub fn check_request(message: &Message, node: &str, key: &Key) -> Result<(), Refusal> {
    let Message::Request {
        version,
        node: theirs,
        secret,
        ..
    } = message
    else {
        return Err(Refusal::new(
            "kind",
            format!("expected a hand-over request, got {}", kind(message)),
        ));
    };
    if *version != VERSION {
        return Err(Refusal::new(
            "version",
            format!(
                "hand-over protocol version {version} is not supported (this agent speaks {VERSION}); \
                 an agent of another release takes the socket directory over without a hand-over"
            ),
        ));
    }
    match secret {
        None => {
            return Err(Refusal::new(
                "missing-secret",
                format!(
                    "the request carries no hand-over secret (an agent reads it from {KEY_FILE} in its state directory)"
                ),
            ));
        }
        Some(secret) if !key.matches(secret) => {
            return Err(Refusal::new(
                "wrong-secret",
                format!(
                    "the hand-over secret does not match this node's ({KEY_FILE} in the state directory)"
                ),
            ));
        }
        Some(_) => {}
    }
    if theirs != node {
        return Err(Refusal::new(
            "node",
            format!("the requester serves node {theirs:?}, this agent serves {node:?}"),
        ));
    }
    Ok(())
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

    fn key() -> Key {
        Key::from_bytes(std::array::from_fn(|i| i as u8 * 7))
    }

    fn request_with(version: u32, node: &str, secret: Option<Secret>) -> Message {
        Message::Request {
            version,
            node: node.into(),
            secret,
            netns: 0,
            metrics_addr: None,
        }
    }

    fn request(version: u32, node: &str) -> Message {
        request_with(version, node, Some(key().secret()))
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
        let decoded = decode(&bytes[HEADER_LEN..]).unwrap();
        assert_eq!(
            encode(&parse_frame(&bytes).unwrap()).unwrap(),
            encode(&decoded).unwrap()
        );
        decoded
    }

    #[test]
    fn messages_round_trip_and_are_checked() {
        assert!(check_request(&round_trip(&request(VERSION, "n1")), "n1", &key()).is_ok());
        let answer = check_answer(round_trip(&state(VERSION, "n1")), "n1").unwrap();
        assert_eq!(answer.generation, 7);
        assert!(check_taken(&round_trip(&Message::Taken)).is_ok());
    }

    #[test]
    fn wrong_versions_nodes_and_kinds_are_refused_with_a_reason() {
        let refusal = check_request(&request(VERSION + 1, "n1"), "n1", &key()).unwrap_err();
        assert_eq!(refusal.reason, "version");
        assert!(
            refusal.message.contains("version 3 is not supported"),
            "{refusal}"
        );
        let refusal = check_request(&request(VERSION, "n2"), "n1", &key()).unwrap_err();
        assert_eq!(refusal.reason, "node");
        assert!(refusal.message.contains("serves node \"n2\""), "{refusal}");
        let refusal = check_request(&Message::Taken, "n1", &key()).unwrap_err();
        assert_eq!(refusal.reason, "kind");
        assert!(
            refusal.message.contains("expected a hand-over request"),
            "{refusal}"
        );
        let error = check_answer(state(VERSION + 1, "n1"), "n1").unwrap_err();
        assert!(error.contains("protocol version 3"), "{error}");
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
    fn a_version_1_request_is_refused_as_such_not_as_malformed() {
        // What an agent of the previous release sends: no secret, version 1.
        let message = decode(br#"{"kind":"request","version":1,"node":"n1"}"#).unwrap();
        let refusal = check_request(&message, "n1", &key()).unwrap_err();
        assert_eq!(refusal.reason, "version");
        assert!(
            refusal
                .message
                .contains("version 1 is not supported (this agent speaks 2)"),
            "{refusal}"
        );
    }

    #[test]
    fn only_the_nodes_secret_opens_the_hand_over() {
        let refusal = check_request(&request_with(VERSION, "n1", None), "n1", &key()).unwrap_err();
        assert_eq!(refusal.reason, "missing-secret");
        assert!(refusal.message.contains("no hand-over secret"), "{refusal}");
        let other = Key::from_bytes([0xaa; KEY_LEN]);
        for wrong in [
            other.secret(),
            Secret(String::new()),
            Secret(key().secret().0.to_uppercase()),
            Secret(key().secret().0[..KEY_LEN].to_string()),
            Secret(format!("{}0", key().secret().0)),
        ] {
            let refusal =
                check_request(&request_with(VERSION, "n1", Some(wrong)), "n1", &key()).unwrap_err();
            assert_eq!(refusal.reason, "wrong-secret");
            assert!(refusal.message.contains("does not match"), "{refusal}");
        }
        // The secret is checked before the node: a caller without it learns nothing else.
        let refusal = check_request(
            &request_with(VERSION, "n2", Some(other.secret())),
            "n1",
            &key(),
        )
        .unwrap_err();
        assert_eq!(refusal.reason, "wrong-secret");
        // Neither the key nor the secret shows in logs.
        let secret = key().secret();
        assert!(!format!("{:?}", request(VERSION, "n1")).contains(&secret.0));
        assert!(!format!("{:?}", key()).contains(&secret.0[..8]));
        assert_eq!(secret.0.len(), 2 * KEY_LEN);
        assert_eq!(Key::from_file_bytes(key().as_bytes()), Some(key()));
        assert_eq!(Key::from_file_bytes(&[1; KEY_LEN - 1]), None);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"\x00", b"\x80"));
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
            b"{\"kind\":\"request\",\"version\":2,\"node\":\"n1\",\"secret\":7}",
            b"\xff\xfe\x00garbage",
        ] {
            let error = decode(body).unwrap_err();
            assert!(error.starts_with("malformed hand-over message"), "{error}");
        }
        let error = body_len(u32::MAX.to_le_bytes()).unwrap_err();
        assert!(error.contains("more than the limit"), "{error}");
        assert_eq!(body_len(12u32.to_le_bytes()), Ok(12));
        let frame = encode(&Message::Taken).unwrap();
        assert!(parse_frame(&frame[..2]).unwrap_err().contains("no header"));
        let short = parse_frame(&frame[..frame.len() - 1]).unwrap_err();
        assert!(short.contains("ends after"), "{short}");
        let mut long = frame.clone();
        long.push(b' ');
        assert!(parse_frame(&long).unwrap_err().contains("1 bytes after"));
        assert!(check_taken(&parse_frame(&frame).unwrap()).is_ok());
    }

    #[test]
    fn only_the_same_user_may_ask() {
        assert!(check_peer(0, 0).is_ok());
        let refusal = check_peer(1000, 0).unwrap_err();
        assert_eq!(refusal.reason, "uid");
        assert!(refusal.message.contains("uid 1000"), "{refusal}");
    }
}
