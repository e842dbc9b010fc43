//! Compiling cluster state into per-node snapshots.
//!
//! ```text
//! pods ─► identities (namespace + labels) ─► label index ─► selector results (identity sets, cached)
//! policies ─► evaluation order (tier, priority, age, namespace/name) ─► compiled rules
//! subjects ─► chain per identity (the ordered policies that apply) ─► deduplicated chains
//! node ─► its pods' chains + shared tables ─► snapshot bytes
//! ```
//!
//! A chain depends only on a pod's identity, so pods with equal labels in one namespace share
//! everything; selectors are evaluated once per distinct selector and scope, through an
//! inverted label index rather than by scanning every pod.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use stackroute_api::{
    self as api, ClusterStackRoute, ClusterStackRouteSpec, RouteRule, StackRoute, StackRouteSpec,
};
use stackroute_snapshot::{
    Action, AddressEntry, AddressKind, Cidr, CongestionControl, Entity, Isolation, LocationMatch,
    NO_IDENTITY, NO_ZONE, NodeEntry, NodeInput, NodeTables, PeerEntry, PolicyEntry, PolicyKind,
    PortEntry, Protocol, RuleEntry, RuleGate, RuleRef, ServiceEntry, SharedInput, SharedTables,
    SnapshotParts, Stack, Tier, TransportChoice, WorkloadEntry, encode::PolicyTables,
};

use crate::selector::{Labels, Requirement, Selector};
use crate::state::ClusterState;
use crate::subject::SubjectSelector;

mod gate;

pub use gate::{GATED_STACKS, GatedRule};

/// Installation settings that shape decisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Addresses that count as inside the cluster even when they are not a known pod or node.
    pub cluster_networks: Vec<Cidr>,
    /// Transport when no rule matches.
    pub default_transport: TransportChoice,
    /// Chains of at least this many rules get an index in the node snapshots
    /// (`stackroute_snapshot::chain_index`).
    pub chain_index_min_rules: usize,
}

/// The default cluster networks: RFC 1918, CGNAT and IPv6 ULA space.
pub const DEFAULT_CLUSTER_NETWORKS: [&str; 5] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fd00::/8",
];

impl Default for Settings {
    fn default() -> Self {
        Self {
            cluster_networks: DEFAULT_CLUSTER_NETWORKS
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
            default_transport: TransportChoice::KERNEL_DEFAULT,
            chain_index_min_rules: stackroute_snapshot::chain_index::MIN_RULES,
        }
    }
}

/// A policy the engine could not use, with where and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyProblem {
    /// `StackRoute/ns/name` or `ClusterStackRoute/name`.
    pub object: String,
    /// Field path.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.path, self.message)
    }
}

/// Where a compiled policy came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyOrigin {
    /// Resource kind.
    pub kind: PolicyKind,
    /// Namespace (empty for ClusterStackRoutes).
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// The compiled policies a node's workloads use: see [`Compiled::node_policies`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePolicies {
    /// FNV-1a of `ids`, so that looking a list of thousands up hashes eight bytes.
    hash: u64,
    ids: Vec<u32>,
}

impl NodePolicies {
    fn new(ids: Vec<u32>) -> Self {
        let hash = ids.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, id| {
            (hash ^ u64::from(*id)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        Self { hash, ids }
    }
}

impl std::hash::Hash for NodePolicies {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// The policy sections of the nodes whose workloads use one [`NodePolicies`], encoded once per
/// compile ([`Compiled::encode_policies`]) for [`Compiled::node_parts_with`].
#[derive(Debug)]
pub struct EncodedPolicies {
    policies: NodePolicies,
    /// The compile's shared tables: which compile this encoding belongs to.
    shared: Arc<SharedTables>,
    tables: PolicyTables,
}

impl EncodedPolicies {
    /// The policies encoded.
    pub fn policies(&self) -> &NodePolicies {
        &self.policies
    }

    /// The encoded sections (to intern them before nodes take them; interning keeps the bytes).
    pub fn tables_mut(&mut self) -> &mut PolicyTables {
        &mut self.tables
    }
}

/// Cluster state compiled for snapshot generation.
#[derive(Debug)]
pub struct Compiled<'s> {
    state: &'s ClusterState,
    settings: Settings,
    shared: Arc<SharedTables>,
    node_names: Vec<String>,
    node_ids: HashMap<&'s str, u32>,
    policies: Vec<PolicyEntry>,
    chains: Vec<Vec<u32>>,
    /// Chain of each pod of `state.pods`.
    pod_chain: Vec<u32>,
    /// Pods (indexes into `state.pods`) of each node.
    pods_by_node: Vec<Vec<usize>>,
    /// Policies left out, and why.
    pub problems: Vec<PolicyProblem>,
    /// Rule entries the NetworkPolicy gate took a kernel-bypass stack from.
    gated: Vec<GatedRule>,
    /// (compiled policy, rule) → index into `gated`.
    gated_at: HashMap<(u32, u32), usize>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Scope {
    All,
    Namespace(u32),
    Namespaces(u32),
}

struct Index<'s> {
    namespace_ids: HashMap<String, u32>,
    namespace_labels: Vec<Labels>,
    identity_namespace: Vec<u32>,
    identity_labels: Vec<&'s Labels>,
    by_label: HashMap<(&'s str, &'s str), Vec<u32>>,
    by_key: HashMap<&'s str, Vec<u32>>,
    by_namespace: Vec<Vec<u32>>,
    namespace_sets: Vec<Vec<bool>>,
    namespace_set_ids: HashMap<Selector, u32>,
    selections: HashMap<(Scope, Selector), u32>,
    sets: Vec<Vec<u32>>,
    set_ids: HashMap<Vec<u32>, u32>,
}

impl<'s> Index<'s> {
    fn namespace_set(&mut self, selector: &Selector) -> u32 {
        if let Some(id) = self.namespace_set_ids.get(selector) {
            return *id;
        }
        let set: Vec<bool> = self
            .namespace_labels
            .iter()
            .map(|labels| selector.matches(labels))
            .collect();
        let id = self.namespace_sets.len() as u32;
        self.namespace_sets.push(set);
        self.namespace_set_ids.insert(selector.clone(), id);
        id
    }

    /// Identity set of the pods `selector` selects within `scope`; cached and deduplicated.
    fn select(&mut self, scope: Scope, selector: &Selector) -> u32 {
        if let Some(id) = self.selections.get(&(scope, selector.clone())) {
            return *id;
        }
        let set = self.selected(scope, selector);
        let id = self.intern(set);
        self.selections.insert((scope, selector.clone()), id);
        id
    }

    /// The identity set `set` (sorted, no duplicates) as a set of the snapshot: an id shared by
    /// every equal set.
    fn intern(&mut self, set: Vec<u32>) -> u32 {
        let next = self.sets.len() as u32;
        let id = *self.set_ids.entry(set.clone()).or_insert(next);
        if id == next {
            self.sets.push(set);
        }
        id
    }

    /// The identities `selector` selects within `scope`, ascending; not recorded as a set.
    fn selected(&self, scope: Scope, selector: &Selector) -> Vec<u32> {
        let candidates = self.candidates(scope, selector);
        let in_scope = |namespace: u32, index: &Self| match scope {
            Scope::All => true,
            Scope::Namespace(ns) => namespace == ns,
            Scope::Namespaces(set) => index
                .namespace_sets
                .get(set as usize)
                .and_then(|s| s.get(namespace as usize))
                .copied()
                .unwrap_or(false),
        };
        let mut set: Vec<u32> = candidates
            .into_iter()
            .filter(|id| {
                in_scope(self.identity_namespace[*id as usize], self)
                    && selector.matches(self.identity_labels[*id as usize])
            })
            .collect();
        set.sort_unstable();
        set.dedup();
        set
    }

    /// A superset of the selected identities, as small as the index allows.
    fn candidates(&self, scope: Scope, selector: &Selector) -> Vec<u32> {
        let mut best: Option<Vec<u32>> = None;
        for requirement in selector.requirements() {
            let list: Vec<u32> = match requirement {
                Requirement::In(key, values) => values
                    .iter()
                    .flat_map(|v| {
                        self.by_label
                            .get(&(key.as_str(), v.as_str()))
                            .into_iter()
                            .flatten()
                            .copied()
                    })
                    .collect(),
                Requirement::Exists(key) => {
                    self.by_key.get(key.as_str()).cloned().unwrap_or_default()
                }
                _ => continue,
            };
            if best.as_ref().is_none_or(|b| list.len() < b.len()) {
                best = Some(list);
            }
        }
        if let Some(best) = best {
            return best;
        }
        match scope {
            Scope::Namespace(ns) => self
                .by_namespace
                .get(ns as usize)
                .cloned()
                .unwrap_or_default(),
            _ => (0..self.identity_labels.len() as u32).collect(),
        }
    }
}

/// The snapshot's number for each identity (indexed by the compiler's dense identity id): a
/// 32-bit FNV-1a hash of its namespace and labels, so it depends on nothing else — not on the
/// order pods are listed in, not on which other identities exist, not on the replica. Two
/// identities that hash alike are told apart in (namespace, labels) order, the later one taking
/// the next free number; [`NO_IDENTITY`] is never given.
fn stable_identity_numbers(
    state: &ClusterState,
    pod_identity: &[u32],
    identities: usize,
) -> Vec<u32> {
    let mut first_pod = vec![usize::MAX; identities];
    for (pod, id) in pod_identity.iter().enumerate() {
        let slot = &mut first_pod[*id as usize];
        *slot = (*slot).min(pod);
    }
    let key = |id: usize| {
        let pod = &state.pods[first_pod[id]];
        (pod.namespace.as_str(), &pod.labels)
    };
    let mut order: Vec<usize> = (0..identities).collect();
    order.sort_unstable_by(|a, b| key(*a).cmp(&key(*b)));
    let mut taken = std::collections::HashSet::with_capacity(identities);
    let mut numbers = vec![NO_IDENTITY; identities];
    for id in order {
        let (namespace, labels) = key(id);
        let mut hash = 0x811c_9dc5u32;
        let mut eat = |bytes: &[u8]| {
            for byte in bytes.iter().chain(&[0]) {
                hash = (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193);
            }
        };
        eat(namespace.as_bytes());
        for (k, v) in labels {
            eat(k.as_bytes());
            eat(v.as_bytes());
        }
        let mut number = hash;
        while number == NO_IDENTITY || !taken.insert(number) {
            number = number.wrapping_add(1);
        }
        numbers[id] = number;
    }
    numbers
}

struct PolicySource<'s> {
    kind: PolicyKind,
    tier: Tier,
    priority: i32,
    created: Option<String>,
    namespace: &'s str,
    name: &'s str,
    rules: &'s [RouteRule],
    subject: Subject<'s>,
}

enum Subject<'s> {
    StackRoute(&'s StackRouteSpec),
    Cluster(&'s ClusterStackRouteSpec),
}

impl<'s> Compiled<'s> {
    /// Compiles `state`. Policies whose selectors are invalid are left out and reported in
    /// [`Compiled::problems`]; everything else is used.
    pub fn new(state: &'s ClusterState, settings: Settings) -> Self {
        let mut problems = Vec::new();

        // Namespaces: every listed one plus every one a pod or policy lives in.
        // Distinct names first (a set), then sort: pods outnumber namespaces a thousand to one.
        let mut distinct: std::collections::HashSet<&str> =
            state.namespaces.keys().map(String::as_str).collect();
        distinct.extend(state.pods.iter().map(|p| p.namespace.as_str()));
        let mut namespace_names: Vec<&str> = distinct.into_iter().collect();
        namespace_names.extend(
            state
                .stack_routes
                .iter()
                .filter_map(|r| r.metadata.namespace.as_deref()),
        );
        namespace_names.sort_unstable();
        namespace_names.dedup();
        let namespace_ids: HashMap<String, u32> = namespace_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), i as u32))
            .collect();
        let namespace_labels: Vec<Labels> = namespace_names
            .iter()
            .map(|n| state.namespace_labels(n))
            .collect();

        // Nodes: listed ones, then any a pod names but that was not listed (no zone, no address).
        let mut node_names: Vec<String> = state.nodes.iter().map(|n| n.name.clone()).collect();
        let mut extra: Vec<&str> = state
            .pods
            .iter()
            .filter_map(|p| p.node.as_deref())
            .collect();
        extra.sort_unstable();
        extra.dedup();
        for name in extra {
            if !state.nodes.iter().any(|n| n.name == name) {
                node_names.push(name.to_string());
            }
        }
        let mut zones: Vec<String> = state.nodes.iter().filter_map(|n| n.zone.clone()).collect();
        zones.sort_unstable();
        zones.dedup();
        let node_entries: Vec<NodeEntry> = node_names
            .iter()
            .map(|name| {
                let zone = state
                    .nodes
                    .iter()
                    .find(|n| &n.name == name)
                    .and_then(|n| n.zone.as_ref())
                    .and_then(|z| zones.binary_search(z).ok())
                    .map_or(NO_ZONE, |z| z as u32);
                NodeEntry {
                    name: name.clone(),
                    zone,
                }
            })
            .collect();

        // Identities and the inverted label index.
        let mut identity_ids: HashMap<(&str, &Labels), u32> = HashMap::new();
        let mut identity_namespace = Vec::new();
        let mut identity_labels: Vec<&Labels> = Vec::new();
        let mut pod_identity = Vec::with_capacity(state.pods.len());
        for pod in &state.pods {
            let next = identity_labels.len() as u32;
            let id = *identity_ids
                .entry((pod.namespace.as_str(), &pod.labels))
                .or_insert(next);
            if id == next {
                identity_namespace.push(namespace_ids[pod.namespace.as_str()]);
                identity_labels.push(&pod.labels);
            }
            pod_identity.push(id);
        }
        let mut by_label: HashMap<(&str, &str), Vec<u32>> = HashMap::new();
        let mut by_key: HashMap<&str, Vec<u32>> = HashMap::new();
        let mut by_namespace = vec![Vec::new(); namespace_names.len()];
        for (id, labels) in identity_labels.iter().enumerate() {
            for (key, value) in labels.iter() {
                by_label
                    .entry((key.as_str(), value.as_str()))
                    .or_default()
                    .push(id as u32);
                by_key.entry(key.as_str()).or_default().push(id as u32);
            }
            by_namespace[identity_namespace[id] as usize].push(id as u32);
        }
        let mut index = Index {
            namespace_ids,
            namespace_labels,
            identity_namespace,
            identity_labels,
            by_label,
            by_key,
            by_namespace,
            namespace_sets: Vec::new(),
            namespace_set_ids: HashMap::new(),
            selections: HashMap::new(),
            sets: Vec::new(),
            set_ids: HashMap::new(),
        };

        // Policies in evaluation order.
        let mut sources: Vec<PolicySource<'s>> = Vec::new();
        for route in &state.stack_routes {
            sources.push(source_of_stack_route(route));
        }
        for route in &state.cluster_stack_routes {
            sources.push(source_of_cluster_stack_route(route));
        }
        sources.sort_by(|a, b| {
            (
                a.tier,
                a.priority,
                a.created.is_none(),
                &a.created,
                a.namespace,
                a.name,
                a.kind,
            )
                .cmp(&(
                    b.tier,
                    b.priority,
                    b.created.is_none(),
                    &b.created,
                    b.namespace,
                    b.name,
                    b.kind,
                ))
        });

        let mut policies = Vec::with_capacity(sources.len());
        let mut subjects = Vec::with_capacity(sources.len());
        let mut chain_lists: Vec<Vec<u32>> = vec![Vec::new(); index.identity_labels.len()];
        for source in &sources {
            let object = match source.kind {
                PolicyKind::StackRoute => {
                    format!("StackRoute/{}/{}", source.namespace, source.name)
                }
                PolicyKind::ClusterStackRoute => format!("ClusterStackRoute/{}", source.name),
            };
            match compile_policy(source, &mut index) {
                Ok((entry, subject)) => {
                    let policy = policies.len() as u32;
                    for identity in &index.sets[subject as usize] {
                        chain_lists[*identity as usize].push(policy);
                    }
                    policies.push(entry);
                    subjects.push(subject);
                }
                Err((path, message)) => problems.push(PolicyProblem {
                    object,
                    path,
                    message,
                }),
            }
        }

        // Kernel-bypass stacks only where NetworkPolicy allows: may copy policies per source.
        let gated = gate::apply(
            state,
            &settings,
            &mut index,
            &pod_identity,
            &mut policies,
            &subjects,
            &mut chain_lists,
        );

        let mut chain_ids: HashMap<&[u32], u32> = HashMap::new();
        let mut identity_chain = Vec::with_capacity(chain_lists.len());
        let mut chains: Vec<Vec<u32>> = Vec::new();
        for list in &chain_lists {
            let next = chains.len() as u32;
            let id = *chain_ids.entry(list.as_slice()).or_insert(next);
            if id == next {
                chains.push(list.clone());
            }
            identity_chain.push(id);
        }
        let pod_chain: Vec<u32> = pod_identity
            .iter()
            .map(|id| identity_chain[*id as usize])
            .collect();

        let index_of_name: HashMap<&str, u32> = node_names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.as_str(), i as u32))
            .collect();
        let node_ids: HashMap<&'s str, u32> = state
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .chain(state.pods.iter().filter_map(|p| p.node.as_deref()))
            .filter_map(|name| index_of_name.get(name).map(|i| (name, *i)))
            .collect();
        // What the snapshot calls each identity: a number that depends on the identity alone,
        // so a revision that adds or removes one leaves every other's as it was (and the
        // delta to each node small), in every replica.
        let wire = stable_identity_numbers(state, &pod_identity, index.identity_labels.len());
        let mut pods_by_node = vec![Vec::new(); node_names.len()];
        let mut addresses = Vec::new();
        for (index_in_state, pod) in state.pods.iter().enumerate() {
            let Some(node) = pod.node.as_deref().and_then(|n| node_ids.get(n)).copied() else {
                continue;
            };
            pods_by_node[node as usize].push(index_in_state);
            if !pod.host_network {
                for ip in &pod.ips {
                    addresses.push(AddressEntry {
                        ip: *ip,
                        kind: AddressKind::Pod,
                        identity: wire[pod_identity[index_in_state] as usize],
                        node,
                    });
                }
            }
        }
        for node in &state.nodes {
            let id = node_ids[node.name.as_str()];
            for ip in &node.addresses {
                addresses.push(AddressEntry {
                    ip: *ip,
                    kind: AddressKind::Node,
                    identity: NO_IDENTITY,
                    node: id,
                });
            }
        }

        let services = service_entries(state);
        let shared = Arc::new(SharedTables::build(&SharedInput {
            zones,
            nodes: node_entries,
            cluster_networks: settings.cluster_networks.clone(),
            addresses,
            services,
            identity_sets: std::mem::take(&mut index.sets)
                .into_iter()
                .map(|set| {
                    let mut numbers: Vec<u32> = set.iter().map(|id| wire[*id as usize]).collect();
                    numbers.sort_unstable();
                    numbers
                })
                .collect(),
        }));

        Self {
            state,
            settings,
            shared,
            node_names,
            node_ids,
            policies,
            chains,
            pod_chain,
            pods_by_node,
            problems,
            gated: gated.entries,
            gated_at: gated.at,
        }
    }

    /// The rule entries the NetworkPolicy gate took a kernel-bypass stack from (for some or all
    /// of their sources), with why: what a controller reports per policy and counts.
    pub fn network_policy_gated(&self) -> &[GatedRule] {
        &self.gated
    }

    /// What the NetworkPolicy gate did to `rule` of the snapshot of `node` (a rule the gate
    /// split or took a stack from), or `None`.
    pub fn gated_rule(&self, node: &str, rule: RuleRef) -> Option<&GatedRule> {
        let id = *self.node_ids.get(node)?;
        // The node's local policy numbers, as `node_tables` assigns them.
        let used = self.used_policies(id);
        let global = *used.get(rule.policy as usize)?;
        self.gated_at
            .get(&(global, rule.rule))
            .and_then(|i| self.gated.get(*i))
    }

    /// Node names, in node-id order.
    pub fn node_names(&self) -> &[String] {
        &self.node_names
    }

    /// Number of compiled policies and rules (the NetworkPolicy gate's per-source copies of a
    /// policy and the rules it split count too).
    pub fn counts(&self) -> (usize, usize) {
        (
            self.policies.len(),
            self.policies.iter().map(|p| p.rules.len()).sum(),
        )
    }

    /// Where each compiled policy came from, in evaluation order (a policy the NetworkPolicy
    /// gate copied for some of its sources appears once per copy).
    pub fn origins(&self) -> impl Iterator<Item = PolicyOrigin> + '_ {
        self.policies.iter().map(|p| PolicyOrigin {
            kind: p.kind,
            namespace: p.namespace.clone(),
            name: p.name.clone(),
        })
    }

    /// The settings used.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The snapshot of one node, or `None` for an unknown node.
    pub fn node_snapshot(&self, node: &str, revision: u64) -> Option<Vec<u8>> {
        Some(stackroute_snapshot::assemble(
            &self.shared,
            &self.node_tables(node, revision)?,
        ))
    }

    /// The tables every node's snapshot shares (address book, Services, identity sets).
    pub fn shared_tables(&self) -> &Arc<SharedTables> {
        &self.shared
    }

    /// One node's snapshot as its parts (the shared tables, shared, and the node's own), or
    /// `None` for an unknown node: what a controller keeps per node.
    pub fn node_parts(&self, node: &str, revision: u64) -> Option<SnapshotParts> {
        let tables = self.node_tables(node, revision)?;
        Some(SnapshotParts::new(self.shared.clone(), tables))
    }

    /// The node-specific part of one node's snapshot, or `None` for an unknown node; join it
    /// with [`Compiled::shared_tables`] by [`stackroute_snapshot::assemble`].
    pub fn node_tables(&self, node: &str, revision: u64) -> Option<NodeTables> {
        let (mut input, used) = self.node_input(node, revision)?;
        input.policies = used.iter().map(|p| &self.policies[*p as usize]).collect();
        Some(stackroute_snapshot::encode_node_tables(
            &self.shared,
            &input,
        ))
    }

    /// The compiled policies `node`'s workloads use, or `None` for an unknown node: nodes with
    /// equal ones have equal policy sections ([`Compiled::encode_policies`]).
    pub fn node_policies(&self, node: &str) -> Option<NodePolicies> {
        let id = *self.node_ids.get(node)?;
        Some(NodePolicies::new(self.used_policies(id)))
    }

    /// Whether a rule of `policies` can pick RDMA: the nodes whose workloads use them are the
    /// ones that need the cluster's listener registrations (an RDMA client finds the server's
    /// endpoint there; no other transport asks).
    pub fn policies_may_use_rdma(&self, policies: &NodePolicies) -> bool {
        policies.ids.iter().any(|p| {
            self.policies[*p as usize]
                .rules
                .iter()
                .any(|rule| rule.transports.iter().any(|t| t.stack == Stack::Rdma))
        })
    }

    /// The policy sections of every node whose workloads use `policies`, encoded once. (Lists
    /// of another compile are encoded as this one's numbers say; no node of this one uses a list
    /// that names a policy it lacks, so such an encoding is never taken.)
    pub fn encode_policies(&self, policies: NodePolicies) -> EncodedPolicies {
        let entries: Vec<&PolicyEntry> = policies
            .ids
            .iter()
            .filter_map(|p| self.policies.get(*p as usize))
            .collect();
        EncodedPolicies {
            tables: stackroute_snapshot::encode::encode_policy_tables(&self.shared, &entries),
            shared: self.shared.clone(),
            policies,
        }
    }

    /// [`Compiled::node_parts`], taking the node's policy sections from `encoded` when it holds
    /// this compile's encoding of the node's policies (and encoding them otherwise): the same
    /// bytes either way, since the policy sections depend on nothing else.
    pub fn node_parts_with(
        &self,
        node: &str,
        revision: u64,
        encoded: &EncodedPolicies,
    ) -> Option<SnapshotParts> {
        let (mut input, used) = self.node_input(node, revision)?;
        // The shared tables are this compile's own allocation, kept alive by `encoded`: equal
        // addresses mean the policy numbers and identity sets it was encoded with are these.
        let tables = if Arc::ptr_eq(&encoded.shared, &self.shared) && encoded.policies.ids == used {
            stackroute_snapshot::encode::encode_node_tables_with(
                &self.shared,
                &encoded.tables,
                &input,
            )
        } else {
            input.policies = used.iter().map(|p| &self.policies[*p as usize]).collect();
            stackroute_snapshot::encode_node_tables(&self.shared, &input)
        };
        Some(SnapshotParts::new(self.shared.clone(), tables))
    }

    /// The compiled policies (global numbers, ascending) the chains of node `id`'s pods use.
    fn used_policies(&self, id: u32) -> Vec<u32> {
        let mut chains: Vec<u32> = self.pods_by_node[id as usize]
            .iter()
            .map(|pod| self.pod_chain[*pod])
            .collect();
        chains.sort_unstable();
        chains.dedup();
        let mut used: Vec<u32> = chains
            .iter()
            .flat_map(|c| self.chains[*c as usize].iter().copied())
            .collect();
        // Chains ascend (evaluation order): a stable sort merges them as runs.
        used.sort();
        used.dedup();
        used
    }

    /// What [`stackroute_snapshot::encode_node_tables`] needs for `node` but its policies, and
    /// the global numbers of those (`input.policies` in that order), or `None` for an unknown
    /// node.
    fn node_input(&self, node: &str, revision: u64) -> Option<(NodeInput<'_>, Vec<u32>)> {
        let id = *self.node_ids.get(node)?;
        let mut chain_map: HashMap<u32, u32> = HashMap::new();
        let mut global_chains: Vec<u32> = Vec::new();
        let mut input = NodeInput {
            revision,
            own_node: id,
            default_transport: Some(self.settings.default_transport),
            chain_index_min_rules: Some(self.settings.chain_index_min_rules),
            ..Default::default()
        };
        for &pod_index in &self.pods_by_node[id as usize] {
            let pod = &self.state.pods[pod_index];
            let global_chain = self.pod_chain[pod_index];
            let next = input.chains.len() as u32;
            let chain = *chain_map.entry(global_chain).or_insert(next);
            if chain == next {
                global_chains.push(global_chain);
                input.chains.push(Vec::new());
            }
            input.workloads.push(WorkloadEntry {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                ips: if pod.host_network {
                    Vec::new()
                } else {
                    pod.ips.clone()
                },
                chain,
            });
        }
        // Local policy numbers follow the global evaluation order, so every chain ascends
        // through the Policies, Rules and RuleFilters sections: a lookup's walk reads memory
        // forwards, which the hardware prefetcher follows.
        let used = self.used_policies(id);
        for (local, global) in input.chains.iter_mut().zip(&global_chains) {
            *local = self.chains[*global as usize]
                .iter()
                .map(|p| used.binary_search(p).unwrap_or_default() as u32)
                .collect();
        }
        Some((input, used))
    }

    /// Every node's own tables, encoded on all available cores: what a revision costs the
    /// controller when the shared tables travel once.
    pub fn all_node_tables(&self, revision: u64) -> Vec<(String, NodeTables)> {
        self.for_all_nodes(|name| self.node_tables(name, revision))
    }

    /// Every node's complete snapshot, encoded on all available cores.
    pub fn all_node_snapshots(&self, revision: u64) -> Vec<(String, Vec<u8>)> {
        self.for_all_nodes(|name| self.node_snapshot(name, revision))
    }

    fn for_all_nodes<T: Send>(&self, each: impl Fn(&str) -> Option<T> + Sync) -> Vec<(String, T)> {
        map_on_all_cores(&self.node_names, |name| Some((name.clone(), each(name)?)))
    }
}

/// `each` of `items` on all available cores, in order; `None`s left out. Encoding is per node
/// and CPU-bound: one contiguous share of the items per core.
pub fn map_on_all_cores<'a, T: Sync, U: Send>(
    items: &'a [T],
    each: impl Fn(&'a T) -> Option<U> + Sync,
) -> Vec<U> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len().max(1));
    let chunk = items.len().div_ceil(workers).max(1);
    let each = &each;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|share| scope.spawn(move || share.iter().filter_map(each).collect::<Vec<_>>()))
            .collect();
        // Workers only encode; they cannot panic on valid compiled state.
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("encoding worker panicked"))
            .collect()
    })
}

fn source_of_stack_route(route: &StackRoute) -> PolicySource<'_> {
    PolicySource {
        kind: PolicyKind::StackRoute,
        tier: Tier::Namespace,
        priority: route.spec.priority,
        created: route
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        namespace: route.metadata.namespace.as_deref().unwrap_or("default"),
        name: route.metadata.name.as_deref().unwrap_or_default(),
        rules: &route.spec.rules,
        subject: Subject::StackRoute(&route.spec),
    }
}

fn source_of_cluster_stack_route(route: &ClusterStackRoute) -> PolicySource<'_> {
    PolicySource {
        kind: PolicyKind::ClusterStackRoute,
        tier: match route.spec.tier {
            api::Tier::Admin => Tier::Admin,
            api::Tier::Baseline => Tier::Baseline,
        },
        priority: route.spec.priority,
        created: route
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string()),
        namespace: "",
        name: route.metadata.name.as_deref().unwrap_or_default(),
        rules: &route.spec.rules,
        subject: Subject::Cluster(&route.spec),
    }
}

type CompileError = (String, String);

fn parse_selector(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    path: &str,
) -> Result<Selector, CompileError> {
    Selector::parse(selector).map_err(|message| (path.to_string(), message))
}

fn compile_policy(
    source: &PolicySource<'_>,
    index: &mut Index<'_>,
) -> Result<(PolicyEntry, u32), CompileError> {
    let own_namespace = index.namespace_ids.get(source.namespace).copied();
    let parsed = match source.subject {
        Subject::StackRoute(spec) => SubjectSelector::of_stack_route(source.namespace, spec)?,
        Subject::Cluster(spec) => SubjectSelector::of_cluster(spec)?,
    };
    let subject = match &parsed {
        // A StackRoute in a namespace with no pods selects nothing yet.
        SubjectSelector::Namespace { pods, .. } => match own_namespace {
            Some(ns) => index.select(Scope::Namespace(ns), pods),
            None => index.select(Scope::Namespaces(u32::MAX), pods),
        },
        SubjectSelector::Namespaces(namespaces) => {
            let set = index.namespace_set(namespaces);
            index.select(Scope::Namespaces(set), &Selector::default())
        }
        SubjectSelector::Pods { pods, namespaces } => {
            let scope = match namespaces {
                Some(namespaces) => Scope::Namespaces(index.namespace_set(namespaces)),
                None => Scope::All,
            };
            index.select(scope, pods)
        }
    };
    let mut rules = Vec::with_capacity(source.rules.len());
    for (position, rule) in source.rules.iter().enumerate() {
        rules.push(compile_rule(source, own_namespace, rule, position, index)?);
    }
    Ok((
        PolicyEntry {
            kind: source.kind,
            tier: source.tier,
            priority: source.priority.clamp(0, 1000) as u16,
            namespace: source.namespace.to_string(),
            name: source.name.to_string(),
            rules,
        },
        subject,
    ))
}

fn compile_rule(
    source: &PolicySource<'_>,
    own_namespace: Option<u32>,
    rule: &RouteRule,
    position: usize,
    index: &mut Index<'_>,
) -> Result<RuleEntry, CompileError> {
    let path = format!("spec.rules[{position}]");
    let peers = match &rule.to {
        None => None,
        Some(peers) => {
            let mut compiled = Vec::with_capacity(peers.len());
            for (peer_position, peer) in peers.iter().enumerate() {
                let peer_path = format!("{path}.to[{peer_position}]");
                if let Some(pods) = &peer.pods {
                    let pod_selector = parse_selector(
                        &pods.pod_selector,
                        &format!("{peer_path}.pods.podSelector"),
                    )?;
                    let scope = match (&pods.namespace_selector, source.kind) {
                        (Some(ns), _) => Scope::Namespaces(index.namespace_set(&parse_selector(
                            ns,
                            &format!("{peer_path}.pods.namespaceSelector"),
                        )?)),
                        (None, PolicyKind::StackRoute) => {
                            own_namespace.map_or(Scope::Namespaces(u32::MAX), Scope::Namespace)
                        }
                        (None, PolicyKind::ClusterStackRoute) => Scope::All,
                    };
                    compiled.push(PeerEntry::Pods(index.select(scope, &pod_selector)));
                } else if let Some(networks) = &peer.networks {
                    let mut cidrs = Vec::with_capacity(networks.len());
                    for (n, text) in networks.iter().enumerate() {
                        cidrs.push(
                            text.parse::<Cidr>()
                                .map_err(|m| (format!("{peer_path}.networks[{n}]"), m))?,
                        );
                    }
                    compiled.push(PeerEntry::Networks(cidrs));
                } else if let Some(entity) = peer.entity {
                    compiled.push(PeerEntry::Entity(match entity {
                        api::Entity::World => Entity::World,
                        api::Entity::Cluster => Entity::Cluster,
                    }));
                } else {
                    return Err((
                        peer_path,
                        "a peer must set exactly one of pods, networks or entity".into(),
                    ));
                }
            }
            Some(compiled)
        }
    };
    let ports = rule.ports.as_ref().map(|ports| {
        ports
            .iter()
            .map(|p| {
                let protocol = match p.protocol {
                    api::Protocol::TCP => Protocol::Tcp,
                    api::Protocol::UDP => Protocol::Udp,
                };
                let first = p.port.map_or(0, |port| port.clamp(0, 65535) as u16);
                let last = p
                    .end_port
                    .or(p.port)
                    .map_or(65535, |port| port.clamp(0, 65535) as u16);
                PortEntry {
                    protocol,
                    first,
                    last: last.max(first),
                }
            })
            .collect()
    });
    let isolation = match rule.isolation {
        api::Isolation::None => Isolation::None,
        api::Isolation::KernelEnforced => Isolation::KernelEnforced,
        api::Isolation::Dedicated => Isolation::Dedicated,
    };
    let action = match rule.action.unwrap_or_default() {
        api::Action::Route => Action::Route,
        api::Action::Pass => Action::Pass,
    };
    let mut transports = Vec::new();
    if let (Action::Route, Some(transport)) = (action, &rule.transport) {
        transports.push(choice(transport.stack, transport.congestion_control));
        for fallback in transport.fallback.iter().flatten() {
            transports.push(choice(fallback.stack, fallback.congestion_control));
        }
        // The implicit last resort, unless the rule forbids the kernel or already ends there.
        if isolation != Isolation::Dedicated
            && !transports.contains(&TransportChoice::KERNEL_DEFAULT)
        {
            transports.push(TransportChoice::KERNEL_DEFAULT);
        }
    }
    Ok(RuleEntry {
        name: rule.name.clone(),
        action,
        peers,
        ports,
        location: match rule.location {
            api::Location::SameNode => LocationMatch::SameNode,
            api::Location::SameZone => LocationMatch::SameZone,
            api::Location::SameCluster => LocationMatch::SameCluster,
            api::Location::External => LocationMatch::External,
            api::Location::Any => LocationMatch::Any,
        },
        isolation,
        transports,
        gate: RuleGate::default(),
    })
}

/// Converts an API stack and congestion control to the snapshot's.
pub fn choice(stack: api::Stack, congestion_control: api::CongestionControl) -> TransportChoice {
    TransportChoice {
        stack: match stack {
            api::Stack::Kernel => Stack::Kernel,
            api::Stack::Userspace => Stack::Userspace,
            api::Stack::RDMA => Stack::Rdma,
        },
        congestion_control: match congestion_control {
            api::CongestionControl::Default => CongestionControl::Default,
            api::CongestionControl::Cubic => CongestionControl::Cubic,
            api::CongestionControl::BBR => CongestionControl::Bbr,
            api::CongestionControl::Reno => CongestionControl::Reno,
        },
    }
}

/// Service frontends with their ready backends, resolved through EndpointSlices.
fn service_entries(state: &ClusterState) -> Vec<ServiceEntry> {
    let mut slices: BTreeMap<(&str, &str), Vec<&crate::state::EndpointSliceInfo>> = BTreeMap::new();
    for slice in &state.endpoint_slices {
        slices
            .entry((slice.namespace.as_str(), slice.service.as_str()))
            .or_default()
            .push(slice);
    }
    let mut entries = Vec::new();
    for service in &state.services {
        let service_slices = slices.get(&(service.namespace.as_str(), service.name.as_str()));
        for port in &service.ports {
            let mut backends: Vec<(IpAddr, u16)> = Vec::new();
            for slice in service_slices.into_iter().flatten() {
                let Some((_, target, _)) = slice
                    .ports
                    .iter()
                    .find(|(name, _, protocol)| *name == port.name && *protocol == port.protocol)
                else {
                    continue;
                };
                backends.extend(slice.addresses.iter().map(|ip| (*ip, *target)));
            }
            backends.sort();
            backends.dedup();
            for ip in &service.cluster_ips {
                entries.push(ServiceEntry {
                    ip: *ip,
                    port: port.port,
                    protocol: port.protocol,
                    backends: backends.clone(),
                });
            }
        }
    }
    entries
}
