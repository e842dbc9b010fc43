//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`): a model of the objects and an evaluator
//! of flows, for the gate that keeps kernel-bypass stacks to the flows NetworkPolicy allows
//! (see `compile`; the README's "NetworkPolicy and kernel bypass").
//!
//! Semantics, exactly Kubernetes':
//! - A pod is *isolated for ingress* (egress) iff some NetworkPolicy of its namespace selects it
//!   (`podSelector`; `{}` or absent selects every pod of the namespace) and has `Ingress`
//!   (`Egress`) in its `policyTypes`. Without `policyTypes`: `Ingress` always, `Egress` when the
//!   policy has egress rules.
//! - A direction that is not isolated allows every flow. An isolated direction allows a flow iff
//!   some rule of some policy selecting the pod allows it: policies are a union, never an
//!   override, and an isolated pod without any rule is "default deny".
//! - A rule allows a flow when one of its peers matches the other end (`from`/`to` absent or
//!   empty: every peer) and one of its ports matches (`ports` absent or empty: every port of every
//!   protocol).
//! - Peers: `podSelector` alone: pods of the policy's own namespace; `namespaceSelector` alone:
//!   every pod of the matching namespaces; both: the pods matching `podSelector` in the matching
//!   namespaces; `ipBlock`: the addresses in `cidr` and in none of `except`.
//! - Ports: `protocol` (TCP by default), `port` (a number or a name), `endPort` (with a numeric
//!   `port`, an inclusive range). No `port`: every port of the protocol.
//! - A flow is allowed iff the source's egress AND the destination's ingress allow it.
//!
//! Where Kubernetes leaves the choice to the network plugin, the evaluator takes the side that can
//! only deny more, because the gate's mistakes must be denials:
//! - `ipBlock` matches only addresses that are neither a pod's nor a node's. Plugins differ (Calico
//!   matches pod and node addresses against `ipBlock`, Cilium by default matches neither); a peer
//!   only ever *adds* allowed flows, so matching fewer addresses can only deny more.
//! - A `hostNetwork` pod is selected and isolated by the policies of its namespace like any pod
//!   (isolating it can only deny more), but as the peer of another pod it is its node's address,
//!   which only a rule without peers matches.
//! - Traffic from a pod's own node is not treated as always allowed.
//!
//! What cannot be decided is [`Verdict::Undecidable`], never [`Verdict::Allowed`]:
//! - a named port (`port: http`) in a rule that might allow the flow: it names a container port
//!   of the destination pod, which the controller's data does not carry;
//! - a flow from or to a pod of a namespace holding a NetworkPolicy that could not be read;
//! - every flow, when policy kinds the controller cannot evaluate are present
//!   ([`is_foreign_policy`]: AdminNetworkPolicy and BaselineAdminNetworkPolicy, Cilium's and
//!   Calico's policies, and any other `*NetworkPolicy` kind): they can allow what NetworkPolicy
//!   denies and deny what it allows.
//!
//! No I/O: [`NetworkPolicies`] is built from a [`ClusterState`] and answers questions about
//! [`Endpoint`]s.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::networking::v1 as k8s;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use stackroute_snapshot::{Cidr, PortEntry, Protocol};

use crate::selector::{Labels, Selector};
use crate::state::{ClusterState, PodInfo};

/// `apiVersion` of the NetworkPolicies the evaluator reads.
pub const API_VERSION: &str = "networking.k8s.io/v1";

/// Whether an object of `apiVersion`/`kind` is a network policy the evaluator does not
/// understand but a network plugin may enforce: AdminNetworkPolicy, BaselineAdminNetworkPolicy
/// and ClusterNetworkPolicy (`policy.networking.k8s.io`), CiliumNetworkPolicy and
/// CiliumClusterwideNetworkPolicy (`cilium.io`), Calico's NetworkPolicy and GlobalNetworkPolicy
/// (`crd.projectcalico.org`, `projectcalico.org`), Antrea's, MultiNetworkPolicy — every kind
/// named `…NetworkPolicy` other than `networking.k8s.io/v1` NetworkPolicy itself. Their presence
/// makes every gated decision undecidable.
pub fn is_foreign_policy(api_version: &str, kind: &str) -> bool {
    kind.ends_with("NetworkPolicy") && !(api_version == API_VERSION && kind == "NetworkPolicy")
}

/// Transport protocol of a NetworkPolicy port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PortProtocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
    /// SCTP: never a stackroute flow, so such a port allows none of them.
    Sctp,
}

impl PortProtocol {
    fn routed(self) -> Option<Protocol> {
        match self {
            Self::Tcp => Some(Protocol::Tcp),
            Self::Udp => Some(Protocol::Udp),
            Self::Sctp => None,
        }
    }
}

/// One entry of a rule's `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Port {
    /// `first..=last` of a protocol (no `port`: `0..=65535`).
    Numbers {
        /// Protocol.
        protocol: PortProtocol,
        /// First port.
        first: u16,
        /// Last port (`endPort`, else `port`).
        last: u16,
    },
    /// A named container port of the destination pod: cannot be resolved here.
    Named {
        /// Protocol.
        protocol: PortProtocol,
        /// The name.
        name: String,
    },
}

/// One entry of a rule's `from` or `to`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Pods chosen by labels.
    Pods {
        /// Namespaces to look in; `None`: the policy's own namespace.
        namespaces: Option<Selector>,
        /// Pods within them (absent `podSelector`: every pod).
        pods: Selector,
    },
    /// Addresses in `cidr` but in none of `except`.
    IpBlock {
        /// The network.
        cidr: Cidr,
        /// Networks left out.
        except: Vec<Cidr>,
    },
}

/// One ingress or egress rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `from` (ingress) or `to` (egress); `None`: absent or empty, every peer.
    pub peers: Option<Vec<Peer>>,
    /// `ports`; `None`: absent or empty, every port of every protocol.
    pub ports: Option<Vec<Port>>,
}

/// A NetworkPolicy, read and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The pods of the namespace it selects (absent: every pod).
    pub pod_selector: Selector,
    /// Ingress rules when the effective `policyTypes` include `Ingress` (an empty list isolates
    /// and allows nothing); `None` when they do not.
    pub ingress: Option<Vec<Rule>>,
    /// Egress rules when the effective `policyTypes` include `Egress`; `None` when they do not.
    pub egress: Option<Vec<Rule>>,
}

/// A NetworkPolicy that could not be read: every flow from or to a pod of its namespace is
/// undecidable, since it may select any of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnreadablePolicy {
    /// Namespace.
    pub namespace: String,
    /// `NetworkPolicy/namespace/name`.
    pub object: String,
    /// What is wrong.
    pub message: String,
}

/// A problem in a NetworkPolicy: field path and message.
pub type PolicyError = (String, String);

impl NetworkPolicy {
    /// Reads a `networking.k8s.io/v1` NetworkPolicy, refusing what the API server refuses
    /// (a peer with nothing or with `ipBlock` and selectors, a bad CIDR, `endPort` without a
    /// numeric `port` or below it, unknown protocols and policy types, bad selectors).
    pub fn from_k8s(policy: &k8s::NetworkPolicy) -> Result<Self, PolicyError> {
        let namespace = policy
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = policy.metadata.name.clone().unwrap_or_default();
        let spec = policy.spec.clone().unwrap_or_default();
        let pod_selector = match &spec.pod_selector {
            Some(selector) => Selector::parse(selector).map_err(|m| at("spec.podSelector", m))?,
            None => Selector::default(),
        };
        let has_egress_rules = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        let (ingress_type, egress_type) = match spec.policy_types.as_deref() {
            None | Some([]) => (true, has_egress_rules),
            Some(types) => {
                let mut found = (false, false);
                for (index, kind) in types.iter().enumerate() {
                    match kind.as_str() {
                        "Ingress" => found.0 = true,
                        "Egress" => found.1 = true,
                        other => {
                            return Err(at(
                                &format!("spec.policyTypes[{index}]"),
                                format!("unknown policy type {other:?}; use Ingress or Egress"),
                            ));
                        }
                    }
                }
                found
            }
        };
        let ingress = if ingress_type {
            let mut rules = Vec::new();
            for (index, rule) in spec.ingress.iter().flatten().enumerate() {
                let path = format!("spec.ingress[{index}]");
                rules.push(Rule {
                    peers: peers(rule.from.as_deref(), &format!("{path}.from"))?,
                    ports: ports(rule.ports.as_deref(), &format!("{path}.ports"))?,
                });
            }
            Some(rules)
        } else {
            None
        };
        let egress = if egress_type {
            let mut rules = Vec::new();
            for (index, rule) in spec.egress.iter().flatten().enumerate() {
                let path = format!("spec.egress[{index}]");
                rules.push(Rule {
                    peers: peers(rule.to.as_deref(), &format!("{path}.to"))?,
                    ports: ports(rule.ports.as_deref(), &format!("{path}.ports"))?,
                });
            }
            Some(rules)
        } else {
            None
        };
        Ok(Self {
            namespace,
            name,
            pod_selector,
            ingress,
            egress,
        })
    }
}

fn at(path: &str, message: impl Into<String>) -> PolicyError {
    (path.to_string(), message.into())
}

fn peers(
    list: Option<&[k8s::NetworkPolicyPeer]>,
    path: &str,
) -> Result<Option<Vec<Peer>>, PolicyError> {
    let Some(list) = list.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(list.len());
    for (index, peer) in list.iter().enumerate() {
        let path = format!("{path}[{index}]");
        match (&peer.ip_block, &peer.namespace_selector, &peer.pod_selector) {
            (Some(block), None, None) => {
                let cidr = block
                    .cidr
                    .parse::<Cidr>()
                    .map_err(|m| at(&format!("{path}.ipBlock.cidr"), m))?;
                let mut except = Vec::new();
                for (n, text) in block.except.iter().flatten().enumerate() {
                    except.push(
                        text.parse::<Cidr>()
                            .map_err(|m| at(&format!("{path}.ipBlock.except[{n}]"), m))?,
                    );
                }
                out.push(Peer::IpBlock { cidr, except });
            }
            (Some(_), _, _) => {
                return Err(at(
                    &path,
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ));
            }
            (None, None, None) => {
                return Err(at(
                    &path,
                    "a peer must set podSelector, namespaceSelector or ipBlock",
                ));
            }
            (None, namespaces, pods) => out.push(Peer::Pods {
                namespaces: namespaces
                    .as_ref()
                    .map(Selector::parse)
                    .transpose()
                    .map_err(|m| at(&format!("{path}.namespaceSelector"), m))?,
                pods: pods
                    .as_ref()
                    .map(Selector::parse)
                    .transpose()
                    .map_err(|m| at(&format!("{path}.podSelector"), m))?
                    .unwrap_or_default(),
            }),
        }
    }
    Ok(Some(out))
}

fn ports(
    list: Option<&[k8s::NetworkPolicyPort]>,
    path: &str,
) -> Result<Option<Vec<Port>>, PolicyError> {
    let Some(list) = list.filter(|l| !l.is_empty()) else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(list.len());
    for (index, port) in list.iter().enumerate() {
        let path = format!("{path}[{index}]");
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => PortProtocol::Tcp,
            "UDP" => PortProtocol::Udp,
            "SCTP" => PortProtocol::Sctp,
            other => {
                return Err(at(
                    &format!("{path}.protocol"),
                    format!("unknown protocol {other:?}; use TCP, UDP or SCTP"),
                ));
            }
        };
        let number = |n: i32, field: &str| {
            u16::try_from(n).ok().filter(|n| *n >= 1).ok_or_else(|| {
                at(
                    &format!("{path}.{field}"),
                    format!("{n} is not a port (1-65535)"),
                )
            })
        };
        out.push(match (&port.port, port.end_port) {
            (None, None) => Port::Numbers {
                protocol,
                first: 0,
                last: u16::MAX,
            },
            (Some(IntOrString::Int(first)), end) => {
                let first = number(*first, "port")?;
                let last = match end {
                    None => first,
                    Some(end) => number(end, "endPort")?,
                };
                if last < first {
                    return Err(at(
                        &format!("{path}.endPort"),
                        "endPort must be greater than or equal to port",
                    ));
                }
                Port::Numbers {
                    protocol,
                    first,
                    last,
                }
            }
            (Some(IntOrString::String(name)), None) => Port::Named {
                protocol,
                name: name.clone(),
            },
            (_, Some(_)) => {
                return Err(at(
                    &format!("{path}.endPort"),
                    "endPort requires a numeric port",
                ));
            }
        });
    }
    Ok(Some(out))
}

// === addresses ===

/// An address as a number with its family (4 or 6), so ranges can be compared and merged.
type IpKey = (u8, u128);

fn ip_key(ip: IpAddr) -> IpKey {
    match ip.to_canonical() {
        IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (6, u128::from(v6)),
    }
}

fn key_ip((family, value): IpKey) -> IpAddr {
    if family == 4 {
        IpAddr::from(std::net::Ipv4Addr::from(value as u32))
    } else {
        IpAddr::from(std::net::Ipv6Addr::from(value))
    }
}

/// An inclusive range of addresses of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct IpRange {
    family: u8,
    first: u128,
    last: u128,
}

impl IpRange {
    fn of(cidr: &Cidr) -> Self {
        // The family as written: `Cidr::contains` never matches across families either.
        let (family, value) = match cidr.address {
            IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
            IpAddr::V6(v6) => (6, u128::from(v6)),
        };
        let bits: u32 = if family == 4 { 32 } else { 128 };
        let host_bits = bits - u32::from(cidr.prefix).min(bits);
        let host_mask = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        Self {
            family,
            first: value & !host_mask,
            last: value | host_mask,
        }
    }

    fn everything() -> [Self; 2] {
        [
            Self {
                family: 4,
                first: 0,
                last: u128::from(u32::MAX),
            },
            Self {
                family: 6,
                first: 0,
                last: u128::MAX,
            },
        ]
    }
}

/// `ranges` without the parts covered by `minus`.
fn subtract(ranges: &[IpRange], minus: &[IpRange]) -> Vec<IpRange> {
    let mut out = ranges.to_vec();
    for cut in minus {
        let mut next = Vec::with_capacity(out.len() + 1);
        for range in out {
            if range.family != cut.family || cut.last < range.first || cut.first > range.last {
                next.push(range);
                continue;
            }
            if cut.first > range.first {
                next.push(IpRange {
                    last: cut.first - 1,
                    ..range
                });
            }
            if cut.last < range.last {
                next.push(IpRange {
                    first: cut.last + 1,
                    ..range
                });
            }
        }
        out = next;
    }
    out
}

/// A set of destination (or source) addresses that are not pods' or nodes': ranges, minus the
/// pod and node addresses inside them (those are evaluated as pods and nodes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressSet {
    ranges: Vec<IpRange>,
    /// Sorted pod and node addresses, left out of `ranges`.
    known: Vec<IpKey>,
}

impl AddressSet {
    /// One address.
    pub fn ip(ip: IpAddr) -> Self {
        let (family, value) = ip_key(ip);
        Self {
            ranges: vec![IpRange {
                family,
                first: value,
                last: value,
            }],
            known: Vec::new(),
        }
    }

    /// The addresses of `networks` less `without`, except the `known` pod and node addresses.
    pub fn networks(networks: &[Cidr], without: &[Cidr], known: &[IpAddr]) -> Self {
        let ranges: Vec<IpRange> = networks.iter().map(IpRange::of).collect();
        Self::build(ranges, without, known)
    }

    /// Every address less `without`, except the `known` pod and node addresses.
    pub fn everything(without: &[Cidr], known: &[IpAddr]) -> Self {
        Self::build(IpRange::everything().to_vec(), without, known)
    }

    fn build(ranges: Vec<IpRange>, without: &[Cidr], known: &[IpAddr]) -> Self {
        let minus: Vec<IpRange> = without.iter().map(IpRange::of).collect();
        let mut known: Vec<IpKey> = known.iter().map(|ip| ip_key(*ip)).collect();
        known.sort_unstable();
        known.dedup();
        Self {
            ranges: subtract(&ranges, &minus),
            known,
        }
    }

    /// Whether there is no address in the set at all.
    pub fn is_empty(&self) -> bool {
        self.first_outside(&[]).is_none()
    }

    /// The first address of the set (in family, then numeric order) that no range of `covered`
    /// holds, or `None` when they hold all of it.
    fn first_outside(&self, covered: &[IpRange]) -> Option<IpKey> {
        let mut covered = covered.to_vec();
        covered.sort_unstable();
        for range in &self.ranges {
            let mut cursor = range.first;
            loop {
                // The covering range that holds `cursor`, if any: skip past it.
                let holder = covered
                    .iter()
                    .filter(|c| c.family == range.family && c.first <= cursor && cursor <= c.last)
                    .map(|c| c.last)
                    .max();
                if let Some(last) = holder {
                    if last >= range.last {
                        break;
                    }
                    cursor = last + 1;
                    continue;
                }
                // An uncovered stretch from `cursor` to just before the next covering range.
                let gap_end = covered
                    .iter()
                    .filter(|c| c.family == range.family && c.first > cursor)
                    .map(|c| c.first - 1)
                    .min()
                    .unwrap_or(range.last)
                    .min(range.last);
                if let Some(point) = self.first_unknown(range.family, cursor, gap_end) {
                    return Some((range.family, point));
                }
                if gap_end >= range.last {
                    break;
                }
                cursor = gap_end + 1;
            }
        }
        None
    }

    /// The first address of `first..=last` that is not a known pod or node address.
    fn first_unknown(&self, family: u8, first: u128, last: u128) -> Option<u128> {
        let start = self.known.partition_point(|k| *k < (family, first));
        let mut expected = first;
        for &(f, value) in &self.known[start..] {
            if f != family || value > last || value != expected {
                return Some(expected);
            }
            if value == last {
                return None;
            }
            expected = value + 1;
        }
        Some(expected)
    }
}

// === the evaluator ===

/// The outcome for a flow or a set of flows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// NetworkPolicy allows every flow asked about.
    Allowed,
    /// NetworkPolicy denies some flow asked about; why.
    Denied(String),
    /// Some flow cannot be decided from the controller's data; why.
    Undecidable(String),
}

impl Verdict {
    /// Whether every flow is allowed.
    pub fn is_allowed(&self) -> bool {
        *self == Self::Allowed
    }

    /// Why not, when not allowed.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Allowed => None,
            Self::Denied(reason) | Self::Undecidable(reason) => Some(reason),
        }
    }

    /// `allowed`, `denied` or `undecidable`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied(_) => "denied",
            Self::Undecidable(_) => "undecidable",
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason() {
            None => f.write_str("allowed"),
            Some(reason) => write!(f, "{}: {reason}", self.as_str()),
        }
    }
}

/// What the NetworkPolicies say about one pod (or every pod of one identity: same namespace,
/// same labels): which policies isolate it, which pod peers select it. Pods with equal facts
/// are treated alike by every evaluation, so the compiler evaluates once per distinct facts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodFacts {
    /// Policies (indexes) that select it and isolate it for ingress, ascending.
    pub(crate) ingress: Vec<u32>,
    /// Policies that select it and isolate it for egress, ascending.
    pub(crate) egress: Vec<u32>,
    /// Pod peers (indexes, see [`NetworkPolicies::pod_peers`]) that select it, ascending.
    pub(crate) peers: Vec<u32>,
    /// An unreadable NetworkPolicy of its namespace (index), if any.
    pub(crate) unreadable: Option<u32>,
    /// Whether it uses the host's network: to other pods it is its node's address.
    pub(crate) host_network: bool,
}

impl PodFacts {
    /// Whether some policy isolates it for ingress.
    pub fn isolated_for_ingress(&self) -> bool {
        !self.ingress.is_empty()
    }

    /// Whether some policy isolates it for egress.
    pub fn isolated_for_egress(&self) -> bool {
        !self.egress.is_empty()
    }
}

/// One end of a flow.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint<'a> {
    /// A pod, named for messages.
    Pod {
        /// `namespace/name` (or any description).
        name: &'a str,
        /// What the policies say about it.
        facts: &'a PodFacts,
    },
    /// A node's address: never isolated, matched only by rules without peers.
    Node,
    /// Addresses that are neither pods' nor nodes'.
    Addresses(&'a AddressSet),
}

impl Endpoint<'_> {
    fn describe(&self) -> String {
        match self {
            Self::Pod { name, facts } if facts.host_network => {
                format!("pod {name} (hostNetwork: its node's address)")
            }
            Self::Pod { name, .. } => format!("pod {name}"),
            Self::Node => "a node address".into(),
            Self::Addresses(_) => "addresses".into(),
        }
    }
}

/// A pod peer of some rule, numbered: what [`PodFacts::peers`] refers to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodPeer {
    /// The namespace of the policy it belongs to (where `namespaces: None` looks).
    pub(crate) namespace: String,
    /// Namespaces to look in; `None`: the policy's own.
    pub(crate) namespaces: Option<Selector>,
    /// Pods within them.
    pub(crate) pods: Selector,
}

#[derive(Clone, Debug)]
pub(crate) enum PeerRef {
    /// A pod peer, by index ([`NetworkPolicies::pod_peers`]).
    Pods(u32),
    Addresses(Vec<IpRange>),
}

impl PeerRef {
    /// The pod peer's index, for a pod peer.
    pub(crate) fn pod(&self) -> Option<u32> {
        match self {
            Self::Pods(id) => Some(*id),
            Self::Addresses(_) => None,
        }
    }
}

#[derive(Clone, Debug)]
struct IndexedRule {
    /// `None`: every peer.
    peers: Option<Vec<PeerRef>>,
    /// `None`: every port; otherwise the TCP and UDP numbers (SCTP and names left out).
    ports: Option<Vec<PortEntry>>,
    /// Named ports of the rule.
    named: Vec<String>,
}

#[derive(Clone, Debug)]
struct IndexedPolicy {
    object: String,
    ingress: Option<Vec<IndexedRule>>,
    egress: Option<Vec<IndexedRule>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// Every TCP and UDP port: the ports of a rule without `ports`.
pub const ALL_PORTS: [PortEntry; 2] = [
    PortEntry {
        protocol: Protocol::Tcp,
        first: 0,
        last: u16::MAX,
    },
    PortEntry {
        protocol: Protocol::Udp,
        first: 0,
        last: u16::MAX,
    },
];

/// The NetworkPolicies of a cluster, indexed for evaluation.
#[derive(Clone, Debug, Default)]
pub struct NetworkPolicies {
    /// The readable policies, sorted by namespace and name.
    policies: Vec<NetworkPolicy>,
    indexed: Vec<IndexedPolicy>,
    pod_peers: Vec<PodPeer>,
    unreadable: Vec<UnreadablePolicy>,
    foreign: Vec<String>,
}

impl NetworkPolicies {
    /// Indexes the NetworkPolicies of `state`, with its unreadable ones and the foreign policy
    /// objects it holds. Deterministic whatever the order they were loaded in.
    pub fn from_state(state: &ClusterState) -> Self {
        Self::new(
            state.network_policies.clone(),
            state.unreadable_network_policies.clone(),
            state.foreign_policies.clone(),
        )
    }

    /// Indexes `policies`; `unreadable` make their namespaces undecidable, `foreign` (object
    /// names) make everything undecidable.
    pub fn new(
        mut policies: Vec<NetworkPolicy>,
        mut unreadable: Vec<UnreadablePolicy>,
        mut foreign: Vec<String>,
    ) -> Self {
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        unreadable.sort_by(|a, b| a.object.cmp(&b.object));
        foreign.sort();
        foreign.dedup();
        let mut pod_peers = Vec::new();
        let mut index_rules = |rules: &Option<Vec<Rule>>, namespace: &str| {
            rules.as_ref().map(|rules| {
                rules
                    .iter()
                    .map(|rule| IndexedRule {
                        peers: rule.peers.as_ref().map(|peers| {
                            peers
                                .iter()
                                .map(|peer| match peer {
                                    Peer::Pods { namespaces, pods } => {
                                        pod_peers.push(PodPeer {
                                            namespace: namespace.to_string(),
                                            namespaces: namespaces.clone(),
                                            pods: pods.clone(),
                                        });
                                        PeerRef::Pods(pod_peers.len() as u32 - 1)
                                    }
                                    Peer::IpBlock { cidr, except } => PeerRef::Addresses(subtract(
                                        &[IpRange::of(cidr)],
                                        &except.iter().map(IpRange::of).collect::<Vec<_>>(),
                                    )),
                                })
                                .collect()
                        }),
                        ports: rule.ports.as_ref().map(|ports| {
                            ports
                                .iter()
                                .filter_map(|port| match port {
                                    Port::Numbers {
                                        protocol,
                                        first,
                                        last,
                                    } => Some(PortEntry {
                                        protocol: protocol.routed()?,
                                        first: *first,
                                        last: *last,
                                    }),
                                    Port::Named { .. } => None,
                                })
                                .collect()
                        }),
                        named: rule
                            .ports
                            .iter()
                            .flatten()
                            .filter_map(|port| match port {
                                Port::Named { protocol, name } if protocol.routed().is_some() => {
                                    Some(name.clone())
                                }
                                _ => None,
                            })
                            .collect(),
                    })
                    .collect()
            })
        };
        let indexed = policies
            .iter()
            .map(|policy| IndexedPolicy {
                object: format!("{}/{}", policy.namespace, policy.name),
                ingress: index_rules(&policy.ingress, &policy.namespace),
                egress: index_rules(&policy.egress, &policy.namespace),
            })
            .collect();
        Self {
            policies,
            indexed,
            pod_peers,
            unreadable,
            foreign,
        }
    }

    /// Whether there is nothing at all: no NetworkPolicy (readable or not) and no foreign
    /// policy, so no pod is isolated and every flow is allowed.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty() && self.unreadable.is_empty() && self.foreign.is_empty()
    }

    /// The readable policies, in their index order.
    pub fn policies(&self) -> &[NetworkPolicy] {
        &self.policies
    }

    /// The unreadable policies, in their index order.
    pub fn unreadable(&self) -> &[UnreadablePolicy] {
        &self.unreadable
    }

    /// The pod peers of every rule, in their index order.
    pub(crate) fn pod_peers(&self) -> &[PodPeer] {
        &self.pod_peers
    }

    /// The ingress (or egress) rules of policy `policy` as (peers — `None`: every peer —,
    /// ports — `None`: every port; TCP and UDP numbers only): for the compiler's fast path over
    /// pod destinations, which must agree with [`NetworkPolicies::evaluate`].
    pub(crate) fn rules(
        &self,
        policy: u32,
        ingress: bool,
    ) -> impl Iterator<Item = (Option<&[PeerRef]>, Option<&[PortEntry]>)> {
        self.indexed
            .get(policy as usize)
            .and_then(|p| if ingress { &p.ingress } else { &p.egress }.as_ref())
            .into_iter()
            .flatten()
            .map(|rule| (rule.peers.as_deref(), rule.ports.as_deref()))
    }

    /// Why every flow is undecidable, when foreign policy objects are present.
    pub fn foreign_reason(&self) -> Option<String> {
        let (first, rest) = self.foreign.split_first()?;
        let more = match rest.len() {
            0 => String::new(),
            n => format!(" and {n} more"),
        };
        Some(format!(
            "policy objects the controller cannot evaluate are present ({first}{more}): the \
             network plugin may allow or deny differently from NetworkPolicy"
        ))
    }

    /// The facts of a pod in `namespace` (whose labels are `namespace_labels`) with `labels`,
    /// by evaluating every selector. (The compiler computes the same through its label index.)
    pub fn facts(
        &self,
        namespace: &str,
        labels: &Labels,
        namespace_labels: &Labels,
        host_network: bool,
    ) -> PodFacts {
        let mut facts = PodFacts {
            host_network,
            ..PodFacts::default()
        };
        for (index, policy) in self.policies.iter().enumerate() {
            if policy.namespace == namespace && policy.pod_selector.matches(labels) {
                if policy.ingress.is_some() {
                    facts.ingress.push(index as u32);
                }
                if policy.egress.is_some() {
                    facts.egress.push(index as u32);
                }
            }
        }
        for (index, peer) in self.pod_peers.iter().enumerate() {
            let in_namespace = match &peer.namespaces {
                None => peer.namespace == namespace,
                Some(selector) => selector.matches(namespace_labels),
            };
            if in_namespace && peer.pods.matches(labels) {
                facts.peers.push(index as u32);
            }
        }
        facts.unreadable = self
            .unreadable
            .iter()
            .position(|u| u.namespace == namespace)
            .map(|i| i as u32);
        facts
    }

    /// The facts of a pod of `state`.
    pub fn pod_facts(&self, state: &ClusterState, pod: &PodInfo) -> PodFacts {
        self.facts(
            &pod.namespace,
            &pod.labels,
            &state.namespace_labels(&pod.namespace),
            pod.host_network,
        )
    }

    /// Whether NetworkPolicy allows every flow from `from` to `to` on `ports` (an empty list:
    /// no flow, allowed): the source's egress and the destination's ingress must both allow it.
    pub fn evaluate(&self, from: &Endpoint<'_>, to: &Endpoint<'_>, ports: &[PortEntry]) -> Verdict {
        if let Some(reason) = self.foreign_reason() {
            return Verdict::Undecidable(reason);
        }
        let egress = self.direction(Direction::Egress, from, to, ports);
        let ingress = self.direction(Direction::Ingress, to, from, ports);
        match (egress, ingress) {
            (denied @ Verdict::Denied(_), _) | (_, denied @ Verdict::Denied(_)) => denied,
            (undecidable @ Verdict::Undecidable(_), _)
            | (_, undecidable @ Verdict::Undecidable(_)) => undecidable,
            _ => Verdict::Allowed,
        }
    }

    /// Evaluates a connection from a pod of `state` to `ip:port`, the destination classified as
    /// the snapshot's address book does: a scheduled pod's address (not `hostNetwork`), a
    /// node's, or another address.
    pub fn evaluate_connection(
        &self,
        state: &ClusterState,
        from: &PodInfo,
        ip: IpAddr,
        port: u16,
        protocol: Protocol,
    ) -> Verdict {
        let ip = ip.to_canonical();
        let source_facts = self.pod_facts(state, from);
        let source_name = format!("{}/{}", from.namespace, from.name);
        let source = Endpoint::Pod {
            name: &source_name,
            facts: &source_facts,
        };
        let ports = [PortEntry {
            protocol,
            first: port,
            last: port,
        }];
        let destination_pod = state
            .pods
            .iter()
            .find(|p| p.node.is_some() && !p.host_network && p.ips.contains(&ip));
        if let Some(pod) = destination_pod {
            let facts = self.pod_facts(state, pod);
            let name = format!("{}/{}", pod.namespace, pod.name);
            return self.evaluate(
                &source,
                &Endpoint::Pod {
                    name: &name,
                    facts: &facts,
                },
                &ports,
            );
        }
        if state.nodes.iter().any(|n| n.addresses.contains(&ip)) {
            return self.evaluate(&source, &Endpoint::Node, &ports);
        }
        self.evaluate(&source, &Endpoint::Addresses(&AddressSet::ip(ip)), &ports)
    }

    /// One direction: whether the policies of `subject` (egress of the source, ingress of the
    /// destination) allow every flow with `other` on `ports`.
    fn direction(
        &self,
        direction: Direction,
        subject: &Endpoint<'_>,
        other: &Endpoint<'_>,
        ports: &[PortEntry],
    ) -> Verdict {
        let Endpoint::Pod { name, facts } = subject else {
            return Verdict::Allowed; // only pods are isolated
        };
        let what = match direction {
            Direction::Ingress => format!("ingress to pod {name}"),
            Direction::Egress => format!("egress from pod {name}"),
        };
        if let Some(unreadable) = facts
            .unreadable
            .and_then(|u| self.unreadable.get(u as usize))
        {
            return Verdict::Undecidable(format!(
                "{what}: NetworkPolicy {} could not be read ({}) and may select it",
                unreadable.object, unreadable.message
            ));
        }
        let isolating = match direction {
            Direction::Ingress => &facts.ingress,
            Direction::Egress => &facts.egress,
        };
        if isolating.is_empty() {
            return Verdict::Allowed;
        }
        let mut grants: Vec<(Option<&[PortEntry]>, Coverage)> = Vec::new();
        let mut named: Option<(&str, &str)> = None;
        for policy in isolating
            .iter()
            .filter_map(|p| self.indexed.get(*p as usize))
        {
            let rules = match direction {
                Direction::Ingress => &policy.ingress,
                Direction::Egress => &policy.egress,
            };
            for rule in rules.iter().flatten() {
                let coverage = coverage(rule.peers.as_deref(), other);
                if matches!(coverage, Coverage::Nothing) {
                    continue;
                }
                if let Some(port) = rule.named.first() {
                    named.get_or_insert((&policy.object, port));
                }
                grants.push((rule.ports.as_deref(), coverage));
            }
        }
        let Some(gap) = uncovered(ports, other, &grants) else {
            return Verdict::Allowed;
        };
        if let Some((object, port)) = named {
            return Verdict::Undecidable(format!(
                "{what}: NetworkPolicy {object} allows the named port {port:?}, which the \
                 controller cannot resolve (container ports are not in its data)"
            ));
        }
        let objects: Vec<&str> = isolating
            .iter()
            .filter_map(|p| self.indexed.get(*p as usize))
            .map(|p| p.object.as_str())
            .collect();
        let other = match (other, gap.address) {
            (Endpoint::Addresses(_), Some(address)) => format!("address {address}"),
            _ => other.describe(),
        };
        Verdict::Denied(format!(
            "{what} is isolated by NetworkPolicy {}; no rule allows {other} on {}",
            objects.join(", "),
            gap.ports
        ))
    }
}

/// Which part of the other end a rule's peers match.
#[derive(Clone, Debug)]
enum Coverage {
    Nothing,
    All,
    Addresses(Vec<IpRange>),
}

fn coverage(peers: Option<&[PeerRef]>, other: &Endpoint<'_>) -> Coverage {
    let Some(peers) = peers else {
        return Coverage::All;
    };
    match other {
        Endpoint::Pod { facts, .. } if !facts.host_network => {
            let selected = peers.iter().any(|peer| match peer {
                PeerRef::Pods(id) => facts.peers.binary_search(id).is_ok(),
                PeerRef::Addresses(_) => false, // ipBlock never matches a pod (see the module)
            });
            if selected {
                Coverage::All
            } else {
                Coverage::Nothing
            }
        }
        // A hostNetwork pod or a node: its node's address, which no ipBlock matches.
        Endpoint::Pod { .. } | Endpoint::Node => Coverage::Nothing,
        Endpoint::Addresses(_) => {
            let ranges: Vec<IpRange> = peers
                .iter()
                .filter_map(|peer| match peer {
                    PeerRef::Addresses(ranges) => Some(ranges.iter().copied()),
                    PeerRef::Pods(_) => None,
                })
                .flatten()
                .collect();
            if ranges.is_empty() {
                Coverage::Nothing
            } else {
                Coverage::Addresses(ranges)
            }
        }
    }
}

/// A flow no grant allows: its ports (`TCP 80`, `UDP 53-60`) and, for addresses, one address.
struct Gap {
    ports: String,
    address: Option<IpAddr>,
}

/// The first flow of `wanted` × `other` that no grant allows, or `None` when they allow all.
/// Ports are cut at every grant's boundaries, so within one segment every grant either holds
/// all of it or none of it.
fn uncovered(
    wanted: &[PortEntry],
    other: &Endpoint<'_>,
    grants: &[(Option<&[PortEntry]>, Coverage)],
) -> Option<Gap> {
    for want in wanted {
        let mut cuts: BTreeSet<u32> = BTreeSet::new();
        for (ports, _) in grants {
            for port in ports.iter().flat_map(|p| p.iter()) {
                if port.protocol == want.protocol {
                    cuts.insert(u32::from(port.first));
                    cuts.insert(u32::from(port.last) + 1);
                }
            }
        }
        let end = u32::from(want.last) + 1;
        let mut start = u32::from(want.first);
        while start < end {
            let stop = cuts
                .range(start + 1..)
                .next()
                .copied()
                .unwrap_or(end)
                .min(end);
            let (first, last) = (start as u16, (stop - 1) as u16);
            let holding = grants.iter().filter(|(ports, _)| {
                ports.is_none_or(|ports| {
                    ports
                        .iter()
                        .any(|p| p.protocol == want.protocol && p.first <= first && last <= p.last)
                })
            });
            let describe = || {
                if first == last {
                    format!("{} {first}", want.protocol)
                } else {
                    format!("{} {first}-{last}", want.protocol)
                }
            };
            match other {
                Endpoint::Addresses(set) => {
                    let mut ranges = Vec::new();
                    let mut all = false;
                    for (_, coverage) in holding {
                        match coverage {
                            Coverage::All => all = true,
                            Coverage::Addresses(r) => ranges.extend_from_slice(r),
                            Coverage::Nothing => {}
                        }
                    }
                    if !all && let Some(address) = set.first_outside(&ranges) {
                        return Some(Gap {
                            ports: describe(),
                            address: Some(key_ip(address)),
                        });
                    }
                }
                _ => {
                    let mut holding = holding;
                    if !holding.any(|(_, c)| matches!(c, Coverage::All)) {
                        return Some(Gap {
                            ports: describe(),
                            address: None,
                        });
                    }
                }
            }
            start = stop;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Cidr {
        text.parse().unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn ranges_subtract_and_cover() {
        let left = subtract(
            &[IpRange::of(&cidr("10.0.0.0/8"))],
            &[IpRange::of(&cidr("10.1.0.0/16"))],
        );
        assert_eq!(left.len(), 2);
        let set = AddressSet::networks(&[cidr("10.0.0.0/8")], &[], &[]);
        assert_eq!(set.first_outside(&left), Some(ip_key(ip("10.1.0.0"))));
        // The hole holds only known pod addresses: nothing else is left uncovered.
        let holed = AddressSet::networks(
            &[cidr("10.1.0.0/30")],
            &[],
            &[
                ip("10.1.0.0"),
                ip("10.1.0.1"),
                ip("10.1.0.2"),
                ip("10.1.0.3"),
            ],
        );
        assert_eq!(holed.first_outside(&[]), None);
        assert!(holed.is_empty());
        let one_free = AddressSet::networks(
            &[cidr("10.1.0.0/30")],
            &[],
            &[ip("10.1.0.0"), ip("10.1.0.2")],
        );
        assert_eq!(one_free.first_outside(&[]), Some(ip_key(ip("10.1.0.1"))));
        // The whole IPv6 space, and IPv4-mapped addresses counted as IPv4.
        let all = AddressSet::everything(&[], &[]);
        assert_eq!(all.first_outside(&IpRange::everything()), None);
        assert_eq!(all.first_outside(&[IpRange::everything()[0]]), Some((6, 0)));
        assert_eq!(ip_key(ip("::ffff:10.0.0.1")), ip_key(ip("10.0.0.1")));
        let v4_edge = AddressSet::ip(ip("255.255.255.255"));
        assert_eq!(v4_edge.first_outside(&[IpRange::everything()[0]]), None);
    }

    #[test]
    fn foreign_kinds_are_every_other_network_policy_kind() {
        for (api_version, kind) in [
            ("policy.networking.k8s.io/v1alpha1", "AdminNetworkPolicy"),
            (
                "policy.networking.k8s.io/v1alpha1",
                "BaselineAdminNetworkPolicy",
            ),
            ("cilium.io/v2", "CiliumNetworkPolicy"),
            ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"),
            ("crd.projectcalico.org/v1", "NetworkPolicy"),
            ("crd.projectcalico.org/v1", "GlobalNetworkPolicy"),
            ("projectcalico.org/v3", "GlobalNetworkPolicy"),
            ("k8s.cni.cncf.io/v1beta1", "MultiNetworkPolicy"),
        ] {
            assert!(is_foreign_policy(api_version, kind), "{api_version} {kind}");
        }
        assert!(!is_foreign_policy("networking.k8s.io/v1", "NetworkPolicy"));
        assert!(!is_foreign_policy("v1", "Pod"));
        assert!(!is_foreign_policy("stackroute.dev/v1alpha1", "StackRoute"));
    }

    #[test]
    fn segments_cut_at_grant_boundaries() {
        let tcp = |first, last| PortEntry {
            protocol: Protocol::Tcp,
            first,
            last,
        };
        let grants_a = [tcp(80, 90)];
        let grants_b = [tcp(91, 100)];
        let grants: Vec<(Option<&[PortEntry]>, Coverage)> = vec![
            (Some(&grants_a), Coverage::All),
            (Some(&grants_b), Coverage::All),
        ];
        let facts = PodFacts::default();
        let pod = Endpoint::Pod {
            name: "x/y",
            facts: &facts,
        };
        // Two grants together cover 80-100 though neither does alone.
        assert!(uncovered(&[tcp(80, 100)], &pod, &grants).is_none());
        let gap = uncovered(&[tcp(80, 101)], &pod, &grants).unwrap();
        assert_eq!(gap.ports, "TCP 101");
        let gap = uncovered(&[tcp(0, 65535)], &pod, &grants).unwrap();
        assert_eq!(gap.ports, "TCP 0-79");
        // The edge of the port space does not overflow.
        assert!(uncovered(&[tcp(65535, 65535)], &pod, &[(None, Coverage::All)]).is_none());
    }
}
