//! The cluster state the engine reads, loaded from plain Kubernetes YAML — exactly what
//! `kubectl get … -o yaml` prints: single objects, `List`s, or multi-document streams.
//!
//! Loading never stops at the first bad object: every problem is collected with its file and
//! line, and everything else is kept. Invalid StackRoutes and ClusterStackRoutes are reported
//! and left out of the state, as the API server would have refused them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy as K8sNetworkPolicy;
use serde::Deserialize;
use serde_json::Value;
use stackroute_api::validate::{RouteKind, validate_object};
use stackroute_api::{ClusterStackRoute, StackRoute};

use crate::netpol::{self, NetworkPolicy, UnreadablePolicy};
use crate::selector::Labels;

/// Label that carries a node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Label Kubernetes puts on every namespace.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    /// Name.
    pub name: String,
    /// `topology.kubernetes.io/zone`, if labelled.
    pub zone: Option<String>,
    /// InternalIP and ExternalIP addresses.
    pub addresses: Vec<IpAddr>,
}

/// A pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// `status.podIPs` (or `podIP`).
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: its addresses are the node's.
    pub host_network: bool,
}

/// A port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    /// Port name (may be empty).
    pub name: String,
    /// Port on the ClusterIP.
    pub port: u16,
    /// TCP or UDP.
    pub protocol: stackroute_snapshot::Protocol,
}

/// A Service with a ClusterIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// ClusterIPs.
    pub cluster_ips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePortInfo>,
}

/// An EndpointSlice, reduced to its ready endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSliceInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Service it belongs to.
    pub service: String,
    /// `(name, port, protocol)` of each port.
    pub ports: Vec<(String, u16, stackroute_snapshot::Protocol)>,
    /// Addresses of ready endpoints.
    pub addresses: Vec<IpAddr>,
}

/// Everything the engine reads.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    /// Namespace name → labels.
    pub namespaces: BTreeMap<String, Labels>,
    /// Nodes.
    pub nodes: Vec<NodeInfo>,
    /// Pods.
    pub pods: Vec<PodInfo>,
    /// Services.
    pub services: Vec<ServiceInfo>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<EndpointSliceInfo>,
    /// Valid StackRoutes.
    pub stack_routes: Vec<StackRoute>,
    /// Valid ClusterStackRoutes.
    pub cluster_stack_routes: Vec<ClusterStackRoute>,
    /// `networking.k8s.io/v1` NetworkPolicies, read and checked.
    pub network_policies: Vec<NetworkPolicy>,
    /// NetworkPolicies that could not be read: their namespaces' flows are undecidable.
    pub unreadable_network_policies: Vec<UnreadablePolicy>,
    /// Network policy objects of kinds the engine cannot evaluate
    /// ([`netpol::is_foreign_policy`]), as `Kind/namespace/name`: while any is present, every
    /// NetworkPolicy decision is undecidable.
    pub foreign_policies: Vec<String>,
}

/// A problem found while loading, located as precisely as the input allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadProblem {
    /// File (or other source name).
    pub source: String,
    /// 1-based line where the document or object starts, when known.
    pub line: Option<usize>,
    /// `Kind/namespace/name` or `Kind/name`, when known.
    pub object: Option<String>,
    /// Field path within the object, when known.
    pub path: Option<String>,
    /// What is wrong.
    pub message: String,
    /// Whether this is an invalid StackRoute/ClusterStackRoute (as opposed to unreadable input).
    pub invalid_policy: bool,
}

impl std::fmt::Display for LoadProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.object {
            // A source that is one object (the controller's Kubernetes mode names each object's
            // source `Kind/namespace/name`): its name says it all, a line would say nothing.
            Some(object) if *object == self.source => write!(f, "{object}")?,
            object => {
                write!(f, "{}", self.source)?;
                if let Some(line) = self.line {
                    write!(f, ":{line}")?;
                }
                if let Some(object) = object {
                    write!(f, ": {object}")?;
                }
            }
        }
        if let Some(path) = &self.path {
            write!(f, ": {path}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One YAML document with where it started.
#[derive(Clone, Debug)]
pub struct Document {
    /// 1-based line of the document's first line.
    pub line: usize,
    /// The parsed value.
    pub value: Value,
}

/// Splits a YAML stream into documents. A syntax error is reported with its line; documents
/// before it are kept.
pub fn parse_documents(source: &str, text: &str) -> (Vec<Document>, Vec<LoadProblem>) {
    let starts = document_start_lines(text);
    let mut documents = Vec::new();
    let mut problems = Vec::new();
    for (index, document) in yaml_serde::Deserializer::from_str(text).enumerate() {
        let line = starts.get(index).copied().unwrap_or(1);
        match Value::deserialize(document) {
            Ok(Value::Null) => {}
            Ok(value) => documents.push(Document { line, value }),
            Err(error) => {
                let line = error.location().map_or(line, |l| l.line());
                problems.push(LoadProblem {
                    source: source.to_string(),
                    line: Some(line),
                    object: None,
                    path: None,
                    message: format!("invalid YAML: {error}"),
                    invalid_policy: false,
                });
                break; // the parser cannot resynchronise after a syntax error
            }
        }
    }
    (documents, problems)
}

/// Line numbers where each document of a stream starts, one per document the YAML parser
/// yields (empty documents included, so indexes line up).
fn document_start_lines(text: &str) -> Vec<usize> {
    // A segment is the text between `---` separators; the first counts only if it has content.
    let mut segments: Vec<(usize, Option<usize>)> = vec![(1, None)];
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.starts_with("---") {
            segments.push((number + 1, None));
            continue;
        }
        let content = !line.trim().is_empty() && !line.trim_start().starts_with('#');
        if let Some(last) = segments.last_mut()
            && content
            && last.1.is_none()
        {
            last.1 = Some(number);
        }
    }
    let first_has_content = segments.first().is_some_and(|s| s.1.is_some());
    segments
        .into_iter()
        .enumerate()
        .filter(|(index, _)| *index > 0 || first_has_content)
        .map(|(_, (start, content))| content.unwrap_or(start))
        .collect()
}

impl ClusterState {
    /// Adds every object of one file's text; returns the problems found.
    pub fn load_text(&mut self, source: &str, text: &str) -> Vec<LoadProblem> {
        let (documents, mut problems) = parse_documents(source, text);
        for document in documents {
            self.add_value(source, document.line, document.value, &mut problems);
        }
        problems
    }

    fn add_value(
        &mut self,
        source: &str,
        line: usize,
        value: Value,
        problems: &mut Vec<LoadProblem>,
    ) {
        let problem = |object: Option<String>,
                       path: Option<String>,
                       message: String,
                       invalid_policy: bool| LoadProblem {
            source: source.to_string(),
            line: Some(line),
            object,
            path,
            message,
            invalid_policy,
        };
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let kind = value
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let namespace = value
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        let label = match &namespace {
            Some(ns) => format!("{kind}/{ns}/{name}"),
            None => format!("{kind}/{name}"),
        };
        if kind.is_empty() {
            problems.push(problem(None, None, "document has no kind".into(), false));
            return;
        }
        if kind == "List" || kind.ends_with("List") && value.get("items").is_some() {
            let mut value = value;
            match value.get_mut("items").map(Value::take) {
                Some(Value::Array(items)) => {
                    for item in items {
                        self.add_value(source, line, item, problems);
                    }
                }
                _ => problems.push(problem(
                    Some(kind),
                    Some("items".into()),
                    "a List needs an items array".into(),
                    false,
                )),
            }
            return;
        }
        if let Some(route_kind) = RouteKind::of(&api_version, &kind) {
            let found = validate_object(route_kind, &value);
            if !found.is_empty() {
                for p in found {
                    problems.push(problem(Some(label.clone()), Some(p.path), p.message, true));
                }
                return;
            }
            let result = match route_kind {
                RouteKind::StackRoute => {
                    serde_json::from_value::<StackRoute>(value).map(|mut sr| {
                        sr.metadata
                            .namespace
                            .get_or_insert_with(|| "default".to_string());
                        self.stack_routes.push(sr)
                    })
                }
                RouteKind::ClusterStackRoute => serde_json::from_value::<ClusterStackRoute>(value)
                    .map(|csr| self.cluster_stack_routes.push(csr)),
            };
            if let Err(error) = result {
                problems.push(problem(Some(label), None, error.to_string(), true));
            }
            return;
        }
        if (api_version.as_str(), kind.as_str()) == (netpol::API_VERSION, "NetworkPolicy") {
            let read = serde_json::from_value::<K8sNetworkPolicy>(value)
                .map_err(|error| (None, error.to_string()))
                .and_then(|policy| {
                    NetworkPolicy::from_k8s(&policy)
                        .map_err(|(path, message)| (Some(path), message))
                });
            match read {
                Ok(policy) => self.network_policies.push(policy),
                Err((path, message)) => {
                    // Kept as unreadable rather than dropped: a policy left out could only
                    // make its pods look less isolated than they are.
                    self.unreadable_network_policies.push(UnreadablePolicy {
                        namespace: namespace.clone().unwrap_or_else(|| "default".into()),
                        object: label.clone(),
                        message: message.clone(),
                    });
                    problems.push(problem(Some(label), path, message, false));
                }
            }
            return;
        }
        if netpol::is_foreign_policy(&api_version, &kind) {
            self.foreign_policies.push(label);
            return;
        }
        let result = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => {
                serde_json::from_value::<Namespace>(value).map(|ns| self.add_namespace(ns))
            }
            ("v1", "Node") => serde_json::from_value::<Node>(value).map(|node| self.add_node(node)),
            ("v1", "Pod") => serde_json::from_value::<Pod>(value).map(|pod| self.add_pod(pod)),
            ("v1", "Service") => {
                serde_json::from_value::<Service>(value).map(|svc| self.add_service(svc))
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                serde_json::from_value::<EndpointSlice>(value)
                    .map(|slice| self.add_endpoint_slice(slice))
            }
            // Kubernetes < 1.21 serves only v1beta1. What is read here (addresses,
            // conditions.ready, ports, the service-name label) has v1's shape; v1beta1's
            // `topology` map is not read (v1 ignores it as an unknown field).
            (ENDPOINT_SLICE_V1BETA1, "EndpointSlice") => {
                serde_json::from_value::<EndpointSlice>(endpoint_slice_as_v1(value))
                    .map(|slice| self.add_endpoint_slice(slice))
            }
            _ => Ok(()), // other kinds carry nothing the engine reads
        };
        if let Err(error) = result {
            problems.push(problem(Some(label), None, error.to_string(), false));
        }
    }

    fn add_namespace(&mut self, namespace: Namespace) {
        let name = namespace.metadata.name.unwrap_or_default();
        let mut labels = namespace.metadata.labels.unwrap_or_default();
        labels
            .entry(NAMESPACE_NAME_LABEL.to_string())
            .or_insert_with(|| name.clone());
        self.namespaces.insert(name, labels);
    }

    fn add_node(&mut self, node: Node) {
        let labels = node.metadata.labels.unwrap_or_default();
        let addresses = node
            .status
            .and_then(|s| s.addresses)
            .unwrap_or_default()
            .into_iter()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        self.nodes.push(NodeInfo {
            name: node.metadata.name.unwrap_or_default(),
            zone: labels.get(ZONE_LABEL).cloned(),
            addresses,
        });
    }

    fn add_pod(&mut self, pod: Pod) {
        let status = pod.status.unwrap_or_default();
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(status.pod_ip.and_then(|ip| ip.parse::<IpAddr>().ok()));
        }
        let spec = pod.spec.unwrap_or_default();
        self.pods.push(PodInfo {
            namespace: pod.metadata.namespace.unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.unwrap_or_default(),
            labels: pod.metadata.labels.unwrap_or_default(),
            node: spec.node_name,
            ips,
            host_network: spec.host_network.unwrap_or(false),
        });
    }

    fn add_service(&mut self, service: Service) {
        let spec = service.spec.unwrap_or_default();
        let mut cluster_ips: Vec<IpAddr> = spec
            .cluster_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        if cluster_ips.is_empty() {
            cluster_ips.extend(spec.cluster_ip.and_then(|ip| ip.parse::<IpAddr>().ok()));
        }
        let ports = spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                Some(ServicePortInfo {
                    name: p.name.unwrap_or_default(),
                    port: u16::try_from(p.port).ok()?,
                    protocol: protocol_of(p.protocol.as_deref())?,
                })
            })
            .collect();
        self.services.push(ServiceInfo {
            namespace: service
                .metadata
                .namespace
                .unwrap_or_else(|| "default".into()),
            name: service.metadata.name.unwrap_or_default(),
            cluster_ips,
            ports,
        });
    }

    fn add_endpoint_slice(&mut self, slice: EndpointSlice) {
        let labels = slice.metadata.labels.unwrap_or_default();
        let addresses = slice
            .endpoints
            .iter()
            .flatten()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .flat_map(|e| e.addresses.iter().filter_map(|a| a.parse().ok()))
            .collect();
        let ports = slice
            .ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| {
                Some((
                    p.name.unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                    protocol_of(p.protocol.as_deref())?,
                ))
            })
            .collect();
        self.endpoint_slices.push(EndpointSliceInfo {
            namespace: slice.metadata.namespace.unwrap_or_else(|| "default".into()),
            name: slice.metadata.name.unwrap_or_default(),
            service: labels.get(SERVICE_NAME_LABEL).cloned().unwrap_or_default(),
            ports,
            addresses,
        });
    }

    /// Labels of a namespace. A namespace referenced by a pod but never listed still has its
    /// `kubernetes.io/metadata.name` label, as on a real cluster.
    pub fn namespace_labels(&self, namespace: &str) -> Labels {
        self.namespaces.get(namespace).cloned().unwrap_or_else(|| {
            Labels::from([(NAMESPACE_NAME_LABEL.to_string(), namespace.to_string())])
        })
    }

    /// Adds every object of `other` (what a controller does with the states of its sources).
    pub fn extend_from(&mut self, other: &Self) {
        self.namespaces.extend(
            other
                .namespaces
                .iter()
                .map(|(name, labels)| (name.clone(), labels.clone())),
        );
        self.nodes.extend(other.nodes.iter().cloned());
        self.pods.extend(other.pods.iter().cloned());
        self.services.extend(other.services.iter().cloned());
        self.endpoint_slices
            .extend(other.endpoint_slices.iter().cloned());
        self.stack_routes.extend(other.stack_routes.iter().cloned());
        self.cluster_stack_routes
            .extend(other.cluster_stack_routes.iter().cloned());
        self.network_policies
            .extend(other.network_policies.iter().cloned());
        self.unreadable_network_policies
            .extend(other.unreadable_network_policies.iter().cloned());
        self.foreign_policies
            .extend(other.foreign_policies.iter().cloned());
    }

    /// Finds a pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodInfo> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }
}

/// `apiVersion` of the EndpointSlices of Kubernetes 1.17–1.20 (and still served up to 1.24).
pub const ENDPOINT_SLICE_V1BETA1: &str = "discovery.k8s.io/v1beta1";

/// A `discovery.k8s.io/v1beta1` EndpointSlice relabelled as v1, which has the same shape in
/// every field the engine reads (the v1 type refuses any other `apiVersion`).
fn endpoint_slice_as_v1(mut value: Value) -> Value {
    if let Some(map) = value.as_object_mut() {
        map.insert(
            "apiVersion".into(),
            Value::String("discovery.k8s.io/v1".into()),
        );
    }
    value
}

fn protocol_of(protocol: Option<&str>) -> Option<stackroute_snapshot::Protocol> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(stackroute_snapshot::Protocol::Tcp),
        "UDP" => Some(stackroute_snapshot::Protocol::Udp),
        _ => None, // SCTP: not routed by stackroute
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lines_are_found() {
        let text = "# comment\napiVersion: v1\nkind: Namespace\n---\n\n---\n# c\nkind: Pod\n---\nkind: Node\n";
        let (documents, problems) = parse_documents("f.yaml", text);
        assert!(problems.is_empty());
        assert_eq!(documents.len(), 3);
        assert_eq!(document_start_lines(text), vec![2, 5, 8, 10]);
    }

    #[test]
    fn loads_lists_and_reports_bad_objects_with_location() {
        let text = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: shop, labels: {team: a}}
- apiVersion: v1
  kind: Pod
  metadata: {name: web-0, namespace: shop, labels: {app: web}}
  spec: {nodeName: n1, containers: []}
  status: {podIPs: [{ip: 10.0.0.5}]}
---
apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {}
  rules:
  - name: r
    ports: [{port: 90, endPort: 80}]
    transport: {stack: Kernel}
---
apiVersion: v1
kind: Pod
metadata: {name: broken}
spec: {containers: "not a list"}
"#;
        let mut state = ClusterState::default();
        let problems = state.load_text("state.yaml", text);
        assert_eq!(state.pods.len(), 1);
        assert_eq!(
            state
                .namespace_labels("shop")
                .get("team")
                .map(String::as_str),
            Some("a")
        );
        assert_eq!(
            state
                .namespace_labels("shop")
                .get(NAMESPACE_NAME_LABEL)
                .map(String::as_str),
            Some("shop")
        );
        assert!(state.stack_routes.is_empty());
        let rendered: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(rendered.len(), 2, "{rendered:?}");
        assert!(
            rendered[0]
                .starts_with("state.yaml:14: StackRoute/shop/bad: spec.rules[0].ports[0]: endPort"),
            "{rendered:?}"
        );
        assert!(
            rendered[1].starts_with("state.yaml:24: Pod/broken:"),
            "{rendered:?}"
        );
    }

    const SLICE_V1BETA1: &str = r#"
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv4
endpoints:
- addresses: [10.244.0.5]
  conditions: {ready: true}
  topology: {kubernetes.io/hostname: n1, topology.kubernetes.io/zone: z1}
  targetRef: {kind: Pod, namespace: shop, name: web-0}
- addresses: [10.244.0.6]
  conditions: {ready: false}
  topology: {kubernetes.io/hostname: n1}
- addresses: [10.244.0.7]
  topology: {kubernetes.io/hostname: n2}
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 53, protocol: UDP}
- {name: sctp, port: 9, protocol: SCTP}
"#;

    #[test]
    fn v1beta1_endpoint_slices_load_like_v1() {
        let mut beta = ClusterState::default();
        let problems = beta.load_text("slices.yaml", SLICE_V1BETA1);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            beta.endpoint_slices,
            vec![EndpointSliceInfo {
                namespace: "shop".into(),
                name: "web-abc12".into(),
                service: "web".into(),
                ports: vec![
                    ("http".into(), 8080, stackroute_snapshot::Protocol::Tcp),
                    ("dns".into(), 53, stackroute_snapshot::Protocol::Udp),
                ],
                // Ready, and unknown readiness (counted as ready, as in v1); not the unready one.
                addresses: vec!["10.244.0.5".parse().unwrap(), "10.244.0.7".parse().unwrap()],
            }]
        );
        // The same slice as v1 (topology becomes nodeName/zone there) loads to the same.
        let v1 = SLICE_V1BETA1
            .replace("discovery.k8s.io/v1beta1", "discovery.k8s.io/v1")
            .replace(
                "topology: {kubernetes.io/hostname: n1, topology.kubernetes.io/zone: z1}",
                "nodeName: n1\n  zone: z1",
            )
            .replace("topology: {kubernetes.io/hostname: n1}", "nodeName: n1")
            .replace("topology: {kubernetes.io/hostname: n2}", "nodeName: n2");
        let mut stable = ClusterState::default();
        let problems = stable.load_text("slices.yaml", &v1);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(stable.endpoint_slices, beta.endpoint_slices);
    }

    #[test]
    fn a_broken_v1beta1_endpoint_slice_is_reported_like_any_object() {
        let text = SLICE_V1BETA1.replace("addresses: [10.244.0.5]", "addresses: 10.244.0.5");
        let mut state = ClusterState::default();
        let problems = state.load_text("slices.yaml", &text);
        assert!(state.endpoint_slices.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].object.as_deref(),
            Some("EndpointSlice/shop/web-abc12")
        );
        assert!(!problems[0].invalid_policy);
        // Unknown EndpointSlice versions carry nothing the engine reads, as before.
        let mut state = ClusterState::default();
        let alpha = SLICE_V1BETA1.replace("v1beta1", "v1alpha1");
        assert!(state.load_text("slices.yaml", &alpha).is_empty());
        assert!(state.endpoint_slices.is_empty());
    }

    #[test]
    fn a_source_that_is_one_object_is_named_once() {
        let text = SLICE_V1BETA1.replace("addresses: [10.244.0.5]", "addresses: 10.244.0.5");
        let mut state = ClusterState::default();
        let problems = state.load_text("EndpointSlice/shop/web-abc12", &text);
        assert_eq!(problems.len(), 1, "{problems:?}");
        let rendered = problems[0].to_string();
        assert!(
            rendered.starts_with("EndpointSlice/shop/web-abc12: invalid type"),
            "{rendered}"
        );
    }

    #[test]
    fn syntax_errors_carry_a_line() {
        let (_, problems) = parse_documents("x.yaml", "kind: Pod\nmetadata: {name: [\n");
        assert_eq!(problems.len(), 1);
        assert!(problems[0].line.is_some());
        assert!(
            problems[0].to_string().contains("invalid YAML"),
            "{}",
            problems[0]
        );
    }
}
