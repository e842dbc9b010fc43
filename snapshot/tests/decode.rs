//! Round trips, and corrupt or truncated input rejected with an error — never a panic.

use std::net::IpAddr;

use proptest::prelude::*;
use stackroute_snapshot::*;

fn sample() -> Vec<u8> {
    let shared = SharedTables::build(&SharedInput {
        zones: vec!["zone-a".into()],
        nodes: vec![
            NodeEntry {
                name: "n1".into(),
                zone: 0,
            },
            NodeEntry {
                name: "n2".into(),
                zone: 0,
            },
        ],
        cluster_networks: vec!["10.0.0.0/8".parse().unwrap()],
        addresses: vec![
            AddressEntry {
                ip: "10.1.0.2".parse().unwrap(),
                kind: AddressKind::Pod,
                identity: 0,
                node: 1,
            },
            AddressEntry {
                ip: "10.1.0.1".parse().unwrap(),
                kind: AddressKind::Pod,
                identity: 1,
                node: 0,
            },
            AddressEntry {
                ip: "fd00::5".parse().unwrap(),
                kind: AddressKind::Pod,
                identity: 0,
                node: 0,
            },
            AddressEntry {
                ip: "172.16.0.2".parse().unwrap(),
                kind: AddressKind::Node,
                identity: NO_IDENTITY,
                node: 1,
            },
        ],
        services: vec![ServiceEntry {
            ip: "10.96.0.1".parse().unwrap(),
            port: 80,
            protocol: Protocol::Tcp,
            backends: vec![("10.1.0.2".parse().unwrap(), 8080)],
        }],
        identity_sets: vec![vec![0]],
    });
    let policy = PolicyEntry {
        kind: PolicyKind::StackRoute,
        tier: Tier::Namespace,
        priority: 500,
        namespace: "ml".into(),
        name: "fabric".into(),
        rules: vec![
            RuleEntry {
                name: "web".into(),
                action: Action::Route,
                peers: Some(vec![PeerEntry::Pods(0)]),
                ports: Some(vec![PortEntry {
                    protocol: Protocol::Tcp,
                    first: 8080,
                    last: 8090,
                }]),
                location: LocationMatch::SameZone,
                isolation: Isolation::None,
                transports: vec![
                    TransportChoice {
                        stack: Stack::Userspace,
                        congestion_control: CongestionControl::Bbr,
                    },
                    TransportChoice::KERNEL_DEFAULT,
                ],
                gate: RuleGate::default(),
            },
            RuleEntry {
                name: "outside".into(),
                action: Action::Route,
                peers: Some(vec![
                    PeerEntry::Networks(vec!["8.8.0.0/16".parse().unwrap()]),
                    PeerEntry::Entity(Entity::World),
                ]),
                ports: None,
                location: LocationMatch::Any,
                isolation: Isolation::KernelEnforced,
                transports: vec![TransportChoice {
                    stack: Stack::Kernel,
                    congestion_control: CongestionControl::Bbr,
                }],
                // As the NetworkPolicy gate leaves a rule that lost RDMA.
                gate: RuleGate {
                    removed_rdma: true,
                    ..RuleGate::default()
                },
            },
        ],
    };
    encode(
        &shared,
        &NodeInput {
            revision: 42,
            own_node: 0,
            default_transport: None,
            policies: vec![&policy],
            chains: vec![vec![0], vec![]],
            // Every chain indexed, so the index sections are in every snapshot tested here.
            chain_index_min_rules: Some(1),
            workloads: vec![
                WorkloadEntry {
                    namespace: "ml".into(),
                    name: "b".into(),
                    ips: vec![],
                    chain: 1,
                },
                WorkloadEntry {
                    namespace: "ml".into(),
                    name: "a".into(),
                    ips: vec!["10.1.0.1".parse().unwrap()],
                    chain: 0,
                },
            ],
        },
    )
}

fn exercise(snapshot: &Snapshot<'_>) {
    let destinations: [IpAddr; 6] = [
        "10.1.0.2".parse().unwrap(),
        "10.1.0.1".parse().unwrap(),
        "fd00::5".parse().unwrap(),
        "8.8.8.8".parse().unwrap(),
        "10.96.0.1".parse().unwrap(),
        "172.16.0.2".parse().unwrap(),
    ];
    let (_, _, workloads) = snapshot.counts();
    for w in 0..workloads as u32 + 1 {
        for ip in destinations {
            for port in [80, 8080] {
                let d = snapshot.decide(WorkloadId(w), ip, port, Protocol::Tcp, &mut NoTrace);
                let _ = d.transports().count();
                if let Some(rule) = d.matched {
                    let _ = (
                        snapshot.rule(rule).name,
                        snapshot.policy(rule.policy).name,
                        snapshot.describe_peers(rule),
                    );
                }
            }
        }
    }
    let _ = snapshot.workload_by_name("ml", "a");
    let _ = snapshot.workload_by_ip("10.1.0.1".parse().unwrap());
    let _ = snapshot.node_name();
}

#[test]
fn round_trip_decides() {
    let bytes = sample();
    let snapshot = Snapshot::parse(&bytes).unwrap();
    assert_eq!(snapshot.revision(), 42);
    assert_eq!(snapshot.node_name(), "n1");
    assert_eq!(snapshot.node(1), ("n2", "zone-a"));
    let a = snapshot.workload_by_name("ml", "a").unwrap();
    assert_eq!(
        snapshot.workload_by_ip("10.1.0.1".parse().unwrap()),
        Some(a)
    );
    assert_eq!(snapshot.workload(a), ("ml", "a"));
    assert!(snapshot.workload_by_name("ml", "zz").is_none());

    let d = snapshot.decide(
        a,
        "10.1.0.2".parse().unwrap(),
        8085,
        Protocol::Tcp,
        &mut NoTrace,
    );
    assert_eq!(d.location, Location::SameZone);
    assert_eq!(d.matched, Some(RuleRef { policy: 0, rule: 0 }));
    assert_eq!(
        d.transports().map(|t| t.to_string()).collect::<Vec<_>>(),
        ["Userspace/BBR", "Kernel/Default"]
    );

    // Through the Service: the only backend is 10.1.0.2:8080.
    let d = snapshot.decide(
        a,
        "10.96.0.1".parse().unwrap(),
        80,
        Protocol::Tcp,
        &mut NoTrace,
    );
    assert_eq!(d.via, Via::ServiceUnanimous { backends: 1 });
    assert_eq!(d.matched, Some(RuleRef { policy: 0, rule: 0 }));

    let d = snapshot.decide(
        a,
        "8.8.8.8".parse().unwrap(),
        53,
        Protocol::Udp,
        &mut NoTrace,
    );
    assert_eq!(
        (d.location, d.isolation, d.transport().to_string()),
        (
            Location::External,
            Isolation::KernelEnforced,
            "Kernel/BBR".into()
        )
    );
    // The gate's flag bits travel with the rule and change nothing else about it.
    let outside = snapshot.rule(d.matched.unwrap());
    assert_eq!(outside.name, "outside");
    assert!(outside.has_peers && !outside.has_ports);
    assert_eq!(outside.gate.removed().collect::<Vec<_>>(), [Stack::Rdma]);
    let web = snapshot.rule(RuleRef { policy: 0, rule: 0 });
    assert!(web.gate.is_empty() && web.has_peers && web.has_ports);

    // Workload b has an empty chain: the default.
    let b = snapshot.workload_by_name("ml", "b").unwrap();
    let d = snapshot.decide(
        b,
        "10.1.0.2".parse().unwrap(),
        8085,
        Protocol::Tcp,
        &mut NoTrace,
    );
    assert_eq!(
        (d.matched, d.transport()),
        (None, TransportChoice::KERNEL_DEFAULT)
    );
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = sample();
    for len in 0..bytes.len() {
        assert!(
            Snapshot::parse(&bytes[..len]).is_err(),
            "truncated to {len} parsed"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(Snapshot::parse(&longer).is_err());
}

#[test]
fn every_flipped_byte_is_detected() {
    let bytes = sample();
    for index in 0..bytes.len() {
        let mut corrupt = bytes.clone();
        corrupt[index] ^= 0x5a;
        assert!(
            Snapshot::parse(&corrupt).is_err(),
            "flip at {index} went unnoticed"
        );
    }
}

/// Byte range of a section, read from the directory.
fn section_range(bytes: &[u8], id: format::SectionId) -> std::ops::Range<usize> {
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let count = le32(32);
    (0..count)
        .map(|i| format::HEADER_LEN + i * format::DIRECTORY_ENTRY_LEN)
        .find(|entry| le32(*entry) == id as usize)
        .map(|entry| le32(entry + 4)..le32(entry + 4) + le32(entry + 8))
        .expect("section present")
}

/// Lookups skip rules and policies on the word of their filters and find addresses by hash,
/// so parse recomputes the filters and probes for every address: a consistent checksum does not make a wrong
/// filter acceptable.
#[test]
fn derived_tables_that_disagree_with_their_data_are_rejected() {
    let bytes = sample();
    let cases = [
        (
            format::SectionId::RuleFilters,
            8,
            "rule filter differs from the rule",
        ),
        (
            format::SectionId::RuleFilters,
            0,
            "rule filter differs from the rule",
        ),
        (
            format::SectionId::PolicyFilters,
            16,
            "summary differs from the policy's rules",
        ),
        (
            format::SectionId::PolicyFilters,
            14,
            "summary differs from the policy's rules",
        ),
    ];
    for (section, offset, problem) in cases {
        let mut corrupt = bytes.clone();
        let at = section_range(&bytes, section).start + offset;
        corrupt[at] ^= 0x01;
        match Snapshot::parse(&with_fixed_checksum(corrupt)) {
            Err(DecodeError::BadRecord { problem: found, .. }) => assert_eq!(found, problem),
            other => panic!("{section:?} byte {offset} flipped: {other:?}"),
        }
    }
    // Moving an address to a free slot keeps every record well-formed but puts the address off
    // its probe sequence, where a lookup would not find it.
    let table = section_range(&bytes, format::SectionId::Addresses4);
    let slots: Vec<usize> = (table.start..table.end).step_by(16).collect();
    let occupied = slots
        .iter()
        .find(|at| bytes[**at + 4] != format::EMPTY_SLOT);
    let free = slots
        .iter()
        .rev()
        .find(|at| bytes[**at + 4] == format::EMPTY_SLOT);
    let (Some(&from), Some(&to)) = (occupied, free) else {
        panic!("sample has an address and a free slot");
    };
    let mut corrupt = bytes.clone();
    corrupt.copy_within(from..from + 16, to);
    corrupt[from + 4] = format::EMPTY_SLOT;
    assert!(
        Snapshot::parse(&with_fixed_checksum(corrupt)).is_err(),
        "an address off its probe sequence was accepted"
    );
}

/// Rule peers name identity sets by number (format v2): a number past the last set, or a set
/// whose range leaves its section or whose identities are out of order, is refused.
#[test]
fn identity_set_references_are_checked() {
    let bytes = sample();
    let peers = section_range(&bytes, format::SectionId::Peers);
    let pods_peer = (peers.start..peers.end)
        .step_by(format::peer::LEN)
        .find(|at| bytes[*at] == format::PEER_PODS)
        .expect("the sample has a pods peer");
    let ranges = section_range(&bytes, format::SectionId::IdentitySetRanges);
    let sets = (ranges.len() / format::identity_set_range::LEN) as u32;
    let mut corrupt = bytes.clone();
    corrupt[pods_peer + 4..pods_peer + 8].copy_from_slice(&sets.to_le_bytes());
    match Snapshot::parse(&with_fixed_checksum(corrupt)) {
        Err(DecodeError::BadRecord {
            section, problem, ..
        }) => {
            assert_eq!(section, "peers");
            assert_eq!(problem, "names an identity set that does not exist");
        }
        other => panic!("a peer naming set {sets} of {sets} was accepted: {other:?}"),
    }
    let mut corrupt = bytes.clone();
    corrupt[ranges.start + 4..ranges.start + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        matches!(
            Snapshot::parse(&with_fixed_checksum(corrupt)),
            Err(DecodeError::BadRecord {
                section: "identity-set-ranges",
                ..
            })
        ),
        "an identity set running past its section was accepted"
    );
}

/// Bytes written at an offset of a record.
type Edit<'a> = (usize, &'a [u8]);

/// Format v3: a backend names its address (a slot of the IPv4 address book here); a source
/// this version does not know, an empty slot or a record past its section is refused.
#[test]
fn backend_addresses_are_checked() {
    let bytes = sample();
    let backend = section_range(&bytes, format::SectionId::Backends).start;
    assert_eq!(bytes[backend], format::backend::IN_ADDRESSES4);
    let slots = section_range(&bytes, format::SectionId::Addresses4);
    let empty = (0..slots.len() / format::address4::LEN)
        .find(|slot| bytes[slots.start + slot * format::address4::LEN + 4] == format::EMPTY_SLOT)
        .expect("the sample's address book has a free slot") as u32;
    let cases: [(&[Edit], &str); 3] = [
        (&[(0, &[7])], "unknown address source"),
        (&[(4, &empty.to_le_bytes())], "names no address"),
        (
            &[(0, &[format::backend::IN_ENDPOINTS]), (4, &[0, 0, 0, 0])],
            "names no address",
        ),
    ];
    for (edits, problem) in cases {
        let mut corrupt = bytes.clone();
        for (offset, value) in edits {
            corrupt[backend + offset..backend + offset + value.len()].copy_from_slice(value);
        }
        match Snapshot::parse(&with_fixed_checksum(corrupt)) {
            Err(DecodeError::BadRecord {
                section: "backends",
                problem: found,
                ..
            }) => assert_eq!(found, problem),
            other => panic!("{edits:?}: {other:?}"),
        }
    }
}

/// Service verdicts (added by the agent): `decide` reads them with the same results, computing
/// them again replaces them, and a record naming no rule, an unknown outcome or location, or a
/// section of the wrong size is refused.
#[test]
fn service_verdicts_decide_alike_and_are_checked() {
    let bytes = sample();
    let plain = Snapshot::parse(&bytes).unwrap();
    assert!(!plain.has_service_verdicts());
    let published = plain.with_service_verdicts(2, usize::MAX);
    let snapshot = Snapshot::parse(&published).unwrap();
    assert!(snapshot.has_service_verdicts());
    assert_eq!(
        snapshot.with_service_verdicts(1, SERVICE_VERDICT_DECISIONS),
        published,
        "computed again: replaced"
    );
    assert_eq!(
        snapshot.without_service_verdicts(),
        bytes,
        "left out: the original"
    );
    assert_eq!(plain.without_service_verdicts(), bytes);
    let service: IpAddr = "10.96.0.1".parse().unwrap();
    let (_, _, workloads) = plain.counts();
    let mut matched = 0;
    for w in (0..workloads as u32).map(WorkloadId) {
        let expected = plain.decide(w, service, 80, Protocol::Tcp, &mut NoTrace);
        let read = snapshot.decide(w, service, 80, Protocol::Tcp, &mut NoTrace);
        assert!(expected.same_outcome(&read), "{expected:?} vs {read:?}");
        assert_eq!((expected.location, expected.via), (read.location, read.via));
        matched += usize::from(read.matched.is_some());
    }
    assert_eq!(matched, 1, "ml/a's chain routes the Service by rule web");
    // Room for one chain's row (one Service): chain 0 gets it, chain 1 is decided from the
    // backends — with the same results.
    let partly = plain.with_service_verdicts(1, 1);
    let rows = &partly[section_range(&partly, format::SectionId::ServiceVerdictRows)];
    assert_eq!(rows[..4], 0u32.to_le_bytes());
    assert_eq!(rows[4..], format::service_verdict_row::NONE.to_le_bytes());
    let partly = Snapshot::parse(&partly).unwrap();
    for w in (0..workloads as u32).map(WorkloadId) {
        let expected = plain.decide(w, service, 80, Protocol::Tcp, &mut NoTrace);
        let read = partly.decide(w, service, 80, Protocol::Tcp, &mut NoTrace);
        assert!(expected.same_outcome(&read), "{expected:?} vs {read:?}");
        assert_eq!((expected.location, expected.via), (read.location, read.via));
    }

    // Chain 0 (ml/a) matched rule 0 of policy 0; chain 1 got the default: two rows.
    let verdicts = section_range(&published, format::SectionId::ServiceVerdicts);
    assert_eq!(verdicts.len(), 2 * format::service_verdict::LEN);
    let rule_verdict = verdicts.start;
    assert_eq!(
        published[rule_verdict],
        format::service_verdict::OUTCOME_RULE
    );
    let cases: [(usize, &[u8], &str); 4] = [
        (0, &[3], "unknown outcome"),
        (1, &[9], "unknown location"),
        (4, &[1, 0, 0, 0], "policy out of range"),
        (8, &[2, 0, 0, 0], "rule out of range"),
    ];
    for (offset, value, problem) in cases {
        let mut corrupt = published.clone();
        let at = rule_verdict + offset;
        corrupt[at..at + value.len()].copy_from_slice(value);
        match Snapshot::parse(&with_fixed_checksum(corrupt)) {
            Err(DecodeError::BadRecord {
                section: "service-verdicts",
                problem: found,
                ..
            }) => assert_eq!(found, problem),
            other => panic!("verdict byte {offset} set to {value:?}: {other:?}"),
        }
    }
    // Sections cut short in the directory: a row missing (a chain without one), or a chain
    // pointing past the rows.
    let directory_entry = |id: format::SectionId| {
        (0..format::SectionId::ALL.len())
            .map(|i| format::HEADER_LEN + i * format::DIRECTORY_ENTRY_LEN)
            .find(|at| published[*at] == id as u8)
            .unwrap()
    };
    let cut = |id: format::SectionId, len: usize| {
        let mut corrupt = published.clone();
        let entry = directory_entry(id);
        corrupt[entry + 8..entry + 12].copy_from_slice(&(len as u32).to_le_bytes());
        Snapshot::parse(&with_fixed_checksum(corrupt)).unwrap_err()
    };
    assert_eq!(
        cut(
            format::SectionId::ServiceVerdictRows,
            format::service_verdict_row::LEN
        ),
        DecodeError::BadSection("service verdicts are not a row of every Service for every chain")
    );
    assert_eq!(
        cut(
            format::SectionId::ServiceVerdicts,
            format::service_verdict::LEN
        ),
        DecodeError::BadRecord {
            section: "service-verdict-rows",
            index: 1,
            problem: "row out of range"
        }
    );
}

/// The bytes with header length and checksum made to agree with them, so an edit gets past
/// those two cheap checks.
fn with_fixed_checksum(mut bytes: Vec<u8>) -> Vec<u8> {
    format::seal(&mut bytes);
    bytes
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = Snapshot::parse(&bytes);
        if let Ok(snapshot) = Snapshot::parse(&with_fixed_checksum(bytes.clone())) {
            exercise(&snapshot);
        }
    }

    #[test]
    fn mutations_past_the_checksum_never_panic(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = sample();
        for (index, value) in edits {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        let bytes = with_fixed_checksum(bytes);
        if let Ok(snapshot) = Snapshot::parse(&bytes) {
            exercise(&snapshot);
        }
    }
}
