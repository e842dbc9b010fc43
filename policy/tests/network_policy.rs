//! NetworkPolicy semantics (README "NetworkPolicy and kernel bypass"), table-driven like
//! `semantics.rs`: cluster state as YAML, NetworkPolicies added per test, flows and the expected
//! verdict — then the gate as `stackroute explain` shows it: a kernel-bypass stack stays in a
//! decision only where NetworkPolicy allows every flow the rule covers.

use std::net::SocketAddr;

use stackroute_policy::explain::Explanation;
use stackroute_policy::netpol::NetworkPolicies;
use stackroute_policy::{ClusterState, Compiled, Settings, explain};
use stackroute_snapshot::Protocol;

/// Two nodes; namespaces `ml` (team=research), `shop` (team=commerce) and `ops` (team=infra).
/// `ml/t1` differs from `ml/t0` only by `canary: "yes"`; `ops/agent` uses the host's network.
const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: a1, labels: {topology.kubernetes.io/zone: a}}, status: {addresses: [{type: InternalIP, address: 172.16.0.1}]}}
- {apiVersion: v1, kind: Node, metadata: {name: a2, labels: {topology.kubernetes.io/zone: a}}, status: {addresses: [{type: InternalIP, address: 172.16.0.2}]}}
- {apiVersion: v1, kind: Namespace, metadata: {name: ml, labels: {team: research}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {team: commerce}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: ops, labels: {team: infra}}}
- {apiVersion: v1, kind: Pod, metadata: {name: t0, namespace: ml, labels: {app: trainer}}, spec: {nodeName: a1}, status: {podIPs: [{ip: 10.1.0.10}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: t1, namespace: ml, labels: {app: trainer, canary: "yes"}}, spec: {nodeName: a1}, status: {podIPs: [{ip: 10.1.0.11}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: ml, labels: {app: db}}, spec: {nodeName: a2}, status: {podIPs: [{ip: 10.2.0.20}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: shop, labels: {app: web}}, spec: {nodeName: a1}, status: {podIPs: [{ip: 10.1.0.30}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: cart, namespace: shop, labels: {app: cart}}, spec: {nodeName: a2}, status: {podIPs: [{ip: 10.2.0.30}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: mon, namespace: ops, labels: {app: monitor}}, spec: {nodeName: a2}, status: {podIPs: [{ip: 10.2.0.40}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: agent, namespace: ops, labels: {app: agent}}, spec: {nodeName: a2, hostNetwork: true}, status: {podIPs: [{ip: 172.16.0.2}]}}
"#;

/// A NetworkPolicy document.
fn np(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{spec}\n"
    )
}

fn state_with(extra: &str) -> ClusterState {
    let mut state = ClusterState::default();
    let problems = state.load_text("cluster", CLUSTER);
    assert!(problems.is_empty(), "{problems:?}");
    let problems = state.load_text("policies", extra);
    assert!(problems.is_empty(), "policies invalid: {problems:?}");
    state
}

/// `allowed`, `denied` or `undecidable` for a connection `from` (NAMESPACE/POD) to `to`.
fn verdict(state: &ClusterState, from: &str, to: &str, protocol: Protocol) -> String {
    let (namespace, pod) = from.split_once('/').unwrap();
    let to: SocketAddr = to.parse().unwrap();
    let source = state.pod(namespace, pod).expect("source pod");
    NetworkPolicies::from_state(state)
        .evaluate_connection(state, source, to.ip(), to.port(), protocol)
        .as_str()
        .to_string()
}

#[track_caller]
fn check(policies: &str, cases: &[(&str, &str, &str)]) {
    check_protocol(policies, Protocol::Tcp, cases);
}

#[track_caller]
fn check_protocol(policies: &str, protocol: Protocol, cases: &[(&str, &str, &str)]) {
    let state = state_with(policies);
    let mut failures = Vec::new();
    for (from, to, expected) in cases {
        let got = verdict(&state, from, to, protocol);
        if got != *expected {
            let (namespace, pod) = from.split_once('/').unwrap();
            let to: SocketAddr = to.parse().unwrap();
            let why = NetworkPolicies::from_state(&state).evaluate_connection(
                &state,
                state.pod(namespace, pod).unwrap(),
                to.ip(),
                to.port(),
                protocol,
            );
            failures.push(format!("{from} -> {to}: expected {expected}, got {why}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn without_network_policy_every_flow_is_allowed() {
    check(
        "",
        &[
            ("ml/t0", "10.2.0.30:80", "allowed"),
            ("shop/web", "8.8.8.8:443", "allowed"),
            ("ops/agent", "10.1.0.10:1", "allowed"),
        ],
    );
}

#[test]
fn a_pod_selector_isolates_only_the_pods_it_selects() {
    let policy = np(
        "shop",
        "cart-from-web",
        "  podSelector: {matchLabels: {app: cart}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]",
    );
    check(
        &policy,
        &[
            ("shop/web", "10.2.0.30:8080", "allowed"),
            ("ml/t0", "10.2.0.30:8080", "denied"),
            // web is not selected: not isolated.
            ("ml/t0", "10.1.0.30:8080", "allowed"),
            // cart is isolated for ingress only.
            ("shop/cart", "10.1.0.10:8080", "allowed"),
        ],
    );
}

#[test]
fn an_empty_pod_selector_selects_every_pod_of_its_namespace_only() {
    let policy = np(
        "shop",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]",
    );
    check(
        &policy,
        &[
            ("ml/t0", "10.1.0.30:80", "denied"),
            ("ml/t0", "10.2.0.30:80", "denied"),
            // within the namespace too
            ("shop/web", "10.2.0.30:80", "denied"),
            // other namespaces are not selected
            ("shop/web", "10.1.0.10:80", "allowed"),
            ("ops/mon", "10.2.0.20:80", "allowed"),
        ],
    );
    // An absent podSelector (allowed from Kubernetes 1.35 on) is the same as `{}`.
    let absent = np("shop", "deny-ingress", "  policyTypes: [Ingress]");
    check(&absent, &[("ml/t0", "10.1.0.30:80", "denied")]);
}

#[test]
fn a_namespace_selector_alone_selects_every_pod_of_the_namespaces() {
    let policy = np(
        "shop",
        "from-research",
        "  podSelector: {matchLabels: {app: cart}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: research}}}]}]",
    );
    check(
        &policy,
        &[
            ("ml/t0", "10.2.0.30:80", "allowed"),
            ("ml/db", "10.2.0.30:80", "allowed"),
            ("ops/mon", "10.2.0.30:80", "denied"),
            // its own namespace is not team=research
            ("shop/web", "10.2.0.30:80", "denied"),
        ],
    );
    // `kubernetes.io/metadata.name` is always there to select a namespace by name.
    let by_name = np(
        "shop",
        "from-ops",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}}]}]",
    );
    check(
        &by_name,
        &[
            ("ops/mon", "10.2.0.30:80", "allowed"),
            ("ml/t0", "10.2.0.30:80", "denied"),
        ],
    );
}

#[test]
fn both_selectors_in_one_peer_must_both_match() {
    let together = np(
        "shop",
        "trainers-of-research",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: research}}, podSelector: {matchLabels: {app: trainer}}}]}]",
    );
    check(
        &together,
        &[
            ("ml/t0", "10.2.0.30:80", "allowed"),
            ("ml/db", "10.2.0.30:80", "denied"),
            ("ops/mon", "10.2.0.30:80", "denied"),
        ],
    );
    // Two peers are a union: research namespaces OR trainers of this namespace (there are none).
    let apart = np(
        "shop",
        "research-or-trainers",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: research}}}, {podSelector: {matchLabels: {app: trainer}}}]}]",
    );
    check(
        &apart,
        &[
            ("ml/db", "10.2.0.30:80", "allowed"),
            ("ops/mon", "10.2.0.30:80", "denied"),
        ],
    );
}

#[test]
fn a_pod_selector_alone_means_the_policys_own_namespace() {
    let policy = np(
        "shop",
        "from-trainers",
        "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {app: trainer}}}]}]",
    );
    // ml/t0 is app=trainer, but in ml.
    check(&policy, &[("ml/t0", "10.2.0.30:80", "denied")]);
    let web = np(
        "shop",
        "from-web",
        "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]",
    );
    check(&web, &[("shop/web", "10.2.0.30:80", "allowed")]);
}

#[test]
fn ip_blocks_with_except_match_addresses_of_no_pod_and_no_node() {
    let policy = np(
        "ml",
        "egress-dns",
        "  podSelector: {matchLabels: {app: trainer}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 8.8.0.0/16, except: [8.8.8.0/24]}}, {ipBlock: {cidr: 10.0.0.0/8}}, {ipBlock: {cidr: 172.16.0.0/12}}]",
    );
    check(
        &policy,
        &[
            ("ml/t0", "8.8.4.4:53", "allowed"),
            ("ml/t0", "8.8.8.8:53", "denied"),
            ("ml/t0", "1.1.1.1:53", "denied"),
            // an address in 10/8 that is no pod's
            ("ml/t0", "10.9.9.9:80", "allowed"),
            // pod and node addresses are not matched by ipBlock (the conservative choice)
            ("ml/t0", "10.2.0.20:80", "denied"),
            ("ml/t0", "172.16.0.2:80", "denied"),
            // db is not selected
            ("ml/db", "8.8.8.8:53", "allowed"),
        ],
    );
    // IPv6, and an IPv4-mapped destination counted as IPv4.
    let v6 = np(
        "ml",
        "egress-v6",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: \"2001:db8::/32\", except: [\"2001:db8:1::/48\"]}}, {ipBlock: {cidr: 9.9.9.0/24}}]}]",
    );
    check(
        &v6,
        &[
            ("ml/t0", "[2001:db8::1]:443", "allowed"),
            ("ml/t0", "[2001:db8:1::1]:443", "denied"),
            ("ml/t0", "[::ffff:9.9.9.9]:443", "allowed"),
        ],
    );
    // An ipBlock source: addresses of no pod only; a pod is never matched by it.
    let ingress = np(
        "shop",
        "from-block",
        "  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]",
    );
    check(&ingress, &[("ml/t0", "10.2.0.30:80", "denied")]);
}

#[test]
fn ports_protocols_and_end_port() {
    let policy = np(
        "shop",
        "cart-ports",
        "  podSelector: {matchLabels: {app: cart}}\n  ingress:\n  - ports: [{port: 8080}, {protocol: UDP, port: 53}, {port: 9000, endPort: 9010}]",
    );
    check(
        &policy,
        &[
            ("ml/t0", "10.2.0.30:8080", "allowed"),
            ("ml/t0", "10.2.0.30:8081", "denied"),
            ("ml/t0", "10.2.0.30:53", "denied"),
            ("ml/t0", "10.2.0.30:9000", "allowed"),
            ("ml/t0", "10.2.0.30:9010", "allowed"),
            ("ml/t0", "10.2.0.30:9011", "denied"),
        ],
    );
    check_protocol(
        &policy,
        Protocol::Udp,
        &[
            ("ml/t0", "10.2.0.30:53", "allowed"),
            ("ml/t0", "10.2.0.30:8080", "denied"),
        ],
    );
    // A port entry without `port` is every port of its protocol.
    let all_udp = np(
        "shop",
        "udp",
        "  podSelector: {}\n  ingress: [{ports: [{protocol: UDP}]}]",
    );
    check_protocol(
        &all_udp,
        Protocol::Udp,
        &[("ml/t0", "10.2.0.30:1", "allowed")],
    );
    check(&all_udp, &[("ml/t0", "10.2.0.30:1", "denied")]);
    // SCTP ports allow no TCP or UDP flow (and do not widen the rule to every port).
    let sctp = np(
        "shop",
        "sctp",
        "  podSelector: {}\n  ingress: [{ports: [{protocol: SCTP, port: 80}]}]",
    );
    check(&sctp, &[("ml/t0", "10.2.0.30:80", "denied")]);
}

#[test]
fn named_ports_cannot_be_decided() {
    let policy = np(
        "shop",
        "named",
        "  podSelector: {}\n  ingress: [{ports: [{port: http}]}]",
    );
    check(
        &policy,
        &[
            ("ml/t0", "10.2.0.30:8080", "undecidable"),
            ("ml/t0", "10.2.0.30:1", "undecidable"),
        ],
    );
    // Another rule that allows the flow decides it; a named port of a rule whose peers do not
    // match the source changes nothing.
    let decided = format!(
        "{policy}{}{}",
        np(
            "shop",
            "numbered",
            "  podSelector: {}\n  ingress: [{ports: [{port: 8080}]}]"
        ),
        np(
            "ops",
            "named-elsewhere",
            "  podSelector: {}\n  ingress: [{from: [{podSelector: {matchLabels: {app: nobody}}}], ports: [{port: http}]}]"
        )
    );
    check(
        &decided,
        &[
            ("ml/t0", "10.2.0.30:8080", "allowed"),
            ("ml/t0", "10.2.0.40:8080", "denied"),
        ],
    );
}

#[test]
fn policy_types_default_to_ingress_and_to_egress_when_there_are_egress_rules() {
    // No policyTypes, egress rules only: Ingress AND Egress. Ingress has no rules: denied.
    let egress_rules = np(
        "ml",
        "db-egress",
        "  podSelector: {matchLabels: {app: db}}\n  egress: [{to: [{namespaceSelector: {matchLabels: {team: commerce}}}]}]",
    );
    check(
        &egress_rules,
        &[
            ("ml/t0", "10.2.0.20:5432", "denied"),
            ("ml/db", "10.2.0.30:80", "allowed"),
            ("ml/db", "10.2.0.40:80", "denied"),
        ],
    );
    // policyTypes [Egress] explicitly: ingress is not isolated.
    let egress_only = np(
        "ml",
        "db-egress",
        "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {team: commerce}}}]}]",
    );
    check(
        &egress_only,
        &[
            ("ml/t0", "10.2.0.20:5432", "allowed"),
            ("ml/db", "10.2.0.40:80", "denied"),
        ],
    );
    // Ingress rules only, no policyTypes: egress is not isolated.
    let ingress_rules = np(
        "ml",
        "db-ingress",
        "  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: trainer}}}]}]",
    );
    check(
        &ingress_rules,
        &[
            ("ml/t0", "10.2.0.20:5432", "allowed"),
            ("shop/web", "10.2.0.20:5432", "denied"),
            ("ml/db", "8.8.8.8:53", "allowed"),
        ],
    );
    // policyTypes [Ingress] with egress rules: the egress rules are ignored.
    let ignored = np(
        "ml",
        "db-ingress",
        "  podSelector: {matchLabels: {app: db}}\n  policyTypes: [Ingress]\n  ingress: [{}]\n  egress: [{to: [{ipBlock: {cidr: 1.1.1.1/32}}]}]",
    );
    check(&ignored, &[("ml/db", "8.8.8.8:53", "allowed")]);
}

#[test]
fn default_deny_in_both_directions() {
    let policy = np(
        "ml",
        "default-deny",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]",
    );
    check(
        &policy,
        &[
            ("ml/t0", "10.2.0.20:80", "denied"),
            ("ml/t0", "8.8.8.8:53", "denied"),
            ("ml/t0", "172.16.0.1:10250", "denied"),
            ("shop/web", "10.1.0.10:80", "denied"),
            ("shop/web", "10.2.0.30:80", "allowed"),
        ],
    );
    // Allow-all rules (`{}`: every peer, every port) undo it.
    let allow = format!(
        "{policy}{}",
        np(
            "ml",
            "allow-all",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{}]\n  egress: [{}]"
        )
    );
    check(
        &allow,
        &[
            ("ml/t0", "8.8.8.8:53", "allowed"),
            ("ml/t0", "172.16.0.1:10250", "allowed"),
            ("shop/web", "10.1.0.10:80", "allowed"),
        ],
    );
}

#[test]
fn policies_are_a_union() {
    let policies = format!(
        "{}{}",
        np(
            "shop",
            "web-8080",
            "  podSelector: {matchLabels: {app: cart}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 8080}]}]"
        ),
        np(
            "shop",
            "research-9000",
            "  podSelector: {matchLabels: {app: cart}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: research}}}], ports: [{port: 9000}]}]"
        )
    );
    check(
        &policies,
        &[
            ("shop/web", "10.2.0.30:8080", "allowed"),
            ("shop/web", "10.2.0.30:9000", "denied"),
            ("ml/t0", "10.2.0.30:9000", "allowed"),
            ("ml/t0", "10.2.0.30:8080", "denied"),
        ],
    );
}

#[test]
fn egress_and_ingress_must_both_allow() {
    let egress = np(
        "ml",
        "trainer-egress",
        "  podSelector: {matchLabels: {app: trainer}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {team: commerce}}}]}]",
    );
    let ingress_web_only = np(
        "shop",
        "cart-from-web",
        "  podSelector: {matchLabels: {app: cart}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]",
    );
    let ingress_research = np(
        "shop",
        "cart-from-research",
        "  podSelector: {matchLabels: {app: cart}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: research}}}]}]",
    );
    // egress allows, ingress does not
    check(
        &format!("{egress}{ingress_web_only}"),
        &[("ml/t0", "10.2.0.30:80", "denied")],
    );
    // both allow
    check(
        &format!("{egress}{ingress_research}"),
        &[
            ("ml/t0", "10.2.0.30:80", "allowed"),
            // ingress allows ml/db, and ml/db's egress is not isolated
            ("ml/db", "10.2.0.30:80", "allowed"),
            // mon's ingress is open, but the trainer's egress does not reach ops
            ("ml/t0", "10.2.0.40:80", "denied"),
        ],
    );
    let egress_to_ops_only = np(
        "ml",
        "trainer-egress",
        "  podSelector: {matchLabels: {app: trainer}}\n  policyTypes: [Egress]\n  egress: [{to: [{namespaceSelector: {matchLabels: {team: infra}}}]}]",
    );
    check(
        &format!("{egress_to_ops_only}{ingress_research}"),
        &[("ml/t0", "10.2.0.30:80", "denied")],
    );
}

#[test]
fn a_host_network_pod_is_its_nodes_address_to_its_peers() {
    let from_all_namespaces = np(
        "shop",
        "from-anywhere-in-cluster",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}}]}]",
    );
    check(
        &from_all_namespaces,
        &[
            ("ml/t0", "10.2.0.30:80", "allowed"),
            ("ops/agent", "10.2.0.30:80", "denied"),
        ],
    );
    let from_everything = np("shop", "open", "  podSelector: {}\n  ingress: [{}]");
    check(
        &from_everything,
        &[("ops/agent", "10.2.0.30:80", "allowed")],
    );
}

#[test]
fn unreadable_policies_make_their_namespace_undecidable() {
    let mut state = state_with("");
    let broken = np(
        "shop",
        "broken",
        "  podSelector: {}\n  ingress: [{ports: [{port: 9000, endPort: 8000}]}]",
    );
    let problems = state.load_text("broken.yaml", &broken);
    assert_eq!(problems.len(), 1, "{problems:?}");
    let problem = problems[0].to_string();
    assert!(
        problem.contains("NetworkPolicy/shop/broken")
            && problem.contains("spec.ingress[0].ports[0].endPort"),
        "{problem}"
    );
    assert_eq!(state.unreadable_network_policies.len(), 1);
    for (from, to, expected) in [
        ("ml/t0", "10.2.0.30:80", "undecidable"),
        ("shop/web", "8.8.8.8:80", "undecidable"),
        ("ml/t0", "10.2.0.40:80", "allowed"),
    ] {
        assert_eq!(
            verdict(&state, from, to, Protocol::Tcp),
            expected,
            "{from} -> {to}"
        );
    }
    // What the API server refuses, refused alike.
    for (spec, message) in [
        ("  ingress: [{from: [{}]}]", "a peer must set"),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]",
            "ipBlock cannot be combined",
        ),
        (
            "  ingress: [{from: [{ipBlock: {cidr: 10.0.0.0}}]}]",
            "is not a CIDR",
        ),
        ("  policyTypes: [Sideways]", "unknown policy type"),
        (
            "  ingress: [{ports: [{port: http, endPort: 90}]}]",
            "numeric port",
        ),
        (
            "  ingress: [{ports: [{protocol: ICMP}]}]",
            "unknown protocol",
        ),
        (
            "  podSelector: {matchExpressions: [{key: a, operator: Equals, values: [b]}]}",
            "unknown operator",
        ),
    ] {
        let mut state = ClusterState::default();
        let problems = state.load_text("x.yaml", &np("shop", "bad", spec));
        assert_eq!(problems.len(), 1, "{spec}: {problems:?}");
        assert!(
            problems[0].message.contains(message),
            "{spec}: {}",
            problems[0]
        );
        assert_eq!(state.unreadable_network_policies.len(), 1, "{spec}");
    }
}

const CILIUM: &str = r#"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: ops}
spec: {endpointSelector: {}}
"#;

#[test]
fn foreign_policy_objects_make_every_flow_undecidable() {
    let state = state_with(CILIUM);
    assert_eq!(state.foreign_policies, ["CiliumNetworkPolicy/ops/l7"]);
    for (from, to) in [("ml/t0", "10.2.0.30:80"), ("shop/web", "8.8.8.8:443")] {
        assert_eq!(verdict(&state, from, to, Protocol::Tcp), "undecidable");
    }
    let admin = "---\napiVersion: policy.networking.k8s.io/v1alpha1\nkind: AdminNetworkPolicy\nmetadata: {name: cluster-guard}\nspec: {priority: 10, subject: {namespaces: {}}}\n";
    let state = state_with(admin);
    assert_eq!(state.foreign_policies, ["AdminNetworkPolicy/cluster-guard"]);
    assert_eq!(
        verdict(&state, "ml/t0", "10.2.0.30:80", Protocol::Tcp),
        "undecidable"
    );
}

// === the gate, as `stackroute explain` shows it ===

/// A StackRoute in `ml` for the trainers: RDMA, then user-space BBR, toward `to` on
/// 29500-29600.
fn rdma_route(to: &str, extra: &str) -> String {
    format!(
        "---\napiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: fabric, namespace: ml}}\nspec:\n  podSelector: {{matchLabels: {{app: trainer}}}}\n  rules:\n  - name: rdma\n    to: {to}\n    ports: [{{port: 29500, endPort: 29600}}]\n{extra}    transport: {{stack: RDMA, fallback: [{{stack: Userspace, congestionControl: BBR}}]}}\n"
    )
}

const TO_COMMERCE: &str =
    "[{pods: {namespaceSelector: {matchLabels: {team: commerce}}, podSelector: {}}}]";

fn explanation(policies: &str, from: &str, to: &str) -> Explanation {
    let state = state_with(policies);
    let compiled = Compiled::new(&state, Settings::default());
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    let (namespace, pod) = from.split_once('/').unwrap();
    let to: SocketAddr = to.parse().unwrap();
    explain(
        &compiled,
        &state,
        namespace,
        pod,
        to.ip(),
        to.port(),
        Protocol::Tcp,
    )
    .unwrap()
}

/// `TRANSPORTS [removed: STACKS]` of an explanation.
fn outcome(e: &Explanation) -> String {
    let mut transports: Vec<String> = e
        .transport
        .iter()
        .chain(&e.fallback)
        .map(|t| format!("{}/{}", t.stack, t.congestion_control))
        .collect();
    if transports.is_empty() {
        transports.push("refused".into());
    }
    let mut out = transports.join(",");
    if !e.removed.is_empty() {
        let removed: Vec<String> = e
            .removed
            .iter()
            .map(|r| format!("{}:{}", r.stack, r.reason))
            .collect();
        out.push_str(&format!(" removed {}", removed.join(",")));
    }
    out
}

#[test]
fn rdma_toward_a_namespace_that_denies_ingress_is_removed_and_the_fallbacks_kept() {
    let deny = np(
        "shop",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]",
    );
    let policies = format!("{}{deny}", rdma_route(TO_COMMERCE, ""));
    let e = explanation(&policies, "ml/t0", "10.2.0.30:29500");
    assert_eq!(
        outcome(&e),
        "Userspace/BBR,Kernel/Default removed RDMA:network-policy",
        "{}",
        e.to_text()
    );
    let matched = e.matched.as_ref().expect("the rule still decides");
    assert_eq!(
        (matched.name.as_str(), matched.rule.as_str()),
        ("fabric", "rdma")
    );
    let detail = &e.removed[0].detail;
    assert!(
        detail.starts_with(
            "denied: ingress to pod shop/cart is isolated by NetworkPolicy shop/deny-ingress"
        ),
        "{detail}"
    );
    let text = e.to_text();
    assert!(
        text.contains("removed: RDMA (network-policy: denied: ingress to pod shop/cart"),
        "{text}"
    );
    assert!(text.contains("[bypass removed: network-policy]"), "{text}");
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["removed"][0]["reason"], "network-policy", "{json}");
    assert_eq!(json["transport"]["stack"], "Userspace", "{json}");

    // Counted per policy, for status and metrics.
    let state = state_with(&policies);
    let compiled = Compiled::new(&state, Settings::default());
    let gated = compiled.network_policy_gated();
    assert_eq!(gated.len(), 1, "{gated:?}");
    assert_eq!(gated[0].object(), "StackRoute/ml/fabric");
    assert_eq!((gated[0].rule.as_str(), gated[0].sources), ("rdma", 2));
    assert!(!gated[0].partial && !gated[0].undecidable);
}

#[test]
fn rdma_where_network_policy_allows_every_flow_is_kept() {
    let allow = np(
        "shop",
        "from-research",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: research}}}], ports: [{port: 29000, endPort: 30000}]}]",
    );
    let policies = format!("{}{allow}", rdma_route(TO_COMMERCE, ""));
    for to in ["10.2.0.30:29500", "10.1.0.30:29600"] {
        let e = explanation(&policies, "ml/t0", to);
        assert_eq!(
            outcome(&e),
            "RDMA/Default,Userspace/BBR,Kernel/Default",
            "{to}: {}",
            e.to_text()
        );
    }
    let state = state_with(&policies);
    assert!(
        Compiled::new(&state, Settings::default())
            .network_policy_gated()
            .is_empty()
    );
}

#[test]
fn a_rule_keeps_rdma_only_if_every_port_it_covers_is_allowed() {
    let only_29500 = np(
        "shop",
        "from-research-29500",
        "  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: research}}}], ports: [{port: 29500}]}]",
    );
    let policies = format!("{}{only_29500}", rdma_route(TO_COMMERCE, ""));
    // This connection is allowed, but the rule covers 29501-29600 too: fail closed.
    let e = explanation(&policies, "ml/t0", "10.2.0.30:29500");
    assert_eq!(
        outcome(&e),
        "Userspace/BBR,Kernel/Default removed RDMA:network-policy"
    );
    let detail = &e.removed[0].detail;
    assert!(
        detail.starts_with("NetworkPolicy allows this connection, but the rule also covers flows it does not allow:")
            && detail.contains("TCP 29501-29600"),
        "{detail}"
    );
}

#[test]
fn a_rule_is_split_by_destination_and_sources_get_their_own_copy() {
    // Only cart is isolated: toward web RDMA stays, toward cart it goes.
    let cart = np(
        "shop",
        "cart-closed",
        "  podSelector: {matchLabels: {app: cart}}\n  policyTypes: [Ingress]",
    );
    let policies = format!("{}{cart}", rdma_route(TO_COMMERCE, ""));
    let web = explanation(&policies, "ml/t0", "10.1.0.30:29500");
    assert_eq!(outcome(&web), "RDMA/Default,Userspace/BBR,Kernel/Default");
    let cart_e = explanation(&policies, "ml/t0", "10.2.0.30:29500");
    assert_eq!(
        outcome(&cart_e),
        "Userspace/BBR,Kernel/Default removed RDMA:network-policy"
    );
    // The allowed part is considered first, then the rest of the rule decides.
    let considered: Vec<(String, String, Option<String>)> = cart_e
        .considered
        .iter()
        .map(|c| (c.rule.clone(), c.result.clone(), c.network_policy.clone()))
        .collect();
    assert_eq!(
        considered,
        [
            (
                "rdma".into(),
                "no-match".into(),
                Some("allowed-part".into())
            ),
            (
                "rdma".into(),
                "matched".into(),
                Some("bypass-removed".into())
            ),
        ]
    );
    let state = state_with(&policies);
    let gated = Compiled::new(&state, Settings::default())
        .network_policy_gated()
        .to_vec();
    assert_eq!(gated.len(), 1);
    assert!(gated[0].partial, "{gated:?}");

    // The canary trainer may not leave ml at all: only its copy of the policy loses RDMA.
    let canary = np(
        "ml",
        "canary-egress",
        "  podSelector: {matchLabels: {canary: \"yes\"}}\n  policyTypes: [Egress]",
    );
    let policies = format!("{}{canary}", rdma_route(TO_COMMERCE, ""));
    assert_eq!(
        outcome(&explanation(&policies, "ml/t0", "10.2.0.30:29500")),
        "RDMA/Default,Userspace/BBR,Kernel/Default"
    );
    let e = explanation(&policies, "ml/t1", "10.2.0.30:29500");
    assert_eq!(
        outcome(&e),
        "Userspace/BBR,Kernel/Default removed RDMA:network-policy"
    );
    assert!(
        e.removed[0]
            .detail
            .contains("egress from pod ml/t1 is isolated by NetworkPolicy ml/canary-egress"),
        "{}",
        e.removed[0].detail
    );
    let state = state_with(&policies);
    let gated = Compiled::new(&state, Settings::default())
        .network_policy_gated()
        .to_vec();
    assert_eq!((gated.len(), gated[0].sources), (1, 1), "{gated:?}");
}

#[test]
fn destinations_matched_by_address_are_all_or_nothing() {
    // db (10.2.0.20) is allowed, cart (10.2.0.30) is not: the networks peer covers both.
    let cart = np(
        "shop",
        "cart-closed",
        "  podSelector: {matchLabels: {app: cart}}\n  policyTypes: [Ingress]",
    );
    let policies = format!("{}{cart}", rdma_route("[{networks: [10.2.0.0/16]}]", ""));
    assert_eq!(
        outcome(&explanation(&policies, "ml/t0", "10.2.0.20:29500")),
        "Userspace/BBR,Kernel/Default removed RDMA:network-policy"
    );
    // Without the denial, the same rule keeps RDMA.
    assert_eq!(
        outcome(&explanation(
            &rdma_route("[{networks: [10.2.0.0/16]}]", ""),
            "ml/t0",
            "10.2.0.20:29500"
        )),
        "RDMA/Default,Userspace/BBR,Kernel/Default"
    );
    // An egress ipBlock covering the networks peer keeps it, except where pods are denied.
    let egress = np(
        "ml",
        "trainers-out",
        "  podSelector: {matchLabels: {app: trainer}}\n  policyTypes: [Egress]\n  egress: [{to: [{ipBlock: {cidr: 10.2.0.0/16}}, {namespaceSelector: {}}]}]",
    );
    let policies = format!("{}{egress}", rdma_route("[{networks: [10.2.0.0/16]}]", ""));
    assert_eq!(
        outcome(&explanation(&policies, "ml/t0", "10.2.0.20:29500")),
        "RDMA/Default,Userspace/BBR,Kernel/Default"
    );
    let narrow = egress.replace("10.2.0.0/16", "10.2.0.0/17");
    let policies = format!("{}{narrow}", rdma_route("[{networks: [10.2.0.0/16]}]", ""));
    assert_eq!(
        outcome(&explanation(&policies, "ml/t0", "10.2.0.20:29500")),
        "Userspace/BBR,Kernel/Default removed RDMA:network-policy"
    );
}

#[test]
fn foreign_policy_objects_remove_rdma_everywhere() {
    let policies = format!("{}{CILIUM}", rdma_route(TO_COMMERCE, ""));
    let e = explanation(&policies, "ml/t0", "10.1.0.30:29500");
    assert_eq!(
        outcome(&e),
        "Userspace/BBR,Kernel/Default removed RDMA:network-policy"
    );
    assert!(
        e.removed[0].detail.starts_with("undecidable: policy objects the controller cannot evaluate are present (CiliumNetworkPolicy/ops/l7)"),
        "{}",
        e.removed[0].detail
    );
    let state = state_with(&policies);
    let gated = Compiled::new(&state, Settings::default())
        .network_policy_gated()
        .to_vec();
    assert!(gated.len() == 1 && gated[0].undecidable, "{gated:?}");
}

#[test]
fn named_ports_remove_rdma() {
    let named = np(
        "shop",
        "named",
        "  podSelector: {}\n  ingress: [{ports: [{port: nccl}]}]",
    );
    let e = explanation(
        &format!("{}{named}", rdma_route(TO_COMMERCE, "")),
        "ml/t0",
        "10.1.0.30:29500",
    );
    assert_eq!(
        outcome(&e),
        "Userspace/BBR,Kernel/Default removed RDMA:network-policy"
    );
    assert!(
        e.removed[0].detail.contains("named port \"nccl\""),
        "{}",
        e.removed[0].detail
    );
}

#[test]
fn a_dedicated_rule_left_without_transport_refuses_the_connection() {
    let route = "---\napiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {name: fabric, namespace: ml}\nspec:\n  podSelector: {}\n  rules:\n  - name: rdma-only\n    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: cart}}}}]\n    isolation: Dedicated\n    transport: {stack: RDMA}\n";
    let deny = np(
        "shop",
        "deny-ingress",
        "  podSelector: {}\n  policyTypes: [Ingress]",
    );
    let e = explanation(&format!("{route}{deny}"), "ml/t0", "10.2.0.30:29500");
    assert_eq!(
        outcome(&e),
        "refused removed RDMA:network-policy",
        "{}",
        e.to_text()
    );
    assert!(
        e.refused
            .as_deref()
            .is_some_and(|r| r.contains("Dedicated")),
        "{e:?}"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert!(json["transport"].is_null(), "{json}");
    assert!(
        e.to_text().contains("decision: refused (EACCES)"),
        "{}",
        e.to_text()
    );
}

#[test]
fn network_policies_that_allow_everything_change_no_snapshot_byte() {
    let route = rdma_route(TO_COMMERCE, "");
    let open = format!(
        "{route}{}",
        np(
            "shop",
            "open",
            "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress: [{}]\n  egress: [{}]"
        )
    );
    let plain = state_with(&route);
    let with_open = state_with(&open);
    let a = Compiled::new(&plain, Settings::default());
    let b = Compiled::new(&with_open, Settings::default());
    assert!(b.network_policy_gated().is_empty());
    for node in ["a1", "a2"] {
        assert!(
            a.node_snapshot(node, 7) == b.node_snapshot(node, 7),
            "node {node}: snapshots differ"
        );
    }
}
