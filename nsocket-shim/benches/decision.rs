//! The shim's costs, measured side by side in one run (`cargo bench -p nsocket-shim`):
//!
//! 1. one decision's lookup (generation check, workload lookup, `decide`) in the built
//!    `libnsocket.so`, loaded with `dlopen` and called through its `nsocket_probe` export, on
//!    the example cluster's snapshot published as the agent would; p50/p99 over 200 000 calls
//!    and a criterion group;
//! 2. `connect()` + `close()` on loopback with and without `LD_PRELOAD` (a child process of
//!    this benchmark, so the benchmark itself is never preloaded), p50/p99 of each and the ratio;
//! 3. process start-up: `/bin/true` spawned N times with and without `LD_PRELOAD`.
//!
//! Needs the release cdylib: cargo builds it for the benchmark (target/release/libnsocket.so).

use std::ffi::{CString, c_int, c_void};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::Criterion;
use stackroute_local_api::published;

type Probe = unsafe extern "C" fn(*const libc::sockaddr, libc::socklen_t, c_int) -> c_int;

fn shim_path() -> PathBuf {
    // cargo leaves the cdylib built for a benchmark in target/release/deps, next to it.
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps, deps.parent().unwrap()]
        .iter()
        .map(|dir| dir.join("libnsocket.so"))
        .find(|path| path.is_file())
        .expect("libnsocket.so next to the benchmark (cargo bench builds it)")
}

/// Publishes the example cluster's node-a1 snapshot in `dir` as the agent does.
fn publish(dir: &Path) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/cluster");
    let mut state = stackroute_policy::ClusterState::default();
    for name in ["cluster.yaml", "policies.yaml"] {
        let text = std::fs::read_to_string(examples.join(name)).unwrap();
        assert!(state.load_text(name, &text).is_empty());
    }
    let snapshot = stackroute_policy::Compiled::new(&state, stackroute_policy::Settings::default())
        .node_snapshot("node-a1", 1)
        .unwrap();
    let mut file = published::encode_header(1, 1, false, snapshot.len()).to_vec();
    file.extend(&snapshot);
    std::fs::write(dir.join(published::SNAPSHOT_FILE), file).unwrap();
    std::fs::write(
        dir.join(published::GENERATION_FILE),
        published::encode_generation(1),
    )
    .unwrap();
}

fn sockaddr_in(addr: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only")
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn percentiles(mut samples: Vec<u64>) -> (u64, u64) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.50), at(0.99))
}

fn decision(c: &mut Criterion, dir: &Path) {
    // SAFETY: single-threaded at this point; the shim reads these when it is loaded below.
    unsafe {
        std::env::set_var("STACKROUTE_SOCKET_DIR", dir);
        std::env::set_var("STACKROUTE_NAMESPACE", "ml");
        std::env::set_var("STACKROUTE_WORKLOAD", "trainer-0");
    }
    let path = CString::new(shim_path().as_os_str().as_bytes()).unwrap();
    // SAFETY: loading our own library locally: its symbols do not interpose this process.
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!handle.is_null(), "dlopen libnsocket.so");
    // SAFETY: a live handle and a NUL-terminated name.
    let symbol: *mut c_void = unsafe { libc::dlsym(handle, c"nsocket_probe".as_ptr()) };
    assert!(!symbol.is_null());
    // SAFETY: nsocket_probe has exactly this signature (hooks.rs).
    let probe: Probe = unsafe { std::mem::transmute::<*mut c_void, Probe>(symbol) };
    let destination = sockaddr_in("10.244.2.10:29501".parse().unwrap());
    let call = || {
        // SAFETY: a live sockaddr_in of the size given.
        unsafe {
            probe(
                (&raw const destination).cast(),
                size_of::<libc::sockaddr_in>() as libc::socklen_t,
                1,
            )
        }
    };
    let first = call();
    assert!(first >= 0, "the probe found no decision (code {first})");
    let mut samples = Vec::with_capacity(200_000);
    for _ in 0..200_000 {
        let start = Instant::now();
        std::hint::black_box(call());
        samples.push(start.elapsed().as_nanos() as u64);
    }
    let (p50, p99) = percentiles(samples);
    println!(
        "decision (generation check + workload + decide, ml/trainer-0 -> 10.244.2.10:29501): p50 {p50} ns, p99 {p99} ns (target p99 <= 2000 ns; includes ~20-30 ns of clock reads)"
    );
    c.bench_function("decision_lookup", |b| {
        b.iter(|| std::hint::black_box(call()))
    });
}

/// `connect()` + `close()` `count` times, timing each (runs in a re-executed copy of this
/// benchmark, with or without LD_PRELOAD). With `cc`, the program itself sets that congestion
/// control before each connect, as the shim does for the policy's transport: the baseline that
/// separates the shim's own cost from the cost of the transport it applies.
fn connect_loop(target: SocketAddr, count: usize, cc: Option<&[u8]>) -> Vec<u64> {
    let mut samples = Vec::with_capacity(count);
    for _ in 0..count {
        let start = Instant::now();
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        if let Some(name) = cc {
            socket.set_tcp_congestion(name).unwrap();
        }
        socket.connect(&target.into()).unwrap();
        // An abortive close (RST): no TIME_WAIT is left behind. Otherwise every run leaves
        // 22 000 of them, and the kernel's ephemeral port search, which skips them, makes each
        // run slower than the one before: a drift that lands on whichever variant runs later.
        socket.set_linger(Some(Duration::ZERO)).unwrap();
        drop(socket);
        samples.push(start.elapsed().as_nanos() as u64);
    }
    samples
}

fn connect_side_by_side(dir: &Path) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    std::thread::spawn(move || for _ in listener.incoming() {});
    let run = |preload: bool, cc: Option<&str>| -> (u64, u64) {
        let mut command = Command::new(std::env::current_exe().unwrap());
        if let Some(cc) = cc {
            command.env("NSOCKET_BENCH_CC", cc);
        }
        command
            .env("NSOCKET_BENCH_CONNECT", target.to_string())
            .env("STACKROUTE_SOCKET_DIR", dir)
            .env("STACKROUTE_NAMESPACE", "ml")
            .env("STACKROUTE_WORKLOAD", "trainer-0");
        if preload {
            command.env("LD_PRELOAD", shim_path());
        }
        let output = command.output().unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        let mut words = text.split_whitespace().map(|w| w.parse::<u64>().unwrap());
        (words.next().unwrap(), words.next().unwrap())
    };
    // Alternate, so drift hits both sides alike.
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut without_bbr = Vec::new();
    // The order rotates, so any remaining drift hits every variant alike.
    for round in 0..3 {
        for variant in (0..3).map(|i| (i + round) % 3) {
            match variant {
                0 => without.push(run(false, None)),
                1 => with.push(run(true, None)),
                _ => without_bbr.push(run(false, Some("bbr"))),
            }
        }
    }
    let median = |v: &mut Vec<(u64, u64)>, f: fn(&(u64, u64)) -> u64| {
        let mut xs: Vec<u64> = v.iter().map(f).collect();
        xs.sort_unstable();
        xs[xs.len() / 2]
    };
    let (w50, w99) = (median(&mut with, |s| s.0), median(&mut with, |s| s.1));
    let (n50, n99) = (median(&mut without, |s| s.0), median(&mut without, |s| s.1));
    let (b50, b99) = (
        median(&mut without_bbr, |s| s.0),
        median(&mut without_bbr, |s| s.1),
    );
    println!(
        "connect+close on loopback (the policy picks kernel BBR for it; 20 000 per run, median of 3 runs): \
         without shim p50 {n50} ns p99 {n99} ns; with shim p50 {w50} ns p99 {w99} ns (ratio p50 {:.3} p99 {:.3}); \
         without shim, the program setting BBR itself p50 {b50} ns p99 {b99} ns (shim / that: p50 {:.3} p99 {:.3})",
        w50 as f64 / n50 as f64,
        w99 as f64 / n99 as f64,
        w50 as f64 / b50 as f64,
        w99 as f64 / b99 as f64
    );
}

fn startup() {
    let runs = 300;
    let time = |preload: bool| -> Duration {
        let start = Instant::now();
        for _ in 0..runs {
            let mut command = Command::new("/bin/true");
            if preload {
                command.env("LD_PRELOAD", shim_path());
            }
            assert!(command.status().unwrap().success());
        }
        start.elapsed() / runs
    };
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        without.push(time(false));
        with.push(time(true));
    }
    without.sort();
    with.sort();
    println!(
        "start-up of /bin/true ({runs} runs, median of 3): without shim {:?}, with shim {:?}, ratio {:.3}",
        without[1],
        with[1],
        with[1].as_secs_f64() / without[1].as_secs_f64()
    );
}

fn main() {
    if let Ok(target) = std::env::var("NSOCKET_BENCH_CONNECT") {
        let target: SocketAddr = target.parse().unwrap();
        let cc = std::env::var("NSOCKET_BENCH_CC").ok();
        let cc = cc.as_deref().map(str::as_bytes);
        connect_loop(target, 2_000, cc);
        let (p50, p99) = percentiles(connect_loop(target, 20_000, cc));
        println!("{p50} {p99}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    publish(dir.path());
    let mut criterion = Criterion::default()
        .configure_from_args()
        .measurement_time(Duration::from_secs(3));
    decision(&mut criterion, dir.path());
    connect_side_by_side(dir.path());
    startup();
    criterion.final_summary();
}
