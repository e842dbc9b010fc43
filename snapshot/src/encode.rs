//! Building snapshots from plain owned tables.
//!
//! Tables every node shares (node and zone names, cluster networks, address book, services,
//! identity sets) are encoded once into [`SharedTables`]; [`encode`] then writes one node's
//! policies, chains and workloads and copies the shared bytes, so compiling hundreds of node
//! snapshots costs little more than copying.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::format::{self, SectionId};
use crate::{
    Action, Cidr, Entity, Isolation, LocationMatch, NO_IDENTITY, NO_ZONE, PolicyKind, Protocol,
    Stack, Tier, TransportChoice,
};

/// A backend in the order a Service's backends are stored: identity, port, zone, node, address.
type BackendKey = (u32, u16, u32, u32, (u8, [u8; 16]));

/// A node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// Node name.
    pub name: String,
    /// Index into [`SharedInput::zones`], or [`crate::NO_ZONE`].
    pub zone: u32,
}

/// Whether an address book entry is a pod or a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressKind {
    /// A pod address; carries an identity.
    Pod,
    /// A node's own address.
    Node,
}

/// One address of the address book.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressEntry {
    /// The address.
    pub ip: IpAddr,
    /// Pod or node.
    pub kind: AddressKind,
    /// Identity (namespace + labels) of a pod; [`crate::NO_IDENTITY`] for nodes.
    pub identity: u32,
    /// Index of the node the address lives on.
    pub node: u32,
}

/// A Service frontend (ClusterIP and port) and the backends its EndpointSlices list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    /// ClusterIP.
    pub ip: IpAddr,
    /// Service port.
    pub port: u16,
    /// Protocol of the port.
    pub protocol: Protocol,
    /// Ready backends: address and target port.
    pub backends: Vec<(IpAddr, u16)>,
}

/// Input for [`SharedTables::build`].
#[derive(Clone, Debug, Default)]
pub struct SharedInput {
    /// Zone names; a node's zone is an index into this list.
    pub zones: Vec<String>,
    /// Nodes; node ids are indexes into this list.
    pub nodes: Vec<NodeEntry>,
    /// Addresses inside the cluster that are not pods or nodes (service and pod CIDRs).
    pub cluster_networks: Vec<Cidr>,
    /// Every pod and node address. Order does not matter; duplicates keep the first entry.
    pub addresses: Vec<AddressEntry>,
    /// Service frontends.
    pub services: Vec<ServiceEntry>,
    /// Identity sets referenced by [`PeerEntry::Pods`]; each must be sorted ascending.
    pub identity_sets: Vec<Vec<u32>>,
}

/// The encoded sections common to every node's snapshot.
#[derive(Clone, Debug, Default)]
pub struct SharedTables {
    sections: Vec<(SectionId, Vec<u8>)>,
    identity_set_ranges: Vec<(u32, u32)>,
    identity_set_blooms: Vec<u128>,
    identity_set_rule_blooms: Vec<u64>,
}

impl SharedTables {
    /// Encodes the shared tables once.
    pub fn build(input: &SharedInput) -> Self {
        let mut strings = Vec::new();
        let mut zones = Vec::with_capacity(input.zones.len() * 8);
        for zone in &input.zones {
            put_str(&mut zones, &mut strings, zone);
        }
        let mut nodes = Vec::with_capacity(input.nodes.len() * 12);
        for node in &input.nodes {
            put_str(&mut nodes, &mut strings, &node.name);
            put_u32(&mut nodes, node.zone);
        }
        let mut networks = Vec::new();
        for cidr in &input.cluster_networks {
            put_cidr(&mut networks, cidr);
        }

        let mut v4: Vec<(u32, &AddressEntry)> = Vec::new();
        let mut v6: Vec<([u8; 16], &AddressEntry)> = Vec::new();
        for entry in &input.addresses {
            match entry.ip.to_canonical() {
                IpAddr::V4(ip) => v4.push((u32::from(ip), entry)),
                IpAddr::V6(ip) => v6.push((ip.octets(), entry)),
            }
        }
        // Stable sort keeps the first of duplicate addresses first; dedup then drops the rest.
        v4.sort_by_key(|(ip, _)| *ip);
        v4.dedup_by_key(|(ip, _)| *ip);
        v6.sort_by_key(|(ip, _)| *ip);
        v6.dedup_by_key(|(ip, _)| *ip);
        let slots = format::address4_slots(v4.len());
        let mut addresses4 = vec![0u8; slots * 16];
        for slot in addresses4.chunks_exact_mut(16) {
            slot[4] = format::EMPTY_SLOT;
        }
        for (ip, entry) in v4 {
            let mut slot = format::address4_slot(ip, slots);
            while addresses4[slot * 16 + 4] != format::EMPTY_SLOT {
                slot = if slot + 1 == slots { 0 } else { slot + 1 };
            }
            let mut record = Vec::with_capacity(16);
            put_u32(&mut record, ip);
            put_address_tail(&mut record, entry);
            addresses4[slot * 16..slot * 16 + 16].copy_from_slice(&record);
        }
        let mut addresses6 = Vec::with_capacity(v6.len() * 28);
        for (ip, entry) in v6 {
            addresses6.extend_from_slice(&ip);
            put_address_tail(&mut addresses6, entry);
        }

        // What the address book says of each backend; the first entry of a duplicate wins, as
        // in the book itself.
        let mut book: HashMap<IpAddr, &AddressEntry> =
            HashMap::with_capacity(input.addresses.len());
        for entry in &input.addresses {
            book.entry(entry.ip.to_canonical()).or_insert(entry);
        }
        let zone_of = |node: u32| input.nodes.get(node as usize).map_or(NO_ZONE, |n| n.zone);
        let mut services: Vec<&ServiceEntry> = input.services.iter().collect();
        services.sort_by_key(|s| (ip_key(s.ip.to_canonical()), s.port, s.protocol as u8));
        services.dedup_by_key(|s| (ip_key(s.ip.to_canonical()), s.port, s.protocol as u8));
        let mut service_records = Vec::with_capacity(services.len() * 28);
        let mut backends = Vec::new();
        for service in services {
            let (family, bytes) = ip_key(service.ip.to_canonical());
            service_records.extend_from_slice(&bytes);
            service_records.push(family);
            service_records.push(service.protocol as u8);
            put_u16(&mut service_records, service.port);
            put_u32(
                &mut service_records,
                (backends.len() / format::BACKEND_LEN) as u32,
            );
            put_u32(&mut service_records, service.backends.len() as u32);
            let mut sorted: Vec<BackendKey> = service
                .backends
                .iter()
                .map(|(ip, port)| {
                    let ip = ip.to_canonical();
                    let (identity, node) = match book.get(&ip) {
                        Some(entry) if entry.kind == AddressKind::Pod => {
                            (entry.identity, entry.node)
                        }
                        _ => (NO_IDENTITY, format::NO_NODE),
                    };
                    let zone = if node == format::NO_NODE {
                        NO_ZONE
                    } else {
                        zone_of(node)
                    };
                    (identity, *port, zone, node, ip_key(ip))
                })
                .collect();
            sorted.sort_unstable();
            for (identity, port, zone, node, (family, bytes)) in sorted {
                backends.extend_from_slice(&bytes);
                backends.push(family);
                backends.push(0);
                put_u16(&mut backends, port);
                put_u32(&mut backends, identity);
                put_u32(&mut backends, node);
                put_u32(&mut backends, zone);
            }
        }

        let mut identity_sets = Vec::new();
        let mut identity_set_ranges = Vec::with_capacity(input.identity_sets.len());
        let mut identity_set_blooms = Vec::with_capacity(input.identity_sets.len());
        let mut identity_set_rule_blooms = Vec::with_capacity(input.identity_sets.len());
        for set in &input.identity_sets {
            identity_set_ranges.push(((identity_sets.len() / 4) as u32, set.len() as u32));
            for id in set {
                put_u32(&mut identity_sets, *id);
            }
            let (bloom, rule_bloom) = format::identity_set_blooms(set.iter().copied());
            identity_set_blooms.push(bloom);
            identity_set_rule_blooms.push(rule_bloom);
        }

        Self {
            sections: vec![
                (SectionId::SharedStrings, strings),
                (SectionId::Zones, zones),
                (SectionId::Nodes, nodes),
                (SectionId::ClusterNetworks, networks),
                (SectionId::Addresses4, addresses4),
                (SectionId::Addresses6, addresses6),
                (SectionId::Services, service_records),
                (SectionId::Backends, backends),
                (SectionId::IdentitySets, identity_sets),
            ],
            identity_set_ranges,
            identity_set_blooms,
            identity_set_rule_blooms,
        }
    }

    /// Total bytes of the shared sections.
    pub fn len(&self) -> usize {
        self.sections.iter().map(|(_, bytes)| bytes.len()).sum()
    }

    /// Whether there are no shared bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A destination peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerEntry {
    /// Pods whose identity is in the identity set with this index.
    Pods(u32),
    /// Addresses in any of these networks.
    Networks(Vec<Cidr>),
    /// A label-less class of destinations.
    Entity(Entity),
}

/// A port range of one protocol; `first..=last`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortEntry {
    /// Protocol.
    pub protocol: Protocol,
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

/// One rule, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleEntry {
    /// Rule name.
    pub name: String,
    /// Route or Pass.
    pub action: Action,
    /// Destination peers; `None` matches any destination.
    pub peers: Option<Vec<PeerEntry>>,
    /// Destination ports; `None` matches every port of every protocol.
    pub ports: Option<Vec<PortEntry>>,
    /// Location constraint.
    pub location: LocationMatch,
    /// Isolation the chosen stack must provide.
    pub isolation: Isolation,
    /// The transport, then its fallbacks, then the implicit kernel entry where it applies.
    /// Empty for Pass rules.
    pub transports: Vec<TransportChoice>,
    /// What the NetworkPolicy gate did to this rule (nothing, for almost every rule).
    pub gate: RuleGate,
}

/// What the controller's NetworkPolicy gate did to a rule: stored in the rule's flag bits so
/// that `explain` — also from a node agent's live snapshot — can say why a bypass stack is
/// missing. It never changes a lookup: `transports` already holds only what is left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleGate {
    /// RDMA was removed: NetworkPolicy does not allow (or the controller cannot decide) every
    /// flow this rule covers.
    pub removed_rdma: bool,
    /// The user-space stack was removed (reserved for a user-space stack on a dedicated device;
    /// not set by today's compiler, which gates RDMA only).
    pub removed_userspace: bool,
    /// This rule is the part of a split rule that keeps its bypass stacks: its peers are the
    /// destinations NetworkPolicy allows them for. The next rule, of the same name, holds the
    /// rest without them.
    pub allowed_part: bool,
}

impl RuleGate {
    /// The stacks the gate removed, in stack order.
    pub fn removed(self) -> impl Iterator<Item = Stack> {
        [
            (self.removed_userspace, Stack::Userspace),
            (self.removed_rdma, Stack::Rdma),
        ]
        .into_iter()
        .filter_map(|(removed, stack)| removed.then_some(stack))
    }

    /// Whether the gate touched the rule at all.
    pub fn is_empty(self) -> bool {
        self == Self::default()
    }

    pub(crate) fn flags(self) -> u8 {
        let bit = |set: bool, bit: u8| if set { bit } else { 0 };
        bit(self.removed_rdma, format::RULE_GATE_REMOVED_RDMA)
            | bit(self.removed_userspace, format::RULE_GATE_REMOVED_USERSPACE)
            | bit(self.allowed_part, format::RULE_GATE_ALLOWED_PART)
    }

    pub(crate) fn from_flags(flags: u8) -> Self {
        Self {
            removed_rdma: flags & format::RULE_GATE_REMOVED_RDMA != 0,
            removed_userspace: flags & format::RULE_GATE_REMOVED_USERSPACE != 0,
            allowed_part: flags & format::RULE_GATE_ALLOWED_PART != 0,
        }
    }
}

/// A StackRoute or ClusterStackRoute, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyEntry {
    /// Which resource.
    pub kind: PolicyKind,
    /// Evaluation tier.
    pub tier: Tier,
    /// `spec.priority`.
    pub priority: u16,
    /// Namespace; empty for ClusterStackRoutes.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Ordered rules.
    pub rules: Vec<RuleEntry>,
}

/// A source workload on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadEntry {
    /// Namespace.
    pub namespace: String,
    /// Pod (or standalone workload) name.
    pub name: String,
    /// Its addresses, so the shim can find itself by source address too.
    pub ips: Vec<IpAddr>,
    /// Index into [`NodeInput::chains`].
    pub chain: u32,
}

/// What is specific to one node.
#[derive(Clone, Debug, Default)]
pub struct NodeInput<'a> {
    /// Controller revision.
    pub revision: u64,
    /// This node's index into [`SharedInput::nodes`].
    pub own_node: u32,
    /// Transport when no rule matches.
    pub default_transport: Option<TransportChoice>,
    /// The policies that apply to this node's workloads.
    pub policies: Vec<&'a PolicyEntry>,
    /// Chains: policy indexes (into `policies`) in evaluation order — tier, then priority,
    /// creation time and name; the encoder keeps the order it is given.
    pub chains: Vec<Vec<u32>>,
    /// The workloads; any order.
    pub workloads: Vec<WorkloadEntry>,
}

/// What is specific to one node, encoded: everything a snapshot holds except the
/// [`SharedTables`]. Small (a node's policies, chains and workloads), so the controller can
/// compile every node per revision cheaply; [`assemble`] joins it with the shared tables into a
/// snapshot where one is needed (on the node, or for `explain`).
#[derive(Clone, Debug, Default)]
pub struct NodeTables {
    revision: u64,
    own_node: u32,
    default_transport: TransportChoice,
    sections: Vec<(SectionId, Vec<u8>)>,
}

impl NodeTables {
    /// Total bytes of the node's own sections.
    pub fn len(&self) -> usize {
        self.sections.iter().map(|(_, bytes)| bytes.len()).sum()
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for TransportChoice {
    fn default() -> Self {
        Self::KERNEL_DEFAULT
    }
}

/// Encodes one node's snapshot.
pub fn encode(shared: &SharedTables, node: &NodeInput<'_>) -> Vec<u8> {
    assemble(shared, &encode_node_tables(shared, node))
}

/// Encodes the node-specific part of a snapshot.
pub fn encode_node_tables(shared: &SharedTables, node: &NodeInput<'_>) -> NodeTables {
    let mut strings = Vec::new();
    let mut networks = Vec::new();
    let mut peers = Vec::new();
    let mut ports = Vec::new();
    let mut transports = Vec::new();
    let mut rules = Vec::new();
    let mut rule_filters = Vec::new();
    let mut policies = Vec::new();
    let mut policy_filters = Vec::new();
    let mut rule_count = 0u32;
    for policy in &node.policies {
        policies.push(policy.kind as u8);
        policies.push(policy.tier as u8);
        put_u16(&mut policies, policy.priority);
        put_str(&mut policies, &mut strings, &policy.namespace);
        put_str(&mut policies, &mut strings, &policy.name);
        put_u32(&mut policies, rule_count);
        put_u32(&mut policies, policy.rules.len() as u32);
        put_policy_filter(&mut policy_filters, shared, policy, rule_count);
        rule_count += policy.rules.len() as u32;
        for rule in &policy.rules {
            put_str(&mut rules, &mut strings, &rule.name);
            let flags = if rule.peers.is_some() {
                format::RULE_HAS_PEERS
            } else {
                0
            } | if rule.ports.is_some() {
                format::RULE_HAS_PORTS
            } else {
                0
            } | rule.gate.flags();
            rules.extend_from_slice(&[
                rule.action as u8,
                rule.location as u8,
                rule.isolation as u8,
                flags,
            ]);

            let span = port_span(rule.ports.as_deref());
            let mut filter = format::RuleFilter::new(span, rule.location, rule.peers.is_some());
            let rule_peers = rule.peers.as_deref().unwrap_or_default();
            put_range(&mut rules, peers.len() / 12, rule_peers.len());
            for peer in rule_peers {
                match peer {
                    PeerEntry::Pods(set) => {
                        let (offset, len) = shared
                            .identity_set_ranges
                            .get(*set as usize)
                            .copied()
                            .unwrap_or((0, 0));
                        peers.extend_from_slice(&[format::PEER_PODS, 0, 0, 0]);
                        put_u32(&mut peers, offset);
                        put_u32(&mut peers, len);
                        filter.add_pods(
                            shared
                                .identity_set_rule_blooms
                                .get(*set as usize)
                                .copied()
                                .unwrap_or(0),
                        );
                    }
                    PeerEntry::Networks(cidrs) => {
                        peers.extend_from_slice(&[format::PEER_NETWORKS, 0, 0, 0]);
                        put_range(&mut peers, networks.len() / format::CIDR_LEN, cidrs.len());
                        for cidr in cidrs {
                            let at = networks.len();
                            put_cidr(&mut networks, cidr);
                            filter.add_cidr(&networks[at..]);
                        }
                    }
                    PeerEntry::Entity(entity) => {
                        peers.extend_from_slice(&[format::PEER_ENTITY, *entity as u8, 0, 0]);
                        put_range(&mut peers, 0, 0);
                        filter.add_entity(*entity);
                    }
                }
            }
            let rule_ports = rule.ports.as_deref().unwrap_or_default();
            put_range(&mut rules, ports.len() / 8, rule_ports.len());
            for port in rule_ports {
                ports.extend_from_slice(&[port.protocol as u8, 0]);
                put_u16(&mut ports, port.first);
                put_u16(&mut ports, port.last);
                put_u16(&mut ports, 0);
            }
            put_range(&mut rules, transports.len() / 2, rule.transports.len());
            rule_filters.extend_from_slice(&filter.to_bytes());
            let (first, last, protocols) = span;
            put_u16(&mut rules, first);
            put_u16(&mut rules, last);
            rules.extend_from_slice(&[protocols, 0, 0, 0]);
            for transport in &rule.transports {
                transports.extend_from_slice(&[
                    transport.stack as u8,
                    transport.congestion_control as u8,
                ]);
            }
        }
    }

    let mut chains = Vec::with_capacity(node.chains.len() * 8);
    let mut chain_policies = Vec::new();
    for chain in &node.chains {
        put_range(&mut chains, chain_policies.len() / 4, chain.len());
        for policy in chain {
            put_u32(&mut chain_policies, *policy);
        }
    }

    let mut order: Vec<&WorkloadEntry> = node.workloads.iter().collect();
    order.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    order.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
    let mut workloads = Vec::with_capacity(order.len() * 28);
    let mut by_address: Vec<((u8, [u8; 16]), u32)> = Vec::new();
    for (index, workload) in order.iter().enumerate() {
        put_str(&mut workloads, &mut strings, &workload.namespace);
        put_str(&mut workloads, &mut strings, &workload.name);
        put_u32(&mut workloads, workload.chain);
        put_u32(&mut workloads, 0); // unused: addresses live in WorkloadAddresses
        put_u32(&mut workloads, workload.ips.len() as u32);
        for ip in &workload.ips {
            by_address.push((ip_key(ip.to_canonical()), index as u32));
        }
    }
    by_address.sort();
    by_address.dedup_by_key(|(key, _)| *key);
    let mut workload_addresses = Vec::with_capacity(by_address.len() * 24);
    for ((family, bytes), index) in by_address {
        workload_addresses.extend_from_slice(&bytes);
        workload_addresses.extend_from_slice(&[family, 0, 0, 0]);
        put_u32(&mut workload_addresses, index);
    }

    NodeTables {
        revision: node.revision,
        own_node: node.own_node,
        default_transport: node
            .default_transport
            .unwrap_or(TransportChoice::KERNEL_DEFAULT),
        sections: vec![
            (SectionId::Networks, networks),
            (SectionId::Peers, peers),
            (SectionId::Ports, ports),
            (SectionId::Transports, transports),
            (SectionId::Rules, rules),
            (SectionId::RuleFilters, rule_filters),
            (SectionId::Policies, policies),
            (SectionId::PolicyFilters, policy_filters),
            (SectionId::Chains, chains),
            (SectionId::ChainPolicies, chain_policies),
            (SectionId::Workloads, workloads),
            (SectionId::WorkloadAddresses, workload_addresses),
            (SectionId::NodeStrings, strings),
        ],
    }
}

/// Joins the shared tables and one node's tables into a complete, checksummed snapshot.
pub fn assemble(shared: &SharedTables, node: &NodeTables) -> Vec<u8> {
    let mut sections: Vec<(SectionId, &[u8])> = shared
        .sections
        .iter()
        .chain(&node.sections)
        .map(|(id, b)| (*id, b.as_slice()))
        .collect();
    sections.sort_by_key(|(id, _)| id.index());

    let directory_len = sections.len() * format::DIRECTORY_ENTRY_LEN;
    let body_len: usize = sections.iter().map(|(_, b)| b.len()).sum();
    let total = format::HEADER_LEN + directory_len + body_len;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&format::MAGIC);
    put_u32(&mut out, 0); // crc, patched below
    put_u16(&mut out, format::VERSION);
    put_u16(&mut out, 0);
    out.extend_from_slice(&(total as u64).to_le_bytes());
    out.extend_from_slice(&node.revision.to_le_bytes());
    put_u32(&mut out, sections.len() as u32);
    put_u32(&mut out, node.own_node);
    let default = node.default_transport;
    out.extend_from_slice(&[default.stack as u8, default.congestion_control as u8]);
    out.resize(format::HEADER_LEN, 0);
    let mut offset = format::HEADER_LEN + directory_len;
    for (id, bytes) in &sections {
        put_u32(&mut out, *id as u32);
        put_u32(&mut out, offset as u32);
        put_u32(&mut out, bytes.len() as u32);
        put_u32(&mut out, id.record_len() as u32);
        offset += bytes.len();
    }
    for (_, bytes) in &sections {
        out.extend_from_slice(bytes);
    }
    let crc = crc32fast::hash(&out[format::OFF_VERSION..]);
    out[format::OFF_CRC..format::OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    out
}

/// `(first, last, protocol mask)` covering port entries; everything when there are none.
fn port_span(ports: Option<&[PortEntry]>) -> (u16, u16, u8) {
    match ports {
        Some(ports) if !ports.is_empty() => {
            ports
                .iter()
                .fold((u16::MAX, 0, 0), |(first, last, mask), p| {
                    (
                        first.min(p.first),
                        last.max(p.last),
                        mask | protocol_bit(p.protocol),
                    )
                })
        }
        _ => (0, u16::MAX, 0xff),
    }
}

/// The summary that lets a lookup skip a whole policy (see `SectionId::PolicyFilters`).
fn put_policy_filter(
    out: &mut Vec<u8>,
    shared: &SharedTables,
    policy: &PolicyEntry,
    first_rule: u32,
) {
    let mut summary =
        format::PolicySummary::new(first_rule, policy.rules.len() as u32, policy.tier as u8);
    for rule in &policy.rules {
        let peers = rule.peers.as_deref();
        let pods_only = peers.is_some_and(|p| p.iter().all(|p| matches!(p, PeerEntry::Pods(_))));
        summary.add_rule(port_span(rule.ports.as_deref()), rule.location, pods_only);
        for peer in peers.unwrap_or_default() {
            if let PeerEntry::Pods(set) = peer
                && let Some(bloom) = shared.identity_set_blooms.get(*set as usize)
            {
                summary.add_pods(*bloom);
            }
        }
    }
    out.extend_from_slice(&summary.to_bytes());
}

pub(crate) fn protocol_bit(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => 1,
        Protocol::Udp => 2,
    }
}

fn put_u16(out: &mut Vec<u8>, value: u16) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_range(out: &mut Vec<u8>, offset: usize, len: usize) {
    put_u32(out, offset as u32);
    put_u32(out, len as u32);
}

fn put_str(out: &mut Vec<u8>, strings: &mut Vec<u8>, text: &str) {
    put_range(out, strings.len(), text.len());
    strings.extend_from_slice(text.as_bytes());
}

fn put_cidr(out: &mut Vec<u8>, cidr: &Cidr) {
    let (family, bytes) = ip_key(cidr.address);
    out.extend_from_slice(&bytes);
    out.extend_from_slice(&[family, cidr.prefix, 0, 0]);
}

fn put_address_tail(out: &mut Vec<u8>, entry: &AddressEntry) {
    let kind = match entry.kind {
        AddressKind::Pod => format::ADDRESS_POD,
        AddressKind::Node => format::ADDRESS_NODE,
    };
    out.extend_from_slice(&[kind, 0, 0, 0]);
    put_u32(out, entry.identity);
    put_u32(out, entry.node);
}

/// `(family, 16 bytes)`: IPv4 in the first four bytes. Sorting by this key sorts IPv4 before
/// IPv6 and each numerically.
pub(crate) fn ip_key(ip: IpAddr) -> (u8, [u8; 16]) {
    match ip {
        IpAddr::V4(ip) => {
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&ip.octets());
            (4, bytes)
        }
        IpAddr::V6(ip) => (6, ip.octets()),
    }
}
