//! The wire format: one fixed-size message layout for all four kinds.

use crate::Reason;

/// The first bytes of every message.
pub const MAGIC: [u8; 8] = [0xF5, b'S', b'R', b'-', b'R', b'D', b'M', b'A'];

/// The version this build speaks.
pub const VERSION: u8 = 1;

/// Every message's length.
pub const MESSAGE_LEN: usize = 48;

/// Byte offsets of each field.
mod field {
    use std::ops::Range;
    pub(super) const MAGIC: Range<usize> = 0..8;
    pub(super) const VERSION: usize = 8;
    pub(super) const KIND: usize = 9;
    pub(super) const REASON: Range<usize> = 10..12;
    pub(super) const FEATURES: Range<usize> = 12..16;
    pub(super) const NONCE: Range<usize> = 16..24;
    pub(super) const GID: Range<usize> = 24..40;
    pub(super) const QPN: Range<usize> = 40..44;
    pub(super) const PSN: Range<usize> = 44..48;
}

/// A message's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Client → server: "I can upgrade; here is my endpoint".
    Proposal = 1,
    /// Server → client: "so can I; here is mine".
    Accept = 2,
    /// Client → server: the RDMA connection is up; the stream moves there.
    Confirm = 3,
    /// Either way: no upgrade, for this reason; the connection stays TCP.
    Decline = 4,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Proposal,
            2 => Self::Accept,
            3 => Self::Confirm,
            4 => Self::Decline,
            _ => return None,
        })
    }
}

/// Where one side's RDMA endpoint is: its GID (the RoCE address) and the queue pair the peer
/// connects to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The port's GID (for RoCE v2 an IPv6 or IPv4-mapped address).
    pub gid: [u8; 16],
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
}

/// One message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its kind.
    pub kind: Kind,
    /// Why, for a [`Kind::Decline`] (ignored otherwise).
    pub reason: Option<Reason>,
    /// Feature bits (none defined in version 1; a receiver ignores bits it does not know).
    pub features: u32,
    /// The client's random number, echoed by every later message of the same exchange.
    pub nonce: u64,
    /// The sender's endpoint (Proposal, Accept).
    pub endpoint: Endpoint,
}

/// Why bytes that start with [`MAGIC`] are not a message of this version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than [`MESSAGE_LEN`] bytes.
    Short,
    /// Not [`MAGIC`].
    NotOurs,
    /// Another version of the exchange.
    Version(u8),
    /// A kind byte this version does not define.
    Kind(u8),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Short => write!(f, "shorter than {MESSAGE_LEN} bytes"),
            Self::NotOurs => write!(f, "does not start with the upgrade magic"),
            Self::Version(v) => write!(f, "version {v} (this build speaks {VERSION})"),
            Self::Kind(k) => write!(f, "unknown message kind {k}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl Message {
    /// A message of `kind` for exchange `nonce`, without endpoint or reason.
    pub fn new(kind: Kind, nonce: u64) -> Self {
        Self {
            kind,
            reason: None,
            features: 0,
            nonce,
            endpoint: Endpoint::default(),
        }
    }

    /// A decline for `reason`.
    pub fn decline(nonce: u64, reason: Reason) -> Self {
        Self {
            reason: Some(reason),
            ..Self::new(Kind::Decline, nonce)
        }
    }

    /// The message with `endpoint`.
    pub fn with_endpoint(self, endpoint: Endpoint) -> Self {
        Self { endpoint, ..self }
    }

    /// Its bytes.
    pub fn encode(&self) -> [u8; MESSAGE_LEN] {
        let mut out = [0u8; MESSAGE_LEN];
        out[field::MAGIC].copy_from_slice(&MAGIC);
        out[field::VERSION] = VERSION;
        out[field::KIND] = self.kind as u8;
        let reason = self.reason.map_or(0, Reason::code);
        out[field::REASON].copy_from_slice(&reason.to_be_bytes());
        out[field::FEATURES].copy_from_slice(&self.features.to_be_bytes());
        out[field::NONCE].copy_from_slice(&self.nonce.to_be_bytes());
        out[field::GID].copy_from_slice(&self.endpoint.gid);
        out[field::QPN].copy_from_slice(&self.endpoint.qpn.to_be_bytes());
        out[field::PSN].copy_from_slice(&self.endpoint.psn.to_be_bytes());
        out
    }

    /// The message at the start of `bytes` (which may continue with application data).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let bytes = bytes.get(..MESSAGE_LEN).ok_or(DecodeError::Short)?;
        if bytes[field::MAGIC] != MAGIC {
            return Err(DecodeError::NotOurs);
        }
        if bytes[field::VERSION] != VERSION {
            return Err(DecodeError::Version(bytes[field::VERSION]));
        }
        let kind =
            Kind::from_byte(bytes[field::KIND]).ok_or(DecodeError::Kind(bytes[field::KIND]))?;
        let be16 =
            |r: std::ops::Range<usize>| u16::from_be_bytes([bytes[r.start], bytes[r.start + 1]]);
        let be32 =
            |r: std::ops::Range<usize>| u32::from_be_bytes(bytes[r].try_into().unwrap_or_default());
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&bytes[field::GID]);
        Ok(Self {
            kind,
            // An unknown code from a newer peer still declines; it reads as `Other`.
            reason: (kind == Kind::Decline).then(|| Reason::from_code(be16(field::REASON))),
            features: be32(field::FEATURES),
            nonce: u64::from_be_bytes(bytes[field::NONCE].try_into().unwrap_or_default()),
            endpoint: Endpoint {
                gid,
                qpn: be32(field::QPN),
                psn: be32(field::PSN),
            },
        })
    }
}

/// What the first bytes of a stream are, as far as the upgrade goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefix {
    /// Nothing yet.
    Empty,
    /// Not an upgrade message: application data (leave it in the stream).
    NotOurs,
    /// The start of an upgrade message; more is on its way.
    Partial,
    /// A whole upgrade message (decode it).
    Complete,
}

/// Classifies the first bytes of a stream (as peeked, up to [`MESSAGE_LEN`]).
pub fn classify(bytes: &[u8]) -> Prefix {
    if bytes.is_empty() {
        return Prefix::Empty;
    }
    let seen = bytes.len().min(MAGIC.len());
    if bytes[..seen] != MAGIC[..seen] {
        Prefix::NotOurs
    } else if bytes.len() < MESSAGE_LEN {
        Prefix::Partial
    } else {
        Prefix::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips() {
        let endpoint = Endpoint {
            gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            qpn: 0x0012_3456,
            psn: 0x00ab_cdef,
        };
        for kind in [Kind::Proposal, Kind::Accept, Kind::Confirm] {
            let message = Message::new(kind, 0x0102_0304_0506_0708).with_endpoint(endpoint);
            let bytes = message.encode();
            assert_eq!(bytes[..8], MAGIC);
            assert_eq!(Message::decode(&bytes), Ok(message));
        }
        for reason in Reason::ALL {
            let message = Message::decline(7, reason);
            assert_eq!(
                Message::decode(&message.encode()),
                Ok(message),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn the_layout_is_fixed() {
        // A change here is a change of the wire format: bump VERSION.
        let bytes = Message::decline(0x1122_3344_5566_7788, Reason::NoDevice).encode();
        assert_eq!(
            bytes[..24],
            [
                0xF5, b'S', b'R', b'-', b'R', b'D', b'M', b'A', 1, 4, 0, 2, 0, 0, 0, 0, 0x11, 0x22,
                0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        assert_eq!(bytes[24..], [0u8; 24]);
    }

    #[test]
    fn bad_bytes_are_named() {
        let good = Message::new(Kind::Proposal, 1).encode();
        assert_eq!(Message::decode(&good[..47]), Err(DecodeError::Short));
        let mut other = good;
        other[0] = b'G';
        assert_eq!(Message::decode(&other), Err(DecodeError::NotOurs));
        let mut newer = good;
        newer[8] = 2;
        assert_eq!(Message::decode(&newer), Err(DecodeError::Version(2)));
        let mut kind = good;
        kind[9] = 9;
        assert_eq!(Message::decode(&kind), Err(DecodeError::Kind(9)));
        let mut unknown_reason = Message::decline(1, Reason::NoGid).encode();
        unknown_reason[10..12].copy_from_slice(&999u16.to_be_bytes());
        assert_eq!(
            Message::decode(&unknown_reason).map(|m| m.reason),
            Ok(Some(Reason::Other))
        );
    }

    #[test]
    fn application_data_is_never_ours() {
        let message = Message::new(Kind::Proposal, 1).encode();
        assert_eq!(classify(b""), Prefix::Empty);
        for data in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"*1\r\n$4\r\nPING\r\n",
            b"\x16\x03\x01\x02\x00",
            b"PRI * HTTP/2.0",
            b"\xf5",
        ] {
            let expected = if data == b"\xf5" {
                Prefix::Partial
            } else {
                Prefix::NotOurs
            };
            assert_eq!(classify(data), expected, "{data:?}");
        }
        assert_eq!(classify(&message[..10]), Prefix::Partial);
        assert_eq!(classify(&message), Prefix::Complete);
        let mut with_data = message.to_vec();
        with_data.extend_from_slice(b"hello");
        assert_eq!(classify(&with_data), Prefix::Complete);
        assert_eq!(classify(b"\xf5SR-X"), Prefix::NotOurs);
    }
}
