//! Fuzz harness logic for `stackroute-policy`, shared by the libFuzzer target
//! (`fuzz_targets/load_yaml.rs`) and the stable-toolchain replay test below.

use std::net::IpAddr;

use stackroute_policy::explain::AddressNamer;
use stackroute_policy::{ClusterState, Compiled, Settings, explain_in_snapshot};
use stackroute_snapshot::{NoTrace, Protocol, RuleRef, Snapshot, Trace, Verdict};

/// A trace that asks for the detailed, rule-by-rule walk (as `explain` does) and records nothing.
struct Detailed;

impl Trace for Detailed {
    fn rule(&mut self, _rule: RuleRef, _verdict: Verdict) {}

    fn detailed(&self) -> bool {
        true
    }
}

/// Most nodes, pods per node and destinations one run walks, to keep a run short.
const MAX_NODES: usize = 8;
const MAX_PODS: usize = 8;
const MAX_DESTINATIONS: usize = 12;

/// Target `load_yaml`: `data` (lossily UTF-8) as one YAML file of cluster state.
pub fn load_yaml(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut state = ClusterState::default();
    for problem in state.load_text("fuzz.yaml", &text) {
        let _ = problem.to_string();
    }
    let compiled = Compiled::new(&state, Settings::default());
    for problem in &compiled.problems {
        let _ = problem.to_string();
    }
    let _ = compiled.counts();
    let _ = compiled.origins().count();

    let mut destinations: Vec<(IpAddr, u16, Protocol)> = Vec::new();
    for pod in state.pods.iter().take(MAX_DESTINATIONS / 2) {
        for ip in pod.ips.iter().take(2) {
            destinations.push((*ip, 29500, Protocol::Tcp));
        }
    }
    for service in state.services.iter().take(2) {
        for ip in service.cluster_ips.iter().take(1) {
            for port in service.ports.iter().take(2) {
                destinations.push((*ip, port.port, port.protocol));
            }
        }
    }
    for node in state.nodes.iter().take(2) {
        for ip in node.addresses.iter().take(1) {
            destinations.push((*ip, 10250, Protocol::Tcp));
        }
    }
    destinations.truncate(MAX_DESTINATIONS);
    for (text, port, protocol) in [
        ("8.8.8.8", 443, Protocol::Tcp),
        ("192.168.50.7", 443, Protocol::Tcp),
        ("fd00::1", 53, Protocol::Udp),
        ("::ffff:10.244.1.10", 29500, Protocol::Tcp),
    ] {
        destinations.push((text.parse().expect("literal IP"), port, protocol));
    }

    for node in compiled.node_names().iter().take(MAX_NODES) {
        let bytes = compiled
            .node_snapshot(node, 1)
            .unwrap_or_else(|| panic!("node {node:?} is listed but has no snapshot"));
        let snapshot = Snapshot::parse(&bytes)
            .unwrap_or_else(|e| panic!("the snapshot of node {node:?} does not parse: {e}"));
        let _ = (snapshot.node_name(), snapshot.counts(), snapshot.revision());
        let pods = state
            .pods
            .iter()
            .filter(|p| p.node.as_deref() == Some(node.as_str()))
            .take(MAX_PODS);
        for pod in pods {
            let id = snapshot
                .workload_by_name(&pod.namespace, &pod.name)
                .unwrap_or_else(|| {
                    panic!(
                        "pod {}/{} on node {node:?} is not in that node's snapshot",
                        pod.namespace, pod.name
                    )
                });
            for (ip, port, protocol) in &destinations {
                let _ = snapshot.classify(*ip);
                let decision = snapshot.decide(id, *ip, *port, *protocol, &mut Detailed);
                // The shim's fast path skips policies by their summaries: it must decide
                // exactly as the rule-by-rule walk on a snapshot the encoder wrote.
                let fast = snapshot.decide(id, *ip, *port, *protocol, &mut NoTrace);
                assert!(
                    fast.same_outcome(&decision)
                        && fast.location == decision.location
                        && fast.via == decision.via,
                    "fast path {fast:?} differs from rule-by-rule {decision:?} for {}/{} -> \
                     {ip}:{port} {protocol}",
                    pod.namespace,
                    pod.name
                );
                let explanation = explain_in_snapshot(
                    &snapshot,
                    &pod.namespace,
                    &pod.name,
                    *ip,
                    *port,
                    *protocol,
                    &state as &dyn AddressNamer,
                )
                .unwrap_or_else(|e| {
                    panic!("explain {}/{} -> {ip}:{port}: {e}", pod.namespace, pod.name)
                });
                // explain runs the same lookup with a trace: it must report the same decision
                // (no transport at all: a Dedicated rule the NetworkPolicy gate left empty).
                let refused = decision.matched.is_some()
                    && decision.isolation == stackroute_snapshot::Isolation::Dedicated
                    && decision.transports().next().is_none();
                let transport = (!refused).then(|| decision.transport());
                assert_eq!(
                    (
                        explanation
                            .transport
                            .as_ref()
                            .map(|t| (t.stack.as_str(), t.congestion_control.as_str())),
                        explanation.fallback.len(),
                        explanation.matched.is_some(),
                        explanation.refused.is_some(),
                    ),
                    (
                        transport.map(|t| (t.stack.as_str(), t.congestion_control.as_str())),
                        decision.transports().count().saturating_sub(1),
                        decision.matched.is_some(),
                        refused,
                    ),
                    "explain and decide disagree for {}/{} -> {ip}:{port}",
                    pod.namespace,
                    pod.name
                );
                let _ = explanation.to_text();
                let _ = serde_json::to_string(&explanation).expect("an explanation serializes");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Stable-toolchain checks of the harness: every committed seed replays without a panic,
    //! and so do simple byte-level variations of them.

    use super::*;
    use std::path::Path;

    fn seeds() -> Vec<(String, Vec<u8>)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/load_yaml");
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
            .expect("seeds/load_yaml")
            .map(|e| e.expect("entry").path())
            .map(|p| {
                (
                    p.display().to_string(),
                    std::fs::read(&p).expect("read seed"),
                )
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn seeds_replay() {
        let seeds = seeds();
        assert!(seeds.len() >= 5, "seeds missing");
        for (name, bytes) in &seeds {
            eprintln!("replay {name}");
            load_yaml(bytes);
        }
    }

    #[test]
    fn the_combined_seed_compiles_policies_for_pods() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/load_yaml/cluster-and-policies.yaml"),
        )
        .expect("combined seed");
        let mut state = ClusterState::default();
        let problems = state.load_text("seed", &text);
        assert!(problems.is_empty(), "{problems:?}");
        let compiled = Compiled::new(&state, Settings::default());
        assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
        assert!(compiled.counts().0 >= 5 && state.pods.len() >= 7);
    }

    /// Truncations and line deletions of every seed: cheap structural variety on stable.
    #[test]
    fn seed_variations_replay() {
        for (_, bytes) in seeds() {
            for cut in (0..bytes.len()).step_by(bytes.len() / 7 + 1) {
                load_yaml(&bytes[..cut]);
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            for skip in (0..lines.len()).step_by(lines.len() / 9 + 1) {
                let varied: Vec<&str> = lines
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != skip)
                    .map(|(_, l)| *l)
                    .collect();
                load_yaml(varied.join("\n").as_bytes());
            }
        }
    }
}
