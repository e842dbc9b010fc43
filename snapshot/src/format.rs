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
    /// IPv4 address book, an open-addressing hash table of slots
    /// `{ip u32, kind u8, pad 3, identity u32, node u32}`, kind [`EMPTY_SLOT`] for a free one.
    /// An address sits in the first free slot at or after [`address4_slot`] (linear probing,
    /// wrapping at the end); about three quarters of the slots are used ([`address4_slots`]). A lookup reads one or two cache lines of
    /// one page, where a binary search over 100,000 addresses reads 17 lines of 17 pages.
    Addresses4 = 5,
    /// IPv6 address book, sorted by address: `{ip [16], kind u8, pad 3, identity u32, node u32}`.
    Addresses6 = 6,
    /// Service frontends, sorted by (ip, port, protocol):
    /// `{ip [16], family u8, protocol u8, port u16, backends range}`.
    Services = 7,
    /// Service backends: `{ip [16], family u8, pad 1, port u16, identity u32, node u32,
    /// zone u32}`. Identity, node and zone repeat what the address book says of a pod backend
    /// ([`crate::NO_IDENTITY`], [`NO_NODE`], [`crate::NO_ZONE`] for any other address). Each
    /// Service's backends are sorted by (identity, port, zone, node, address), so pod backends
    /// that only differ in where they run form runs a lookup can decide once per location.
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
    /// Policies: `{kind u8, tier u8, priority u16, namespace str, name str, rules range}`.
    /// Local policy numbers follow the global evaluation order, so every chain ascends through
    /// this section and the rule sections. A lookup reads only `PolicyFilters`.
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
    /// One prefilter per rule, parallel to `Rules`: see [`RULE_FILTER_LEN`].
    RuleFilters = 21,
    /// One summary per policy, parallel to `Policies`: see [`POLICY_FILTER_LEN`].
    PolicyFilters = 23,
}

impl SectionId {
    /// Every section, in the order they are written.
    pub const ALL: [Self; 22] = [
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
        Self::RuleFilters,
        Self::Policies,
        Self::PolicyFilters,
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
            Self::Backends => BACKEND_LEN,
            Self::IdentitySets => 4,
            Self::Peers => 12,
            Self::Ports => 8,
            Self::Transports => 2,
            Self::Rules => RULE_LEN,
            Self::RuleFilters => RULE_FILTER_LEN,
            Self::PolicyFilters => POLICY_FILTER_LEN,
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
/// Bits 2–4 record what the controller's NetworkPolicy gate did to the rule ([`crate::RuleGate`]);
/// they never change a lookup (the transports list already says what is left), only what
/// `explain` reports, and readers that predate them ignore them.
pub const RULE_LEN: usize = 44;
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

/// Backend record length (see [`SectionId::Backends`]).
pub const BACKEND_LEN: usize = 32;
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
/// free slot, so a probe always ends.
pub fn address4_slots(addresses: usize) -> usize {
    addresses + addresses / 3 + 1
}

/// Rule filter record, one per rule in the same order as `Rules`:
/// `{first port u16, last port u16, protocol mask u8, location mask u8, open locations u8,
///   peer kinds u8, identity bloom u64, IPv4 first u32, IPv4 last u32}` = 24 bytes.
///
/// Everything a lookup needs to reject a rule sits in one small record, so the shim's walk of a
/// chain reads 24 contiguous bytes per rule instead of following the rule's peer, port and
/// identity-set ranges. A filter only ever rejects rules that cannot match; whatever passes is
/// checked in full. Location masks use bit n for [`crate::Location`] n. *Open locations*: where
/// the rule's peers admit any address (no `to`, or an `entity` peer). *Peer kinds*:
/// [`FILTER_PODS`], [`FILTER_NETWORKS4`], [`FILTER_NETWORKS6`]. The Bloom filter covers the
/// identities of every pods peer ([`rule_bloom_mask`]); the IPv4 span covers every IPv4 CIDR of
/// its networks peers. `Snapshot::parse` recomputes every filter and rejects a snapshot whose
/// filters differ, so a lookup can trust them.
pub const RULE_FILTER_LEN: usize = 24;
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
    if record.get(16) != Some(&4) {
        return None;
    }
    let base = u32::from_be_bytes(record.get(..4)?.try_into().ok()?);
    let prefix = u32::from(*record.get(17)?).min(32);
    let host = u32::MAX.checked_shr(prefix).unwrap_or(0);
    Some((base & !host, base | host))
}

/// Policy record length (see [`SectionId::Policies`]).
pub const POLICY_LEN: usize = 28;

/// Policy filter record, one per policy in the same order as `Policies`:
/// `{first rule u32, rule count u32, first port u16, last port u16, protocol mask u8, flags u8,
///   location mask u8, tier u8, identity bloom u128}` = 32 bytes.
///
/// Everything a lookup reads to walk past a policy: its rules (a range of `Rules` and
/// `RuleFilters`), its tier (a Pass ends the tier), and a summary of its rules — the ports they
/// cover together, the locations they admit, and, when every rule names only pods peers
/// ([`POLICY_PODS_ONLY`]), a 128-bit Bloom filter of the identities those peers select
/// ([`policy_bloom_mask`]). 1,000 policies take 32 KB, small enough to stay in cache between
/// lookups, where the full policy records would not.
pub const POLICY_FILTER_LEN: usize = 32;
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

/// Peer kinds.
pub(crate) const PEER_PODS: u8 = 0;
pub(crate) const PEER_NETWORKS: u8 = 1;
pub(crate) const PEER_ENTITY: u8 = 2;

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
        let mut out = [0u8; RULE_FILTER_LEN];
        out[0..2].copy_from_slice(&self.first_port.to_le_bytes());
        out[2..4].copy_from_slice(&self.last_port.to_le_bytes());
        out[4] = self.protocols;
        out[5] = self.locations;
        out[6] = self.open_locations;
        out[7] = self.peer_kinds;
        out[8..16].copy_from_slice(&self.bloom.to_le_bytes());
        out[16..20].copy_from_slice(&self.v4_first.to_le_bytes());
        out[20..24].copy_from_slice(&self.v4_last.to_le_bytes());
        out
    }
}

/// The IPv4 addresses that would get the same decision as the one being decided, as far as
/// the address itself matters: every networks check a decision makes narrows it to the side of
/// the CIDR the address is on. Identity and location are compared separately. A Service's pod
/// backends that share identity, port and location and fall inside the range share a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SameAddresses {
    first: u32,
    last: u32,
    /// Only the address decided: an IPv6 networks check was made (no range kept for those).
    only_this: bool,
}

impl Default for SameAddresses {
    fn default() -> Self {
        Self {
            first: 0,
            last: u32::MAX,
            only_this: false,
        }
    }
}

impl SameAddresses {
    /// Records a check of `ip` against `first..=last` and returns whether it is inside.
    #[inline]
    pub(crate) fn narrow(&mut self, ip: u32, first: u32, last: u32) -> bool {
        if ip < first {
            self.last = self.last.min(first - 1);
            false
        } else if ip > last {
            self.first = self.first.max(last + 1);
            false
        } else {
            self.first = self.first.max(first);
            self.last = self.last.min(last);
            true
        }
    }

    /// Records a check whose outcome may differ for any other address.
    pub(crate) fn only_this(&mut self) {
        self.only_this = true;
    }

    /// Whether `ip` would get the same answers to every check recorded.
    pub(crate) fn contains(&self, ip: std::net::IpAddr) -> bool {
        match ip {
            std::net::IpAddr::V4(v4) => {
                !self.only_this && (self.first..=self.last).contains(&u32::from(v4))
            }
            std::net::IpAddr::V6(_) => false,
        }
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
    pub(crate) fn admits(&self, filter: &[u8; RULE_FILTER_LEN], same: &mut SameAddresses) -> bool {
        let first = u16::from_le_bytes([filter[0], filter[1]]);
        let last = u16::from_le_bytes([filter[2], filter[3]]);
        if filter[4] & self.protocol_bit == 0
            || self.port < first
            || self.port > last
            || filter[5] & self.location_bit == 0
        {
            return false;
        }
        if filter[6] & self.location_bit != 0 {
            return true;
        }
        let kinds = filter[7];
        if kinds & FILTER_PODS != 0 && self.identity_mask != 0 {
            let bloom = u64::from_le_bytes([
                filter[8], filter[9], filter[10], filter[11], filter[12], filter[13], filter[14],
                filter[15],
            ]);
            if bloom & self.identity_mask == self.identity_mask {
                return true;
            }
        }
        match self.v4 {
            Some(ip) if kinds & FILTER_NETWORKS4 != 0 => {
                let first = u32::from_le_bytes([filter[16], filter[17], filter[18], filter[19]]);
                let last = u32::from_le_bytes([filter[20], filter[21], filter[22], filter[23]]);
                same.narrow(ip, first, last)
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
        let mut out = [0u8; POLICY_FILTER_LEN];
        out[0..4].copy_from_slice(&self.first_rule.to_le_bytes());
        out[4..8].copy_from_slice(&self.rule_count.to_le_bytes());
        out[8..10].copy_from_slice(&first.to_le_bytes());
        out[10..12].copy_from_slice(&last.to_le_bytes());
        out[12] = protocols;
        out[13] = if self.pods_only && !empty {
            POLICY_PODS_ONLY
        } else {
            0
        };
        out[14] = self.locations;
        out[15] = self.tier;
        out[16..].copy_from_slice(&self.bloom.to_le_bytes());
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
        let first = u16::from_le_bytes([filter[8], filter[9]]);
        let last = u16::from_le_bytes([filter[10], filter[11]]);
        if filter[12] & self.protocol_bit == 0
            || self.port < first
            || self.port > last
            || filter[14] & self.location_bit == 0
        {
            return false;
        }
        if filter[13] & POLICY_PODS_ONLY == 0 {
            return true;
        }
        let mut bloom = [0u8; 16];
        bloom.copy_from_slice(&filter[16..32]);
        self.policy_identity_mask != 0
            && u128::from_le_bytes(bloom) & self.policy_identity_mask == self.policy_identity_mask
    }
}
