//! Format v3, pinned: a fixed input must encode to the committed bytes of
//! `tests/data/v3-sample.snap`, and those bytes must decide as recorded below (the decisions
//! recorded when v1 was pinned: v2 changed where rule peers find their identity sets, v3 where
//! Service backends find their addresses, not what any lookup decides). The v1 and v2 samples
//! stay, to show a reader refuses an older version by name. A writer and a
//! reader that drift together pass round trips but not this; a format change is always
//! deliberate. After a deliberate change, regenerate the file with
//! `STACKROUTE_BLESS=1 cargo test -p stackroute-snapshot --test golden` and review the diff of
//! the decisions table here.

use std::net::IpAddr;
use std::path::PathBuf;

use stackroute_snapshot::*;

fn golden_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/v3-sample.snap")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("literal IP")
}

fn cidr(text: &str) -> Cidr {
    text.parse().expect("literal CIDR")
}

fn choice(stack: Stack, congestion_control: CongestionControl) -> TransportChoice {
    TransportChoice {
        stack,
        congestion_control,
    }
}

fn tcp(first: u16, last: u16) -> PortEntry {
    PortEntry {
        protocol: Protocol::Tcp,
        first,
        last,
    }
}

/// Two zones, three nodes; pods and nodes with IPv4 and IPv6 addresses; three Services (pod
/// backends only, pod and non-pod backends, IPv6); three identity sets.
fn shared_input() -> SharedInput {
    let pod = |text: &str, identity: u32, node: u32| AddressEntry {
        ip: ip(text),
        kind: AddressKind::Pod,
        identity,
        node,
    };
    let node = |text: &str, node: u32| AddressEntry {
        ip: ip(text),
        kind: AddressKind::Node,
        identity: NO_IDENTITY,
        node,
    };
    let node_entry = |name: &str, zone: u32| NodeEntry {
        name: name.into(),
        zone,
    };
    SharedInput {
        zones: vec!["zone-a".into(), "zone-b".into()],
        nodes: vec![
            node_entry("node-a1", 0),
            node_entry("node-a2", 0),
            node_entry("node-b1", 1),
        ],
        cluster_networks: vec![
            cidr("10.244.0.0/16"),
            cidr("10.96.0.0/12"),
            cidr("fd00:10::/32"),
        ],
        addresses: vec![
            // Identity 1: trainers; identity 2: web.
            pod("10.244.1.10", 1, 0),
            pod("fd00:10:244:1::10", 1, 0),
            pod("10.244.1.20", 2, 0),
            pod("fd00:10:244:1::20", 2, 0),
            pod("10.244.2.10", 1, 1),
            pod("10.244.3.10", 2, 2),
            pod("fd00:10:244:3::10", 2, 2),
            node("10.0.1.1", 0),
            node("10.0.2.1", 1),
            node("10.0.3.1", 2),
            node("fd00:10::3:1", 2),
        ],
        services: vec![
            ServiceEntry {
                ip: ip("10.96.0.20"),
                port: 80,
                protocol: Protocol::Tcp,
                backends: vec![(ip("10.244.3.10"), 8080), (ip("10.244.1.20"), 8080)],
            },
            ServiceEntry {
                ip: ip("10.96.0.30"),
                port: 443,
                protocol: Protocol::Tcp,
                backends: vec![(ip("10.244.3.10"), 8443), (ip("192.168.50.7"), 443)],
            },
            ServiceEntry {
                ip: ip("fd00:10:96::53"),
                port: 53,
                protocol: Protocol::Udp,
                backends: vec![(ip("fd00:10:244:3::10"), 5353)],
            },
        ],
        identity_sets: vec![vec![1], vec![1, 2], vec![2]],
    }
}

/// Admin: trainers' collective ports pass to the namespace tier. Namespace `ml`: RDMA within
/// the zone, web (a rule the NetworkPolicy gate split), DNS, the outside world. Baseline: the
/// cluster on the kernel with CUBIC.
fn policies() -> Vec<PolicyEntry> {
    let rule = |name: &str| RuleEntry {
        name: name.into(),
        action: Action::Route,
        peers: None,
        ports: None,
        location: LocationMatch::Any,
        isolation: Isolation::None,
        transports: vec![],
        gate: RuleGate::default(),
    };
    vec![
        PolicyEntry {
            kind: PolicyKind::ClusterStackRoute,
            tier: Tier::Admin,
            priority: 10,
            namespace: String::new(),
            name: "collectives".into(),
            rules: vec![RuleEntry {
                action: Action::Pass,
                peers: Some(vec![PeerEntry::Pods(0)]),
                ports: Some(vec![tcp(29500, 29600)]),
                ..rule("to-namespace")
            }],
        },
        PolicyEntry {
            kind: PolicyKind::StackRoute,
            tier: Tier::Namespace,
            priority: 100,
            namespace: "ml".into(),
            name: "fabric".into(),
            rules: vec![
                RuleEntry {
                    peers: Some(vec![PeerEntry::Pods(0)]),
                    ports: Some(vec![tcp(29500, 29600)]),
                    location: LocationMatch::SameZone,
                    isolation: Isolation::Dedicated,
                    transports: vec![
                        choice(Stack::Rdma, CongestionControl::Default),
                        choice(Stack::Userspace, CongestionControl::Bbr),
                    ],
                    ..rule("rdma")
                },
                RuleEntry {
                    peers: Some(vec![PeerEntry::Pods(2)]),
                    ports: Some(vec![tcp(8080, 8080), tcp(8443, 8443)]),
                    location: LocationMatch::SameCluster,
                    transports: vec![
                        choice(Stack::Userspace, CongestionControl::Bbr),
                        TransportChoice::KERNEL_DEFAULT,
                    ],
                    gate: RuleGate {
                        allowed_part: true,
                        ..RuleGate::default()
                    },
                    ..rule("web")
                },
                RuleEntry {
                    peers: Some(vec![PeerEntry::Pods(1)]),
                    ports: Some(vec![tcp(8080, 8080), tcp(8443, 8443)]),
                    location: LocationMatch::SameCluster,
                    transports: vec![choice(Stack::Kernel, CongestionControl::Bbr)],
                    gate: RuleGate {
                        removed_rdma: true,
                        ..RuleGate::default()
                    },
                    ..rule("web")
                },
                RuleEntry {
                    ports: Some(vec![PortEntry {
                        protocol: Protocol::Udp,
                        first: 53,
                        last: 53,
                    }]),
                    transports: vec![choice(Stack::Kernel, CongestionControl::Reno)],
                    ..rule("dns")
                },
                RuleEntry {
                    peers: Some(vec![
                        PeerEntry::Networks(vec![cidr("192.168.0.0/16"), cidr("2001:db8::/32")]),
                        PeerEntry::Entity(Entity::World),
                    ]),
                    isolation: Isolation::KernelEnforced,
                    transports: vec![choice(Stack::Kernel, CongestionControl::Bbr)],
                    ..rule("outside")
                },
            ],
        },
        PolicyEntry {
            kind: PolicyKind::ClusterStackRoute,
            tier: Tier::Baseline,
            priority: 1000,
            namespace: String::new(),
            name: "baseline".into(),
            rules: vec![RuleEntry {
                peers: Some(vec![PeerEntry::Entity(Entity::Cluster)]),
                transports: vec![choice(Stack::Kernel, CongestionControl::Cubic)],
                ..rule("cluster")
            }],
        },
    ]
}

/// The snapshot of node-a1 at revision 7: `ml/trainer-0` walks every policy, `web/web-0` only
/// the baseline; the installation default is Kernel/CUBIC.
fn encode_sample() -> Vec<u8> {
    encode_sample_indexing(None)
}

/// [`encode_sample`] with chains of at least `chain_index_min_rules` rules indexed.
fn encode_sample_indexing(chain_index_min_rules: Option<usize>) -> Vec<u8> {
    let shared = SharedTables::build(&shared_input());
    let policies = policies();
    let workload = |namespace: &str, name: &str, ips: &[&str], chain: u32| WorkloadEntry {
        namespace: namespace.into(),
        name: name.into(),
        ips: ips.iter().map(|text| ip(text)).collect(),
        chain,
    };
    encode(
        &shared,
        &NodeInput {
            revision: 7,
            own_node: 0,
            default_transport: Some(choice(Stack::Kernel, CongestionControl::Cubic)),
            policies: policies.iter().collect(),
            chains: vec![vec![0, 1, 2], vec![2]],
            workloads: vec![
                workload("web", "web-0", &["10.244.1.20", "fd00:10:244:1::20"], 1),
                workload("ml", "trainer-0", &["10.244.1.10", "fd00:10:244:1::10"], 0),
            ],
            chain_index_min_rules,
        },
    )
}

/// Where the first difference is, by section when it is past the directory.
fn describe_offset(bytes: &[u8], at: usize) -> String {
    use format::{HEADER_LEN, directory, header};
    if at < HEADER_LEN {
        return format!("header byte {at}");
    }
    let count = header::SECTION_COUNT.get(bytes) as usize;
    let directory_end = HEADER_LEN + count * directory::LEN;
    if at < directory_end {
        return format!("directory entry {}", (at - HEADER_LEN) / directory::LEN);
    }
    for entry in bytes[HEADER_LEN..directory_end.min(bytes.len())].chunks_exact(directory::LEN) {
        let offset = directory::OFFSET.get(entry) as usize;
        let size = directory::SIZE.get(entry) as usize;
        if (offset..offset + size).contains(&at) {
            let id = directory::ID.get(entry);
            let section = format::SectionId::ALL
                .iter()
                .find(|s| **s as u32 == id)
                .map_or_else(|| format!("section {id}"), |s| format!("{s:?}"));
            let record = (directory::RECORD_SIZE.get(entry) as usize).max(1);
            let within = at - offset;
            return format!(
                "{section} record {} byte {}",
                within / record,
                within % record
            );
        }
    }
    format!("byte {at}, outside every section")
}

#[test]
fn encoding_matches_the_committed_v3_bytes() {
    let encoded = encode_sample();
    let path = golden_path();
    if std::env::var_os("STACKROUTE_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().expect("data directory")).expect("mkdir");
        std::fs::write(&path, &encoded).expect("write the golden file");
        eprintln!("wrote {} ({} bytes)", path.display(), encoded.len());
        return;
    }
    let committed = std::fs::read(&path).expect("tests/data/v3-sample.snap is committed");
    if encoded != committed {
        let first = encoded
            .iter()
            .zip(&committed)
            .position(|(a, b)| a != b)
            .unwrap_or(encoded.len().min(committed.len()));
        panic!(
            "the encoder no longer writes format v3 as committed: {} bytes encoded, {} \
             committed; first difference at byte {first} ({}; encoded {:02x?}, committed \
             {:02x?}). If the format change is deliberate (a new version), regenerate with \
             `STACKROUTE_BLESS=1 cargo test -p stackroute-snapshot --test golden` and check \
             the recorded decisions in tests/golden.rs.",
            encoded.len(),
            committed.len(),
            describe_offset(&committed, first),
            encoded.get(first..(first + 8).min(encoded.len())),
            committed.get(first..(first + 8).min(committed.len())),
        );
    }
}

/// One recorded decision: from a workload to `ip:port`.
struct Case {
    from: &'static str,
    to: &'static str,
    port: u16,
    protocol: Protocol,
    location: Location,
    /// `(policy, rule)`, or `None` for the installation default.
    matched: Option<(u32, u32)>,
    transports: &'static [&'static str],
    via: Via,
}

/// Decisions of the committed snapshot, recorded when format v1 was pinned (and unchanged by
/// v2 and v3); one row a line.
#[rustfmt::skip]
fn recorded_cases() -> Vec<Case> {
    use Location::*;
    use Protocol::{Tcp, Udp};
    vec![
        // The Admin Pass hands trainer traffic to the namespace tier: RDMA in the zone.
        Case { from: "trainer-0", to: "10.244.2.10", port: 29500, protocol: Tcp, location: SameZone, matched: Some((1, 0)), transports: &["RDMA/Default", "Userspace/BBR"], via: Via::Direct },
        // A trainer's own IPv6 address is on this node, inside the zone.
        Case { from: "trainer-0", to: "fd00:10:244:1::10", port: 29600, protocol: Tcp, location: SameNode, matched: Some((1, 0)), transports: &["RDMA/Default", "Userspace/BBR"], via: Via::Direct },
        Case { from: "trainer-0", to: "10.244.3.10", port: 8080, protocol: Tcp, location: SameCluster, matched: Some((1, 1)), transports: &["Userspace/BBR", "Kernel/Default"], via: Via::Direct },
        Case { from: "trainer-0", to: "10.244.2.10", port: 8443, protocol: Tcp, location: SameZone, matched: Some((1, 2)), transports: &["Kernel/BBR"], via: Via::Direct },
        // Both backends (own node, other zone) pick the web rule.
        Case { from: "trainer-0", to: "10.96.0.20", port: 80, protocol: Tcp, location: SameNode, matched: Some((1, 1)), transports: &["Userspace/BBR", "Kernel/Default"], via: Via::ServiceUnanimous { backends: 2 } },
        // A pod and an outside backend disagree: the installation default.
        Case { from: "trainer-0", to: "10.96.0.30", port: 443, protocol: Tcp, location: SameCluster, matched: None, transports: &["Kernel/Cubic"], via: Via::ServiceAmbiguous { backends: 2 } },
        // Rules see the backend's target port (5353), which the dns rule (53) does not cover.
        Case { from: "trainer-0", to: "fd00:10:96::53", port: 53, protocol: Udp, location: SameCluster, matched: Some((2, 0)), transports: &["Kernel/Cubic"], via: Via::ServiceUnanimous { backends: 1 } },
        Case { from: "trainer-0", to: "8.8.8.8", port: 53, protocol: Udp, location: External, matched: Some((1, 3)), transports: &["Kernel/Reno"], via: Via::Direct },
        Case { from: "trainer-0", to: "192.168.50.7", port: 443, protocol: Tcp, location: External, matched: Some((1, 4)), transports: &["Kernel/BBR"], via: Via::Direct },
        Case { from: "trainer-0", to: "2001:db8::1", port: 22, protocol: Tcp, location: External, matched: Some((1, 4)), transports: &["Kernel/BBR"], via: Via::Direct },
        // Not a trainer: nothing passes, no namespace rule covers 29500 elsewhere, the baseline.
        Case { from: "trainer-0", to: "10.244.3.10", port: 29500, protocol: Tcp, location: SameCluster, matched: Some((2, 0)), transports: &["Kernel/Cubic"], via: Via::Direct },
        Case { from: "trainer-0", to: "10.0.3.1", port: 10250, protocol: Tcp, location: SameCluster, matched: Some((2, 0)), transports: &["Kernel/Cubic"], via: Via::Direct },
        // web-0 walks the baseline only.
        Case { from: "web-0", to: "10.244.1.10", port: 29500, protocol: Tcp, location: SameNode, matched: Some((2, 0)), transports: &["Kernel/Cubic"], via: Via::Direct },
        Case { from: "web-0", to: "8.8.8.8", port: 443, protocol: Tcp, location: External, matched: None, transports: &["Kernel/Cubic"], via: Via::Direct },
        Case { from: "web-0", to: "::ffff:10.0.2.1", port: 22, protocol: Tcp, location: SameZone, matched: Some((2, 0)), transports: &["Kernel/Cubic"], via: Via::Direct },
    ]
}

#[test]
fn committed_bytes_decide_as_recorded() {
    let bytes = std::fs::read(golden_path()).expect("tests/data/v3-sample.snap is committed");
    let snapshot = Snapshot::parse(&bytes).expect("the committed sample parses");

    assert_eq!(snapshot.revision(), 7);
    assert_eq!(snapshot.len(), bytes.len());
    assert_eq!(snapshot.node_name(), "node-a1");
    assert_eq!(snapshot.node(2), ("node-b1", "zone-b"));
    assert_eq!(snapshot.counts(), (3, 7, 2));
    let trainer = snapshot
        .workload_by_name("ml", "trainer-0")
        .expect("trainer");
    let web = snapshot.workload_by_name("web", "web-0").expect("web");
    assert_eq!((trainer, web), (WorkloadId(0), WorkloadId(1)));
    assert_eq!(
        snapshot.workload_by_ip(ip("fd00:10:244:1::10")),
        Some(trainer)
    );
    assert_eq!(snapshot.workload_by_ip(ip("10.244.1.20")), Some(web));
    assert_eq!(snapshot.workload_by_ip(ip("10.244.3.10")), None);
    assert_eq!(snapshot.workload(web), ("web", "web-0"));
    assert_eq!(
        snapshot.classify(ip("fd00:10:244:3::10")),
        (
            DestinationClass::Pod {
                identity: 2,
                node: 2
            },
            Location::SameCluster
        )
    );
    assert_eq!(
        snapshot.classify(ip("10.0.2.1")),
        (DestinationClass::Node { node: 1 }, Location::SameZone)
    );
    let fabric = snapshot.policy(1);
    assert_eq!(
        (
            fabric.kind,
            fabric.tier,
            fabric.priority,
            fabric.namespace,
            fabric.name
        ),
        (PolicyKind::StackRoute, Tier::Namespace, 100, "ml", "fabric")
    );
    assert_eq!(fabric.rule_count, 5);
    let web_rule = snapshot.rule(RuleRef { policy: 1, rule: 1 });
    assert_eq!(
        (web_rule.name, web_rule.location, web_rule.gate.allowed_part),
        ("web", LocationMatch::SameCluster, true)
    );
    assert_eq!(
        web_rule.port_ranges().collect::<Vec<_>>(),
        [(Protocol::Tcp, 8080, 8080), (Protocol::Tcp, 8443, 8443)]
    );
    let pass = snapshot.rule(RuleRef { policy: 0, rule: 0 });
    assert_eq!((pass.name, pass.action), ("to-namespace", Action::Pass));
    assert_eq!(
        snapshot.describe_peers(RuleRef { policy: 1, rule: 4 }),
        ["networks [192.168.0.0/16, 2001:db8::/32]", "entity World"]
    );
    assert_eq!(
        snapshot.service_backend(ip("10.96.0.20"), 80, Protocol::Tcp, 0),
        Some((ip("10.244.1.20"), 8080))
    );

    decides_as_recorded(&snapshot);
}

/// Every recorded case decides as recorded in `snapshot`.
fn decides_as_recorded(snapshot: &Snapshot<'_>) {
    for case in &recorded_cases() {
        let namespace = if case.from == "web-0" { "web" } else { "ml" };
        let from = snapshot
            .workload_by_name(namespace, case.from)
            .expect("workload");
        let decision = snapshot.decide(from, ip(case.to), case.port, case.protocol, &mut NoTrace);
        let transports: Vec<String> = decision.transports().map(|t| t.to_string()).collect();
        let found = (
            decision.location,
            decision.matched.map(|r| (r.policy, r.rule)),
            transports,
            decision.via,
        );
        let expected = (
            case.location,
            case.matched,
            case.transports.iter().map(|t| t.to_string()).collect(),
            case.via,
        );
        assert_eq!(
            found, expected,
            "{} -> {}:{} {}",
            case.from, case.to, case.port, case.protocol
        );
    }
}

/// With every chain indexed (the sample's chains are short; the encoder indexes only long
/// ones), the same bytes plus the index sections, and the same decisions: an index chooses
/// which rules to check, never what they decide.
#[test]
fn indexed_chains_decide_as_recorded() {
    let plain = encode_sample();
    let bytes = encode_sample_indexing(Some(1));
    assert!(bytes.len() > plain.len(), "the index sections are written");
    let snapshot = Snapshot::parse(&bytes).expect("the indexed sample parses");
    decides_as_recorded(&snapshot);
}

/// A snapshot of another format version (an agent's state directory from an older release, a
/// shim reading an older agent's table) is refused with the version named, never misread.
#[test]
fn older_versions_are_refused_by_version() {
    for version in [1u16, 2] {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/data/v{version}-sample.snap"));
        let bytes = std::fs::read(&path).expect("older samples are committed");
        let error = Snapshot::parse(&bytes).expect_err("an older version is not read");
        assert_eq!(error, DecodeError::UnsupportedVersion(version));
        assert!(error.to_string().contains(&version.to_string()), "{error}");
    }
}
