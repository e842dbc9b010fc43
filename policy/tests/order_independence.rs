//! Property: a decision does not depend on the order in which objects are read.
//!
//! Random clusters and policies (with deliberate priority and age ties) are rendered as YAML
//! documents, loaded in two different orders, compiled, and every (source pod, destination)
//! pair must get the same rule and transports from both.

use std::net::IpAddr;

use proptest::prelude::*;
use stackroute_policy::{ClusterState, Compiled, Settings};
use stackroute_snapshot::{NoTrace, Protocol, RuleRef, Snapshot, Trace, Verdict};

const APPS: [&str; 3] = ["x", "y", "z"];
const STACKS: [&str; 3] = ["Kernel", "Userspace", "RDMA"];
const CCS: [&str; 4] = ["Default", "Cubic", "BBR", "Reno"];

fn pod_ip(index: usize) -> String {
    format!("10.0.{}.{}", index / 8, index % 8 + 1)
}

prop_compose! {
    fn rule_yaml(index: usize)(
        peer in 0..6usize, app in 0..3usize, port in prop::option::of(0..3u16), udp in any::<bool>(),
        stack in 0..3usize, cc in 0..4usize, pass in any::<bool>(), location in 0..3usize,
    ) -> (String, bool) {
        let to = match peer {
            0 => format!("    to: [{{pods: {{podSelector: {{matchLabels: {{app: {}}}}}}}}}]\n", APPS[app]),
            1 => "    to: [{networks: [10.0.1.0/24, 10.0.0.0/30]}]\n".to_string(),
            2 => "    to: [{entity: Cluster}]\n".to_string(),
            3 => "    to: [{entity: World}]\n".to_string(),
            4 => "    to: [{networks: [8.8.0.0/16, \"fd00::/8\"]}, {pods: {podSelector: {}}}]\n".to_string(),
            _ => String::new(),
        };
        let protocol = if udp { "UDP" } else { "TCP" };
        let ports = port.map(|p| format!("    ports: [{{protocol: {protocol}, port: {}}}]\n", 80 + p)).unwrap_or_default();
        let location = match peer {
            0 => ["Any", "SameZone", "SameNode"][location],
            1 | 5 => ["Any", "SameCluster", "External"][location],
            _ => "Any",
        };
        // RDMA cannot reach External destinations (a CRD rule).
        let stack = if location == "External" && STACKS[stack] == "RDMA" { 1 } else { stack };
        let cc = if STACKS[stack] == "RDMA" { "Default" } else { CCS[cc] };
        let body = if pass {
            "    action: Pass\n".to_string()
        } else {
            format!("    transport: {{stack: {}, congestionControl: {cc}}}\n", STACKS[stack])
        };
        (format!("  - name: r{index}\n{to}{ports}    location: {location}\n{body}"), pass)
    }
}

prop_compose! {
    fn policy_yaml(index: usize)(
        cluster in any::<bool>(), admin in any::<bool>(), namespace in 0..3usize,
        priority in prop::sample::select(vec![100, 500]), age in 0..3usize,
        subject_app in prop::option::of(0..3usize),
        rules in prop::collection::vec(rule_yaml(0), 1..4),
    ) -> String {
        let created = ["", ", creationTimestamp: \"2025-01-01T00:00:00Z\"", ", creationTimestamp: \"2026-01-01T00:00:00Z\""][age];
        let selector = subject_app.map(|a| format!("{{matchLabels: {{app: {}}}}}", APPS[a])).unwrap_or_else(|| "{}".into());
        let rules: String = rules
            .iter()
            .enumerate()
            .map(|(i, (text, _))| text.replacen("name: r0", &format!("name: r{i}"), 1))
            .collect();
        if cluster {
            let tier = if admin { "Admin" } else { "Baseline" };
            format!("apiVersion: stackroute.dev/v1alpha1\nkind: ClusterStackRoute\nmetadata: {{name: c{index}{created}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n  subject: {{pods: {{podSelector: {selector}}}}}\n  rules:\n{rules}")
        } else {
            // Pass is a ClusterStackRoute action only.
            let rules = rules.replace("    action: Pass\n", "    transport: {stack: Kernel}\n");
            format!("apiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: s{index}, namespace: n{namespace}{created}}}\nspec:\n  priority: {priority}\n  podSelector: {selector}\n  rules:\n{rules}")
        }
    }
}

fn cluster_documents(pods: &[PodSpec]) -> Vec<String> {
    let mut documents = Vec::new();
    for node in 0..3 {
        let zone = if node < 2 { "a" } else { "b" };
        documents.push(format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: node{node}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\nstatus: {{addresses: [{{type: InternalIP, address: 172.16.0.{}}}]}}",
            node + 1
        ));
    }
    for namespace in 0..3 {
        documents.push(format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: n{namespace}, labels: {{team: t{}}}}}", namespace % 2));
    }
    for (index, (namespace, app, node)) in pods.iter().enumerate() {
        documents.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{index}, namespace: n{namespace}, labels: {{app: {}}}}}\nspec: {{nodeName: node{node}}}\nstatus: {{podIPs: [{{ip: {}}}]}}",
            APPS[*app],
            pod_ip(index)
        ));
    }
    // A Service per (namespace, app) with the matching pods as backends; two of them also list
    // an address that is no pod (a node, and an address only a networks peer can match), so
    // the fast path must decide those backends one by one.
    for namespace in 0..3 {
        for (app, name) in APPS.iter().enumerate() {
            let mut addresses: Vec<String> = pods
                .iter()
                .enumerate()
                .filter(|(_, (n, a, _))| *n == namespace && *a == app)
                .map(|(index, _)| pod_ip(index))
                .collect();
            match (namespace, app) {
                (0, 0) => addresses.push("172.16.0.2".into()),
                (1, 1) => addresses.push("10.0.1.200".into()),
                _ => {}
            }
            let target = 80 + app;
            documents.push(format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: n{namespace}}}\nspec: {{clusterIP: {}, ports: [{{port: 80, targetPort: {target}}}]}}",
                service_ip(namespace, app)
            ));
            let endpoints: String = addresses
                .iter()
                .map(|a| format!("{{addresses: [{a}], conditions: {{ready: true}}}}, "))
                .collect();
            documents.push(format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: n{namespace}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: {target}, protocol: TCP}}]\nendpoints: [{endpoints}]"
            ));
        }
    }
    documents
}

fn service_ip(namespace: usize, app: usize) -> String {
    format!("10.96.{namespace}.{}", app + 1)
}

/// A trace that asks for rule-by-rule evaluation.
struct Detailed;

impl Trace for Detailed {
    fn rule(&mut self, _rule: RuleRef, _verdict: Verdict) {}
}

/// Every decision, keyed by names so that internal numbering cannot matter.
fn all_decisions(documents: &[String], pods: usize) -> Vec<String> {
    let mut state = ClusterState::default();
    for (index, document) in documents.iter().enumerate() {
        let problems = state.load_text(&format!("doc{index}"), document);
        assert!(problems.is_empty(), "{problems:?}\n{document}");
    }
    let compiled = Compiled::new(&state, Settings::default());
    assert!(compiled.problems.is_empty());
    let snapshots: Vec<(String, Vec<u8>)> = compiled.all_node_snapshots(1);
    let mut destinations: Vec<IpAddr> = (0..pods).map(|i| pod_ip(i).parse().unwrap()).collect();
    destinations.extend(
        [
            "172.16.0.1",
            "10.0.1.200",
            "8.8.8.8",
            "9.9.9.9",
            "fd00::1",
            "2001:db8::1",
        ]
        .iter()
        .map(|ip| ip.parse::<IpAddr>().unwrap()),
    );
    for namespace in 0..3 {
        for app in 0..APPS.len() {
            destinations.push(service_ip(namespace, app).parse().unwrap());
        }
    }
    let mut out = Vec::new();
    for pod in &state.pods {
        let (_, bytes) = snapshots
            .iter()
            .find(|(node, _)| Some(node) == pod.node.as_ref())
            .unwrap();
        let snapshot = Snapshot::parse(bytes).unwrap();
        let workload = snapshot
            .workload_by_name(&pod.namespace, &pod.name)
            .unwrap();
        for destination in &destinations {
            for (port, protocol) in [
                (80, Protocol::Tcp),
                (81, Protocol::Tcp),
                (9999, Protocol::Tcp),
                (82, Protocol::Udp),
            ] {
                let decision =
                    snapshot.decide(workload, *destination, port, protocol, &mut NoTrace);
                // The shim's fast path (policy summaries, rule filters, early exit) must agree
                // with the rule-by-rule evaluation that explain traces.
                let traced = snapshot.decide(workload, *destination, port, protocol, &mut Detailed);
                assert!(
                    decision.same_outcome(&traced)
                        && decision.location == traced.location
                        && decision.via == traced.via,
                    "fast path differs for {destination}:{port}: {decision:?} vs {traced:?}"
                );
                let by = decision.matched.map(|m| {
                    let policy = snapshot.policy(m.policy);
                    format!(
                        "{}/{}/{}",
                        policy.namespace,
                        policy.name,
                        snapshot.rule(m).name
                    )
                });
                let transports: Vec<String> =
                    decision.transports().map(|t| t.to_string()).collect();
                out.push(format!(
                    "{}/{} → {destination}:{port}/{protocol} = {by:?} {transports:?}",
                    pod.namespace, pod.name
                ));
            }
        }
    }
    out.sort();
    out
}

/// `(namespace, app, node)` of each pod.
type PodSpec = (usize, usize, usize);

fn scenario() -> impl Strategy<Value = (Vec<PodSpec>, Vec<String>, Vec<usize>)> {
    (
        prop::collection::vec((0..3usize, 0..3usize, 0..3usize), 2..10),
        1..7usize,
    )
        .prop_flat_map(|(pods, policy_count)| {
            let policies: Vec<_> = (0..policy_count).map(policy_yaml).collect();
            let total = cluster_documents(&pods).len() + policy_count;
            (
                Just(pods),
                policies,
                Just((0..total).collect::<Vec<usize>>()).prop_shuffle(),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn decisions_do_not_depend_on_read_order((pods, policies, order) in scenario()) {
        let mut documents = cluster_documents(&pods);
        documents.extend(policies);
        let shuffled: Vec<String> = order.iter().map(|i| documents[*i].clone()).collect();
        let reversed: Vec<String> = documents.iter().rev().cloned().collect();
        let expected = all_decisions(&documents, pods.len());
        prop_assert_eq!(&expected, &all_decisions(&shuffled, pods.len()));
        prop_assert_eq!(&expected, &all_decisions(&reversed, pods.len()));
    }
}
