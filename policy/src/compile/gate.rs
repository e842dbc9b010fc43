//! The NetworkPolicy gate: a kernel-bypass stack stays in a compiled rule only for the flows
//! NetworkPolicy allows (README "NetworkPolicy and kernel bypass").
//!
//! A compiled rule is shared by every source identity whose chain holds its policy, and covers
//! every destination its peers match on every port of its `ports`. For each rule naming a gated
//! stack ([`GATED_STACKS`]: RDMA) and each source identity, the gate asks [`NetworkPolicies`]
//! about every flow the rule covers, and:
//! - every flow allowed: the rule stays as it is;
//! - some pod destinations allowed: the rule is split into the *allowed part* — the same rule
//!   with peers narrowed to those pods (an identity set), keeping the stack — and, right after
//!   it, the rule without the stack for everything else;
//! - otherwise: the stack is removed from the rule.
//!
//! Sources with different outcomes get different copies of the policy (same name, same place in
//! the evaluation order), so each source's chain holds the copy that is right for it. Every
//! entry is kept only if every flow it covers is allowed; whatever the gate cannot narrow
//! precisely loses the stack (fail closed):
//! - destinations matched by address (`networks` peers, `entity`, a rule without `to`: node
//!   addresses and addresses of no pod) are all-or-nothing per peer, and a rule without `to` or
//!   with `entity: Cluster` keeps the stack in its allowed part for pod destinations only;
//! - ports are all-or-nothing per rule: a rule keeps the stack for a destination only if every
//!   port it covers is allowed;
//! - `location` is ignored (a rule is judged on every destination it could match anywhere).
//!
//! The work is done once per distinct [`PodFacts`] (pods that every NetworkPolicy treats alike),
//! not per pod, and costs nothing when the state holds no NetworkPolicy and no foreign policy,
//! or no rule names a gated stack.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use stackroute_snapshot::{
    Entity, PeerEntry, PolicyEntry, PolicyKind, PortEntry, RuleEntry, Stack, TransportChoice,
};

use super::{Index, Scope, Settings};
use crate::netpol::{ALL_PORTS, AddressSet, Endpoint, NetworkPolicies, PodFacts, Verdict};
use crate::state::ClusterState;

/// The stacks whose packets bypass the node's kernel packet path — and with it the network
/// plugin's NetworkPolicy enforcement (RoCE traffic goes from the RDMA NIC to the wire). The
/// user-space stack is not gated: it sends through the pod's own interface, so its packets
/// still cross the host-side hook where network plugins enforce NetworkPolicy. A user-space
/// stack on a dedicated device (SR-IOV, DPDK) would bypass it too and must be added here when the
/// model can express one.
pub const GATED_STACKS: [Stack; 1] = [Stack::Rdma];

fn is_gated(choice: &TransportChoice) -> bool {
    GATED_STACKS.contains(&choice.stack)
}

/// A rule entry that lost a gated stack for some of its sources, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatedRule {
    /// The policy's kind.
    pub kind: PolicyKind,
    /// Its namespace (empty for ClusterStackRoutes).
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The rule's name.
    pub rule: String,
    /// The stacks removed.
    pub removed: Vec<Stack>,
    /// How many source identities (pods with equal namespace and labels) this applies to.
    pub sources: usize,
    /// Whether the rule keeps the stacks for some destinations (split into an allowed part).
    pub partial: bool,
    /// Whether the reason is that NetworkPolicy cannot be decided (else: it denies).
    pub undecidable: bool,
    /// Why: one flow the rule covers that NetworkPolicy denies or cannot decide.
    pub reason: String,
}

impl GatedRule {
    /// `StackRoute/namespace/name` or `ClusterStackRoute/name`.
    pub fn object(&self) -> String {
        match self.kind {
            PolicyKind::StackRoute => format!("StackRoute/{}/{}", self.namespace, self.name),
            PolicyKind::ClusterStackRoute => format!("ClusterStackRoute/{}", self.name),
        }
    }
}

impl std::fmt::Display for GatedRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let removed: Vec<&str> = self.removed.iter().map(|s| s.as_str()).collect();
        write!(
            f,
            "{} rule {}: {} removed{} for {} source identit{} (network-policy: {})",
            self.object(),
            self.rule,
            removed.join(", "),
            if self.partial {
                " except toward destinations NetworkPolicy allows"
            } else {
                ""
            },
            self.sources,
            if self.sources == 1 { "y" } else { "ies" },
            self.reason
        )
    }
}

/// What the gate did: the entries, and where each gated rule sits among the compiled policies.
#[derive(Debug, Default)]
pub(super) struct Gated {
    pub(super) entries: Vec<GatedRule>,
    /// (compiled policy, rule) → entry, for the allowed parts and the stripped rules alike.
    pub(super) at: HashMap<(u32, u32), usize>,
}

/// Applies the gate to the compiled `policies` (in evaluation order; `subjects` holds each one's
/// identity set) and the identities' `chains`, adding policy copies where sources differ.
pub(super) fn apply(
    state: &ClusterState,
    settings: &Settings,
    index: &mut Index<'_>,
    pod_identity: &[u32],
    policies: &mut Vec<PolicyEntry>,
    subjects: &[u32],
    chains: &mut [Vec<u32>],
) -> Gated {
    let mut gated = Gated::default();
    if state.network_policies.is_empty()
        && state.unreadable_network_policies.is_empty()
        && state.foreign_policies.is_empty()
    {
        return gated; // no pod is isolated: every flow is allowed
    }
    let gated_rules: Vec<(usize, Vec<usize>)> = policies
        .iter()
        .enumerate()
        .filter_map(|(p, policy)| {
            let rules: Vec<usize> = policy
                .rules
                .iter()
                .enumerate()
                .filter(|(_, rule)| rule.transports.iter().any(is_gated))
                .map(|(r, _)| r)
                .collect();
            (!rules.is_empty()).then_some((p, rules))
        })
        .collect();
    if gated_rules.is_empty() {
        return gated;
    }
    let netpol = NetworkPolicies::from_state(state);

    if let Some(reason) = netpol.foreign_reason() {
        // Undecidable for every source alike: strip in place.
        for (p, rules) in &gated_rules {
            let sources = index.sets[subjects[*p] as usize].len();
            for &r in rules {
                let removed = strip(&mut policies[*p].rules[r]);
                gated.at.insert((*p as u32, r as u32), gated.entries.len());
                gated.entries.push(entry(
                    &policies[*p],
                    r,
                    removed,
                    sources,
                    false,
                    &Verdict::Undecidable(reason.clone()),
                ));
            }
        }
        return gated;
    }

    let mut gate = Gate::new(state, settings, index, pod_identity, &netpol);
    let mut variants: Vec<Variant> = Vec::new();
    for (p, rules) in &gated_rules {
        let targets: Vec<Targets> = rules
            .iter()
            .map(|&r| gate.targets(&policies[*p].rules[r], index))
            .collect();
        let mut by_class: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
        for &identity in &index.sets[subjects[*p] as usize] {
            by_class
                .entry(gate.class_of[identity as usize])
                .or_default()
                .push(identity);
        }
        // Classes with the same actions share one copy of the policy.
        let mut groups: Vec<(Vec<Action>, Vec<Verdict>, Vec<u32>)> = Vec::new();
        for (class, identities) in by_class {
            let mut view = gate.view(class);
            let outcomes: Vec<(Action, Verdict)> = targets
                .iter()
                .map(|t| gate.outcome(class, &mut view, t))
                .collect();
            if outcomes.iter().all(|(action, _)| *action == Action::Keep) {
                continue;
            }
            let (actions, verdicts): (Vec<Action>, Vec<Verdict>) = outcomes.into_iter().unzip();
            match groups.iter_mut().find(|(a, _, _)| *a == actions) {
                Some(group) => group.2.extend(identities),
                None => groups.push((actions, verdicts, identities)),
            }
        }
        for (actions, verdicts, identities) in groups {
            let original = &policies[*p];
            let mut copy = PolicyEntry {
                rules: Vec::with_capacity(original.rules.len() + 1),
                ..original.clone()
            };
            let mut notes = Vec::new();
            for (r, rule) in original.rules.iter().enumerate() {
                let Some(k) = rules.iter().position(|g| *g == r) else {
                    copy.rules.push(rule.clone());
                    continue;
                };
                let (action, verdict) = (&actions[k], &verdicts[k]);
                let at = gated.entries.len();
                let partial = match action {
                    Action::Keep => {
                        copy.rules.push(rule.clone());
                        continue;
                    }
                    Action::Strip => false,
                    Action::Split { allowed, kept } => {
                        let mut part = rule.clone();
                        let mut peers = Vec::new();
                        if !allowed.is_empty() {
                            peers.push(PeerEntry::Pods(index.intern(allowed.clone())));
                        }
                        peers.extend(
                            kept.iter()
                                .filter_map(|part| targets[k].parts[*part].peer.clone()),
                        );
                        part.peers = Some(peers);
                        part.gate.allowed_part = true;
                        notes.push((copy.rules.len(), at));
                        copy.rules.push(part);
                        true
                    }
                };
                let mut stripped = rule.clone();
                let removed = strip(&mut stripped);
                notes.push((copy.rules.len(), at));
                copy.rules.push(stripped);
                gated.entries.push(entry(
                    original,
                    r,
                    removed,
                    identities.len(),
                    partial,
                    verdict,
                ));
            }
            variants.push(Variant {
                policy: *p,
                entry: copy,
                identities,
                notes,
            });
        }
    }
    renumber(policies, chains, variants, &mut gated);
    gated
}

/// Removes the gated stacks from a rule; returns them.
fn strip(rule: &mut RuleEntry) -> Vec<Stack> {
    let mut removed: Vec<Stack> = rule
        .transports
        .iter()
        .filter(|t| is_gated(t))
        .map(|t| t.stack)
        .collect();
    removed.sort_unstable();
    removed.dedup();
    rule.transports.retain(|t| !is_gated(t));
    rule.gate.removed_rdma |= removed.contains(&Stack::Rdma);
    rule.gate.removed_userspace |= removed.contains(&Stack::Userspace);
    removed
}

fn entry(
    policy: &PolicyEntry,
    rule: usize,
    removed: Vec<Stack>,
    sources: usize,
    partial: bool,
    verdict: &Verdict,
) -> GatedRule {
    GatedRule {
        kind: policy.kind,
        namespace: policy.namespace.clone(),
        name: policy.name.clone(),
        rule: policy.rules[rule].name.clone(),
        removed,
        sources,
        partial,
        undecidable: matches!(verdict, Verdict::Undecidable(_)),
        reason: verdict.reason().unwrap_or_default().to_string(),
    }
}

/// A copy of a policy for some of its sources.
struct Variant {
    policy: usize,
    entry: PolicyEntry,
    identities: Vec<u32>,
    /// (rule position in the copy, gated entry) of every rule the gate changed.
    notes: Vec<(usize, usize)>,
}

/// Places every copy right after its original (so chains still ascend in evaluation order) and
/// points each source's chain at its copy.
fn renumber(
    policies: &mut Vec<PolicyEntry>,
    chains: &mut [Vec<u32>],
    variants: Vec<Variant>,
    gated: &mut Gated,
) {
    if variants.is_empty() {
        return;
    }
    let mut by_policy: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (v, variant) in variants.iter().enumerate() {
        by_policy.entry(variant.policy).or_default().push(v);
    }
    let originals = std::mem::take(policies);
    let mut new_id = Vec::with_capacity(originals.len());
    let mut variant_id = vec![0u32; variants.len()];
    let mut entries: Vec<Option<PolicyEntry>> =
        variants.iter().map(|v| Some(v.entry.clone())).collect();
    for (p, original) in originals.into_iter().enumerate() {
        new_id.push(policies.len() as u32);
        policies.push(original);
        for &v in by_policy.get(&p).into_iter().flatten() {
            variant_id[v] = policies.len() as u32;
            policies.extend(entries[v].take());
        }
    }
    let mut assigned: HashMap<(u32, u32), u32> = HashMap::new();
    for (v, variant) in variants.iter().enumerate() {
        for &identity in &variant.identities {
            assigned.insert((identity, variant.policy as u32), variant_id[v]);
        }
        for &(position, entry) in &variant.notes {
            gated.at.insert((variant_id[v], position as u32), entry);
        }
    }
    for (identity, chain) in chains.iter_mut().enumerate() {
        for policy in chain.iter_mut() {
            *policy = assigned
                .get(&(identity as u32, *policy))
                .copied()
                .unwrap_or(new_id[*policy as usize]);
        }
    }
}

/// What happens to one gated rule for one class of sources.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Action {
    /// Every flow allowed.
    Keep,
    /// The stack goes.
    Strip,
    /// The stack stays for the `allowed` pod identities and the `kept` parts (indexes into
    /// [`Targets::parts`]), and goes for the rest.
    Split { allowed: Vec<u32>, kept: Vec<usize> },
}

/// The destinations a rule covers.
struct Targets {
    /// Pod identities that can be narrowed to one by one (pods peers, and the pods of a rule
    /// without `to` or with `entity: Cluster`), ascending.
    split: Vec<u32>,
    /// The rest, each all-or-nothing.
    parts: Vec<Part>,
    /// The rule's ports (all TCP and UDP ports without `ports`).
    ports: Vec<PortEntry>,
    /// `ports` interned, for the verdict cache.
    ports_id: u32,
}

/// Destinations judged together: every flow to them must be allowed, or none keeps the stack.
struct Part {
    /// The peer to keep in the allowed part when they are; `None` when no peer can express
    /// exactly them (the non-pod addresses of a rule without `to` or with `entity: Cluster`).
    peer: Option<PeerEntry>,
    /// Pod identities with an address in the part.
    identities: Vec<u32>,
    /// Whether a node address is in the part.
    node: bool,
    /// Other addresses in the part.
    addresses: Option<AddressSet>,
}

/// The gate's view of the cluster.
struct Gate<'g> {
    netpol: &'g NetworkPolicies,
    /// Facts of each distinct class of identities.
    class_facts: Vec<PodFacts>,
    /// A pod of each class, for messages.
    class_names: Vec<String>,
    /// Class of each identity.
    class_of: Vec<u32>,
    /// Identities with a pod address in the address book, ascending.
    addressable: Vec<u32>,
    is_addressable: Vec<bool>,
    /// Pod addresses of the address book with their identity.
    pod_ips: Vec<(IpAddr, u32)>,
    /// Node addresses.
    node_ips: Vec<IpAddr>,
    /// Pod and node addresses: left out of address parts (judged as pods and nodes).
    known: Vec<IpAddr>,
    cluster_networks: Vec<stackroute_snapshot::Cidr>,
    /// Identities each pod peer selects (see [`NetworkPolicies::pod_peers`]).
    peer_sets: Vec<Vec<u32>>,
    /// (source class, ports) → whether flows to node addresses are allowed.
    node_cache: HashMap<(u32, u32), Result<(), Verdict>>,
    port_sets: HashMap<Vec<PortEntry>, u32>,
    /// Scratch for port coverage checks.
    scratch: Vec<PortEntry>,
}

/// Ports granted: every port, or these entries (unsorted, perhaps repeated).
#[derive(Clone, Debug, Default)]
struct Grant {
    all: bool,
    ports: Vec<PortEntry>,
}

impl Grant {
    fn add(&mut self, ports: Option<&[PortEntry]>) {
        match ports {
            None => {
                self.all = true;
                self.ports = Vec::new();
            }
            Some(ports) if !self.all => self.ports.extend_from_slice(ports),
            Some(_) => {}
        }
    }
}

/// Whether `grants` together hold every port of `wanted` (`scratch` is reused).
fn covers<'a>(
    grants: impl IntoIterator<Item = &'a Grant>,
    wanted: &[PortEntry],
    scratch: &mut Vec<PortEntry>,
) -> bool {
    scratch.clear();
    for grant in grants {
        if grant.all {
            return true;
        }
        scratch.extend_from_slice(&grant.ports);
    }
    scratch.sort_unstable_by_key(|p| (p.protocol as u8, p.first));
    wanted.iter().all(|want| {
        let mut next = u32::from(want.first);
        for port in scratch.iter().filter(|p| p.protocol == want.protocol) {
            if u32::from(port.first) > next {
                break;
            }
            next = next.max(u32::from(port.last) + 1);
            if next > u32::from(want.last) {
                return true;
            }
        }
        next > u32::from(want.last)
    })
}

/// What NetworkPolicy grants one class of sources toward pods: built once per source class
/// and policy, so that judging a destination costs a few lookups rather than an evaluation.
/// It must agree with [`NetworkPolicies::evaluate`] on pods (the gate's property test checks the
/// outcome against the evaluator).
struct SourceView {
    /// The source's namespace holds an unreadable policy: nothing is allowed.
    undecidable: bool,
    /// Egress, when isolated: what rules without peers grant every destination, and what pod
    /// peers grant each destination class.
    egress: Option<(Grant, HashMap<u32, Grant>)>,
    /// Ingress: what each policy's ingress rules grant this source.
    ingress: Vec<Grant>,
    /// (ports) → per destination class: 0 unknown, 1 allowed, 2 not.
    memo: HashMap<u32, Vec<u8>>,
}

impl<'g> Gate<'g> {
    fn new(
        state: &ClusterState,
        settings: &Settings,
        index: &mut Index<'_>,
        pod_identity: &[u32],
        netpol: &'g NetworkPolicies,
    ) -> Self {
        let identities = index.identity_labels.len();
        let mut facts = vec![PodFacts::default(); identities];
        for (p, policy) in netpol.policies().iter().enumerate() {
            let Some(&namespace) = index.namespace_ids.get(&policy.namespace) else {
                continue; // a namespace without pods
            };
            for id in index.selected(Scope::Namespace(namespace), &policy.pod_selector) {
                if policy.ingress.is_some() {
                    facts[id as usize].ingress.push(p as u32);
                }
                if policy.egress.is_some() {
                    facts[id as usize].egress.push(p as u32);
                }
            }
        }
        let mut peer_sets = Vec::with_capacity(netpol.pod_peers().len());
        for (peer_index, peer) in netpol.pod_peers().iter().enumerate() {
            let scope = match &peer.namespaces {
                Some(selector) => Some(Scope::Namespaces(index.namespace_set(selector))),
                None => index
                    .namespace_ids
                    .get(&peer.namespace)
                    .map(|&namespace| Scope::Namespace(namespace)),
            };
            let set = scope.map_or_else(Vec::new, |scope| index.selected(scope, &peer.pods));
            for &id in &set {
                facts[id as usize].peers.push(peer_index as u32);
            }
            peer_sets.push(set);
        }
        for (u, unreadable) in netpol.unreadable().iter().enumerate() {
            if let Some(&namespace) = index.namespace_ids.get(&unreadable.namespace) {
                for &id in &index.by_namespace[namespace as usize] {
                    facts[id as usize].unreadable.get_or_insert(u as u32);
                }
            }
        }
        let mut names = vec![String::new(); identities];
        let mut is_addressable = vec![false; identities];
        let mut pod_ips = Vec::new();
        for (pod, &id) in state.pods.iter().zip(pod_identity) {
            let id = id as usize;
            if names[id].is_empty() {
                names[id] = format!("{}/{}", pod.namespace, pod.name);
            }
            // A hostNetwork pod is its node's address to everyone else: conservatively, its
            // whole identity is (only rules without peers match it).
            facts[id].host_network |= pod.host_network;
            if pod.node.is_some() && !pod.host_network && !pod.ips.is_empty() {
                is_addressable[id] = true;
                pod_ips.extend(pod.ips.iter().map(|ip| (ip.to_canonical(), id as u32)));
            }
        }
        let mut class_ids: HashMap<PodFacts, u32> = HashMap::new();
        let mut class_facts = Vec::new();
        let mut class_names = Vec::new();
        let mut class_of = Vec::with_capacity(identities);
        for (id, facts) in facts.into_iter().enumerate() {
            let next = class_facts.len() as u32;
            let class = *class_ids.entry(facts.clone()).or_insert(next);
            if class == next {
                class_facts.push(facts);
                class_names.push(std::mem::take(&mut names[id]));
            }
            class_of.push(class);
        }
        let node_ips: Vec<IpAddr> = state
            .nodes
            .iter()
            .flat_map(|n| n.addresses.iter().map(|ip| ip.to_canonical()))
            .collect();
        let mut known: Vec<IpAddr> = pod_ips.iter().map(|(ip, _)| *ip).collect();
        known.extend(&node_ips);
        Self {
            netpol,
            class_facts,
            class_names,
            class_of,
            addressable: (0..identities as u32)
                .filter(|id| is_addressable[*id as usize])
                .collect(),
            is_addressable,
            pod_ips,
            node_ips,
            known,
            cluster_networks: settings.cluster_networks.clone(),
            peer_sets,
            node_cache: HashMap::new(),
            port_sets: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    /// The destinations `rule` covers, whatever its location.
    fn targets(&mut self, rule: &RuleEntry, index: &Index<'_>) -> Targets {
        let everything_else = |gate: &Self, without: &[stackroute_snapshot::Cidr]| Part {
            peer: None,
            identities: Vec::new(),
            node: !gate.node_ips.is_empty(),
            addresses: Some(AddressSet::everything(without, &gate.known)),
        };
        let mut split = Vec::new();
        let mut parts = Vec::new();
        match &rule.peers {
            None => {
                split.extend(&self.addressable);
                parts.push(everything_else(self, &[]));
            }
            Some(peers) => {
                for peer in peers {
                    match peer {
                        PeerEntry::Pods(set) => split.extend(
                            index.sets[*set as usize]
                                .iter()
                                .filter(|id| self.is_addressable[**id as usize]),
                        ),
                        PeerEntry::Networks(cidrs) => {
                            let mut identities: Vec<u32> = self
                                .pod_ips
                                .iter()
                                .filter(|(ip, _)| cidrs.iter().any(|c| c.contains(*ip)))
                                .map(|(_, id)| *id)
                                .collect();
                            identities.sort_unstable();
                            identities.dedup();
                            parts.push(Part {
                                peer: Some(peer.clone()),
                                identities,
                                node: self
                                    .node_ips
                                    .iter()
                                    .any(|ip| cidrs.iter().any(|c| c.contains(*ip))),
                                addresses: Some(AddressSet::networks(cidrs, &[], &self.known)),
                            });
                        }
                        PeerEntry::Entity(Entity::Cluster) => {
                            split.extend(&self.addressable);
                            parts.push(Part {
                                addresses: Some(AddressSet::networks(
                                    &self.cluster_networks,
                                    &[],
                                    &self.known,
                                )),
                                ..everything_else(self, &[])
                            });
                        }
                        PeerEntry::Entity(Entity::World) => parts.push(Part {
                            peer: Some(peer.clone()),
                            node: false,
                            ..everything_else(self, &self.cluster_networks)
                        }),
                    }
                }
            }
        }
        split.sort_unstable();
        split.dedup();
        let ports = rule.ports.clone().unwrap_or_else(|| ALL_PORTS.to_vec());
        let next = self.port_sets.len() as u32;
        let ports_id = *self.port_sets.entry(ports.clone()).or_insert(next);
        Targets {
            split,
            parts,
            ports,
            ports_id,
        }
    }

    /// What NetworkPolicy grants sources of `class` toward pods.
    fn view(&self, class: u32) -> SourceView {
        let facts = &self.class_facts[class as usize];
        let egress = facts.isolated_for_egress().then(|| {
            let mut everyone = Grant::default();
            let mut by_class: HashMap<u32, Grant> = HashMap::new();
            let mut classes = Vec::new();
            for &policy in &facts.egress {
                for (peers, ports) in self.netpol.rules(policy, false) {
                    let Some(peers) = peers else {
                        everyone.add(ports);
                        continue;
                    };
                    // Each destination class once per rule.
                    classes.clear();
                    for id in peers.iter().filter_map(|p| p.pod()) {
                        classes.extend(
                            self.peer_sets[id as usize]
                                .iter()
                                .map(|identity| self.class_of[*identity as usize]),
                        );
                    }
                    classes.sort_unstable();
                    classes.dedup();
                    for &destination in &classes {
                        // A hostNetwork pod is its node's address: no pod peer matches it.
                        if !self.class_facts[destination as usize].host_network {
                            by_class.entry(destination).or_default().add(ports);
                        }
                    }
                }
            }
            (everyone, by_class)
        });
        let ingress = (0..self.netpol.policies().len() as u32)
            .map(|policy| {
                let mut grant = Grant::default();
                for (peers, ports) in self.netpol.rules(policy, true) {
                    let matches = match peers {
                        None => true,
                        Some(peers) => {
                            !facts.host_network
                                && peers
                                    .iter()
                                    .filter_map(|p| p.pod())
                                    .any(|id| facts.peers.binary_search(&id).is_ok())
                        }
                    };
                    if matches {
                        grant.add(ports);
                    }
                }
                grant
            })
            .collect();
        SourceView {
            undecidable: facts.unreadable.is_some(),
            egress,
            ingress,
            memo: HashMap::new(),
        }
    }

    /// Whether every flow from the view's sources to a pod of `identity` on the rule's ports is
    /// allowed.
    fn pod_allowed(&mut self, view: &mut SourceView, identity: u32, targets: &Targets) -> bool {
        let mut memo = view
            .memo
            .remove(&targets.ports_id)
            .unwrap_or_else(|| vec![0; self.class_facts.len()]);
        let allowed = self.pod_allowed_in(view, &mut memo, identity, targets);
        view.memo.insert(targets.ports_id, memo);
        allowed
    }

    /// [`Gate::pod_allowed`] with the view's memo for the rule's ports taken out.
    fn pod_allowed_in(
        &mut self,
        view: &SourceView,
        memo: &mut [u8],
        identity: u32,
        targets: &Targets,
    ) -> bool {
        let destination = self.class_of[identity as usize];
        match memo[destination as usize] {
            1 => return true,
            2 => return false,
            _ => {}
        }
        let facts = &self.class_facts[destination as usize];
        let egress = match &view.egress {
            None => true,
            Some((everyone, by_class)) => covers(
                std::iter::once(everyone).chain(by_class.get(&destination)),
                &targets.ports,
                &mut self.scratch,
            ),
        };
        let allowed = !view.undecidable
            && egress
            && facts.unreadable.is_none()
            && (facts.ingress.is_empty()
                || covers(
                    facts.ingress.iter().map(|q| &view.ingress[*q as usize]),
                    &targets.ports,
                    &mut self.scratch,
                ));
        memo[destination as usize] = if allowed { 1 } else { 2 };
        allowed
    }

    /// The evaluator's verdict (with its reason) for a pod destination.
    fn pod_verdict(&self, class: u32, identity: u32, targets: &Targets) -> Verdict {
        let destination = self.class_of[identity as usize];
        self.netpol.evaluate(
            &self.source(class),
            &Endpoint::Pod {
                name: &self.class_names[destination as usize],
                facts: &self.class_facts[destination as usize],
            },
            &targets.ports,
        )
    }

    fn source(&self, class: u32) -> Endpoint<'_> {
        Endpoint::Pod {
            name: &self.class_names[class as usize],
            facts: &self.class_facts[class as usize],
        }
    }

    /// Whether every flow of a part is allowed.
    fn part(
        &mut self,
        class: u32,
        view: &mut SourceView,
        part: &Part,
        targets: &Targets,
    ) -> Result<(), Verdict> {
        for &identity in &part.identities {
            if !self.pod_allowed(view, identity, targets) {
                return Err(self.pod_verdict(class, identity, targets));
            }
        }
        if part.node {
            let key = (class, targets.ports_id);
            let result = match self.node_cache.get(&key) {
                Some(result) => result.clone(),
                None => {
                    let verdict =
                        self.netpol
                            .evaluate(&self.source(class), &Endpoint::Node, &targets.ports);
                    let result = if verdict.is_allowed() {
                        Ok(())
                    } else {
                        Err(verdict)
                    };
                    self.node_cache.insert(key, result.clone());
                    result
                }
            };
            result?;
        }
        if let Some(addresses) = &part.addresses {
            let verdict = self.netpol.evaluate(
                &self.source(class),
                &Endpoint::Addresses(addresses),
                &targets.ports,
            );
            if !verdict.is_allowed() {
                return Err(verdict);
            }
        }
        Ok(())
    }

    /// What happens to a rule covering `targets` for sources of `class`, and the first flow
    /// that is not allowed (`Allowed` when there is none).
    fn outcome(
        &mut self,
        class: u32,
        view: &mut SourceView,
        targets: &Targets,
    ) -> (Action, Verdict) {
        let mut failure: Option<Verdict> = None;
        let mut allowed = Vec::new();
        let mut memo = view
            .memo
            .remove(&targets.ports_id)
            .unwrap_or_else(|| vec![0; self.class_facts.len()]);
        for &identity in &targets.split {
            if self.pod_allowed_in(view, &mut memo, identity, targets) {
                allowed.push(identity);
            } else if failure.is_none() {
                failure = Some(self.pod_verdict(class, identity, targets));
            }
        }
        view.memo.insert(targets.ports_id, memo);
        let mut kept = Vec::new();
        for (k, part) in targets.parts.iter().enumerate() {
            match self.part(class, view, part, targets) {
                Ok(()) if part.peer.is_some() => kept.push(k),
                Ok(()) => {}
                Err(verdict) => {
                    failure.get_or_insert(verdict);
                }
            }
        }
        match failure {
            None => (Action::Keep, Verdict::Allowed),
            Some(verdict) if allowed.is_empty() && kept.is_empty() => (Action::Strip, verdict),
            Some(verdict) => (Action::Split { allowed, kept }, verdict),
        }
    }
}
