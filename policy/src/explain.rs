//! `stackroute explain`: a decision and why, computed by the same lookup the shim runs.

use std::net::IpAddr;

use serde::Serialize;
use stackroute_snapshot::{
    Decision, Isolation, Mismatch, PolicyKind, Protocol, RuleRef, Snapshot, Trace, TransportChoice,
    Verdict, Via,
};

use crate::compile::Compiled;
use crate::netpol::NetworkPolicies;
use crate::state::ClusterState;

/// The reason code of a stack the NetworkPolicy gate removed.
pub const NETWORK_POLICY_REASON: &str = "network-policy";

/// A stack and congestion control, as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TransportJson {
    /// `Kernel`, `Userspace` or `RDMA`.
    pub stack: String,
    /// `Default`, `Cubic`, `BBR` or `Reno`.
    pub congestion_control: String,
}

impl From<TransportChoice> for TransportJson {
    fn from(choice: TransportChoice) -> Self {
        Self {
            stack: choice.stack.to_string(),
            congestion_control: choice.congestion_control.to_string(),
        }
    }
}

/// A stack the matched rule would name but the controller took out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RemovedJson {
    /// `RDMA` (or `Userspace`).
    pub stack: String,
    /// The reason code: `network-policy`.
    pub reason: String,
    /// What NetworkPolicy says.
    pub detail: String,
}

/// The rule that decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MatchedJson {
    /// `StackRoute` or `ClusterStackRoute`.
    pub kind: String,
    /// Namespace, empty for ClusterStackRoutes.
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// Rule name.
    pub rule: String,
}

/// One rule as it was considered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Considered {
    /// `StackRoute` or `ClusterStackRoute`.
    pub kind: String,
    /// Namespace, empty for ClusterStackRoutes.
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// `Admin`, `Namespace` or `Baseline`.
    pub tier: String,
    /// `spec.priority`.
    pub priority: u16,
    /// Rule name.
    pub rule: String,
    /// `matched`, `passed`, `no-match` or `skipped`.
    pub result: String,
    /// The first reason it did not match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the NetworkPolicy gate made of the rule: `allowed-part` (the part that keeps its
    /// bypass stacks, for the destinations NetworkPolicy allows) or `bypass-removed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<String>,
}

/// The outcome for one concrete destination (the destination itself, or one Service backend).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// Address.
    pub address: String,
    /// Port.
    pub port: u16,
    /// What the address is: `pod NS/NAME`, `node NAME`, or `unknown`.
    pub is: String,
    /// Location seen from the source.
    pub location: String,
    /// First transport; null when the connection is refused.
    pub transport: Option<TransportJson>,
    /// Fallbacks in order, ending with the implicit kernel entry where it applies.
    pub fallback: Vec<TransportJson>,
    /// Stacks the NetworkPolicy gate took from the matched rule, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<RemovedJson>,
    /// Why the shim refuses the connection (EACCES), when it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Isolation of the matched rule.
    pub isolation: String,
    /// The deciding rule, or null for the installation default.
    pub matched: Option<MatchedJson>,
    /// Every rule considered, in order.
    pub considered: Vec<Considered>,
}

/// A full explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Explanation {
    /// `NAMESPACE/POD`.
    pub from: String,
    /// The source's node.
    pub node: String,
    /// `IP:PORT` as given.
    pub to: String,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// What the destination is: `pod NS/NAME`, `node NAME`, `service NS/NAME`, or `unknown`.
    pub destination: String,
    /// Location seen from the source.
    pub location: String,
    /// First transport; null when the connection is refused (see `refused`).
    pub transport: Option<TransportJson>,
    /// Fallbacks in order, ending with the implicit kernel entry where it applies.
    pub fallback: Vec<TransportJson>,
    /// Stacks the matched rule names that the NetworkPolicy gate took out, with why (reason
    /// `network-policy`): NetworkPolicy does not allow, or the controller cannot decide, every
    /// flow the rule's entry covers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<RemovedJson>,
    /// Why the shim refuses the connection (EACCES), when it does: a rule with `isolation:
    /// Dedicated` (no kernel fallback) with no transport left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Isolation of the matched rule.
    pub isolation: String,
    /// The deciding rule, or null for the installation default.
    pub matched: Option<MatchedJson>,
    /// How the decision was reached: `direct`, `service-unanimous`, `service-ambiguous`.
    pub via: String,
    /// Every rule considered, in order (direct destinations).
    pub considered: Vec<Considered>,
    /// Per-backend outcomes when the destination is a Service.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<Outcome>,
    /// Snapshot revision the decision was computed from.
    pub revision: u64,
}

/// Why there is nothing to explain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    /// The source pod is not in the state.
    #[error("pod {0} not found in the state")]
    UnknownPod(String),
    /// The source pod has no node, so no agent would serve it.
    #[error("pod {0} has no spec.nodeName: it is not scheduled, so no node agent serves it")]
    Unscheduled(String),
    /// The source workload is not in the node's snapshot.
    #[error("workload {0} is not in the snapshot of node {1}")]
    NotInSnapshot(String, String),
    /// The compiled snapshot did not decode (a bug, reported rather than hidden).
    #[error("snapshot: {0}")]
    Snapshot(String),
}

/// A Service backend: address and target port.
type Backend = (IpAddr, u16);

#[derive(Default)]
struct Recorder {
    steps: Vec<(Option<Backend>, RuleRef, Verdict)>,
    backend: Option<(IpAddr, u16)>,
}

impl Trace for Recorder {
    fn rule(&mut self, rule: RuleRef, verdict: Verdict) {
        self.steps.push((self.backend, rule, verdict));
    }

    fn backend(&mut self, backend: Option<(IpAddr, u16)>) {
        self.backend = backend;
    }
}

/// Names addresses for output (`pod NS/NAME`, `node NAME`, `service NS/NAME`).
pub trait AddressNamer {
    /// A name for `ip`, or `None`.
    fn name(&self, ip: IpAddr) -> Option<String>;
}

impl AddressNamer for ClusterState {
    fn name(&self, ip: IpAddr) -> Option<String> {
        let ip = ip.to_canonical();
        if let Some(pod) = self
            .pods
            .iter()
            .find(|p| !p.host_network && p.ips.contains(&ip))
        {
            return Some(format!("pod {}/{}", pod.namespace, pod.name));
        }
        if let Some(node) = self.nodes.iter().find(|n| n.addresses.contains(&ip)) {
            return Some(format!("node {}", node.name));
        }
        self.services
            .iter()
            .find(|s| s.cluster_ips.contains(&ip))
            .map(|s| format!("service {}/{}", s.namespace, s.name))
    }
}

/// Names nothing: for explaining from a snapshot alone.
pub struct NoNames;

impl AddressNamer for NoNames {
    fn name(&self, _ip: IpAddr) -> Option<String> {
        None
    }
}

/// Explains a connection from a pod of `state`, compiling the snapshot of the pod's node.
pub fn explain(
    compiled: &Compiled<'_>,
    state: &ClusterState,
    namespace: &str,
    pod: &str,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Result<Explanation, ExplainError> {
    let source = format!("{namespace}/{pod}");
    let info = state
        .pod(namespace, pod)
        .ok_or_else(|| ExplainError::UnknownPod(source.clone()))?;
    let node = info
        .node
        .as_deref()
        .ok_or_else(|| ExplainError::Unscheduled(source.clone()))?;
    let bytes = compiled
        .node_snapshot(node, 0)
        .ok_or_else(|| ExplainError::Unscheduled(source.clone()))?;
    let snapshot = Snapshot::parse(&bytes).map_err(|e| ExplainError::Snapshot(e.to_string()))?;
    let network_policies = NetworkPolicies::from_state(state);
    // Why a stack is missing: what NetworkPolicy says of this very connection, else the flow the
    // rule's entry also covers that it does not allow.
    let detail = |rule: RuleRef, ip: IpAddr, port: u16| {
        let verdict = network_policies.evaluate_connection(state, info, ip, port, protocol);
        match verdict.reason() {
            Some(reason) => format!("{}: {reason}", verdict.as_str()),
            None => match compiled.gated_rule(node, rule) {
                Some(gated) => format!(
                    "NetworkPolicy allows this connection, but the rule also covers flows it \
                     does not allow: {}",
                    gated.reason
                ),
                None => GENERIC_DETAIL.to_string(),
            },
        }
    };
    explain_with(
        &snapshot, namespace, pod, ip, port, protocol, state, &detail,
    )
}

/// What a snapshot alone says of a stack the NetworkPolicy gate removed.
const GENERIC_DETAIL: &str = "NetworkPolicy does not allow, or the controller cannot decide, \
     every flow this rule covers (explain with --state names the NetworkPolicy)";

/// Explains a connection from a workload of a snapshot (an agent's live table, or one just
/// compiled).
pub fn explain_in_snapshot(
    snapshot: &Snapshot<'_>,
    namespace: &str,
    workload: &str,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
    names: &dyn AddressNamer,
) -> Result<Explanation, ExplainError> {
    explain_with(
        snapshot,
        namespace,
        workload,
        ip,
        port,
        protocol,
        names,
        &|_, _, _| GENERIC_DETAIL.to_string(),
    )
}

/// Why the NetworkPolicy gate removed a stack of `rule` for a connection to `ip:port`.
type Detail<'d> = dyn Fn(RuleRef, IpAddr, u16) -> String + 'd;

#[allow(clippy::too_many_arguments)]
fn explain_with(
    snapshot: &Snapshot<'_>,
    namespace: &str,
    workload: &str,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
    names: &dyn AddressNamer,
    detail: &Detail<'_>,
) -> Result<Explanation, ExplainError> {
    let id = snapshot
        .workload_by_name(namespace, workload)
        .ok_or_else(|| {
            ExplainError::NotInSnapshot(
                format!("{namespace}/{workload}"),
                snapshot.node_name().to_string(),
            )
        })?;
    let mut recorder = Recorder::default();
    let decision = snapshot.decide(id, ip, port, protocol, &mut recorder);
    let name_of = |ip: IpAddr| names.name(ip).unwrap_or_else(|| "unknown".to_string());
    let (transport, fallback) = transports(&decision);
    let (removed, refused) = gate_effects(snapshot, &decision, ip, port, detail);
    let mut explanation = Explanation {
        from: format!("{namespace}/{workload}"),
        node: snapshot.node_name().to_string(),
        to: std::net::SocketAddr::new(ip, port).to_string(),
        protocol: protocol.to_string(),
        destination: name_of(ip),
        location: decision.location.to_string(),
        transport,
        fallback,
        removed,
        refused,
        isolation: decision.isolation.to_string(),
        matched: decision.matched.map(|r| matched(snapshot, r)),
        via: match decision.via {
            Via::Direct => "direct",
            Via::ServiceUnanimous { .. } => "service-unanimous",
            Via::ServiceAmbiguous { .. } => "service-ambiguous",
        }
        .to_string(),
        considered: Vec::new(),
        backends: Vec::new(),
        revision: snapshot.revision(),
    };
    if decision.via == Via::Direct {
        explanation.considered = considered(snapshot, &recorder, None, ip, port, protocol);
    } else {
        let mut seen = Vec::new();
        for (backend, _, _) in &recorder.steps {
            if let Some(b) = backend.filter(|b| !seen.contains(b)) {
                seen.push(b);
            }
        }
        for (backend_ip, backend_port) in seen {
            let outcome = snapshot.decide(
                id,
                backend_ip,
                backend_port,
                protocol,
                &mut stackroute_snapshot::NoTrace,
            );
            let (transport, fallback) = transports(&outcome);
            let (removed, refused) =
                gate_effects(snapshot, &outcome, backend_ip, backend_port, detail);
            explanation.backends.push(Outcome {
                address: backend_ip.to_string(),
                port: backend_port,
                is: name_of(backend_ip),
                location: outcome.location.to_string(),
                transport,
                fallback,
                removed,
                refused,
                isolation: outcome.isolation.to_string(),
                matched: outcome.matched.map(|r| matched(snapshot, r)),
                considered: considered(
                    snapshot,
                    &recorder,
                    Some((backend_ip, backend_port)),
                    backend_ip,
                    backend_port,
                    protocol,
                ),
            });
        }
    }
    // Through a Service whose backends agree, the decision is theirs: so is what was removed.
    if decision.via != Via::Direct
        && let Some(first) = explanation.backends.first()
        && decision.matched.is_some()
    {
        explanation.removed = first.removed.clone();
        explanation.refused = first.refused.clone();
    }
    Ok(explanation)
}

/// The first transport (`None`: refused) and the rest. A decision without a matched rule or
/// with an empty list on a rule that allows the kernel ends on the kernel, as the shim does.
fn transports(decision: &Decision<'_>) -> (Option<TransportJson>, Vec<TransportJson>) {
    let mut all = decision.transports().map(TransportJson::from);
    match all.next() {
        Some(first) => (Some(first), all.collect()),
        None if refused(decision) => (None, Vec::new()),
        None => (Some(TransportChoice::KERNEL_DEFAULT.into()), Vec::new()),
    }
}

/// Whether the shim refuses the connection: a rule with isolation `Dedicated` (no kernel
/// fallback) and no transport left.
fn refused(decision: &Decision<'_>) -> bool {
    decision.matched.is_some()
        && decision.isolation == Isolation::Dedicated
        && decision.transports().next().is_none()
}

/// What the NetworkPolicy gate took from the matched rule, and whether that leaves nothing.
fn gate_effects(
    snapshot: &Snapshot<'_>,
    decision: &Decision<'_>,
    ip: IpAddr,
    port: u16,
    detail: &Detail<'_>,
) -> (Vec<RemovedJson>, Option<String>) {
    let Some(rule) = decision.matched else {
        return (Vec::new(), None);
    };
    let gate = snapshot.rule(rule).gate;
    let removed: Vec<RemovedJson> = if gate.removed().next().is_some() {
        let why = detail(rule, ip, port);
        gate.removed()
            .map(|stack| RemovedJson {
                stack: stack.to_string(),
                reason: NETWORK_POLICY_REASON.to_string(),
                detail: why.clone(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let refused = refused(decision).then(|| {
        if removed.is_empty() {
            "isolation Dedicated allows no kernel fallback and the rule names no other transport"
                .to_string()
        } else {
            "isolation Dedicated allows no kernel fallback, and the NetworkPolicy gate removed \
             every other transport"
                .to_string()
        }
    });
    (removed, refused)
}

fn matched(snapshot: &Snapshot<'_>, rule: RuleRef) -> MatchedJson {
    let policy = snapshot.policy(rule.policy);
    MatchedJson {
        kind: policy.kind.to_string(),
        namespace: policy.namespace.to_string(),
        name: policy.name.to_string(),
        rule: snapshot.rule(rule).name.to_string(),
    }
}

fn considered(
    snapshot: &Snapshot<'_>,
    recorder: &Recorder,
    backend: Option<(IpAddr, u16)>,
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Vec<Considered> {
    recorder
        .steps
        .iter()
        .filter(|(b, _, _)| *b == backend)
        .map(|(_, reference, verdict)| {
            let policy = snapshot.policy(reference.policy);
            let rule = snapshot.rule(*reference);
            let (result, reason) = match verdict {
                Verdict::Matched => ("matched", None),
                Verdict::Passed => (
                    "passed",
                    Some("Pass: the rest of this tier is skipped".to_string()),
                ),
                Verdict::SkippedByPass => (
                    "skipped",
                    Some("an earlier Pass rule ended this tier".to_string()),
                ),
                Verdict::NoMatch(Mismatch::Port) => {
                    let ports: Vec<String> = rule
                        .port_ranges()
                        .map(|(p, first, last)| match (first, last) {
                            (0, 65535) => format!("{p} any"),
                            (a, b) if a == b => format!("{p} {a}"),
                            (a, b) => format!("{p} {a}-{b}"),
                        })
                        .collect();
                    (
                        "no-match",
                        Some(format!(
                            "port {port}/{protocol} is not in ports [{}]",
                            ports.join(", ")
                        )),
                    )
                }
                Verdict::NoMatch(Mismatch::Location { required, actual }) => (
                    "no-match",
                    Some(format!(
                        "destination is {actual}; rule requires location {required}"
                    )),
                ),
                Verdict::NoMatch(Mismatch::Peer) => (
                    "no-match",
                    Some(format!(
                        "{ip} is not covered by to [{}]",
                        snapshot.describe_peers(*reference).join(", ")
                    )),
                ),
            };
            Considered {
                kind: policy.kind.to_string(),
                namespace: policy.namespace.to_string(),
                name: policy.name.to_string(),
                tier: policy.tier.to_string(),
                priority: policy.priority,
                rule: rule.name.to_string(),
                result: result.to_string(),
                reason,
                network_policy: if rule.gate.allowed_part {
                    Some("allowed-part".to_string())
                } else if rule.gate.removed().next().is_some() {
                    Some("bypass-removed".to_string())
                } else {
                    None
                },
            }
        })
        .collect()
}

impl Explanation {
    /// Human-readable rendering.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let transport = |t: &TransportJson| format!("{}/{}", t.stack, t.congestion_control);
        let chain = |first: &Option<TransportJson>, rest: &[TransportJson]| match first {
            Some(first) => std::iter::once(first)
                .chain(rest)
                .map(transport)
                .collect::<Vec<_>>()
                .join(" → "),
            None => "refused (EACCES)".to_string(),
        };
        let gate_lines =
            |out: &mut String, removed: &[RemovedJson], refused: &Option<String>, indent: &str| {
                for r in removed {
                    out.push_str(&format!(
                        "{indent}removed: {} ({}: {})\n",
                        r.stack, r.reason, r.detail
                    ));
                }
                if let Some(refused) = refused {
                    out.push_str(&format!("{indent}refused: {refused}\n"));
                }
            };
        out.push_str(&format!(
            "{} (node {}) → {} {} [{}], location {}\n",
            self.from, self.node, self.to, self.protocol, self.destination, self.location
        ));
        match &self.matched {
            Some(m) => out.push_str(&format!(
                "decision: {} by {}\n",
                chain(&self.transport, &self.fallback),
                describe(m)
            )),
            None => out.push_str(&format!(
                "decision: {} (installation default: no rule matched{})\n",
                chain(&self.transport, &self.fallback),
                if self.via == "service-ambiguous" {
                    "; the Service's backends are routed differently"
                } else {
                    ""
                }
            )),
        }
        gate_lines(&mut out, &self.removed, &self.refused, "");
        if self.isolation != "None" {
            out.push_str(&format!("isolation: {}\n", self.isolation));
        }
        let render = |out: &mut String, considered: &[Considered], indent: &str| {
            if considered.is_empty() {
                out.push_str(&format!("{indent}no rules apply to this source\n"));
            }
            for c in considered {
                let object = if c.kind == PolicyKind::ClusterStackRoute.as_str() {
                    format!("{}/{}", c.kind, c.name)
                } else {
                    format!("{}/{}/{}", c.kind, c.namespace, c.name)
                };
                out.push_str(&format!(
                    "{indent}{:<9} {} rule {}{} ({} tier, priority {})",
                    c.result,
                    object,
                    c.rule,
                    match c.network_policy.as_deref() {
                        Some("allowed-part") => " [NetworkPolicy-allowed part]",
                        Some(_) => " [bypass removed: network-policy]",
                        None => "",
                    },
                    c.tier,
                    c.priority
                ));
                if let Some(reason) = &c.reason {
                    out.push_str(&format!(": {reason}"));
                }
                out.push('\n');
            }
        };
        if self.backends.is_empty() {
            out.push_str("rules considered:\n");
            render(&mut out, &self.considered, "  ");
        } else {
            out.push_str(&format!(
                "service backends ({}, {}):\n",
                self.backends.len(),
                self.via
            ));
            for b in &self.backends {
                out.push_str(&format!(
                    "  {}:{} [{}] location {}: {}{}\n",
                    b.address,
                    b.port,
                    b.is,
                    b.location,
                    chain(&b.transport, &b.fallback),
                    b.matched
                        .as_ref()
                        .map(|m| format!(" by {}", describe(m)))
                        .unwrap_or_else(|| " (default)".into())
                ));
                gate_lines(&mut out, &b.removed, &b.refused, "    ");
                render(&mut out, &b.considered, "    ");
            }
        }
        out
    }
}

fn describe(m: &MatchedJson) -> String {
    if m.namespace.is_empty() {
        format!("{}/{} rule {}", m.kind, m.name, m.rule)
    } else {
        format!("{}/{}/{} rule {}", m.kind, m.namespace, m.name, m.rule)
    }
}
