//! `index::compile` encodes each distinct policy list once and reuses its sections, and each
//! operation on them once, for every node: checked here against compiling every node from
//! scratch (`Compiled::node_snapshot`, `delta::diff` of whole snapshots), byte for byte, over a
//! sequence of changes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use stackroute_controller::index::{CompileInput, CompileOutput, NodeUpdate, compile};
use stackroute_policy::{ClusterState, Compiled, Settings};
use stackroute_snapshot::Snapshot;
use stackroute_snapshot::delta;

/// Nodes `n0`… with pods of apps `app0`…`app4`; `n5` runs only `app0` (another policy list).
fn cluster(nodes: usize, pods_per_node: usize, extra: &str) -> String {
    let mut text = String::from(
        "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}\n",
    );
    for n in 0..nodes {
        let _ = writeln!(
            text,
            "- {{apiVersion: v1, kind: Node, metadata: {{name: n{n}, labels: {{topology.kubernetes.io/zone: z{}}}}}, status: {{addresses: [{{type: InternalIP, address: 10.0.0.{}}}]}}}}",
            n % 2,
            n + 1
        );
        for p in 0..pods_per_node {
            let app = if n == 5 { 0 } else { p % 5 };
            let _ = writeln!(
                text,
                "- {{apiVersion: v1, kind: Pod, metadata: {{name: app-{n}-{p}, namespace: shop, labels: {{app: app{app}}}}}, spec: {{nodeName: n{n}, containers: []}}, status: {{podIP: 10.1.{n}.{}}}}}",
                p + 1
            );
        }
    }
    text.push_str(extra);
    text
}

/// Sixty StackRoutes of three rules: pods peers of other apps, a networks peer, and a rule for
/// any destination; `port_of_first` changes the first policy. Enough rules that the controller
/// shares the operations on the rule sections between nodes (it diffs small sections anew).
fn policies(port_of_first: u16) -> String {
    let mut text = String::new();
    for p in 0..60 {
        let _ = write!(
            text,
            "---\napiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: r{p}, namespace: shop}}\nspec:\n  priority: {}\n  podSelector: {{matchLabels: {{app: app{}}}}}\n  rules:\n  - name: pods\n    to: [{{pods: {{podSelector: {{matchLabels: {{app: app{}}}}}}}}}]\n    ports: [{{port: {}}}]\n    transport: {{stack: Userspace, congestionControl: BBR}}\n  - name: nets\n    to: [{{networks: ['192.168.{p}.0/24']}}]\n    transport: {{stack: Kernel, congestionControl: Cubic}}\n  - name: any\n    ports: [{{port: {}}}]\n    transport: {{stack: Kernel, congestionControl: BBR}}\n",
            10 + p,
            p % 5,
            (p + 1) % 5,
            if p == 0 { port_of_first } else { 1000 + p },
            2000 + p,
        );
    }
    text
}

/// A policy evaluated before all others, with a selector of its own: every identity set after
/// its own is renumbered.
const FIRST_POLICY: &str = "---\napiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {name: first, namespace: shop}\nspec:\n  priority: 0\n  podSelector: {matchLabels: {tier: front}}\n  rules:\n  - name: front\n    to: [{pods: {podSelector: {matchExpressions: [{key: app, operator: In, values: [app3, app4]}]}}}]\n    transport: {stack: Kernel, congestionControl: Reno}\n";

fn state(cluster: &str, policies: &str) -> ClusterState {
    let mut state = ClusterState::default();
    assert!(state.load_text("cluster.yaml", cluster).is_empty());
    assert!(state.load_text("policies.yaml", policies).is_empty());
    state
}

/// Chains of a few rules get an index too, so index sections (which read the identity sets'
/// members) are part of what must come out equal.
fn settings() -> Settings {
    Settings {
        chain_index_min_rules: 4,
        ..Settings::default()
    }
}

/// Compiles `state` at `revision` with `previous` as the bases, and checks every node's
/// snapshot and delta against compiling from scratch.
fn compile_and_check(
    state: &ClusterState,
    revision: u64,
    previous: &BTreeMap<String, Arc<NodeUpdate>>,
) -> BTreeMap<String, Arc<NodeUpdate>> {
    let scratch = Compiled::new(state, settings());
    let output: CompileOutput = compile(
        CompileInput {
            state: state.clone(),
            nodes: scratch.node_names().to_vec(),
            listeners: Vec::new(),
            settings: settings(),
            previous: previous.clone(),
            changes: 0,
        },
        revision,
    );
    assert_eq!(output.snapshots.len(), scratch.node_names().len());
    let mut published = BTreeMap::new();
    for (node, parts, got_delta) in output.snapshots {
        let expected = scratch.node_snapshot(&node, revision).expect("known node");
        assert!(
            parts.assemble() == expected,
            "revision {revision}: {node}'s snapshot differs from one compiled from scratch"
        );
        Snapshot::parse(&expected).expect("a valid snapshot");
        match previous.get(&node) {
            Some(before) => {
                let base = before.snapshot.assemble();
                let full = delta::diff(&base, &expected).expect("diffable");
                let want = (full.len() < expected.len()).then_some((before.revision, full));
                assert!(
                    got_delta == want,
                    "revision {revision}: {node}'s delta differs from diffing whole snapshots"
                );
                if let Some((_, bytes)) = &got_delta {
                    assert!(delta::apply(&base, bytes).expect("applies") == expected);
                }
            }
            None => assert!(got_delta.is_none()),
        }
        published.insert(
            node.clone(),
            Arc::new(NodeUpdate {
                revision,
                node,
                snapshot: parts,
                listeners: output.listeners.clone(),
                listener_changes: None,
                delta: got_delta,
            }),
        );
    }
    published
}

#[test]
fn shared_policy_sections_and_operations_give_the_bytes_of_a_compile_from_scratch() {
    let relabelled = "- {apiVersion: v1, kind: Pod, metadata: {name: moved, namespace: shop, labels: {app: app1, tier: front}}, spec: {nodeName: n2, containers: []}, status: {podIP: 10.1.2.200}}\n";
    let added = "- {apiVersion: v1, kind: Pod, metadata: {name: extra, namespace: shop, labels: {app: app2}}, spec: {nodeName: n3, containers: []}, status: {podIP: 10.1.3.201}}\n";
    let steps: Vec<(&str, ClusterState)> = vec![
        ("first", state(&cluster(6, 10, ""), &policies(1000))),
        // A pod relabelled to a new identity: identity sets (and blooms) change on every node.
        (
            "relabel",
            state(&cluster(6, 10, relabelled), &policies(1000)),
        ),
        (
            "add a pod",
            state(
                &cluster(6, 10, &format!("{relabelled}{added}")),
                &policies(1000),
            ),
        ),
        (
            "change a policy",
            state(
                &cluster(6, 10, &format!("{relabelled}{added}")),
                &policies(1234),
            ),
        ),
        (
            "add a node",
            state(
                &cluster(7, 10, &format!("{relabelled}{added}")),
                &policies(1234),
            ),
        ),
        (
            "renumber identity sets",
            state(
                &cluster(7, 10, &format!("{relabelled}{added}")),
                &format!("{FIRST_POLICY}{}", policies(1234)),
            ),
        ),
        (
            "no change",
            state(
                &cluster(7, 10, &format!("{relabelled}{added}")),
                &format!("{FIRST_POLICY}{}", policies(1234)),
            ),
        ),
        // Back to the start: sections seen two revisions ago, nodes gone.
        ("back", state(&cluster(6, 10, ""), &policies(1000))),
    ];
    let mut previous = BTreeMap::new();
    for (revision, (step, state)) in steps.iter().enumerate() {
        eprintln!("step {revision}: {step}");
        previous = compile_and_check(state, revision as u64 + 1, &previous);
    }
}

#[test]
fn nodes_with_the_same_policies_share_one_allocation_of_each_policy_section() {
    let state = state(&cluster(6, 10, ""), &policies(1000));
    let first = compile_and_check(&state, 1, &BTreeMap::new());
    let second = compile_and_check(&state, 2, &first);
    let rules = |update: &NodeUpdate| {
        update
            .snapshot
            .sections()
            .find(|(id, _, _)| *id == stackroute_snapshot::format::SectionId::Rules)
            .map(|(_, bytes, _)| bytes.as_ptr())
            .expect("a rules section")
    };
    // n0…n4 run every app; n5 only app0.
    assert_eq!(rules(&second["n0"]), rules(&second["n4"]));
    assert_ne!(rules(&second["n0"]), rules(&second["n5"]));
    // Unchanged from the revision before: the same allocation, kept by every delta.
    assert_eq!(rules(&first["n0"]), rules(&second["n0"]));
}

#[test]
fn policy_sections_of_another_node_or_compile_are_not_used() {
    let state = state(&cluster(6, 10, ""), &policies(1000));
    let compiled = Compiled::new(&state, settings());
    let everything = compiled.encode_policies(compiled.node_policies("n0").expect("n0"));
    let only_app0 = compiled.encode_policies(compiled.node_policies("n5").expect("n5"));
    let scratch = |node: &str| compiled.node_snapshot(node, 3).expect("known node");
    // The wrong list: encoded from scratch instead.
    let parts = compiled.node_parts_with("n0", 3, &only_app0).expect("n0");
    assert!(parts.assemble() == scratch("n0"));
    let parts = compiled.node_parts_with("n5", 3, &everything).expect("n5");
    assert!(parts.assemble() == scratch("n5"));
    // The right list, but of another compile (its identity sets may differ): not used either.
    let relabelled = state_with_front_pod();
    let other = Compiled::new(&relabelled, settings());
    let stale = compiled.encode_policies(compiled.node_policies("n0").expect("n0"));
    let parts = other.node_parts_with("n0", 3, &stale).expect("n0");
    assert!(parts.assemble() == other.node_snapshot("n0", 3).expect("n0"));
    assert!(parts.assemble() != compiled.node_snapshot("n0", 3).expect("n0"));
}

fn state_with_front_pod() -> ClusterState {
    let extra = "- {apiVersion: v1, kind: Pod, metadata: {name: moved, namespace: shop, labels: {app: app1, tier: front}}, spec: {nodeName: n2, containers: []}, status: {podIP: 10.1.2.200}}\n";
    state(&cluster(6, 10, extra), &policies(1000))
}
