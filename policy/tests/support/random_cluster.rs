//! Random clusters and policies rendered as YAML documents, shared by the property tests: three
//! nodes in two zones, three namespaces, pods labelled `app: x|y|z`, a Service per (namespace,
//! app) with EndpointSlices, and StackRoutes/ClusterStackRoutes whose rules mix pod selectors,
//! networks, entities, ports and port ranges, locations and fallback lists.

use proptest::prelude::*;
use stackroute_policy::{ClusterState, Compiled, Settings};
use stackroute_snapshot::{Snapshot, WorkloadId};

pub(crate) const APPS: [&str; 3] = ["x", "y", "z"];
const STACKS: [&str; 3] = ["Kernel", "Userspace", "RDMA"];
const CCS: [&str; 4] = ["Default", "Cubic", "BBR", "Reno"];

pub(crate) fn pod_ip(index: usize) -> String {
    format!("10.0.{}.{}", index / 8, index % 8 + 1)
}

prop_compose! {
    pub(crate) fn rule_yaml(index: usize)(
        peer in 0..6usize, app in 0..3usize, port in prop::option::of(0..3u16), udp in any::<bool>(),
        stack in 0..3usize, cc in 0..4usize, pass in any::<bool>(), location in 0..3usize,
        end_port in prop::option::of(1..20u16), fallback in prop::option::of(0..4usize),
        isolation in 0..4usize,
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
        let end = end_port.map(|e| format!(", endPort: {}", 80 + port.unwrap_or(0) + e)).unwrap_or_default();
        let ports = port.map(|p| format!("    ports: [{{protocol: {protocol}, port: {}{end}}}]\n", 80 + p)).unwrap_or_default();
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
            // Dedicated only for RDMA/Userspace and with no kernel fallback; KernelEnforced
            // only for the kernel (CRD rules).
            let isolation = match (isolation, STACKS[stack]) {
                (1, "RDMA" | "Userspace") => "    isolation: Dedicated\n",
                (2, "Kernel") => "    isolation: KernelEnforced\n",
                _ => "",
            };
            // A second choice, a kernel one with its own congestion control.
            let fallback = fallback
                .filter(|_| !isolation.contains("Dedicated"))
                .map(|f| format!(", fallback: [{{stack: Kernel, congestionControl: {}}}]", CCS[f]))
                .unwrap_or_default();
            format!("{isolation}    transport: {{stack: {}, congestionControl: {cc}{fallback}}}\n", STACKS[stack])
        };
        (format!("  - name: r{index}\n{to}{ports}    location: {location}\n{body}"), pass)
    }
}

prop_compose! {
    pub(crate) fn policy_yaml(index: usize)(
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

pub(crate) fn cluster_documents(pods: &[PodSpec]) -> Vec<String> {
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
            let ip = service_ip(namespace, app);
            let namespace = format!("n{namespace}");
            documents.extend(service_documents(name, &namespace, &ip, target, &addresses));
        }
    }
    // One more Service in front of every pod and sixteen addresses that are no pods (each a
    // backend group of its own): more groups than the fast path decides in one walk.
    let mut addresses: Vec<String> = (0..pods.len()).map(pod_ip).collect();
    addresses.extend((200..210).map(|host| format!("10.0.1.{host}")));
    addresses.extend(
        [
            "172.16.0.1",
            "172.16.0.3",
            "10.0.0.3",
            "8.8.4.4",
            "8.8.8.8",
            "9.9.9.9",
        ]
        .map(String::from),
    );
    documents.extend(service_documents(
        "mixed",
        "n0",
        MIXED_SERVICE_IP,
        80,
        &addresses,
    ));
    documents
}

/// A Service (port 80 to `target`) and one EndpointSlice listing `addresses`, all ready.
fn service_documents(
    name: &str,
    namespace: &str,
    ip: &str,
    target: usize,
    addresses: &[String],
) -> [String; 2] {
    let endpoints: String = addresses
        .iter()
        .map(|a| format!("{{addresses: [{a}], conditions: {{ready: true}}}}, "))
        .collect();
    [
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80, targetPort: {target}}}]}}"
        ),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: {namespace}, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{port: {target}, protocol: TCP}}]\nendpoints: [{endpoints}]"
        ),
    ]
}

/// The ClusterIP of the Service in front of every pod (see [`cluster_documents`]).
pub(crate) const MIXED_SERVICE_IP: &str = "10.96.9.1";

pub(crate) fn service_ip(namespace: usize, app: usize) -> String {
    format!("10.96.{namespace}.{}", app + 1)
}

/// `(namespace, app, node)` of each pod.
pub(crate) type PodSpec = (usize, usize, usize);

/// Loads and compiles `documents` (every one must load cleanly) and calls `visit` with each
/// pod's `namespace/name`, its node's snapshot and its workload there.
pub(crate) fn each_pod(documents: &[String], visit: impl FnMut(&str, &Snapshot<'_>, WorkloadId)) {
    each_pod_with(documents, Settings::default(), visit);
}

/// [`each_pod`] compiled with `settings`.
pub(crate) fn each_pod_with(
    documents: &[String],
    settings: Settings,
    mut visit: impl FnMut(&str, &Snapshot<'_>, WorkloadId),
) {
    let mut state = ClusterState::default();
    for (index, document) in documents.iter().enumerate() {
        let problems = state.load_text(&format!("doc{index}"), document);
        assert!(problems.is_empty(), "{problems:?}\n{document}");
    }
    let compiled = Compiled::new(&state, settings);
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    let snapshots = compiled.all_node_snapshots(1);
    for pod in &state.pods {
        let (_, bytes) = snapshots
            .iter()
            .find(|(node, _)| Some(node) == pod.node.as_ref())
            .unwrap();
        let snapshot = Snapshot::parse(bytes).unwrap();
        let workload = snapshot
            .workload_by_name(&pod.namespace, &pod.name)
            .unwrap();
        visit(
            &format!("{}/{}", pod.namespace, pod.name),
            &snapshot,
            workload,
        );
    }
}
