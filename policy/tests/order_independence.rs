//! Property: a decision does not depend on the order in which objects are read.
//!
//! Random clusters and policies (with deliberate priority and age ties) are rendered as YAML
//! documents, loaded in two different orders, compiled, and every (source pod, destination)
//! pair must get the same rule and transports from both.

use std::net::IpAddr;

use proptest::prelude::*;
use stackroute_policy::Settings;
use stackroute_snapshot::{Decision, NoTrace, Protocol, RuleRef, Snapshot, Trace, Verdict};

mod support;
use support::random_cluster::{
    APPS, MIXED_SERVICE_IP, PodSpec, cluster_documents, each_pod_with, pod_ip, policy_yaml,
    service_ip,
};

/// A trace that asks for rule-by-rule evaluation.
struct Detailed;

impl Trace for Detailed {
    fn rule(&mut self, _rule: RuleRef, _verdict: Verdict) {}
}

/// Every decision, keyed by names so that internal numbering cannot matter.
fn all_decisions(documents: &[String], pods: usize) -> Vec<String> {
    decisions_with(documents, pods, Settings::default())
}

/// [`all_decisions`] compiled with `settings`.
fn decisions_with(documents: &[String], pods: usize, settings: Settings) -> Vec<String> {
    let mut destinations: Vec<IpAddr> = (0..pods).map(|i| pod_ip(i).parse().unwrap()).collect();
    destinations.extend(
        [
            "172.16.0.1",
            "10.0.1.200",
            "8.8.8.8",
            "9.9.9.9",
            "fd00::1",
            "2001:db8::1",
            MIXED_SERVICE_IP,
        ]
        .iter()
        .map(|ip| ip.parse::<IpAddr>().unwrap()),
    );
    for namespace in 0..3 {
        for app in 0..APPS.len() {
            destinations.push(service_ip(namespace, app).parse().unwrap());
        }
    }
    let mut out = Vec::new();
    each_pod_with(documents, settings, |pod, snapshot, workload| {
        // As the agent publishes it: a Service's decision read from the precomputed verdicts.
        let published = snapshot.with_service_verdicts(2, usize::MAX);
        let published = Snapshot::parse(&published).expect("verdicts validate");
        assert!(
            published.has_service_verdicts(),
            "the random cluster has Services"
        );
        // Rows for the chains most workloads use, as many as 40 decisions allow.
        let partly = snapshot.with_service_verdicts(2, 40);
        let partly = Snapshot::parse(&partly).expect("verdicts validate");
        for destination in &destinations {
            for (port, protocol) in [
                (80, Protocol::Tcp),
                (81, Protocol::Tcp),
                (9999, Protocol::Tcp),
                (82, Protocol::Udp),
            ] {
                let decision =
                    snapshot.decide(workload, *destination, port, protocol, &mut NoTrace);
                let alike = |what: &str, other: Decision<'_>| {
                    assert!(
                        decision.same_outcome(&other)
                            && decision.location == other.location
                            && decision.via == other.via,
                        "{what} differs for {destination}:{port}: {decision:?} vs {other:?}"
                    );
                };
                // The shim's fast path (policy summaries, rule filters, early exit) must agree
                // with the rule-by-rule evaluation that explain traces, and with the Service
                // verdicts the agent publishes (all chains, or some).
                alike(
                    "fast path",
                    snapshot.decide(workload, *destination, port, protocol, &mut Detailed),
                );
                alike(
                    "Service verdict",
                    published.decide(workload, *destination, port, protocol, &mut NoTrace),
                );
                alike(
                    "partial Service verdict",
                    partly.decide(workload, *destination, port, protocol, &mut NoTrace),
                );
                let by = decision.matched.map(|m| {
                    let policy = snapshot.policy(m.policy);
                    format!(
                        "{}/{}/{}",
                        policy.namespace,
                        policy.name,
                        snapshot.rule(m).name
                    )
                });
                let transports: Vec<String> =
                    decision.transports().map(|t| t.to_string()).collect();
                out.push(format!(
                    "{pod} → {destination}:{port}/{protocol} = {by:?} {transports:?}"
                ));
            }
        }
    });
    out.sort();
    out
}

fn scenario() -> impl Strategy<Value = (Vec<PodSpec>, Vec<String>, Vec<usize>)> {
    (
        prop::collection::vec((0..3usize, 0..3usize, 0..3usize), 2..10),
        1..7usize,
    )
        .prop_flat_map(|(pods, policy_count)| {
            let policies: Vec<_> = (0..policy_count).map(policy_yaml).collect();
            let total = cluster_documents(&pods).len() + policy_count;
            (
                Just(pods),
                policies,
                Just((0..total).collect::<Vec<usize>>()).prop_shuffle(),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn decisions_do_not_depend_on_read_order((pods, policies, order) in scenario()) {
        let mut documents = cluster_documents(&pods);
        documents.extend(policies);
        let shuffled: Vec<String> = order.iter().map(|i| documents[*i].clone()).collect();
        let reversed: Vec<String> = documents.iter().rev().cloned().collect();
        let expected = all_decisions(&documents, pods.len());
        prop_assert_eq!(&expected, &all_decisions(&shuffled, pods.len()));
        prop_assert_eq!(&expected, &all_decisions(&reversed, pods.len()));
        // Every chain indexed (the encoder indexes only long ones): the same decisions.
        let indexed = Settings { chain_index_min_rules: 1, ..Settings::default() };
        prop_assert_eq!(&expected, &decisions_with(&documents, pods.len(), indexed));
    }
}
