//! The files the agent publishes in its socket directory, and their byte layout. All integers
//! are little-endian.
//!
//! ```text
//! DIR/agent.sock    the Unix socket (see crate::message)
//! DIR/snapshot      the current snapshot, read-only (0444), replaced atomically by rename
//!   0  magic          8  b"\x89SRPUB1\n"
//!   8  generation     8  the generation this file was published as
//!  16  revision       8  controller revision of the snapshot
//!  24  snapshot_len   8  = file length - HEADER_LEN
//!  32  flags          4  bit 0: stale (loaded from disk, not yet confirmed by a controller)
//!  36  header_len     4  = HEADER_LEN
//!  40  reserved       8  zero
//!  48  snapshot       the encoded snapshot (stackroute-snapshot format), validated by the agent
//! DIR/generation    16 bytes, never replaced, only rewritten in place through a shared mapping
//!   0  magic          8  b"\x89SRGEN1\n"
//!   8  generation     8  naturally aligned u64, stored atomically (release) after each rename
//! ```
//!
//! Reader protocol (the shim): map `DIR/generation` once, read-only. Before a lookup, load the
//! generation (acquire). If it differs from the generation of the mapping in hand, open
//! `DIR/snapshot`, map it, check the header ([`parse`]), and switch to it when its generation
//! is at least the one loaded (a smaller one means a rename raced the read: keep the old map and
//! retry on the next lookup). Old maps stay valid after a rename (the inode lives until unmapped),
//! so the switch can happen at leisure; a lookup costs one atomic load, no syscall. A new
//! generation with no `DIR/snapshot` means the agent withdrew it: drop the mapping. The agent
//! only ever publishes snapshots it has fully validated, and the generation never goes
//! backwards, also across agent restarts (the agent continues from the value in the file).

/// The Unix socket.
pub const SOCKET_FILE: &str = "agent.sock";
/// The published snapshot.
pub const SNAPSHOT_FILE: &str = "snapshot";
/// Where the next snapshot is written before the rename.
pub const SNAPSHOT_TMP_FILE: &str = ".snapshot.tmp";
/// The generation counter.
pub const GENERATION_FILE: &str = "generation";

/// First bytes of `DIR/snapshot`.
pub const MAGIC: [u8; 8] = *b"\x89SRPUB1\n";
/// First bytes of `DIR/generation`.
pub const GENERATION_MAGIC: [u8; 8] = *b"\x89SRGEN1\n";
/// Size of the `DIR/snapshot` header; the snapshot starts here (8-byte aligned in a map).
pub const HEADER_LEN: usize = 48;
/// Size of `DIR/generation`.
pub const GENERATION_LEN: usize = 16;
/// Offset of the `u64` generation in `DIR/generation`.
pub const GENERATION_OFFSET: usize = 8;
/// Flag bit: the snapshot is stale.
pub const FLAG_STALE: u32 = 1;

/// A parsed `DIR/snapshot` header and the snapshot bytes it frames (not yet validated as a
/// snapshot: pass [`Published::snapshot`] to `stackroute_snapshot::Snapshot::parse`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Published<'a> {
    /// The generation it was published as.
    pub generation: u64,
    /// The controller revision.
    pub revision: u64,
    /// Whether it is a persisted snapshot not yet confirmed by a controller.
    pub stale: bool,
    /// The encoded snapshot.
    pub snapshot: &'a [u8],
}

/// Why a published file was not accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublishedError {
    /// Shorter than its header.
    Truncated,
    /// Not a published snapshot (magic, or a header length this reader does not know).
    BadHeader,
    /// The length in the header does not match the file.
    LengthMismatch {
        /// Announced.
        header: u64,
        /// Present.
        actual: u64,
    },
}

impl std::fmt::Display for PublishedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated => f.write_str("published snapshot is shorter than its header"),
            Self::BadHeader => f.write_str("not a published stackroute snapshot (bad header)"),
            Self::LengthMismatch { header, actual } => write!(
                f,
                "published snapshot announces {header} bytes but holds {actual}"
            ),
        }
    }
}

impl std::error::Error for PublishedError {}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// The header of a `DIR/snapshot` file framing `snapshot_len` bytes.
pub fn encode_header(
    generation: u64,
    revision: u64,
    stale: bool,
    snapshot_len: usize,
) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..16].copy_from_slice(&generation.to_le_bytes());
    header[16..24].copy_from_slice(&revision.to_le_bytes());
    header[24..32].copy_from_slice(&(snapshot_len as u64).to_le_bytes());
    let flags = if stale { FLAG_STALE } else { 0 };
    header[32..36].copy_from_slice(&flags.to_le_bytes());
    header[36..40].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    header
}

/// Parses the contents of a `DIR/snapshot` file.
pub fn parse(bytes: &[u8]) -> Result<Published<'_>, PublishedError> {
    let (header, announced) = parse_header(bytes)?;
    let actual = (bytes.len() - HEADER_LEN) as u64;
    if announced != actual {
        return Err(PublishedError::LengthMismatch {
            header: announced,
            actual,
        });
    }
    Ok(Published {
        snapshot: &bytes[HEADER_LEN..],
        ..header
    })
}

/// The header of a `DIR/snapshot` file from its first [`HEADER_LEN`] bytes (with no snapshot),
/// and the snapshot length it announces: for a reader that only wants to know what is
/// published.
pub fn parse_header(bytes: &[u8]) -> Result<(Published<'_>, u64), PublishedError> {
    if bytes.len() < HEADER_LEN {
        return Err(PublishedError::Truncated);
    }
    if bytes[..8] != MAGIC || le32(bytes, 36) as usize != HEADER_LEN {
        return Err(PublishedError::BadHeader);
    }
    let header = Published {
        generation: le64(bytes, 8),
        revision: le64(bytes, 16),
        stale: le32(bytes, 32) & FLAG_STALE != 0,
        snapshot: &[],
    };
    Ok((header, le64(bytes, 24)))
}

/// The contents of a fresh `DIR/generation` file holding `generation`.
pub fn encode_generation(generation: u64) -> [u8; GENERATION_LEN] {
    let mut bytes = [0; GENERATION_LEN];
    bytes[..8].copy_from_slice(&GENERATION_MAGIC);
    bytes[8..].copy_from_slice(&generation.to_le_bytes());
    bytes
}

/// The generation held by the contents of a `DIR/generation` file, if it is one.
pub fn parse_generation(bytes: &[u8]) -> Option<u64> {
    (bytes.len() >= GENERATION_LEN && bytes[..8] == GENERATION_MAGIC)
        .then(|| le64(bytes, GENERATION_OFFSET))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_checks_length() {
        let mut file = encode_header(9, 42, true, 3).to_vec();
        file.extend([1, 2, 3]);
        let published = parse(&file).unwrap();
        assert_eq!(
            published,
            Published {
                generation: 9,
                revision: 42,
                stale: true,
                snapshot: &[1, 2, 3]
            }
        );
        assert!(
            !parse(&{
                let mut f = encode_header(1, 1, false, 0).to_vec();
                f.truncate(HEADER_LEN);
                f
            })
            .unwrap()
            .stale
        );
        assert_eq!(
            parse(&file[..file.len() - 1]),
            Err(PublishedError::LengthMismatch {
                header: 3,
                actual: 2
            })
        );
        assert_eq!(parse(&file[..10]), Err(PublishedError::Truncated));
        file[0] ^= 1;
        assert_eq!(parse(&file), Err(PublishedError::BadHeader));
    }

    #[test]
    fn generation_file_round_trips() {
        let bytes = encode_generation(77);
        assert_eq!(parse_generation(&bytes), Some(77));
        assert_eq!(parse_generation(&bytes[..15]), None);
        assert_eq!(parse_generation(&[0; 16]), None);
    }
}
