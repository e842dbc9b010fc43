//! Rules that can never match because an earlier rule of the same object matches every
//! connection they would match — reported as the `Shadowed` condition, never as a rejection
//! (shadowing is a cross-rule property, like a dead branch, not an invalid object).
//!
//! The check is sound but not complete: when it says "shadowed", the rule is unreachable; some
//! unreachable rules (covered by a combination of earlier rules, or by other objects) are not
//! found.

use stackroute_api::{Entity, Location, Peer, PortRange, Protocol, RouteRule};
use stackroute_snapshot::Cidr;

/// A rule that cannot match, and the earlier rule that covers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shadowed {
    /// Index of the unreachable rule.
    pub rule: usize,
    /// Index of the earlier rule that matches everything it would.
    pub by: usize,
}

/// Finds the rules of one object that an earlier rule of the same object covers.
pub fn shadowed_rules(rules: &[RouteRule]) -> Vec<Shadowed> {
    let mut found = Vec::new();
    for (later_index, later) in rules.iter().enumerate() {
        if let Some(by) = rules[..later_index]
            .iter()
            .position(|earlier| covers(earlier, later))
        {
            found.push(Shadowed {
                rule: later_index,
                by,
            });
        }
    }
    found
}

/// Whether every connection `later` matches is matched by `earlier`.
fn covers(earlier: &RouteRule, later: &RouteRule) -> bool {
    locations_cover(earlier.location, later.location)
        && ports_cover(earlier.ports.as_deref(), later.ports.as_deref())
        && peers_cover(earlier.to.as_deref(), later.to.as_deref())
}

fn location_set(location: Location) -> [bool; 4] {
    // SameNode, SameZone, SameCluster (other zone), External
    match location {
        Location::SameNode => [true, false, false, false],
        Location::SameZone => [true, true, false, false],
        Location::SameCluster => [true, true, true, false],
        Location::External => [false, false, false, true],
        Location::Any => [true, true, true, true],
    }
}

fn locations_cover(earlier: Location, later: Location) -> bool {
    location_set(earlier)
        .iter()
        .zip(location_set(later))
        .all(|(e, l)| *e || !l)
}

fn span(range: &PortRange) -> (Protocol, i32, i32) {
    match range.port {
        None => (range.protocol, 0, 65535),
        Some(port) => (range.protocol, port, range.end_port.unwrap_or(port)),
    }
}

fn ports_cover(earlier: Option<&[PortRange]>, later: Option<&[PortRange]>) -> bool {
    match (earlier, later) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(earlier), Some(later)) => later.iter().all(|l| {
            let (protocol, first, last) = span(l);
            earlier.iter().any(|e| {
                let (e_protocol, e_first, e_last) = span(e);
                e_protocol == protocol && e_first <= first && last <= e_last
            })
        }),
    }
}

fn peers_cover(earlier: Option<&[Peer]>, later: Option<&[Peer]>) -> bool {
    let Some(earlier) = earlier else { return true };
    let has_entity = |entity: Entity| earlier.iter().any(|p| p.entity == Some(entity));
    if has_entity(Entity::World) && has_entity(Entity::Cluster) {
        return true;
    }
    let Some(later) = later else { return false };
    later
        .iter()
        .all(|l| earlier.iter().any(|e| peer_covers(e, l)))
}

fn peer_covers(earlier: &Peer, later: &Peer) -> bool {
    if earlier == later {
        return true;
    }
    // Every pod is in the cluster.
    if earlier.entity == Some(Entity::Cluster) && later.pods.is_some() {
        return true;
    }
    match (
        &earlier.pods,
        &later.pods,
        &earlier.networks,
        &later.networks,
    ) {
        (Some(e), Some(l), _, _) => {
            let selects_every_pod = e
                .pod_selector
                .match_labels
                .as_ref()
                .is_none_or(|m| m.is_empty())
                && e.pod_selector
                    .match_expressions
                    .as_ref()
                    .is_none_or(|m| m.is_empty());
            let same_or_wider_namespaces = e.namespace_selector == l.namespace_selector
                || e.namespace_selector.as_ref().is_some_and(|ns| {
                    ns.match_labels.as_ref().is_none_or(|m| m.is_empty())
                        && ns.match_expressions.as_ref().is_none_or(|m| m.is_empty())
                });
            selects_every_pod && same_or_wider_namespaces
        }
        (_, _, Some(e), Some(l)) => l.iter().all(|later_net| {
            let Ok(later_net) = later_net.parse::<Cidr>() else {
                return false;
            };
            e.iter()
                .filter_map(|n| n.parse::<Cidr>().ok())
                .any(|net| net.prefix <= later_net.prefix && net.contains(later_net.address))
        }),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> Vec<RouteRule> {
        yaml_serde::from_str(yaml).unwrap()
    }

    #[test]
    fn finds_rules_covered_by_an_earlier_one() {
        let found = shadowed_rules(&rules(
            r#"
- name: everything-on-443
  ports: [{port: 443}]
  transport: {stack: Kernel}
- name: narrower-location
  ports: [{port: 443}]
  location: SameCluster
  to: [{entity: Cluster}]
  transport: {stack: Userspace}
- name: other-port
  ports: [{port: 80}]
  transport: {stack: Userspace}
- name: wide-net
  to: [{networks: [10.0.0.0/8]}]
  transport: {stack: Kernel, congestionControl: BBR}
- name: inside-wide-net
  to: [{networks: [10.1.0.0/16, 10.2.3.0/24]}]
  ports: [{port: 8000, endPort: 8080}]
  transport: {stack: Userspace}
- name: all-pods
  to: [{pods: {podSelector: {}}}]
  location: SameZone
  transport: {stack: RDMA}
- name: some-pods-same-node
  to: [{pods: {podSelector: {matchLabels: {app: x}}}}]
  location: SameNode
  transport: {stack: Userspace}
- name: some-pods-anywhere
  to: [{pods: {podSelector: {matchLabels: {app: x}}}}]
  transport: {stack: Userspace}
"#,
        ));
        assert_eq!(
            found,
            vec![
                Shadowed { rule: 1, by: 0 },
                Shadowed { rule: 4, by: 3 },
                Shadowed { rule: 6, by: 5 },
            ]
        );
    }

    #[test]
    fn udp_and_tcp_do_not_cover_each_other() {
        let found = shadowed_rules(&rules(
            "- {name: a, ports: [{protocol: UDP}], transport: {stack: Kernel}}\n- {name: b, ports: [{port: 53}], transport: {stack: Kernel}}\n- {name: c, ports: [{protocol: UDP, port: 53}], transport: {stack: Kernel}}",
        ));
        assert_eq!(found, vec![Shadowed { rule: 2, by: 0 }]);
    }
}
