//! Properties of NetworkPolicy evaluation and of the gate, on random policies and clusters:
//!
//! - for a pod whose isolation does not change, adding a policy can only add allowed flows;
//! - a policy without rules (it only isolates) can only remove allowed flows;
//! - a flow is allowed iff the egress side alone and the ingress side alone both allow it;
//! - the gate is sound: wherever a compiled decision keeps RDMA, NetworkPolicy allows that
//!   connection — and, toward pods named by a `pods` peer, precise: RDMA stays exactly where
//!   every port the rule covers is allowed.

use std::net::IpAddr;

use proptest::prelude::*;
use stackroute_policy::netpol::{Endpoint, NetworkPolicies};
use stackroute_policy::{ClusterState, Compiled, Settings};
use stackroute_snapshot::{NoTrace, PortEntry, Protocol, Snapshot, Stack};

const PEERS: [&str; 9] = [
    "{podSelector: {matchLabels: {app: a}}}",
    "{podSelector: {}}",
    "{namespaceSelector: {matchLabels: {team: r}}}",
    "{namespaceSelector: {}}",
    "{namespaceSelector: {matchLabels: {team: c}}, podSelector: {matchLabels: {tier: x}}}",
    "{ipBlock: {cidr: 10.0.0.0/8}}",
    "{ipBlock: {cidr: 0.0.0.0/0, except: [10.1.0.0/16]}}",
    "{ipBlock: {cidr: 8.8.0.0/16, except: [8.8.8.0/24]}}",
    "{ipBlock: {cidr: 172.16.0.0/12}}",
];

const PORTS: [&str; 7] = [
    "{port: 80}",
    "{port: 29500, endPort: 29502}",
    "{port: 29503, endPort: 29510}",
    "{protocol: UDP, port: 53}",
    "{port: http}",
    "{protocol: TCP}",
    "{protocol: SCTP, port: 80}",
];

const SELECTORS: [&str; 4] = [
    "{}",
    "{matchLabels: {app: a}}",
    "{matchLabels: {app: b}}",
    "{matchLabels: {tier: x}}",
];

prop_compose! {
    fn np_rule()(
        peers in prop::option::of(prop::collection::vec(0..PEERS.len(), 1..3)),
        ports in prop::option::of(prop::collection::vec(0..PORTS.len(), 1..3)),
    ) -> String {
        let mut fields = Vec::new();
        if let Some(peers) = peers {
            let list: Vec<&str> = peers.iter().map(|p| PEERS[*p]).collect();
            fields.push(format!("PEERS: [{}]", list.join(", ")));
        }
        if let Some(ports) = ports {
            let list: Vec<&str> = ports.iter().map(|p| PORTS[*p]).collect();
            fields.push(format!("ports: [{}]", list.join(", ")));
        }
        format!("{{{}}}", fields.join(", "))
    }
}

prop_compose! {
    /// A NetworkPolicy document named `name`.
    fn np_yaml(name: &'static str)(
        namespace in 1..3usize,
        selector in 0..SELECTORS.len(),
        types in 0..4usize,
        ingress in prop::option::of(prop::collection::vec(np_rule(), 0..3)),
        egress in prop::option::of(prop::collection::vec(np_rule(), 0..3)),
    ) -> String {
        let types = ["", "  policyTypes: [Ingress]\n", "  policyTypes: [Egress]\n", "  policyTypes: [Ingress, Egress]\n"][types];
        let rules = |key: &str, peers: &str, rules: &Option<Vec<String>>| match rules {
            None => String::new(),
            Some(rules) => format!("  {key}: [{}]\n", rules.join(", ").replace("PEERS", peers)),
        };
        format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: n{namespace}}}\nspec:\n  podSelector: {}\n{types}{}{}",
            SELECTORS[selector],
            rules("ingress", "from", &ingress),
            rules("egress", "to", &egress),
        )
    }
}

/// A pod: its labels (`app`, and `tier: x` or none) and whether it uses the host's network.
#[derive(Clone, Debug)]
struct PodSpec {
    app_a: bool,
    tier_x: bool,
    host: bool,
}

fn pod_spec() -> impl Strategy<Value = PodSpec> {
    (any::<bool>(), any::<bool>(), prop::bool::weighted(0.1)).prop_map(|(app_a, tier_x, host)| {
        PodSpec {
            app_a,
            tier_x,
            host,
        }
    })
}

/// Six pods, three per namespace (`n1` team=r, `n2` team=c), on two nodes.
fn cluster(pods: &[PodSpec]) -> String {
    let mut out = String::from(
        "apiVersion: v1\nkind: List\nitems:\n\
         - {apiVersion: v1, kind: Node, metadata: {name: a1}, status: {addresses: [{type: InternalIP, address: 172.16.0.1}]}}\n\
         - {apiVersion: v1, kind: Node, metadata: {name: a2}, status: {addresses: [{type: InternalIP, address: 172.16.0.2}]}}\n\
         - {apiVersion: v1, kind: Namespace, metadata: {name: n1, labels: {team: r}}}\n\
         - {apiVersion: v1, kind: Namespace, metadata: {name: n2, labels: {team: c}}}\n",
    );
    for (i, pod) in pods.iter().enumerate() {
        let node = if i % 2 == 0 { "a1" } else { "a2" };
        let ip = if pod.host {
            if i % 2 == 0 {
                "172.16.0.1".to_string()
            } else {
                "172.16.0.2".to_string()
            }
        } else {
            format!("10.1.0.{}", 10 + i)
        };
        let tier = if pod.tier_x { ", tier: x" } else { "" };
        out.push_str(&format!(
            "- {{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, namespace: n{}, labels: {{app: {}{tier}}}}}, spec: {{nodeName: {node}, hostNetwork: {}}}, status: {{podIPs: [{{ip: {ip}}}]}}}}\n",
            i / 3 + 1,
            if pod.app_a { "a" } else { "b" },
            pod.host,
        ));
    }
    out
}

fn load(pods: &[PodSpec], documents: &[&str]) -> ClusterState {
    let mut state = ClusterState::default();
    let problems = state.load_text("cluster", &cluster(pods));
    assert!(problems.is_empty(), "{problems:?}");
    for document in documents {
        let problems = state.load_text("policies", document);
        assert!(problems.is_empty(), "{problems:?}\n{document}");
    }
    state
}

/// Destinations: the pods' addresses, the nodes', and addresses of no pod.
fn destinations() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = (0..6)
        .map(|i| format!("10.1.0.{}", 10 + i).parse().unwrap())
        .collect();
    for other in [
        "172.16.0.1",
        "172.16.0.2",
        "8.8.8.8",
        "8.8.4.4",
        "10.1.0.200",
        "1.1.1.1",
    ] {
        out.push(other.parse().unwrap());
    }
    out
}

const FLOW_PORTS: [(Protocol, u16); 5] = [
    (Protocol::Tcp, 80),
    (Protocol::Tcp, 29500),
    (Protocol::Tcp, 29505),
    (Protocol::Udp, 53),
    (Protocol::Tcp, 53),
];

/// Every flow's verdict: (source, destination, port) → (allowed, source isolated for egress,
/// destination isolated for ingress).
fn verdicts(state: &ClusterState) -> Vec<(String, bool, bool, bool)> {
    let policies = NetworkPolicies::from_state(state);
    let mut out = Vec::new();
    for source in &state.pods {
        let source_facts = policies.pod_facts(state, source);
        for ip in destinations() {
            let destination = state
                .pods
                .iter()
                .find(|p| !p.host_network && p.ips.contains(&ip));
            let destination_isolated =
                destination.is_some_and(|d| policies.pod_facts(state, d).isolated_for_ingress());
            for (protocol, port) in FLOW_PORTS {
                let verdict = policies.evaluate_connection(state, source, ip, port, protocol);
                out.push((
                    format!(
                        "{}/{} -> {ip}:{port}/{protocol}: {verdict}",
                        source.namespace, source.name
                    ),
                    verdict.is_allowed(),
                    source_facts.isolated_for_egress(),
                    destination_isolated,
                ));
            }
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn adding_a_policy_only_adds_flows_of_pods_already_isolated(
        pods in prop::collection::vec(pod_spec(), 6),
        base in prop::collection::vec(np_yaml("p"), 0..3),
        added in np_yaml("added"),
    ) {
        let base: Vec<String> = base.iter().enumerate().map(|(i, d)| d.replacen("name: p,", &format!("name: p{i},"), 1)).collect();
        let refs: Vec<&str> = base.iter().map(String::as_str).collect();
        let before = verdicts(&load(&pods, &refs));
        let mut with = refs.clone();
        with.push(&added);
        let after = verdicts(&load(&pods, &with));
        for (b, a) in before.iter().zip(&after) {
            // Isolation unchanged on both ends: the new policy is one more union member.
            if (b.2, b.3) == (a.2, a.3) && b.1 {
                prop_assert!(a.1, "lost: {}\nnow: {}\nadded:\n{added}", b.0, a.0);
            }
        }
    }

    #[test]
    fn a_policy_without_rules_only_removes_flows(
        pods in prop::collection::vec(pod_spec(), 6),
        base in prop::collection::vec(np_yaml("p"), 0..3),
        namespace in 1..3usize,
        selector in 0..SELECTORS.len(),
        types in 0..3usize,
    ) {
        let base: Vec<String> = base.iter().enumerate().map(|(i, d)| d.replacen("name: p,", &format!("name: p{i},"), 1)).collect();
        let types = ["[Ingress]", "[Egress]", "[Ingress, Egress]"][types];
        let deny = format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: deny, namespace: n{namespace}}}\nspec:\n  podSelector: {}\n  policyTypes: {types}\n",
            SELECTORS[selector]
        );
        let refs: Vec<&str> = base.iter().map(String::as_str).collect();
        let before = verdicts(&load(&pods, &refs));
        let mut with = refs.clone();
        with.push(&deny);
        let after = verdicts(&load(&pods, &with));
        for (b, a) in before.iter().zip(&after) {
            prop_assert!(!a.1 || b.1, "gained: {}\nwas: {}\n{deny}", a.0, b.0);
        }
    }

    #[test]
    fn a_flow_is_allowed_iff_egress_and_ingress_both_allow_it(
        pods in prop::collection::vec(pod_spec(), 6),
        base in prop::collection::vec(np_yaml("p"), 0..4),
    ) {
        let base: Vec<String> = base.iter().enumerate().map(|(i, d)| d.replacen("name: p,", &format!("name: p{i},"), 1)).collect();
        let refs: Vec<&str> = base.iter().map(String::as_str).collect();
        let state = load(&pods, &refs);
        let mut ingress_only = state.clone();
        for policy in &mut ingress_only.network_policies {
            policy.egress = None;
        }
        let mut egress_only = state.clone();
        for policy in &mut egress_only.network_policies {
            policy.ingress = None;
        }
        for ((both, ingress), egress) in verdicts(&state).iter().zip(verdicts(&ingress_only)).zip(verdicts(&egress_only)) {
            prop_assert_eq!(both.1, ingress.1 && egress.1, "{}\ningress alone: {}\negress alone: {}", both.0, ingress.0, egress.0);
        }
    }

    #[test]
    fn the_gate_keeps_rdma_only_where_network_policy_allows(
        pods in prop::collection::vec(pod_spec(), 6),
        policies in prop::collection::vec(np_yaml("p"), 1..4),
        to in 0..7usize,
        ports in 0..3usize,
        dedicated in any::<bool>(),
    ) {
        let policies: Vec<String> = policies.iter().enumerate().map(|(i, d)| d.replacen("name: p,", &format!("name: p{i},"), 1)).collect();
        let to_yaml = [
            "",
            "    to: [{pods: {namespaceSelector: {}, podSelector: {}}}]\n",
            "    to: [{pods: {namespaceSelector: {matchLabels: {team: c}}, podSelector: {matchLabels: {app: a}}}}]\n",
            "    to: [{networks: [10.1.0.0/24]}]\n",
            "    to: [{networks: [10.0.0.0/8, 8.8.0.0/16]}, {pods: {podSelector: {matchLabels: {tier: x}}}}]\n",
            "    to: [{entity: Cluster}]\n",
            "    to: [{entity: World}]\n",
        ][to];
        let ports_yaml = ["", "    ports: [{port: 29500, endPort: 29505}]\n", "    ports: [{port: 80}]\n"][ports];
        let transport = if dedicated {
            "    isolation: Dedicated\n    transport: {stack: RDMA, fallback: [{stack: Userspace, congestionControl: BBR}]}\n"
        } else {
            "    transport: {stack: RDMA, fallback: [{stack: Userspace, congestionControl: BBR}]}\n"
        };
        let route = format!(
            "---\napiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: fabric, namespace: n1}}\nspec:\n  podSelector: {{}}\n  rules:\n  - name: rdma\n{to_yaml}{ports_yaml}{transport}"
        );
        let mut documents: Vec<&str> = policies.iter().map(String::as_str).collect();
        documents.push(&route);
        let state = load(&pods, &documents);
        let compiled = Compiled::new(&state, Settings::default());
        prop_assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        let evaluator = NetworkPolicies::from_state(&state);
        let rule_ports: Vec<u16> = match ports {
            1 => (29500..=29505).collect(),
            2 => vec![80],
            _ => vec![29500, 80, 1],
        };
        let rule_entries: Vec<PortEntry> = match ports {
            1 => vec![PortEntry { protocol: Protocol::Tcp, first: 29500, last: 29505 }],
            2 => vec![PortEntry { protocol: Protocol::Tcp, first: 80, last: 80 }],
            _ => stackroute_policy::netpol::ALL_PORTS.to_vec(),
        };
        let any_host = pods.iter().any(|p| p.host);
        let mut precision_checked = 0;
        for node in ["a1", "a2"] {
            let bytes = compiled.node_snapshot(node, 1).unwrap();
            let snapshot = Snapshot::parse(&bytes).unwrap();
            for source in state.pods.iter().filter(|p| p.namespace == "n1" && p.node.as_deref() == Some(node)) {
                let workload = snapshot.workload_by_name(&source.namespace, &source.name).unwrap();
                for ip in destinations() {
                    let mut kept_everywhere = true;
                    for &port in &rule_ports {
                        let decision = snapshot.decide(workload, ip, port, Protocol::Tcp, &mut NoTrace);
                        let rdma = decision.transports().any(|t| t.stack == Stack::Rdma);
                        kept_everywhere &= rdma;
                        if rdma {
                            // Soundness: never RDMA where NetworkPolicy does not allow.
                            let verdict = evaluator.evaluate_connection(&state, source, ip, port, Protocol::Tcp);
                            prop_assert!(
                                verdict.is_allowed(),
                                "RDMA kept for {}/{} -> {ip}:{port}, but {verdict}\n{route}\n{}",
                                source.namespace, source.name, documents.join("")
                            );
                        }
                    }
                    // Precision toward pods of a pods peer: every port allowed → RDMA kept.
                    let destination = state
                        .pods
                        .iter()
                        .find(|p| !p.host_network && p.ips.contains(&ip))
                        .filter(|d| match to {
                            1 => true,
                            2 => d.namespace == "n2" && d.labels.get("app").map(String::as_str) == Some("a"),
                            _ => false,
                        });
                    if !any_host && let Some(destination) = destination {
                        let source_facts = evaluator.pod_facts(&state, source);
                        let destination_facts = evaluator.pod_facts(&state, destination);
                        let all_allowed = evaluator.evaluate(
                            &Endpoint::Pod { name: "source", facts: &source_facts },
                            &Endpoint::Pod { name: "destination", facts: &destination_facts },
                            &rule_entries,
                        ).is_allowed();
                        precision_checked += 1;
                        prop_assert_eq!(
                            kept_everywhere, all_allowed,
                            "{}/{} -> {}/{}\n{}", source.namespace, source.name,
                            destination.namespace, destination.name, documents.join("")
                        );
                    }
                }
            }
        }
        // The precision check ran wherever it applies (else it could not fail).
        prop_assert!(precision_checked > 0 || any_host || !(to == 1 || to == 2) || state.pods.iter().all(|p| p.namespace != "n2" || p.labels.get("app").map(String::as_str) != Some("a")) && to == 2);
    }
}
