//! Byte layout of a snapshot, version 1. All integers are little-endian; IPv6 addresses are
//! 16 bytes in network order (so byte-wise order is numeric order); IPv4 addresses in the
//! address book are `u32` values. Nothing needs alignment, so a snapshot can be read straight
//! from a memory map.
//!
//! ```text
//! header (64 bytes)
//!   0  magic            8  b"\x89SRSNAP\n"
//!   8  crc32            4  CRC-32 (IEEE) of bytes 12..total_len
//!  12  version          2  = 1
//!  14  flags            2  = 0
//!  16  total_len        8
//!  24  revision         8  controller revision this snapshot was compiled at
//!  32  section_count    4
//!  36  own_node         4  index into NODES
//!  40  default stack    1  } the installation default, a TRANSPORTS record
//!  41  default cc       1  }
//!  42  reserved        22
//! section directory: section_count × {id u32, offset u32, len u32, record_size u32}
//! sections, each a packed array of fixed-size records (record_size 1 for byte blobs)
//! ```
//!
//! A string reference is `{offset u32, len u32}` into a string section. A range is
//! `{offset u32, len u32}` counted in records of the section it points into.

/// First eight bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"\x89SRSNAP\n";
/// The only version this crate reads and writes.
pub const VERSION: u16 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Size of one section directory entry.
pub const DIRECTORY_ENTRY_LEN: usize = 16;

pub(crate) const OFF_CRC: usize = 8;
pub(crate) const OFF_VERSION: usize = 12;
pub(crate) const OFF_TOTAL_LEN: usize = 16;
pub(crate) const OFF_REVISION: usize = 24;
pub(crate) const OFF_SECTION_COUNT: usize = 32;
pub(crate) const OFF_OWN_NODE: usize = 36;
pub(crate) const OFF_DEFAULT_TRANSPORT: usize = 40;

/// Section identifiers and their record sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum SectionId {
    /// UTF-8 strings shared by every node: node and zone names.
    SharedStrings = 1,
    /// Zone names: `{name str}`.
    Zones = 2,
    /// Nodes, indexed by node id: `{name str, zone u32}`.
    Nodes = 3,
    /// Configured cluster networks: CIDR records.
    ClusterNetworks = 4,
    /// IPv4 address book, sorted by address: `{ip u32, kind u8, pad 3, identity u32, node u32}`.
    Addresses4 = 5,
    /// IPv6 address book, sorted by address: `{ip [16], kind u8, pad 3, identity u32, node u32}`.
    Addresses6 = 6,
    /// Service frontends, sorted by (ip, port, protocol):
    /// `{ip [16], family u8, protocol u8, port u16, backends range}`.
    Services = 7,
    /// Service backends: `{ip [16], family u8, pad 1, port u16}`.
    Backends = 8,
    /// Identity sets: sorted runs of `u32` identity ids.
    IdentitySets = 9,
    /// CIDRs named by rules: CIDR records.
    Networks = 10,
    /// Rule peers: `{kind u8, entity u8, pad 2, range}`.
    Peers = 11,
    /// Rule ports: `{protocol u8, pad 1, first u16, last u16, pad 2}`.
    Ports = 12,
    /// Transport lists: `{stack u8, congestion control u8}`.
    Transports = 13,
    /// Rules: see [`RULE_LEN`].
    Rules = 14,
    /// Policies: `{kind u8, tier u8, priority u16, namespace str, name str, rules range,
    /// first port u16, last port u16, protocol mask u8, filter flags u8, location mask u8, pad 1,
    /// identity bloom [32]}`.
    /// The last fields summarise the rules so a lookup can skip a policy none of whose rules can
    /// match: the ports all rules together cover, and — when every rule names only pods peers —
    /// a 256-bit Bloom filter of the identities those peers select. See [`POLICY_LEN`].
    Policies = 15,
    /// Chains: a range of CHAIN_POLICIES.
    Chains = 16,
    /// Policy indexes of every chain, in evaluation order.
    ChainPolicies = 17,
    /// Workloads on this node, sorted by (namespace, name):
    /// `{namespace str, name str, chain u32, reserved u32, address count u32}`; the addresses
    /// themselves are in `WorkloadAddresses`.
    Workloads = 18,
    /// Workload addresses, sorted by ip: `{ip [16], family u8, pad 3, workload u32}`.
    WorkloadAddresses = 19,
    /// UTF-8 strings of this node: policy, rule, namespace and workload names.
    NodeStrings = 20,
}

impl SectionId {
    /// Every section, in the order they are written.
    pub const ALL: [Self; 20] = [
        Self::SharedStrings,
        Self::Zones,
        Self::Nodes,
        Self::ClusterNetworks,
        Self::Addresses4,
        Self::Addresses6,
        Self::Services,
        Self::Backends,
        Self::IdentitySets,
        Self::Networks,
        Self::Peers,
        Self::Ports,
        Self::Transports,
        Self::Rules,
        Self::Policies,
        Self::Chains,
        Self::ChainPolicies,
        Self::Workloads,
        Self::WorkloadAddresses,
        Self::NodeStrings,
    ];

    /// Size of one record of this section.
    pub const fn record_len(self) -> usize {
        match self {
            Self::SharedStrings | Self::NodeStrings => 1,
            Self::Zones => 8,
            Self::Nodes => 12,
            Self::ClusterNetworks | Self::Networks => CIDR_LEN,
            Self::Addresses4 => 16,
            Self::Addresses6 => 28,
            Self::Services => 28,
            Self::Backends => 20,
            Self::IdentitySets => 4,
            Self::Peers => 12,
            Self::Ports => 8,
            Self::Transports => 2,
            Self::Rules => RULE_LEN,
            Self::Policies => POLICY_LEN,
            Self::Chains => 8,
            Self::ChainPolicies => 4,
            Self::Workloads => 28,
            Self::WorkloadAddresses => 24,
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// CIDR record: `{ip [16], family u8 (4 or 6), prefix u8, pad 2}`; IPv4 uses the first 4 bytes.
pub const CIDR_LEN: usize = 20;

/// Rule record:
/// `{name str 8, action u8, location u8, isolation u8, flags u8, peers range 8, ports range 8,
///   transports range 8, first port u16, last port u16, protocol mask u8, pad 3}` = 44 bytes.
/// Flag bit 0: the rule has `to`; bit 1: it has `ports`. The port span and protocol mask cover
/// all of the rule's port entries, so most port mismatches are found without reading them.
pub const RULE_LEN: usize = 44;
pub(crate) const RULE_HAS_PEERS: u8 = 1;
pub(crate) const RULE_HAS_PORTS: u8 = 2;

/// Policy record length (see [`SectionId::Policies`]).
pub const POLICY_LEN: usize = 68;
/// Policy filter flag: every rule has `to` and every peer is a pods peer.
pub(crate) const POLICY_PODS_ONLY: u8 = 1;
/// Policy location mask: set when the mask of admitted locations (bits 0–3) is present.
pub(crate) const POLICY_LOCATIONS_PRESENT: u8 = 0x10;
/// Size of a policy's identity Bloom filter.
pub(crate) const BLOOM_BYTES: usize = 32;

/// The two bit positions of an identity in a 256-bit Bloom filter.
pub(crate) fn bloom_bits(identity: u32) -> [usize; 2] {
    [
        (identity.wrapping_mul(0x9E37_79B1) >> 24) as usize,
        (identity.wrapping_mul(0x85EB_CA77).rotate_left(13) >> 24) as usize,
    ]
}

/// Peer kinds.
pub(crate) const PEER_PODS: u8 = 0;
pub(crate) const PEER_NETWORKS: u8 = 1;
pub(crate) const PEER_ENTITY: u8 = 2;

/// Address kinds.
pub(crate) const ADDRESS_POD: u8 = 0;
pub(crate) const ADDRESS_NODE: u8 = 1;
