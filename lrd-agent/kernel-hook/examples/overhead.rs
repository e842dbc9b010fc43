//! What the kernel hook costs a program: connection rate and request/response latency over
//! loopback, measured by the same worker process in a cgroup without and with the hook
//! attached, in rounds that alternate which goes first, medians and their ratio printed side by
//! side.
//!
//! As root: `cargo run --release -p stackroute-kernel-hook --example overhead [-- ROUNDS
//! CONNECTS ROUND_TRIPS]` (defaults 7 rounds of 5,000 connections and 20,000 round trips). The
//! table is a realistic one: 1,000 pods, 300 Services and four rules (ports, networks, a
//! fallback list), a few thousand entries.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use stackroute_kernel_hook::KernelHook;
use stackroute_policy::{ClusterState, Compiled, Settings};
use stackroute_snapshot::Snapshot;
use stackroute_snapshot::kernel_table::{KernelTable, kernel_table};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--worker") {
        let address = |index: usize| args[index].parse().expect("an address");
        let count = |index: usize| args[index].parse().expect("a number");
        return worker(address(2), address(3), count(4), count(5));
    }
    let number = |index: usize, default: usize| {
        args.get(index)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let (rounds, connects, round_trips) = (number(1, 7), number(2, 5000), number(3, 20_000));
    let root = cgroup2_root().expect("a cgroup v2 hierarchy mounted (see /proc/self/mountinfo)");
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap()
        .trim();
    let base = root.join(own.trim_start_matches('/'));
    let plain = base.join(format!("srhook-bench-plain-{}", std::process::id()));
    let hooked = base.join(format!("srhook-bench-hooked-{}", std::process::id()));
    std::fs::create_dir_all(&plain).unwrap();
    std::fs::create_dir_all(&hooked).unwrap();
    let mut table = table();
    // STACKROUTE_BENCH_LEAVE_DEFAULT=1: every answer leaves the default (no setsockopt), to
    // tell the lookup's cost from the congestion control switch's.
    if std::env::var_os("STACKROUTE_BENCH_LEAVE_DEFAULT").is_some_and(|v| v == "1") {
        for entry in &mut table.entries {
            entry.outcome.congestion_control = None;
        }
    }
    println!(
        "table: {} entries, {} port classes",
        table.entries.len(),
        table.port_bounds.len()
    );
    let hook = KernelHook::attach(&hooked, &table).expect("attach the hook (as root)");
    let server = server();
    let mut results: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        // Alternating which goes first cancels what running second costs or gains.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for which in order {
            let cgroup = [&plain, &hooked][which];
            let (rate, p50, cpu) = run_worker(cgroup, server, connects, round_trips);
            results[which].push((rate, p50, cpu));
            println!(
                "round {round} {}: {rate:.0} connections/s, {cpu:.2} CPU µs per connection, \
                 request/response p50 {p50:.1} µs",
                ["without", "with   "][which]
            );
        }
    }
    let counters = hook.counters().unwrap();
    drop(hook);
    let _ = std::fs::remove_dir(&plain);
    let _ = std::fs::remove_dir(&hooked);
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let rate = |which: usize| median(&mut results[which].iter().map(|r| r.0).collect());
    let (rate_plain, rate_hooked) = (rate(0), rate(1));
    let p50 = |which: usize| median(&mut results[which].iter().map(|r| r.1).collect());
    let (p50_plain, p50_hooked) = (p50(0), p50(1));
    let cpu = |which: usize| median(&mut results[which].iter().map(|r| r.2).collect());
    let (cpu_plain, cpu_hooked) = (cpu(0), cpu(1));
    println!("hook counters: {counters:?}");
    println!(
        "CPU µs per connection  without {cpu_plain:.2}  with {cpu_hooked:.2}  ratio {:.3}×",
        cpu_hooked / cpu_plain
    );
    println!(
        "connections/s  without {rate_plain:.0}  with {rate_hooked:.0}  cost {:.3}× (time per connection, with / without)",
        rate_plain / rate_hooked
    );
    println!(
        "request/response p50 µs  without {p50_plain:.1}  with {p50_hooked:.1}  ratio {:.3}×",
        p50_hooked / p50_plain
    );
}

/// Runs this binary as a worker in `cgroup`; (connections per second, round-trip p50 in µs,
/// CPU µs per connection).
fn run_worker(
    cgroup: &Path,
    (sink, echo): (SocketAddr, SocketAddr),
    connects: usize,
    trips: usize,
) -> (f64, f64, f64) {
    let me = std::env::current_exe().unwrap();
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec {} --worker {sink} {echo} {connects} {trips}",
            cgroup.display(),
            me.display()
        ))
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8_lossy(&output.stdout);
    let mut words = text.split_whitespace().map(|w| w.parse().unwrap());
    (
        words.next().unwrap(),
        words.next().unwrap(),
        words.next().unwrap(),
    )
}

fn worker(sink: SocketAddr, echo: SocketAddr, connects: usize, trips: usize) {
    let began = Instant::now();
    let cpu_before = cpu_ns();
    for _ in 0..connects {
        drop(TcpStream::connect(sink).unwrap());
    }
    let rate = connects as f64 / began.elapsed().as_secs_f64();
    let cpu_per_connection = (cpu_ns() - cpu_before) as f64 / connects as f64 / 1e3;
    let mut stream = TcpStream::connect(echo).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut byte = [0u8; 1];
    let mut times = Vec::with_capacity(trips);
    for _ in 0..trips {
        let at = Instant::now();
        stream.write_all(b"x").unwrap();
        stream.read_exact(&mut byte).unwrap();
        times.push(at.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    println!("{rate} {} {cpu_per_connection}", times[times.len() / 2]);
}

/// Time this (single-threaded) process has run on a CPU, in nanoseconds: its own system calls
/// and the loopback packet processing they trigger (`/proc/self/schedstat`). Steadier than
/// the wall clock on a shared machine.
fn cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Two listeners: one closes what it accepts at once (the connection rate), the other echoes
/// (the round trips).
fn server() -> (SocketAddr, SocketAddr) {
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    // A full accept queue drops SYNs (a second's retransmission each): room for every burst.
    rustix::net::listen(&sink, 4096).unwrap();
    let addresses = (sink.local_addr().unwrap(), echo.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in sink.incoming() {
            drop(stream);
        }
    });
    std::thread::spawn(move || {
        for stream in echo.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut byte = [0u8; 1];
                while stream.read_exact(&mut byte).is_ok() {
                    if stream.write_all(&byte).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addresses
}

/// The table of one client pod in a cluster of 1,000 pods and 300 Services.
fn table() -> KernelTable {
    let mut documents = vec![
        "apiVersion: v1\nkind: Node\nmetadata: {name: node0}\nstatus: {addresses: [{type: InternalIP, address: 172.16.0.1}]}".to_string(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: lab}".into(),
        "apiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {name: bench, namespace: lab}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  rules:\n  - name: databases\n    to: [{pods: {podSelector: {matchLabels: {tier: db}}}}]\n    ports: [{port: 5432}, {port: 6379}]\n    transport: {stack: Kernel, congestionControl: BBR}\n  - name: training\n    to: [{pods: {podSelector: {matchLabels: {tier: gpu}}}}]\n    ports: [{port: 29500, endPort: 29600}]\n    transport: {stack: RDMA, fallback: [{stack: Userspace, congestionControl: BBR}, {stack: Kernel, congestionControl: BBR}]}\n  - name: partners\n    to: [{networks: [203.0.113.0/24, 198.51.100.0/24]}]\n    transport: {stack: Kernel, congestionControl: Reno}\n  - name: internet\n    to: [{entity: World}]\n    transport: {stack: Kernel, congestionControl: BBR}\n".into(),
    ];
    let tiers = ["web", "db", "gpu", "batch"];
    for pod in 0..1000 {
        documents.push(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{pod}, namespace: lab, labels: {{app: {}, tier: {}}}}}\nspec: {{nodeName: node0}}\nstatus: {{podIPs: [{{ip: 10.1.{}.{}}}]}}",
            if pod == 0 { "client" } else { "server" },
            tiers[pod % 4],
            pod / 250,
            pod % 250 + 1
        ));
    }
    for service in 0..300 {
        documents.push(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: s{service}, namespace: lab}}\nspec: {{clusterIP: 10.96.{}.{}, ports: [{{port: 80, targetPort: 8080}}]}}",
            service / 250,
            service % 250 + 1
        ));
    }
    let mut state = ClusterState::default();
    for (index, document) in documents.iter().enumerate() {
        let problems = state.load_text(&format!("doc{index}"), document);
        assert!(problems.is_empty(), "{problems:?}");
    }
    let compiled = Compiled::new(&state, Settings::default());
    let (_, bytes) = compiled
        .all_node_snapshots(1)
        .into_iter()
        .find(|(node, _)| node == "node0")
        .unwrap();
    let snapshot = Snapshot::parse(&bytes).unwrap();
    let client = snapshot.workload_by_name("lab", "p0").unwrap();
    kernel_table(&snapshot, client, |cc| {
        matches!(
            cc,
            stackroute_snapshot::CongestionControl::Bbr
                | stackroute_snapshot::CongestionControl::Reno
        )
    })
}

fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fields = mount.split(' ');
        let (root, point) = (fields.nth(3)?, fields.next()?);
        (fs.starts_with("cgroup2 ") && root == "/").then(|| PathBuf::from(point))
    })
}
