//! Reading a snapshot in place and deciding connections.

mod decide;
mod validate;
mod verdicts;

pub use verdicts::SERVICE_VERDICT_DECISIONS;

use std::net::IpAddr;

use crate::encode::ip_key;
use crate::format::{
    self, SectionId, address4, address6, backend, cidr, directory, endpoint_address, header,
    identity_set, identity_set_range, node, peer, policy, port, rule, service, transport, workload,
    workload_address, zone,
};
use crate::{
    Action, CongestionControl, Entity, Isolation, Location, LocationMatch, NO_ZONE, PolicyKind,
    Protocol, RuleGate, Stack, Tier, TransportChoice,
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
        self.transports
            .chunks_exact(transport::LEN)
            .filter_map(transport_choice)
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
        self.ports.chunks_exact(port::LEN).filter_map(|r| {
            let protocol = Protocol::from_byte(port::PROTOCOL.get(r))?;
            Some((protocol, port::FIRST.get(r), port::LAST.get(r)))
        })
    }

    /// The transports, in order.
    pub fn transports(&self) -> impl Iterator<Item = TransportChoice> + 'a {
        self.transports
            .chunks_exact(transport::LEN)
            .filter_map(transport_choice)
    }
}

/// A transports record (or the header's default), when both bytes are known values.
fn transport_choice(record: &[u8]) -> Option<TransportChoice> {
    Some(TransportChoice {
        stack: Stack::from_byte(transport::STACK.get(record))?,
        congestion_control: CongestionControl::from_byte(
            transport::CONGESTION_CONTROL.get(record),
        )?,
    })
}

fn name_of(id: SectionId) -> &'static str {
    id.name()
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
        if header::MAGIC.get(bytes) != format::MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = header::VERSION.get(bytes);
        if version != format::VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let total = header::TOTAL_LEN.get(bytes);
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
        let stored = header::CRC.get(bytes);
        let computed = format::checksum(bytes);
        if stored != computed {
            return Err(DecodeError::ChecksumMismatch { stored, computed });
        }
        let count = header::SECTION_COUNT.get(bytes) as usize;
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
            let id = directory::ID.get(entry);
            let Some(section) = SectionId::from_id(id) else {
                continue; // unknown sections are allowed: a later minor revision may add some
            };
            let offset = directory::OFFSET.get(entry) as usize;
            let len = directory::SIZE.get(entry) as usize;
            let record = directory::RECORD_SIZE.get(entry) as usize;
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
            let id = SectionId::ALL[index];
            found[index] = match section {
                Some(body) => body,
                None if id.is_optional() => &[],
                None => return Err(DecodeError::BadSection(name_of(id))),
            };
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
    fn slice(&self, id: SectionId, offset: u32, len: u32) -> &'a [u8] {
        let size = id.record_len();
        let start = offset as usize * size;
        start
            .checked_add(len as usize * size)
            .and_then(|end| self.section(id).get(start..end))
            .unwrap_or(&[])
    }

    /// The records a range field of `record` points to, or nothing when out of range.
    #[inline]
    fn range(&self, record: &[u8], field: format::Range) -> &'a [u8] {
        let (offset, len) = field.get(record);
        self.slice(field.target, offset, len)
    }

    /// The string a string field of `record` points to, or `""` when out of range.
    /// The identities of identity set `set`, ascending (validated: every peer's set exists).
    pub(crate) fn identity_set(&self, set: u32) -> &'a [u8] {
        let at = set as usize * identity_set_range::LEN;
        self.section(SectionId::IdentitySetRanges)
            .get(at..at + identity_set_range::LEN)
            .map_or(&[], |range| self.range(range, identity_set_range::MEMBERS))
    }

    fn string(&self, record: &[u8], field: format::Str) -> &'a str {
        let (offset, len) = field.get(record);
        std::str::from_utf8(self.slice(field.table, offset, len)).unwrap_or("")
    }

    fn header_own_node(&self) -> u32 {
        header::OWN_NODE.get(self.bytes)
    }

    /// The controller revision this snapshot was compiled at.
    pub fn revision(&self) -> u64 {
        header::REVISION.get(self.bytes)
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
        let zone = node::ZONE.get(record);
        let zone_name = if zone == NO_ZONE {
            ""
        } else {
            self.string(self.record(SectionId::Zones, zone as usize), zone::NAME)
        };
        (self.string(record, node::NAME), zone_name)
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
            let key = self.workload(WorkloadId(mid as u32));
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
            let stored = (workload_address::FAMILY.get(r), workload_address::IP.get(r));
            stored.cmp(&(family, bytes))
        })?;
        let record = self.record(SectionId::WorkloadAddresses, index);
        Some(WorkloadId(workload_address::WORKLOAD.get(record)))
    }

    /// Namespace and name of a workload.
    pub fn workload(&self, workload: WorkloadId) -> (&'a str, &'a str) {
        let record = self.record(SectionId::Workloads, workload.0 as usize);
        (
            self.string(record, workload::NAMESPACE),
            self.string(record, workload::NAME),
        )
    }

    /// The policy at `index`.
    pub fn policy(&self, index: u32) -> PolicyView<'a> {
        let r = self.record(SectionId::Policies, index as usize);
        PolicyView {
            kind: policy::KIND.decode_or(r, PolicyKind::from_byte, PolicyKind::StackRoute),
            tier: policy::TIER.decode_or(r, Tier::from_byte, Tier::Namespace),
            priority: policy::PRIORITY.get(r),
            namespace: self.string(r, policy::NAMESPACE),
            name: self.string(r, policy::NAME),
            rule_count: policy::RULES.get(r).1,
        }
    }

    /// The rule `reference` names.
    pub fn rule(&self, reference: RuleRef) -> RuleView<'a> {
        let r = self.rule_record(reference);
        let flags = rule::FLAGS.get(r);
        RuleView {
            name: self.string(r, rule::NAME),
            action: rule::ACTION.decode_or(r, Action::from_byte, Action::Route),
            location: rule::LOCATION.decode_or(r, LocationMatch::from_byte, LocationMatch::Any),
            isolation: rule::ISOLATION.decode_or(r, Isolation::from_byte, Isolation::None),
            has_peers: flags & format::RULE_HAS_PEERS != 0,
            has_ports: flags & format::RULE_HAS_PORTS != 0,
            ports: self.range(r, rule::PORTS),
            gate: RuleGate::from_flags(flags),
            transports: self.range(r, rule::TRANSPORTS),
        }
    }

    /// The record of a rule, or an empty one when out of range.
    fn rule_record(&self, reference: RuleRef) -> &'a [u8] {
        let policy = self.record(SectionId::Policies, reference.policy as usize);
        let first = policy::RULES.get(policy).0;
        self.record(
            SectionId::Rules,
            first.saturating_add(reference.rule) as usize,
        )
    }

    /// Classifies a destination: its address book entry and its location from this node.
    pub fn classify(&self, ip: IpAddr) -> (DestinationClass, Location) {
        let ip = ip.to_canonical();
        // (kind, identity, node) of the address book entry.
        let found = match ip {
            IpAddr::V4(v4) => self.address4(u32::from(v4)).map(|i| {
                use address4::{IDENTITY, KIND, NODE};
                let r = self.record(SectionId::Addresses4, i);
                (KIND.get(r), IDENTITY.get(r), NODE.get(r))
            }),
            IpAddr::V6(v6) => {
                let key = v6.octets();
                let found = self.search(SectionId::Addresses6, |r| address6::IP.get(r).cmp(&key));
                found.map(|i| {
                    use address6::{IDENTITY, KIND, NODE};
                    let r = self.record(SectionId::Addresses6, i);
                    (KIND.get(r), IDENTITY.get(r), NODE.get(r))
                })
            }
        };
        let Some((kind, identity, node)) = found else {
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
        let class = if kind == format::ADDRESS_POD {
            DestinationClass::Pod { identity, node }
        } else {
            DestinationClass::Node { node }
        };
        let own = self.header_own_node();
        let location = if node == own {
            Location::SameNode
        } else {
            let own_zone = self.zone_of(own);
            if own_zone != NO_ZONE && self.zone_of(node) == own_zone {
                Location::SameZone
            } else {
                Location::SameCluster
            }
        };
        (class, location)
    }

    /// The zone of a node (`NO_ZONE` for an unknown node too: its record reads empty).
    #[inline]
    fn zone_of(&self, node: u32) -> u32 {
        node::ZONE.get(self.record(SectionId::Nodes, node as usize))
    }

    /// The `Addresses4` slot holding `ip`.
    fn address4(&self, ip: u32) -> Option<usize> {
        let slots = self.count(SectionId::Addresses4);
        let (table, _) = self
            .section(SectionId::Addresses4)
            .as_chunks::<{ address4::LEN }>();
        let mut slot = format::address4_slot(ip, slots);
        // Validation guarantees a free slot, so the probe ends; the bound is belt and braces.
        for _ in 0..slots {
            let record = table.get(slot)?;
            if address4::KIND.get(record) == format::EMPTY_SLOT {
                return None;
            }
            if address4::IP.get(record) == ip {
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

    /// The address of a Service backend record, read where it points (validated: there is an
    /// address there).
    fn backend_address(&self, record: &[u8]) -> IpAddr {
        let at = backend::ADDRESS.get(record) as usize;
        match backend::SOURCE.get(record) {
            backend::IN_ADDRESSES4 => {
                let entry = self.record(SectionId::Addresses4, at);
                IpAddr::from(address4::IP.get(entry).to_be_bytes())
            }
            backend::IN_ADDRESSES6 => {
                IpAddr::from(address6::IP.get(self.record(SectionId::Addresses6, at)))
            }
            _ => {
                let entry = self.record(SectionId::EndpointAddresses, at);
                stored_address(
                    endpoint_address::FAMILY.get(entry),
                    endpoint_address::IP.get(entry),
                )
            }
        }
    }

    /// The order of a Service's backends: (identity, port, zone, node, family, address).
    fn backend_key(&self, record: &[u8]) -> (u32, u16, u32, u32, u8, [u8; 16]) {
        use backend::{IDENTITY, NODE, PORT, ZONE};
        let (family, address) = ip_key(self.backend_address(record));
        (
            IDENTITY.get(record),
            PORT.get(record),
            ZONE.get(record),
            NODE.get(record),
            family,
            address,
        )
    }

    fn default_decision(&self, location: Location, via: Via) -> Decision<'a> {
        Decision {
            location,
            matched: None,
            isolation: Isolation::None,
            via,
            transports: header::DEFAULT_TRANSPORT.slice(self.bytes),
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
            service_key(r).cmp(&(family, key, port, protocol as u8))
        })?;
        let backends = self.range(self.record(SectionId::Services, service), service::BACKENDS);
        let nearest = backends
            .chunks_exact(backend::LEN)
            .map(|b| self.classify(self.backend_address(b)).1 as u8)
            .min()?;
        let at_nearest = || {
            backends
                .chunks_exact(backend::LEN)
                .filter(move |b| self.classify(self.backend_address(b)).1 as u8 == nearest)
        };
        let count = at_nearest().count() as u64;
        let chosen = at_nearest().nth((spread % count.max(1)) as usize)?;
        Some((self.backend_address(chosen), backend::PORT.get(chosen)))
    }

    /// Renders a peer list for explain output: one string per peer.
    pub fn describe_peers(&self, rule: RuleRef) -> Vec<String> {
        let peers = self.range(self.rule_record(rule), rule::PEERS);
        peers
            .chunks_exact(peer::LEN)
            .map(|p| match peer::KIND.get(p) {
                format::PEER_PODS => {
                    format!(
                        "pods ({} identities)",
                        self.identity_set(peer::IDENTITY_SET.get(p)).len() / identity_set::LEN
                    )
                }
                format::PEER_NETWORKS => {
                    let nets: Vec<String> = self
                        .range(p, peer::NETWORKS)
                        .chunks_exact(cidr::LEN)
                        .map(|c| format!("{}/{}", cidr_address(c), cidr::PREFIX.get(c)))
                        .collect();
                    format!("networks [{}]", nets.join(", "))
                }
                _ => format!(
                    "entity {}",
                    Entity::from_byte(peer::ENTITY.get(p)).map_or("?", Entity::as_str)
                ),
            })
            .collect()
    }
}

/// An address stored as family and 16 bytes (IPv4 in the first four).
fn stored_address(family: u8, bytes: [u8; 16]) -> IpAddr {
    match bytes {
        [a, b, c, d, ..] if family == 4 => IpAddr::from([a, b, c, d]),
        _ => IpAddr::from(bytes),
    }
}

fn cidr_address(record: &[u8]) -> IpAddr {
    stored_address(cidr::FAMILY.get(record), cidr::IP.get(record))
}

/// The order of the `Services` section: (family, ip, port, protocol).
fn service_key(record: &[u8]) -> (u8, [u8; 16], u16, u8) {
    use service::{FAMILY, IP, PORT, PROTOCOL};
    (
        FAMILY.get(record),
        IP.get(record),
        PORT.get(record),
        PROTOCOL.get(record),
    )
}

/// The address of a Service frontend record.
fn service_ip(record: &[u8]) -> IpAddr {
    stored_address(service::FAMILY.get(record), service::IP.get(record))
}

fn cidr_contains(record: &[u8], ip: IpAddr) -> bool {
    // Masked integer comparison: this runs for every networks peer of every rule scanned.
    if record.len() < cidr::LEN {
        return false;
    }
    let (bytes, family, prefix) = (
        cidr::IP.get(record),
        cidr::FAMILY.get(record),
        cidr::PREFIX.get(record),
    );
    match (family, ip) {
        (4, IpAddr::V4(ip)) => {
            let [a, b, c, d, ..] = bytes;
            let net = u32::from_be_bytes([a, b, c, d]);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            (net ^ u32::from(ip)) & mask == 0
        }
        (6, IpAddr::V6(ip)) => {
            let net = u128::from_be_bytes(bytes);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            (net ^ u128::from(ip)) & mask == 0
        }
        _ => false,
    }
}
