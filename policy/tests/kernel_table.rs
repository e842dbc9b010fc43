//! Property: the kernel hook's table answers what the shim decides. For random clusters and
//! policies, every pod's table (`stackroute_snapshot::kernel_table`) looked up at pod, node,
//! Service, network-edge and random addresses and at ports around every rule's range gives the
//! outcome of `Snapshot::decide` walked as the hook walks it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;
use stackroute_snapshot::kernel_table::{kernel_outcome, kernel_table};
use stackroute_snapshot::{CongestionControl, NoTrace, Protocol};

mod support;
use support::random_cluster::{
    APPS, PodSpec, cluster_documents, each_pod, pod_ip, policy_yaml, service_ip,
};

fn scenario() -> impl Strategy<Value = (Vec<PodSpec>, Vec<String>, Vec<u32>, Vec<u16>)> {
    (
        prop::collection::vec((0..3usize, 0..3usize, 0..3usize), 2..12),
        1..7usize,
    )
        .prop_flat_map(|(pods, policy_count)| {
            let policies: Vec<_> = (0..policy_count).map(policy_yaml).collect();
            (
                Just(pods),
                policies,
                // Random addresses: most near the pods and networks, some anywhere.
                prop::collection::vec(
                    prop_oneof![
                        0x0a00_0000u32..0x0a00_0400,
                        0x0808_0000u32..0x0808_0100,
                        any::<u32>()
                    ],
                    16,
                ),
                prop::collection::vec(any::<u16>(), 8),
            )
        })
}

/// The node allows BBR and Reno, not CUBIC, to unprivileged programs.
fn allowed(cc: CongestionControl) -> bool {
    cc != CongestionControl::Cubic
}

fn check(pods: &[PodSpec], policies: Vec<String>, random: &[u32], random_ports: &[u16]) {
    let mut documents = cluster_documents(pods);
    documents.extend(policies);
    let mut destinations: Vec<IpAddr> = (0..pods.len())
        .map(|i| pod_ip(i).parse().unwrap())
        .collect();
    for text in [
        "172.16.0.1",
        "172.16.0.3",
        "10.0.1.0",
        "10.0.1.255",
        "10.0.0.3",
        "10.0.0.4",
        "10.0.1.200",
        "8.8.0.0",
        "8.8.255.255",
        "8.9.0.0",
        "9.9.9.9",
        "0.0.0.0",
        "255.255.255.255",
        "fd00::1",
        "fcff::1",
        "2001:db8::1",
        "::",
    ] {
        destinations.push(text.parse().unwrap());
    }
    for namespace in 0..3 {
        for app in 0..APPS.len() {
            destinations.push(service_ip(namespace, app).parse().unwrap());
        }
    }
    destinations.extend(random.iter().map(|&a| IpAddr::V4(Ipv4Addr::from(a))));
    destinations.extend(
        random
            .iter()
            .map(|&a| IpAddr::V6(Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(a)))),
    );
    let mut ports = vec![0, 1, 79, 80, 81, 82, 83, 99, 100, 101, 102, 9999, 65535];
    ports.extend_from_slice(random_ports);
    each_pod(&documents, |pod, snapshot, workload| {
        let table = kernel_table(snapshot, workload, allowed);
        for &destination in &destinations {
            for &port in &ports {
                let decision =
                    snapshot.decide(workload, destination, port, Protocol::Tcp, &mut NoTrace);
                let expected = kernel_outcome(decision.transports(), decision.isolation, allowed);
                assert_eq!(
                    table.lookup(destination, port),
                    Some(expected),
                    "{pod} → {destination}:{port}: the table ({} entries, port bounds {:?}) \
                     differs from decide ({decision:?})",
                    table.entries.len(),
                    table.port_bounds,
                );
            }
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn the_kernel_table_answers_what_decide_does(
        (pods, policies, random, random_ports) in scenario()
    ) {
        check(&pods, policies, &random, &random_ports);
    }
}
