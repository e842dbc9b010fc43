//! Byte layout of a snapshot, version 3. All integers are little-endian; IPv6 addresses are
//! 16 bytes in network order (so byte-wise order is numeric order); IPv4 addresses in the
//! address book are `u32` values. Nothing needs alignment, so a snapshot can be read straight
//! from a memory map.
//!
//! ```text
//! header (64 bytes, fields in [`header`])
//!   0  magic            8  b"\x89SRSNAP\n"
//!   8  crc32            4  CRC-32 (IEEE) of bytes 12..total_len
//!  12  version          2  = 3
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
//! Every record's fields are named once, in a module per record type below ([`header`],
//! [`directory`], [`zone`], [`node`], [`cidr`], [`address4`], [`address6`], [`service`],
//! [`backend`], [`identity_set`], [`identity_set_range`], [`peer`], [`port`], [`transport`], [`rule`],
//! [`rule_filter`], [`policy`], [`policy_filter`], [`chain`], [`chain_policy`], [`workload`],
//! [`workload_address`]); the reader and the encoder go through those names, never through
//! offsets, and each module's `LEN` is its section's record size. Unnamed bytes are padding,
//! written as zero.
//!
//! A string reference ([`Str`]) is `{offset u32, len u32}` into a string section. A range
//! ([`Range`]) is `{offset u32, len u32}` counted in records of the section it points into.

/// First eight bytes of every snapshot.
pub const MAGIC: [u8; 8] = *b"\x89SRSNAP\n";
/// The only version this crate reads and writes. Version 2: rule peers name identity sets by
/// number (`IdentitySetRanges`), so a set that grows moves no peer. Version 3: Service backends
/// name their address instead of repeating it (the address book's entry, or `EndpointAddresses`
/// for an address outside it).
pub const VERSION: u16 = 3;
/// Size of the fixed header.
pub const HEADER_LEN: usize = header::LEN;
/// Size of one section directory entry.
pub const DIRECTORY_ENTRY_LEN: usize = directory::LEN;
/// The CRC-32 (IEEE) a snapshot's header must hold: of every byte after the checksum field
/// ([`header::CHECKSUMMED_FROM`] to the end).
pub fn checksum(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes.get(header::CHECKSUMMED_FROM..).unwrap_or_default())
}

/// Makes the header agree with the bytes: writes `total_len` (the slice's length) and then the
/// checksum over everything after it. The encoder's last step; tests and fuzzers call it after
/// editing a snapshot so the edit gets past those two cheap checks. Bytes shorter than the
/// header are left as they are (they can never parse).
pub fn seal(bytes: &mut [u8]) {
    if bytes.len() < HEADER_LEN {
        return;
    }
    header::TOTAL_LEN.put(bytes, bytes.len() as u64);
    let crc = checksum(bytes);
    header::CRC.put(bytes, crc);
}

/// A byte at a fixed offset of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct U8(pub usize);

impl U8 {
    /// The byte; 0 when `record` is too short to hold it (an out-of-range index reads an empty
    /// record; a validated section holds whole records).
    #[inline]
    pub fn get(self, record: &[u8]) -> u8 {
        record.get(self.0).copied().unwrap_or(0)
    }

    /// The byte decoded as an enum (`from_byte`), or `default` when it is unknown or the record
    /// is too short (neither happens to a record of a validated snapshot).
    #[inline]
    pub fn decode_or<T>(
        self,
        record: &[u8],
        from_byte: impl FnOnce(u8) -> Option<T>,
        default: T,
    ) -> T {
        record
            .get(self.0)
            .and_then(|b| from_byte(*b))
            .unwrap_or(default)
    }

    /// Stores `value`. Panics when `record` is too short: only the encoder writes, into
    /// records of their section's length.
    #[inline]
    pub fn put(self, record: &mut [u8], value: u8) {
        record[self.0] = value;
    }
}

macro_rules! int_field {
    ($(#[$meta:meta])* $name:ident: $ty:ty) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name(pub usize);

        impl $name {
            /// The value; 0 when `record` is too short to hold it (an out-of-range index reads
            /// an empty record; a validated section holds whole records).
            #[inline]
            pub fn get(self, record: &[u8]) -> $ty {
                record
                    .get(self.0..self.0 + size_of::<$ty>())
                    .and_then(|bytes| bytes.try_into().ok())
                    .map_or(0, <$ty>::from_le_bytes)
            }

            /// Stores `value`. Panics when `record` is too short: only the encoder writes, into
            /// records of their section's length.
            #[inline]
            pub fn put(self, record: &mut [u8], value: $ty) {
                record[self.0..self.0 + size_of::<$ty>()].copy_from_slice(&value.to_le_bytes());
            }
        }
    };
}

int_field!(
    /// A little-endian `u16` at a fixed offset of a record.
    U16: u16
);
int_field!(
    /// A little-endian `u32` at a fixed offset of a record.
    U32: u32
);
int_field!(
    /// A little-endian `u64` at a fixed offset of a record.
    U64: u64
);
int_field!(
    /// A little-endian `u128` at a fixed offset of a record.
    U128: u128
);

/// `N` bytes stored as they are (an address in network order, the magic) at a fixed offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bytes<const N: usize>(pub usize);

impl<const N: usize> Bytes<N> {
    /// A copy of the bytes; zeros when `record` is too short to hold them.
    #[inline]
    pub fn get(self, record: &[u8]) -> [u8; N] {
        self.slice(record).try_into().unwrap_or([0; N])
    }

    /// The bytes in place; empty when `record` is too short to hold them.
    #[inline]
    pub fn slice(self, record: &[u8]) -> &[u8] {
        record.get(self.0..self.0 + N).unwrap_or_default()
    }

    /// Stores `value`. Panics when `record` is too short.
    #[inline]
    pub fn put(self, record: &mut [u8], value: &[u8; N]) {
        record[self.0..self.0 + N].copy_from_slice(value);
    }
}

macro_rules! reference_field {
    ($(#[$meta:meta])* $name:ident, $target:ident, $unit:literal) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct $name {
            /// Offset of the `offset u32`; the `len u32` follows it.
            pub at: usize,
            /// The section it points into.
            pub $target: SectionId,
        }

        impl $name {
            /// A reference at `at` into `target`.
            pub const fn new(at: usize, target: SectionId) -> Self {
                Self { at, $target: target }
            }

            #[doc = concat!("`(offset, len)`, counted in ", $unit, "; zeros when `record` is too short.")]
            #[inline]
            pub fn get(self, record: &[u8]) -> (u32, u32) {
                (U32(self.at).get(record), U32(self.at + 4).get(record))
            }

            /// Stores `(offset, len)` (as `u32`s). Panics when `record` is too short.
            #[inline]
            pub fn put(self, record: &mut [u8], offset: usize, len: usize) {
                U32(self.at).put(record, offset as u32);
                U32(self.at + 4).put(record, len as u32);
            }
        }
    };
}

reference_field!(
    /// A string reference: `{offset u32, len u32}` in bytes of a string section.
    Str, table, "bytes"
);
reference_field!(
    /// A range: `{offset u32, len u32}` in records of the section it points into.
    Range, target, "records of the target section"
);

/// Section identifiers and their record sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum SectionId {
    /// UTF-8 strings shared by every node: node and zone names.
    SharedStrings = 1,
    /// Zone names: [`zone`].
    Zones = 2,
    /// Nodes, indexed by node id: [`node`].
    Nodes = 3,
    /// Configured cluster networks: [`cidr`] records.
    ClusterNetworks = 4,
    /// IPv4 address book, an open-addressing hash table of [`address4`] slots, kind
    /// [`EMPTY_SLOT`] for a free one. An address sits in the first free slot at or after
    /// [`address4_slot`] (linear probing, wrapping at the end); about three quarters of the
    /// slots are used ([`address4_slots`]). A lookup reads one or two cache lines of one page,
    /// where a binary search over 100,000 addresses reads 17 lines of 17 pages.
    Addresses4 = 5,
    /// IPv6 address book, sorted by address: [`address6`].
    Addresses6 = 6,
    /// Service frontends, sorted by (ip, port, protocol): [`service`].
    Services = 7,
    /// Service backends: [`backend`].
    Backends = 8,
    /// Backend addresses outside the address book: [`endpoint_address`].
    EndpointAddresses = 31,
    /// Identity sets: sorted runs of [`identity_set`] records.
    IdentitySets = 9,
    /// Where each identity set lies in `IdentitySets`, by set number: [`identity_set_range`].
    IdentitySetRanges = 24,
    /// CIDRs named by rules: [`cidr`] records.
    Networks = 10,
    /// Rule peers: [`peer`].
    Peers = 11,
    /// Rule ports: [`port`].
    Ports = 12,
    /// Transport lists: [`transport`].
    Transports = 13,
    /// Rules: [`rule`].
    Rules = 14,
    /// Policies: [`policy`]. Local policy numbers follow the global evaluation order, so every
    /// chain ascends through this section and the rule sections. A lookup reads only
    /// `PolicyFilters`.
    Policies = 15,
    /// Chains: [`chain`].
    Chains = 16,
    /// Policy indexes of every chain, in evaluation order: [`chain_policy`].
    ChainPolicies = 17,
    /// Workloads on this node, sorted by (namespace, name): [`workload`]; their addresses are
    /// in `WorkloadAddresses`.
    Workloads = 18,
    /// Workload addresses, sorted by (family, ip): [`workload_address`].
    WorkloadAddresses = 19,
    /// UTF-8 strings of this node: policy, rule, namespace and workload names.
    NodeStrings = 20,
    /// One prefilter per rule, parallel to `Rules`: [`rule_filter`].
    RuleFilters = 21,
    /// One summary per policy, parallel to `Policies`: [`policy_filter`].
    PolicyFilters = 23,
    /// One record per chain, parallel to `Chains`: [`chain_index`]. This and the next three
    /// sections are optional (absent: no chain is indexed), so readers that predate them
    /// ignore them and walk every chain rule by rule.
    ChainIndexes = 25,
    /// Per indexed chain, the rules each identity's pods may match: [`index_identity`].
    IndexIdentities = 26,
    /// Per indexed chain, the IPv4 space cut where its CIDRs begin and end: [`index_interval`].
    IndexIntervals = 27,
    /// Rule positions named by the index, ascending within each list: [`index_posting`].
    IndexPostings = 28,
    /// What a chain's workloads get for each Service frontend: rows of [`service_verdict`]
    /// records, one per `Services` record; chains that decide every Service alike share a row.
    /// Optional and derived, with the next: the controller never sends them; the node agent
    /// adds them ([`crate::Snapshot::with_service_verdicts`]) to the snapshot it publishes for
    /// the shim, so a connection to a ClusterIP reads a record instead of deciding backends.
    ServiceVerdicts = 29,
    /// Each chain's row of `ServiceVerdicts`, parallel to `Chains`: [`service_verdict_row`].
    ServiceVerdictRows = 30,
}

impl SectionId {
    /// Every section, in the order they are written.
    pub const ALL: [Self; 30] = [
        Self::SharedStrings,
        Self::Zones,
        Self::Nodes,
        Self::ClusterNetworks,
        Self::Addresses4,
        Self::Addresses6,
        Self::Services,
        Self::Backends,
        Self::EndpointAddresses,
        Self::IdentitySets,
        Self::IdentitySetRanges,
        Self::Networks,
        Self::Peers,
        Self::Ports,
        Self::Transports,
        Self::Rules,
        Self::RuleFilters,
        Self::Policies,
        Self::PolicyFilters,
        Self::Chains,
        Self::ChainPolicies,
        Self::ChainIndexes,
        Self::IndexIdentities,
        Self::IndexIntervals,
        Self::IndexPostings,
        Self::Workloads,
        Self::WorkloadAddresses,
        Self::NodeStrings,
        Self::ServiceVerdicts,
        Self::ServiceVerdictRows,
    ];

    /// Size of one record of this section.
    pub const fn record_len(self) -> usize {
        match self {
            Self::SharedStrings | Self::NodeStrings => STRING_RECORD_LEN,
            Self::Zones => zone::LEN,
            Self::Nodes => node::LEN,
            Self::ClusterNetworks | Self::Networks => cidr::LEN,
            Self::Addresses4 => address4::LEN,
            Self::Addresses6 => address6::LEN,
            Self::Services => service::LEN,
            Self::Backends => backend::LEN,
            Self::EndpointAddresses => endpoint_address::LEN,
            Self::IdentitySets => identity_set::LEN,
            Self::IdentitySetRanges => identity_set_range::LEN,
            Self::Peers => peer::LEN,
            Self::Ports => port::LEN,
            Self::Transports => transport::LEN,
            Self::Rules => rule::LEN,
            Self::RuleFilters => rule_filter::LEN,
            Self::PolicyFilters => policy_filter::LEN,
            Self::Policies => policy::LEN,
            Self::Chains => chain::LEN,
            Self::ChainPolicies => chain_policy::LEN,
            Self::ChainIndexes => chain_index::LEN,
            Self::IndexIdentities => index_identity::LEN,
            Self::IndexIntervals => index_interval::LEN,
            Self::IndexPostings => index_posting::LEN,
            Self::Workloads => workload::LEN,
            Self::WorkloadAddresses => workload_address::LEN,
            Self::ServiceVerdicts => service_verdict::LEN,
            Self::ServiceVerdictRows => service_verdict_row::LEN,
        }
    }

    /// Whether a snapshot may leave the section out (it is then empty).
    pub const fn is_optional(self) -> bool {
        matches!(
            self,
            Self::ChainIndexes
                | Self::IndexIdentities
                | Self::IndexIntervals
                | Self::IndexPostings
                | Self::ServiceVerdicts
                | Self::ServiceVerdictRows
        )
    }

    /// The section with directory id `id`, if this version knows it.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| *s as u32 == id)
    }

    /// The section's name in errors and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::SharedStrings => "shared-strings",
            Self::Zones => "zones",
            Self::Nodes => "nodes",
            Self::ClusterNetworks => "cluster-networks",
            Self::Addresses4 => "addresses4",
            Self::Addresses6 => "addresses6",
            Self::Services => "services",
            Self::Backends => "backends",
            Self::EndpointAddresses => "endpoint-addresses",
            Self::IdentitySets => "identity-sets",
            Self::IdentitySetRanges => "identity-set-ranges",
            Self::Networks => "networks",
            Self::Peers => "peers",
            Self::Ports => "ports",
            Self::Transports => "transports",
            Self::Rules => "rules",
            Self::Policies => "policies",
            Self::Chains => "chains",
            Self::ChainPolicies => "chain-policies",
            Self::ChainIndexes => "chain-indexes",
            Self::IndexIdentities => "index-identities",
            Self::IndexIntervals => "index-intervals",
            Self::IndexPostings => "index-postings",
            Self::Workloads => "workloads",
            Self::WorkloadAddresses => "workload-addresses",
            Self::NodeStrings => "node-strings",
            Self::RuleFilters => "rule-filters",
            Self::PolicyFilters => "policy-filters",
            Self::ServiceVerdicts => "service-verdicts",
            Self::ServiceVerdictRows => "service-verdict-rows",
        }
    }

    pub(crate) fn index(self) -> usize {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }
}

/// Record size of the string sections: byte blobs.
pub const STRING_RECORD_LEN: usize = 1;

/// The fixed header at the start of every snapshot.
pub mod header {
    use super::{Bytes, U16, U32, U64};

    /// [`super::MAGIC`].
    pub const MAGIC: Bytes<8> = Bytes(0);
    /// CRC-32 (IEEE) of bytes [`CHECKSUMMED_FROM`]`..total_len`: see [`super::checksum`].
    pub const CRC: U32 = U32(8);
    /// [`super::VERSION`].
    pub const VERSION: U16 = U16(12);
    /// Always 0 in version 1.
    pub const FLAGS: U16 = U16(14);
    /// Length of the whole snapshot.
    pub const TOTAL_LEN: U64 = U64(16);
    /// Controller revision this snapshot was compiled at.
    pub const REVISION: U64 = U64(24);
    /// Entries in the section directory, which follows the header.
    pub const SECTION_COUNT: U32 = U32(32);
    /// This node: an index into `Nodes`.
    pub const OWN_NODE: U32 = U32(36);
    /// The installation default when no rule matches: a [`super::transport`] record.
    pub const DEFAULT_TRANSPORT: Bytes<2> = Bytes(40);
    /// Where the checksummed bytes begin: everything after the CRC field.
    pub const CHECKSUMMED_FROM: usize = VERSION.0;
    /// Header length; bytes 42..64 are reserved (zero).
    pub const LEN: usize = 64;
}

/// A section directory entry.
pub mod directory {
    use super::U32;

    /// The section's [`super::SectionId`]; unknown ids are skipped by readers.
    pub const ID: U32 = U32(0);
    /// Offset of the section from the start of the snapshot.
    pub const OFFSET: U32 = U32(4);
    /// Section length in bytes.
    pub const SIZE: U32 = U32(8);
    /// Record length, [`super::SectionId::record_len`].
    pub const RECORD_SIZE: U32 = U32(12);
    /// Entry length.
    pub const LEN: usize = 16;
}

/// A zone (`Zones`).
pub mod zone {
    use super::{SectionId, Str};

    /// Zone name.
    pub const NAME: Str = Str::new(0, SectionId::SharedStrings);
    /// Record length.
    pub const LEN: usize = 8;
}

/// A node (`Nodes`).
pub mod node {
    use super::{SectionId, Str, U32};

    /// Node name.
    pub const NAME: Str = Str::new(0, SectionId::SharedStrings);
    /// Index into `Zones`, or [`crate::NO_ZONE`].
    pub const ZONE: U32 = U32(8);
    /// Record length.
    pub const LEN: usize = 12;
}

/// A CIDR (`ClusterNetworks`, `Networks`).
pub mod cidr {
    use super::{Bytes, U8};

    /// Network address; IPv4 in the first 4 bytes, the rest zero.
    pub const IP: Bytes<16> = Bytes(0);
    /// 4 or 6.
    pub const FAMILY: U8 = U8(16);
    /// Prefix length.
    pub const PREFIX: U8 = U8(17);
    /// Record length (2 bytes of padding).
    pub const LEN: usize = 20;
}

/// A slot of the IPv4 address book (`Addresses4`).
pub mod address4 {
    use super::{U8, U32};

    /// The address as a number.
    pub const IP: U32 = U32(0);
    /// `ADDRESS_POD`, `ADDRESS_NODE`, or [`super::EMPTY_SLOT`].
    pub const KIND: U8 = U8(4);
    /// Identity of a pod; [`crate::NO_IDENTITY`] for a node.
    pub const IDENTITY: U32 = U32(8);
    /// Index into `Nodes`.
    pub const NODE: U32 = U32(12);
    /// Record length.
    pub const LEN: usize = 16;
}

/// An entry of the IPv6 address book (`Addresses6`).
pub mod address6 {
    use super::{Bytes, U8, U32};

    /// The address.
    pub const IP: Bytes<16> = Bytes(0);
    /// `ADDRESS_POD` or `ADDRESS_NODE`.
    pub const KIND: U8 = U8(16);
    /// Identity of a pod; [`crate::NO_IDENTITY`] for a node.
    pub const IDENTITY: U32 = U32(20);
    /// Index into `Nodes`.
    pub const NODE: U32 = U32(24);
    /// Record length.
    pub const LEN: usize = 28;
}

/// A Service frontend (`Services`).
pub mod service {
    use super::{Bytes, Range, SectionId, U8, U16};

    /// ClusterIP; IPv4 in the first 4 bytes.
    pub const IP: Bytes<16> = Bytes(0);
    /// 4 or 6.
    pub const FAMILY: U8 = U8(16);
    /// [`crate::Protocol`].
    pub const PROTOCOL: U8 = U8(17);
    /// Service port.
    pub const PORT: U16 = U16(18);
    /// Its ready backends.
    pub const BACKENDS: Range = Range::new(20, SectionId::Backends);
    /// Record length.
    pub const LEN: usize = 28;
}

/// A Service backend (`Backends`): its address by reference — the address book's entry, or
/// for an address outside the book an `EndpointAddresses` record — and what a lookup groups
/// backends by: identity, node and zone, as the address book says of a pod backend
/// ([`crate::NO_IDENTITY`], [`NO_NODE`], [`crate::NO_ZONE`] for any other address). Each
/// Service's backends are sorted by (identity, port, zone, node, family, address), so pod
/// backends that only differ in where they run form runs a lookup can decide once per location.
pub mod backend {
    use super::{U8, U16, U32};

    /// Where `ADDRESS` points: [`IN_ADDRESSES4`], [`IN_ADDRESSES6`] or [`IN_ENDPOINTS`] (byte 1
    /// is padding).
    pub const SOURCE: U8 = U8(0);
    /// Target port.
    pub const PORT: U16 = U16(2);
    /// The address: a slot of `Addresses4`, a record of `Addresses6` or of `EndpointAddresses`.
    pub const ADDRESS: U32 = U32(4);
    /// Identity of a pod backend.
    pub const IDENTITY: U32 = U32(8);
    /// Node of a pod backend.
    pub const NODE: U32 = U32(12);
    /// Zone of that node.
    pub const ZONE: U32 = U32(16);
    /// Record length.
    pub const LEN: usize = 20;

    /// `ADDRESS` is a slot of `Addresses4`.
    pub const IN_ADDRESSES4: u8 = 0;
    /// `ADDRESS` is a record of `Addresses6`.
    pub const IN_ADDRESSES6: u8 = 1;
    /// `ADDRESS` is a record of `EndpointAddresses`.
    pub const IN_ENDPOINTS: u8 = 2;
}

/// A backend address the address book does not hold (`EndpointAddresses`), sorted by (family,
/// address) and each once.
pub mod endpoint_address {
    use super::{Bytes, U8};

    /// Address; IPv4 in the first 4 bytes.
    pub const IP: Bytes<16> = Bytes(0);
    /// 4 or 6.
    pub const FAMILY: U8 = U8(16);
    /// Record length.
    pub const LEN: usize = 20;
}

/// One identity of an identity set (`IdentitySets`).
pub mod identity_set {
    use super::U32;

    /// Identity id.
    pub const IDENTITY: U32 = U32(0);
    /// Record length.
    pub const LEN: usize = 4;
}

/// Where one identity set lies (`IdentitySetRanges`, indexed by set number).
pub mod identity_set_range {
    use super::{Range, SectionId};

    /// The set's identities, ascending.
    pub const MEMBERS: Range = Range::new(0, SectionId::IdentitySets);
    /// Record length.
    pub const LEN: usize = 8;
}

/// A rule peer (`Peers`).
pub mod peer {
    use super::{Range, SectionId, U8, U32};

    /// `PEER_PODS`, `PEER_NETWORKS` or `PEER_ENTITY`.
    pub const KIND: U8 = U8(0);
    /// [`crate::Entity`] of an entity peer (bytes 2–3 are padding).
    pub const ENTITY: U8 = U8(1);
    /// A pods peer's identity set: its number in `IdentitySetRanges` (bytes 8–11 are zero).
    /// A number, not a range, so a set that grows leaves every peer as it was.
    pub const IDENTITY_SET: U32 = U32(4);
    /// A networks peer's CIDRs (the same bytes as [`IDENTITY_SET`]; empty for an entity peer).
    pub const NETWORKS: Range = Range::new(4, SectionId::Networks);
    /// Record length.
    pub const LEN: usize = 12;
}

/// A rule's port range (`Ports`).
pub mod port {
    use super::{U8, U16};

    /// [`crate::Protocol`] (byte 1 is padding).
    pub const PROTOCOL: U8 = U8(0);
    /// First port.
    pub const FIRST: U16 = U16(2);
    /// Last port, inclusive (bytes 6–7 are padding).
    pub const LAST: U16 = U16(4);
    /// Record length.
    pub const LEN: usize = 8;
}

/// One entry of a transport list (`Transports`, and the header's default).
pub mod transport {
    use super::U8;

    /// [`crate::Stack`].
    pub const STACK: U8 = U8(0);
    /// [`crate::CongestionControl`].
    pub const CONGESTION_CONTROL: U8 = U8(1);
    /// Record length.
    pub const LEN: usize = 2;
}

/// A rule (`Rules`). The port span and protocol mask cover all of the rule's port entries, so
/// most port mismatches are found without reading them.
pub mod rule {
    use super::{Range, SectionId, Str, U8, U16};

    /// Rule name.
    pub const NAME: Str = Str::new(0, SectionId::NodeStrings);
    /// [`crate::Action`].
    pub const ACTION: U8 = U8(8);
    /// [`crate::LocationMatch`].
    pub const LOCATION: U8 = U8(9);
    /// [`crate::Isolation`].
    pub const ISOLATION: U8 = U8(10);
    /// Bit 0: the rule has `to`; bit 1: it has `ports`. Bits 2–4 record what the
    /// controller's NetworkPolicy gate did to the rule ([`crate::RuleGate`]); they never change
    /// a lookup (the transports list already says what is left), only what `explain` reports,
    /// and readers that predate them ignore them.
    pub const FLAGS: U8 = U8(11);
    /// Destination peers.
    pub const PEERS: Range = Range::new(12, SectionId::Peers);
    /// Destination port ranges.
    pub const PORTS: Range = Range::new(20, SectionId::Ports);
    /// The transport, then its fallbacks.
    pub const TRANSPORTS: Range = Range::new(28, SectionId::Transports);
    /// Lowest port of any port entry (0 without `ports`).
    pub const FIRST_PORT: U16 = U16(36);
    /// Highest port of any port entry (65535 without `ports`).
    pub const LAST_PORT: U16 = U16(38);
    /// Protocol mask of the port entries (0xff without `ports`; bytes 41–43 are padding).
    pub const PROTOCOLS: U8 = U8(40);
    /// Record length.
    pub const LEN: usize = 44;
}

/// A rule's prefilter (`RuleFilters`), one per rule in the same order as `Rules`.
///
/// Everything a lookup needs to reject a rule sits in one small record, so the shim's walk of a
/// chain reads 24 contiguous bytes per rule instead of following the rule's peer, port and
/// identity-set ranges. A filter only ever rejects rules that cannot match; whatever passes is
/// checked in full. Location masks use bit n for [`crate::Location`] n. `Snapshot::parse`
/// recomputes every filter and rejects a snapshot whose filters differ, so a lookup can trust
/// them.
pub mod rule_filter {
    use super::{U8, U16, U32, U64};

    /// The rule's port span ([`super::rule::FIRST_PORT`]).
    pub const FIRST_PORT: U16 = U16(0);
    /// [`super::rule::LAST_PORT`].
    pub const LAST_PORT: U16 = U16(2);
    /// [`super::rule::PROTOCOLS`].
    pub const PROTOCOLS: U8 = U8(4);
    /// Locations the rule's `location` admits.
    pub const LOCATIONS: U8 = U8(5);
    /// Locations where the rule's peers admit any address (no `to`, or an `entity` peer).
    pub const OPEN_LOCATIONS: U8 = U8(6);
    /// [`super::FILTER_PODS`], [`super::FILTER_NETWORKS4`], [`super::FILTER_NETWORKS6`].
    pub const PEER_KINDS: U8 = U8(7);
    /// Bloom filter of the identities of every pods peer ([`super::rule_bloom_mask`]).
    pub const BLOOM: U64 = U64(8);
    /// Lowest IPv4 address of any IPv4 CIDR of the networks peers.
    pub const V4_FIRST: U32 = U32(16);
    /// Highest such address.
    pub const V4_LAST: U32 = U32(20);
    /// Record length.
    pub const LEN: usize = 24;
}

/// A policy (`Policies`).
pub mod policy {
    use super::{Range, SectionId, Str, U8, U16};

    /// [`crate::PolicyKind`].
    pub const KIND: U8 = U8(0);
    /// [`crate::Tier`].
    pub const TIER: U8 = U8(1);
    /// `spec.priority`.
    pub const PRIORITY: U16 = U16(2);
    /// Namespace (empty for a ClusterStackRoute).
    pub const NAMESPACE: Str = Str::new(4, SectionId::NodeStrings);
    /// Name.
    pub const NAME: Str = Str::new(12, SectionId::NodeStrings);
    /// Its rules, in order.
    pub const RULES: Range = Range::new(20, SectionId::Rules);
    /// Record length.
    pub const LEN: usize = 28;
}

/// A policy's summary (`PolicyFilters`), one per policy in the same order as `Policies`.
///
/// Everything a lookup reads to walk past a policy: its rules (a range of `Rules` and
/// `RuleFilters`), its tier (a Pass ends the tier), and a summary of its rules — the ports they
/// cover together, the locations they admit, and, when every rule names only pods peers
/// ([`POLICY_PODS_ONLY`]), a 128-bit Bloom filter of the identities those peers select
/// ([`policy_bloom_mask`]). 1,000 policies take 32 KB, small enough to stay in cache
/// between lookups, where the full policy records would not.
pub mod policy_filter {
    use super::{Range, SectionId, U8, U16, U128};

    /// The policy's rules (and their filters, which are parallel).
    pub const RULES: Range = Range::new(0, SectionId::Rules);
    /// Lowest port any rule covers.
    pub const FIRST_PORT: U16 = U16(8);
    /// Highest port any rule covers.
    pub const LAST_PORT: U16 = U16(10);
    /// Protocol mask of every rule.
    pub const PROTOCOLS: U8 = U8(12);
    /// [`super::POLICY_PODS_ONLY`].
    pub const FLAGS: U8 = U8(13);
    /// Locations some rule admits.
    pub const LOCATIONS: U8 = U8(14);
    /// [`crate::Tier`] of the policy.
    pub const TIER: U8 = U8(15);
    /// Bloom filter of the identities of every pods peer.
    pub const BLOOM: U128 = U128(16);
    /// Record length.
    pub const LEN: usize = 32;
}

/// A chain (`Chains`): the policies a workload walks.
pub mod chain {
    use super::{Range, SectionId};

    /// Its policies, in evaluation order.
    pub const POLICIES: Range = Range::new(0, SectionId::ChainPolicies);
    /// Record length.
    pub const LEN: usize = 8;
}

/// One policy of a chain (`ChainPolicies`).
pub mod chain_policy {
    use super::U32;

    /// Index into `Policies` (and `PolicyFilters`).
    pub const POLICY: U32 = U32(0);
    /// Record length.
    pub const LEN: usize = 4;
}

/// The index of one chain (`ChainIndexes`, parallel to `Chains`): for an IPv4 destination,
/// the only rules of the chain that can match are those it names under the destination's
/// identity, under the interval holding its address, and the rules any destination may match.
/// Built for long chains only (see `chain_index`); a reader rebuilds it from the rules and
/// refuses a snapshot whose index differs.
pub mod chain_index {
    use super::{Range, SectionId, U32};

    /// 1 when the chain is indexed, else 0 (and every range empty).
    pub const INDEXED: U32 = U32(0);
    /// Rules any destination may match: no `to`, or an entity peer.
    pub const ALWAYS: Range = Range::new(4, SectionId::IndexPostings);
    /// The identities its pods peers hold, ascending.
    pub const IDENTITIES: Range = Range::new(12, SectionId::IndexIdentities);
    /// The IPv4 space cut into intervals where its CIDRs begin and end, ascending, the first
    /// at 0.0.0.0.
    pub const INTERVALS: Range = Range::new(20, SectionId::IndexIntervals);
    /// Record length.
    pub const LEN: usize = 28;
}

/// One identity of a chain index (`IndexIdentities`).
pub mod index_identity {
    use super::{Range, SectionId, U32};

    /// Identity id.
    pub const IDENTITY: U32 = U32(0);
    /// The rules whose pods peers hold it.
    pub const RULES: Range = Range::new(4, SectionId::IndexPostings);
    /// Record length.
    pub const LEN: usize = 12;
}

/// One IPv4 interval of a chain index (`IndexIntervals`): from `FIRST` up to the next
/// interval's first address (or to 255.255.255.255).
pub mod index_interval {
    use super::{Range, SectionId, U32};

    /// First address, as a number.
    pub const FIRST: U32 = U32(0);
    /// The rules with a networks peer whose CIDRs cover the interval.
    pub const RULES: Range = Range::new(4, SectionId::IndexPostings);
    /// Record length.
    pub const LEN: usize = 12;
}

/// A rule named by a chain index (`IndexPostings`).
pub mod index_posting {
    use super::U32;

    /// Its position in the chain: the chain entry (its policy) in the upper 16 bits, the
    /// rule's number within that policy in the lower 16, so positions ascend in evaluation
    /// order.
    pub const POSITION: U32 = U32(0);
    /// Record length.
    pub const LEN: usize = 4;
}

/// What a chain's workloads get for one Service frontend (`ServiceVerdicts`): the decision
/// [`crate::Snapshot::decide`] reaches by deciding the frontend's backends.
pub mod service_verdict {
    use super::{U8, U32};

    /// [`OUTCOME_RULE`], [`OUTCOME_DEFAULT`] or [`OUTCOME_AMBIGUOUS`].
    pub const OUTCOME: U8 = U8(0);
    /// Where the destination is: the first backend's location, or the frontend's when the
    /// backends disagree (a `Location` byte).
    pub const LOCATION: U8 = U8(1);
    /// The rule every backend matched (with [`OUTCOME_RULE`]): its policy...
    pub const POLICY: U32 = U32(4);
    /// ... and its number within that policy.
    pub const RULE: U32 = U32(8);
    /// Record length.
    pub const LEN: usize = 12;

    /// Every backend matched the rule named by `POLICY` and `RULE`.
    pub const OUTCOME_RULE: u8 = 0;
    /// No rule matched any backend: the installation default, unanimously.
    pub const OUTCOME_DEFAULT: u8 = 1;
    /// The backends would be routed differently (or there are none): the installation default.
    pub const OUTCOME_AMBIGUOUS: u8 = 2;
}

/// A chain's row of Service verdicts (`ServiceVerdictRows`).
pub mod service_verdict_row {
    use super::U32;

    /// The row: its first record is `ROW × services` in `ServiceVerdicts`; [`NONE`] when the
    /// chain has none (its Services are decided from their backends).
    pub const ROW: U32 = U32(0);
    /// Record length.
    pub const LEN: usize = 4;

    /// No row.
    pub const NONE: u32 = u32::MAX;
}

/// A workload on this node (`Workloads`).
pub mod workload {
    use super::{SectionId, Str, U32};

    /// Namespace.
    pub const NAMESPACE: Str = Str::new(0, SectionId::NodeStrings);
    /// Name.
    pub const NAME: Str = Str::new(8, SectionId::NodeStrings);
    /// Index into `Chains`.
    pub const CHAIN: U32 = U32(16);
    /// Unused (0): addresses live in `WorkloadAddresses`.
    pub const RESERVED: U32 = U32(20);
    /// How many addresses the workload has.
    pub const ADDRESS_COUNT: U32 = U32(24);
    /// Record length.
    pub const LEN: usize = 28;
}

/// An address of a workload (`WorkloadAddresses`).
pub mod workload_address {
    use super::{Bytes, U8, U32};

    /// Address; IPv4 in the first 4 bytes.
    pub const IP: Bytes<16> = Bytes(0);
    /// 4 or 6 (bytes 17–19 are padding).
    pub const FAMILY: U8 = U8(16);
    /// Index into `Workloads`.
    pub const WORKLOAD: U32 = U32(20);
    /// Record length.
    pub const LEN: usize = 24;
}

/// CIDR record length (see [`cidr`]).
pub const CIDR_LEN: usize = cidr::LEN;

/// Rule record length (see [`rule`]).
pub const RULE_LEN: usize = rule::LEN;
pub(crate) const RULE_HAS_PEERS: u8 = 1;
pub(crate) const RULE_HAS_PORTS: u8 = 2;
/// Flag bit 2: the NetworkPolicy gate removed RDMA from this rule's transports.
pub(crate) const RULE_GATE_REMOVED_RDMA: u8 = 4;
/// Flag bit 3: the NetworkPolicy gate removed the user-space stack from this rule's transports
/// (reserved for a user-space stack on a dedicated device; the compiler never sets it today).
pub(crate) const RULE_GATE_REMOVED_USERSPACE: u8 = 8;
/// Flag bit 4: this rule is the part of a split rule that keeps its bypass stacks, for the
/// destinations NetworkPolicy allows; the rule after it (same name) holds the rest.
pub(crate) const RULE_GATE_ALLOWED_PART: u8 = 16;

/// Backend record length (see [`backend`]).
pub const BACKEND_LEN: usize = backend::LEN;
/// The node of a backend that is not a pod.
pub const NO_NODE: u32 = u32::MAX;

/// The kind byte of a free `Addresses4` slot.
pub const EMPTY_SLOT: u8 = 0xff;

/// The home slot of an IPv4 address in a table of `slots` slots.
pub fn address4_slot(ip: u32, slots: usize) -> usize {
    // Multiplicative hashing mixes every bit of the address into the high bits, so pod
    // addresses that differ only in their low bits still spread; the multiply-shift maps the
    // hash onto any table size without a division.
    let hash = ip.wrapping_mul(0x9E37_79B9);
    ((u64::from(hash) * slots as u64) >> 32) as usize
}

/// Slots for `addresses` IPv4 addresses: load factor at most three quarters, and at least one
/// free slot, so a probe always ends — rounded up to four significant bits, so the size (and with
/// it every address's slot) stays put while the book grows or shrinks by up to an eighth: a pod
/// added or removed moves a few slots, not all of them, and its delta stays small. Readers take
/// the size from the section, so this is the encoder's choice, not part of the format.
pub fn address4_slots(addresses: usize) -> usize {
    let needed = addresses + addresses / 3 + 1;
    let step = (needed.next_power_of_two() >> 4).max(1);
    needed.div_ceil(step) * step
}

/// Rule filter record length (see [`rule_filter`]).
pub const RULE_FILTER_LEN: usize = rule_filter::LEN;
/// Rule filter peer kind: some peer is a pods peer.
pub const FILTER_PODS: u8 = 1;
/// Rule filter peer kind: some networks peer holds an IPv4 CIDR.
pub const FILTER_NETWORKS4: u8 = 2;
/// Rule filter peer kind: some networks peer holds an IPv6 CIDR.
pub const FILTER_NETWORKS6: u8 = 4;

/// The two bits an identity sets in a rule filter's 64-bit Bloom filter.
pub fn rule_bloom_mask(identity: u32) -> u64 {
    bloom_bits(identity)
        .iter()
        .fold(0, |mask, bit| mask | 1u64 << (bit >> 2))
}

/// The lowest and highest IPv4 address of a CIDR record, when it is an IPv4 one.
pub(crate) fn cidr4_span(record: &[u8]) -> Option<(u32, u32)> {
    if record.len() < cidr::LEN || cidr::FAMILY.get(record) != 4 {
        return None;
    }
    let [a, b, c, d, ..] = cidr::IP.get(record);
    let base = u32::from_be_bytes([a, b, c, d]);
    let prefix = u32::from(cidr::PREFIX.get(record)).min(32);
    let host = u32::MAX.checked_shr(prefix).unwrap_or(0);
    Some((base & !host, base | host))
}

/// Policy record length (see [`policy`]).
pub const POLICY_LEN: usize = policy::LEN;

/// Policy filter record length (see [`policy_filter`]).
pub const POLICY_FILTER_LEN: usize = policy_filter::LEN;
/// Policy filter flag: every rule has `to` and every peer is a pods peer.
pub const POLICY_PODS_ONLY: u8 = 1;

/// The two bits an identity sets in a policy filter's 128-bit Bloom filter.
pub fn policy_bloom_mask(identity: u32) -> u128 {
    bloom_bits(identity)
        .iter()
        .fold(0, |mask, bit| mask | 1u128 << (bit >> 1))
}

/// Two independent 8-bit hashes of an identity; the Bloom filters use their top bits.
fn bloom_bits(identity: u32) -> [usize; 2] {
    [
        (identity.wrapping_mul(0x9E37_79B1) >> 24) as usize,
        (identity.wrapping_mul(0x85EB_CA77).rotate_left(13) >> 24) as usize,
    ]
}

/// [`peer::KIND`] of a pods peer (identity set).
pub const PEER_PODS: u8 = 0;
/// [`peer::KIND`] of a networks peer (CIDRs).
pub const PEER_NETWORKS: u8 = 1;
/// [`peer::KIND`] of an entity peer.
pub const PEER_ENTITY: u8 = 2;

/// Address kinds.
pub(crate) const ADDRESS_POD: u8 = 0;
pub(crate) const ADDRESS_NODE: u8 = 1;

/// Builds a rule filter record (see [`RULE_FILTER_LEN`]). The encoder and the validator in
/// `Snapshot::parse` both build filters with this, from the rule's data, and must agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RuleFilter {
    first_port: u16,
    last_port: u16,
    protocols: u8,
    locations: u8,
    open_locations: u8,
    peer_kinds: u8,
    bloom: u64,
    v4_first: u32,
    v4_last: u32,
}

const EVERY_LOCATION: [crate::Location; 4] = [
    crate::Location::SameNode,
    crate::Location::SameZone,
    crate::Location::SameCluster,
    crate::Location::External,
];

fn location_mask(admits: impl Fn(crate::Location) -> bool) -> u8 {
    EVERY_LOCATION
        .iter()
        .filter(|l| admits(**l))
        .fold(0, |mask, l| mask | 1 << (*l as u8))
}

impl RuleFilter {
    /// A filter for a rule with this port span, location constraint and — when `has_peers` is
    /// false — no `to` (every address). Peers are added one by one.
    pub(crate) fn new(
        (first_port, last_port, protocols): (u16, u16, u8),
        location: crate::LocationMatch,
        has_peers: bool,
    ) -> Self {
        Self {
            first_port,
            last_port,
            protocols,
            locations: location_mask(|l| location.admits(l)),
            open_locations: if has_peers { 0 } else { 0x0f },
            peer_kinds: 0,
            bloom: 0,
            v4_first: u32::MAX,
            v4_last: 0,
        }
    }

    /// A pods peer whose identity set has this 64-bit Bloom filter.
    pub(crate) fn add_pods(&mut self, bloom: u64) {
        self.peer_kinds |= FILTER_PODS;
        self.bloom |= bloom;
    }

    /// One CIDR record of a networks peer.
    pub(crate) fn add_cidr(&mut self, record: &[u8]) {
        match cidr4_span(record) {
            Some((first, last)) => {
                self.peer_kinds |= FILTER_NETWORKS4;
                self.v4_first = self.v4_first.min(first);
                self.v4_last = self.v4_last.max(last);
            }
            None => self.peer_kinds |= FILTER_NETWORKS6,
        }
    }

    /// An entity peer.
    pub(crate) fn add_entity(&mut self, entity: crate::Entity) {
        self.open_locations |= location_mask(|l| entity.admits(l));
    }

    pub(crate) fn to_bytes(self) -> [u8; RULE_FILTER_LEN] {
        use rule_filter::*;
        let mut out = [0u8; LEN];
        FIRST_PORT.put(&mut out, self.first_port);
        LAST_PORT.put(&mut out, self.last_port);
        PROTOCOLS.put(&mut out, self.protocols);
        LOCATIONS.put(&mut out, self.locations);
        OPEN_LOCATIONS.put(&mut out, self.open_locations);
        PEER_KINDS.put(&mut out, self.peer_kinds);
        BLOOM.put(&mut out, self.bloom);
        V4_FIRST.put(&mut out, self.v4_first);
        V4_LAST.put(&mut out, self.v4_last);
        out
    }
}

/// The IPv4 addresses that would get the same decision as the one being decided, as far as
/// the address itself matters: every networks check a decision makes is recorded with its
/// outcome (the first [`SAME_ADDRESS_CHECKS`] of them exactly, all of them as the interval
/// around the address that no checked range crosses), and another address gets the same
/// decision if every check comes out the same for it. Identity and location are compared
/// separately. A Service's pod backends that share identity, port and location and pass
/// [`SameAddresses::contains`] share a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SameAddresses {
    /// `(first, last)` of the first checks, in the order made.
    checks: [(u32, u32); SAME_ADDRESS_CHECKS],
    /// Bit `i`: the address decided was inside check `i`.
    inside: u16,
    /// Checks made (only the first [`SAME_ADDRESS_CHECKS`] are in `checks`).
    made: u32,
    /// Every check's outcome is the same for the addresses of this interval.
    first: u32,
    last: u32,
    /// Only the address decided: an IPv6 networks check was made (no range kept for those).
    only_this: bool,
}

/// How many networks checks [`SameAddresses`] keeps exactly.
const SAME_ADDRESS_CHECKS: usize = 16;

impl Default for SameAddresses {
    fn default() -> Self {
        Self {
            checks: [(0, 0); SAME_ADDRESS_CHECKS],
            inside: 0,
            made: 0,
            first: 0,
            last: u32::MAX,
            only_this: false,
        }
    }
}

/// Where a walk records the networks checks it makes: [`SameAddresses`] for a Service's
/// backend groups, [`OnlyThis`] (nothing kept) for a destination looked up directly.
pub(crate) trait AddressChecks {
    /// Records a check of `ip` against `first..=last` and returns whether it is inside.
    fn narrow(&mut self, ip: u32, first: u32, last: u32) -> bool;
    /// Records a check whose outcome may differ for any other address.
    fn only_this(&mut self);
}

/// Records nothing: the decision is for this address only.
pub(crate) struct OnlyThis;

impl AddressChecks for OnlyThis {
    #[inline]
    fn narrow(&mut self, ip: u32, first: u32, last: u32) -> bool {
        first <= ip && ip <= last
    }

    #[inline]
    fn only_this(&mut self) {}
}

impl AddressChecks for SameAddresses {
    #[inline]
    fn narrow(&mut self, ip: u32, first: u32, last: u32) -> bool {
        let inside = if ip < first {
            self.last = self.last.min(first - 1);
            false
        } else if ip > last {
            self.first = self.first.max(last + 1);
            false
        } else {
            self.first = self.first.max(first);
            self.last = self.last.min(last);
            true
        };
        if let Some(slot) = self.checks.get_mut(self.made as usize) {
            *slot = (first, last);
            self.inside |= u16::from(inside) << self.made;
        }
        self.made = self.made.saturating_add(1);
        inside
    }

    fn only_this(&mut self) {
        self.only_this = true;
    }
}

impl SameAddresses {
    /// Whether no check was recorded: every address gets the same answers.
    pub(crate) fn covers_all(&self) -> bool {
        self.made == 0 && !self.only_this
    }

    /// Whether `ip` would get the same answers to every check recorded.
    pub(crate) fn contains(&self, ip: std::net::IpAddr) -> bool {
        let std::net::IpAddr::V4(v4) = ip else {
            return false;
        };
        let ip = u32::from(v4);
        if self.only_this {
            return false;
        }
        if (self.first..=self.last).contains(&ip) {
            return true;
        }
        self.made as usize <= SAME_ADDRESS_CHECKS
            && self.checks[..self.made as usize]
                .iter()
                .enumerate()
                .all(|(i, &(first, last))| {
                    (first <= ip && ip <= last) == (self.inside & 1 << i != 0)
                })
    }
}

/// What a lookup knows about its destination before walking a chain, folded into the shape
/// the filters are tested against.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FilterProbe {
    pub(crate) port: u16,
    pub(crate) protocol_bit: u8,
    pub(crate) location_bit: u8,
    /// The destination's rule Bloom bits when it is a pod with an identity, else 0.
    pub(crate) identity_mask: u64,
    /// The destination's policy Bloom bits when it is a pod with an identity, else 0.
    pub(crate) policy_identity_mask: u128,
    /// The destination as an IPv4 number, when it is IPv4.
    pub(crate) v4: Option<u32>,
}

impl FilterProbe {
    /// Whether the rule with this filter record may match; `false` only when it cannot.
    /// Narrows `same` to the addresses for which the answer would be the same.
    #[inline]
    pub(crate) fn admits<S: AddressChecks>(
        &self,
        filter: &[u8; RULE_FILTER_LEN],
        same: &mut S,
    ) -> bool {
        // Fixed offsets into a fixed-size array: the reads compile to plain loads.
        use rule_filter::*;
        if PROTOCOLS.get(filter) & self.protocol_bit == 0
            || self.port < FIRST_PORT.get(filter)
            || self.port > LAST_PORT.get(filter)
            || LOCATIONS.get(filter) & self.location_bit == 0
        {
            return false;
        }
        if OPEN_LOCATIONS.get(filter) & self.location_bit != 0 {
            return true;
        }
        let kinds = PEER_KINDS.get(filter);
        if kinds & FILTER_PODS != 0
            && self.identity_mask != 0
            && BLOOM.get(filter) & self.identity_mask == self.identity_mask
        {
            return true;
        }
        match self.v4 {
            Some(ip) if kinds & FILTER_NETWORKS4 != 0 => {
                same.narrow(ip, V4_FIRST.get(filter), V4_LAST.get(filter))
            }
            Some(_) => false,
            None => {
                if kinds & FILTER_NETWORKS6 != 0 {
                    same.only_this();
                }
                kinds & FILTER_NETWORKS6 != 0
            }
        }
    }
}

/// Builds a policy filter record (see [`POLICY_FILTER_LEN`]) from the policy's rules. Shared
/// by the encoder and the validator, like [`RuleFilter`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct PolicySummary {
    first_rule: u32,
    rule_count: u32,
    tier: u8,
    first_port: u16,
    last_port: u16,
    protocols: u8,
    pods_only: bool,
    locations: u8,
    bloom: u128,
}

impl PolicySummary {
    /// An empty summary of the policy holding `rule_count` rules from `first_rule`.
    pub(crate) fn new(first_rule: u32, rule_count: u32, tier: u8) -> Self {
        Self {
            first_rule,
            rule_count,
            tier,
            first_port: u16::MAX,
            last_port: 0,
            protocols: 0,
            pods_only: true,
            locations: 0,
            bloom: 0,
        }
    }

    /// Adds one rule: its port span, location constraint, and whether every peer it has is a
    /// pods peer (false for a rule without `to`).
    pub(crate) fn add_rule(
        &mut self,
        (first, last, protocols): (u16, u16, u8),
        location: crate::LocationMatch,
        pods_only: bool,
    ) {
        self.first_port = self.first_port.min(first);
        self.last_port = self.last_port.max(last);
        self.protocols |= protocols;
        self.pods_only &= pods_only;
        self.locations |= location_mask(|l| location.admits(l));
    }

    /// Adds the policy Bloom filter of a pods peer's identity set.
    pub(crate) fn add_pods(&mut self, bloom: u128) {
        self.bloom |= bloom;
    }

    pub(crate) fn to_bytes(self) -> [u8; POLICY_FILTER_LEN] {
        let empty = self.first_port > self.last_port;
        let (first, last, protocols) = if empty {
            (0, u16::MAX, 0xff)
        } else {
            (self.first_port, self.last_port, self.protocols)
        };
        use policy_filter::*;
        let mut out = [0u8; LEN];
        RULES.put(&mut out, self.first_rule as usize, self.rule_count as usize);
        FIRST_PORT.put(&mut out, first);
        LAST_PORT.put(&mut out, last);
        PROTOCOLS.put(&mut out, protocols);
        let pods_only = self.pods_only && !empty;
        FLAGS.put(&mut out, if pods_only { POLICY_PODS_ONLY } else { 0 });
        LOCATIONS.put(&mut out, self.locations);
        TIER.put(&mut out, self.tier);
        BLOOM.put(&mut out, self.bloom);
        out
    }
}

/// The policy and rule Bloom filters of an identity set.
pub(crate) fn identity_set_blooms(identities: impl Iterator<Item = u32>) -> (u128, u64) {
    identities.fold((0, 0), |(policy, rule), identity| {
        (
            policy | policy_bloom_mask(identity),
            rule | rule_bloom_mask(identity),
        )
    })
}

impl FilterProbe {
    /// Whether some rule of the policy with this filter record may match; `false` only when
    /// none can.
    #[inline]
    pub(crate) fn admits_policy(&self, filter: &[u8; POLICY_FILTER_LEN]) -> bool {
        use policy_filter::*;
        if PROTOCOLS.get(filter) & self.protocol_bit == 0
            || self.port < FIRST_PORT.get(filter)
            || self.port > LAST_PORT.get(filter)
            || LOCATIONS.get(filter) & self.location_bit == 0
        {
            return false;
        }
        if FLAGS.get(filter) & POLICY_PODS_ONLY == 0 {
            return true;
        }
        self.policy_identity_mask != 0
            && BLOOM.get(filter) & self.policy_identity_mask == self.policy_identity_mask
    }
}

#[cfg(test)]
mod tests {
    use super::address4_slots;

    #[test]
    fn the_ipv4_address_book_keeps_its_size_while_it_grows_a_little() {
        for addresses in 0..300_000 {
            let slots = address4_slots(addresses);
            assert!(slots > addresses, "{addresses}: no free slot");
            assert!(addresses * 4 <= slots * 3, "{addresses}: load above 3/4");
            // At most an eighth more than three quarters' load needs (plus rounding).
            let needed = addresses + addresses / 3 + 1;
            assert!(
                slots <= needed + needed / 8 + 1,
                "{addresses}: {slots} slots"
            );
        }
        // Around 100,000 pods the size changes once per ~11,000 addresses, not with each.
        let sizes: std::collections::BTreeSet<usize> =
            (100_000..110_000).map(address4_slots).collect();
        assert!(sizes.len() <= 2, "{sizes:?}");
    }
}
