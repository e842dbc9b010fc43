//! The `stackroute.dev/v1alpha1` resources, defined once: the CRD YAML, the API server's
//! validation and `stackroute validate` are all derived from these types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every stackroute resource.
pub const GROUP: &str = "stackroute.dev";
/// The only served version.
pub const VERSION: &str = "v1alpha1";

/// Default `spec.priority` when omitted.
pub const DEFAULT_PRIORITY: i32 = 500;

fn default_priority() -> i32 {
    DEFAULT_PRIORITY
}

/// Selects the source pods of a namespace and routes their connections by ordered rules.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stackroute.dev",
    version = "v1alpha1",
    kind = "StackRoute",
    namespaced,
    shortname = "sr",
    category = "stackrouting",
    status = "RouteStatus",
    derive = "PartialEq",
    doc = "StackRoute picks the transport (kernel, kernel+BBR, user-space TCP, RDMA) for connections made by the selected pods of its namespace. Rules are ordered; the first match wins.",
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.rules.all(r, self.rules.exists_one(o, o.name == r.name))").message("rule names must be unique within the object"),
    validation = Rule::new("self.rules.all(r, !has(r.action) || r.action == 'Route')").message("action: Pass is only allowed in a ClusterStackRoute; a StackRoute rule always routes")
)]
#[serde(rename_all = "camelCase")]
pub struct StackRouteSpec {
    /// Order among the StackRoutes of a namespace: lower first (0–1000, default 500).
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,
    /// Source pods in this namespace; `{}` selects all of them.
    #[schemars(schema_with = "label_selector_schema")]
    pub pod_selector: LabelSelector,
    /// Ordered rules; the first that matches a connection decides.
    #[schemars(length(min = 1, max = 25))]
    pub rules: Vec<RouteRule>,
}

/// Cluster-wide routing policy, evaluated before (tier Admin) or after (tier Baseline) the
/// StackRoutes of the source's namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "stackroute.dev",
    version = "v1alpha1",
    kind = "ClusterStackRoute",
    shortname = "csroute",
    category = "stackrouting",
    status = "RouteStatus",
    derive = "PartialEq",
    doc = "ClusterStackRoute routes connections of the selected pods cluster-wide. Tier Admin is evaluated before namespaced StackRoutes, tier Baseline after them.",
    printcolumn(name = "Tier", type_ = "string", json_path = ".spec.tier"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Programmed",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Programmed\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(
    validation = Rule::new("self.rules.all(r, self.rules.exists_one(o, o.name == r.name))").message("rule names must be unique within the object")
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStackRouteSpec {
    /// `Admin` rules come before every StackRoute, `Baseline` rules after them.
    pub tier: Tier,
    /// Order within the tier: lower first (0–1000, default 500).
    #[serde(default = "default_priority")]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: i32,
    /// The source pods this policy applies to.
    pub subject: Subject,
    /// Ordered rules; the first that matches decides, a matching `Pass` rule ends the tier.
    #[schemars(length(min = 1, max = 25))]
    pub rules: Vec<RouteRule>,
}

/// Tier of a ClusterStackRoute.
#[derive(
    JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum Tier {
    /// Evaluated before the namespaced StackRoutes.
    Admin,
    /// Evaluated after the namespaced StackRoutes.
    Baseline,
}

/// Source pods of a ClusterStackRoute: exactly one of `namespaces` or `pods`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("has(self.namespaces) != has(self.pods)").message("subject must set exactly one of namespaces or pods")
)]
#[serde(rename_all = "camelCase")]
pub struct Subject {
    /// Every pod of the namespaces this selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_label_selector_schema")]
    pub namespaces: Option<LabelSelector>,
    /// Pods selected by namespace and pod labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodSelectorPair>,
}

/// Pods selected by the labels of their namespace and their own labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PodSelectorPair {
    /// Namespaces to look in. Omitted: the policy's own namespace for a StackRoute peer, every
    /// namespace for a ClusterStackRoute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_label_selector_schema")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods within those namespaces; `{}` selects all.
    #[schemars(schema_with = "label_selector_schema")]
    pub pod_selector: LabelSelector,
}

/// One routing rule.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("has(self.transport) != (has(self.action) && self.action == 'Pass')").message("transport is required on a Route rule and not allowed on a Pass rule"),
    validation = Rule::new("!(self.location in ['SameNode', 'SameZone']) || (has(self.to) && self.to.all(p, has(p.pods)))").message("location SameNode or SameZone requires every peer in 'to' to be a pods peer"),
    validation = Rule::new("self.isolation != 'KernelEnforced' || !has(self.transport) || (self.transport.stack == 'Kernel' && (!has(self.transport.fallback) || self.transport.fallback.all(f, f.stack == 'Kernel')))").message("isolation KernelEnforced allows only the Kernel stack in transport and fallback"),
    validation = Rule::new("self.isolation != 'Dedicated' || !has(self.transport) || (self.transport.stack != 'Kernel' && (!has(self.transport.fallback) || self.transport.fallback.all(f, f.stack != 'Kernel')))").message("isolation Dedicated forbids the Kernel stack in transport and fallback"),
    validation = Rule::new("self.location != 'External' || !has(self.transport) || (self.transport.stack != 'RDMA' && (!has(self.transport.fallback) || self.transport.fallback.all(f, f.stack != 'RDMA')))").message("RDMA cannot reach External destinations; use location SameNode, SameZone or SameCluster")
)]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// Name, unique within the object; shown by `stackroute explain` and in metrics.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// `Route` (default) decides the transport; `Pass` (ClusterStackRoute only) ends the tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<Action>,
    /// Destination peers, any of which may match. Omitted: any destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub to: Option<Vec<Peer>>,
    /// Destination ports. Omitted: every port of every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 25))]
    pub ports: Option<Vec<PortRange>>,
    /// Where the destination must be, seen from the source. Nested: SameNode ⊂ SameZone ⊂ SameCluster.
    #[serde(default)]
    pub location: Location,
    /// What the connection's stack must guarantee.
    #[serde(default)]
    pub isolation: Isolation,
    /// The transport to use, with its fallbacks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
}

/// Whether a matching rule routes or passes to the next tier.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Action {
    /// Use this rule's transport.
    #[default]
    Route,
    /// Skip the rest of this ClusterStackRoute tier.
    Pass,
}

/// A destination peer: exactly one of `pods`, `networks` or `entity`.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("(has(self.pods) ? 1 : 0) + (has(self.networks) ? 1 : 0) + (has(self.entity) ? 1 : 0) == 1").message("a peer must set exactly one of pods, networks or entity")
)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    /// Pods selected by namespace and pod labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pods: Option<PodSelectorPair>,
    /// IPv4 or IPv6 CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self.all(c, isCIDR(c))").message("networks must be CIDRs such as 10.0.0.0/8 or fd00::/8"))]
    #[schemars(length(min = 1, max = 25))]
    pub networks: Option<Vec<String>>,
    /// A class of destination without labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<Entity>,
}

/// Destinations named by where they are rather than by labels.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entity {
    /// Everything outside the cluster (location External).
    World,
    /// Every pod, node and cluster network address (any location but External).
    Cluster,
}

/// A port or port range of one protocol.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[x_kube(
    validation = Rule::new("!has(self.endPort) || (has(self.port) && self.endPort >= self.port)").message("endPort requires port and must be greater than or equal to it")
)]
#[serde(rename_all = "camelCase")]
pub struct PortRange {
    /// TCP (default) or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// First port. Omitted: every port of the protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Last port of the range, inclusive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub end_port: Option<i32>,
}

/// Transport protocol of a connection.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    /// TCP.
    #[default]
    TCP,
    /// UDP.
    UDP,
}

/// Where a destination is as seen from the source pod.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Location {
    /// A pod on the source's node, or that node's own address.
    SameNode,
    /// A pod or node in the source node's `topology.kubernetes.io/zone`.
    SameZone,
    /// Any pod or node, or an address in the configured cluster networks.
    SameCluster,
    /// Everything else.
    External,
    /// No constraint.
    #[default]
    Any,
}

/// The guarantee a rule's connections need from their stack.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Isolation {
    /// Any stack.
    #[default]
    None,
    /// Kernel stacks only, so CNI NetworkPolicy and conntrack see the traffic.
    KernelEnforced,
    /// A device-backed or per-pod stack; never a silent kernel fallback.
    Dedicated,
}

/// A stack, its congestion control, and the transports to try when it is unavailable.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[x_kube(
    validation = Rule::new("self.stack != 'RDMA' || self.congestionControl == 'Default'").message("RDMA takes no congestionControl")
)]
#[serde(rename_all = "camelCase")]
pub struct Transport {
    /// Which stack carries the connection.
    pub stack: Stack,
    /// Congestion control for TCP stacks.
    #[serde(default)]
    pub congestion_control: CongestionControl,
    /// Tried in order when this transport is unavailable at either end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4))]
    pub fallback: Option<Vec<FallbackTransport>>,
}

/// One entry of a fallback list.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[x_kube(
    validation = Rule::new("self.stack != 'RDMA' || self.congestionControl == 'Default'").message("RDMA takes no congestionControl")
)]
#[serde(rename_all = "camelCase")]
pub struct FallbackTransport {
    /// Which stack carries the connection.
    pub stack: Stack,
    /// Congestion control for TCP stacks.
    #[serde(default)]
    pub congestion_control: CongestionControl,
}

/// A network stack a connection can run on.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stack {
    /// The Linux kernel's TCP/IP stack.
    Kernel,
    /// stackroute's user-space TCP/IP stack.
    Userspace,
    /// RDMA (RoCE); needs both ends.
    RDMA,
}

/// TCP congestion control algorithm.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum CongestionControl {
    /// Whatever the stack uses by default.
    #[default]
    Default,
    /// CUBIC (RFC 9438).
    Cubic,
    /// BBR.
    BBR,
    /// Reno/NewReno (RFC 5681/6582).
    Reno,
}

/// Status of a StackRoute or ClusterStackRoute: conditions and aggregate counts only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Accepted`, `Programmed`, `Shadowed` and `NetworkPolicyGated`, each with its own
    /// observedGeneration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// How many pods the object selects as sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_pods: Option<i64>,
    /// How many nodes host selected pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_nodes: Option<i64>,
    /// How many of those nodes acknowledged the revision holding this generation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed_nodes: Option<i64>,
    /// How many rules can never match because earlier rules cover them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadowed_rules: Option<i64>,
}

fn label_selector_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<LabelSelector>();
    // `{}` is meaningful (select everything), so the API server must keep an empty object.
    schema.insert("type".into(), "object".into());
    schema
}

fn optional_label_selector_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = label_selector_schema(generator);
    schema.insert("nullable".into(), true.into());
    schema
}
