//! Building snapshots from plain owned tables.
//!
//! Tables every node shares (node and zone names, cluster networks, address book, services,
//! identity sets) are encoded once into [`SharedTables`]; [`encode`] then writes one node's
//! policies, chains and workloads and copies the shared bytes, so compiling hundreds of node
//! snapshots costs little more than copying.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::format::{
    self, SectionId, address4, address6, backend, chain, chain_policy, cidr, directory,
    endpoint_address, header, identity_set, identity_set_range, node, peer, policy, port, rule,
    service, transport, workload, workload_address, zone,
};
use crate::{
    Action, Cidr, Entity, Isolation, LocationMatch, NO_IDENTITY, NO_ZONE, PolicyKind, Protocol,
    Stack, Tier, TransportChoice,
};

/// A backend in the order a Service's backends are stored: identity, port, zone, node, address
/// (as stored, then as an `IpAddr`).
type BackendKey = (u32, u16, u32, u32, (u8, [u8; 16]), IpAddr);

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
    pub(crate) sections: Vec<(SectionId, Vec<u8>)>,
    /// CRC-32 state of each section's bytes (parallel to `sections`).
    crcs: Vec<crc32fast::Hasher>,
    identity_set_blooms: Vec<u128>,
    identity_set_rule_blooms: Vec<u64>,
}

impl SharedTables {
    /// The bytes of shared section `id` (empty for a node section).
    pub(crate) fn section(&self, id: SectionId) -> &[u8] {
        self.sections
            .iter()
            .find(|(found, _)| *found == id)
            .map_or(&[], |(_, bytes)| bytes.as_slice())
    }

    /// Encodes the shared tables once.
    pub fn build(input: &SharedInput) -> Self {
        let mut strings = Vec::new();
        let mut zones = Vec::with_capacity(input.zones.len() * zone::LEN);
        for name in &input.zones {
            let r = push_record(&mut zones, zone::LEN);
            put_str(r, zone::NAME, &mut strings, name);
        }
        let mut nodes = Vec::with_capacity(input.nodes.len() * node::LEN);
        for entry in &input.nodes {
            let r = push_record(&mut nodes, node::LEN);
            put_str(r, node::NAME, &mut strings, &entry.name);
            node::ZONE.put(r, entry.zone);
        }
        let mut networks = Vec::new();
        for network in &input.cluster_networks {
            put_cidr(&mut networks, network);
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
        let mut addresses4 = vec![0u8; slots * address4::LEN];
        let (table, _) = addresses4.as_chunks_mut::<{ address4::LEN }>();
        for slot in table.iter_mut() {
            address4::KIND.put(slot, format::EMPTY_SLOT);
        }
        // Where each address is, for the backends that name it.
        let mut address_at: HashMap<IpAddr, (u8, u32)> =
            HashMap::with_capacity(v4.len() + v6.len());
        for (ip, entry) in v4 {
            let mut slot = format::address4_slot(ip, slots);
            while address4::KIND.get(&table[slot]) != format::EMPTY_SLOT {
                slot = if slot + 1 == slots { 0 } else { slot + 1 };
            }
            address_at.insert(
                IpAddr::from(ip.to_be_bytes()),
                (backend::IN_ADDRESSES4, slot as u32),
            );
            let r = &mut table[slot];
            address4::IP.put(r, ip);
            address4::KIND.put(r, address_kind(entry.kind));
            address4::IDENTITY.put(r, entry.identity);
            address4::NODE.put(r, entry.node);
        }
        let mut addresses6 = Vec::with_capacity(v6.len() * address6::LEN);
        for (index, (ip, entry)) in v6.into_iter().enumerate() {
            address_at.insert(
                IpAddr::from(ip).to_canonical(),
                (backend::IN_ADDRESSES6, index as u32),
            );
            let r = push_record(&mut addresses6, address6::LEN);
            address6::IP.put(r, &ip);
            address6::KIND.put(r, address_kind(entry.kind));
            address6::IDENTITY.put(r, entry.identity);
            address6::NODE.put(r, entry.node);
        }

        // What the address book says of each backend; the first entry of a duplicate wins, as
        // in the book itself.
        let mut book: HashMap<IpAddr, &AddressEntry> =
            HashMap::with_capacity(input.addresses.len());
        for entry in &input.addresses {
            book.entry(entry.ip.to_canonical()).or_insert(entry);
        }
        let zone_of = |node: u32| input.nodes.get(node as usize).map_or(NO_ZONE, |n| n.zone);
        // Backend addresses outside the address book, each once.
        let mut endpoints: Vec<(u8, [u8; 16])> = input
            .services
            .iter()
            .flat_map(|s| &s.backends)
            .map(|(ip, _)| ip.to_canonical())
            .filter(|ip| !address_at.contains_key(ip))
            .map(ip_key)
            .collect();
        endpoints.sort_unstable();
        endpoints.dedup();
        let mut endpoint_addresses = Vec::with_capacity(endpoints.len() * endpoint_address::LEN);
        for (family, bytes) in &endpoints {
            let r = push_record(&mut endpoint_addresses, endpoint_address::LEN);
            endpoint_address::IP.put(r, bytes);
            endpoint_address::FAMILY.put(r, *family);
        }
        let mut services: Vec<&ServiceEntry> = input.services.iter().collect();
        services.sort_by_key(|s| (ip_key(s.ip.to_canonical()), s.port, s.protocol as u8));
        services.dedup_by_key(|s| (ip_key(s.ip.to_canonical()), s.port, s.protocol as u8));
        let mut service_records = Vec::with_capacity(services.len() * service::LEN);
        let mut backends = Vec::new();
        for entry in services {
            let (family, bytes) = ip_key(entry.ip.to_canonical());
            let r = push_record(&mut service_records, service::LEN);
            service::IP.put(r, &bytes);
            service::FAMILY.put(r, family);
            service::PROTOCOL.put(r, entry.protocol as u8);
            service::PORT.put(r, entry.port);
            let first = backends.len() / backend::LEN;
            service::BACKENDS.put(r, first, entry.backends.len());
            let mut sorted: Vec<BackendKey> = entry
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
                    (identity, *port, zone, node, ip_key(ip), ip)
                })
                .collect();
            sorted.sort_unstable();
            for (identity, port, zone, node, key, ip) in sorted {
                let (source, address) = address_at.get(&ip).copied().unwrap_or_else(|| {
                    let index = endpoints.binary_search(&key).unwrap_or_default();
                    (backend::IN_ENDPOINTS, index as u32)
                });
                let r = push_record(&mut backends, backend::LEN);
                backend::SOURCE.put(r, source);
                backend::ADDRESS.put(r, address);
                backend::PORT.put(r, port);
                backend::IDENTITY.put(r, identity);
                backend::NODE.put(r, node);
                backend::ZONE.put(r, zone);
            }
        }

        let mut identity_sets = Vec::new();
        let mut identity_set_ranges =
            Vec::with_capacity(input.identity_sets.len() * identity_set_range::LEN);
        let mut identity_set_blooms = Vec::with_capacity(input.identity_sets.len());
        let mut identity_set_rule_blooms = Vec::with_capacity(input.identity_sets.len());
        for set in &input.identity_sets {
            let first = identity_sets.len() / identity_set::LEN;
            let r = push_record(&mut identity_set_ranges, identity_set_range::LEN);
            identity_set_range::MEMBERS.put(r, first, set.len());
            for id in set {
                let r = push_record(&mut identity_sets, identity_set::LEN);
                identity_set::IDENTITY.put(r, *id);
            }
            let (bloom, rule_bloom) = format::identity_set_blooms(set.iter().copied());
            identity_set_blooms.push(bloom);
            identity_set_rule_blooms.push(rule_bloom);
        }

        let mut tables = Self {
            sections: vec![
                (SectionId::SharedStrings, strings),
                (SectionId::Zones, zones),
                (SectionId::Nodes, nodes),
                (SectionId::ClusterNetworks, networks),
                (SectionId::Addresses4, addresses4),
                (SectionId::Addresses6, addresses6),
                (SectionId::Services, service_records),
                (SectionId::Backends, backends),
                (SectionId::EndpointAddresses, endpoint_addresses),
                (SectionId::IdentitySets, identity_sets),
                (SectionId::IdentitySetRanges, identity_set_ranges),
            ],
            crcs: Vec::new(),
            identity_set_blooms,
            identity_set_rule_blooms,
        };
        tables.crcs = section_crcs(tables.sections.iter().map(|(_, b)| b.as_slice()));
        tables
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
    /// Chains of at least this many rules get an index ([`crate::chain_index`]); `None`:
    /// [`crate::chain_index::MIN_RULES`].
    pub chain_index_min_rules: Option<usize>,
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
    /// Shared (reference-counted) so that nodes with the same policies hold one copy of their
    /// rule sections: see [`SectionInterner`].
    pub(crate) sections: Vec<(SectionId, Arc<Vec<u8>>)>,
    /// CRC-32 state of each section's bytes (parallel to `sections`).
    crcs: Vec<crc32fast::Hasher>,
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
    encode_node_tables_with(shared, &encode_policy_tables(shared, &node.policies), node)
}

/// The sections of a node's snapshot that depend only on its policies (their records and the
/// shared identity sets their pods peers name), and the policy and rule names that start its
/// string section. Nodes whose workloads use the same policies have equal ones, so a controller
/// encodes them once per distinct policy list rather than once per node
/// ([`encode_node_tables_with`]).
#[derive(Clone, Debug, Default)]
pub struct PolicyTables {
    /// Networks, Peers, Ports, Transports, Rules, RuleFilters, Policies, PolicyFilters.
    sections: Vec<(SectionId, Arc<Vec<u8>>)>,
    /// CRC-32 state of each section's bytes (parallel to `sections`).
    crcs: Vec<crc32fast::Hasher>,
    /// The start of the node string section (workload names follow), and its CRC state.
    strings: Vec<u8>,
    strings_crc: crc32fast::Hasher,
}

impl PolicyTables {
    fn section(&self, id: SectionId) -> &[u8] {
        self.sections
            .iter()
            .find(|(found, _)| *found == id)
            .map_or(&[], |(_, bytes)| bytes.as_slice())
    }

    /// Bytes held (sections and strings).
    pub fn len(&self) -> usize {
        self.strings.len() + self.sections.iter().map(|(_, b)| b.len()).sum::<usize>()
    }

    /// Whether there are no bytes at all (no policies).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encodes the sections that depend on `policies` alone: see [`PolicyTables`].
pub fn encode_policy_tables(shared: &SharedTables, policies: &[&PolicyEntry]) -> PolicyTables {
    let mut strings = Vec::new();
    let mut networks = Vec::new();
    let mut peers = Vec::new();
    let mut ports = Vec::new();
    let mut transports = Vec::new();
    let mut rules = Vec::new();
    let mut rule_filters = Vec::new();
    let mut policy_records = Vec::new();
    let mut policy_filters = Vec::new();
    let mut rule_count = 0u32;
    for entry in policies {
        let r = push_record(&mut policy_records, policy::LEN);
        policy::KIND.put(r, entry.kind as u8);
        policy::TIER.put(r, entry.tier as u8);
        policy::PRIORITY.put(r, entry.priority);
        put_str(r, policy::NAMESPACE, &mut strings, &entry.namespace);
        put_str(r, policy::NAME, &mut strings, &entry.name);
        policy::RULES.put(r, rule_count as usize, entry.rules.len());
        put_policy_filter(&mut policy_filters, shared, entry, rule_count);
        rule_count += entry.rules.len() as u32;
        for item in &entry.rules {
            let r = push_record(&mut rules, rule::LEN);
            put_str(r, rule::NAME, &mut strings, &item.name);
            rule::ACTION.put(r, item.action as u8);
            rule::LOCATION.put(r, item.location as u8);
            rule::ISOLATION.put(r, item.isolation as u8);
            let has = |present: bool, flag: u8| if present { flag } else { 0 };
            let flags = has(item.peers.is_some(), format::RULE_HAS_PEERS)
                | has(item.ports.is_some(), format::RULE_HAS_PORTS)
                | item.gate.flags();
            rule::FLAGS.put(r, flags);
            let span = port_span(item.ports.as_deref());
            let (first, last, protocols) = span;
            rule::FIRST_PORT.put(r, first);
            rule::LAST_PORT.put(r, last);
            rule::PROTOCOLS.put(r, protocols);

            let rule_peers = item.peers.as_deref().unwrap_or_default();
            rule::PEERS.put(r, peers.len() / peer::LEN, rule_peers.len());
            let mut filter = format::RuleFilter::new(span, item.location, item.peers.is_some());
            for entry in rule_peers {
                put_peer(&mut peers, &mut networks, shared, entry, &mut filter);
            }
            rule_filters.extend_from_slice(&filter.to_bytes());

            let rule_ports = item.ports.as_deref().unwrap_or_default();
            rule::PORTS.put(r, ports.len() / port::LEN, rule_ports.len());
            for entry in rule_ports {
                let p = push_record(&mut ports, port::LEN);
                port::PROTOCOL.put(p, entry.protocol as u8);
                port::FIRST.put(p, entry.first);
                port::LAST.put(p, entry.last);
            }

            let first = transports.len() / transport::LEN;
            rule::TRANSPORTS.put(r, first, item.transports.len());
            for choice in &item.transports {
                transports.extend_from_slice(&transport_record(*choice));
            }
        }
    }
    let sections: Vec<(SectionId, Arc<Vec<u8>>)> = [
        (SectionId::Networks, networks),
        (SectionId::Peers, peers),
        (SectionId::Ports, ports),
        (SectionId::Transports, transports),
        (SectionId::Rules, rules),
        (SectionId::RuleFilters, rule_filters),
        (SectionId::Policies, policy_records),
        (SectionId::PolicyFilters, policy_filters),
    ]
    .into_iter()
    .map(|(id, bytes)| (id, Arc::new(bytes)))
    .collect();
    let crcs = section_crcs(sections.iter().map(|(_, b)| b.as_slice()));
    let mut strings_crc = crc32fast::Hasher::new();
    strings_crc.update(&strings);
    PolicyTables {
        sections,
        crcs,
        strings,
        strings_crc,
    }
}

/// Encodes the node-specific part of a snapshot from its policies' sections, encoded before by
/// [`encode_policy_tables`] from `node.policies` (which is not read again): the same bytes as
/// [`encode_node_tables`].
pub fn encode_node_tables_with(
    shared: &SharedTables,
    policy_tables: &PolicyTables,
    node: &NodeInput<'_>,
) -> NodeTables {
    let mut chains = Vec::with_capacity(node.chains.len() * chain::LEN);
    let mut chain_policies = Vec::new();
    for list in &node.chains {
        let r = push_record(&mut chains, chain::LEN);
        chain::POLICIES.put(r, chain_policies.len() / chain_policy::LEN, list.len());
        for index in list {
            let p = push_record(&mut chain_policies, chain_policy::LEN);
            chain_policy::POLICY.put(p, *index);
        }
    }

    let min_rules = node
        .chain_index_min_rules
        .unwrap_or(crate::chain_index::MIN_RULES);
    let index = crate::chain_index::build(
        &crate::chain_index::RuleSections {
            chains: &chains,
            chain_policies: &chain_policies,
            policy_filters: policy_tables.section(SectionId::PolicyFilters),
            rules: policy_tables.section(SectionId::Rules),
            peers: policy_tables.section(SectionId::Peers),
            networks: policy_tables.section(SectionId::Networks),
            identity_sets: shared.section(SectionId::IdentitySets),
            identity_set_ranges: shared.section(SectionId::IdentitySetRanges),
        },
        |_, rules| rules >= min_rules,
    );

    // Workload names follow the policies' strings in one section.
    let mut strings = policy_tables.strings.clone();
    let policy_strings = strings.len();
    let mut order: Vec<&WorkloadEntry> = node.workloads.iter().collect();
    order.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    order.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name);
    let mut workloads = Vec::with_capacity(order.len() * workload::LEN);
    let mut by_address: Vec<((u8, [u8; 16]), u32)> = Vec::new();
    for (index, entry) in order.iter().enumerate() {
        let r = push_record(&mut workloads, workload::LEN);
        put_str(r, workload::NAMESPACE, &mut strings, &entry.namespace);
        put_str(r, workload::NAME, &mut strings, &entry.name);
        workload::CHAIN.put(r, entry.chain);
        // workload::RESERVED stays 0: the addresses live in WorkloadAddresses.
        workload::ADDRESS_COUNT.put(r, entry.ips.len() as u32);
        for ip in &entry.ips {
            by_address.push((ip_key(ip.to_canonical()), index as u32));
        }
    }
    by_address.sort();
    by_address.dedup_by_key(|(key, _)| *key);
    let mut workload_addresses = Vec::with_capacity(by_address.len() * workload_address::LEN);
    for ((family, bytes), index) in by_address {
        let r = push_record(&mut workload_addresses, workload_address::LEN);
        workload_address::IP.put(r, &bytes);
        workload_address::FAMILY.put(r, family);
        workload_address::WORKLOAD.put(r, index);
    }

    // The policy strings' CRC state, extended by the workload strings: not hashed again per node.
    let mut strings_crc = policy_tables.strings_crc.clone();
    strings_crc.update(&strings[policy_strings..]);
    let node_sections = [
        (SectionId::Chains, chains),
        (SectionId::ChainPolicies, chain_policies),
        (SectionId::ChainIndexes, index.chain_indexes),
        (SectionId::IndexIdentities, index.identities),
        (SectionId::IndexIntervals, index.intervals),
        (SectionId::IndexPostings, index.postings),
        (SectionId::Workloads, workloads),
        (SectionId::WorkloadAddresses, workload_addresses),
    ]
    .into_iter()
    // Without an indexed chain the index sections are left out, as before they existed.
    .filter(|(id, bytes)| !(id.is_optional() && bytes.is_empty()))
    .map(|(id, bytes)| {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes);
        ((id, Arc::new(bytes)), crc)
    });
    let (sections, crcs) = policy_tables
        .sections
        .iter()
        .cloned()
        .zip(policy_tables.crcs.iter().cloned())
        .chain(node_sections)
        .chain(std::iter::once((
            (SectionId::NodeStrings, Arc::new(strings)),
            strings_crc,
        )))
        .unzip();
    NodeTables {
        revision: node.revision,
        own_node: node.own_node,
        default_transport: node
            .default_transport
            .unwrap_or(TransportChoice::KERNEL_DEFAULT),
        sections,
        crcs,
    }
}

/// The CRC-32 state of each section's bytes.
fn section_crcs<'a>(sections: impl Iterator<Item = &'a [u8]>) -> Vec<crc32fast::Hasher> {
    sections
        .map(|bytes| {
            let mut crc = crc32fast::Hasher::new();
            crc.update(bytes);
            crc
        })
        .collect()
}

/// Makes equal node sections one allocation: nodes whose pods share their policies encode the
/// same rule sections, and a revision that changed little encodes most sections as before. The
/// controller keeps every watched node's tables, so at scale that is the difference between one
/// copy of a cluster's rules and one per node. Sections are matched by id, length and CRC (each
/// section's CRC is known already), then compared byte for byte.
#[derive(Debug, Default)]
pub struct SectionInterner {
    /// Sections by (id, length, CRC): usually one each, more only on a CRC collision.
    seen: HashMap<SectionKey, Vec<Arc<Vec<u8>>>>,
}

/// A section's id, length and CRC-32.
type SectionKey = (SectionId, usize, u32);

impl SectionInterner {
    /// Replaces each of `tables`' sections by an equal one seen before, and remembers the rest.
    pub fn intern(&mut self, tables: &mut NodeTables) {
        self.intern_sections(&mut tables.sections, &tables.crcs);
    }

    /// [`SectionInterner::intern`] for policy sections, before nodes take them: every node
    /// built from `tables` then holds sections this interner knows by address.
    pub fn intern_policy_tables(&mut self, tables: &mut PolicyTables) {
        self.intern_sections(&mut tables.sections, &tables.crcs);
    }

    fn intern_sections(
        &mut self,
        sections: &mut [(SectionId, Arc<Vec<u8>>)],
        crcs: &[crc32fast::Hasher],
    ) {
        for ((id, bytes), crc) in sections.iter_mut().zip(crcs) {
            let key = (*id, bytes.len(), crc.clone().finalize());
            let known = self.seen.entry(key).or_default();
            // The same allocation needs no comparison: nodes sharing policy tables hold one.
            if known.iter().any(|known| Arc::ptr_eq(known, bytes)) {
                continue;
            }
            match known
                .iter()
                .find(|known| known.as_slice() == bytes.as_slice())
            {
                Some(known) => *bytes = known.clone(),
                None => known.push(bytes.clone()),
            }
        }
    }

    /// Remembers `parts`' own sections (a node's previous revision), so equal sections of
    /// the next one share their memory.
    pub fn remember(&mut self, parts: &SnapshotParts) {
        for ((id, bytes), crc) in parts.node.sections.iter().zip(&parts.node.crcs) {
            let known = self
                .seen
                .entry((*id, bytes.len(), crc.clone().finalize()))
                .or_default();
            // Nodes hold one allocation of shared policy sections: compare addresses first.
            if !known
                .iter()
                .any(|k| Arc::ptr_eq(k, bytes) || k.as_slice() == bytes.as_slice())
            {
                known.push(bytes.clone());
            }
        }
    }

    /// Bytes of the distinct sections seen.
    pub fn distinct_bytes(&self) -> usize {
        self.seen.values().flatten().map(|b| b.len()).sum()
    }
}

/// Appends one rule peer (and a networks peer's CIDRs), and adds it to the rule's filter.
fn put_peer(
    peers: &mut Vec<u8>,
    networks: &mut Vec<u8>,
    shared: &SharedTables,
    entry: &PeerEntry,
    filter: &mut format::RuleFilter,
) {
    let r = push_record(peers, peer::LEN);
    match entry {
        PeerEntry::Pods(set) => {
            peer::KIND.put(r, format::PEER_PODS);
            peer::IDENTITY_SET.put(r, *set);
            filter.add_pods(
                shared
                    .identity_set_rule_blooms
                    .get(*set as usize)
                    .copied()
                    .unwrap_or(0),
            );
        }
        PeerEntry::Networks(cidrs) => {
            peer::KIND.put(r, format::PEER_NETWORKS);
            peer::NETWORKS.put(r, networks.len() / cidr::LEN, cidrs.len());
            for network in cidrs {
                let at = networks.len();
                put_cidr(networks, network);
                filter.add_cidr(&networks[at..]);
            }
        }
        PeerEntry::Entity(entity) => {
            // No range: an entity names no records.
            peer::KIND.put(r, format::PEER_ENTITY);
            peer::ENTITY.put(r, *entity as u8);
            filter.add_entity(*entity);
        }
    }
}

/// Joins the shared tables and one node's tables into a complete, checksummed snapshot.
pub fn assemble(shared: &SharedTables, node: &NodeTables) -> Vec<u8> {
    let sections = ordered_sections(shared, node);
    let mut out = prefix(node, &sections);
    for (_, bytes, _) in &sections {
        out.extend_from_slice(bytes);
    }
    out
}

/// A snapshot kept as its parts: the shared tables (one copy per revision, shared by every
/// node's snapshot) and one node's own tables, with the header and directory the complete
/// snapshot starts with. The controller keeps these per node — tens of kilobytes each instead of
/// a multi-megabyte copy of the shared tables — and assembles a complete snapshot only for an
/// agent that needs one; `delta::diff_parts` diffs two of them without assembling either.
#[derive(Clone, Debug)]
pub struct SnapshotParts {
    shared: Arc<SharedTables>,
    node: NodeTables,
    prefix: Vec<u8>,
}

impl SnapshotParts {
    /// Makes this node's sections share memory with equal ones `interner` has seen (the
    /// bytes do not change).
    pub fn share_sections(&mut self, interner: &mut SectionInterner) {
        interner.intern(&mut self.node);
    }

    /// Joins `shared` and `node`; the checksum is combined from the sections' own.
    pub fn new(shared: Arc<SharedTables>, node: NodeTables) -> Self {
        let prefix = prefix(&node, &ordered_sections(&shared, &node));
        Self {
            shared,
            node,
            prefix,
        }
    }

    /// The complete snapshot, as [`assemble`] writes it.
    pub fn assemble(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        out.extend_from_slice(&self.prefix);
        for (_, bytes, _) in ordered_sections(&self.shared, &self.node) {
            out.extend_from_slice(bytes);
        }
        out
    }

    /// Bytes `range` of the complete snapshot (clamped to its length), copied from the parts:
    /// what a chunk of a whole snapshot needs, without assembling the rest.
    pub fn read(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        let end = range.end.min(self.len());
        let mut out = Vec::with_capacity(end.saturating_sub(range.start));
        let mut at = 0;
        let pieces = std::iter::once(self.prefix.as_slice()).chain(
            ordered_sections(&self.shared, &self.node)
                .into_iter()
                .map(|(_, b, _)| b),
        );
        for piece in pieces {
            let (from, to) = (range.start.max(at), end.min(at + piece.len()));
            if from < to {
                out.extend_from_slice(&piece[from - at..to - at]);
            }
            at += piece.len();
            if at >= end {
                break;
            }
        }
        out
    }

    /// The header and section directory of the complete snapshot.
    pub fn prefix(&self) -> &[u8] {
        &self.prefix
    }

    /// The shared tables.
    pub fn shared(&self) -> &Arc<SharedTables> {
        &self.shared
    }

    /// The node's own section `id`, as the allocation it shares with other nodes' tables.
    pub(crate) fn node_section(&self, id: SectionId) -> Option<&Arc<Vec<u8>>> {
        self.node
            .sections
            .iter()
            .find(|(found, _)| *found == id)
            .map(|(_, bytes)| bytes)
    }

    /// The sections in snapshot order: `(id, bytes, whether shared)`.
    pub fn sections(&self) -> impl Iterator<Item = (SectionId, &[u8], bool)> {
        ordered_sections(&self.shared, &self.node)
            .into_iter()
            .map(|(id, bytes, crc)| (id, bytes, crc.1))
    }

    /// The revision in the header.
    pub fn revision(&self) -> u64 {
        header::REVISION.get(&self.prefix)
    }

    /// The checksum in the header.
    pub fn checksum(&self) -> u32 {
        header::CRC.get(&self.prefix)
    }

    /// Bytes of the complete snapshot.
    pub fn len(&self) -> usize {
        header::TOTAL_LEN.get(&self.prefix) as usize
    }

    /// Never: a snapshot has at least its header.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held for this node alone (its tables and prefix; the shared tables are counted
    /// once per revision).
    pub fn own_len(&self) -> usize {
        self.prefix.len() + self.node.len()
    }
}

/// Every section of a snapshot in directory order: `(id, bytes, (crc state, shared))`.
type OrderedSection<'a> = (SectionId, &'a [u8], (&'a crc32fast::Hasher, bool));

fn ordered_sections<'a>(shared: &'a SharedTables, node: &'a NodeTables) -> Vec<OrderedSection<'a>> {
    let shared_sections = shared.sections.iter().map(|(id, b)| (*id, b.as_slice()));
    let node_sections = node.sections.iter().map(|(id, b)| (*id, b.as_slice()));
    let mut sections: Vec<OrderedSection<'a>> = shared_sections
        .zip(&shared.crcs)
        .map(|((id, bytes), crc)| (id, bytes, (crc, true)))
        .chain(
            node_sections
                .zip(&node.crcs)
                .map(|((id, bytes), crc)| (id, bytes, (crc, false))),
        )
        .collect();
    sections.sort_by_key(|(id, _, _)| id.index());
    sections
}

/// The header and directory of the snapshot made of `sections`, with its length and its
/// checksum — the CRC of header and directory combined with each section's (crc32fast's
/// `combine`), so the megabytes of shared tables are never hashed again per node.
fn prefix(node: &NodeTables, sections: &[OrderedSection<'_>]) -> Vec<u8> {
    let directory_len = sections.len() * directory::LEN;
    let body_len: usize = sections.iter().map(|(_, b, _)| b.len()).sum();
    let mut out = vec![0; header::LEN + directory_len];
    let (head, directory) = out.split_at_mut(header::LEN);
    // Flags and reserved bytes stay zero.
    header::MAGIC.put(head, &format::MAGIC);
    header::VERSION.put(head, format::VERSION);
    header::TOTAL_LEN.put(head, (header::LEN + directory_len + body_len) as u64);
    header::REVISION.put(head, node.revision);
    header::SECTION_COUNT.put(head, sections.len() as u32);
    header::OWN_NODE.put(head, node.own_node);
    header::DEFAULT_TRANSPORT.put(head, &transport_record(node.default_transport));
    let (entries, _) = directory.as_chunks_mut::<{ directory::LEN }>();
    let mut offset = header::LEN + directory_len;
    for (entry, (id, bytes, _)) in entries.iter_mut().zip(sections) {
        directory::ID.put(entry, *id as u32);
        directory::OFFSET.put(entry, offset as u32);
        directory::SIZE.put(entry, bytes.len() as u32);
        directory::RECORD_SIZE.put(entry, id.record_len() as u32);
        offset += bytes.len();
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[header::CHECKSUMMED_FROM..]);
    for (_, _, (section_crc, _)) in sections {
        crc.combine(section_crc);
    }
    header::CRC.put(&mut out, crc.finalize());
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

/// Appends a zeroed record of `len` bytes (so its padding is zero) and returns it to fill in.
fn push_record(out: &mut Vec<u8>, len: usize) -> &mut [u8] {
    let start = out.len();
    out.resize(start + len, 0);
    &mut out[start..]
}

/// Appends `text` to a string section and points the string field `field` of `record` at it.
fn put_str(record: &mut [u8], field: format::Str, strings: &mut Vec<u8>, text: &str) {
    field.put(record, strings.len(), text.len());
    strings.extend_from_slice(text.as_bytes());
}

fn put_cidr(out: &mut Vec<u8>, network: &Cidr) {
    let (family, bytes) = ip_key(network.address);
    let r = push_record(out, cidr::LEN);
    cidr::IP.put(r, &bytes);
    cidr::FAMILY.put(r, family);
    cidr::PREFIX.put(r, network.prefix);
}

fn address_kind(kind: AddressKind) -> u8 {
    match kind {
        AddressKind::Pod => format::ADDRESS_POD,
        AddressKind::Node => format::ADDRESS_NODE,
    }
}

/// A transports record (also the header's default transport).
fn transport_record(choice: TransportChoice) -> [u8; transport::LEN] {
    let mut r = [0u8; transport::LEN];
    transport::STACK.put(&mut r, choice.stack as u8);
    transport::CONGESTION_CONTROL.put(&mut r, choice.congestion_control as u8);
    r
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
