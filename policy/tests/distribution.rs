//! Properties of what the controller distributes, over random clusters and policies: the delta
//! of any relabelling, pod arrival or pod departure rebuilds every node's full compile byte for
//! byte, and identity numbers stay put for every pod the change did not touch (so a new label
//! set does not renumber the address book, and a delta stays small).

use std::net::IpAddr;

use proptest::prelude::*;
use stackroute_policy::{ClusterState, Compiled, Settings};
use stackroute_snapshot::{DestinationClass, Snapshot, delta};

mod support;
use support::random_cluster::{PodSpec, cluster_documents, pod_ip, policy_yaml};

fn state_of(documents: &[String]) -> ClusterState {
    let mut state = ClusterState::default();
    for (index, document) in documents.iter().enumerate() {
        let problems = state.load_text(&format!("doc{index}"), document);
        assert!(problems.is_empty(), "{problems:?}\n{document}");
    }
    state
}

/// One change between revisions.
#[derive(Clone, Debug)]
enum Change {
    /// The pod gets labels nobody had.
    NewLabels(prop::sample::Index),
    /// The pod moves to another app's labels.
    Relabel(prop::sample::Index, usize),
    /// A pod goes away.
    Remove(prop::sample::Index),
}

fn identity_of(snapshot: &Snapshot<'_>, ip: IpAddr) -> Option<u32> {
    match snapshot.classify(ip).0 {
        DestinationClass::Pod { identity, .. } => Some(identity),
        _ => None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn deltas_rebuild_the_full_compile_and_identities_stay_put(
        pods in prop::collection::vec((0..3usize, 0..3usize, 0..3usize), 2..14),
        policies in (1..5usize).prop_flat_map(|n| (0..n).map(policy_yaml).collect::<Vec<_>>()),
        change in prop_oneof![
            any::<prop::sample::Index>().prop_map(Change::NewLabels),
            (any::<prop::sample::Index>(), 0..3usize).prop_map(|(i, a)| Change::Relabel(i, a)),
            any::<prop::sample::Index>().prop_map(Change::Remove),
        ],
    ) {
        let pods: Vec<PodSpec> = pods;
        let mut documents = cluster_documents(&pods);
        documents.extend(policies);
        let before = state_of(&documents);
        let mut after = before.clone();
        let touched = match &change {
            Change::NewLabels(i) => {
                let at = i.index(after.pods.len());
                after.pods[at].labels.insert("release".into(), "canary".into());
                at
            }
            Change::Relabel(i, app) => {
                let at = i.index(after.pods.len());
                after.pods[at].labels.insert("app".into(), ["x", "y", "z"][*app].into());
                at
            }
            Change::Remove(i) => {
                let at = i.index(after.pods.len());
                after.pods.remove(at);
                at
            }
        };
        let old = Compiled::new(&before, Settings::default()).all_node_snapshots(1);
        let new = Compiled::new(&after, Settings::default()).all_node_snapshots(2);
        prop_assert_eq!(old.len(), new.len());
        for ((node, old), (same, new)) in old.iter().zip(&new) {
            prop_assert_eq!(node, same);
            let patch = delta::diff(old, new).unwrap();
            prop_assert!(delta::apply(old, &patch).unwrap() == *new, "{node}: {change:?}");
            let (a, b) = (Snapshot::parse(old).unwrap(), Snapshot::parse(new).unwrap());
            for index in (0..pods.len()).filter(|i| *i != touched) {
                let ip: IpAddr = pod_ip(index).parse().unwrap();
                if let Some(identity) = identity_of(&a, ip) {
                    // Another pod with the touched pod's old labels keeps their number too.
                    prop_assert_eq!(Some(identity), identity_of(&b, ip), "{} on {}", ip, node);
                }
            }
        }
    }
}
