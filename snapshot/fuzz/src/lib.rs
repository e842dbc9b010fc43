//! Fuzz harness logic for `stackroute-snapshot`, shared by the libFuzzer targets
//! (`fuzz_targets/*.rs`) and the stable-toolchain replay tests below.
//!
//! - [`decode`]: `Snapshot::parse` on arbitrary bytes; anything that parses is looked up.
//! - [`mutate`]: a small valid snapshot ([`samples`]) is altered by the input (byte flips,
//!   stores of boundary values, truncation, insertion, removal), sealed again
//!   ([`format::seal`]: length field and CRC made consistent) so the mutation gets past the
//!   cheap checks, and then it is parsed and, when accepted, looked up.
//! - [`apply_delta`]: the delta between two samples (what an agent receives from the
//!   controller), altered the same way or replaced by the input, applied to its base: never a
//!   panic or an unbounded allocation; an unaltered delta rebuilds its target byte for byte.
//!
//! "Looked up" ([`exercise`]) means every public read of a [`Snapshot`]: node, policy, rule and
//! workload accessors, `workload_by_name`, `workload_by_ip`, `classify`, and `decide` for a set
//! of destinations (pods, nodes, Services, unknown and external addresses, IPv4-mapped IPv6, and
//! addresses taken from the input), with a [`Trace`] that checks the trace agrees with the
//! decision.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::OnceLock;

use stackroute_snapshot::{
    Action, AddressEntry, AddressKind, Cidr, CongestionControl, Decision, Entity, Isolation,
    LocationMatch, NO_IDENTITY, NO_ZONE, NoTrace, NodeEntry, NodeInput, PeerEntry, PolicyEntry,
    PolicyKind, PortEntry, Protocol, RuleEntry, RuleGate, RuleRef, ServiceEntry, SharedInput,
    SharedTables, Snapshot, Stack, Tier, Trace, TransportChoice, Verdict, Via, WorkloadEntry,
    WorkloadId, delta, encode, format,
};

/// Most workloads, policies and rules per policy [`exercise`] walks, to keep one run short.
const MAX_WALK: u32 = 32;

/// Target `decode`.
pub fn decode(data: &[u8]) {
    if let Ok(snapshot) = Snapshot::parse(data) {
        // Arbitrary bytes can carry policy summaries that disagree with their rules (the parser
        // does not recompute them), so the fast path is only required not to panic.
        exercise(&snapshot, data, false);
    }
}

/// Target `mutate`. `data[0]` picks the sample and whether the length field is repaired
/// (bit 7 clear: repaired); the rest is a list of 4-byte edits `[op, position hi, position lo,
/// value]`.
pub fn mutate(data: &[u8]) {
    mutate_and_report(data);
}

/// Target `apply_delta`. `data[0]` picks base and target sample (low and high nibble); with
/// bit 0 of `data[1]` set the rest of the input is the delta itself, otherwise it is a list of
/// 4-byte edits (as [`mutate`]'s) of the delta between the two samples.
pub fn apply_delta(data: &[u8]) {
    let [select, mode, rest @ ..] = data else {
        return;
    };
    let samples = samples();
    let base = &samples[usize::from(select & 0x0f) % samples.len()];
    let target = &samples[usize::from(select >> 4) % samples.len()];
    let mut patch = delta::diff(base, target).expect("samples are encoder output");
    if mode & 1 != 0 {
        patch = rest.to_vec();
    } else {
        for edit in rest.chunks_exact(4) {
            apply(
                &mut patch,
                edit[0],
                usize::from(u16::from_be_bytes([edit[1], edit[2]])),
                edit[3],
            );
        }
    }
    match delta::apply(base, &patch) {
        Ok(rebuilt) => {
            if mode & 1 == 0 && rest.len() < 4 {
                assert!(
                    &rebuilt == target,
                    "an unaltered delta rebuilt another snapshot"
                );
            }
            if let Ok(snapshot) = Snapshot::parse(&rebuilt) {
                exercise(&snapshot, rest, false);
            }
        }
        Err(_) if mode & 1 == 0 && rest.len() < 4 => {
            panic!("an unaltered delta between samples must apply")
        }
        Err(_) => {}
    }
}

/// [`mutate`], returning whether the mutated snapshot parsed (and so was looked up).
pub fn mutate_and_report(data: &[u8]) -> bool {
    let Some((&select, edits)) = data.split_first() else {
        return false;
    };
    let samples = samples();
    let mut bytes = samples[usize::from(select & 0x7f) % samples.len()].clone();
    for edit in edits.chunks_exact(4) {
        apply(
            &mut bytes,
            edit[0],
            usize::from(u16::from_be_bytes([edit[1], edit[2]])),
            edit[3],
        );
    }
    // With bit 7 set the length field stays as edited. Parse rejects a length that disagrees
    // with the bytes before it reads the checksum, so sealing matters (and, the length being
    // right already, only repairs the CRC) exactly when the two agree.
    let keep_length = select & 0x80 != 0;
    if !keep_length || format::header::TOTAL_LEN.get(&bytes) == bytes.len() as u64 {
        format::seal(&mut bytes);
    }
    match Snapshot::parse(&bytes) {
        Ok(snapshot) => {
            // Unedited, the summaries are the encoder's own: the fast path must then agree.
            exercise(&snapshot, edits, edits.len() < 4);
            true
        }
        Err(error) if edits.len() < 4 => {
            panic!("an unmodified sample snapshot must parse: {error}")
        }
        Err(_) => false,
    }
}

fn apply(bytes: &mut Vec<u8>, op: u8, position: usize, value: u8) {
    if bytes.is_empty() {
        bytes.push(value);
        return;
    }
    let at = position % bytes.len();
    match op % 8 {
        0 => bytes[at] ^= value.max(1),
        1 => bytes[at] = value,
        2 => bytes.truncate(at),
        3 | 4 => {
            // Store an interesting 32-bit value: offsets, lengths and counts live in u32 fields.
            let len = bytes.len() as u32;
            let word = match value % 10 {
                0 => 0,
                1 => 1,
                2 => u32::MAX,
                3 => u32::MAX / 2 + 1,
                4 => len,
                5 => len.wrapping_sub(1),
                6 => len.wrapping_add(1),
                7 => u32::from(value),
                8 => u32::from(u16::MAX),
                _ => NO_ZONE - 1,
            };
            let end = (at + 4).min(bytes.len());
            let span = end - at;
            bytes[at..end].copy_from_slice(&word.to_le_bytes()[..span]);
        }
        5 => bytes.insert(at, value),
        6 => {
            bytes.remove(at);
        }
        _ => {
            // Copy a 16-byte block (a directory entry's size) elsewhere.
            let from = (at + usize::from(value) * 16) % bytes.len();
            let end = (from + 16).min(bytes.len());
            let block: Vec<u8> = bytes[from..end].to_vec();
            let to_end = (at + block.len()).min(bytes.len());
            let span = to_end - at;
            bytes[at..to_end].copy_from_slice(&block[..span]);
        }
    }
}

/// Checks that a decision's trace is consistent with the decision: per destination walked (the
/// destination itself, or one Service backend) at most one rule matched, and nothing is reported
/// after it.
#[derive(Default)]
struct Checker {
    matched: Option<RuleRef>,
    after_match: bool,
    segments: u32,
}

impl Trace for Checker {
    fn rule(&mut self, rule: RuleRef, verdict: Verdict) {
        assert!(
            !self.after_match,
            "rule {rule:?} reported ({verdict:?}) after a match in the same walk"
        );
        if verdict == Verdict::Matched {
            self.matched = Some(rule);
            self.after_match = true;
        }
    }

    fn backend(&mut self, _backend: Option<(IpAddr, u16)>) {
        self.segments += 1;
        self.matched = None;
        self.after_match = false;
    }
}

/// Destinations every decision is tried against, besides addresses taken from the input.
fn destinations() -> &'static [(IpAddr, u16)] {
    static LIST: OnceLock<Vec<(IpAddr, u16)>> = OnceLock::new();
    LIST.get_or_init(|| {
        let v4 = |a, b, c, d| IpAddr::V4(Ipv4Addr::new(a, b, c, d));
        let v6 = |text: &str| text.parse::<IpAddr>().expect("literal IPv6");
        vec![
            (v4(10, 244, 1, 10), 29500),
            (v4(10, 244, 1, 11), 29550),
            (v4(10, 244, 2, 10), 29600),
            (v4(10, 244, 3, 10), 29500),
            (v4(10, 244, 1, 20), 8080),
            (v4(10, 244, 2, 20), 8080),
            (v4(10, 0, 1, 1), 10250),
            (v4(10, 0, 2, 1), 22),
            (v4(10, 96, 0, 20), 80),
            (v4(10, 96, 0, 30), 443),
            (v4(10, 96, 0, 40), 53),
            (v4(192, 168, 50, 7), 443),
            (v4(10, 77, 0, 1), 29500),
            (v4(8, 8, 8, 8), 443),
            (v4(0, 0, 0, 0), 0),
            (v4(255, 255, 255, 255), 65535),
            (v6("fd00:10:244:1::10"), 29500),
            (v6("fd00:10:244:3::10"), 443),
            (v6("fd00::1:1"), 10250),
            (v6("fd00:96::20"), 80),
            (v6("2001:db8::1"), 443),
            (v6("::ffff:10.244.1.10"), 29500),
            (v6("::ffff:8.8.8.8"), 443),
            (v6("::"), 0),
        ]
    })
}

/// Every public read of `snapshot`; `data` supplies extra destination addresses. With
/// `trusted_summaries` (the snapshot is as `encode` wrote it), the shim's fast path (`NoTrace`,
/// which skips policies by their summaries) must decide exactly as the rule-by-rule walk.
pub fn exercise(snapshot: &Snapshot<'_>, data: &[u8], trusted_summaries: bool) {
    let _ = (
        snapshot.revision(),
        snapshot.len(),
        snapshot.is_empty(),
        snapshot.node_name(),
    );
    let (policies, rules, workloads) = snapshot.counts();
    assert!(!snapshot.is_empty() && snapshot.len() >= 64);
    for node in [0, 1, 2, 3, u32::MAX - 1, u32::MAX] {
        let _ = snapshot.node(node);
    }

    let mut rules_seen = 0usize;
    for policy in 0..(policies as u32).min(MAX_WALK) {
        let view = snapshot.policy(policy);
        let _ = (
            view.kind,
            view.tier,
            view.priority,
            view.namespace,
            view.name,
        );
        for rule in 0..view.rule_count.min(MAX_WALK) {
            let reference = RuleRef { policy, rule };
            let rule_view = snapshot.rule(reference);
            let _ = (
                rule_view.name,
                rule_view.action,
                rule_view.location,
                rule_view.isolation,
            );
            let _ = (
                rule_view.has_peers,
                rule_view.has_ports,
                rule_view.ports.len(),
            );
            let _ = rule_view.port_ranges().count();
            let _ = rule_view.transports().count();
            let _ = snapshot.describe_peers(reference);
            rules_seen += 1;
        }
    }
    // Policies may share rule records (the format does not forbid overlapping ranges), so
    // `rules_seen` can exceed `rules`; only that walking them all is safe matters here.
    let _ = (rules_seen, rules);
    // Out-of-range indexes are answered with empty values, not panics.
    let _ = snapshot.policy(policies as u32);
    let _ = snapshot.policy(u32::MAX);
    let _ = snapshot.workload(WorkloadId(workloads as u32));
    let _ = snapshot.workload(WorkloadId(u32::MAX));

    let mut extra: Vec<(IpAddr, u16)> = Vec::new();
    for chunk in data.chunks(6).take(8) {
        if chunk.len() == 6 {
            let ip = IpAddr::V4(Ipv4Addr::new(chunk[0], chunk[1], chunk[2], chunk[3]));
            extra.push((ip, u16::from_le_bytes([chunk[4], chunk[5]])));
        }
    }
    for chunk in data.chunks(18).take(4) {
        if chunk.len() == 18 {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&chunk[..16]);
            extra.push((
                IpAddr::V6(Ipv6Addr::from(octets)),
                u16::from_le_bytes([chunk[16], chunk[17]]),
            ));
        }
    }
    let all: Vec<(IpAddr, u16)> = destinations().iter().copied().chain(extra).collect();

    for (ip, _) in &all {
        let _ = snapshot.classify(*ip);
        if let Some(found) = snapshot.workload_by_ip(*ip) {
            let _ = snapshot.workload(found);
        }
    }
    let _ = snapshot.workload_by_name("", "");
    let _ = snapshot.workload_by_name("ml", "trainer-0");
    let _ = snapshot.workload_by_name("\u{10ffff}", "\u{10ffff}");

    for index in 0..(workloads as u32).min(MAX_WALK) {
        let id = WorkloadId(index);
        let (namespace, name) = snapshot.workload(id);
        // Workloads are validated as strictly sorted by (namespace, name), so the name lookup
        // finds exactly this one.
        assert_eq!(
            snapshot.workload_by_name(namespace, name),
            Some(id),
            "workload {index} ({namespace}/{name}) is not found by its own name"
        );
        for (ip, port) in &all {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let mut checker = Checker::default();
                let decision = snapshot.decide(id, *ip, *port, protocol, &mut checker);
                check_decision(snapshot, &decision, &checker);
                let fast = snapshot.decide(id, *ip, *port, protocol, &mut NoTrace);
                if trusted_summaries {
                    assert!(
                        fast.same_outcome(&decision)
                            && fast.location == decision.location
                            && fast.via == decision.via,
                        "fast path {fast:?} differs from rule-by-rule {decision:?} for workload \
                         {index} -> {ip}:{port} {protocol}"
                    );
                }
            }
        }
    }
    // An id past the end is not a workload of this snapshot, but must not panic either.
    let _ = snapshot.decide(
        WorkloadId(u32::MAX),
        IpAddr::V4(Ipv4Addr::new(10, 244, 1, 10)),
        80,
        Protocol::Tcp,
        &mut Checker::default(),
    );
}

fn check_decision(snapshot: &Snapshot<'_>, decision: &Decision<'_>, checker: &Checker) {
    let transports: Vec<TransportChoice> = decision.transports().collect();
    let _ = decision.transport();
    let _ = (decision.location, decision.isolation);
    match (decision.via, decision.matched) {
        (Via::Direct, Some(rule)) => {
            assert_eq!(checker.segments, 1, "a direct decision walks once");
            assert_eq!(
                checker.matched,
                Some(rule),
                "the trace's match differs from the decision's"
            );
            let view = snapshot.rule(rule);
            assert_eq!(view.action, Action::Route, "a Pass rule cannot decide");
            assert_eq!(
                view.transports().collect::<Vec<_>>(),
                transports,
                "the decision's transports are not its rule's"
            );
        }
        (Via::Direct, None) => {
            assert_eq!(checker.segments, 1, "a direct decision walks once");
            assert_eq!(
                checker.matched, None,
                "the trace matched but the decision did not"
            );
            assert_eq!(
                transports.len(),
                1,
                "the installation default is one transport"
            );
        }
        (Via::ServiceUnanimous { backends }, _) => {
            assert!(backends > 0);
            assert_eq!(checker.segments, backends, "one walk per backend");
        }
        (Via::ServiceAmbiguous { backends }, matched) => {
            assert_eq!(matched, None, "an ambiguous Service gets the default");
            assert_eq!(checker.segments, backends, "one walk per backend");
        }
    }
}

fn choice(stack: Stack, congestion_control: CongestionControl) -> TransportChoice {
    TransportChoice {
        stack,
        congestion_control,
    }
}

fn cidr(text: &str) -> Cidr {
    text.parse().expect("literal CIDR")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("literal IP")
}

fn rule(name: &str, location: LocationMatch, transports: Vec<TransportChoice>) -> RuleEntry {
    RuleEntry {
        name: name.to_string(),
        action: Action::Route,
        peers: None,
        ports: None,
        location,
        isolation: Isolation::None,
        transports,
        gate: RuleGate::default(),
    }
}

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
    let tcp = Protocol::Tcp;
    SharedInput {
        zones: vec!["zone-a".into(), "zone-b".into()],
        nodes: vec![
            NodeEntry {
                name: "node-a1".into(),
                zone: 0,
            },
            NodeEntry {
                name: "node-a2".into(),
                zone: 0,
            },
            NodeEntry {
                name: "node-b1".into(),
                zone: 1,
            },
            NodeEntry {
                name: "node-c1".into(),
                zone: NO_ZONE,
            },
        ],
        cluster_networks: vec![cidr("10.0.0.0/8"), cidr("192.168.0.0/16"), cidr("fd00::/8")],
        addresses: vec![
            pod("10.244.1.10", 0, 0),
            pod("10.244.1.11", 0, 0),
            pod("10.244.2.10", 0, 1),
            pod("10.244.3.10", 0, 2),
            pod("10.244.1.20", 1, 0),
            pod("10.244.2.20", 2, 1),
            pod("10.244.4.5", 2, 3),
            pod("fd00:10:244:1::10", 0, 0),
            pod("fd00:10:244:3::10", 0, 2),
            node("10.0.1.1", 0),
            node("10.0.1.2", 1),
            node("10.0.2.1", 2),
            node("fd00::1:1", 0),
        ],
        services: vec![
            ServiceEntry {
                ip: ip("10.96.0.20"),
                port: 80,
                protocol: tcp,
                backends: vec![(ip("10.244.2.20"), 8080)],
            },
            ServiceEntry {
                ip: ip("10.96.0.30"),
                port: 443,
                protocol: tcp,
                backends: vec![(ip("10.244.2.10"), 29500), (ip("10.244.3.10"), 29500)],
            },
            ServiceEntry {
                ip: ip("10.96.0.40"),
                port: 53,
                protocol: Protocol::Udp,
                backends: vec![],
            },
            ServiceEntry {
                ip: ip("fd00:96::20"),
                port: 80,
                protocol: tcp,
                backends: vec![(ip("fd00:10:244:3::10"), 8080)],
            },
        ],
        identity_sets: vec![vec![0], vec![1, 2], vec![0, 1, 2]],
    }
}

fn policies() -> Vec<PolicyEntry> {
    let kernel = TransportChoice::KERNEL_DEFAULT;
    let ports = |first, last| {
        Some(vec![PortEntry {
            protocol: Protocol::Tcp,
            first,
            last,
        }])
    };
    vec![
        PolicyEntry {
            kind: PolicyKind::ClusterStackRoute,
            tier: Tier::Admin,
            priority: 10,
            namespace: String::new(),
            name: "audited".into(),
            rules: vec![
                RuleEntry {
                    action: Action::Pass,
                    peers: Some(vec![PeerEntry::Pods(0)]),
                    ports: ports(29500, 29600),
                    ..rule("trainers-decide", LocationMatch::SameZone, vec![])
                },
                RuleEntry {
                    peers: Some(vec![PeerEntry::Networks(vec![cidr("192.168.50.0/24")])]),
                    isolation: Isolation::KernelEnforced,
                    ..rule("payments", LocationMatch::Any, vec![kernel])
                },
            ],
        },
        PolicyEntry {
            kind: PolicyKind::StackRoute,
            tier: Tier::Namespace,
            priority: 100,
            namespace: "ml".into(),
            name: "trainer-fabric".into(),
            rules: vec![
                RuleEntry {
                    peers: Some(vec![PeerEntry::Pods(0)]),
                    ports: ports(29500, 29600),
                    ..rule(
                        "zone-rdma",
                        LocationMatch::SameZone,
                        vec![
                            choice(Stack::Rdma, CongestionControl::Default),
                            choice(Stack::Userspace, CongestionControl::Bbr),
                            kernel,
                        ],
                    )
                },
                RuleEntry {
                    peers: Some(vec![PeerEntry::Pods(2), PeerEntry::Entity(Entity::Cluster)]),
                    ..rule(
                        "cross-zone",
                        LocationMatch::SameCluster,
                        vec![choice(Stack::Userspace, CongestionControl::Bbr), kernel],
                    )
                },
                RuleEntry {
                    peers: Some(vec![PeerEntry::Networks(vec![
                        cidr("fd00:10:244::/48"),
                        cidr("2001:db8::/32"),
                        cidr("0.0.0.0/0"),
                    ])]),
                    ports: Some(vec![
                        PortEntry {
                            protocol: Protocol::Udp,
                            first: 443,
                            last: 443,
                        },
                        PortEntry {
                            protocol: Protocol::Tcp,
                            first: 0,
                            last: 65535,
                        },
                    ]),
                    ..rule(
                        "v6",
                        LocationMatch::Any,
                        vec![choice(Stack::Userspace, CongestionControl::Cubic), kernel],
                    )
                },
            ],
        },
        PolicyEntry {
            kind: PolicyKind::ClusterStackRoute,
            tier: Tier::Baseline,
            priority: 1000,
            namespace: String::new(),
            name: "egress".into(),
            rules: vec![
                RuleEntry {
                    peers: Some(vec![PeerEntry::Entity(Entity::World)]),
                    isolation: Isolation::KernelEnforced,
                    ..rule(
                        "world",
                        LocationMatch::External,
                        vec![choice(Stack::Kernel, CongestionControl::Bbr), kernel],
                    )
                },
                RuleEntry {
                    peers: Some(vec![PeerEntry::Pods(1)]),
                    isolation: Isolation::Dedicated,
                    ..rule(
                        "shop-dedicated",
                        LocationMatch::SameNode,
                        vec![choice(Stack::Userspace, CongestionControl::Reno)],
                    )
                },
                rule(
                    "anything",
                    LocationMatch::Any,
                    vec![choice(Stack::Kernel, CongestionControl::Cubic)],
                ),
            ],
        },
    ]
}

/// Small valid snapshots: a full one (IPv4 and IPv6, Services, all peer kinds, Pass, every
/// tier), the same tables seen from a zone-less node, and a near-empty one.
pub fn samples() -> &'static [Vec<u8>] {
    static SAMPLES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let shared = SharedTables::build(&shared_input());
        let policies = policies();
        let workload = |namespace: &str, name: &str, ips: &[&str], chain| WorkloadEntry {
            namespace: namespace.into(),
            name: name.into(),
            ips: ips.iter().map(|t| ip(t)).collect(),
            chain,
        };
        let full = NodeInput {
            revision: 42,
            own_node: 0,
            default_transport: Some(TransportChoice::KERNEL_DEFAULT),
            policies: policies.iter().collect(),
            chains: vec![vec![0, 1, 2], vec![0, 2], vec![]],
            // Indexed, so mutations reach the chain index sections too.
            chain_index_min_rules: Some(1),
            workloads: vec![
                workload("ml", "trainer-1", &["10.244.1.11"], 0),
                workload("ml", "trainer-0", &["10.244.1.10", "fd00:10:244:1::10"], 0),
                workload("shop", "frontend-0", &["10.244.1.20"], 1),
                workload("kube-system", "coredns-0", &[], 2),
            ],
        };
        let zoneless = NodeInput {
            revision: 43,
            own_node: 3,
            default_transport: Some(choice(Stack::Userspace, CongestionControl::Bbr)),
            policies: vec![&policies[2]],
            chains: vec![vec![0]],
            workloads: vec![workload("shop", "cart-9", &["10.244.4.5"], 0)],
            chain_index_min_rules: None,
        };
        let empty_shared = SharedTables::build(&SharedInput {
            nodes: vec![NodeEntry {
                name: "solo".into(),
                zone: NO_ZONE,
            }],
            ..SharedInput::default()
        });
        let empty = NodeInput {
            revision: 0,
            own_node: 0,
            default_transport: None,
            policies: vec![],
            chains: vec![vec![]],
            workloads: vec![workload("default", "lonely", &["::1"], 0)],
            chain_index_min_rules: None,
        };
        vec![
            encode(&shared, &full),
            encode(&shared, &zoneless),
            encode(&empty_shared, &empty),
        ]
    })
}

#[cfg(test)]
mod tests {
    //! Stable-toolchain checks of the harness itself: the samples are valid, the committed seeds
    //! replay without a panic, and a deterministic mutation sweep runs clean. Regenerate the
    //! seeds with `STACKROUTE_WRITE_SEEDS=1 cargo test --manifest-path snapshot/fuzz/Cargo.toml`.

    use super::*;
    use std::path::{Path, PathBuf};

    fn seeds(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("seeds")
            .join(target)
    }

    fn seed_files(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(seeds(target))
            .expect("seeds directory")
            .map(|e| e.expect("entry").path())
            .map(|p| {
                let bytes = std::fs::read(&p).expect("read seed");
                (p, bytes)
            })
            .collect();
        files.sort();
        files
    }

    #[test]
    fn samples_parse_and_decide_as_built() {
        let snapshot = Snapshot::parse(&samples()[0]).expect("full sample parses");
        assert_eq!(snapshot.revision(), 42);
        assert_eq!(snapshot.node_name(), "node-a1");
        assert_eq!(snapshot.counts(), (3, 8, 4));
        let trainer = snapshot
            .workload_by_name("ml", "trainer-0")
            .expect("trainer-0");
        let decision = snapshot.decide(
            trainer,
            ip("10.244.2.10"),
            29500,
            Protocol::Tcp,
            &mut NoTrace,
        );
        // The Admin Pass rule hands trainer traffic on to the namespace tier: RDMA.
        assert_eq!(decision.transport().stack, Stack::Rdma);
        for sample in samples() {
            let snapshot = Snapshot::parse(sample).expect("every sample parses");
            exercise(&snapshot, &[], true);
        }
    }

    #[test]
    fn crc_repair_gets_a_mutation_past_the_checksum() {
        let mut bytes = samples()[0].clone();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01; // a byte of the node strings: still a well-formed snapshot
        assert!(matches!(
            Snapshot::parse(&bytes),
            Err(stackroute_snapshot::DecodeError::ChecksumMismatch { .. })
        ));
        format::seal(&mut bytes);
        assert!(
            Snapshot::parse(&bytes).is_ok(),
            "a repaired CRC is accepted"
        );
    }

    #[test]
    fn seeds_replay() {
        if std::env::var_os("STACKROUTE_WRITE_SEEDS").is_some() {
            write_seeds();
        }
        let decode_seeds = seed_files("decode");
        assert!(decode_seeds.len() >= 3, "decode seeds missing");
        for (path, bytes) in &decode_seeds {
            decode(bytes);
            if path.extension().is_some_and(|e| e == "snap") {
                Snapshot::parse(bytes).unwrap_or_else(|e| {
                    panic!(
                        "{}: committed seed no longer parses ({e}); regenerate the seeds",
                        path.display()
                    )
                });
            }
        }
        let mutate_seeds = seed_files("mutate");
        assert!(!mutate_seeds.is_empty(), "mutate seeds missing");
        for (_, bytes) in &mutate_seeds {
            mutate(bytes);
        }
        let delta_seeds = seed_files("apply_delta");
        assert!(delta_seeds.len() >= 3, "apply_delta seeds missing");
        for (_, bytes) in &delta_seeds {
            apply_delta(bytes);
        }
    }

    /// Every pair of samples: the delta rebuilds the target; altered deltas never panic.
    #[test]
    fn deltas_between_samples_apply_and_survive_alteration() {
        for select in [0x00, 0x10, 0x01, 0x20, 0x02, 0x21, 0x12] {
            apply_delta(&[select, 0]);
            for position in (0..600u16).step_by(7) {
                let [hi, lo] = position.to_be_bytes();
                for op in 0..8 {
                    apply_delta(&[select, 0, op, hi, lo, 0xa5]);
                }
            }
        }
    }

    /// A small deterministic sweep, so the harness is exercised on stable even without
    /// libFuzzer. `STACKROUTE_FUZZ_ITERATIONS` raises the count.
    #[test]
    fn deterministic_mutation_sweep() {
        let iterations: u64 = std::env::var("STACKROUTE_FUZZ_ITERATIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2_000);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parsed = 0u64;
        for _ in 0..iterations {
            // One to three edits: enough to break things, few enough that some survive.
            let len = 1 + (1 + next() % 3) as usize * 4;
            let input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if mutate_and_report(&input) {
                parsed += 1;
            }
            decode(&input);
        }
        // The CRC repair must let a fair share of mutations through to the lookups, or the
        // target only ever tests the checksum. Parse also recomputes the derived tables (rule
        // and policy filters, the address index), so an edit to the data they summarise is
        // rightly rejected; about one in twenty edits survives.
        assert!(
            parsed * 40 >= iterations,
            "only {parsed} of {iterations} mutated snapshots parsed"
        );
        eprintln!("{parsed} of {iterations} mutated snapshots parsed and were looked up");
    }

    fn write_seeds() {
        for (index, sample) in samples().iter().enumerate() {
            std::fs::write(seeds("decode").join(format!("sample-{index}.snap")), sample)
                .expect("write decode seed");
        }
        // Header only, and a truncated snapshot: rejections.
        std::fs::write(seeds("decode").join("header-only.bin"), &samples()[0][..64])
            .expect("write decode seed");
        let mutate_seeds: [(&str, &[u8]); 6] = [
            ("full", &[0]),
            ("zoneless", &[1]),
            ("empty", &[2]),
            ("directory-offset", &[0, 3, 0, 68, 2]),
            ("truncate-keep-length", &[0x80, 2, 0x01, 0x00, 0]),
            ("flip-rules", &[0, 0, 0x01, 0x40, 0x10, 1, 0x00, 0x50, 0x04]),
        ];
        for (name, bytes) in mutate_seeds {
            std::fs::write(seeds("mutate").join(name), bytes).expect("write mutate seed");
        }
        let delta_seeds: [(&str, &[u8]); 4] = [
            ("full-to-zoneless", &[0x10, 0]),
            ("zoneless-to-full", &[0x01, 0]),
            ("full-to-empty", &[0x20, 0]),
            ("flip-prefix", &[0x10, 0, 0, 0x00, 0x30, 0x40]),
        ];
        std::fs::create_dir_all(seeds("apply_delta")).expect("apply_delta seeds directory");
        for (name, bytes) in delta_seeds {
            std::fs::write(seeds("apply_delta").join(name), bytes).expect("write delta seed");
        }
    }
}
