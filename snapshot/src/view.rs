//! Reading a snapshot in place and deciding connections.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::encode::ip_key;
use crate::format::{self, SectionId};
use crate::{
    Action, CongestionControl, Entity, Isolation, Location, LocationMatch, NO_IDENTITY, NO_ZONE,
    PolicyKind, Protocol, RuleGate, Stack, Tier, TransportChoice,
};

/// Why bytes are not a usable snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its header or than the length the header declares.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes present.
        present: usize,
    },
    /// Does not start with the snapshot magic.
    BadMagic,
    /// Written by a different format version.
    UnsupportedVersion(u16),
    /// The checksum does not match: the bytes were altered or partly written.
    ChecksumMismatch {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// A section is missing, duplicated, mis-sized or out of bounds.
    BadSection(&'static str),
    /// A record refers outside its target section, or holds an unknown enum value.
    BadRecord {
        /// Section of the record.
        section: &'static str,
        /// Index of the record.
        index: usize,
        /// What is wrong.
        problem: &'static str,
    },
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated { needed, present } => {
                write!(f, "snapshot truncated: needs {needed} bytes, has {present}")
            }
            Self::BadMagic => f.write_str("not a stackroute snapshot (bad magic)"),
            Self::UnsupportedVersion(v) => write!(
                f,
                "unsupported snapshot version {v} (this build reads {})",
                format::VERSION
            ),
            Self::ChecksumMismatch { stored, computed } => {
                write!(
                    f,
                    "snapshot checksum mismatch: header says {stored:#010x}, bytes give {computed:#010x}"
                )
            }
            Self::BadSection(problem) => write!(f, "bad snapshot section: {problem}"),
            Self::BadRecord {
                section,
                index,
                problem,
            } => write!(f, "bad snapshot record {section}[{index}]: {problem}"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// A validated snapshot borrowed from its bytes (a `Vec`, a file, a memory map).
#[derive(Clone, Copy, Debug)]
pub struct Snapshot<'a> {
    bytes: &'a [u8],
    sections: [&'a [u8]; SectionId::ALL.len()],
}

/// Index of a workload in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadId(pub u32);

/// A rule, by policy index and rule index within that policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// Index into the snapshot's policies.
    pub policy: u32,
    /// Index of the rule within the policy.
    pub rule: u32,
}

/// How a destination was recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestinationClass {
    /// A pod with this identity, on this node.
    Pod {
        /// Identity id.
        identity: u32,
        /// Node id.
        node: u32,
    },
    /// A node's own address.
    Node {
        /// Node id.
        node: u32,
    },
    /// Not in the address book: located by the cluster networks alone.
    Unknown,
}

/// How the decision was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The destination itself was looked up.
    Direct,
    /// The destination is a Service frontend; every ready backend got the same decision.
    ServiceUnanimous {
        /// How many backends.
        backends: u32,
    },
    /// The destination is a Service frontend whose backends would be routed differently (or that
    /// has none); the installation default applies because the kernel picks the backend later.
    ServiceAmbiguous {
        /// How many backends.
        backends: u32,
    },
}

/// The outcome for one connection.
#[derive(Clone, Copy, Debug)]
pub struct Decision<'a> {
    /// Where the destination is.
    pub location: Location,
    /// The rule that decided, or `None` for the installation default.
    pub matched: Option<RuleRef>,
    /// Isolation required by the matched rule.
    pub isolation: Isolation,
    /// How the destination was reached.
    pub via: Via,
    transports: &'a [u8],
}

impl<'a> Decision<'a> {
    /// The transport to use first, then the fallbacks in order (the implicit kernel entry
    /// included where it applies).
    pub fn transports(&self) -> impl Iterator<Item = TransportChoice> + 'a {
        self.transports.chunks_exact(2).filter_map(|pair| {
            Some(TransportChoice {
                stack: Stack::from_byte(pair[0])?,
                congestion_control: CongestionControl::from_byte(pair[1])?,
            })
        })
    }

    /// The first transport.
    pub fn transport(&self) -> TransportChoice {
        self.transports()
            .next()
            .unwrap_or(TransportChoice::KERNEL_DEFAULT)
    }

    /// Whether two decisions pick the same rule and transports.
    pub fn same_outcome(&self, other: &Self) -> bool {
        self.matched == other.matched
            && self.transports == other.transports
            && self.isolation == other.isolation
    }
}

/// Why a rule did not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mismatch {
    /// The destination port or protocol is not in `ports`.
    Port,
    /// The destination's location is outside the rule's `location`.
    Location {
        /// The rule's constraint.
        required: LocationMatch,
        /// Where the destination is.
        actual: Location,
    },
    /// No peer in `to` covers the destination.
    Peer,
}

/// What happened to one rule during a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It matched and routed: the decision.
    Matched,
    /// It matched and passed: the rest of its tier is skipped.
    Passed,
    /// It did not match.
    NoMatch(Mismatch),
    /// It was not evaluated: an earlier Pass rule ended its tier.
    SkippedByPass,
}

/// Observer of a decision, for `explain`. The shim passes [`NoTrace`].
pub trait Trace {
    /// Called for every rule considered, in evaluation order.
    fn rule(&mut self, rule: RuleRef, verdict: Verdict);
    /// Called before the rules are walked for one Service backend (`None` when the destination
    /// was looked up directly).
    fn backend(&mut self, _backend: Option<(IpAddr, u16)>) {}
    /// Whether this trace wants every rule's own first reason and every Service backend. When
    /// false (the shim's [`NoTrace`]), the lookup skips whole policies by their summary and stops
    /// at the first disagreeing backend; the decision is the same either way.
    fn detailed(&self) -> bool {
        true
    }
}

/// A [`Trace`] that records nothing and costs nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoTrace;

impl Trace for NoTrace {
    #[inline]
    fn rule(&mut self, _rule: RuleRef, _verdict: Verdict) {}

    fn detailed(&self) -> bool {
        false
    }
}

/// Read access to a policy record.
#[derive(Clone, Copy, Debug)]
pub struct PolicyView<'a> {
    /// Resource kind.
    pub kind: PolicyKind,
    /// Tier.
    pub tier: Tier,
    /// Priority.
    pub priority: u16,
    /// Namespace (empty for ClusterStackRoutes).
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// Number of rules.
    pub rule_count: u32,
}

/// Read access to a rule record, for rendering.
#[derive(Clone, Copy, Debug)]
pub struct RuleView<'a> {
    /// Rule name.
    pub name: &'a str,
    /// Route or Pass.
    pub action: Action,
    /// Location constraint.
    pub location: LocationMatch,
    /// Isolation.
    pub isolation: Isolation,
    /// Whether `to` is present.
    pub has_peers: bool,
    /// Whether `ports` is present.
    pub has_ports: bool,
    /// `(protocol, first, last)` of each port entry.
    pub ports: &'a [u8],
    /// What the controller's NetworkPolicy gate did to the rule.
    pub gate: RuleGate,
    transports: &'a [u8],
}

impl<'a> RuleView<'a> {
    /// Port entries as `(protocol, first, last)`.
    pub fn port_ranges(&self) -> impl Iterator<Item = (Protocol, u16, u16)> + 'a {
        self.ports
            .chunks_exact(8)
            .filter_map(|r| Some((Protocol::from_byte(r[0])?, le16(r, 2), le16(r, 4))))
    }

    /// The transports, in order.
    pub fn transports(&self) -> impl Iterator<Item = TransportChoice> + 'a {
        self.transports.chunks_exact(2).filter_map(|pair| {
            Some(TransportChoice {
                stack: Stack::from_byte(pair[0])?,
                congestion_control: CongestionControl::from_byte(pair[1])?,
            })
        })
    }
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    bytes
        .get(at..at + 2)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    bytes
        .get(at..at + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

fn name_of(id: SectionId) -> &'static str {
    match id {
        SectionId::SharedStrings => "shared-strings",
        SectionId::Zones => "zones",
        SectionId::Nodes => "nodes",
        SectionId::ClusterNetworks => "cluster-networks",
        SectionId::Addresses4 => "addresses4",
        SectionId::Addresses6 => "addresses6",
        SectionId::Services => "services",
        SectionId::Backends => "backends",
        SectionId::IdentitySets => "identity-sets",
        SectionId::Networks => "networks",
        SectionId::Peers => "peers",
        SectionId::Ports => "ports",
        SectionId::Transports => "transports",
        SectionId::Rules => "rules",
        SectionId::Policies => "policies",
        SectionId::Chains => "chains",
        SectionId::ChainPolicies => "chain-policies",
        SectionId::Workloads => "workloads",
        SectionId::WorkloadAddresses => "workload-addresses",
        SectionId::NodeStrings => "node-strings",
        SectionId::RuleFilters => "rule-filters",
        SectionId::PolicyFilters => "policy-filters",
    }
}

impl<'a> Snapshot<'a> {
    /// Validates `bytes` completely — header, checksum, section bounds, every reference and
    /// enum value, sort order of searched tables — so later lookups cannot go wrong.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() < format::HEADER_LEN {
            return Err(DecodeError::Truncated {
                needed: format::HEADER_LEN,
                present: bytes.len(),
            });
        }
        if bytes[..8] != format::MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = le16(bytes, format::OFF_VERSION);
        if version != format::VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let total = le64(bytes, format::OFF_TOTAL_LEN);
        if total != bytes.len() as u64 {
            let needed = usize::try_from(total).unwrap_or(usize::MAX);
            if needed > bytes.len() {
                return Err(DecodeError::Truncated {
                    needed,
                    present: bytes.len(),
                });
            }
            return Err(DecodeError::BadSection(
                "trailing bytes after the declared length",
            ));
        }
        let stored = le32(bytes, format::OFF_CRC);
        let computed = crc32fast::hash(&bytes[format::OFF_VERSION..]);
        if stored != computed {
            return Err(DecodeError::ChecksumMismatch { stored, computed });
        }
        let count = le32(bytes, format::OFF_SECTION_COUNT) as usize;
        let directory_end = count
            .checked_mul(format::DIRECTORY_ENTRY_LEN)
            .and_then(|d| d.checked_add(format::HEADER_LEN))
            .filter(|end| *end <= bytes.len())
            .ok_or(DecodeError::BadSection(
                "section directory runs past the end",
            ))?;
        let mut sections: [Option<&[u8]>; SectionId::ALL.len()] = [None; SectionId::ALL.len()];
        for entry in
            bytes[format::HEADER_LEN..directory_end].chunks_exact(format::DIRECTORY_ENTRY_LEN)
        {
            let id = le32(entry, 0);
            let Some(section) = SectionId::ALL.iter().copied().find(|s| *s as u32 == id) else {
                continue; // unknown sections are allowed: a later minor revision may add some
            };
            let offset = le32(entry, 4) as usize;
            let len = le32(entry, 8) as usize;
            let record = le32(entry, 12) as usize;
            if record != section.record_len() {
                return Err(DecodeError::BadSection(
                    "record size differs from this version's",
                ));
            }
            let body = offset
                .checked_add(len)
                .filter(|end| offset >= directory_end && *end <= bytes.len())
                .map(|end| &bytes[offset..end])
                .ok_or(DecodeError::BadSection("section out of bounds"))?;
            if !len.is_multiple_of(record) {
                return Err(DecodeError::BadSection(
                    "section length is not a whole number of records",
                ));
            }
            let slot = &mut sections[section.index()];
            if slot.is_some() {
                return Err(DecodeError::BadSection("duplicate section"));
            }
            *slot = Some(body);
        }
        let mut found: [&[u8]; SectionId::ALL.len()] = [&[]; SectionId::ALL.len()];
        for (index, section) in sections.iter().enumerate() {
            found[index] =
                section.ok_or(DecodeError::BadSection(name_of(SectionId::ALL[index])))?;
        }
        let snapshot = Self {
            bytes,
            sections: found,
        };
        snapshot.validate()?;
        Ok(snapshot)
    }

    fn section(&self, id: SectionId) -> &'a [u8] {
        self.sections[id.index()]
    }

    pub(crate) fn records(&self, id: SectionId) -> std::slice::ChunksExact<'a, u8> {
        self.section(id).chunks_exact(id.record_len())
    }

    fn count(&self, id: SectionId) -> usize {
        self.section(id).len() / id.record_len()
    }

    fn record(&self, id: SectionId, index: usize) -> &'a [u8] {
        let len = id.record_len();
        index
            .checked_mul(len)
            .and_then(|start| self.section(id).get(start..start + len))
            .unwrap_or(&[])
    }

    /// Records `offset..offset+len` of a section, or nothing when out of range.
    fn range(&self, id: SectionId, offset: u32, len: u32) -> &'a [u8] {
        let size = id.record_len();
        let start = offset as usize * size;
        start
            .checked_add(len as usize * size)
            .and_then(|end| self.section(id).get(start..end))
            .unwrap_or(&[])
    }

    fn string(&self, table: SectionId, record: &[u8], at: usize) -> &'a str {
        let bytes = self.range(table, le32(record, at), le32(record, at + 4));
        std::str::from_utf8(bytes).unwrap_or("")
    }

    /// Recomputes every rule's port span and filter and every policy's summary from the rules
    /// they describe: lookups skip rules and policies on their word, so a wrong one would
    /// silently change decisions. Runs after every range has been checked.
    fn validate_summaries(&self) -> Result<(), DecodeError> {
        if self.count(SectionId::RuleFilters) != self.count(SectionId::Rules) {
            return Err(DecodeError::BadSection(
                "rule-filters does not hold one record per rule",
            ));
        }
        let mut set_blooms: HashMap<(u32, u32), (u128, u64)> = HashMap::new();
        let mut rule_summaries = Vec::with_capacity(self.count(SectionId::Rules));
        let rules = self.records(SectionId::Rules);
        for (i, (rule, stored)) in rules.zip(self.records(SectionId::RuleFilters)).enumerate() {
            let bad = |problem| DecodeError::BadRecord {
                section: name_of(SectionId::Rules),
                index: i,
                problem,
            };
            let flags = rule[11];
            let span = if flags & format::RULE_HAS_PORTS == 0 {
                (0, u16::MAX, 0xff)
            } else {
                let ports = self.range(SectionId::Ports, le32(rule, 20), le32(rule, 24));
                ports.chunks_exact(8).fold(
                    if ports.is_empty() {
                        (0, u16::MAX, 0xff)
                    } else {
                        (u16::MAX, 0, 0)
                    },
                    |(first, last, mask), p| {
                        let protocol = Protocol::from_byte(p[0]).unwrap_or(Protocol::Tcp);
                        (
                            first.min(le16(p, 2)),
                            last.max(le16(p, 4)),
                            mask | crate::encode::protocol_bit(protocol),
                        )
                    },
                )
            };
            if (le16(rule, 36), le16(rule, 38), rule[40]) != span {
                return Err(bad("port span differs from the rule's ports"));
            }
            let location = LocationMatch::from_byte(rule[9]).unwrap_or(LocationMatch::Any);
            let has_peers = flags & format::RULE_HAS_PEERS != 0;
            let mut filter = format::RuleFilter::new(span, location, has_peers);
            let mut pods_only = has_peers;
            let mut policy_bloom = 0u128;
            let peers = self.range(SectionId::Peers, le32(rule, 12), le32(rule, 16));
            for peer in peers.chunks_exact(12) {
                let range = (le32(peer, 4), le32(peer, 8));
                match peer[0] {
                    format::PEER_PODS => {
                        let (bloom, rule_bloom) = *set_blooms.entry(range).or_insert_with(|| {
                            let set = self.range(SectionId::IdentitySets, range.0, range.1);
                            format::identity_set_blooms(set.chunks_exact(4).map(|c| le32(c, 0)))
                        });
                        filter.add_pods(rule_bloom);
                        policy_bloom |= bloom;
                    }
                    format::PEER_NETWORKS => {
                        pods_only = false;
                        let cidrs = self.range(SectionId::Networks, range.0, range.1);
                        for cidr in cidrs.chunks_exact(format::CIDR_LEN) {
                            filter.add_cidr(cidr);
                        }
                    }
                    _ => {
                        pods_only = false;
                        filter.add_entity(Entity::from_byte(peer[1]).unwrap_or(Entity::World));
                    }
                }
            }
            if stored != filter.to_bytes() {
                return Err(bad("rule filter differs from the rule"));
            }
            rule_summaries.push((span, location, pods_only, policy_bloom));
        }
        if self.count(SectionId::PolicyFilters) != self.count(SectionId::Policies) {
            return Err(DecodeError::BadSection(
                "policy-filters does not hold one record per policy",
            ));
        }
        let policies = self.records(SectionId::Policies);
        for (i, (policy, stored)) in policies
            .zip(self.records(SectionId::PolicyFilters))
            .enumerate()
        {
            let (first, count) = (le32(policy, 20), le32(policy, 24));
            let mut summary = format::PolicySummary::new(first, count, policy[1]);
            let rules = rule_summaries
                .iter()
                .skip(first as usize)
                .take(count as usize);
            for (span, location, pods_only, bloom) in rules {
                summary.add_rule(*span, *location, *pods_only);
                summary.add_pods(*bloom);
            }
            if stored != summary.to_bytes() {
                return Err(DecodeError::BadRecord {
                    section: name_of(SectionId::PolicyFilters),
                    index: i,
                    problem: "summary differs from the policy's rules",
                });
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), DecodeError> {
        let bad =
            |section: SectionId, index: usize, problem: &'static str| DecodeError::BadRecord {
                section: name_of(section),
                index,
                problem,
            };
        let check_range = |from: SectionId, index: usize, to: SectionId, offset: u32, len: u32| {
            let end = u64::from(offset) + u64::from(len);
            if end > self.count(to) as u64 {
                Err(bad(from, index, "range points past its target section"))
            } else {
                Ok(())
            }
        };
        let check_str =
            |from: SectionId, index: usize, table: SectionId, record: &[u8], at: usize| {
                let (offset, len) = (le32(record, at), le32(record, at + 4));
                check_range(from, index, table, offset, len)?;
                std::str::from_utf8(self.range(table, offset, len))
                    .map(|_| ())
                    .map_err(|_| bad(from, index, "string is not UTF-8"))
            };
        if self.header_own_node() as usize >= self.count(SectionId::Nodes) {
            return Err(DecodeError::BadSection("own node index out of range"));
        }
        let default = &self.bytes[format::OFF_DEFAULT_TRANSPORT..format::OFF_DEFAULT_TRANSPORT + 2];
        if Stack::from_byte(default[0]).is_none()
            || CongestionControl::from_byte(default[1]).is_none()
        {
            return Err(DecodeError::BadSection(
                "default transport holds an unknown value",
            ));
        }
        let zones = self.count(SectionId::Zones) as u32;
        let nodes = self.count(SectionId::Nodes) as u32;
        for (i, r) in self.records(SectionId::Zones).enumerate() {
            check_str(SectionId::Zones, i, SectionId::SharedStrings, r, 0)?;
        }
        for (i, r) in self.records(SectionId::Nodes).enumerate() {
            check_str(SectionId::Nodes, i, SectionId::SharedStrings, r, 0)?;
            let zone = le32(r, 8);
            if zone != NO_ZONE && zone >= zones {
                return Err(bad(SectionId::Nodes, i, "zone out of range"));
            }
        }
        for id in [SectionId::ClusterNetworks, SectionId::Networks] {
            for (i, r) in self.records(id).enumerate() {
                let ok = match r[16] {
                    4 => r[17] <= 32,
                    6 => r[17] <= 128,
                    _ => false,
                };
                if !ok {
                    return Err(bad(id, i, "bad CIDR family or prefix"));
                }
            }
        }
        let mut free = 0usize;
        for (i, r) in self.records(SectionId::Addresses4).enumerate() {
            if r[4] == format::EMPTY_SLOT {
                free += 1;
                continue;
            }
            check_address_tail(&r[4..], nodes).map_err(|p| bad(SectionId::Addresses4, i, p))?;
            // Reachable by its own probe sequence, and the first slot holding its address:
            // a lookup finds exactly this record.
            if self.address4(le32(r, 0)) != Some(i) {
                return Err(bad(
                    SectionId::Addresses4,
                    i,
                    "address not in its probe sequence",
                ));
            }
        }
        if free == 0 {
            return Err(DecodeError::BadSection("addresses4 has no free slot"));
        }
        let mut previous6: Option<&[u8]> = None;
        for (i, r) in self.records(SectionId::Addresses6).enumerate() {
            if previous6.is_some_and(|p| p >= &r[..16]) {
                return Err(bad(SectionId::Addresses6, i, "not sorted"));
            }
            previous6 = Some(&r[..16]);
            check_address_tail(&r[16..], nodes).map_err(|p| bad(SectionId::Addresses6, i, p))?;
        }
        let mut previous_service: Option<(u8, &[u8], u16, u8)> = None;
        for (i, r) in self.records(SectionId::Services).enumerate() {
            let key = (r[16], &r[..16], le16(r, 18), r[17]);
            if !matches!(r[16], 4 | 6) || Protocol::from_byte(r[17]).is_none() {
                return Err(bad(SectionId::Services, i, "bad family or protocol"));
            }
            if previous_service.is_some_and(|p| p >= key) {
                return Err(bad(SectionId::Services, i, "not sorted"));
            }
            previous_service = Some(key);
            check_range(
                SectionId::Services,
                i,
                SectionId::Backends,
                le32(r, 20),
                le32(r, 24),
            )?;
        }
        for (i, r) in self.records(SectionId::Backends).enumerate() {
            if !matches!(r[16], 4 | 6) {
                return Err(bad(SectionId::Backends, i, "bad family"));
            }
            // What a lookup groups backends by must be what the address book says.
            let (identity, node) = match self.classify(backend_address(r)).0 {
                DestinationClass::Pod { identity, node } => (identity, node),
                _ => (NO_IDENTITY, format::NO_NODE),
            };
            let zone = if node == format::NO_NODE {
                NO_ZONE
            } else {
                le32(self.record(SectionId::Nodes, node as usize), 8)
            };
            if (le32(r, 20), le32(r, 24), le32(r, 28)) != (identity, node, zone) {
                return Err(bad(
                    SectionId::Backends,
                    i,
                    "identity, node or zone differs from the address book",
                ));
            }
        }
        for (i, service) in self.records(SectionId::Services).enumerate() {
            let backends = self.range(SectionId::Backends, le32(service, 20), le32(service, 24));
            let sorted = backends
                .chunks_exact(format::BACKEND_LEN)
                .map(backend_key)
                .is_sorted();
            if !sorted {
                return Err(bad(SectionId::Services, i, "backends not sorted"));
            }
        }
        for (i, r) in self.records(SectionId::Peers).enumerate() {
            match r[0] {
                format::PEER_PODS => {
                    check_range(
                        SectionId::Peers,
                        i,
                        SectionId::IdentitySets,
                        le32(r, 4),
                        le32(r, 8),
                    )?;
                    let set = self.range(SectionId::IdentitySets, le32(r, 4), le32(r, 8));
                    let sorted = set.chunks_exact(4).map(|c| le32(c, 0)).is_sorted();
                    if !sorted {
                        return Err(bad(SectionId::Peers, i, "identity set not sorted"));
                    }
                }
                format::PEER_NETWORKS => check_range(
                    SectionId::Peers,
                    i,
                    SectionId::Networks,
                    le32(r, 4),
                    le32(r, 8),
                )?,
                format::PEER_ENTITY => {
                    if Entity::from_byte(r[1]).is_none() {
                        return Err(bad(SectionId::Peers, i, "unknown entity"));
                    }
                }
                _ => return Err(bad(SectionId::Peers, i, "unknown peer kind")),
            }
        }
        for (i, r) in self.records(SectionId::Ports).enumerate() {
            if Protocol::from_byte(r[0]).is_none() || le16(r, 2) > le16(r, 4) {
                return Err(bad(SectionId::Ports, i, "bad protocol or range"));
            }
        }
        for (i, r) in self.records(SectionId::Transports).enumerate() {
            if Stack::from_byte(r[0]).is_none() || CongestionControl::from_byte(r[1]).is_none() {
                return Err(bad(
                    SectionId::Transports,
                    i,
                    "unknown stack or congestion control",
                ));
            }
        }
        for (i, r) in self.records(SectionId::Rules).enumerate() {
            check_str(SectionId::Rules, i, SectionId::NodeStrings, r, 0)?;
            if Action::from_byte(r[8]).is_none()
                || LocationMatch::from_byte(r[9]).is_none()
                || Isolation::from_byte(r[10]).is_none()
            {
                return Err(bad(
                    SectionId::Rules,
                    i,
                    "unknown action, location or isolation",
                ));
            }
            check_range(
                SectionId::Rules,
                i,
                SectionId::Peers,
                le32(r, 12),
                le32(r, 16),
            )?;
            check_range(
                SectionId::Rules,
                i,
                SectionId::Ports,
                le32(r, 20),
                le32(r, 24),
            )?;
            check_range(
                SectionId::Rules,
                i,
                SectionId::Transports,
                le32(r, 28),
                le32(r, 32),
            )?;
        }
        self.validate_summaries()?;
        for (i, r) in self.records(SectionId::Policies).enumerate() {
            if PolicyKind::from_byte(r[0]).is_none() || Tier::from_byte(r[1]).is_none() {
                return Err(bad(SectionId::Policies, i, "unknown kind or tier"));
            }
            check_str(SectionId::Policies, i, SectionId::NodeStrings, r, 4)?;
            check_str(SectionId::Policies, i, SectionId::NodeStrings, r, 12)?;
            check_range(
                SectionId::Policies,
                i,
                SectionId::Rules,
                le32(r, 20),
                le32(r, 24),
            )?;
        }
        let policies = self.count(SectionId::Policies) as u32;
        for (i, r) in self.records(SectionId::Chains).enumerate() {
            check_range(
                SectionId::Chains,
                i,
                SectionId::ChainPolicies,
                le32(r, 0),
                le32(r, 4),
            )?;
        }
        for (i, r) in self.records(SectionId::ChainPolicies).enumerate() {
            if le32(r, 0) >= policies {
                return Err(bad(
                    SectionId::ChainPolicies,
                    i,
                    "policy index out of range",
                ));
            }
        }
        let chains = self.count(SectionId::Chains) as u32;
        let mut previous_workload: Option<(&str, &str)> = None;
        for (i, r) in self.records(SectionId::Workloads).enumerate() {
            check_str(SectionId::Workloads, i, SectionId::NodeStrings, r, 0)?;
            check_str(SectionId::Workloads, i, SectionId::NodeStrings, r, 8)?;
            if le32(r, 16) >= chains {
                return Err(bad(SectionId::Workloads, i, "chain index out of range"));
            }
            let key = (
                self.string(SectionId::NodeStrings, r, 0),
                self.string(SectionId::NodeStrings, r, 8),
            );
            if previous_workload.is_some_and(|p| p >= key) {
                return Err(bad(SectionId::Workloads, i, "not sorted"));
            }
            previous_workload = Some(key);
        }
        let workloads = self.count(SectionId::Workloads) as u32;
        let mut previous_address: Option<(u8, &[u8])> = None;
        for (i, r) in self.records(SectionId::WorkloadAddresses).enumerate() {
            let key = (r[16], &r[..16]);
            if !matches!(r[16], 4 | 6) || le32(r, 20) >= workloads {
                return Err(bad(
                    SectionId::WorkloadAddresses,
                    i,
                    "bad family or workload index",
                ));
            }
            if previous_address.is_some_and(|p| p >= key) {
                return Err(bad(SectionId::WorkloadAddresses, i, "not sorted"));
            }
            previous_address = Some(key);
        }
        Ok(())
    }

    fn header_own_node(&self) -> u32 {
        le32(self.bytes, format::OFF_OWN_NODE)
    }

    /// The controller revision this snapshot was compiled at.
    pub fn revision(&self) -> u64 {
        le64(self.bytes, format::OFF_REVISION)
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false for a parsed snapshot; here for symmetry with `len`.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// This node's name.
    pub fn node_name(&self) -> &'a str {
        self.node(self.header_own_node()).0
    }

    /// Name and zone name of a node (`""` when it has no zone).
    pub fn node(&self, node: u32) -> (&'a str, &'a str) {
        let record = self.record(SectionId::Nodes, node as usize);
        let zone = le32(record, 8);
        let zone_name = if zone == NO_ZONE {
            ""
        } else {
            self.string(
                SectionId::SharedStrings,
                self.record(SectionId::Zones, zone as usize),
                0,
            )
        };
        (self.string(SectionId::SharedStrings, record, 0), zone_name)
    }

    /// Number of policies, rules and workloads.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.count(SectionId::Policies),
            self.count(SectionId::Rules),
            self.count(SectionId::Workloads),
        )
    }

    /// Finds a workload by namespace and name.
    pub fn workload_by_name(&self, namespace: &str, name: &str) -> Option<WorkloadId> {
        let count = self.count(SectionId::Workloads);
        let (mut low, mut high) = (0usize, count);
        while low < high {
            let mid = low + (high - low) / 2;
            let record = self.record(SectionId::Workloads, mid);
            let key = (
                self.string(SectionId::NodeStrings, record, 0),
                self.string(SectionId::NodeStrings, record, 8),
            );
            match key.cmp(&(namespace, name)) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Some(WorkloadId(mid as u32)),
            }
        }
        None
    }

    /// Finds a workload by one of its addresses.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<WorkloadId> {
        let (family, bytes) = ip_key(ip.to_canonical());
        let index = self.search(SectionId::WorkloadAddresses, |r| {
            (r[16], &r[..16]).cmp(&(family, &bytes[..]))
        })?;
        Some(WorkloadId(le32(
            self.record(SectionId::WorkloadAddresses, index),
            20,
        )))
    }

    /// Namespace and name of a workload.
    pub fn workload(&self, workload: WorkloadId) -> (&'a str, &'a str) {
        let record = self.record(SectionId::Workloads, workload.0 as usize);
        (
            self.string(SectionId::NodeStrings, record, 0),
            self.string(SectionId::NodeStrings, record, 8),
        )
    }

    /// The policy at `index`.
    pub fn policy(&self, index: u32) -> PolicyView<'a> {
        let r = self.record(SectionId::Policies, index as usize);
        PolicyView {
            kind: r
                .first()
                .and_then(|b| PolicyKind::from_byte(*b))
                .unwrap_or(PolicyKind::StackRoute),
            tier: r
                .get(1)
                .and_then(|b| Tier::from_byte(*b))
                .unwrap_or(Tier::Namespace),
            priority: le16(r, 2),
            namespace: self.string(SectionId::NodeStrings, r, 4),
            name: self.string(SectionId::NodeStrings, r, 12),
            rule_count: le32(r, 24),
        }
    }

    /// The rule `rule`.
    pub fn rule(&self, rule: RuleRef) -> RuleView<'a> {
        let policy = self.record(SectionId::Policies, rule.policy as usize);
        let r = self.record(
            SectionId::Rules,
            le32(policy, 20).saturating_add(rule.rule) as usize,
        );
        RuleView {
            name: self.string(SectionId::NodeStrings, r, 0),
            action: r
                .get(8)
                .and_then(|b| Action::from_byte(*b))
                .unwrap_or(Action::Route),
            location: r
                .get(9)
                .and_then(|b| LocationMatch::from_byte(*b))
                .unwrap_or(LocationMatch::Any),
            isolation: r
                .get(10)
                .and_then(|b| Isolation::from_byte(*b))
                .unwrap_or(Isolation::None),
            has_peers: r.get(11).is_some_and(|f| f & format::RULE_HAS_PEERS != 0),
            has_ports: r.get(11).is_some_and(|f| f & format::RULE_HAS_PORTS != 0),
            ports: self.range(SectionId::Ports, le32(r, 20), le32(r, 24)),
            gate: RuleGate::from_flags(r.get(11).copied().unwrap_or(0)),
            transports: self.range(SectionId::Transports, le32(r, 28), le32(r, 32)),
        }
    }

    /// Classifies a destination: its address book entry and its location from this node.
    pub fn classify(&self, ip: IpAddr) -> (DestinationClass, Location) {
        let ip = ip.to_canonical();
        let found = match ip {
            IpAddr::V4(v4) => {
                let key = u32::from(v4);
                self.address4(key)
                    .and_then(|i| self.record(SectionId::Addresses4, i).get(4..))
            }
            IpAddr::V6(v6) => {
                let key = v6.octets();
                self.search(SectionId::Addresses6, |r| r.get(..16).cmp(&Some(&key[..])))
                    .and_then(|i| self.record(SectionId::Addresses6, i).get(16..))
            }
        };
        let Some(tail) = found else {
            let inside = self
                .records(SectionId::ClusterNetworks)
                .any(|r| cidr_contains(r, ip));
            return (
                DestinationClass::Unknown,
                if inside {
                    Location::SameCluster
                } else {
                    Location::External
                },
            );
        };
        let node = le32(tail, 8);
        let class = if tail.first() == Some(&format::ADDRESS_POD) {
            DestinationClass::Pod {
                identity: le32(tail, 4),
                node,
            }
        } else {
            DestinationClass::Node { node }
        };
        let own = self.header_own_node();
        let location = if node == own {
            Location::SameNode
        } else {
            let zone_of = |n: u32| le32(self.record(SectionId::Nodes, n as usize), 8);
            let own_zone = zone_of(own);
            if own_zone != NO_ZONE && zone_of(node) == own_zone {
                Location::SameZone
            } else {
                Location::SameCluster
            }
        };
        (class, location)
    }

    /// The `Addresses4` slot holding `ip`.
    fn address4(&self, ip: u32) -> Option<usize> {
        let slots = self.count(SectionId::Addresses4);
        let (table, _) = self.section(SectionId::Addresses4).as_chunks::<16>();
        let mut slot = format::address4_slot(ip, slots);
        // Validation guarantees a free slot, so the probe ends; the bound is belt and braces.
        for _ in 0..slots {
            let record = table.get(slot)?;
            if record[4] == format::EMPTY_SLOT {
                return None;
            }
            if le32(record, 0) == ip {
                return Some(slot);
            }
            slot = if slot + 1 == slots { 0 } else { slot + 1 };
        }
        None
    }

    fn search(
        &self,
        id: SectionId,
        compare: impl Fn(&[u8]) -> std::cmp::Ordering,
    ) -> Option<usize> {
        let (mut low, mut high) = (0usize, self.count(id));
        while low < high {
            let mid = low + (high - low) / 2;
            match compare(self.record(id, mid)) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Some(mid),
            }
        }
        None
    }

    fn default_decision(&self, location: Location, via: Via) -> Decision<'a> {
        Decision {
            location,
            matched: None,
            isolation: Isolation::None,
            via,
            transports: &self.bytes
                [format::OFF_DEFAULT_TRANSPORT..format::OFF_DEFAULT_TRANSPORT + 2],
        }
    }

    /// The backend a connection to the Service frontend `ip:port` goes to when the user-space
    /// stack carries it (its packets skip the pod's netfilter, so kube-proxy never rewrites
    /// them): the nearest ready backends first (same node, then same zone, then the rest, as
    /// `classify` places them), one of those chosen by `spread` (e.g. a hash of the local
    /// port), so connections spread over equals. `None` when `ip:port` is no Service frontend
    /// or it has no ready backend. Allocation-free.
    pub fn service_backend(
        &self,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
        spread: u64,
    ) -> Option<(IpAddr, u16)> {
        let ip = ip.to_canonical();
        let (family, key) = ip_key(ip);
        if self.count(SectionId::Services) == 0 {
            return None;
        }
        let service = self.search(SectionId::Services, |r| {
            (r[16], &r[..16], le16(r, 18), r[17]).cmp(&(family, &key[..], port, protocol as u8))
        })?;
        let record = self.record(SectionId::Services, service);
        let backends = self.range(SectionId::Backends, le32(record, 20), le32(record, 24));
        let nearest = backends
            .chunks_exact(SectionId::Backends.record_len())
            .map(|b| self.classify(backend_address(b)).1 as u8)
            .min()?;
        let at_nearest = || {
            backends
                .chunks_exact(SectionId::Backends.record_len())
                .filter(move |b| self.classify(backend_address(b)).1 as u8 == nearest)
        };
        let count = at_nearest().count() as u64;
        let chosen = at_nearest().nth((spread % count.max(1)) as usize)?;
        Some((backend_address(chosen), le16(chosen, 18)))
    }

    /// Decides the transport for a connection from `workload` to `ip:port` over `protocol`.
    ///
    /// A Service frontend is resolved to its ready backends; when they all get the same
    /// outcome that is the decision, otherwise the installation default (the kernel picks the
    /// backend after `connect()`, so nothing else is safe). Allocation-free.
    pub fn decide<T: Trace>(
        &self,
        workload: WorkloadId,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
        trace: &mut T,
    ) -> Decision<'a> {
        let ip = ip.to_canonical();
        let (family, key) = ip_key(ip);
        // ClusterIPs come from one service range: most destinations fall outside the first and
        // last frontend, and skip the search.
        let services = self.count(SectionId::Services);
        let outside = |index: usize, ordering| {
            let r = self.record(SectionId::Services, index);
            (family, &key[..]).cmp(&(r[16], &r[..16])) == ordering
        };
        let service = if services == 0
            || outside(0, std::cmp::Ordering::Less)
            || outside(services - 1, std::cmp::Ordering::Greater)
        {
            None
        } else {
            self.search(SectionId::Services, |r| {
                (r[16], &r[..16], le16(r, 18), r[17]).cmp(&(family, &key[..], port, protocol as u8))
            })
        };
        let Some(service) = service else {
            trace.backend(None);
            return self.decide_direct(
                workload,
                ip,
                port,
                protocol,
                trace,
                &mut Default::default(),
            );
        };
        let record = self.record(SectionId::Services, service);
        let backends = self.range(SectionId::Backends, le32(record, 20), le32(record, 24));
        let count = (backends.len() / SectionId::Backends.record_len()) as u32;
        let (_, frontend_location) = self.classify(ip);
        if !trace.detailed() {
            return match self.decide_backends(workload, backends, protocol) {
                // Reported as the rule-by-rule walk does: where the first backend is.
                Some(decision) => Decision {
                    via: Via::ServiceUnanimous { backends: count },
                    location: self.classify(backend_address(backends)).1,
                    ..decision
                },
                None => self
                    .default_decision(frontend_location, Via::ServiceAmbiguous { backends: count }),
            };
        }
        let mut agreed: Option<Decision<'a>> = None;
        let mut unanimous = count > 0;
        for backend in backends.chunks_exact(SectionId::Backends.record_len()) {
            let backend_ip = backend_address(backend);
            let backend_port = le16(backend, 18);
            trace.backend(Some((backend_ip, backend_port)));
            let decision = self.decide_direct(
                workload,
                backend_ip,
                backend_port,
                protocol,
                trace,
                &mut Default::default(),
            );
            match &agreed {
                None => agreed = Some(decision),
                Some(first) if !first.same_outcome(&decision) => {
                    unanimous = false;
                    if !trace.detailed() {
                        break;
                    }
                }
                Some(_) => {}
            }
        }
        match agreed {
            Some(decision) if unanimous => Decision {
                via: Via::ServiceUnanimous { backends: count },
                ..decision
            },
            _ => {
                self.default_decision(frontend_location, Via::ServiceAmbiguous { backends: count })
            }
        }
    }

    /// The fast path's decision for a Service's backends: `Some` when they all get the same
    /// outcome. Backends are sorted so that pod backends of one identity and port form a run,
    /// ordered by zone and node inside it; within a run only the location and the address can
    /// change a decision. So each location present (own node, own zone, elsewhere: at most three
    /// groups) is decided once for one backend, and the rest of its group shares that decision
    /// if its address is on the same side of every CIDR that decision checked — else it is
    /// decided on its own.
    fn decide_backends(
        &self,
        workload: WorkloadId,
        backends: &'a [u8],
        protocol: Protocol,
    ) -> Option<Decision<'a>> {
        let (records, _) = backends.as_chunks::<{ format::BACKEND_LEN }>();
        let own = self.header_own_node();
        let own_zone = le32(self.record(SectionId::Nodes, own as usize), 8);
        let mut agreed: Option<Decision<'a>> = None;
        let mut start = 0;
        while let Some(first) = records.get(start) {
            let (identity, port) = (le32(first, 20), le16(first, 18));
            let run_len = if identity == NO_IDENTITY {
                1 // not a pod: nothing to share with other backends
            } else {
                records[start..].partition_point(|b| (le32(b, 20), le16(b, 18)) == (identity, port))
            };
            let run = &records[start..start + run_len];
            start += run_len;
            let zone = run.partition_point(|b| le32(b, 28) < own_zone)
                ..run.partition_point(|b| le32(b, 28) <= own_zone);
            let in_zone = &run[zone.clone()];
            let node = zone.start + in_zone.partition_point(|b| le32(b, 24) < own)
                ..zone.start + in_zone.partition_point(|b| le32(b, 24) <= own);
            // The groups, as (range, excluded subrange) of the run.
            let elsewhere = if own_zone == NO_ZONE {
                node.clone()
            } else {
                zone.clone()
            };
            let same_zone = if own_zone == NO_ZONE {
                0..0
            } else {
                zone.clone()
            };
            let groups = [
                (node.clone(), 0..0),
                (same_zone, node.clone()),
                (0..run.len(), elsewhere),
            ];
            for (range, excluded) in groups {
                let mut members = range.filter(|i| !excluded.contains(i)).map(|i| &run[i]);
                let Some(representative) = members.next() else {
                    continue;
                };
                let mut same = format::SameAddresses::default();
                let decision = self.decide_direct(
                    workload,
                    backend_address(representative),
                    port,
                    protocol,
                    &mut NoTrace,
                    &mut same,
                );
                if !agree(&mut agreed, decision) {
                    return None;
                }
                for backend in members {
                    let ip = backend_address(backend);
                    if same.contains(ip) {
                        continue;
                    }
                    let decision = self.decide_direct(
                        workload,
                        ip,
                        port,
                        protocol,
                        &mut NoTrace,
                        &mut Default::default(),
                    );
                    if !agree(&mut agreed, decision) {
                        return None;
                    }
                }
            }
        }
        agreed
    }

    /// Decides one destination address. `same` is narrowed to the addresses whose networks
    /// checks would come out the same (with the same identity and location, they get the same
    /// decision).
    fn decide_direct<T: Trace>(
        &self,
        workload: WorkloadId,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
        trace: &mut T,
        same: &mut format::SameAddresses,
    ) -> Decision<'a> {
        let (class, location) = self.classify(ip);
        let chain = self.record(
            SectionId::Chains,
            le32(self.record(SectionId::Workloads, workload.0 as usize), 16) as usize,
        );
        let policies = self.range(SectionId::ChainPolicies, le32(chain, 0), le32(chain, 4));
        let destination = Destination {
            class,
            location,
            ip,
            port,
            protocol,
        };
        let mut passed_tier: Option<u8> = None;
        // The fast path (no trace) rejects most rules on their 24-byte filter alone.
        let use_filters = !trace.detailed();
        let probe = format::FilterProbe {
            port,
            protocol_bit: crate::encode::protocol_bit(protocol),
            location_bit: 1 << (location as u8),
            identity_mask: match class {
                DestinationClass::Pod { identity, .. } if identity != NO_IDENTITY => {
                    format::rule_bloom_mask(identity)
                }
                _ => 0,
            },
            policy_identity_mask: match class {
                DestinationClass::Pod { identity, .. } if identity != NO_IDENTITY => {
                    format::policy_bloom_mask(identity)
                }
                _ => 0,
            },
            v4: match ip {
                IpAddr::V4(v4) => Some(u32::from(v4)),
                IpAddr::V6(_) => None,
            },
        };
        let (policy_filters, _) = self
            .section(SectionId::PolicyFilters)
            .as_chunks::<{ format::POLICY_FILTER_LEN }>();
        for policy_index in policies.chunks_exact(4).map(|c| le32(c, 0)) {
            let Some(policy) = policy_filters.get(policy_index as usize) else {
                continue; // validated: every chain entry names a policy
            };
            // A Pass ends its own tier only.
            let tier = policy[15];
            let first_rule = le32(policy, 0);
            let rule_count = le32(policy, 4);
            if passed_tier == Some(tier) {
                for rule in 0..rule_count {
                    trace.rule(
                        RuleRef {
                            policy: policy_index,
                            rule,
                        },
                        Verdict::SkippedByPass,
                    );
                }
                continue;
            }
            if use_filters && !probe.admits_policy(policy) {
                // Only the fast path gets here, and it does not report reasons.
                for rule in 0..rule_count {
                    trace.rule(
                        RuleRef {
                            policy: policy_index,
                            rule,
                        },
                        Verdict::NoMatch(Mismatch::Peer),
                    );
                }
                continue;
            }
            let records = self.range(SectionId::Rules, first_rule, rule_count);
            let (filters, _) = self
                .range(SectionId::RuleFilters, first_rule, rule_count)
                .as_chunks::<{ format::RULE_FILTER_LEN }>();
            for ((rule, record), filter) in (0..rule_count)
                .zip(records.chunks_exact(format::RULE_LEN))
                .zip(filters)
            {
                let reference = RuleRef {
                    policy: policy_index,
                    rule,
                };
                if use_filters && !probe.admits(filter, same) {
                    // Only the fast path gets here, and it does not report reasons.
                    trace.rule(reference, Verdict::NoMatch(Mismatch::Peer));
                    continue;
                }
                match self.rule_matches(record, &destination, same) {
                    Err(mismatch) => trace.rule(reference, Verdict::NoMatch(mismatch)),
                    Ok(()) if record.get(8) == Some(&(Action::Pass as u8)) => {
                        trace.rule(reference, Verdict::Passed);
                        passed_tier = Some(tier);
                        for skipped in rule + 1..rule_count {
                            trace.rule(
                                RuleRef {
                                    policy: policy_index,
                                    rule: skipped,
                                },
                                Verdict::SkippedByPass,
                            );
                        }
                        break;
                    }
                    Ok(()) => {
                        trace.rule(reference, Verdict::Matched);
                        return Decision {
                            location,
                            matched: Some(reference),
                            isolation: record
                                .get(10)
                                .and_then(|b| Isolation::from_byte(*b))
                                .unwrap_or(Isolation::None),
                            via: Via::Direct,
                            transports: self.range(
                                SectionId::Transports,
                                le32(record, 28),
                                le32(record, 32),
                            ),
                        };
                    }
                }
            }
        }
        self.default_decision(location, Via::Direct)
    }

    fn rule_matches(
        &self,
        rule: &[u8],
        to: &Destination,
        same: &mut format::SameAddresses,
    ) -> Result<(), Mismatch> {
        let Destination {
            class,
            location,
            ip,
            port,
            protocol,
        } = *to;
        let flags = rule.get(11).copied().unwrap_or(0);
        if flags & format::RULE_HAS_PORTS != 0 {
            let protocols = rule.get(40).copied().unwrap_or(0xff);
            if protocols & crate::encode::protocol_bit(protocol) == 0
                || port < le16(rule, 36)
                || port > le16(rule, 38)
            {
                return Err(Mismatch::Port);
            }
            // With one port entry the span (validated against it) is the entry: done.
            let count = le32(rule, 24);
            let ports = self.range(SectionId::Ports, le32(rule, 20), count);
            let hit = count == 1
                || ports
                    .chunks_exact(8)
                    .any(|p| p[0] == protocol as u8 && le16(p, 2) <= port && port <= le16(p, 4));
            if !hit {
                return Err(Mismatch::Port);
            }
        }
        let required = rule
            .get(9)
            .and_then(|b| LocationMatch::from_byte(*b))
            .unwrap_or(LocationMatch::Any);
        if !required.admits(location) {
            return Err(Mismatch::Location {
                required,
                actual: location,
            });
        }
        if flags & format::RULE_HAS_PEERS != 0 {
            let peers = self.range(SectionId::Peers, le32(rule, 12), le32(rule, 16));
            let hit = peers.chunks_exact(12).any(|peer| match peer[0] {
                format::PEER_PODS => match class {
                    DestinationClass::Pod { identity, .. } if identity != NO_IDENTITY => {
                        let set = self.range(SectionId::IdentitySets, le32(peer, 4), le32(peer, 8));
                        contains_sorted(set, identity)
                    }
                    _ => false,
                },
                format::PEER_NETWORKS => self
                    .range(SectionId::Networks, le32(peer, 4), le32(peer, 8))
                    .chunks_exact(format::CIDR_LEN)
                    .any(|cidr| match (format::cidr4_span(cidr), ip) {
                        (Some((first, last)), IpAddr::V4(v4)) => {
                            same.narrow(u32::from(v4), first, last)
                        }
                        (None, IpAddr::V6(_)) => {
                            same.only_this();
                            cidr_contains(cidr, ip)
                        }
                        _ => false, // the other family: false for every address of this one
                    }),
                format::PEER_ENTITY => {
                    Entity::from_byte(peer[1]).is_some_and(|e| e.admits(location))
                }
                _ => false,
            });
            if !hit {
                return Err(Mismatch::Peer);
            }
        }
        Ok(())
    }

    /// Renders a peer list for explain output: one string per peer.
    pub fn describe_peers(&self, rule: RuleRef) -> Vec<String> {
        let policy = self.record(SectionId::Policies, rule.policy as usize);
        let record = self.record(
            SectionId::Rules,
            le32(policy, 20).saturating_add(rule.rule) as usize,
        );
        let peers = self.range(SectionId::Peers, le32(record, 12), le32(record, 16));
        peers
            .chunks_exact(12)
            .map(|peer| match peer[0] {
                format::PEER_PODS => format!("pods ({} identities)", le32(peer, 8)),
                format::PEER_NETWORKS => {
                    let nets: Vec<String> = self
                        .range(SectionId::Networks, le32(peer, 4), le32(peer, 8))
                        .chunks_exact(format::CIDR_LEN)
                        .map(|c| format!("{}/{}", cidr_address(c), c[17]))
                        .collect();
                    format!("networks [{}]", nets.join(", "))
                }
                _ => format!(
                    "entity {}",
                    Entity::from_byte(peer[1]).map_or("?", Entity::as_str)
                ),
            })
            .collect()
    }
}

/// Whether the policy's summary proves that none of its rules can match; the mismatch every
/// rule would report first. Exact: it only skips what rule-by-rule evaluation would reject.
fn check_address_tail(tail: &[u8], nodes: u32) -> Result<(), &'static str> {
    if !matches!(tail[0], format::ADDRESS_POD | format::ADDRESS_NODE) {
        return Err("unknown address kind");
    }
    if le32(tail, 8) >= nodes {
        return Err("node out of range");
    }
    Ok(())
}

fn contains_sorted(set: &[u8], identity: u32) -> bool {
    let (mut low, mut high) = (0usize, set.len() / 4);
    while low < high {
        let mid = low + (high - low) / 2;
        match le32(set, mid * 4).cmp(&identity) {
            std::cmp::Ordering::Less => low = mid + 1,
            std::cmp::Ordering::Greater => high = mid,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

fn cidr_address(record: &[u8]) -> IpAddr {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&record[..16]);
    if record[16] == 4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

/// A connection's destination as the rules see it.
#[derive(Clone, Copy, Debug)]
struct Destination {
    class: DestinationClass,
    location: Location,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
}

/// Keeps the first decision and says whether `decision` has the same outcome.
fn agree<'a>(agreed: &mut Option<Decision<'a>>, decision: Decision<'a>) -> bool {
    match agreed {
        None => {
            *agreed = Some(decision);
            true
        }
        Some(first) => first.same_outcome(&decision),
    }
}

/// The order of a Service's backends: (identity, port, zone, node, address).
fn backend_key(record: &[u8]) -> (u32, u16, u32, u32, u8, &[u8]) {
    (
        le32(record, 20),
        le16(record, 18),
        le32(record, 28),
        le32(record, 24),
        record[16],
        &record[..16],
    )
}

fn backend_address(record: &[u8]) -> IpAddr {
    cidr_address(record)
}

fn cidr_contains(record: &[u8], ip: IpAddr) -> bool {
    // Masked integer comparison: this runs for every networks peer of every rule scanned.
    let (Some(bytes), Some(&family), Some(&prefix)) =
        (record.get(..16), record.get(16), record.get(17))
    else {
        return false;
    };
    match (family, ip) {
        (4, IpAddr::V4(ip)) => {
            let net = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            (net ^ u32::from(ip)) & mask == 0
        }
        (6, IpAddr::V6(ip)) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(bytes);
            let net = u128::from_be_bytes(octets);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            (net ^ u128::from(ip)) & mask == 0
        }
        _ => false,
    }
}
