//! libnsocket.so under real programs: a C probe (tests/c/probe.c, compiled here with `cc`),
//! python3 and curl, run with `LD_PRELOAD` against the real controller and agent on loopback.
//! The congestion control a connection used is read from outside the application with
//! `ss -tin` where the test can hold the socket open, and with `getsockopt` otherwise.

#[path = "../../lrd-agent/tests/common/mod.rs"]
mod common;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use common::{Agent, CLUSTER, Controller, WAIT, explain_agent, free_port, transport, wait_for};
use stackroute_local_api::message::{Protocol, Request, Response};
use testkit::{Ignored, Trial};

fn main() -> std::process::ExitCode {
    let trials = vec![
        Trial::test(
            "connect_applies_the_rules_congestion_control_as_ss_sees_it",
            connect_applies_the_rules_congestion_control_as_ss_sees_it,
        ),
        Trial::gated("connect_applies_bbr_as_ss_sees_it", bbr_gate, |()| {
            connect_applies_bbr_as_ss_sees_it()
        }),
        Trial::test(
            "nonblocking_connect_with_epoll_poll_and_select",
            nonblocking_connect_with_epoll_poll_and_select,
        ),
        Trial::test(
            "unavailable_stacks_fall_back_dedicated_is_refused_and_counters_reach_metrics",
            unavailable_stacks_fall_back_dedicated_is_refused_and_counters_reach_metrics,
        ),
        Trial::gated(
            "a_congestion_control_the_kernel_refuses_walks_the_fallback_list",
            refused_cc_gate,
            a_congestion_control_the_kernel_refuses_walks_the_fallback_list,
        ),
        Trial::test(
            "udp_first_sendto_decides_ipv4_and_ipv6",
            udp_first_sendto_decides_ipv4_and_ipv6,
        ),
        Trial::test(
            "fork_keeps_decisions_and_the_child_decides_too",
            fork_keeps_decisions_and_the_child_decides_too,
        ),
        Trial::test(
            "exec_reloads_the_shim_from_the_environment",
            exec_reloads_the_shim_from_the_environment,
        ),
        Trial::test(
            "dup_family_copies_decisions_and_close_clears_them",
            dup_family_copies_decisions_and_close_clears_them,
        ),
        Trial::test(
            "close_range_clears_and_a_reused_fd_decides_anew",
            close_range_clears_and_a_reused_fd_decides_anew,
        ),
        Trial::test("threads_decide_concurrently", threads_decide_concurrently),
        Trial::test(
            "threads_connecting_during_the_first_snapshot_load_wait_for_it",
            threads_connecting_during_the_first_snapshot_load_wait_for_it,
        ),
        Trial::test("af_unix_is_left_alone", af_unix_is_left_alone),
        Trial::test(
            "listeners_are_registered_at_listen_and_removed_at_close",
            listeners_are_registered_at_listen_and_removed_at_close,
        ),
        Trial::test(
            "fail_open_without_an_agent_and_with_a_corrupt_snapshot",
            fail_open_without_an_agent_and_with_a_corrupt_snapshot,
        ),
        Trial::test(
            "an_agent_killed_mid_run_changes_nothing_for_the_application",
            an_agent_killed_mid_run_changes_nothing_for_the_application,
        ),
        Trial::test(
            "curl_and_python_under_the_shim",
            curl_and_python_under_the_shim,
        ),
        Trial::test(
            "stackroute_run_finds_and_preloads_the_shim",
            stackroute_run_finds_and_preloads_the_shim,
        ),
    ];
    // One at a time: every trial starts a controller and an agent on ports `free_port` found
    // free a moment earlier, which a trial running beside it could take first (seen once in
    // CI: the controller's gRPC bind failed with EADDRINUSE).
    testkit::run_with(testkit::Options::parallel().sequential(true), trials)
}

/// One policy for every scenario, told apart by destination port.
const POLICY: &str = r#"apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: shim, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  rules:
  - {name: bbr, ports: [{port: 20000, endPort: 20999}], transport: {stack: Kernel, congestionControl: BBR}}
  - {name: cubic, ports: [{port: 21000, endPort: 21999}], transport: {stack: Kernel, congestionControl: Cubic}}
  - {name: reno, ports: [{port: 22000, endPort: 22999}], transport: {stack: Kernel, congestionControl: Reno}}
  - {name: userspace, ports: [{port: 23000, endPort: 23999}], transport: {stack: Userspace, congestionControl: BBR, fallback: [{stack: Kernel, congestionControl: Reno}]}}
  - {name: dedicated, ports: [{port: 24000, endPort: 24999}], isolation: Dedicated, transport: {stack: RDMA, fallback: [{stack: Userspace, congestionControl: BBR}]}}
  - {name: bbr-then-reno, ports: [{port: 25000, endPort: 25499}], transport: {stack: Kernel, congestionControl: BBR, fallback: [{stack: Kernel, congestionControl: Reno}]}}
  - {name: cubic-then-reno, ports: [{port: 25500, endPort: 25999}], transport: {stack: Kernel, congestionControl: Cubic, fallback: [{stack: Kernel, congestionControl: Reno}]}}
  - {name: udp, ports: [{port: 26000, endPort: 26999, protocol: UDP}], transport: {stack: Kernel, congestionControl: BBR}}
"#;

const BBR: u16 = 20000;
const CUBIC: u16 = 21000;
const RENO: u16 = 22000;
const USERSPACE: u16 = 23000;
const DEDICATED: u16 = 24000;
const UDP: u16 = 26000;

/// The shim built with this test.
fn shim() -> PathBuf {
    common::library("nsocket-shim", "libnsocket.so")
}

/// The C probe, compiled once per test run.
fn probe() -> &'static Path {
    static PROBE: OnceLock<PathBuf> = OnceLock::new();
    PROBE.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/c/probe.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("nsocket-probe");
        let status = Command::new("cc")
            .args(["-O1", "-Wall", "-pthread", "-o"])
            .arg(&out)
            .arg(&source)
            .arg("-ldl")
            .status()
            .expect("cc (gcc) runs");
        assert!(status.success(), "compiling {}", source.display());
        out
    })
}

/// A loopback listener in `[base, base + 500)`, accepting (and holding) connections.
fn listener(ip: &str, base: u16) -> (TcpListener, u16) {
    for _ in 0..200 {
        let port = base + (fastrand_u16() % 500);
        if let Ok(l) = TcpListener::bind((ip, port)) {
            return (l, port);
        }
    }
    panic!("no free port near {base}");
}

fn fastrand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos ^ std::process::id().wrapping_mul(2_654_435_761)) as u16
}

/// Accepts in the background and keeps the connections open.
fn serve(listener: TcpListener) {
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
}

fn available() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default()
}

/// Gate of the trials that need BBR (loading `tcp_bbr` if needed): ignored with the reason
/// otherwise, failed under `STACKROUTE_REQUIRE_BBR=1`.
fn bbr_gate() -> Result<(), Ignored> {
    if !available().split_whitespace().any(|c| c == "bbr") {
        let _ = Command::new("modprobe").arg("tcp_bbr").status();
    }
    if available().split_whitespace().any(|c| c == "bbr") {
        return Ok(());
    }
    let reason = "BBR is not in tcp_available_congestion_control and `modprobe tcp_bbr` failed";
    assert!(
        std::env::var("STACKROUTE_REQUIRE_BBR").as_deref() != Ok("1"),
        "{reason} (STACKROUTE_REQUIRE_BBR=1)"
    );
    Err(Ignored::new(reason))
}

/// A controller and the agent of node n1 (where pod shop/web-1, label app=web, runs).
struct Env {
    _controller: Controller,
    agent: Agent,
    _tmp: tempfile::TempDir,
}

impl Env {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("cluster.yaml"), CLUSTER).unwrap();
        std::fs::write(state.join("policy.yaml"), POLICY).unwrap();
        let controller = Controller::start(&state, tmp.path(), free_port());
        let agent = Agent::start("n1", &format!("http://{}", controller.grpc), tmp.path());
        wait_for("the policy on n1", WAIT, || {
            explain_agent(&agent.socket_dir, "shop/web-1", "127.0.0.1:22001")
                .filter(|e| transport(e) == "Kernel/Reno")
        });
        Self {
            _controller: controller,
            agent,
            _tmp: tmp,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        shim_command(&self.agent.socket_dir, args)
    }
}

/// The probe under the shim as workload shop/web-1, with the debug log on.
fn shim_command(socket_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(probe());
    command
        .args(args)
        .env("LD_PRELOAD", shim())
        .env("STACKROUTE_SOCKET_DIR", socket_dir)
        .env("STACKROUTE_NAMESPACE", "shop")
        .env("STACKROUTE_WORKLOAD", "web-1")
        .env("STACKROUTE_LOG", "debug");
    command
}

/// Runs to completion: (status ok, stdout, stderr).
fn finish(command: Command) -> (bool, String, String) {
    let output = common::output_within(command);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A probe that holds its connection open until dropped.
struct Held {
    child: Child,
    first_line: String,
}

impl Held {
    fn start(mut command: Command) -> Self {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().expect("probe starts");
        let mut first_line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first_line)
            .unwrap();
        Self { child, first_line }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ss -tin` for established sockets to `port`: what the kernel says about them.
fn ss(port: u16) -> String {
    let output = Command::new("ss")
        .args(["-tinH", "state", "established"])
        .arg(format!("( dport = :{port} )"))
        .output()
        .expect("ss (iproute2) runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn held_cc(env: &Env, mode: &str, ip: &str, base: u16, expect: &str) {
    let (l, port) = listener(ip, base);
    serve(l);
    let held = Held::start(env.command(&[mode, ip, &port.to_string()]));
    assert!(
        held.first_line.starts_with(&format!("cc={expect} ")),
        "{mode} {ip}:{port}: {}",
        held.first_line
    );
    let seen = ss(port);
    assert!(
        seen.split_whitespace().any(|w| w == expect),
        "ss -tin for port {port} does not show {expect}:\n{seen}"
    );
}

fn connect_applies_the_rules_congestion_control_as_ss_sees_it() {
    let env = Env::start();
    held_cc(&env, "hold", "127.0.0.1", RENO, "reno");
    held_cc(&env, "hold", "::1", RENO, "reno");
    held_cc(&env, "hold", "127.0.0.1", CUBIC, "cubic");
}

fn connect_applies_bbr_as_ss_sees_it() {
    let env = Env::start();
    held_cc(&env, "hold", "127.0.0.1", BBR, "bbr");
    held_cc(&env, "hold", "::1", BBR, "bbr");
}

fn nonblocking_connect_with_epoll_poll_and_select() {
    let env = Env::start();
    for mode in ["epoll", "poll", "select"] {
        held_cc(&env, mode, "127.0.0.1", RENO, "reno");
        held_cc(&env, mode, "::1", CUBIC, "cubic");
    }
}

fn unavailable_stacks_fall_back_dedicated_is_refused_and_counters_reach_metrics() {
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", USERSPACE);
    serve(l);
    let (ok, out, err) = finish(env.command(&["once", "127.0.0.1", &port.to_string()]));
    assert!(ok && out.starts_with("cc=reno "), "{out}{err}");
    // The agent starts no user-space stack instance in its own (host) namespace without
    // --userspace-host-netns: it answers `no-capability`, and the shim falls down the list.
    assert!(
        err.contains("rule=StackRoute/shop/shim#userspace")
            && err.contains("fallback=no-capability"),
        "{err}"
    );
    let (l, port) = listener("127.0.0.1", DEDICATED);
    serve(l);
    let (ok, out, err) = finish(env.command(&["refused", "127.0.0.1", &port.to_string()]));
    assert!(
        ok && out.trim() == format!("rc=-1 errno={}", libc_eacces()),
        "{out}{err}"
    );
    assert!(err.contains("fallback=isolation-forbids"), "{err}");
    // Reported at exit, so they are in /metrics now.
    let metrics = wait_for("shim counters in /metrics", WAIT, || {
        let m = env.agent.metrics();
        m.contains(r#"stackroute_lrd_fallback_reports_total{reason="isolation-forbids"} 1"#)
            .then_some(m)
    });
    for line in [
        r#"stackroute_lrd_shim_decisions_total{stack="Kernel",congestion_control="Reno"} 1"#,
        // RDMA (not in this build); Userspace refused twice (the rule above, then the
        // Dedicated rule's second entry).
        r#"stackroute_lrd_fallback_reports_total{reason="stack-unavailable"} 1"#,
        r#"stackroute_lrd_fallback_reports_total{reason="no-capability"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
}

fn libc_eacces() -> i32 {
    13
}

/// Gate of the refused-congestion-control trial: a controller that is available but not
/// allowed to unprivileged users (BBR, else CUBIC), and its rule's port range.
fn refused_cc_gate() -> Result<(u16, &'static str), Ignored> {
    let allowed =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control").unwrap();
    let allowed: Vec<&str> = allowed.split_whitespace().collect();
    // Unprivileged processes may only pick allowed ones: the probe runs as `nobody` towards a
    // rule whose first choice is available but not allowed.
    [(25000, "bbr"), (25500, "cubic")]
        .into_iter()
        .find(|(_, cc)| !allowed.contains(cc) && available().split_whitespace().any(|a| a == *cc))
        .ok_or_else(|| {
            Ignored::new(format!(
                "BBR and CUBIC are both allowed to unprivileged users ({allowed:?})"
            ))
        })
}

fn a_congestion_control_the_kernel_refuses_walks_the_fallback_list(
    (base, first): (u16, &'static str),
) {
    let env = Env::start();
    open_to_nobody(&env.agent.socket_dir);
    let (l, port) = listener("127.0.0.1", base);
    serve(l);
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(probe())
        .args(["once", "127.0.0.1", &port.to_string()])
        .env("LD_PRELOAD", shim())
        .env("STACKROUTE_SOCKET_DIR", &env.agent.socket_dir)
        .env("STACKROUTE_NAMESPACE", "shop")
        .env("STACKROUTE_WORKLOAD", "web-1")
        .env("STACKROUTE_LOG", "debug");
    let (ok, out, err) = finish(command);
    assert!(
        ok && out.starts_with("cc=reno "),
        "{first} refused: {out}{err}"
    );
    assert!(err.contains("fallback=no-capability"), "{err}");
}

/// Lets `nobody` reach the agent's published files (test directories are private).
fn open_to_nobody(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut path = dir.to_path_buf();
    loop {
        if path.starts_with(std::env::temp_dir()) && path != std::env::temp_dir() {
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755));
        }
        if !path.pop() {
            break;
        }
    }
    let _ = std::fs::set_permissions(probe(), std::fs::Permissions::from_mode(0o755));
}

fn udp_first_sendto_decides_ipv4_and_ipv6() {
    let env = Env::start();
    for ip in ["127.0.0.1", "::1"] {
        let socket = std::net::UdpSocket::bind((ip, 0)).unwrap();
        drop(socket);
        let port = UDP + fastrand_u16() % 500;
        let (ok, out, err) = finish(env.command(&["udp", ip, &port.to_string()]));
        // Kernel/BBR pinned: stack 0 * 8 + BBR (2).
        assert!(
            ok && out.trim()
                == "sent=4 before=-1 after=2 connected=0/4 pinned=2 sendmsg=3 pinned=2",
            "{ip}: {out}{err}"
        );
    }
}

fn fork_keeps_decisions_and_the_child_decides_too() {
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", RENO);
    serve(l);
    let (ok, out, err) = finish(env.command(&["fork", "127.0.0.1", &port.to_string()]));
    assert!(ok, "{out}{err}");
    // Kernel/Reno = 3.
    assert!(out.contains("parent cc=reno"), "{out}");
    assert!(
        out.contains("child cc=reno inherited_pinned=3 parent_pinned=3"),
        "{out}"
    );
    assert!(out.contains("parent-after cc=reno pinned=3"), "{out}");
}

fn exec_reloads_the_shim_from_the_environment() {
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", CUBIC);
    serve(l);
    let (ok, out, err) = finish(env.command(&["exec", "127.0.0.1", &port.to_string()]));
    assert!(ok, "{out}{err}");
    assert!(out.contains("before-exec cc=cubic"), "{out}");
    assert!(out.contains("exec'd cc=cubic shim=loaded"), "{out}");
}

fn dup_family_copies_decisions_and_close_clears_them() {
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", RENO);
    serve(l);
    let (ok, out, err) = finish(env.command(&["dup", "127.0.0.1", &port.to_string()]));
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("pinned=3 dup2=3 dup3=3 fdupfd=3 dup=3"),
        "{out}"
    );
    assert!(
        out.contains("after-close original=-1 copy=3 copy_cc=reno"),
        "{out}"
    );
    assert!(out.contains("dup2-over=-1"), "{out}");
    assert!(out.contains("after-close-all=-1"), "{out}");
}

fn close_range_clears_and_a_reused_fd_decides_anew() {
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", CUBIC);
    serve(l);
    let (ok, out, err) = finish(env.command(&["close_range", "127.0.0.1", &port.to_string()]));
    assert!(ok, "{out}{err}");
    // Kernel/Cubic = 1.
    assert_eq!(
        out.trim(),
        "decided=4 cleared=4 reused=1 cc=cubic pinned=1",
        "{err}"
    );
}

fn threads_decide_concurrently() {
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", RENO);
    serve(l);
    let (ok, out, err) = finish(env.command(&["threads", "127.0.0.1", &port.to_string()]));
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "connections=160 cc=reno same=1", "{err}");
}

fn threads_connecting_during_the_first_snapshot_load_wait_for_it() {
    // Every snapshot load takes 30 ms: the threads that decide while the first one is being
    // loaded must wait for it, not fall back to the kernel as if there were no agent.
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", RENO);
    serve(l);
    let mut command = env.command(&["threads", "127.0.0.1", &port.to_string()]);
    command.env("STACKROUTE_TEST_LOAD_DELAY_MS", "30");
    let (ok, out, err) = finish(command);
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), "connections=160 cc=reno same=1", "{err}");
    assert!(!err.contains("fallback=no-agent"), "{err}");
}

fn af_unix_is_left_alone() {
    let env = Env::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s");
    let (ok, out, err) = finish(env.command(&["unix", path.to_str().unwrap()]));
    assert!(ok, "{out}{err}");
    assert_eq!(
        out.trim(),
        "connect=0 read=2 pinned=-1 listener=-1",
        "{err}"
    );
    assert!(!err.contains("dst="), "no decision for AF_UNIX: {err}");
}

fn find_listener(agent: &Agent, port: u16) -> Option<String> {
    match agent.call(&Request::FindListener {
        ip: "127.0.0.1".parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
    }) {
        Response::Listener { listener } => listener.map(|l| l.workload),
        other => panic!("{other:?}"),
    }
}

fn listeners_are_registered_at_listen_and_removed_at_close() {
    let env = Env::start();
    let port = free_port();
    let mut command = env.command(&["listen", &port.to_string()]);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    wait_for("the listener in the agent's registry", WAIT, || {
        find_listener(&env.agent, port).filter(|w| w == "web-1")
    });
    writeln!(stdin, "close").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "closed");
    wait_for("the listener to be removed", WAIT, || {
        find_listener(&env.agent, port).is_none().then_some(())
    });
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
}

/// The system's default congestion control, what a connection gets without the shim.
fn kernel_default() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .unwrap()
        .trim()
        .to_string()
}

fn fail_open_without_an_agent_and_with_a_corrupt_snapshot() {
    let (l, port) = listener("127.0.0.1", RENO);
    serve(l);
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-agent-here");
    let (ok, out, err) = finish(shim_command(
        &missing,
        &["once", "127.0.0.1", &port.to_string()],
    ));
    assert!(
        ok && out.starts_with(&format!("cc={} ", kernel_default())),
        "{out}{err}"
    );
    assert!(err.contains("fallback=no-agent"), "{err}");

    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(
        corrupt.join("generation"),
        stackroute_local_api::published::encode_generation(5),
    )
    .unwrap();
    let mut garbage = stackroute_local_api::published::encode_header(5, 1, false, 64).to_vec();
    garbage.extend([0xa5; 64]);
    std::fs::write(corrupt.join("snapshot"), garbage).unwrap();
    let (ok, out, err) = finish(shim_command(
        &corrupt,
        &["once", "127.0.0.1", &port.to_string()],
    ));
    assert!(
        ok && out.starts_with(&format!("cc={} ", kernel_default())),
        "{out}{err}"
    );
    assert!(err.contains("fallback=other"), "{err}");
}

fn an_agent_killed_mid_run_changes_nothing_for_the_application() {
    let mut env = Env::start();
    let (l, port) = listener("127.0.0.1", CUBIC);
    serve(l);
    let mut command = env.command(&["twice", "127.0.0.1", &port.to_string()]);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "cc=cubic");
    env.agent.proc.kill();
    writeln!(stdin, "again").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    // The published table outlives the agent process: still the policy's choice.
    assert_eq!(line.trim(), "cc=cubic");
    drop(stdin);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{err}");
}

fn curl_and_python_under_the_shim() {
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", RENO);
    // The server checks the client's socket from outside before it answers.
    let server = std::thread::spawn(move || {
        let (mut stream, _) = l.accept().unwrap();
        let seen = ss(port);
        let mut request = [0u8; 1024];
        let _ = stream.read(&mut request);
        let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
        seen
    });
    let curl = shim_command(&env.agent.socket_dir, &[]);
    let mut command = Command::new("curl");
    command.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    for (key, value) in curl.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    let (ok, out, err) = finish(command);
    assert!(ok && out == "ok", "curl: {out}{err}");
    assert!(err.contains("transport=Kernel/Reno"), "{err}");
    let seen = server.join().unwrap();
    assert!(seen.split_whitespace().any(|w| w == "reno"), "{seen}");

    let (l, port) = listener("127.0.0.1", CUBIC);
    serve(l);
    let mut python = Command::new("python3");
    python.args([
        "-c",
        &format!(
            "import socket; s = socket.create_connection(('127.0.0.1', {port})); print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b'\\0').decode())"
        ),
    ]);
    for (key, value) in curl.get_envs() {
        if let Some(value) = value {
            python.env(key, value);
        }
    }
    let (ok, out, err) = finish(python);
    assert!(ok && out.trim() == "cubic", "python: {out}{err}");
}

fn stackroute_run_finds_and_preloads_the_shim() {
    let env = Env::start();
    let (l, port) = listener("127.0.0.1", RENO);
    serve(l);
    let mut command = Command::new(common::bin("stackroute"));
    command
        .args(["run", "--socket-dir"])
        .arg(&env.agent.socket_dir)
        .args([
            "--namespace",
            "shop",
            "--name",
            "web-1",
            "--labels",
            "app=web",
            "--",
        ])
        .arg(probe())
        .args(["until", "127.0.0.1", &port.to_string(), "reno"])
        .env_remove("STACKROUTE_SHIM")
        .env_remove("LD_PRELOAD");
    let (ok, out, err) = finish(command);
    assert!(ok && out.starts_with("cc=reno"), "{out}{err}");
    let _ = SocketAddr::from(([127, 0, 0, 1], port));
}
