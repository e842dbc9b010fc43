//! A compile: the merged state compiled and every watched node's snapshot encoded, with its
//! delta from the node's previous one (CPU-bound, on a blocking thread), and the policy records
//! the index reports status from.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stackroute_api::RouteRule;
use stackroute_policy::compile::{EncodedPolicies, NodePolicies};
use stackroute_policy::selector::Labels;
use stackroute_policy::{ClusterState, Compiled, Settings, SubjectSelector, map_on_all_cores};
use stackroute_proto::v1alpha1::Listener;
use stackroute_snapshot::delta::{self, SectionOps, SharedDelta};
use stackroute_snapshot::{SectionInterner, SnapshotParts};

use super::{NodeUpdate, PolicyRecord, SnapshotDelta, object_name};

/// What a compile needs, cut from the index (runs on a blocking thread).
#[derive(Debug)]
pub struct CompileInput {
    /// The merged state.
    pub state: ClusterState,
    /// Nodes to encode snapshots for (those with watchers).
    pub nodes: Vec<String>,
    /// The listener registry.
    pub listeners: Vec<Listener>,
    /// Settings.
    pub settings: Settings,
    /// Each watched node's last published update: the base of its next delta.
    pub previous: BTreeMap<String, Arc<NodeUpdate>>,
    /// How many input changes the index had handled when it cut this input.
    pub changes: u64,
}

/// What a compile produced.
#[derive(Debug)]
pub struct CompileOutput {
    /// Its revision.
    pub revision: u64,
    /// Snapshot per node, with its delta from the node's previous one where smaller.
    pub snapshots: Vec<(String, SnapshotParts, Option<SnapshotDelta>)>,
    /// Listeners sent with the updates of `listener_nodes`.
    pub listeners: Arc<Vec<Listener>>,
    /// The nodes whose policies can pick RDMA: they need the listener registrations (an RDMA
    /// client finds the server's endpoint there); the others get none.
    pub listener_nodes: HashSet<String>,
    /// Every policy in the state.
    pub policies: Vec<PolicyRecord>,
    /// Every node of the compiled state.
    pub nodes: BTreeSet<String>,
    /// How long the compile took.
    pub duration: Duration,
    /// [`CompileInput::changes`]: the input changes this revision reflects.
    pub changes: u64,
}

/// Nodes encoded at once: enough to keep every core busy, few enough that their tables are
/// interned before the next batch is encoded (each node's are ~1 MB before interning).
const ENCODE_BATCH: usize = 64;

/// Compiles the state and encodes the watched nodes' snapshots (CPU-bound: call it on a
/// blocking thread).
pub fn compile(input: CompileInput, revision: u64) -> CompileOutput {
    let started = Instant::now();
    let CompileInput {
        state,
        nodes,
        listeners,
        settings,
        previous,
        changes,
    } = input;
    let compiled = Compiled::new(&state, settings);
    let problems: BTreeMap<String, String> = compiled
        .problems
        .iter()
        .map(|p| (p.object.clone(), p.to_string()))
        .collect();
    // The shared sections' operations are computed once per base revision's shared tables
    // (every node published at the last revision has the same), not once per node.
    let mut shared_deltas: Vec<SharedDelta> = Vec::new();
    // Nodes with the same policies encode the same rule sections, and most sections of a
    // revision equal the previous one's: each distinct section is kept once.
    let mut interner = SectionInterner::default();
    for before in previous.values() {
        interner.remember(&before.snapshot);
    }
    // Nodes whose workloads use the same policies have the same policy sections (at scale most
    // nodes run pods of most apps): each distinct policy list is encoded and interned once.
    let mut policy_tables: HashMap<NodePolicies, EncodedPolicies> = HashMap::new();
    // And when a revision changes those sections, each such node's delta needs the same
    // operation on them: diffed once.
    let section_ops = SectionOps::default();
    let mut snapshots = Vec::with_capacity(nodes.len());
    let mut may_use_rdma: HashMap<NodePolicies, bool> = HashMap::new();
    let mut listener_nodes = HashSet::new();
    for batch in nodes.chunks(ENCODE_BATCH) {
        let lists = map_on_all_cores(batch, |node| Some((node, compiled.node_policies(node)?)));
        for (node, list) in &lists {
            let rdma = *may_use_rdma
                .entry(list.clone())
                .or_insert_with(|| compiled.policies_may_use_rdma(list));
            if rdma {
                listener_nodes.insert((*node).clone());
            }
        }
        let mut distinct = HashSet::new();
        let fresh: Vec<&NodePolicies> = lists
            .iter()
            .map(|(_, list)| list)
            .filter(|list| !policy_tables.contains_key(*list) && distinct.insert(*list))
            .collect();
        let fresh = map_on_all_cores(&fresh, |list| {
            Some(compiled.encode_policies((*list).clone()))
        });
        for mut encoded in fresh {
            interner.intern_policy_tables(encoded.tables_mut());
            policy_tables.insert(encoded.policies().clone(), encoded);
        }
        // Encoding and diffing are per node, on every core; interning is shared, in order.
        let policy_tables = &policy_tables;
        let encoded = map_on_all_cores(&lists, |(node, list)| {
            let parts = compiled.node_parts_with(node, revision, &policy_tables[list])?;
            Some((*node, parts))
        });
        let interned: Vec<_> = encoded
            .into_iter()
            .map(|(node, mut snapshot)| {
                snapshot.share_sections(&mut interner);
                let base = previous.get(node).map(|before| {
                    let known = shared_deltas
                        .iter()
                        .position(|known| known.joins(&before.snapshot, &snapshot));
                    let shared = known.unwrap_or_else(|| {
                        shared_deltas.push(SharedDelta::new(
                            before.snapshot.shared(),
                            snapshot.shared(),
                        ));
                        shared_deltas.len() - 1
                    });
                    (before, shared)
                });
                (node, snapshot, base)
            })
            .collect();
        let shared_deltas = &shared_deltas;
        let deltas = map_on_all_cores(&interned, |(_, snapshot, base)| {
            Some(base.and_then(|(before, shared)| {
                let delta = delta::diff_parts_with(
                    &before.snapshot,
                    snapshot,
                    Some(&shared_deltas[shared]),
                    Some(&section_ops),
                );
                (delta.len() < snapshot.len()).then_some((before.revision, delta))
            }))
        });
        snapshots.extend(
            interned
                .into_iter()
                .zip(deltas)
                .map(|((node, snapshot, _), delta)| (node.clone(), snapshot, delta)),
        );
    }
    let mut policies = policy_records(&state, &problems);
    let mut gated: BTreeMap<String, (u32, String)> = BTreeMap::new();
    for rule in compiled.network_policy_gated() {
        let (count, message) = gated.entry(rule.object()).or_default();
        *count += 1;
        if message.is_empty() {
            let stacks: Vec<String> = rule.removed.iter().map(|s| format!("{s:?}")).collect();
            *message = format!(
                "rule {}: {} removed{} for {} source identit{} (network-policy): {}",
                rule.rule,
                stacks.join(", "),
                if rule.partial {
                    " toward some destinations"
                } else {
                    ""
                },
                rule.sources,
                if rule.sources == 1 { "y" } else { "ies" },
                rule.reason
            );
        }
    }
    for policy in &mut policies {
        if let Some((count, message)) = gated.remove(&policy.object()) {
            policy.gated_rules = count;
            policy.gated_message = message;
        }
    }
    let all_nodes = compiled.node_names().iter().cloned().collect();
    CompileOutput {
        revision,
        snapshots,
        listeners: Arc::new(listeners),
        listener_nodes,
        policies,
        nodes: all_nodes,
        duration: started.elapsed(),
        changes,
    }
}

/// A policy's version: FNV-1a (64 bit) of its object name (`Kind/namespace/name`), a zero byte
/// and its spec's JSON. Equal specs of the same object, equal versions — in every process and
/// build (unlike `DefaultHasher`), since replicas compare them in shared acks. Not
/// cryptographic: a collision could at worst show a policy programmed early.
pub fn policy_version<T: serde::Serialize>(object: &str, spec: &T) -> u64 {
    let json = serde_json::to_vec(spec).unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in object.bytes().chain([0]).chain(json) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// Every policy of the state with the nodes hosting its source pods.
fn policy_records(state: &ClusterState, problems: &BTreeMap<String, String>) -> Vec<PolicyRecord> {
    // Pods with equal namespace and labels are selected alike: evaluate selectors once per
    // such identity, not once per pod.
    let mut identity_ids: HashMap<(&str, &Labels), usize> = HashMap::new();
    let mut identities: Vec<((&str, &Labels), Vec<&str>)> = Vec::new();
    // Each identity's namespace's labels, looked up once per namespace (a namespace not listed
    // still has its name label, as `ClusterState::namespace_labels`).
    let mut namespace_labels: HashMap<&str, Cow<'_, Labels>> = HashMap::new();
    for pod in &state.pods {
        let key = (pod.namespace.as_str(), &pod.labels);
        let id = *identity_ids.entry(key).or_insert_with(|| {
            namespace_labels
                .entry(key.0)
                .or_insert_with(|| match state.namespaces.get(key.0) {
                    Some(labels) => Cow::Borrowed(labels),
                    None => Cow::Owned(state.namespace_labels(key.0)),
                });
            identities.push((key, Vec::new()));
            identities.len() - 1
        });
        identities[id].1.extend(pod.node.as_deref());
    }
    for (_, nodes) in &mut identities {
        nodes.sort_unstable();
        nodes.dedup();
    }
    // Policies selecting the same identities (at scale, most of them) share one set of target
    // nodes: thousands of policies times thousands of nodes would be millions of strings.
    // An invalid subject selects nothing: the compile leaves such a policy out too.
    let mut target_sets: HashMap<Vec<usize>, Arc<BTreeSet<String>>> = HashMap::new();
    let mut nodes_of = |subject: Result<SubjectSelector, _>| -> Arc<BTreeSet<String>> {
        let Ok(subject) = subject else {
            return Arc::default();
        };
        let selected: Vec<usize> = identities
            .iter()
            .enumerate()
            .filter(|(_, ((namespace, labels), _))| {
                subject.selects(namespace, || &*namespace_labels[namespace], labels)
            })
            .map(|(id, _)| id)
            .collect();
        target_sets
            .entry(selected)
            .or_insert_with_key(|selected| {
                Arc::new(
                    selected
                        .iter()
                        .flat_map(|id| identities[*id].1.iter().map(|n| n.to_string()))
                        .collect(),
                )
            })
            .clone()
    };
    let mut records = Vec::new();
    for route in &state.stack_routes {
        let namespace = route.metadata.namespace.clone().unwrap_or_default();
        let name = route.metadata.name.clone().unwrap_or_default();
        let targets = nodes_of(SubjectSelector::for_stack_route(route));
        records.push(policy_record(
            ("StackRoute", namespace, name),
            route.metadata.generation,
            (&route.spec, &route.spec.rules),
            targets,
            problems,
        ));
    }
    for route in &state.cluster_stack_routes {
        let name = route.metadata.name.clone().unwrap_or_default();
        let targets = nodes_of(SubjectSelector::for_cluster(route));
        records.push(policy_record(
            ("ClusterStackRoute", String::new(), name),
            route.metadata.generation,
            (&route.spec, &route.spec.rules),
            targets,
            problems,
        ));
    }
    records
}

/// The record of policy object `(kind, namespace, name)` with `spec` and its `rules`.
fn policy_record<T: serde::Serialize>(
    (kind, namespace, name): (&'static str, String, String),
    generation: Option<i64>,
    (spec, rules): (&T, &[RouteRule]),
    targets: Arc<BTreeSet<String>>,
    problems: &BTreeMap<String, String>,
) -> PolicyRecord {
    let object = object_name(kind, &namespace, &name);
    PolicyRecord {
        kind,
        problem: problems.get(&object).cloned(),
        fingerprint: policy_version(&object, spec),
        namespace,
        name,
        generation,
        targets,
        shadowed_rules: stackroute_policy::shadow::shadowed_rules(rules).len() as u32,
        gated_rules: 0,
        gated_message: String::new(),
    }
}

// === the task ===
