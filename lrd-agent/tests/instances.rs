//! User-space stack instances with real processes: an agent, callers in network namespaces made
//! with `ip netns` (this binary started again as a client, as root or as `nobody`), and an
//! instance binary — this binary again playing `stackroute-stackd` by its contract (it reports
//! what it was given, binds its abstract socket, writes `ready` on --ready-fd), or the real
//! `stackroute-stackd` when it is built.
//!
//! Trials that need network namespaces need root: without it they show as ignored with the
//! reason (and fail under `STACKROUTE_REQUIRE_NETNS=1`). Namespaces, cgroups and processes are
//! named with this test's pid and removed (by name, by pid) when their guards drop; nothing is
//! sent on any network.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use common::netns::{Helper, Netns, answer_requests, helper_role, run};
use common::*;
use stackroute_local_api::message::{FallbackReason, Request, Response};
use testkit::{Ignored, Trial};

/// The uid and gid of the unprivileged caller.
const NOBODY: u32 = 65534;
/// The port range the trials give the agent (not the default, so the flag is exercised).
const PORTS: &str = "61000-61099";

/// One node with pod `shop/a` at 192.0.2.11 (TEST-NET-1, assigned only inside a namespace).
const POD_CLUSTER: &str = r#"apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Node, metadata: {name: n1, labels: {topology.kubernetes.io/zone: z1}}, status: {addresses: [{type: InternalIP, address: 198.51.100.1}]}}
- {apiVersion: v1, kind: Namespace, metadata: {name: shop}}
- {apiVersion: v1, kind: Pod, metadata: {name: a, namespace: shop, labels: {app: web}}, spec: {nodeName: n1, containers: []}, status: {podIP: 192.0.2.11}}
"#;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--socket-name") {
        return fake_stackd(&args);
    }
    if let Some((_, socket)) = helper_role() {
        answer_requests(&socket, Duration::from_secs(30));
        return ExitCode::SUCCESS;
    }
    let trials = vec![
        Trial::test(
            "a_caller_in_the_host_namespace_is_refused_in_standalone_mode",
            a_caller_in_the_host_namespace_is_refused_in_standalone_mode,
        ),
        Trial::gated(
            "a_caller_gets_an_instance_in_its_namespace_without_privileges",
            netns_gate,
            |()| a_caller_gets_an_instance_in_its_namespace_without_privileges(),
        ),
        Trial::gated(
            "an_unprivileged_caller_gets_an_instance_with_its_uid_gid_and_cgroup",
            netns_gate,
            |()| an_unprivileged_caller_gets_an_instance_with_its_uid_gid_and_cgroup(),
        ),
        Trial::gated(
            "concurrent_first_requests_start_one_instance",
            netns_gate,
            |()| concurrent_first_requests_start_one_instance(),
        ),
        Trial::gated(
            "a_killed_instance_is_started_again_after_the_back_off",
            netns_gate,
            |()| a_killed_instance_is_started_again_after_the_back_off(),
        ),
        Trial::gated(
            "an_agent_without_cap_net_raw_answers_no_capability",
            netns_gate,
            |()| an_agent_without_cap_net_raw_answers_no_capability(),
        ),
        Trial::gated(
            "a_failing_instance_binary_backs_the_namespace_off",
            netns_gate,
            |()| a_failing_instance_binary_backs_the_namespace_off(),
        ),
        Trial::gated("agent_restarts_adopt_running_instances", netns_gate, |()| {
            agent_restarts_adopt_running_instances()
        }),
        Trial::gated(
            "a_hand_over_leaves_instances_running_for_the_new_agent",
            netns_gate,
            |()| a_hand_over_leaves_instances_running_for_the_new_agent(),
        ),
        Trial::gated(
            "an_instance_is_stopped_once_its_namespace_has_no_other_process",
            netns_gate,
            |()| an_instance_is_stopped_once_its_namespace_has_no_other_process(),
        ),
        Trial::gated(
            "kubernetes_mode_starts_instances_for_pods_only",
            netns_gate,
            |()| kubernetes_mode_starts_instances_for_pods_only(),
        ),
        Trial::gated(
            "the_real_stackd_starts_and_binds_its_socket",
            || {
                netns_gate()?;
                real_stackd()
            },
            the_real_stackd_starts_and_binds_its_socket,
        ),
        Trial::gated(
            "the_real_stackd_falls_back_to_af_packet",
            || {
                netns_gate()?;
                real_stackd()
            },
            the_real_stackd_falls_back_to_af_packet,
        ),
    ];
    testkit::run(trials)
}

// === the roles this binary plays ===

/// `stackroute-stackd` by its contract: reports what it was given on stdout (the agent's log
/// file), binds `@stackroute-stackd.TAG`, writes `ready\n` on --ready-fd, then waits to be
/// killed.
fn fake_stackd(args: &[String]) -> ExitCode {
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_default()
    };
    let packet_fd = value("--packet-fd");
    let link = std::fs::read_link(format!("/proc/self/fd/{packet_fd}"))
        .map(|l| l.display().to_string())
        .unwrap_or_default();
    let inode = link
        .strip_prefix("socket:[")
        .and_then(|l| l.strip_suffix(']'))
        .unwrap_or("none")
        .to_string();
    // /proc/self/net/packet lists the packet sockets of this process's network namespace.
    let packets = std::fs::read_to_string("/proc/self/net/packet").unwrap_or_default();
    let packet_here = packets
        .lines()
        .skip(1)
        .any(|line| line.split_whitespace().last() == Some(inode.as_str()));
    println!(
        "fake stackd: pid {} ports {} packet-fd {packet_fd} {link} packet-in-netns {packet_here} ipv4-only {}",
        std::process::id(),
        value("--ports"),
        args.iter().any(|a| a == "--ipv4-only"),
    );
    let name = stackroute_local_api::relay::socket_name(&value("--socket-name"));
    let address =
        <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(
            name.as_bytes(),
        )
        .expect("an abstract name");
    let _listener = match std::os::unix::net::UnixListener::bind_addr(&address) {
        Ok(listener) => listener,
        Err(error) => {
            println!("fake stackd: cannot bind @{name}: {error}");
            return ExitCode::FAILURE;
        }
    };
    // Through a shell, which inherits the descriptor: reopening /proc/self/fd/N would need
    // the pipe's permissions (root's), and a non-root instance has the descriptor only.
    let fd = value("--ready-fd");
    let written = Command::new("/bin/sh")
        .args(["-c", &format!("echo ready >&{fd}")])
        .status();
    if !written.as_ref().is_ok_and(|s| s.success()) {
        println!("fake stackd: cannot write ready on fd {fd}: {written:?}");
        return ExitCode::FAILURE;
    }
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

// === guards and helpers ===

fn netns_gate() -> Result<(), Ignored> {
    netns::netns_gate(
        &["ip", "iptables", "ip6tables", "setpriv"],
        "needs `ip` (iproute2), `iptables`, `ip6tables` and `setpriv` (util-linux)",
    )
}

/// The real instance binary, if it is built in this target directory.
fn real_stackd() -> Result<PathBuf, Ignored> {
    let exe = std::env::current_exe().expect("test executable");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .join("stackroute-stackd");
    if path.is_file() {
        Ok(path)
    } else {
        Err(Ignored::new(format!(
            "{} is not built (cargo build -p stackroute-stackd)",
            path.display()
        )))
    }
}

/// Instances the trial saw, killed by pid when dropped (they outlive the agent by design);
/// a pid whose command line is not an instance's any more is left alone.
#[derive(Default)]
struct Instances(BTreeSet<i32>);

impl Instances {
    fn add(&mut self, pid: i32) -> i32 {
        self.0.insert(pid);
        pid
    }
}

impl Drop for Instances {
    fn drop(&mut self) {
        for pid in &self.0 {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmdline.windows(13).any(|w| w == b"--socket-name")
                && let Some(pid) = rustix::process::Pid::from_raw(*pid)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

/// A cgroup v2 group for a trial, removed when dropped (once its processes are gone).
struct Cgroup {
    dir: PathBuf,
    /// As `/proc/PID/cgroup` names it.
    path: String,
}

impl Cgroup {
    fn new(tag: &str) -> Option<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let root = mountinfo.lines().find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let mut fields = mount.split(' ');
            let (root, point) = (fields.nth(3)?, fields.next()?);
            (fs.starts_with("cgroup2 ") && root == "/").then(|| PathBuf::from(point))
        })?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let own = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim();
        let path = format!(
            "{}/srinst-{}-{tag}",
            own.trim_end_matches('/'),
            std::process::id()
        );
        let dir = root.join(path.trim_start_matches('/'));
        std::fs::create_dir(&dir).ok()?;
        Some(Self { dir, path })
    }

    fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).expect("join the cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An agent (standalone unless `args` say otherwise) whose controller is not running: the
/// local socket serves without it. Its directories are readable by `nobody`.
fn agent(root: &Path, stackd: &Path, args: &[&str]) -> Agent {
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stackd = stackd.to_str().unwrap().to_string();
    let mut all = vec!["--stackd-binary", &stackd, "--userspace-ports", PORTS];
    all.extend_from_slice(args);
    Agent::start_with("n1", &format!("127.0.0.1:{}", free_port()), root, &all)
}

/// This binary, which plays `stackroute-stackd` when given its flags.
fn fake() -> PathBuf {
    std::env::current_exe().expect("test executable")
}

/// A script that waits `delay` then runs the fake stackd (the instance inherits fds 3 and 4
/// through `exec`).
fn slow_fake(root: &Path, delay: &str) -> PathBuf {
    let path = root.join("slow-stackd");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nsleep {delay}\nexec {} \"$@\"\n",
            fake().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[track_caller]
fn instance(reply: &Response) -> i32 {
    match reply {
        Response::Instance { pid, socket } => {
            assert!(socket.starts_with("stackroute-stackd."), "{socket}");
            let tag = &socket["stackroute-stackd.".len()..];
            assert!(
                tag.len() == 12 && tag.chars().all(|c| c.is_ascii_hexdigit()),
                "{socket}"
            );
            *pid
        }
        other => panic!("expected an instance, got {other:?}"),
    }
}

#[track_caller]
fn unavailable(reply: &Response, reason: FallbackReason) -> String {
    match reply {
        Response::Unavailable { reason: r, message } if *r == reason => message.clone(),
        other => panic!("expected Unavailable {reason:?}, got {other:?}"),
    }
}

fn metric(agent: &Agent, line_start: &str) -> u64 {
    agent
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn netns_of(pid: impl std::fmt::Display) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|l| l.display().to_string())
        .unwrap_or_default()
}

fn netns_inode(pid: impl std::fmt::Display) -> String {
    netns_of(pid)
        .trim_start_matches("net:[")
        .trim_end_matches(']')
        .to_string()
}

/// A `Name:` line of `/proc/PID/status`, its fields.
fn status(pid: i32, name: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

fn alive(pid: i32) -> bool {
    status(pid, "State")
        .first()
        .is_some_and(|s| s != "Z" && s != "X")
}

/// Both raw-table DROP rules (TCP to and from the instance's ports, loopback spared) are there.
fn drop_rule_present(netns: Option<&Netns>) -> bool {
    ["--dport", "--sport"].iter().all(|direction| {
        let args = [
            "-w",
            "5",
            "-t",
            "raw",
            "-C",
            "PREROUTING",
            "!",
            "-i",
            "lo",
            "-p",
            "tcp",
            direction,
            "61000:61099",
            "-j",
            "DROP",
        ];
        match netns {
            Some(netns) => netns.exec("iptables", &args).status.success(),
            None => run("iptables", &args).status.success(),
        }
    })
}

/// Whether either DROP rule is there.
fn any_drop_rule_present(netns: Option<&Netns>) -> bool {
    let rules = match netns {
        Some(netns) => netns.exec("iptables", &["-t", "raw", "-S", "PREROUTING"]),
        None => run("iptables", &["-t", "raw", "-S", "PREROUTING"]),
    };
    String::from_utf8_lossy(&rules.stdout).contains("61000:61099")
}

fn reserved_ports(netns: Option<&Netns>) -> String {
    let file = "/proc/sys/net/ipv4/ip_local_reserved_ports";
    let output = match netns {
        Some(netns) => netns.exec("cat", &[file]),
        None => run("cat", &[file]),
    };
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

// === trials ===

fn a_caller_in_the_host_namespace_is_refused_in_standalone_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = agent(tmp.path(), &fake(), &[]);
    let message = unavailable(
        &agent.call(&Request::UserspaceInstance),
        FallbackReason::NoCapability,
    );
    assert!(message.contains("--userspace-host-netns"), "{message}");
    assert_eq!(
        metric(
            &agent,
            r#"stackroute_lrd_userspace_instance_starts_total{result="refused"} "#
        ),
        1
    );
    assert_eq!(metric(&agent, "stackroute_lrd_userspace_instances "), 0);
}

fn a_caller_gets_an_instance_in_its_namespace_without_privileges() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Instances::default();
    let agent = agent(tmp.path(), &fake(), &[]);
    let ns = Netns::new("root");
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), None);
    let (reply, took) = client.instance();
    let pid = seen.add(instance(&reply));
    eprintln!("first request answered in {} ms (start)", took.as_millis());
    // In the caller's namespace, as the caller (root) but with no capability at all, in a
    // session of its own.
    assert_eq!(netns_of(pid), netns_of(client.pid));
    assert_ne!(netns_of(pid), netns_of("self"));
    assert_eq!(status(pid, "Uid"), ["0"; 4]);
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status(pid, caps), ["0000000000000000"], "{caps}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), ["1"]);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(fields[3], pid.to_string(), "session id: {stat}");
    // It got a packet socket of that namespace on fd 3, and its log is in the state directory.
    let log_path = agent
        .state_dir
        .join("instances")
        .join(format!("{}.log", netns_inode(pid)));
    let log = wait_for("the instance's log", WAIT, || {
        std::fs::read_to_string(&log_path)
            .ok()
            .filter(|l| l.contains("fake stackd"))
    });
    assert!(
        log.contains(&format!("ports {PORTS} packet-fd 3 socket:["))
            && log.contains("packet-in-netns true"),
        "{log}"
    );
    // The namespace is prepared, the host is not.
    assert_eq!(reserved_ports(Some(&ns)), PORTS);
    assert!(drop_rule_present(Some(&ns)));
    assert!(!any_drop_rule_present(None));
    assert!(!reserved_ports(None).contains("61000-61099"));
    // Named at once from now on; the namespace is prepared once.
    let (reply, took) = client.instance();
    assert_eq!(instance(&reply), pid);
    eprintln!("second request answered in {} ms", took.as_millis());
    let rules = ns.exec("iptables", &["-t", "raw", "-S", "PREROUTING"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(rules.matches("--dport 61000:61099").count(), 1, "{rules}");
    assert_eq!(rules.matches("--sport 61000:61099").count(), 1, "{rules}");
    assert_eq!(rules.matches("! -i lo").count(), 2, "{rules}");
    // The same for IPv6, so the instance serves it too.
    let rules = ns.exec("ip6tables", &["-t", "raw", "-S", "PREROUTING"]);
    let rules = String::from_utf8_lossy(&rules.stdout);
    assert_eq!(rules.matches("--dport 61000:61099").count(), 1, "{rules}");
    assert_eq!(rules.matches("--sport 61000:61099").count(), 1, "{rules}");
    assert!(log.contains("ipv4-only false"), "{log}");
    let starts = r#"stackroute_lrd_userspace_instance_starts_total{result="ok"} "#;
    assert_eq!(metric(&agent, starts), 1);
    assert_eq!(metric(&agent, "stackroute_lrd_userspace_instances "), 1);
    assert_eq!(
        metric(
            &agent,
            "stackroute_lrd_userspace_instance_start_seconds_count "
        ),
        1
    );
    let recorded = std::fs::read_to_string(agent.state_dir.join("instances.json")).unwrap();
    assert!(recorded.contains(&format!("\"pid\": {pid}")), "{recorded}");
    assert!(
        agent
            .proc
            .log_text()
            .contains("started a user-space stack instance"),
        "{}",
        agent.proc.log_text()
    );
}

fn an_unprivileged_caller_gets_an_instance_with_its_uid_gid_and_cgroup() {
    let tmp = tempfile::tempdir().unwrap();
    let cgroup = Cgroup::new("caller");
    let mut seen = Instances::default();
    let agent = agent(tmp.path(), &fake(), &[]);
    let ns = Netns::new("nobody");
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), Some(NOBODY));
    if let Some(cgroup) = &cgroup {
        cgroup.add(client.pid);
    }
    // A v1 memory cgroup of its own too, where the host has that hierarchy (hybrid).
    let memory_v1 = Path::new("/sys/fs/cgroup/memory");
    let own_memory = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, path)| path.to_owned()));
    let caller_memory = own_memory
        .filter(|_| memory_v1.join("cgroup.procs").exists())
        .map(|own| {
            let name = format!("srlrd-caller-{}", std::process::id());
            let dir = memory_v1.join(own.trim_start_matches('/')).join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cgroup.procs"), client.pid.to_string()).unwrap();
            dir
        });
    let (reply, took) = client.instance();
    let pid = seen.add(instance(&reply));
    eprintln!("unprivileged caller: answered in {} ms", took.as_millis());
    assert_eq!(netns_of(pid), netns_of(client.pid));
    let nobody = NOBODY.to_string();
    assert_eq!(status(pid, "Uid"), [nobody.as_str(); 4]);
    assert_eq!(status(pid, "Gid"), [nobody.as_str(); 4]);
    assert!(
        status(pid, "Groups").is_empty(),
        "{:?}",
        status(pid, "Groups")
    );
    assert_eq!(status(pid, "CapEff"), ["0000000000000000"]);
    let cgroup_of = |pid: String| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
    };
    assert_eq!(
        cgroup_of(pid.to_string()),
        cgroup_of(client.pid.to_string())
    );
    match &cgroup {
        Some(cgroup) => assert_eq!(
            cgroup_of(pid.to_string()).as_deref(),
            Some(cgroup.path.as_str())
        ),
        None => {
            eprintln!("no cgroup v2 hierarchy to make a test cgroup in: checked the caller's own")
        }
    }
    // On a host with v1 memory and cpu hierarchies (hybrid), the instance joins the caller's
    // cgroups of those too: only they account memory and CPU there.
    let v1_of = |pid: String| -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_once(':').map(|(_, rest)| rest.to_owned()))
            .filter(|rest| {
                let controllers = rest.split(':').next().unwrap_or("");
                controllers.split(',').any(|c| c == "memory" || c == "cpu")
            })
            .collect()
    };
    assert_eq!(v1_of(pid.to_string()), v1_of(client.pid.to_string()));
    if let Some(dir) = &caller_memory {
        let name = dir.file_name().unwrap().to_str().unwrap();
        assert!(
            v1_of(pid.to_string())
                .iter()
                .any(|l| l.starts_with("memory:") && l.ends_with(name)),
            "{:?}",
            v1_of(pid.to_string())
        );
    }
    assert_eq!(instance(&client.instance().0), pid);
    drop(client);
    drop(seen);
    // The cgroups empty once the instance is killed.
    if let Some(dir) = caller_memory {
        wait_for("the v1 memory cgroup to empty", WAIT, || {
            std::fs::remove_dir(&dir).ok()
        });
    }
    let _ = cgroup;
}

fn concurrent_first_requests_start_one_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Instances::default();
    let slow = slow_fake(tmp.path(), "0.4");
    let agent = agent(tmp.path(), &slow, &[]);
    let ns = Netns::new("race");
    let mut clients: Vec<Helper> = (0..3)
        .map(|_| Helper::start("client", &agent.socket_dir, Some(&ns), None))
        .collect();
    for client in &mut clients {
        client.send(&Request::UserspaceInstance);
    }
    let pids: BTreeSet<i32> = clients
        .iter_mut()
        .map(|c| seen.add(instance(&c.reply())))
        .collect();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let starts = r#"stackroute_lrd_userspace_instance_starts_total{result="ok"} "#;
    assert_eq!(metric(&agent, starts), 1);
    assert_eq!(metric(&agent, "stackroute_lrd_userspace_instances "), 1);
}

fn a_killed_instance_is_started_again_after_the_back_off() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Instances::default();
    let agent = agent(tmp.path(), &fake(), &[]);
    let ns = Netns::new("kill");
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), None);
    let first = seen.add(instance(&client.instance().0));
    let pid = rustix::process::Pid::from_raw(first).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    wait_for("the instance to die", WAIT, || {
        (!alive(first)).then_some(())
    });
    // It died within 5 s of its start: the namespace backs off (1 s) before a new start.
    let message = unavailable(&client.instance().0, FallbackReason::StackUnavailable);
    assert!(
        message.contains("exited") && message.contains("no new start"),
        "{message}"
    );
    let second = wait_for("a new instance after the back-off", WAIT, || {
        std::thread::sleep(Duration::from_millis(200));
        match client.instance().0 {
            Response::Instance { pid, .. } => Some(seen.add(pid)),
            _ => None,
        }
    });
    assert_ne!(second, first);
    assert_eq!(netns_of(second), netns_of(client.pid));
    assert_eq!(
        metric(&agent, "stackroute_lrd_userspace_instance_exits_total "),
        1
    );
    let starts = r#"stackroute_lrd_userspace_instance_starts_total{result="ok"} "#;
    assert_eq!(metric(&agent, starts), 2);
    assert_eq!(metric(&agent, "stackroute_lrd_userspace_instances "), 1);
}

/// The agent may not create packet sockets (no `CAP_NET_RAW` in its bounding set): the
/// caller is told `no-capability`, no instance starts, and the agent goes on serving.
fn an_agent_without_cap_net_raw_answers_no_capability() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let stackd = fake();
    let stackd = stackd.to_str().unwrap();
    let agent = Agent::start_wrapped(
        "n1",
        &format!("127.0.0.1:{}", free_port()),
        tmp.path(),
        &[
            "setpriv",
            "--bounding-set",
            "-net_raw",
            "--inh-caps",
            "-net_raw",
            "--",
        ],
        &["--stackd-binary", stackd, "--userspace-ports", PORTS],
    );
    let ns = Netns::new("noraw");
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), None);
    let message = unavailable(&client.instance().0, FallbackReason::NoCapability);
    assert!(
        message.contains("socket(AF_PACKET, SOCK_RAW)"),
        "the packet socket is the step that failed: {message}"
    );
    assert_eq!(metric(&agent, "stackroute_lrd_userspace_instances "), 0);
    assert_eq!(
        metric(
            &agent,
            r#"stackroute_lrd_userspace_instance_starts_total{result="ok"} "#
        ),
        0
    );
    // The agent goes on serving the namespace (the same answer, from its back-off or anew).
    unavailable(&client.instance().0, FallbackReason::NoCapability);
}

fn a_failing_instance_binary_backs_the_namespace_off() {
    let tmp = tempfile::tempdir().unwrap();
    let agent = agent(tmp.path(), Path::new("/bin/false"), &[]);
    let ns = Netns::new("false");
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), None);
    let message = unavailable(&client.instance().0, FallbackReason::StackUnavailable);
    assert!(
        message.contains("before it was ready (exit status: 1)"),
        "{message}"
    );
    // At once, without a start, until the back-off (1 s) ends.
    let started = Instant::now();
    let message = unavailable(&client.instance().0, FallbackReason::StackUnavailable);
    assert!(started.elapsed() < Duration::from_millis(500));
    assert!(message.contains("failure 1 in a row"), "{message}");
    let refused = r#"stackroute_lrd_userspace_instance_starts_total{result="refused"} "#;
    let failed = r#"stackroute_lrd_userspace_instance_starts_total{result="failed"} "#;
    assert_eq!(metric(&agent, failed), 1);
    assert_eq!(metric(&agent, refused), 1);
    std::thread::sleep(Duration::from_millis(1100));
    // Fails again; now 2 s.
    let message = unavailable(&client.instance().0, FallbackReason::StackUnavailable);
    assert!(
        message.contains("before it was ready (exit status: 1)"),
        "{message}"
    );
    let message = unavailable(&client.instance().0, FallbackReason::StackUnavailable);
    assert!(message.contains("failure 2 in a row"), "{message}");
    let left: u64 = message
        .rsplit_once("no new start for ")
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!((1000..=2000).contains(&left), "{message}");
    assert_eq!(metric(&agent, failed), 2);
    assert_eq!(metric(&agent, "stackroute_lrd_userspace_instances "), 0);
    // The agent goes on serving.
    unavailable(
        &agent.call(&Request::UserspaceInstance),
        FallbackReason::NoCapability,
    );
}

fn agent_restarts_adopt_running_instances() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Instances::default();
    let mut agent = agent(tmp.path(), &fake(), &[]);
    let ns = Netns::new("adopt");
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), None);
    let pid = seen.add(instance(&client.instance().0));
    // SIGTERM: the agent exits, the instance keeps running.
    agent.proc.signal("TERM");
    assert!(
        agent.proc.wait_exit(WAIT).is_some(),
        "the agent exits on SIGTERM"
    );
    assert!(alive(pid));
    agent.restart();
    let log = agent.proc.log_text();
    assert!(
        log.contains("adopted a running user-space stack instance"),
        "{log}"
    );
    assert_eq!(instance(&client.instance().0), pid);
    assert_eq!(metric(&agent, "stackroute_lrd_userspace_instances "), 1);
    let starts = r#"stackroute_lrd_userspace_instance_starts_total{result="ok"} "#;
    assert_eq!(metric(&agent, starts), 0, "adopted, not started");
    // A crash (SIGKILL) too; an adopted instance that dies is noticed and started again.
    agent.restart();
    assert_eq!(instance(&client.instance().0), pid);
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let next = wait_for("a new instance", WAIT, || match client.instance().0 {
        Response::Instance { pid: next, .. } if next != pid => Some(seen.add(next)),
        _ => None,
    });
    assert_eq!(netns_of(next), netns_of(client.pid));
    assert_eq!(metric(&agent, starts), 1);
}

fn a_hand_over_leaves_instances_running_for_the_new_agent() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Instances::default();
    let old = agent(
        tmp.path(),
        &fake(),
        &["--userspace-idle-timeout-ms", "1000"],
    );
    let ns = Netns::new("handover");
    let mut client = Helper::start("client", &old.socket_dir, Some(&ns), None);
    let pid = seen.add(instance(&client.instance().0));
    let fake = fake();
    let new = old.successor(
        "n1-new",
        &[
            "--stackd-binary",
            fake.to_str().unwrap(),
            "--userspace-ports",
            PORTS,
            "--userspace-idle-timeout-ms",
            "1000",
        ],
    );
    wait_for("the old agent to stop serving", WAIT, || {
        http_get(old.http, "/readyz").filter(|(code, _)| *code == 503)
    });
    let log = new.proc.log_text();
    assert!(
        log.contains("adopted a running user-space stack instance"),
        "{log}"
    );
    assert_eq!(instance(&client.instance().0), pid);
    // The old agent, stopped, neither stops it nor forgets it in the record; gone, it leaves
    // it running for the new one.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(alive(pid));
    wait_for("the old agent to drop it from its gauge", WAIT, || {
        (metric(&old, "stackroute_lrd_userspace_instances ") == 0).then_some(())
    });
    drop(old);
    assert!(alive(pid));
    let recorded = std::fs::read_to_string(new.state_dir.join("instances.json")).unwrap();
    assert!(recorded.contains(&format!("\"pid\": {pid}")), "{recorded}");
    assert_eq!(instance(&client.instance().0), pid);
    assert_eq!(metric(&new, "stackroute_lrd_userspace_instances "), 1);
    // The new agent reaps it once its namespace is empty.
    drop(client);
    wait_for("the new agent to stop the idle instance", WAIT, || {
        (!alive(pid)).then_some(())
    });
}

fn an_instance_is_stopped_once_its_namespace_has_no_other_process() {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Instances::default();
    let agent = agent(
        tmp.path(),
        &fake(),
        &["--userspace-idle-timeout-ms", "1000"],
    );
    let ns = Netns::new("idle");
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), None);
    let pid = seen.add(instance(&client.instance().0));
    // Kept while its caller lives.
    std::thread::sleep(Duration::from_millis(2000));
    assert!(alive(pid));
    drop(client);
    let started = Instant::now();
    wait_for("the idle instance to stop", WAIT, || {
        (!alive(pid)).then_some(())
    });
    eprintln!(
        "idle instance stopped {} ms after its namespace emptied",
        started.elapsed().as_millis()
    );
    wait_for("the exit to be counted", WAIT, || {
        (metric(&agent, "stackroute_lrd_userspace_instances ") == 0
            && metric(&agent, "stackroute_lrd_userspace_instance_exits_total ") == 1)
            .then_some(())
    });
    let log = agent.proc.log_text();
    assert!(
        log.contains("stopping an idle user-space stack instance"),
        "{log}"
    );
    // A new caller gets a new one at once (an idle stop is no failure).
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), None);
    let next = seen.add(instance(&client.instance().0));
    assert_ne!(next, pid);
}

fn kubernetes_mode_starts_instances_for_pods_only() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut seen = Instances::default();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::fs::write(state.join("cluster.yaml"), POD_CLUSTER).unwrap();
    std::fs::write(state.join("policy.yaml"), policy("Userspace", "BBR")).unwrap();
    let controller = Controller::start(&state, tmp.path(), free_port());
    let fake = fake();
    let agent = Agent::start_with(
        "n1",
        &format!("http://{}", controller.grpc),
        tmp.path(),
        &[
            "--mode",
            "kubernetes",
            "--stackd-binary",
            fake.to_str().unwrap(),
            "--userspace-ports",
            PORTS,
        ],
    );
    wait_for("a fresh snapshot", WAIT, || {
        agent.published().filter(|p| !p.2)
    });
    let pod = Netns::new("pod");
    pod.ip(&["addr", "add", "192.0.2.11/32", "dev", "lo"]);
    let stranger = Netns::new("stranger");
    stranger.ip(&["addr", "add", "192.0.2.99/32", "dev", "lo"]);
    let mut in_pod = Helper::start("client", &agent.socket_dir, Some(&pod), None);
    let pid = seen.add(instance(&in_pod.instance().0));
    assert_eq!(netns_of(pid), netns_of(in_pod.pid));
    // The pod's cgroup pays for it (here the caller's, wherever that is).
    let cgroup_of = |pid: String| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("0::").map(str::to_string))
    };
    assert_eq!(
        cgroup_of(pid.to_string()),
        cgroup_of(in_pod.pid.to_string())
    );
    // A namespace that is no pod of this node, and the host (no pod either), get none.
    let mut outsider = Helper::start("client", &agent.socket_dir, Some(&stranger), None);
    let message = unavailable(&outsider.instance().0, FallbackReason::NoCapability);
    assert!(message.contains("only a pod of this node"), "{message}");
    let message = unavailable(
        &agent.call(&Request::UserspaceInstance),
        FallbackReason::NoCapability,
    );
    assert!(message.contains("only a pod of this node"), "{message}");
    let refused = r#"stackroute_lrd_userspace_instance_starts_total{result="refused"} "#;
    assert_eq!(metric(&agent, refused), 2);
}

fn the_real_stackd_starts_and_binds_its_socket(stackd: PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let mut seen = Instances::default();
    let agent = agent(tmp.path(), &stackd, &[]);
    // A namespace with one interface, an address and a default route, as a pod has; the
    // veth's other end is in a second namespace, so nothing leaves them.
    let ns = Netns::new("real");
    let peer = Netns::new("realpeer");
    ns.ip(&[
        "link", "add", "sr0", "type", "veth", "peer", "name", "sr1", "netns", &peer.name,
    ]);
    ns.ip(&["addr", "add", "192.0.2.31/24", "dev", "sr0"]);
    ns.ip(&["link", "set", "sr0", "up"]);
    ns.ip(&["route", "add", "default", "via", "192.0.2.1", "dev", "sr0"]);
    peer.ip(&["addr", "add", "192.0.2.1/24", "dev", "sr1"]);
    peer.ip(&["link", "set", "sr1", "up"]);
    let mut client = Helper::start("client", &agent.socket_dir, Some(&ns), Some(NOBODY));
    let (reply, took) = client.instance();
    let pid = match &reply {
        Response::Instance { pid, .. } => seen.add(*pid),
        other => {
            let log = std::fs::read_dir(agent.state_dir.join("instances"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "{other:?}\ninstance log:\n{log}\nagent log:\n{}",
                agent.proc.log_text()
            );
        }
    };
    eprintln!(
        "the real stackroute-stackd was ready in {} ms",
        took.as_millis()
    );
    let Response::Instance { socket, .. } = reply else {
        unreachable!()
    };
    // Its abstract socket, in the namespace's own table of Unix sockets.
    let unix = std::fs::read_to_string(format!("/proc/{pid}/net/unix")).unwrap();
    assert!(unix.contains(&format!("@{socket}")), "{unix}");
    assert_eq!(netns_of(pid), netns_of(client.pid));
    assert_eq!(status(pid, "Uid")[0], NOBODY.to_string());
    assert_eq!(instance(&client.instance().0), pid);
    // AF_XDP (the default): the agent attached the steering program to the namespace's one
    // interface, the instance holds the link that keeps it there, and said so.
    let recorded = std::fs::read_to_string(agent.state_dir.join("instances.json")).unwrap();
    assert!(recorded.contains(r#""engine": "af_xdp""#), "{recorded}");
    let link =
        || String::from_utf8_lossy(&ns.exec("ip", &["link", "show", "sr0"]).stdout).into_owned();
    assert!(link().contains("xdpgeneric"), "{}", link());
    let descriptors: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|l| l.display().to_string())
        .collect();
    assert!(
        descriptors.iter().any(|d| d == "anon_inode:bpf_link"),
        "{descriptors:?}"
    );
    // The program lives as long as the instance: killed, it is gone from the interface.
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    wait_for("the instance to exit", WAIT, || (!alive(pid)).then_some(()));
    wait_for("the steering program to leave the interface", WAIT, || {
        (!link().contains("xdp")).then_some(())
    });
}

/// A namespace with `interfaces` veths (the first with an address and the default route), each
/// peered into `peer`, as a pod has one.
fn pod_like(name: &str, peer: &Netns, interfaces: usize) -> Netns {
    let ns = Netns::new(name);
    for i in 0..interfaces {
        // The peer ends are named after the namespace: several pods share one peer.
        let (here, there) = (format!("sr{i}"), format!("{name}{i}"));
        ns.ip(&[
            "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &peer.name,
        ]);
        ns.ip(&["link", "set", &here, "up"]);
        peer.ip(&["link", "set", &there, "up"]);
    }
    ns.ip(&["addr", "add", "192.0.2.31/24", "dev", "sr0"]);
    ns.ip(&["route", "add", "default", "via", "192.0.2.1", "dev", "sr0"]);
    ns
}

/// Where AF_XDP cannot be set up (two interfaces), or is not wanted (`--userspace-packet-io
/// af-packet`), the instance runs on AF_PACKET, and the agent says why.
fn the_real_stackd_falls_back_to_af_packet(stackd: PathBuf) {
    let mut seen = Instances::default();
    let recorded_engine = |agent: &Agent| {
        std::fs::read_to_string(agent.state_dir.join("instances.json")).unwrap_or_default()
    };
    let peer = Netns::new("fallbackpeer");

    let tmp = tempfile::tempdir().unwrap();
    let first = agent(tmp.path(), &stackd, &[]);
    let ns = pod_like("twoifs", &peer, 2);
    let mut client = Helper::start("client", &first.socket_dir, Some(&ns), Some(NOBODY));
    seen.add(instance(&client.instance().0));
    let recorded = recorded_engine(&first);
    assert!(recorded.contains(r#""engine": "af_packet""#), "{recorded}");
    let log = first.proc.log_text();
    assert!(
        log.contains("AF_XDP is unavailable") && log.contains("exactly one interface"),
        "{log}"
    );
    let links = String::from_utf8_lossy(&ns.exec("ip", &["link", "show"]).stdout).into_owned();
    assert!(!links.contains("xdp"), "{links}");
    drop(client);

    let tmp = tempfile::tempdir().unwrap();
    let second = agent(tmp.path(), &stackd, &["--userspace-packet-io", "af-packet"]);
    let ns = pod_like("oneif", &peer, 1);
    let mut client = Helper::start("client", &second.socket_dir, Some(&ns), Some(NOBODY));
    seen.add(instance(&client.instance().0));
    let recorded = recorded_engine(&second);
    assert!(recorded.contains(r#""engine": "af_packet""#), "{recorded}");
    let links = String::from_utf8_lossy(&ns.exec("ip", &["link", "show"]).stdout).into_owned();
    assert!(!links.contains("xdp"), "{links}");
}
