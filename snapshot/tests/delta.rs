//! Deltas rebuild their target byte for byte, refuse a base they were not made for, stay small
//! for small changes, and never panic on malformed input.

use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;
use stackroute_snapshot::delta::{self, DeltaError};
use stackroute_snapshot::*;

/// A cluster small enough to generate, large enough that a change touches a few records of
/// big sections: `pods` pod addresses over 4 nodes, identities `pod % identities`; identity set
/// `i` holds the identities up to `i` of its parity, plus the `joined` (set, identity) pairs.
#[derive(Clone, Debug)]
struct Cluster {
    revision: u64,
    pod_identity: Vec<u32>,
    identities: u32,
    joined: Vec<(u32, u32)>,
    services: Vec<Vec<usize>>,
    policies: Vec<(u16, Vec<(u16, u32)>)>,
    workloads: usize,
}

fn pod_ip(pod: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + pod as u32))
}

impl Cluster {
    fn encode(&self, own_node: u32) -> Vec<u8> {
        self.parts(own_node).assemble()
    }

    fn parts(&self, own_node: u32) -> SnapshotParts {
        let shared = std::sync::Arc::new(self.shared_tables());
        self.parts_with(shared, own_node)
    }

    fn shared_tables(&self) -> SharedTables {
        let identity_sets: Vec<Vec<u32>> = (0..self.identities)
            .map(|i| {
                let mut set: Vec<u32> = (0..=i).filter(|j| j % 2 == i % 2).collect();
                set.extend(
                    self.joined
                        .iter()
                        .filter(|(s, _)| *s == i)
                        .map(|(_, id)| *id),
                );
                set.sort_unstable();
                set.dedup();
                set
            })
            .collect();
        SharedTables::build(&SharedInput {
            zones: vec!["a".into(), "b".into()],
            nodes: (0..4)
                .map(|n| NodeEntry {
                    name: format!("node-{n}"),
                    zone: n % 2,
                })
                .collect(),
            cluster_networks: vec!["10.0.0.0/8".parse().unwrap()],
            addresses: self
                .pod_identity
                .iter()
                .enumerate()
                .map(|(pod, identity)| AddressEntry {
                    ip: pod_ip(pod),
                    kind: AddressKind::Pod,
                    identity: *identity,
                    node: (pod % 4) as u32,
                })
                .collect(),
            services: self
                .services
                .iter()
                .enumerate()
                .map(|(i, backends)| ServiceEntry {
                    ip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, i as u8 + 1)),
                    port: 80,
                    protocol: Protocol::Tcp,
                    backends: backends.iter().map(|pod| (pod_ip(*pod), 8080)).collect(),
                })
                .collect(),
            identity_sets,
        })
    }

    fn parts_with(&self, shared: std::sync::Arc<SharedTables>, own_node: u32) -> SnapshotParts {
        let policies: Vec<PolicyEntry> = self
            .policies
            .iter()
            .enumerate()
            .map(|(i, (priority, rules))| PolicyEntry {
                kind: PolicyKind::StackRoute,
                tier: Tier::Namespace,
                priority: *priority,
                namespace: "ns".into(),
                name: format!("policy-{i}"),
                rules: rules
                    .iter()
                    .enumerate()
                    .map(|(r, (port, set))| RuleEntry {
                        name: format!("rule-{r}"),
                        action: Action::Route,
                        peers: Some(vec![PeerEntry::Pods(set % self.identities.max(1))]),
                        ports: Some(vec![PortEntry {
                            protocol: Protocol::Tcp,
                            first: *port,
                            last: *port,
                        }]),
                        location: LocationMatch::Any,
                        isolation: Isolation::None,
                        transports: vec![TransportChoice {
                            stack: Stack::Kernel,
                            congestion_control: CongestionControl::Bbr,
                        }],
                        gate: RuleGate::default(),
                    })
                    .collect(),
            })
            .collect();
        let node = NodeInput {
            revision: self.revision,
            own_node,
            default_transport: None,
            policies: policies.iter().collect(),
            chains: vec![(0..policies.len() as u32).collect()],
            // Every chain indexed, so the index sections are in every snapshot tested here.
            chain_index_min_rules: Some(1),
            workloads: (0..self.workloads)
                .map(|w| WorkloadEntry {
                    namespace: "ns".into(),
                    name: format!("pod-{w}"),
                    ips: vec![pod_ip(w * 4 + own_node as usize)],
                    chain: 0,
                })
                .collect(),
        };
        let tables = encode_node_tables(&shared, &node);
        SnapshotParts::new(shared, tables)
    }
}

fn cluster() -> impl Strategy<Value = Cluster> {
    (1u32..6, 1usize..200, 0usize..4, 0usize..4, 0usize..5).prop_flat_map(
        |(identities, pods, services, policies, workloads)| {
            (
                prop::collection::vec(0..identities, pods),
                prop::collection::vec(prop::collection::vec(0..pods, 0..6), services),
                prop::collection::vec(
                    (
                        any::<u16>(),
                        prop::collection::vec((1u16..100, 0u32..8), 0..4),
                    ),
                    policies,
                ),
            )
                .prop_map(move |(pod_identity, services, policies)| Cluster {
                    revision: 1,
                    pod_identity,
                    identities,
                    joined: Vec::new(),
                    services,
                    policies,
                    workloads,
                })
        },
    )
}

/// One change a cluster makes between revisions.
#[derive(Clone, Debug)]
enum Change {
    Relabel(prop::sample::Index, u32),
    AddPod(u32),
    RemovePod(prop::sample::Index),
    Backends(prop::sample::Index, Vec<usize>),
    NewIdentity,
    /// An identity that had no set joins a few (a pod relabelled to labels nobody had).
    JoinSets(u32, Vec<prop::sample::Index>),
    Policy(u16, Vec<(u16, u32)>),
    DropPolicy,
    Workloads(usize),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u32..8).prop_map(|(i, id)| Change::Relabel(i, id)),
        (0u32..8).prop_map(Change::AddPod),
        any::<prop::sample::Index>().prop_map(Change::RemovePod),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(0usize..300, 0..6)
        )
            .prop_map(|(i, b)| Change::Backends(i, b)),
        Just(Change::NewIdentity),
        (
            100u32..1_000_000,
            prop::collection::vec(any::<prop::sample::Index>(), 1..4)
        )
            .prop_map(|(id, sets)| Change::JoinSets(id, sets)),
        (
            any::<u16>(),
            prop::collection::vec((1u16..100, 0u32..8), 0..4)
        )
            .prop_map(|(p, r)| Change::Policy(p, r)),
        Just(Change::DropPolicy),
        (0usize..6).prop_map(Change::Workloads),
    ]
}

impl Cluster {
    fn changed(&self, change: &Change) -> Self {
        let mut next = self.clone();
        next.revision += 1;
        let pods = next.pod_identity.len();
        match change {
            Change::Relabel(pod, id) if pods > 0 => {
                next.pod_identity[pod.index(pods)] = id % next.identities;
            }
            Change::AddPod(id) => next.pod_identity.push(id % next.identities),
            Change::RemovePod(pod) if pods > 1 => {
                next.pod_identity.remove(pod.index(pods));
                for backends in &mut next.services {
                    backends.retain(|b| *b < pods - 1);
                }
            }
            Change::Backends(service, backends) if !next.services.is_empty() => {
                let at = service.index(next.services.len());
                next.services[at] = backends.iter().map(|b| b % pods.max(1)).collect();
            }
            Change::NewIdentity => next.identities += 1,
            Change::JoinSets(identity, sets) => next.joined.extend(
                sets.iter()
                    .map(|set| (set.index(next.identities as usize) as u32, *identity)),
            ),
            Change::Policy(priority, rules) => next.policies.push((*priority, rules.clone())),
            Change::DropPolicy => {
                next.policies.pop();
            }
            Change::Workloads(n) => next.workloads = *n,
            _ => {}
        }
        next
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Applying the delta of each revision to the previous one, through any sequence of
    /// changes, yields exactly the snapshot a full encode gives.
    #[test]
    fn applying_deltas_of_any_changes_yields_the_full_snapshot(
        start in cluster(),
        changes in prop::collection::vec(change(), 1..12),
        node in 0u32..4,
    ) {
        let mut cluster = start;
        let mut previous = cluster.clone();
        let mut held = cluster.encode(node);
        for change in &changes {
            cluster = cluster.changed(change);
            let full = cluster.encode(node);
            let patch = delta::diff(&held, &full).unwrap();
            prop_assert_eq!(delta::base_of(&patch).unwrap().0, cluster.revision - 1);
            let rebuilt = delta::apply(&held, &patch).unwrap();
            prop_assert!(rebuilt == full, "{change:?}: rebuilt snapshot differs");
            // The controller's path: the same bytes from the parts, with the shared sections'
            // operations computed once (and without, and with shared tables that stayed).
            let (before, after) = (previous.parts(node), cluster.parts(node));
            prop_assert_eq!(before.assemble(), held.clone());
            let shared = delta::SharedDelta::new(before.shared(), after.shared());
            prop_assert!(delta::diff_parts(&before, &after, Some(&shared)) == patch);
            prop_assert!(delta::diff_parts(&before, &after, None) == patch);
            let kept = cluster.parts_with(before.shared().clone(), node);
            let same_shared = delta::diff_parts(&before, &kept, Some(&shared));
            prop_assert!(same_shared == delta::diff(&held, &kept.assemble()).unwrap());
            previous = cluster.clone();
            prop_assert!(Snapshot::parse(&rebuilt).is_ok());
            held = rebuilt;
        }
    }

    /// Any corruption of a delta is an error (or, where it only touches inserted bytes, a
    /// checksum mismatch) — never a panic, never a wrong snapshot.
    #[test]
    fn corrupt_deltas_are_refused(
        start in cluster(),
        change in change(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let base = start.encode(0);
        let target = start.changed(&change).encode(0);
        let patch = delta::diff(&base, &target).unwrap();
        let mut corrupt = patch.clone();
        for (at, value) in edits {
            let at = at.index(corrupt.len());
            corrupt[at] ^= value | 1;
        }
        if let Ok(rebuilt) = delta::apply(&base, &corrupt) {
            prop_assert!(rebuilt == target, "a corrupt delta built another snapshot");
        }
        let truncated = &patch[..cut.index(patch.len())];
        prop_assert!(delta::apply(&base, truncated).is_err());
    }
}

fn big_cluster() -> Cluster {
    Cluster {
        revision: 7,
        pod_identity: (0..20_000).map(|pod| pod % 5).collect(),
        identities: 5,
        joined: Vec::new(),
        services: (0..20).map(|s| (s * 100..s * 100 + 50).collect()).collect(),
        policies: (0..40)
            .map(|p| (p, (0..10).map(|r| (r + 1, u32::from(r % 5))).collect()))
            .collect(),
        workloads: 30,
    }
}

#[test]
fn one_relabelled_pod_costs_a_few_records_not_the_table() {
    let before = big_cluster();
    let mut after = before.clone();
    after.revision += 1;
    after.pod_identity[1234] = 3; // was 4: an identity that exists
    let (base, target) = (before.encode(0), after.encode(0));
    let patch = delta::diff(&base, &target).unwrap();
    let rebuilt = delta::apply(&base, &patch).unwrap();
    assert_eq!(rebuilt, target);
    // Header and directory (~420 bytes), the pod's address slot, its backend records (moved
    // within one Service's run), the operation bytes of the unchanged sections.
    assert!(
        patch.len() < 2_000,
        "delta of {} bytes for one relabelled pod in a {}-byte snapshot",
        patch.len(),
        target.len()
    );
    assert!(target.len() > 300_000, "{}", target.len());
    println!(
        "one relabelled pod: delta {} bytes, snapshot {} bytes",
        patch.len(),
        target.len()
    );
}

/// A new identity joins a few of many identity sets: every set after the first it joined
/// moves, and so does every rule peer pointing at one of them. The delta carries the inserted
/// identities and one shift per run of moved peers, not the rest of either section.
#[test]
fn a_new_identity_joining_sets_costs_its_insertions_not_the_sets_behind_them() {
    let before = Cluster {
        revision: 3,
        pod_identity: (0..4_000).map(|pod| pod % 400).collect(),
        identities: 400,
        joined: Vec::new(),
        services: Vec::new(),
        policies: (0..100)
            .map(|p| {
                (
                    p,
                    (0..10).map(|r| (r + 1, u32::from(p * 4 + r % 4))).collect(),
                )
            })
            .collect(),
        workloads: 10,
    };
    let mut after = before.clone();
    after.revision += 1;
    after.joined = [7, 90, 211, 350].map(|set| (set, 1_000_000)).to_vec();
    let (base, target) = (before.encode(0), after.encode(0));
    let patch = delta::diff(&base, &target).unwrap();
    assert_eq!(delta::apply(&base, &patch).unwrap(), target);
    // Header and directory (~420 bytes), four 4-byte insertions with their edit headers, a
    // shift run per stretch of peers behind each grown set, the bloom filters of the rules
    // whose sets grew.
    assert!(
        patch.len() < 1_500,
        "delta of {} bytes for one identity joining 4 of 400 sets ({}-byte snapshot)",
        patch.len(),
        target.len()
    );
    println!(
        "one identity joins 4 of 400 sets: delta {} bytes, snapshot {} bytes",
        patch.len(),
        target.len()
    );
}

/// Any byte range of a snapshot read from its parts is that range of the assembled snapshot.
#[test]
fn ranges_read_from_the_parts_are_the_assembled_bytes() {
    let parts = big_cluster().parts(1);
    let whole = parts.assemble();
    for chunk in [997, 4096, 65_536, whole.len()] {
        let mut rebuilt = Vec::new();
        for start in (0..whole.len()).step_by(chunk) {
            rebuilt.extend(parts.read(start..start + chunk));
        }
        assert!(rebuilt == whole, "chunks of {chunk} bytes");
    }
    assert!(parts.read(whole.len()..whole.len() + 10).is_empty());
}

/// Nodes with the same policies encode the same rule sections: interned, they are one
/// allocation, and every snapshot still assembles to the same bytes.
#[test]
fn equal_sections_of_many_nodes_are_kept_once() {
    let cluster = big_cluster();
    let shared = std::sync::Arc::new(cluster.shared_tables());
    let mut interner = SectionInterner::default();
    let mut own = 0;
    for node in 0..4 {
        let mut parts = cluster.parts_with(shared.clone(), node);
        let bytes = parts.assemble();
        parts.share_sections(&mut interner);
        assert_eq!(parts.assemble(), bytes);
        own += parts.own_len();
    }
    // The workloads differ per node; the 400 rules are the same on all four.
    assert!(
        interner.distinct_bytes() * 3 < own,
        "{} distinct bytes of {own}",
        interner.distinct_bytes()
    );
}

#[test]
fn a_delta_refuses_another_base() {
    let first = big_cluster();
    let second = first.changed(&Change::NewIdentity);
    let third = second.changed(&Change::AddPod(2));
    let (a, b, c) = (first.encode(1), second.encode(1), third.encode(1));
    let patch = delta::diff(&b, &c).unwrap();
    match delta::apply(&a, &patch) {
        Err(DeltaError::WrongBase { expected, found }) => {
            assert_eq!((expected.0, found.0), (8, 7));
        }
        other => panic!("applied to the wrong base: {other:?}"),
    }
    // Same revision, other bytes (another node's snapshot): the checksum tells them apart.
    let other_node = second.encode(2);
    assert!(matches!(
        delta::apply(&other_node, &patch),
        Err(DeltaError::WrongBase { .. })
    ));
    assert_eq!(delta::apply(&b, &patch).unwrap(), c);
}
