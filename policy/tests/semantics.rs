//! Table-driven tests of every semantic rule of a decision (README "Policy semantics").
//! Each case is cluster state as YAML plus connections and the expected outcome.

use std::net::SocketAddr;

use stackroute_policy::explain::Explanation;
use stackroute_policy::{ClusterState, Compiled, Settings, explain};
use stackroute_snapshot::Protocol;

/// Three nodes (two in zone a, one in zone b), namespaces `ml` (team=research) and `shop`
/// (team=commerce), pods on each node. Policies are added per test.
const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: a1, labels: {topology.kubernetes.io/zone: a}}, status: {addresses: [{type: InternalIP, address: 172.16.0.1}]}}
- {apiVersion: v1, kind: Node, metadata: {name: a2, labels: {topology.kubernetes.io/zone: a}}, status: {addresses: [{type: InternalIP, address: 172.16.0.2}]}}
- {apiVersion: v1, kind: Node, metadata: {name: b1, labels: {topology.kubernetes.io/zone: b}}, status: {addresses: [{type: InternalIP, address: 172.16.1.1}, {type: InternalIP, address: "fd00::1:1"}]}}
- {apiVersion: v1, kind: Namespace, metadata: {name: ml, labels: {team: research}}}
- {apiVersion: v1, kind: Namespace, metadata: {name: shop, labels: {team: commerce}}}
- {apiVersion: v1, kind: Pod, metadata: {name: t0, namespace: ml, labels: {app: trainer}}, spec: {nodeName: a1}, status: {podIPs: [{ip: 10.1.0.10}, {ip: "fd00::10"}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: t1, namespace: ml, labels: {app: trainer}}, spec: {nodeName: a1}, status: {podIPs: [{ip: 10.1.0.11}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: t2, namespace: ml, labels: {app: trainer}}, spec: {nodeName: a2}, status: {podIPs: [{ip: 10.2.0.10}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: t3, namespace: ml, labels: {app: trainer}}, spec: {nodeName: b1}, status: {podIPs: [{ip: 10.3.0.10}, {ip: "fd00::30"}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: ml, labels: {app: db}}, spec: {nodeName: a2}, status: {podIPs: [{ip: 10.2.0.20}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: web, namespace: shop, labels: {app: trainer, tier: front}}, spec: {nodeName: a1}, status: {podIPs: [{ip: 10.1.0.30}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: cart, namespace: shop, labels: {app: cart}}, spec: {nodeName: b1}, status: {podIPs: [{ip: 10.3.0.30}]}}
- {apiVersion: v1, kind: Pod, metadata: {name: agent, namespace: shop, labels: {app: agent}}, spec: {nodeName: a2, hostNetwork: true}, status: {podIPs: [{ip: 172.16.0.2}]}}
- apiVersion: v1
  kind: Service
  metadata: {name: trainers, namespace: ml}
  spec: {clusterIP: 10.96.0.1, ports: [{name: rpc, port: 80, protocol: TCP}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: trainers-1, namespace: ml, labels: {kubernetes.io/service-name: trainers}}
  addressType: IPv4
  ports: [{name: rpc, port: 9000, protocol: TCP}]
  endpoints: [{addresses: [10.2.0.10], conditions: {ready: true}}, {addresses: [10.1.0.11]}, {addresses: [10.3.0.10], conditions: {ready: false}}]
- apiVersion: v1
  kind: Service
  metadata: {name: mixed, namespace: ml}
  spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata: {name: mixed-1, namespace: ml, labels: {kubernetes.io/service-name: mixed}}
  addressType: IPv4
  ports: [{port: 9000}]
  endpoints: [{addresses: [10.2.0.10]}, {addresses: [10.2.0.20]}]
"#;

fn sr(name: &str, namespace: &str, extra: &str, rules: &str) -> String {
    format!(
        "---\napiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: {name}, namespace: {namespace}{extra}}}\nspec:\n{rules}\n"
    )
}

fn csr(name: &str, extra: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: stackroute.dev/v1alpha1\nkind: ClusterStackRoute\nmetadata: {{name: {name}{extra}}}\nspec:\n{spec}\n"
    )
}

/// A decision rendered compactly: `TRANSPORTS by OBJECT/RULE` or `TRANSPORTS default`.
/// The explanation of one connection with `cluster` and `policies` loaded (both must be valid).
fn explanation(
    cluster: &str,
    policies: &str,
    from: &str,
    to: &str,
    protocol: Protocol,
) -> Explanation {
    let mut state = ClusterState::default();
    let problems = state.load_text("cluster", cluster);
    assert!(problems.is_empty(), "{problems:?}");
    let problems = state.load_text("policies", policies);
    assert!(problems.is_empty(), "policies invalid: {problems:?}");
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
        protocol,
    )
    .unwrap()
}

fn decide(policies: &str, from: &str, to: &str, protocol: Protocol) -> String {
    let e = explanation(CLUSTER, policies, from, to, protocol);
    let transports: Vec<String> = e
        .transport
        .iter()
        .chain(&e.fallback)
        .map(|t| format!("{}/{}", t.stack, t.congestion_control))
        .collect();
    let by = match &e.matched {
        Some(m) => format!("by {}/{}", m.name, m.rule),
        None => "default".to_string(),
    };
    format!("{} {} @{}", transports.join(","), by, e.location)
}

#[track_caller]
fn check(policies: &str, cases: &[(&str, &str, &str)]) {
    for (from, to, expected) in cases {
        let got = decide(policies, from, to, Protocol::Tcp);
        assert_eq!(&got, expected, "from {from} to {to}");
    }
}

const USERSPACE_BBR: &str = "    transport: {stack: Userspace, congestionControl: BBR}";

#[test]
fn no_policy_means_the_installation_default() {
    check(
        "",
        &[("ml/t0", "10.2.0.10:80", "Kernel/Default default @SameZone")],
    );
}

#[test]
fn tiers_admin_then_namespace_then_baseline() {
    let admin = csr(
        "admin",
        "",
        "  tier: Admin\n  subject: {namespaces: {matchLabels: {team: research}}}\n  rules:\n  - name: r\n    to: [{networks: [10.3.0.0/16]}]\n    transport: {stack: Kernel, congestionControl: Reno}",
    );
    let namespaced = sr(
        "ns",
        "ml",
        "",
        &format!(
            "  podSelector: {{}}\n  rules:\n  - name: r\n    to: [{{networks: [10.0.0.0/8]}}]\n{USERSPACE_BBR}"
        ),
    );
    let baseline = csr(
        "base",
        "",
        "  tier: Baseline\n  subject: {namespaces: {}}\n  rules:\n  - name: r\n    transport: {stack: Kernel, congestionControl: Cubic}",
    );
    let all = format!("{admin}{namespaced}{baseline}");
    check(
        &all,
        &[
            (
                "ml/t0",
                "10.3.0.10:1",
                "Kernel/Reno,Kernel/Default by admin/r @SameCluster",
            ),
            (
                "ml/t0",
                "10.2.0.10:1",
                "Userspace/BBR,Kernel/Default by ns/r @SameZone",
            ),
            (
                "ml/t0",
                "8.8.8.8:443",
                "Kernel/Cubic,Kernel/Default by base/r @External",
            ),
            // shop is not subject of admin and has no StackRoute: baseline applies.
            (
                "shop/web",
                "10.3.0.10:1",
                "Kernel/Cubic,Kernel/Default by base/r @SameCluster",
            ),
        ],
    );
}

#[test]
fn within_a_tier_priority_then_age_then_name() {
    let rule = |cc: &str| {
        format!(
            "  podSelector: {{}}\n  rules:\n  - name: r\n    transport: {{stack: Kernel, congestionControl: {cc}}}"
        )
    };
    let low_priority_wins = format!(
        "{}{}",
        sr(
            "a-high",
            "ml",
            "",
            &format!("  priority: 900\n{}", rule("Cubic"))
        ),
        sr(
            "z-low",
            "ml",
            "",
            &format!("  priority: 100\n{}", rule("Reno"))
        )
    );
    check(
        &low_priority_wins,
        &[(
            "ml/t0",
            "10.2.0.10:80",
            "Kernel/Reno,Kernel/Default by z-low/r @SameZone",
        )],
    );

    let older_wins = format!(
        "{}{}",
        sr(
            "a-new",
            "ml",
            ", creationTimestamp: \"2026-05-01T00:00:00Z\"",
            &rule("Cubic")
        ),
        sr(
            "z-old",
            "ml",
            ", creationTimestamp: \"2025-01-01T00:00:00Z\"",
            &rule("Reno")
        )
    );
    check(
        &older_wins,
        &[(
            "ml/t0",
            "10.2.0.10:80",
            "Kernel/Reno,Kernel/Default by z-old/r @SameZone",
        )],
    );

    let name_breaks_ties = format!(
        "{}{}",
        sr("b", "ml", "", &rule("Cubic")),
        sr("a", "ml", "", &rule("Reno"))
    );
    check(
        &name_breaks_ties,
        &[(
            "ml/t0",
            "10.2.0.10:80",
            "Kernel/Reno,Kernel/Default by a/r @SameZone",
        )],
    );
}

#[test]
fn first_matching_rule_in_order_wins() {
    let policy = sr(
        "p",
        "ml",
        "",
        "  podSelector: {}\n  rules:\n  - name: db\n    to: [{pods: {podSelector: {matchLabels: {app: db}}}}]\n    transport: {stack: Kernel, congestionControl: Reno}\n  - name: all\n    transport: {stack: Kernel, congestionControl: BBR}\n  - name: never\n    to: [{pods: {podSelector: {matchLabels: {app: db}}}}]\n    transport: {stack: Userspace}",
    );
    check(
        &policy,
        &[
            (
                "ml/t0",
                "10.2.0.20:5432",
                "Kernel/Reno,Kernel/Default by p/db @SameZone",
            ),
            (
                "ml/t0",
                "10.2.0.10:5432",
                "Kernel/BBR,Kernel/Default by p/all @SameZone",
            ),
        ],
    );
}

#[test]
fn pass_ends_its_tier_only() {
    let admin = csr(
        "admin",
        "",
        "  tier: Admin\n  subject: {namespaces: {}}\n  rules:\n  - name: skip-ml\n    action: Pass\n    to: [{pods: {namespaceSelector: {matchLabels: {team: research}}, podSelector: {}}}]\n  - name: rest\n    transport: {stack: Kernel, congestionControl: Reno}",
    );
    let admin_later = csr(
        "admin2",
        "",
        "  tier: Admin\n  priority: 900\n  subject: {namespaces: {}}\n  rules:\n  - name: x\n    transport: {stack: Kernel, congestionControl: Cubic}",
    );
    let namespaced = sr(
        "ns",
        "ml",
        "",
        &format!("  podSelector: {{}}\n  rules:\n  - name: r\n{USERSPACE_BBR}"),
    );
    let all = format!("{admin}{admin_later}{namespaced}");
    check(
        &all,
        &[
            // Pass skips the rest of admin and the later admin policy; the StackRoute decides.
            (
                "ml/t0",
                "10.2.0.10:1",
                "Userspace/BBR,Kernel/Default by ns/r @SameZone",
            ),
            (
                "ml/t0",
                "10.3.0.30:1",
                "Kernel/Reno,Kernel/Default by admin/rest @SameCluster",
            ),
            // shop has no StackRoute and no baseline: Pass falls through to the default.
            (
                "shop/web",
                "10.1.0.10:1",
                "Kernel/Default default @SameNode",
            ),
        ],
    );
}

#[test]
fn an_admin_pass_does_not_skip_the_baseline_tier() {
    let admin = csr(
        "delegate",
        "",
        "  tier: Admin\n  subject: {namespaces: {}}\n  rules:\n  - name: world-later\n    action: Pass\n    to: [{entity: World}]",
    );
    let baseline = csr(
        "egress",
        "",
        "  tier: Baseline\n  subject: {namespaces: {}}\n  rules:\n  - name: world\n    to: [{entity: World}]\n    transport: {stack: Kernel, congestionControl: BBR}",
    );
    check(
        &format!("{admin}{baseline}"),
        &[(
            "shop/web",
            "8.8.8.8:443",
            "Kernel/BBR,Kernel/Default by egress/world @External",
        )],
    );
}

#[test]
fn pods_peer_namespace_scope() {
    // A StackRoute pods peer without namespaceSelector means its own namespace only.
    let namespaced = sr(
        "p",
        "ml",
        "",
        &format!(
            "  podSelector: {{}}\n  rules:\n  - name: trainers\n    to: [{{pods: {{podSelector: {{matchLabels: {{app: trainer}}}}}}}}]\n{USERSPACE_BBR}"
        ),
    );
    check(
        &namespaced,
        &[
            (
                "ml/t0",
                "10.2.0.10:1",
                "Userspace/BBR,Kernel/Default by p/trainers @SameZone",
            ),
            ("ml/t0", "10.1.0.30:1", "Kernel/Default default @SameNode"), // shop/web is app=trainer too
        ],
    );
    // A ClusterStackRoute pods peer without namespaceSelector means every namespace.
    let cluster = csr(
        "c",
        "",
        &format!(
            "  tier: Baseline\n  subject: {{pods: {{podSelector: {{matchLabels: {{app: trainer}}}}}}}}\n  rules:\n  - name: trainers\n    to: [{{pods: {{podSelector: {{matchLabels: {{app: trainer}}}}}}}}]\n{USERSPACE_BBR}"
        ),
    );
    check(
        &cluster,
        &[
            (
                "ml/t0",
                "10.1.0.30:1",
                "Userspace/BBR,Kernel/Default by c/trainers @SameNode",
            ),
            (
                "shop/web",
                "10.3.0.10:1",
                "Userspace/BBR,Kernel/Default by c/trainers @SameCluster",
            ),
            (
                "ml/db",
                "10.3.0.10:1",
                "Kernel/Default default @SameCluster",
            ), // db is not a subject
        ],
    );
    // namespaceSelector with matchExpressions.
    let selected = sr(
        "p",
        "ml",
        "",
        &format!(
            "  podSelector: {{}}\n  rules:\n  - name: not-research\n    to: [{{pods: {{namespaceSelector: {{matchExpressions: [{{key: team, operator: NotIn, values: [research]}}]}}, podSelector: {{}}}}}}]\n{USERSPACE_BBR}"
        ),
    );
    check(
        &selected,
        &[
            (
                "ml/t0",
                "10.3.0.30:1",
                "Userspace/BBR,Kernel/Default by p/not-research @SameCluster",
            ),
            (
                "ml/t0",
                "10.3.0.10:1",
                "Kernel/Default default @SameCluster",
            ),
        ],
    );
}

#[test]
fn pod_selectors_pick_sources() {
    let policy = sr(
        "p",
        "ml",
        "",
        &format!(
            "  podSelector: {{matchLabels: {{app: db}}}}\n  rules:\n  - name: r\n{USERSPACE_BBR}"
        ),
    );
    check(
        &policy,
        &[
            (
                "ml/db",
                "10.1.0.10:1",
                "Userspace/BBR,Kernel/Default by p/r @SameZone",
            ),
            ("ml/t0", "10.2.0.20:1", "Kernel/Default default @SameZone"),
        ],
    );
    // StackRoutes of other namespaces never apply.
    let other = sr(
        "p",
        "shop",
        "",
        &format!("  podSelector: {{}}\n  rules:\n  - name: r\n{USERSPACE_BBR}"),
    );
    check(
        &other,
        &[("ml/t0", "10.1.0.30:1", "Kernel/Default default @SameNode")],
    );
}

#[test]
fn locations_classify_and_nest() {
    let rule = |location: &str| {
        sr(
            "p",
            "ml",
            "",
            &format!(
                "  podSelector: {{}}\n  rules:\n  - name: r\n    to: [{{pods: {{namespaceSelector: {{}}, podSelector: {{}}}}}}]\n    location: {location}\n{USERSPACE_BBR}"
            ),
        )
    };
    let matched = "Userspace/BBR,Kernel/Default by p/r";
    let table = [
        // (location of rule, destination, expected location, matches)
        ("SameNode", "10.1.0.11:1", "SameNode", true),
        ("SameNode", "10.2.0.10:1", "SameZone", false),
        ("SameZone", "10.1.0.11:1", "SameNode", true),
        ("SameZone", "10.2.0.10:1", "SameZone", true),
        ("SameZone", "10.3.0.10:1", "SameCluster", false),
        ("SameCluster", "10.1.0.11:1", "SameNode", true),
        ("SameCluster", "10.3.0.10:1", "SameCluster", true),
        ("Any", "10.3.0.10:1", "SameCluster", true),
    ];
    for (location, to, expected_location, matches) in table {
        let expected = if matches {
            format!("{matched} @{expected_location}")
        } else {
            format!("Kernel/Default default @{expected_location}")
        };
        check(&rule(location), &[("ml/t0", to, &expected)]);
    }
    // Node addresses: own node is SameNode, same-zone node SameZone; unknown addresses in the
    // cluster networks are SameCluster, everything else External.
    let any = sr(
        "p",
        "ml",
        "",
        "  podSelector: {}\n  rules:\n  - name: r\n    transport: {stack: Kernel, congestionControl: Reno}",
    );
    check(
        &any,
        &[
            (
                "ml/t0",
                "172.16.0.1:22",
                "Kernel/Reno,Kernel/Default by p/r @SameNode",
            ),
            (
                "ml/t0",
                "172.16.0.2:22",
                "Kernel/Reno,Kernel/Default by p/r @SameZone",
            ), // hostNetwork pod = node
            (
                "ml/t0",
                "172.16.1.1:22",
                "Kernel/Reno,Kernel/Default by p/r @SameCluster",
            ),
            (
                "ml/t0",
                "192.168.7.7:22",
                "Kernel/Reno,Kernel/Default by p/r @SameCluster",
            ),
            (
                "ml/t0",
                "[fd00::1:1]:22",
                "Kernel/Reno,Kernel/Default by p/r @SameCluster",
            ),
            (
                "ml/t0",
                "[2001:db8::1]:22",
                "Kernel/Reno,Kernel/Default by p/r @External",
            ),
            (
                "ml/t0",
                "1.1.1.1:22",
                "Kernel/Reno,Kernel/Default by p/r @External",
            ),
        ],
    );
    // External location and the entities.
    let entities = sr(
        "p",
        "ml",
        "",
        "  podSelector: {}\n  rules:\n  - name: world\n    to: [{entity: World}]\n    transport: {stack: Kernel, congestionControl: BBR}\n  - name: cluster\n    to: [{entity: Cluster}]\n    transport: {stack: Kernel, congestionControl: Cubic}",
    );
    check(
        &entities,
        &[
            (
                "ml/t0",
                "1.1.1.1:443",
                "Kernel/BBR,Kernel/Default by p/world @External",
            ),
            (
                "ml/t0",
                "10.3.0.30:443",
                "Kernel/Cubic,Kernel/Default by p/cluster @SameCluster",
            ),
            (
                "ml/t0",
                "10.99.0.1:443",
                "Kernel/Cubic,Kernel/Default by p/cluster @SameCluster",
            ),
        ],
    );
}

#[test]
fn ports_and_protocols() {
    let policy = sr(
        "p",
        "ml",
        "",
        "  podSelector: {}\n  rules:\n  - name: range\n    ports: [{port: 29500, endPort: 29600}]\n    transport: {stack: Kernel, congestionControl: Reno}\n  - name: dns\n    ports: [{protocol: UDP, port: 53}]\n    transport: {stack: Kernel, congestionControl: Cubic}\n  - name: any-udp\n    ports: [{protocol: UDP}]\n    transport: {stack: Kernel, congestionControl: BBR}",
    );
    check(
        &policy,
        &[
            (
                "ml/t0",
                "10.2.0.10:29500",
                "Kernel/Reno,Kernel/Default by p/range @SameZone",
            ),
            (
                "ml/t0",
                "10.2.0.10:29600",
                "Kernel/Reno,Kernel/Default by p/range @SameZone",
            ),
            (
                "ml/t0",
                "10.2.0.10:29601",
                "Kernel/Default default @SameZone",
            ),
            ("ml/t0", "10.2.0.10:53", "Kernel/Default default @SameZone"), // TCP 53 is not UDP 53
        ],
    );
    assert_eq!(
        decide(&policy, "ml/t0", "10.2.0.10:53", Protocol::Udp),
        "Kernel/Cubic,Kernel/Default by p/dns @SameZone"
    );
    assert_eq!(
        decide(&policy, "ml/t0", "10.2.0.10:29500", Protocol::Udp),
        "Kernel/BBR,Kernel/Default by p/any-udp @SameZone"
    );
}

#[test]
fn fallback_lists_and_the_implicit_kernel() {
    let policy = sr(
        "p",
        "ml",
        "",
        "  podSelector: {}\n  rules:\n  - name: dedicated\n    ports: [{port: 1}]\n    isolation: Dedicated\n    transport: {stack: RDMA, fallback: [{stack: Userspace, congestionControl: BBR}]}\n  - name: enforced\n    ports: [{port: 2}]\n    isolation: KernelEnforced\n    transport: {stack: Kernel, congestionControl: BBR, fallback: [{stack: Kernel, congestionControl: Cubic}]}\n  - name: explicit-kernel\n    ports: [{port: 3}]\n    transport: {stack: Userspace, fallback: [{stack: Kernel}]}\n  - name: rdma\n    ports: [{port: 4}]\n    transport: {stack: RDMA, fallback: [{stack: Userspace, congestionControl: BBR}, {stack: Kernel, congestionControl: BBR}]}",
    );
    check(
        &policy,
        &[
            (
                "ml/t0",
                "10.2.0.10:1",
                "RDMA/Default,Userspace/BBR by p/dedicated @SameZone",
            ),
            (
                "ml/t0",
                "10.2.0.10:2",
                "Kernel/BBR,Kernel/Cubic,Kernel/Default by p/enforced @SameZone",
            ),
            (
                "ml/t0",
                "10.2.0.10:3",
                "Userspace/Default,Kernel/Default by p/explicit-kernel @SameZone",
            ),
            (
                "ml/t0",
                "10.2.0.10:4",
                "RDMA/Default,Userspace/BBR,Kernel/BBR,Kernel/Default by p/rdma @SameZone",
            ),
        ],
    );
}

#[test]
fn services_resolve_to_their_ready_backends() {
    let policy = sr(
        "p",
        "ml",
        "",
        &format!(
            "  podSelector: {{}}\n  rules:\n  - name: trainers\n    to: [{{pods: {{podSelector: {{matchLabels: {{app: trainer}}}}}}}}]\n    ports: [{{port: 9000}}]\n{USERSPACE_BBR}"
        ),
    );
    // Both ready backends (t2, t1) are trainers on port 9000: unanimous. t3 is not ready.
    check(
        &policy,
        &[(
            "ml/db",
            "10.96.0.1:80",
            "Userspace/BBR,Kernel/Default by p/trainers @SameZone",
        )],
    );
    // mixed: a trainer and the db; the backends disagree, so the default applies.
    check(
        &policy,
        &[(
            "ml/db",
            "10.96.0.2:80",
            "Kernel/Default default @SameCluster",
        )],
    );
    let e = explanation(CLUSTER, &policy, "ml/db", "10.96.0.1:80", Protocol::Tcp);
    assert_eq!(e.via, "service-unanimous");
    let backends: Vec<(String, u16)> = e
        .backends
        .iter()
        .map(|b| (b.address.clone(), b.port))
        .collect();
    assert_eq!(
        backends,
        vec![
            ("10.1.0.11".to_string(), 9000),
            ("10.2.0.10".to_string(), 9000)
        ]
    );
    let e = explanation(CLUSTER, &policy, "ml/db", "10.96.0.2:80", Protocol::Tcp);
    assert_eq!(e.via, "service-ambiguous");
    assert_eq!(e.backends.len(), 2);
    assert!(
        e.backends.iter().any(|b| b.matched.is_some())
            && e.backends.iter().any(|b| b.matched.is_none())
    );
}

/// The user-space stack connects to a Service's nearest ready backend itself (kube-proxy never
/// sees its packets): same node first, then same zone; equals are spread; not-ready backends
/// and non-frontends are never chosen.
#[test]
fn service_backends_for_the_user_space_stack_are_the_nearest_ready_ones() {
    let mut state = ClusterState::default();
    assert!(state.load_text("cluster", CLUSTER).is_empty());
    let compiled = Compiled::new(&state, Settings::default());
    let pick = |node: &str, to: &str, spread: u64| {
        let bytes = compiled.node_snapshot(node, 1).unwrap();
        let snapshot = stackroute_snapshot::Snapshot::parse(&bytes).unwrap();
        let to: SocketAddr = to.parse().unwrap();
        snapshot
            .service_backend(to.ip(), to.port(), Protocol::Tcp, spread)
            .map(|(ip, port)| SocketAddr::new(ip, port).to_string())
    };
    // trainers: ready backends 10.1.0.11 (t1 on a1) and 10.2.0.10 (t2 on a2); t3 is not ready.
    for spread in 0..4 {
        assert_eq!(
            pick("a1", "10.96.0.1:80", spread).as_deref(),
            Some("10.1.0.11:9000")
        );
        assert_eq!(
            pick("a2", "10.96.0.1:80", spread).as_deref(),
            Some("10.2.0.10:9000")
        );
    }
    // From zone b both are in the other zone: equals, spread.
    let from_b: std::collections::BTreeSet<_> = (0..4)
        .filter_map(|s| pick("b1", "10.96.0.1:80", s))
        .collect();
    assert_eq!(from_b.len(), 2, "{from_b:?}");
    // mixed: both backends on a2, equals from a2: spread over both.
    let from_a2: std::collections::BTreeSet<_> = (0..4)
        .filter_map(|s| pick("a2", "10.96.0.2:80", s))
        .collect();
    assert_eq!(
        from_a2.into_iter().collect::<Vec<_>>(),
        ["10.2.0.10:9000", "10.2.0.20:9000"]
    );
    // Not a frontend, wrong port, wrong protocol.
    assert_eq!(pick("a1", "10.2.0.10:9000", 0), None);
    assert_eq!(pick("a1", "10.96.0.1:81", 0), None);
    let bytes = compiled.node_snapshot("a1", 1).unwrap();
    let snapshot = stackroute_snapshot::Snapshot::parse(&bytes).unwrap();
    assert_eq!(
        snapshot.service_backend("10.96.0.1".parse().unwrap(), 80, Protocol::Udp, 0),
        None
    );
}

#[test]
fn v1beta1_endpoint_slices_resolve_services_like_v1() {
    // A Kubernetes 1.20 server serves EndpointSlices only as discovery.k8s.io/v1beta1.
    let old_cluster = CLUSTER.replace("discovery.k8s.io/v1\n", "discovery.k8s.io/v1beta1\n");
    assert_eq!(old_cluster.matches("discovery.k8s.io/v1beta1").count(), 2);
    let policy = sr(
        "p",
        "ml",
        "",
        &format!(
            "  podSelector: {{}}\n  rules:\n  - name: trainers\n    to: [{{pods: {{podSelector: {{matchLabels: {{app: trainer}}}}}}}}]\n    ports: [{{port: 9000}}]\n{USERSPACE_BBR}"
        ),
    );
    let backends = |cluster: &str| {
        let e = explanation(cluster, &policy, "ml/db", "10.96.0.1:80", Protocol::Tcp);
        let backends: Vec<(String, u16)> = e
            .backends
            .iter()
            .map(|b| (b.address.clone(), b.port))
            .collect();
        (e.via, e.transport.expect("not refused"), backends)
    };
    let old = backends(&old_cluster);
    assert_eq!(old.0, "service-unanimous");
    assert_eq!(
        (old.1.stack.as_str(), old.1.congestion_control.as_str()),
        ("Userspace", "BBR")
    );
    assert_eq!(
        old.2,
        vec![
            ("10.1.0.11".to_string(), 9000),
            ("10.2.0.10".to_string(), 9000)
        ]
    );
    assert_eq!(old, backends(CLUSTER));
}

#[test]
fn ipv6_destinations_and_networks() {
    let policy = sr(
        "p",
        "ml",
        "",
        "  podSelector: {}\n  rules:\n  - name: v6-trainers\n    to: [{pods: {podSelector: {matchLabels: {app: trainer}}}}]\n    location: SameZone\n    transport: {stack: Kernel, congestionControl: Reno}\n  - name: v6-net\n    to: [{networks: [\"fd00::/16\"]}]\n    transport: {stack: Kernel, congestionControl: BBR}",
    );
    check(
        &policy,
        &[
            (
                "ml/t1",
                "[fd00::10]:1",
                "Kernel/Reno,Kernel/Default by p/v6-trainers @SameNode",
            ),
            (
                "ml/t1",
                "[fd00::30]:1",
                "Kernel/BBR,Kernel/Default by p/v6-net @SameCluster",
            ),
            (
                "ml/t1",
                "[::ffff:10.1.0.10]:1",
                "Kernel/Reno,Kernel/Default by p/v6-trainers @SameNode",
            ),
        ],
    );
}

#[test]
fn explain_reports_why_each_rule_did_not_match() {
    let policy = sr(
        "p",
        "ml",
        "",
        "  podSelector: {}\n  rules:\n  - name: ports\n    ports: [{port: 443}]\n    transport: {stack: Kernel}\n  - name: near\n    to: [{pods: {podSelector: {}}}]\n    location: SameNode\n    transport: {stack: Kernel}\n  - name: peers\n    to: [{networks: [192.168.0.0/16]}]\n    transport: {stack: Kernel}",
    );
    let mut state = ClusterState::default();
    state.load_text("c", CLUSTER);
    state.load_text("p", &policy);
    let compiled = Compiled::new(&state, Settings::default());
    let e = explain(
        &compiled,
        &state,
        "ml",
        "t0",
        "10.3.0.10".parse().unwrap(),
        80,
        Protocol::Tcp,
    )
    .unwrap();
    let reasons: Vec<String> = e
        .considered
        .iter()
        .map(|c| c.reason.clone().unwrap_or_default())
        .collect();
    assert_eq!(e.considered.len(), 3);
    assert!(
        reasons[0].contains("port 80/TCP is not in ports [TCP 443]"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].contains("destination is SameCluster; rule requires location SameNode"),
        "{reasons:?}"
    );
    assert!(
        reasons[2].contains("not covered by to [networks [192.168.0.0/16]]"),
        "{reasons:?}"
    );
    assert!(e.matched.is_none());
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["matched"], serde_json::Value::Null);
    assert_eq!(json["transport"]["stack"], "Kernel");
    assert_eq!(json["transport"]["congestionControl"], "Default");
}

#[test]
fn invalid_selectors_are_reported_and_the_policy_left_out() {
    let bad = sr(
        "bad",
        "ml",
        "",
        "  podSelector: {matchExpressions: [{key: app, operator: Equals, values: [x]}]}\n  rules:\n  - name: r\n    transport: {stack: Userspace}",
    );
    let mut state = ClusterState::default();
    state.load_text("c", CLUSTER);
    assert!(state.load_text("p", &bad).is_empty());
    let compiled = Compiled::new(&state, Settings::default());
    assert_eq!(compiled.problems.len(), 1);
    assert_eq!(
        compiled.problems[0].to_string(),
        "StackRoute/ml/bad: spec.podSelector: matchExpressions[0]: unknown operator \"Equals\"; use In, NotIn, Exists or DoesNotExist"
    );
    assert_eq!(compiled.counts(), (0, 0));
}
