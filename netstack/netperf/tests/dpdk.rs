//! The DPDK engine beyond kernel interop (which `interop` covers over net_af_packet and
//! net_af_xdp): two stacks on DPDK facing each other over `net_memif` without privileges, and
//! what a user sees when DPDK cannot open — bad EAL arguments, missing capabilities — the next
//! engine of `--engine dpdk,af_packet`, with the reason in the report, or a one-line error.
//! Each DPDK instance is its own process: EAL runs once per process.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Lab, assert_dpdk_cleaned_up, dpdk_gate, json_line, py};
use testkit::Trial;

fn main() -> std::process::ExitCode {
    let trial = |name: &str, tools: &'static [&'static str], body: fn()| {
        Trial::gated(name, move || dpdk_gate(tools), move |()| body())
    };
    testkit::run_with(
        testkit::Options::parallel().sequential(true),
        vec![
            trial(
                "two_stacks_over_memif_without_privileges",
                &["setpriv"],
                two_stacks_over_memif_without_privileges,
            ),
            trial(
                "checksum_offloads_on_net_tap_both_ways",
                &[],
                checksum_offloads_on_net_tap_both_ways,
            ),
            trial(
                "hugepages_in_memory_leave_nothing_behind_even_after_sigkill",
                &[],
                hugepages_in_memory_leave_nothing_behind_even_after_sigkill,
            ),
            trial(
                "bad_eal_arguments_fall_back_to_the_next_engine",
                &[],
                bad_eal_arguments_fall_back_to_the_next_engine,
            ),
            Trial::gated(
                "a_build_without_dpdk_falls_back_and_says_how_to_enable",
                || {
                    common::gate(&[])?;
                    if cfg!(feature = "dpdk") {
                        return Err(testkit::Ignored::new(
                            "built with DPDK (cargo test -p stackroute-netperf runs it)",
                        ));
                    }
                    Ok(())
                },
                |()| a_build_without_dpdk_falls_back_and_says_how_to_enable(),
            ),
            trial(
                "missing_capabilities_fall_back_to_the_next_engine",
                &["setpriv"],
                missing_capabilities_fall_back_to_the_next_engine,
            ),
        ],
    )
}

const NETPERF: &str = env!("CARGO_BIN_EXE_stackroute-netperf");

/// `setpriv` as nobody with no capabilities, and no `XDG_RUNTIME_DIR` (root's is not
/// nobody's: EAL would fail to create its runtime directory there).
fn as_nobody(args: &[&str]) -> Command {
    let mut command = Command::new("setpriv");
    command
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--inh-caps=-all",
            NETPERF,
        ])
        .args(args)
        .env_remove("XDG_RUNTIME_DIR")
        .env("RUST_BACKTRACE", "0");
    command
}

/// Runs `command` to its end (at most `timeout`); stdout, stderr, exit code.
fn finish(mut command: Command, timeout: Duration) -> (String, String, Option<i32>) {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning netperf");
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(timeout);
        // Only our own child, by PID; harmless if it already ended (the PID is still ours
        // until waited for... and it was waited for: then kill fails with ESRCH).
        let _ = Command::new("kill").arg(pid.to_string()).status();
    });
    let output = child.wait_with_output().expect("waiting for netperf");
    drop(watchdog);
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        output.status.code(),
    )
}

/// Two stacks, each on its own DPDK `net_memif` port (server and client roles of one memif
/// socket), both as nobody without capabilities and without hugepages: 20 MB with SHA-256, then
/// 500 request/response round trips. Nothing of EAL's is left behind.
fn two_stacks_over_memif_without_privileges() {
    let dir = std::env::temp_dir().join(format!("stackroute-memif-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // nobody creates the memif socket here.
    Command::new("chmod")
        .args(["0777", dir.to_str().unwrap()])
        .status()
        .unwrap();
    let socket = dir.join("memif.sock");
    let vdev = |role: &str| format!("--vdev=net_memif0,role={role},socket={}", socket.display());
    let run_pair = |server_args: &[&str], client_args: &[&str]| {
        let server_vdev = vdev("server");
        let mut server = vec![
            "server",
            "--engine",
            "dpdk",
            "--dpdk-args",
            &server_vdev,
            "--dpdk-hugepages",
            "off",
            "--address",
            "10.251.0.1/24",
            "--port",
            "5300",
            "--timeout",
            "60",
        ];
        server.extend_from_slice(server_args);
        let server = std::thread::spawn({
            let command = as_nobody(&server);
            move || finish(command, Duration::from_secs(70))
        });
        // The client retries its SYN until the server's port is up.
        std::thread::sleep(Duration::from_millis(500));
        let client_vdev = vdev("client");
        let mut client = vec![
            "client",
            "--engine",
            "dpdk",
            "--dpdk-args",
            &client_vdev,
            "--dpdk-hugepages",
            "off",
            "--address",
            "10.251.0.2/24",
            "--connect",
            "10.251.0.1:5300",
            "--timeout",
            "60",
        ];
        client.extend_from_slice(client_args);
        let (client_out, client_err, client_code) =
            finish(as_nobody(&client), Duration::from_secs(70));
        let (server_out, server_err, server_code) = server.join().unwrap();
        assert_eq!(client_code, Some(0), "client: {client_err}");
        assert_eq!(server_code, Some(0), "server: {server_err}");
        (json_line(&server_out), json_line(&client_out))
    };

    let (server, client) = run_pair(&[], &["--send", "20000000"]);
    assert_eq!(
        server["bytes_received"].as_u64(),
        Some(20_000_000),
        "{server}"
    );
    assert_eq!(server["received_sha256"], client["sent_sha256"]);
    for report in [&server, &client] {
        assert_eq!(report["engine"].as_str(), Some("dpdk"), "{report}");
        assert_eq!(
            report["dpdk"]["driver"].as_str(),
            Some("net_memif"),
            "{report}"
        );
        let memory = report["dpdk"]["memory"].as_str().unwrap_or_default();
        assert!(memory.starts_with("no-huge"), "{report}");
        let runtime_dir = report["dpdk"]["runtime_dir"].as_str().unwrap_or_default();
        assert!(runtime_dir.starts_with("/tmp/dpdk/stackroute-"), "{report}");
        assert_dpdk_cleaned_up(report);
    }

    let (_, client) = run_pair(&["--echo"], &["--rr", "500"]);
    assert_eq!(client["round_trips"].as_u64(), Some(500), "{client}");
    eprintln!(
        "memif: 20 MB at {} bit/s; 500 round trips, p50 {} µs, p99 {} µs",
        server["goodput_bps"], client["rtt_us_p50"], client["rtt_us_p99"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `HugePages_Free` now.
fn hugepages_free() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("HugePages_Free:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Raises `vm.nr_hugepages` by `more` for the trial and puts the old value back when dropped.
struct MoreHugepages(String);

impl MoreHugepages {
    const PATH: &str = "/proc/sys/vm/nr_hugepages";

    fn new(more: u64) -> Self {
        let old = std::fs::read_to_string(Self::PATH)
            .unwrap()
            .trim()
            .to_string();
        let wanted = old.parse::<u64>().unwrap() + more;
        std::fs::write(Self::PATH, wanted.to_string()).unwrap();
        let guard = Self(old);
        let got: u64 = std::fs::read_to_string(Self::PATH)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(got, wanted, "the kernel gave {got} of {wanted} hugepages");
        guard
    }
}

impl Drop for MoreHugepages {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

/// With hugepages free, `--dpdk-hugepages on` puts EAL in `--in-memory` mode: its hugepages are
/// memfd-backed, nothing on a hugetlbfs mount, so they return to the kernel when the process
/// ends, also by SIGKILL. The killed process's runtime directory stays (it could not remove
/// it); the next DPDK process sweeps it.
fn hugepages_in_memory_leave_nothing_behind_even_after_sigkill() {
    let _hugepages = MoreHugepages::new(128);
    let free_before = hugepages_free();
    let dir = std::env::temp_dir().join(format!("stackroute-huge-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("memif.sock");
    let vdev = |role: &str| format!("--vdev=net_memif0,role={role},socket={}", socket.display());
    let netperf = |args: &[&str]| {
        let mut command = Command::new(NETPERF);
        command.args(args).env("RUST_BACKTRACE", "0");
        command
    };
    let common = [
        "--dpdk-hugepages",
        "on",
        "--dpdk-mbufs",
        "4095",
        "--timeout",
        "60",
    ];
    let server_vdev = vdev("server");
    let mut server_args = vec!["server", "--engine", "dpdk", "--dpdk-args", &server_vdev];
    server_args.extend(["--address", "10.252.0.1/24", "--port", "5320"]);
    server_args.extend(common);
    let server = std::thread::spawn({
        let command = netperf(&server_args);
        move || finish(command, Duration::from_secs(70))
    });
    std::thread::sleep(Duration::from_millis(500));
    let client_vdev = vdev("client");
    let mut client_args = vec!["client", "--engine", "dpdk", "--dpdk-args", &client_vdev];
    client_args.extend(["--address", "10.252.0.2/24", "--connect", "10.252.0.1:5320"]);
    client_args.extend(["--send", "10000000"]);
    client_args.extend(common);
    let (client_out, client_err, client_code) =
        finish(netperf(&client_args), Duration::from_secs(70));
    let (server_out, server_err, server_code) = server.join().unwrap();
    assert_eq!(client_code, Some(0), "{client_err}");
    assert_eq!(server_code, Some(0), "{server_err}");
    let (server, client) = (json_line(&server_out), json_line(&client_out));
    assert_eq!(server["received_sha256"], client["sent_sha256"]);
    for report in [&server, &client] {
        let memory = report["dpdk"]["memory"].as_str().unwrap_or_default();
        assert!(memory.starts_with("hugepages in-memory"), "{report}");
        assert_dpdk_cleaned_up(report);
    }
    assert_eq!(
        hugepages_free(),
        free_before,
        "hugepages returned after exit"
    );

    // SIGKILL while EAL holds its hugepages.
    let mut killed = netperf(&server_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while hugepages_free() == free_before {
        assert!(
            std::time::Instant::now() < deadline,
            "EAL never took hugepages"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let stale = std::path::PathBuf::from(format!("/var/run/dpdk/stackroute-{}-0", killed.id()));
    killed.kill().unwrap();
    killed.wait().unwrap();
    assert_eq!(
        hugepages_free(),
        free_before,
        "hugepages returned after SIGKILL"
    );
    assert!(stale.is_dir(), "a killed EAL leaves {}", stale.display());
    // The next DPDK process sweeps it (this one has nothing to connect to, and ends).
    let (_, _, code) = finish(
        netperf(&[
            "client",
            "--engine",
            "dpdk",
            "--dpdk-args",
            "--vdev=net_ring0",
            "--dpdk-hugepages",
            "off",
            "--address",
            "10.252.1.2/24",
            "--connect",
            "10.252.1.1:9",
            "--send",
            "1",
            "--timeout",
            "1",
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(1));
    assert!(!stale.exists(), "{} was not swept", stale.display());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until the TAP interface DPDK's `net_tap` PMD creates exists in the kernel namespace,
/// then gives the kernel `address` on it.
fn configure_tap(lab: &Lab, tap: &str, address: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !Command::new("ip")
        .args(["-n", &lab.ns_kernel, "link", "show", "dev", tap])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(std::time::Instant::now() < deadline, "{tap} never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.exec_kernel(&["ip", "addr", "add", address, "dev", tap]);
    lab.exec_kernel(&["ip", "link", "set", tap, "up"]);
}

/// The port's offloads in use: DPDK's `net_tap` PMD (its TAP interface faces the kernel in the
/// same namespace) completes sent TCP checksums, cuts frames longer than the MTU into segments
/// (TSO) and verifies received checksums, in software like a NIC would in hardware. The stack
/// leaves its checksums to the port and hands it several MSS per frame — a frame the port did
/// not complete or cut would be dropped by the kernel, and the transfer would fail — and trusts
/// the port's verdict on received ones. 10 MB each way, checked by SHA-256.
fn checksum_offloads_on_net_tap_both_ways() {
    let mut lab = Lab::new(0.0);
    let tag = std::process::id() % 100_000;
    let size = "10000000";

    // The stack sends to a kernel sink.
    let tap = format!("dto{tag}");
    let sink = lab.spawn_kernel(&["python3", "-c", py::SINK_SERVER, "0.0.0.0", "5310", "1"]);
    lab.wait_for_line(sink, "READY", Duration::from_secs(10));
    let vdev = format!("--vdev=net_tap0,iface={tap}");
    let client = lab.spawn_netperf_in_kernel_ns(&[
        "client",
        "--engine",
        "dpdk",
        "--dpdk-args",
        &vdev,
        "--address",
        "10.254.1.2/24",
        "--connect",
        "10.254.1.1:5310",
        "--send",
        size,
        "--timeout",
        "60",
    ]);
    configure_tap(&lab, &tap, "10.254.1.1/24");
    let (out, err, ok) = lab.wait(client, Duration::from_secs(70));
    assert!(ok, "client on net_tap failed: {err}");
    let sent = json_line(&out);
    let (sink_out, _, _) = lab.wait(sink, Duration::from_secs(10));
    let expected = format!(
        "RESULT {size} {}",
        sent["sent_sha256"].as_str().unwrap_or("?")
    );
    assert!(sink_out.contains(&expected), "{sink_out} vs {sent}");

    // A kernel client sends to the stack.
    let tap = format!("dti{tag}");
    let vdev = format!("--vdev=net_tap0,iface={tap}");
    let server = lab.spawn_netperf_in_kernel_ns(&[
        "server",
        "--engine",
        "dpdk",
        "--dpdk-args",
        &vdev,
        "--address",
        "10.254.2.2/24",
        "--port",
        "5311",
        "--timeout",
        "60",
    ]);
    configure_tap(&lab, &tap, "10.254.2.1/24");
    let client = lab.spawn_kernel(&[
        "python3",
        "-c",
        py::BULK_CLIENT,
        "10.254.2.2",
        "5311",
        size,
        "1",
    ]);
    let (client_out, client_err, client_ok) = lab.wait(client, Duration::from_secs(70));
    assert!(client_ok, "kernel client failed: {client_err}");
    let (out, err, ok) = lab.wait(server, Duration::from_secs(20));
    assert!(ok, "server on net_tap failed: {err}");
    let received = json_line(&out);
    let hash = client_out.split_whitespace().last().unwrap_or("?");
    assert_eq!(
        received["received_sha256"].as_str(),
        Some(hash),
        "{received}"
    );

    for report in [&sent, &received] {
        let dpdk = &report["dpdk"];
        assert_eq!(dpdk["driver"].as_str(), Some("net_tap"), "{report}");
        assert_eq!(
            dpdk["tx_checksum_offload"].as_bool(),
            Some(true),
            "{report}"
        );
        assert_eq!(
            dpdk["rx_checksum_offload"].as_bool(),
            Some(true),
            "{report}"
        );
        assert!(dpdk["tx_checksum_offloaded"].as_u64() > Some(0), "{report}");
        assert_eq!(dpdk["rx_bad_checksum"].as_u64(), Some(0), "{report}");
        assert_dpdk_cleaned_up(report);
    }
    // The sender handed the port frames of several segments (TSO), which the kernel received
    // as MTU-sized segments with valid checksums (or the SHA-256 above would differ).
    assert_eq!(sent["dpdk"]["tso"].as_bool(), Some(true), "{sent}");
    assert!(sent["dpdk"]["tx_segmented"].as_u64() > Some(0), "{sent}");
    eprintln!(
        "net_tap with offloads: stack → kernel {} bit/s ({} frames cut by the port), kernel → \
         stack {} bit/s",
        sent["goodput_bps"], sent["dpdk"]["tx_segmented"], received["goodput_bps"]
    );
}

/// Sends 2 MB from the stack to a kernel sink with `engine_args`; the sink's count and hash
/// must match, and the report says which engine carried it.
fn send_through(lab: &mut Lab, engine_args: &[&str]) -> serde_json::Value {
    send_through_under(lab, &[], engine_args)
}

/// [`send_through`] with netperf run by `wrapper`.
fn send_through_under(lab: &mut Lab, wrapper: &[&str], engine_args: &[&str]) -> serde_json::Value {
    let server = lab.spawn_kernel(&[
        "python3",
        "-c",
        py::SINK_SERVER,
        &lab.kernel_ip.clone(),
        "5301",
        "1",
    ]);
    lab.wait_for_line(server, "READY", Duration::from_secs(10));
    let target = format!("{}:5301", lab.kernel_ip);
    let mut args = vec!["client"];
    args.extend_from_slice(engine_args);
    args.extend(["--connect", &target, "--send", "2000000", "--timeout", "60"]);
    let client = lab.spawn_netperf_under(wrapper, &args);
    let (out, err, ok) = lab.wait(client, Duration::from_secs(70));
    assert!(ok, "netperf {engine_args:?} failed: {err}");
    let report = json_line(&out);
    let (server_out, _, _) = lab.wait(server, Duration::from_secs(10));
    let result = server_out
        .lines()
        .find(|l| l.starts_with("RESULT"))
        .expect("sink result");
    assert!(result.starts_with("RESULT 2000000 "), "{result}");
    assert!(
        result.ends_with(report["sent_sha256"].as_str().unwrap_or("?")),
        "{result} vs {report}"
    );
    report
}

/// The one fallback of `report`: DPDK, with an error containing `reason`.
fn assert_fell_back(report: &serde_json::Value, reason: &str) {
    assert_eq!(report["engine"].as_str(), Some("af_packet"), "{report}");
    let fallbacks = report["engine_fallbacks"].as_array().expect("fallbacks");
    assert_eq!(fallbacks.len(), 1, "{report}");
    assert_eq!(fallbacks[0]["engine"].as_str(), Some("dpdk"));
    let error = fallbacks[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains(reason), "{error:?} should say {reason:?}");
}

/// EAL refuses an unknown flag, and the engine refuses `--in-memory` with `--no-huge` before
/// EAL sees it: `--engine dpdk,af_packet` carries the data on AF_PACKET and reports why DPDK did
/// not open. `--engine dpdk` alone ends with exit code 1 and the reason, not a panic or abort.
fn bad_eal_arguments_fall_back_to_the_next_engine() {
    let mut lab = Lab::new(0.0);
    let vdev = format!("--vdev=net_af_packet0,iface={}", lab.stack_if);
    let unknown = format!("{vdev} --no-such-flag");
    let report = send_through(
        &mut lab,
        &["--engine", "dpdk,af_packet", "--dpdk-args", &unknown],
    );
    assert_fell_back(&report, "rte_eal_init");

    let both = format!("{vdev} --no-huge --in-memory");
    let report = send_through(
        &mut lab,
        &["--engine", "dpdk,af_packet", "--dpdk-args", &both],
    );
    assert_fell_back(&report, "cannot be combined");

    let index = lab.spawn_netperf(&[
        "client",
        "--engine",
        "dpdk",
        "--dpdk-args",
        &unknown,
        "--connect",
        "10.0.0.1:9",
        "--send",
        "1",
    ]);
    let (_, err, ok) = lab.wait(index, Duration::from_secs(30));
    assert!(!ok);
    assert!(
        err.contains("Error: ") && err.contains("rte_eal_init"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// A build without the `dpdk` feature takes `--engine dpdk,af_packet` too: AF_PACKET carries
/// the data and the report says how to get DPDK.
fn a_build_without_dpdk_falls_back_and_says_how_to_enable() {
    let mut lab = Lab::new(0.0);
    let vdev = format!("--vdev=net_af_packet0,iface={}", lab.stack_if);
    let report = send_through(
        &mut lab,
        &["--engine", "dpdk,af_packet", "--dpdk-args", &vdev],
    );
    assert_fell_back(&report, "--features dpdk");
}

/// As nobody with CAP_NET_RAW only (enough for our AF_PACKET engine, not for DPDK's
/// net_af_packet PMD, which sets the interface's MAC and flags): DPDK fails with the missing
/// capabilities named, AF_PACKET carries the data; EAL's runtime directory is removed either way.
fn missing_capabilities_fall_back_to_the_next_engine() {
    let mut lab = Lab::new(0.0);
    let vdev = format!("--vdev=net_af_packet0,iface={}", lab.stack_if);
    let nobody_with_net_raw = [
        "env",
        "-u",
        "XDG_RUNTIME_DIR",
        "setpriv",
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--inh-caps=-all,+net_raw",
        "--ambient-caps=-all,+net_raw",
    ];
    let report = send_through_under(
        &mut lab,
        &nobody_with_net_raw,
        &["--engine", "dpdk,af_packet", "--dpdk-args", &vdev],
    );
    assert_fell_back(&report, "CAP_NET_ADMIN");
    let error = report["engine_fallbacks"][0]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.contains("Operation not permitted"), "{error}");
    // EAL was up when the port failed: it was cleaned up, its runtime directory removed (only
    // this test binary runs DPDK as nobody, one trial at a time).
    let leftovers: Vec<_> = std::fs::read_dir("/tmp/dpdk")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("stackroute-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "left in /tmp/dpdk: {leftovers:?}");
}
