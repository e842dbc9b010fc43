//! Policy engine benchmark (issue 2): compile time and lookup latency at 10,000 rules.
//!
//! Run with `cargo bench -p stackroute-policy --bench engine` (release profile). A plain
//! `harness = false` binary: it prints measured figures and a PASS/MISS summary and never fails
//! on a missed target.
//!
//! 1. Compile: a synthetic cluster (500 nodes in 3 zones, 100 namespaces, 100,000 pods,
//!    1,000 Services with EndpointSlices, 1,000 StackRoutes and 40 ClusterStackRoutes holding
//!    10,000 rules) is built from the Rust types; `Compiled::new` and `all_node_tables` (each node's own part; the
//!    shared tables are encoded once) are
//!    timed separately and together. State generation is not timed.
//! 2. Lookup: node `node-000` hosts one pod of every app of every namespace, so its snapshot
//!    holds every policy. `decide` is timed one call at a time with `Instant`, the timer's own
//!    cost subtracted, and a counting global allocator checks that the loop allocated nothing.
//!    A worst case — one workload whose chain holds all 10,000 rules (a chain that long is
//!    looked up through its index, `stackroute_snapshot::chain_index`) — is reported
//!    separately.
//! 3. Distribution (issue 15): one pod relabelled, to an existing and to a new label set; every
//!    node's snapshot before and after is diffed (`stackroute_snapshot::delta`) and the delta
//!    sizes are reported against the whole snapshot.
//! 4. Kubernetes' envelope (issue 15; only with `-- --envelope`, alone, so the process's peak
//!    memory is the envelope's): 5,000 nodes, 150,000 pods, 5,000 Services, 10,000 rules —
//!    compile time and peak memory, and one relabelled pod's delta for a sample of nodes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
use stackroute_api::validate::{RouteKind, validate_object};
use stackroute_api::{
    Action, ClusterStackRoute, ClusterStackRouteSpec, CongestionControl, Entity, FallbackTransport,
    Isolation, Location, Peer, PodSelectorPair, PortRange, Protocol as ApiProtocol, RouteRule,
    Stack, StackRoute, StackRouteSpec, Subject, Tier, Transport,
};
use stackroute_policy::state::{
    EndpointSliceInfo, NAMESPACE_NAME_LABEL, NodeInfo, PodInfo, ServiceInfo, ServicePortInfo,
};
use stackroute_policy::{ClusterState, Compiled, Settings};
use stackroute_snapshot::{
    NoTrace, Protocol, RuleRef, SERVICE_VERDICT_DECISIONS, Snapshot, Trace, Verdict, WorkloadId,
    delta, format::SectionId,
};

// ---------------------------------------------------------------------------------------------
// Targets, from issue 2: compile ≤ 1 s on 2 cores, lookup p99 ≤ 1 µs without allocation.
const TARGET_COMPILE: Duration = Duration::from_secs(1);
const TARGET_LOOKUP_P99_NS: u64 = 1_000;
/// Issue 15: a chain of 10,000 rules decided in at most this much (p99).
const TARGET_CHAIN_P99_NS: u64 = 10_000;

// Scenario size.
/// The synthetic cluster's size; the rest of its shape is fixed (10 apps per namespace, three
/// zones, 10,000 rules).
#[derive(Clone, Copy)]
struct Scale {
    nodes: usize,
    namespaces: usize,
    pods: usize,
}
/// The benchmark's cluster (issue 2): 500 nodes, 100,000 pods, 1,000 Services.
const SCALE: Scale = Scale {
    nodes: 500,
    namespaces: 100,
    pods: 100_000,
};
/// Kubernetes' scalability envelope (issue 15): 5,000 nodes, 150,000 pods, 5,000 Services.
const ENVELOPE: Scale = Scale {
    nodes: 5_000,
    namespaces: 500,
    pods: 150_000,
};
const NODES: usize = SCALE.nodes;
const ZONES: usize = 3;
const NAMESPACES: usize = SCALE.namespaces;
const APPS: usize = 10;
const PODS: usize = SCALE.pods;
const STACK_ROUTES_PER_NAMESPACE: usize = 10;
const STACK_ROUTE_RULES: usize = 9_500;
const CLUSTER_ROUTES_PER_TIER: usize = 20;
const CLUSTER_ROUTE_RULES: usize = 500;
const LOOKUPS: usize = 400_000;
const WORST_CASE_LOOKUPS: usize = 5_000;
const WORST_CASE_SERVICE_LOOKUPS: usize = 100;
const COMPILE_RUNS: usize = 5;
const HUB: &str = "node-000";

const TIERS: [&str; APPS] = [
    "frontend", "backend", "backend", "db", "cache", "frontend", "backend", "worker", "worker",
    "db",
];
const COMMON_PORTS: [u16; 12] = [
    80, 443, 8080, 8443, 5432, 6379, 3306, 9090, 9092, 2379, 27017, 50051,
];

// ---------------------------------------------------------------------------------------------
// Counting allocator: counts allocations while `COUNTING` is set.

struct CountingAllocator;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

fn count_allocation() {
    if COUNTING.load(Ordering::Relaxed) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds exactly as it does for `System`; counting touches only atomics.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: forwarded unchanged; the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Runs `f` and returns its result with the number of allocations it made.
fn counting_allocations<R>(f: impl FnOnce() -> R) -> (R, u64) {
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let result = f();
    COUNTING.store(false, Ordering::SeqCst);
    (result, ALLOCATIONS.load(Ordering::SeqCst) - before)
}

// ---------------------------------------------------------------------------------------------
// Deterministic randomness (SplitMix64): the same cluster and lookups on every run.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn percent(&mut self, p: usize) -> bool {
        self.below(100) < p
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// `n` rule counts in `1..=25` summing to exactly `total`.
fn rule_counts(rng: &mut Rng, n: usize, total: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = (0..n).map(|_| 1 + rng.below(25)).collect();
    let mut sum: usize = counts.iter().sum();
    while sum != total {
        let i = rng.below(n);
        if sum > total && counts[i] > 1 {
            counts[i] -= 1;
            sum -= 1;
        } else if sum < total && counts[i] < 25 {
            counts[i] += 1;
            sum += 1;
        }
    }
    counts
}

// ---------------------------------------------------------------------------------------------
// Object builders.

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn match_labels(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: if pairs.is_empty() {
            None
        } else {
            Some(labels(pairs))
        },
        match_expressions: None,
    }
}

fn match_expression(key: &str, operator: &str, values: &[&str]) -> LabelSelector {
    LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        }]),
    }
}

fn pods_peer(namespace_selector: Option<LabelSelector>, pod_selector: LabelSelector) -> Peer {
    Peer {
        pods: Some(PodSelectorPair {
            namespace_selector,
            pod_selector,
        }),
        ..Default::default()
    }
}

fn networks_peer(cidrs: Vec<String>) -> Peer {
    Peer {
        networks: Some(cidrs),
        ..Default::default()
    }
}

fn entity_peer(entity: Entity) -> Peer {
    Peer {
        entity: Some(entity),
        ..Default::default()
    }
}

fn transport(
    stack: Stack,
    cc: CongestionControl,
    fallback: &[(Stack, CongestionControl)],
) -> Transport {
    Transport {
        stack,
        congestion_control: cc,
        fallback: if fallback.is_empty() {
            None
        } else {
            Some(
                fallback
                    .iter()
                    .map(|(stack, cc)| FallbackTransport {
                        stack: *stack,
                        congestion_control: *cc,
                    })
                    .collect(),
            )
        },
    }
}

fn ports(rng: &mut Rng) -> Vec<PortRange> {
    (0..1 + rng.below(3))
        .map(|_| {
            let port = rng.pick(&COMMON_PORTS);
            let protocol = if rng.percent(10) {
                ApiProtocol::UDP
            } else {
                ApiProtocol::TCP
            };
            let end_port = rng
                .percent(30)
                .then(|| i32::from(port) + 1 + rng.below(1000) as i32);
            PortRange {
                protocol,
                port: Some(i32::from(port)),
                end_port: end_port.map(|p| p.min(65535)),
            }
        })
        .collect()
}

/// One realistic rule. Respects every CEL rule of the CRD (checked by `validate_object`).
fn rule(rng: &mut Rng, name: String, allow_pass: bool) -> RouteRule {
    use CongestionControl::{BBR, Cubic, Default as Dflt, Reno};
    use Location::{Any, External, SameCluster, SameNode, SameZone};
    let (to, location, external_only): (Option<Vec<Peer>>, Location, bool) = match rng.below(100) {
        // Pods of an app (own namespace for a StackRoute, every namespace for a cluster policy).
        0..30 => {
            let mut peers = vec![pods_peer(
                None,
                match_labels(&[("app", &format!("app-{}", rng.below(APPS)))]),
            )];
            if rng.percent(30) {
                peers.push(pods_peer(
                    None,
                    match_expression("version", "In", &["v1", "v2"]),
                ));
            }
            (
                Some(peers),
                rng.pick(&[Any, Any, SameZone, SameNode, SameCluster]),
                false,
            )
        }
        // Pods of another team's namespaces.
        30..50 => {
            let team = format!("team-{}", rng.below(20));
            let pod_selector = if rng.percent(50) {
                match_labels(&[("tier", rng.pick(&TIERS))])
            } else {
                match_expression("version", "NotIn", &["v3"])
            };
            (
                Some(vec![pods_peer(
                    Some(match_labels(&[("team", &team)])),
                    pod_selector,
                )]),
                rng.pick(&[Any, SameZone, SameCluster]),
                false,
            )
        }
        // In-cluster networks (pod CIDR blocks).
        50..62 => {
            let cidrs = (0..1 + rng.below(3))
                .map(|_| {
                    let prefix = 13 + rng.below(10);
                    let base = (u32::from(Ipv4Addr::new(10, 64, 0, 0))
                        + (rng.below(1 << 20) as u32))
                        & (u32::MAX << (32 - prefix));
                    format!("{}/{prefix}", Ipv4Addr::from(base))
                })
                .collect();
            (
                Some(vec![networks_peer(cidrs)]),
                rng.pick(&[Any, SameCluster]),
                false,
            )
        }
        // External networks.
        62..70 => {
            let cidrs = (0..1 + rng.below(3))
                .map(|_| match rng.below(3) {
                    0 => "203.0.113.0/24".to_string(),
                    1 => format!("198.51.100.{}/26", 64 * rng.below(4)),
                    _ => format!("{}.{}.0.0/16", 20 + rng.below(180), rng.below(256)),
                })
                .collect();
            (
                Some(vec![networks_peer(cidrs)]),
                rng.pick(&[Any, External]),
                true,
            )
        }
        70..78 => (Some(vec![entity_peer(Entity::World)]), External, true),
        78..86 => (Some(vec![entity_peer(Entity::Cluster)]), Any, false),
        // Any destination, ports only.
        86..95 => (None, rng.pick(&[Any, SameCluster, External]), false),
        // Every pod of the dev namespaces, or a backup network.
        _ => (
            Some(vec![
                pods_peer(
                    Some(match_labels(&[("env", "dev")])),
                    LabelSelector::default(),
                ),
                networks_peer(vec!["10.250.0.0/16".into()]),
            ]),
            Any,
            false,
        ),
    };
    let external = external_only || location == External;
    let ports = rng.percent(60).then(|| ports(rng));
    if allow_pass && rng.percent(20) {
        return RouteRule {
            name,
            action: Some(Action::Pass),
            to,
            ports,
            location,
            isolation: Isolation::None,
            transport: None,
        };
    }
    let (isolation, transport) = match rng.below(100) {
        0..10 => (
            Isolation::KernelEnforced,
            transport(Stack::Kernel, rng.pick(&[Dflt, BBR, Cubic]), &[]),
        ),
        10..15 if !external => (
            Isolation::Dedicated,
            transport(Stack::RDMA, Dflt, &[(Stack::Userspace, BBR)]),
        ),
        10..15 => (Isolation::Dedicated, transport(Stack::Userspace, BBR, &[])),
        _ => (
            Isolation::None,
            match rng.below(if external { 3 } else { 5 }) {
                0 => transport(Stack::Userspace, BBR, &[(Stack::Kernel, BBR)]),
                1 => transport(Stack::Kernel, BBR, &[]),
                2 => transport(Stack::Kernel, rng.pick(&[Cubic, Reno]), &[]),
                3 => transport(
                    Stack::RDMA,
                    Dflt,
                    &[(Stack::Userspace, Dflt), (Stack::Kernel, Dflt)],
                ),
                _ => transport(Stack::Userspace, Cubic, &[]),
            },
        ),
    };
    RouteRule {
        name,
        action: None,
        to,
        ports,
        location,
        isolation,
        transport: Some(transport),
    }
}

fn stack_route(namespace: &str, name: String, spec: StackRouteSpec) -> StackRoute {
    StackRoute {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

fn cluster_stack_route(name: String, spec: ClusterStackRouteSpec) -> ClusterStackRoute {
    ClusterStackRoute {
        metadata: ObjectMeta {
            name: Some(name),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

// ---------------------------------------------------------------------------------------------
// The synthetic cluster.

struct Cluster {
    state: ClusterState,
    /// Every pod address, in pod order (namespace by namespace, app by app).
    pod_ips: Vec<IpAddr>,
    /// `(ClusterIP, port)` of every Service.
    services: Vec<(IpAddr, u16)>,
    node_ips: Vec<IpAddr>,
    /// `(namespace, name)` of the pods on the hub node.
    hub_pods: Vec<(String, String)>,
}

fn namespace_name(n: usize) -> String {
    format!("ns-{n:03}")
}

/// Nodes, namespaces, pods, Services and EndpointSlices; no policies.
fn cluster(rng: &mut Rng, scale: Scale) -> Cluster {
    let mut state = ClusterState::default();
    let mut node_ips = Vec::new();
    for n in 0..scale.nodes {
        let ip = IpAddr::V4(Ipv4Addr::new(192, 168, (n / 256) as u8, (n % 256) as u8));
        node_ips.push(ip);
        state.nodes.push(NodeInfo {
            name: format!("node-{n:03}"),
            zone: Some(format!("zone-{}", (b'a' + (n % ZONES) as u8) as char)),
            addresses: vec![ip],
        });
    }
    for n in 0..scale.namespaces {
        let name = namespace_name(n);
        let team = format!("team-{}", n % 20);
        let env = ["prod", "staging", "dev"][n % 3];
        state.namespaces.insert(
            name.clone(),
            labels(&[(NAMESPACE_NAME_LABEL, &name), ("team", &team), ("env", env)]),
        );
    }
    // Node n owns the pod block 10.64.0.0 + n * 2048 (/21).
    let mut next_on_node = vec![0u32; scale.nodes];
    let mut pod_ips = Vec::with_capacity(scale.pods);
    let mut hub_pods = Vec::new();
    let replicas = scale.pods / (scale.namespaces * APPS);
    let mut service_ip = u32::from(Ipv4Addr::new(10, 96, 0, 10));
    let mut services = Vec::new();
    for ns in 0..scale.namespaces {
        let namespace = namespace_name(ns);
        for (app, tier) in TIERS.iter().enumerate() {
            let app_name = format!("app-{app}");
            let mut addresses = Vec::with_capacity(replicas);
            for replica in 0..replicas {
                // Replica 0 of every app lives on the hub node; the rest spread over the others.
                let node = if replica == 0 {
                    0
                } else {
                    1 + rng.below(scale.nodes - 1)
                };
                let ip = IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 64, 0, 0))
                        + node as u32 * 2048
                        + 1
                        + next_on_node[node],
                ));
                next_on_node[node] += 1;
                let version = match replica * 100 / replicas {
                    0..80 => "v1",
                    80..95 => "v2",
                    _ => "v3",
                };
                let name = format!("{app_name}-{version}-{replica:04}");
                if node == 0 {
                    hub_pods.push((namespace.clone(), name.clone()));
                }
                state.pods.push(PodInfo {
                    namespace: namespace.clone(),
                    name,
                    labels: labels(&[("app", &app_name), ("tier", tier), ("version", version)]),
                    node: Some(format!("node-{node:03}")),
                    ips: vec![ip],
                    host_network: false,
                });
                pod_ips.push(ip);
                addresses.push(ip);
            }
            let port = if *tier == "db" { 5432 } else { 80 };
            let target = if port == 80 { 8080 } else { port };
            let cluster_ip = IpAddr::V4(Ipv4Addr::from(service_ip));
            service_ip += 1;
            services.push((cluster_ip, port));
            state.services.push(ServiceInfo {
                namespace: namespace.clone(),
                name: app_name.clone(),
                cluster_ips: vec![cluster_ip],
                ports: vec![ServicePortInfo {
                    name: "main".into(),
                    port,
                    protocol: Protocol::Tcp,
                }],
            });
            state.endpoint_slices.push(EndpointSliceInfo {
                namespace: namespace.clone(),
                name: format!("{app_name}-abcde"),
                service: app_name,
                ports: vec![("main".into(), target, Protocol::Tcp)],
                addresses,
            });
        }
    }
    Cluster {
        state,
        pod_ips,
        services,
        node_ips,
        hub_pods,
    }
}

/// 10 StackRoutes per namespace (9,500 rules in all) and 40 ClusterStackRoutes (500 rules).
fn realistic_policies(rng: &mut Rng, state: &mut ClusterState, scale: Scale) {
    let counts = rule_counts(
        rng,
        scale.namespaces * STACK_ROUTES_PER_NAMESPACE,
        STACK_ROUTE_RULES,
    );
    for ns in 0..scale.namespaces {
        let namespace = namespace_name(ns);
        for k in 0..STACK_ROUTES_PER_NAMESPACE {
            let n = counts[ns * STACK_ROUTES_PER_NAMESPACE + k];
            let pod_selector = match k % 4 {
                0 => LabelSelector::default(),
                1 | 2 => match_labels(&[("app", &format!("app-{}", rng.below(APPS)))]),
                _ => match_expression("tier", "In", &["frontend", "backend"]),
            };
            let rules = (0..n).map(|i| rule(rng, format!("r{i}"), false)).collect();
            state.stack_routes.push(stack_route(
                &namespace,
                format!("sr-{k}"),
                StackRouteSpec {
                    priority: rng.pick(&[100, 200, 500, 500, 500, 800]),
                    pod_selector,
                    rules,
                },
            ));
        }
    }
    let counts = rule_counts(rng, 2 * CLUSTER_ROUTES_PER_TIER, CLUSTER_ROUTE_RULES);
    for (i, n) in counts.into_iter().enumerate() {
        let tier = if i < CLUSTER_ROUTES_PER_TIER {
            Tier::Admin
        } else {
            Tier::Baseline
        };
        let subject = match i % 3 {
            0 => Subject {
                namespaces: Some(match_labels(&[("env", "prod")])),
                pods: None,
            },
            1 => Subject {
                namespaces: None,
                pods: Some(PodSelectorPair {
                    namespace_selector: Some(match_expression(
                        "team",
                        "In",
                        &["team-1", "team-2", "team-3"],
                    )),
                    pod_selector: match_labels(&[("tier", "db")]),
                }),
            },
            _ => Subject {
                namespaces: Some(LabelSelector::default()),
                pods: None,
            },
        };
        let rules = (0..n)
            .map(|r| rule(rng, format!("r{r}"), tier == Tier::Admin))
            .collect();
        state.cluster_stack_routes.push(cluster_stack_route(
            format!(
                "{}-{i:02}",
                if tier == Tier::Admin { "admin" } else { "base" }
            ),
            ClusterStackRouteSpec {
                tier,
                priority: 10 * (i as i32 % 7),
                subject,
                rules,
            },
        ));
    }
}

/// Worst case: every one of 10,000 rules lies in the chain of `ns-000`'s pods — 360
/// StackRoutes of 25 rules in `ns-000` plus 20 Admin and 20 Baseline ClusterStackRoutes of 25
/// rules selecting it. No rule matches a pod of `ns-001` on port 8080 until rule 21 of the last
/// Baseline policy (evaluation position 9,996); external destinations match nothing at all.
/// Every non-matching rule fails at its last check (peers), after ports and location pass.
fn worst_case_policies(state: &mut ClusterState) {
    let mut rng = Rng(7);
    let miss_rule = |rng: &mut Rng, name: String| RouteRule {
        name,
        action: None,
        to: Some(vec![
            pods_peer(
                Some(match_labels(&[(
                    "team",
                    &format!("team-{}", 2 + rng.below(18)),
                )])),
                match_labels(&[("app", &format!("app-{}", rng.below(APPS)))]),
            ),
            networks_peer(vec![
                format!("{}.{}.0.0/16", 20 + rng.below(180), rng.below(256)),
                "203.0.113.0/24".into(),
                "10.250.0.0/16".into(),
            ]),
        ]),
        ports: Some(vec![PortRange {
            protocol: ApiProtocol::TCP,
            port: Some(1),
            end_port: Some(65535),
        }]),
        location: Location::Any,
        isolation: Isolation::None,
        transport: Some(transport(
            Stack::Userspace,
            CongestionControl::BBR,
            &[(Stack::Kernel, CongestionControl::BBR)],
        )),
    };
    let namespace = namespace_name(0);
    for k in 0..360 {
        let rules = (0..25)
            .map(|i| miss_rule(&mut rng, format!("r{i}")))
            .collect();
        state.stack_routes.push(stack_route(
            &namespace,
            format!("sr-{k:03}"),
            StackRouteSpec {
                priority: 500,
                pod_selector: LabelSelector::default(),
                rules,
            },
        ));
    }
    for i in 0..2 * CLUSTER_ROUTES_PER_TIER {
        let tier = if i < CLUSTER_ROUTES_PER_TIER {
            Tier::Admin
        } else {
            Tier::Baseline
        };
        let last = i == 2 * CLUSTER_ROUTES_PER_TIER - 1;
        let rules = (0..25)
            .map(|r| {
                if last && r == 20 {
                    RouteRule {
                        name: "the-match".into(),
                        action: None,
                        to: Some(vec![entity_peer(Entity::Cluster)]),
                        ports: Some(vec![PortRange {
                            protocol: ApiProtocol::TCP,
                            port: Some(8080),
                            end_port: None,
                        }]),
                        location: Location::Any,
                        isolation: Isolation::None,
                        transport: Some(transport(
                            Stack::RDMA,
                            CongestionControl::Default,
                            &[(Stack::Userspace, CongestionControl::BBR)],
                        )),
                    }
                } else {
                    miss_rule(&mut rng, format!("r{r}"))
                }
            })
            .collect();
        state.cluster_stack_routes.push(cluster_stack_route(
            format!("worst-{i:02}"),
            ClusterStackRouteSpec {
                tier,
                priority: i as i32,
                subject: Subject {
                    namespaces: Some(match_labels(&[(NAMESPACE_NAME_LABEL, &namespace)])),
                    pods: None,
                },
                rules,
            },
        ));
    }
}

/// Checks every policy as the API server would; a benchmark on invalid objects would mislead.
fn validate_policies(state: &ClusterState) -> usize {
    let mut problems = 0;
    for route in &state.stack_routes {
        let value = serde_json::to_value(route).expect("StackRoute serializes");
        for p in validate_object(RouteKind::StackRoute, &value) {
            eprintln!("invalid synthetic StackRoute: {}: {}", p.path, p.message);
            problems += 1;
        }
    }
    for route in &state.cluster_stack_routes {
        let value = serde_json::to_value(route).expect("ClusterStackRoute serializes");
        for p in validate_object(RouteKind::ClusterStackRoute, &value) {
            eprintln!(
                "invalid synthetic ClusterStackRoute: {}: {}",
                p.path, p.message
            );
            problems += 1;
        }
    }
    problems
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers.

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

struct Latency {
    count: usize,
    mean: f64,
    p50: u64,
    p90: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

fn latency(samples: &[u64]) -> Latency {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    Latency {
        count: sorted.len(),
        mean: sorted.iter().sum::<u64>() as f64 / sorted.len().max(1) as f64,
        p50: percentile(&sorted, 50.0),
        p90: percentile(&sorted, 90.0),
        p99: percentile(&sorted, 99.0),
        p999: percentile(&sorted, 99.9),
        max: sorted.last().copied().unwrap_or(0),
    }
}

fn print_latency_header() {
    println!(
        "  {:<28} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}",
        "lookups (ns, timer subtracted)", "n", "mean", "p50", "p90", "p99", "p99.9", "max"
    );
}

fn print_latency(label: &str, l: &Latency) {
    println!(
        "  {:<28} {:>8} {:>8.0} {:>8} {:>8} {:>8} {:>9} {:>10}",
        label, l.count, l.mean, l.p50, l.p90, l.p99, l.p999, l.max
    );
}

/// Median cost of `Instant::now()` + `elapsed()` with nothing between.
fn timer_overhead() -> (u64, u64) {
    let mut samples = Vec::with_capacity(1_000_000);
    for _ in 0..1_000_000 {
        let start = Instant::now();
        samples.push(start.elapsed().as_nanos() as u64);
    }
    samples.sort_unstable();
    (samples[0], samples[samples.len() / 2])
}

/// `(minor page faults, user CPU, system CPU)` of this process so far, from `/proc/self/stat`
/// (CPU in clock ticks, 10 ms each on Linux).
fn process_usage() -> (u64, u64, u64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after_name
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let field = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
    (field(10), field(14), field(15))
}

fn usage_since(before: (u64, u64, u64)) -> String {
    let now = process_usage();
    format!(
        "{} minor faults, user {} ms, sys {} ms",
        now.0 - before.0,
        (now.1 - before.1) * 10,
        (now.2 - before.2) * 10
    )
}

/// Counts the rules a decision evaluates.
#[derive(Default)]
struct RuleCounter {
    evaluated: u64,
    matched_position: Option<u64>,
}

impl Trace for RuleCounter {
    fn rule(&mut self, _rule: RuleRef, verdict: Verdict) {
        self.evaluated += 1;
        if verdict == Verdict::Matched {
            self.matched_position = Some(self.evaluated);
        }
    }
}

/// Sizes of the sections of a snapshot, read from its directory (see `snapshot/src/format.rs`).
fn section_sizes(bytes: &[u8]) -> Vec<(u32, usize)> {
    let le32 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let count = le32(32) as usize;
    (0..count)
        .map(|i| {
            let entry = 64 + 16 * i;
            (le32(entry), le32(entry + 8) as usize)
        })
        .collect()
}

/// Bytes of section `id` of a snapshot (0 when absent).
fn section_bytes(bytes: &[u8], id: SectionId) -> usize {
    section_sizes(bytes)
        .iter()
        .filter(|(found, _)| *found == id as u32)
        .map(|(_, len)| len)
        .sum()
}

fn describe_sections(bytes: &[u8]) -> String {
    let mut sizes = section_sizes(bytes);
    sizes.sort_by_key(|(_, len)| std::cmp::Reverse(*len));
    sizes
        .iter()
        .take(6)
        .map(|(id, len)| {
            let name = SectionId::from_id(*id).map_or("?", SectionId::name);
            format!("{name} {:.0} KiB", *len as f64 / 1024.0)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// The lookups.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Pod,
    External,
    Service,
    Node,
    UnknownInCluster,
}

const KINDS: [(Kind, &str); 5] = [
    (Kind::Pod, "pod IP"),
    (Kind::External, "external IP"),
    (Kind::Service, "Service ClusterIP (100 bk)"),
    (Kind::Node, "node IP"),
    (Kind::UnknownInCluster, "unknown 10.250/16"),
];

#[derive(Clone, Copy)]
struct Lookup {
    workload: WorkloadId,
    ip: IpAddr,
    port: u16,
    kind: Kind,
}

fn lookups(rng: &mut Rng, cluster: &Cluster, workloads: &[WorkloadId], n: usize) -> Vec<Lookup> {
    (0..n)
        .map(|_| {
            let workload = workloads[rng.below(workloads.len())];
            let port = if rng.percent(70) {
                rng.pick(&COMMON_PORTS)
            } else {
                1 + rng.below(65535) as u16
            };
            let (kind, ip, port) = match rng.below(100) {
                0..65 => (Kind::Pod, cluster.pod_ips[rng.below(PODS)], port),
                65..85 => {
                    let ip = match rng.below(3) {
                        0 => Ipv4Addr::new(203, 0, 113, rng.below(256) as u8),
                        1 => Ipv4Addr::new(198, 51, 100, rng.below(256) as u8),
                        _ => Ipv4Addr::new(
                            20 + rng.below(180) as u8,
                            rng.below(256) as u8,
                            rng.below(256) as u8,
                            1 + rng.below(254) as u8,
                        ),
                    };
                    (Kind::External, IpAddr::V4(ip), port)
                }
                85..90 => {
                    let (ip, port) = cluster.services[rng.below(cluster.services.len())];
                    (Kind::Service, ip, port)
                }
                90..95 => (Kind::Node, rng.pick(&cluster.node_ips), port),
                _ => (
                    Kind::UnknownInCluster,
                    IpAddr::V4(Ipv4Addr::new(
                        10,
                        250,
                        rng.below(256) as u8,
                        rng.below(256) as u8,
                    )),
                    port,
                ),
            };
            Lookup {
                workload,
                ip,
                port,
                kind,
            }
        })
        .collect()
}

/// Times every lookup on its own; returns nanoseconds with the timer overhead subtracted, and
/// the allocations the loop made. `warm`: each lookup is made once untimed right before, so its
/// part of the snapshot is in cache.
fn time_lookups(
    snapshot: &Snapshot<'_>,
    lookups: &[Lookup],
    overhead: u64,
    warm: bool,
) -> (Vec<u64>, u64) {
    let mut samples = Vec::with_capacity(lookups.len());
    let ((), allocations) = counting_allocations(|| {
        for lookup in lookups {
            if warm {
                black_box(snapshot.decide(
                    lookup.workload,
                    lookup.ip,
                    lookup.port,
                    Protocol::Tcp,
                    &mut NoTrace,
                ));
            }
            let start = Instant::now();
            let decision = snapshot.decide(
                black_box(lookup.workload),
                black_box(lookup.ip),
                black_box(lookup.port),
                Protocol::Tcp,
                &mut NoTrace,
            );
            let elapsed = start.elapsed().as_nanos() as u64;
            black_box(decision);
            samples.push(elapsed.saturating_sub(overhead));
        }
    });
    (samples, allocations)
}

/// Mean cost per lookup of the whole batch with no per-call timer.
fn batch_mean(snapshot: &Snapshot<'_>, lookups: &[Lookup]) -> f64 {
    let start = Instant::now();
    for lookup in lookups {
        black_box(snapshot.decide(
            black_box(lookup.workload),
            black_box(lookup.ip),
            black_box(lookup.port),
            Protocol::Tcp,
            &mut NoTrace,
        ));
    }
    start.elapsed().as_nanos() as f64 / lookups.len() as f64
}

// ---------------------------------------------------------------------------------------------

struct Summary {
    compile_total: Duration,
    compile_sequential: Duration,
    headline: Latency,
    service: Latency,
    service_decided: Latency,
    all: Latency,
    worst_match: Latency,
    worst_none: Latency,
    worst_service: Latency,
    worst_service_decided: Latency,
    allocations: u64,
    hub_rules: usize,
}

fn main() {
    if std::env::args().any(|a| a == "--envelope") {
        envelope();
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("stackroute policy engine benchmark (issue 2)");
    println!(
        "  {cores} cores available to this process; load average at start: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );

    // ---- 1. compile -------------------------------------------------------------------------
    let started = Instant::now();
    let mut rng = Rng(2026);
    let cluster = cluster(&mut rng, SCALE);
    let mut state = cluster.state.clone();
    realistic_policies(&mut rng, &mut state, SCALE);
    let generation = started.elapsed();
    if std::env::var_os("STACKROUTE_BENCH_PROFILE").is_some() {
        // Lookups only, for a profiler or a cache simulator (valgrind --tool=cachegrind), which
        // count work instead of time and so are not disturbed by other load on the machine.
        let compiled = Compiled::new(&state, Settings::default());
        let bytes = compiled.node_snapshot(HUB, 1).expect("hub snapshot");
        let snapshot = Snapshot::parse(&bytes).expect("hub snapshot parses");
        let workload_ids: Vec<WorkloadId> = cluster
            .hub_pods
            .iter()
            .filter_map(|(ns, name)| snapshot.workload_by_name(ns, name))
            .collect();
        let mut lookups = lookups(&mut Rng(99), &cluster, &workload_ids, 100_000);
        // `STACKROUTE_BENCH_PROFILE=service`: only the Service ClusterIP lookups.
        if std::env::var_os("STACKROUTE_BENCH_PROFILE").is_some_and(|v| v == "service") {
            lookups.retain(|lookup| lookup.kind == Kind::Service);
            lookups = lookups.repeat(400); // 5 % of them: repeated, for enough samples
        }
        let (samples, _) = time_lookups(&snapshot, &lookups, 0, false);
        println!("  profiled {} lookups", samples.len());
        return;
    }
    let started = Instant::now();
    let invalid = validate_policies(&state);
    let validation = started.elapsed();
    let policy_rules = rule_count(&state);
    println!();
    println!(
        "1. compile: synthetic cluster (generated in {}, not timed)",
        ms(generation)
    );
    println!(
        "  {} nodes in {ZONES} zones, {} namespaces, {} pods, {} Services / {} EndpointSlices",
        state.nodes.len(),
        state.namespaces.len(),
        state.pods.len(),
        state.services.len(),
        state.endpoint_slices.len()
    );
    println!(
        "  {} StackRoutes + {} ClusterStackRoutes (Admin and Baseline) = {policy_rules} rules; \
         CRD schema + CEL validation: {} problems ({}, not timed)",
        state.stack_routes.len(),
        state.cluster_stack_routes.len(),
        invalid,
        ms(validation)
    );

    let mut new_times = Vec::new();
    let mut encode_times = Vec::new();
    let mut total_times = Vec::new();
    let mut sizes: Vec<usize> = Vec::new();
    let mut hub_bytes = Vec::new();
    let mut typical_bytes = Vec::new();
    let mut counts = (0, 0);
    let mut identities_note = String::new();
    let mut usage = Vec::new();
    for run in 0..COMPILE_RUNS {
        let before_new = process_usage();
        let start = Instant::now();
        let compiled = Compiled::new(&state, Settings::default());
        let compiled_at = Instant::now();
        let new_usage = usage_since(before_new);
        let before_encode = process_usage();
        // Per revision the controller encodes each node's own tables; the shared tables (address
        // book, Services, identity sets) are encoded once in `Compiled::new`.
        let snapshots = compiled.all_node_tables(1);
        let done = Instant::now();
        usage.push((new_usage, usage_since(before_encode)));
        new_times.push(compiled_at - start);
        encode_times.push(done - compiled_at);
        total_times.push(done - start);
        if run == 0 {
            assert!(
                compiled.problems.is_empty(),
                "policies left out: {:?}",
                compiled.problems
            );
            counts = compiled.counts();
            let shared = compiled.shared_tables().len();
            sizes = snapshots.iter().map(|(_, t)| shared + t.len()).collect();
            hub_bytes = compiled.node_snapshot(HUB, 1).expect("hub snapshot");
            typical_bytes = compiled
                .node_snapshot("node-250", 1)
                .expect("node-250 snapshot");
            let node_part: Vec<usize> = snapshots.iter().map(|(_, t)| t.len()).collect();
            println!(
                "  shared tables {} bytes (encoded once per revision); node tables: min {}, max {} bytes",
                shared,
                node_part.iter().min().copied().unwrap_or(0),
                node_part.iter().max().copied().unwrap_or(0)
            );
            let assemble_start = Instant::now();
            let full = compiled.all_node_snapshots(1);
            println!(
                "  assembling every node's complete snapshot as well (shared tables copied 500 times, {:.0} MiB): {} — not needed per revision; each agent assembles its own",
                full.iter().map(|(_, b)| b.len()).sum::<usize>() as f64 / (1024.0 * 1024.0),
                ms(assemble_start.elapsed())
            );
            drop(full);
            identities_note = format!("{} snapshots", snapshots.len());
        }
        let drop_start = Instant::now();
        drop(snapshots);
        drop(compiled);
        if run == 0 {
            println!(
                "  run 1 (cold): Compiled::new {}, all_node_tables {}, total {} (drop {} not counted)",
                ms(new_times[0]),
                ms(encode_times[0]),
                ms(total_times[0]),
                ms(drop_start.elapsed())
            );
        }
    }
    // One sequential pass: the single-core cost of encoding, for the 2-core speedup.
    let compiled = Compiled::new(&state, Settings::default());
    let before_sequential = process_usage();
    let start = Instant::now();
    let mut sequential_bytes = 0usize;
    for name in compiled.node_names() {
        sequential_bytes += compiled.node_snapshot(name, 1).map_or(0, |b| b.len());
    }
    let sequential = start.elapsed();
    let sequential_usage = usage_since(before_sequential);
    // The same on one core, keeping every snapshot as `all_node_snapshots` does: separates the
    // cost of fresh memory (page faults) from the cost of encoding.
    let before_kept = process_usage();
    let start = Instant::now();
    let kept: Vec<Vec<u8>> = compiled
        .node_names()
        .iter()
        .filter_map(|name| compiled.node_snapshot(name, 1))
        .collect();
    let sequential_kept = start.elapsed();
    let kept_usage = usage_since(before_kept);
    drop(kept);
    drop(compiled);

    let new_median = median(new_times.clone());
    let encode_median = median(encode_times.clone());
    let total_median = median(total_times.clone());
    println!(
        "  compiled {} policies, {} rules into {identities_note}",
        counts.0, counts.1
    );
    println!(
        "  {:<36} {:>10} {:>10} {:>10}   ({COMPILE_RUNS} runs)",
        "", "min", "median", "max"
    );
    for (label, times) in [
        ("Compiled::new", &new_times),
        ("all_node_tables (all cores)", &encode_times),
        ("total", &total_times),
    ] {
        println!(
            "  {:<36} {:>10} {:>10} {:>10}",
            label,
            ms(*times.iter().min().expect("runs")),
            ms(median(times.clone())),
            ms(*times.iter().max().expect("runs"))
        );
    }
    // The encode sample with the median time, and its resource usage.
    let median_run = (0..COMPILE_RUNS)
        .find(|i| encode_times[*i] == encode_median)
        .unwrap_or(0);
    println!(
        "  median run: Compiled::new [{}]; all_node_tables [{}]",
        usage[median_run].0, usage[median_run].1
    );
    println!(
        "  node_snapshot for every node on one core, each dropped at once: {} ({:.2} ms per node; {sequential_usage})",
        ms(sequential),
        sequential.as_secs_f64() * 1e3 / NODES as f64,
    );
    println!(
        "  node_snapshot for every node on one core, all kept: {} ({kept_usage})",
        ms(sequential_kept),
    );
    sizes.sort_unstable();
    let total_bytes: usize = sizes.iter().sum();
    println!(
        "  snapshot bytes per node: min {}, median {}, max {}; all nodes {:.1} MiB (sequential pass {:.1} MiB)",
        sizes[0],
        sizes[sizes.len() / 2],
        sizes[sizes.len() - 1],
        total_bytes as f64 / (1024.0 * 1024.0),
        sequential_bytes as f64 / (1024.0 * 1024.0)
    );
    println!(
        "  largest sections, node-250: {}",
        describe_sections(&typical_bytes)
    );
    println!(
        "  largest sections, {HUB}:  {}",
        describe_sections(&hub_bytes)
    );

    // ---- 2. lookups -------------------------------------------------------------------------
    let parse_start = Instant::now();
    let snapshot = Snapshot::parse(&hub_bytes).expect("hub snapshot parses");
    let parse_time = parse_start.elapsed();
    let (policies, rules, workloads) = snapshot.counts();
    println!();
    println!(
        "2. lookup: snapshot of {HUB}: {policies} policies, {rules} rules, {workloads} workloads, {} bytes (parse + full validation {})",
        snapshot.len(),
        ms(parse_time)
    );
    // What the shim reads: the snapshot as the agent publishes it, with the Service verdicts
    // it computes after each snapshot arrives. The controller's snapshot, which decides a
    // Service's backends at connect time, is timed beside it.
    let start = Instant::now();
    let published_bytes = snapshot.with_service_verdicts(cores, SERVICE_VERDICT_DECISIONS);
    let verdicts_time = start.elapsed();
    let start = Instant::now();
    black_box(snapshot.with_service_verdicts(1, SERVICE_VERDICT_DECISIONS));
    let verdicts_one_core = start.elapsed();
    let decided = snapshot;
    let snapshot = Snapshot::parse(&published_bytes).expect("published snapshot parses");
    println!(
        "  Service verdicts as the agent adds them: {} bytes ({} distinct rows for {} chains × {} Services) computed in {} on {cores} cores, {} on one",
        section_bytes(&published_bytes, SectionId::ServiceVerdicts)
            + section_bytes(&published_bytes, SectionId::ServiceVerdictRows),
        section_bytes(&published_bytes, SectionId::ServiceVerdicts)
            / stackroute_snapshot::format::service_verdict::LEN
            / cluster.services.len().max(1),
        section_bytes(&published_bytes, SectionId::ServiceVerdictRows)
            / stackroute_snapshot::format::service_verdict_row::LEN,
        cluster.services.len(),
        ms(verdicts_time),
        ms(verdicts_one_core)
    );
    let workload_ids: Vec<WorkloadId> = cluster
        .hub_pods
        .iter()
        .map(|(ns, name)| {
            snapshot
                .workload_by_name(ns, name)
                .expect("hub pod is a workload")
        })
        .collect();
    let mut rng = Rng(99);
    let lookups = lookups(&mut rng, &cluster, &workload_ids, LOOKUPS);
    // What the lookups do, counted once with a trace (not timed).
    let mut evaluated = Vec::with_capacity(lookups.len());
    let mut matched = 0usize;
    let mut chain_lengths = Vec::new();
    for lookup in &lookups {
        let mut counter = RuleCounter::default();
        let decision = snapshot.decide(
            lookup.workload,
            lookup.ip,
            lookup.port,
            Protocol::Tcp,
            &mut counter,
        );
        matched += usize::from(decision.matched.is_some());
        if lookup.kind != Kind::Service {
            evaluated.push(counter.evaluated);
        }
    }
    for workload in &workload_ids {
        // An address no rule can match (TEST-NET-2 is not in any generated network)...
        let mut counter = RuleCounter::default();
        let decision = snapshot.decide(
            *workload,
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
            1,
            Protocol::Udp,
            &mut counter,
        );
        // ...walks the whole chain unless a port-less "any destination" rule ends it.
        if decision.matched.is_none() {
            chain_lengths.push(counter.evaluated);
        }
    }
    evaluated.sort_unstable();
    chain_lengths.sort_unstable();
    println!(
        "  {} random lookups: 65% pod IPs (all 100,000 pods), 20% external, 5% Service ClusterIPs, 5% node IPs, 5% unknown in-cluster; ports 70% common, 30% random; TCP",
        lookups.len()
    );
    println!(
        "  {:.1}% decided by a rule, the rest by the default; rules evaluated per direct lookup: p50 {}, p99 {}, max {}",
        100.0 * matched as f64 / lookups.len() as f64,
        percentile(&evaluated, 50.0),
        percentile(&evaluated, 99.0),
        evaluated.last().copied().unwrap_or(0)
    );
    if !chain_lengths.is_empty() {
        println!(
            "  full chain length of the hub's workloads (rules): min {}, median {}, max {}",
            chain_lengths[0],
            chain_lengths[chain_lengths.len() / 2],
            chain_lengths[chain_lengths.len() - 1]
        );
    }

    let (overhead_min, overhead) = timer_overhead();
    println!(
        "  timer overhead (Instant::now + elapsed): min {overhead_min} ns, median {overhead} ns — subtracted from every sample"
    );
    // Warm caches and branch predictors once, then measure.
    black_box(batch_mean(&snapshot, &lookups[..lookups.len() / 10]));
    let (samples, allocations) = time_lookups(&snapshot, &lookups, overhead, false);
    let batch = batch_mean(&snapshot, &lookups);
    print_latency_header();
    let mut headline_samples = Vec::new();
    let mut service_samples = Vec::new();
    for (kind, label) in KINDS {
        let of_kind: Vec<u64> = lookups
            .iter()
            .zip(&samples)
            .filter(|(l, _)| l.kind == kind)
            .map(|(_, s)| *s)
            .collect();
        match kind {
            Kind::Pod | Kind::External => headline_samples.extend_from_slice(&of_kind),
            Kind::Service => service_samples.extend_from_slice(&of_kind),
            _ => {}
        }
        print_latency(label, &latency(&of_kind));
    }
    // The same lookups on the controller's snapshot: Services decided by their backends.
    black_box(batch_mean(&decided, &lookups[..lookups.len() / 10]));
    let (decided_samples, decided_allocations) = time_lookups(&decided, &lookups, overhead, false);
    let decided_service: Vec<u64> = lookups
        .iter()
        .zip(&decided_samples)
        .filter(|(l, _)| l.kind == Kind::Service)
        .map(|(_, s)| *s)
        .collect();
    let service_decided = latency(&decided_service);
    print_latency("Service, backends decided", &service_decided);
    let headline = latency(&headline_samples);
    let service = latency(&service_samples);
    let all = latency(&samples);
    print_latency("pod + external (headline)", &headline);
    print_latency("all", &all);
    // The address-book step alone (public `classify`: binary search over every pod and node
    // address), for the pod and external lookups: how much of a decision it is.
    let mut classify_samples = Vec::with_capacity(headline_samples.len());
    for lookup in lookups
        .iter()
        .filter(|l| matches!(l.kind, Kind::Pod | Kind::External))
    {
        let start = Instant::now();
        let class = snapshot.classify(black_box(lookup.ip));
        let elapsed = start.elapsed().as_nanos() as u64;
        black_box(class);
        classify_samples.push(elapsed.saturating_sub(overhead));
    }
    print_latency("classify() only, pod + ext", &latency(&classify_samples));
    // The same lookups, each timed right after an identical one: what a decision costs when its
    // part of the snapshot is in cache (a connection pool re-connecting), against the cold
    // figures above where every lookup goes to a random workload and destination.
    let headline_lookups: Vec<Lookup> = lookups
        .iter()
        .filter(|l| matches!(l.kind, Kind::Pod | Kind::External))
        .copied()
        .collect();
    let (warm_samples, _) = time_lookups(&snapshot, &headline_lookups, overhead, true);
    print_latency("pod + ext, repeated (warm)", &latency(&warm_samples));
    println!(
        "  batch mean without per-call timer: {batch:.0} ns per lookup over {} lookups",
        lookups.len()
    );
    println!(
        "  allocations during the {} timed lookups: {allocations}",
        lookups.len()
    );

    // ---- worst case -------------------------------------------------------------------------
    let mut worst_state = cluster.state.clone();
    worst_case_policies(&mut worst_state);
    let worst_invalid = validate_policies(&worst_state);
    let start = Instant::now();
    let worst_compiled = Compiled::new(&worst_state, Settings::default());
    let worst_bytes = worst_compiled.node_snapshot(HUB, 1).expect("hub snapshot");
    let worst_compile = start.elapsed();
    drop(worst_compiled);
    let start = Instant::now();
    let worst = Snapshot::parse(&worst_bytes).expect("worst-case snapshot parses");
    let worst_parse = start.elapsed();
    let worst_published = worst.with_service_verdicts(cores, SERVICE_VERDICT_DECISIONS);
    let worst_decided = worst;
    let worst = Snapshot::parse(&worst_published).expect("published worst case parses");
    let index_sections = [
        SectionId::ChainIndexes,
        SectionId::IndexIdentities,
        SectionId::IndexIntervals,
        SectionId::IndexPostings,
    ]
    .map(|id| id as u32);
    let index_bytes: usize = section_sizes(&worst_bytes)
        .iter()
        .filter(|(id, _)| index_sections.contains(id))
        .map(|(_, len)| len)
        .sum();
    let (policies, rules, _) = worst.counts();
    let source = worst
        .workload_by_name(&namespace_name(0), "app-0-v1-0000")
        .expect("ns-000 pod on the hub");
    let target_pod = cluster.pod_ips[PODS / NAMESPACES]; // first pod of ns-001
    let mut counter = RuleCounter::default();
    let decision = worst.decide(source, target_pod, 8080, Protocol::Tcp, &mut counter);
    let match_position = counter.matched_position.unwrap_or(0);
    let mut counter = RuleCounter::default();
    let none = worst.decide(
        source,
        IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
        443,
        Protocol::Tcp,
        &mut counter,
    );
    let none_evaluated = counter.evaluated;
    println!();
    println!(
        "  worst case: one workload whose chain is every rule: {policies} policies, {rules} rules (compiled in {}, {worst_invalid} validation problems); snapshot {} bytes, of which {index_bytes} the chain index (parse + full validation, the index rebuilt, {})",
        ms(worst_compile),
        worst_bytes.len(),
        ms(worst_parse)
    );
    println!(
        "  each non-matching rule passes ports and location and fails on its 2 peers (pods set + 3 CIDRs); match at rule {match_position} of {rules} ({}), external destination evaluates {none_evaluated} rules and gets the default ({})",
        decision.transport(),
        none.transport()
    );
    let repeat = |ip: IpAddr, port: u16, n: usize| {
        let worst_lookups: Vec<Lookup> = (0..n)
            .map(|_| Lookup {
                workload: source,
                ip,
                port,
                kind: Kind::Pod,
            })
            .collect();
        time_lookups(&worst, &worst_lookups, overhead, false)
    };
    let (samples_match, alloc_match) = repeat(target_pod, 8080, WORST_CASE_LOOKUPS);
    let (samples_none, alloc_none) = repeat(
        IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)),
        443,
        WORST_CASE_LOOKUPS,
    );
    let (service_ip, service_port) = cluster.services[APPS]; // ns-001 app-0, 100 backends
    let (samples_service, alloc_service) =
        repeat(service_ip, service_port, WORST_CASE_SERVICE_LOOKUPS);
    let service_lookups: Vec<Lookup> = (0..WORST_CASE_SERVICE_LOOKUPS)
        .map(|_| Lookup {
            workload: source,
            ip: service_ip,
            port: service_port,
            kind: Kind::Service,
        })
        .collect();
    let (samples_service_decided, alloc_service_decided) =
        time_lookups(&worst_decided, &service_lookups, overhead, false);
    print_latency_header();
    let worst_match = latency(&samples_match);
    let worst_none = latency(&samples_none);
    let worst_service = latency(&samples_service);
    print_latency(&format!("match at rule {match_position}"), &worst_match);
    print_latency(&format!("no match ({none_evaluated} rules)"), &worst_none);
    print_latency("Service, 100 backends", &worst_service);
    let worst_service_decided = latency(&samples_service_decided);
    print_latency("Service, backends decided", &worst_service_decided);
    println!(
        "  per rule: {:.1} ns (no-match p50 / rules); allocations: {}",
        worst_none.p50 as f64 / none_evaluated.max(1) as f64,
        alloc_match + alloc_none + alloc_service + alloc_service_decided
    );

    label_change_deltas(&state);

    summary(&Summary {
        compile_total: total_median,
        compile_sequential: new_median + sequential,
        headline,
        service,
        service_decided,
        all,
        worst_match,
        worst_none,
        worst_service,
        worst_service_decided,
        allocations: allocations
            + decided_allocations
            + alloc_match
            + alloc_none
            + alloc_service
            + alloc_service_decided,
        hub_rules: snapshot.counts().1,
    });
}

/// Issue 15: one pod's labels change; the delta every node's agent would receive from its
/// previous snapshot (`stackroute_snapshot::delta`), against the whole snapshot.
/// One change made to a cluster state.
type StateChange = Box<dyn Fn(&mut ClusterState)>;

fn label_change_deltas(state: &ClusterState) {
    let pod = PODS / 2;
    let namespace = &state.pods[pod].namespace;
    let other_labels = state
        .pods
        .iter()
        .find(|p| &p.namespace == namespace && p.labels != state.pods[pod].labels)
        .map(|p| p.labels.clone())
        .expect("another label set in the namespace");
    let mut new_labels = state.pods[pod].labels.clone();
    new_labels.insert("bench-change".into(), "1".into());
    let before = Compiled::new(state, Settings::default()).all_node_snapshots(1);
    println!();
    println!(
        "3. distribution (issue 15): pod {} relabelled; the delta each of {} nodes gets from its previous snapshot",
        state.pods[pod].name,
        before.len()
    );
    // One more pod beside it, at an address nobody had: the address book grows by one entry.
    let mut added = state.pods[pod].clone();
    added.name.push_str("-added");
    added.ips = vec![IpAddr::V4(Ipv4Addr::new(10, 255, 255, 254))];
    let changes: [(&str, StateChange); 3] = [
        (
            "to another pod's labels (an existing identity)",
            Box::new(move |s: &mut ClusterState| s.pods[pod].labels = other_labels.clone()),
        ),
        (
            "to labels nobody had (a new identity)",
            Box::new(move |s: &mut ClusterState| s.pods[pod].labels = new_labels.clone()),
        ),
        (
            "not relabelled: one pod added beside it (a new address; not a target)",
            Box::new(move |s: &mut ClusterState| s.pods.push(added.clone())),
        ),
    ];
    for (what, change) in changes {
        let mut changed = state.clone();
        change(&mut changed);
        let after = Compiled::new(&changed, Settings::default()).all_node_snapshots(2);
        let start = Instant::now();
        let mut deltas: Vec<usize> = before
            .iter()
            .zip(&after)
            .map(|((name, old), (same, new))| {
                assert_eq!(name, same);
                delta::diff(old, new).expect("encoder output").len()
            })
            .collect();
        let diffing = start.elapsed();
        let check = delta::diff(&before[0].1, &after[0].1).expect("encoder output");
        assert_eq!(
            delta::apply(&before[0].1, &check).expect("applies"),
            after[0].1
        );
        deltas.sort_unstable();
        let mut full: Vec<usize> = after.iter().map(|(_, b)| b.len()).collect();
        full.sort_unstable();
        let at = |v: &[usize], q: f64| v[((v.len() - 1) as f64 * q) as usize];
        println!(
            "  {what}: delta median {} bytes, p99 {}, max {} — whole snapshot median {} bytes ({:.0}x); diffing every node: {}",
            at(&deltas, 0.5),
            at(&deltas, 0.99),
            deltas.last().copied().unwrap_or(0),
            at(&full, 0.5),
            at(&full, 0.5) as f64 / at(&deltas, 0.5).max(1) as f64,
            ms(diffing)
        );
    }
}

/// Rules of every StackRoute and ClusterStackRoute.
fn rule_count(state: &ClusterState) -> usize {
    let namespaced = state.stack_routes.iter().map(|r| r.spec.rules.len());
    let cluster = state
        .cluster_stack_routes
        .iter()
        .map(|r| r.spec.rules.len());
    namespaced.chain(cluster).sum()
}

/// `VmRSS` and `VmHWM` (peak) of this process, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Part 4: Kubernetes' scalability envelope. Compiles every node's tables (median of 3), and
/// relabels one pod to an existing and to a new label set; the delta of every 25th node is
/// measured from its complete snapshot before and after (assembling all 5,000 would take
/// tens of gigabytes: that is what agents do, one each).
fn envelope() {
    const TARGET_COMPILE: Duration = Duration::from_secs(2);
    const TARGET_RSS: u64 = 2 << 30;
    const TARGET_DELTA: usize = 64 << 10;
    const SAMPLE_EVERY: usize = 25;
    let started = Instant::now();
    let mut rng = Rng(2026);
    let mut state = cluster(&mut rng, ENVELOPE).state;
    realistic_policies(&mut rng, &mut state, ENVELOPE);
    let rules = rule_count(&state);
    println!("4. Kubernetes' envelope (issue 15)");
    println!(
        "  {} nodes, {} pods, {} Services, {} StackRoutes + {} ClusterStackRoutes = {rules} rules (generated in {}, {} resident)",
        state.nodes.len(),
        state.pods.len(),
        state.services.len(),
        state.stack_routes.len(),
        state.cluster_stack_routes.len(),
        ms(started.elapsed()),
        mib(memory().0)
    );
    let mut times = Vec::new();
    let mut node_bytes = 0;
    let mut shared_bytes = 0;
    for _ in 0..3 {
        let start = Instant::now();
        let compiled = Compiled::new(&state, Settings::default());
        let tables = compiled.all_node_tables(1);
        times.push(start.elapsed());
        node_bytes = tables.iter().map(|(_, t)| t.len()).sum::<usize>();
        shared_bytes = compiled.shared_tables().len();
    }
    let compile = median(times.clone());
    let (resident, peak) = memory();
    println!(
        "  compile (Compiled::new + every node's tables): median {} (runs: {}) — target ≤ {} — {}",
        ms(compile),
        times.iter().map(|t| ms(*t)).collect::<Vec<_>>().join(", "),
        ms(TARGET_COMPILE),
        verdict(compile <= TARGET_COMPILE)
    );
    println!(
        "  shared tables {shared_bytes} bytes once; node tables {node_bytes} bytes for all nodes; peak memory {} (resident now {}), cluster state included — target ≤ {} — {}",
        mib(peak),
        mib(resident),
        mib(TARGET_RSS),
        verdict(peak <= TARGET_RSS)
    );
    let pod = state.pods.len() / 2;
    let namespace = state.pods[pod].namespace.clone();
    let existing = state
        .pods
        .iter()
        .find(|p| p.namespace == namespace && p.labels != state.pods[pod].labels)
        .map(|p| p.labels.clone())
        .expect("another label set in the namespace");
    let mut new_labels = state.pods[pod].labels.clone();
    new_labels.insert("bench-change".into(), "1".into());
    let before = Compiled::new(&state, Settings::default());
    let sample: Vec<String> = before
        .node_names()
        .iter()
        .step_by(SAMPLE_EVERY)
        .cloned()
        .collect();
    let old: Vec<Vec<u8>> = sample
        .iter()
        .map(|n| before.node_snapshot(n, 1).expect("node snapshot"))
        .collect();
    drop(before);
    // What each agent adds before publishing: its node's Service verdicts.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut verdict_times = Vec::new();
    let mut verdict_bytes = Vec::new();
    for bytes in old.iter().take(8) {
        let snapshot = Snapshot::parse(bytes).expect("node snapshot parses");
        let start = Instant::now();
        let published = snapshot.with_service_verdicts(cores, SERVICE_VERDICT_DECISIONS);
        verdict_times.push(start.elapsed());
        verdict_bytes.push(published.len() - bytes.len());
    }
    verdict_bytes.sort_unstable();
    println!(
        "  Service verdicts an agent adds ({} Services, {} nodes sampled, {cores} cores): median {} (max {}), {}–{} bytes added",
        state.services.len(),
        verdict_times.len(),
        ms(median(verdict_times.clone())),
        ms(verdict_times.iter().copied().max().unwrap_or_default()),
        verdict_bytes.first().copied().unwrap_or(0),
        verdict_bytes.last().copied().unwrap_or(0)
    );
    for (what, labels) in [
        ("to another pod's labels (an existing identity)", existing),
        ("to labels nobody had (a new identity)", new_labels),
    ] {
        let mut changed = state.clone();
        changed.pods[pod].labels = labels;
        let after = Compiled::new(&changed, Settings::default());
        let mut deltas: Vec<usize> = Vec::new();
        let mut whole: Vec<usize> = Vec::new();
        for (name, base) in sample.iter().zip(&old) {
            let target = after.node_snapshot(name, 2).expect("node snapshot");
            let patch = delta::diff(base, &target).expect("encoder output");
            deltas.push(patch.len());
            whole.push(target.len());
        }
        deltas.sort_unstable();
        whole.sort_unstable();
        let median_delta = deltas[deltas.len() / 2];
        println!(
            "  pod {} relabelled {what}: delta per node median {} bytes, max {} ({} nodes sampled) vs whole snapshot {} bytes ({:.0}x) — target median ≤ {} — {}",
            state.pods[pod].name,
            median_delta,
            deltas.last().copied().unwrap_or(0),
            deltas.len(),
            whole[whole.len() / 2],
            whole[whole.len() / 2] as f64 / median_delta.max(1) as f64,
            TARGET_DELTA,
            verdict(median_delta <= TARGET_DELTA)
        );
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn summary(s: &Summary) {
    println!();
    println!("summary (targets from issues 2 and 15; figures measured above, nothing asserted)");
    println!(
        "  {} compile 10,000 rules / 100,000 pods / 500 nodes, Compiled::new + all node tables: median {} (target <= {})",
        verdict(s.compile_total <= TARGET_COMPILE),
        ms(s.compile_total),
        ms(TARGET_COMPILE)
    );
    println!(
        "  info new + node_snapshot of every node on one core, each snapshot dropped at once: {} \
         (complete snapshots, each dropped at once)",
        ms(s.compile_sequential),
    );
    println!(
        "  {} lookup p99, pod/external IP, snapshot with {} rules: {} ns (p50 {}, p99.9 {}, max {}; target p99 <= {TARGET_LOOKUP_P99_NS} ns)",
        verdict(s.headline.p99 <= TARGET_LOOKUP_P99_NS),
        s.hub_rules,
        s.headline.p99,
        s.headline.p50,
        s.headline.p999,
        s.headline.max
    );
    println!(
        "  {} lookup p99, Service ClusterIPs (100 backends), Service verdicts: {} ns (p50 {}; target p99 <= {TARGET_LOOKUP_P99_NS} ns); \
         backends decided at connect: p99 {} ns (p50 {}), {:.1}x",
        verdict(s.service.p99 <= TARGET_LOOKUP_P99_NS),
        s.service.p99,
        s.service.p50,
        s.service_decided.p99,
        s.service_decided.p50,
        s.service_decided.p99 as f64 / s.service.p99.max(1) as f64
    );
    println!(
        "  {} lookup p99, all kinds incl. Service ClusterIPs: {} ns (target p99 <= {TARGET_LOOKUP_P99_NS} ns)",
        verdict(s.all.p99 <= TARGET_LOOKUP_P99_NS),
        s.all.p99
    );
    println!(
        "  {} worst case, 10,000-rule chain, match near the end: p99 {} ns; no match: p99 {} ns (target p99 <= {TARGET_CHAIN_P99_NS} ns, issue 15)",
        verdict(s.worst_match.p99.max(s.worst_none.p99) <= TARGET_CHAIN_P99_NS),
        s.worst_match.p99,
        s.worst_none.p99,
    );
    println!(
        "  {} worst case, Service with 100 backends on that chain: p99 {} ns (target p99 <= {TARGET_LOOKUP_P99_NS} ns); backends decided at connect: p99 {} ns",
        verdict(s.worst_service.p99 <= TARGET_LOOKUP_P99_NS),
        s.worst_service.p99,
        s.worst_service_decided.p99
    );
    println!(
        "  {} allocations in every timed lookup loop: {} (target 0)",
        verdict(s.allocations == 0),
        s.allocations
    );
    println!("  reproduce: cargo bench -p stackroute-policy --bench engine   (release profile)");
}
