//! The kernel hook on this machine's kernel, as root: a statically linked client (which no
//! `LD_PRELOAD` reaches) in a cgroup with the hook attached connects inside a network namespace
//! of its own, and `ss -tin` shows the congestion control the policy picked for each
//! destination; a process's own choice is left alone; a new table applies to new connections;
//! dropping the hook leaves no program behind.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use stackroute_kernel_hook::KernelHook;
use stackroute_policy::{ClusterState, Compiled, Settings};
use stackroute_snapshot::kernel_table::{KernelTable, kernel_table};
use stackroute_snapshot::{CongestionControl, Snapshot};
use testkit::{Ignored, Trial};

/// `1`: a trial that cannot run here fails instead of showing as ignored.
const REQUIRE: &str = "STACKROUTE_REQUIRE_NETNS";

/// Connects on request and keeps every connection open: `connect IP PORT [CC]` (setting
/// TCP_CONGESTION first when CC is given) answers `connected LOCAL_PORT` or `failed ERRNO`.
const CLIENT: &str = r#"
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int main(void) {
    char line[256], ip[64], cc[32];
    int port;
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        cc[0] = 0;
        if (sscanf(line, "connect %63s %d %31s", ip, &port, cc) < 2) continue;
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (cc[0] && setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, cc, strlen(cc)) != 0) {
            printf("failed %d\n", errno);
            continue;
        }
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
        inet_pton(AF_INET, ip, &a.sin_addr);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
            printf("failed %d\n", errno);
            continue;
        }
        struct sockaddr_in local;
        socklen_t len = sizeof local;
        getsockname(fd, (struct sockaddr *)&local, &len);
        printf("connected %d\n", ntohs(local.sin_port));
    }
    return 0;
}
"#;

/// Accepts on both ports and keeps every connection.
const SERVER: &str = r#"
import select, socket
listeners = []
for port in (5001, 5002):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port))
    s.listen(64)
    listeners.append(s)
print("listening", flush=True)
kept = []
while True:
    ready, _, _ = select.select(listeners, [], [])
    for s in ready:
        kept.append(s.accept())
"#;

fn policy(to_two: &str) -> Vec<String> {
    vec![
        "apiVersion: v1\nkind: Node\nmetadata: {name: node0}\nstatus: {addresses: [{type: InternalIP, address: 172.16.0.1}]}".into(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: lab}".into(),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: lab}\nspec: {nodeName: node0}\nstatus: {podIPs: [{ip: 10.77.0.1}]}".into(),
        format!(
            "apiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: hook, namespace: lab}}\nspec:\n  podSelector: {{}}\n  rules:\n  - name: two\n    to: [{{networks: [10.77.0.2/32]}}]\n    transport: {{stack: Kernel, congestionControl: {to_two}}}\n  - name: three\n    to: [{{networks: [10.77.0.3/32]}}]\n    ports: [{{port: 5002}}]\n    transport: {{stack: Userspace, congestionControl: BBR, fallback: [{{stack: Kernel, congestionControl: BBR}}]}}\n"
        ),
    ]
}

/// lab/client's table under `policy(to_two)`, with the congestion controls this host allows.
fn table(to_two: &str) -> KernelTable {
    table_allowing(to_two, None)
}

/// lab/client's table under `policy(to_two)`, with the congestion controls `allowed` (this
/// host's `tcp_allowed_congestion_control` when `None`).
fn table_allowing(to_two: &str, allowed: Option<&[CongestionControl]>) -> KernelTable {
    let mut state = ClusterState::default();
    for (index, document) in policy(to_two).iter().enumerate() {
        let problems = state.load_text(&format!("doc{index}"), document);
        assert!(problems.is_empty(), "{problems:?}");
    }
    let compiled = Compiled::new(&state, Settings::default());
    assert!(compiled.problems.is_empty(), "{:?}", compiled.problems);
    let (_, bytes) = compiled
        .all_node_snapshots(1)
        .into_iter()
        .find(|(node, _)| node == "node0")
        .expect("node0's snapshot");
    let snapshot = Snapshot::parse(&bytes).expect("a valid snapshot");
    let workload = snapshot
        .workload_by_name("lab", "client")
        .expect("lab/client");
    let host: Vec<CongestionControl> =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(CongestionControl::from_kernel_name)
            .collect();
    let allowed = allowed.unwrap_or(&host);
    kernel_table(&snapshot, workload, |cc| allowed.contains(&cc))
}

fn gate() -> Result<PathBuf, Ignored> {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let runs = |program: &str, arg: &str| {
        Command::new(program)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    };
    let missing = if !root {
        Some("needs root (BPF, cgroups, network namespaces)".to_string())
    } else if !(runs("ip", "-V") && runs("ss", "-V") && runs("gcc", "--version")) {
        Some("needs ip, ss (iproute2), gcc with a static libc (libc6-dev)".to_string())
    } else {
        match cgroup2_root() {
            Ok(root) => return Ok(root),
            Err(why) => Some(why),
        }
    };
    let reason = missing.unwrap_or_default();
    if std::env::var_os(REQUIRE).is_some_and(|v| v == "1") {
        panic!("{REQUIRE}=1 but this trial {reason}");
    }
    Err(Ignored::new(reason))
}

/// Where the cgroup v2 hierarchy is mounted; mounted at a directory of the test's when it is
/// nowhere (hybrid hosts without the unified mount).
fn cgroup2_root() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mounted = mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fields = mount.split(' ');
        let (root, point) = (fields.nth(3)?, fields.next()?);
        (fs.starts_with("cgroup2 ") && root == "/").then(|| PathBuf::from(point))
    });
    if let Some(point) = mounted {
        return Ok(point);
    }
    let point = PathBuf::from("/run/stackroute-test-cgroup2");
    std::fs::create_dir_all(&point).map_err(|e| format!("{}: {e}", point.display()))?;
    let status = Command::new("mount")
        .args(["-t", "cgroup2", "none"])
        .arg(&point)
        .status()
        .map_err(|e| format!("mount: {e}"))?;
    if status.success() {
        Ok(point)
    } else {
        Err(format!("cannot mount cgroup2 at {}", point.display()))
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace with 10.77.0.1–4 on its loopback and Reno as its default, a cgroup,
/// the server and the static client in both; everything removed when dropped.
struct Lab {
    netns: String,
    cgroup: PathBuf,
    server: Child,
    client: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Dropped after the processes are stopped (`Lab::drop`), or alone when `Lab::new` fails
    /// half way.
    _scratch: Scratch,
}

/// What `Lab::new` creates before its processes run: the namespace, the cgroup, the build
/// directory; removed on drop (each may not exist yet).
struct Scratch {
    netns: String,
    cgroup: PathBuf,
    dir: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
        for _ in 0..50 {
            if !self.cgroup.exists() || std::fs::remove_dir(&self.cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Lab {
    fn new(cgroup_root: &Path) -> Self {
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("srhook-{pid}"));
        let netns = format!("srhook-{pid}");
        let cgroup = cgroup_root.join(format!("srhook-{pid}"));
        let scratch = Scratch {
            netns: netns.clone(),
            cgroup: cgroup.clone(),
            dir: dir.clone(),
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("client.c"), CLIENT).unwrap();
        let client_binary = dir.join("client");
        run(
            "gcc",
            &[
                "-static",
                "-O2",
                "-o",
                client_binary.to_str().unwrap(),
                dir.join("client.c").to_str().unwrap(),
            ],
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &netns]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", netns.as_str()];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        exec(&["ip", "link", "set", "lo", "up"]);
        for host in 1..=4 {
            exec(&[
                "ip",
                "addr",
                "add",
                &format!("10.77.0.{host}/32"),
                "dev",
                "lo",
            ]);
        }
        // A namespace other than the host's may only default to an allowed one.
        exec(&["sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"]);
        std::fs::create_dir_all(&cgroup).unwrap();
        let mut server = Command::new("ip")
            .args(["netns", "exec", &netns, "python3", "-c", SERVER])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening");
        // The client joins the cgroup before it enters the namespace (`ip netns exec` mounts
        // a sysfs of its own, without the cgroup mounts) and becomes the static binary.
        let mut client = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec ip netns exec {netns} {}",
                cgroup.display(),
                client_binary.display()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the client");
        let stdin = client.stdin.take().unwrap();
        let stdout = BufReader::new(client.stdout.take().unwrap());
        Self {
            netns,
            cgroup,
            server,
            client,
            stdin,
            stdout,
            _scratch: scratch,
        }
    }

    /// Connects from the static client; the connection's congestion control as `ss` shows it.
    fn connect(&mut self, ip: &str, port: u16, own_choice: Option<&str>) -> String {
        writeln!(
            self.stdin,
            "connect {ip} {port} {}",
            own_choice.unwrap_or("")
        )
        .unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let local: u16 = line
            .trim()
            .strip_prefix("connected ")
            .unwrap_or_else(|| panic!("connect {ip}:{port}: {line}"))
            .parse()
            .unwrap();
        let ss = run("ip", &["netns", "exec", &self.netns, "ss", "-tinH"]);
        congestion_controls(&ss)
            .get(&(ip.to_string(), local, port))
            .cloned()
            .unwrap_or_else(|| panic!("no socket {ip}:{local} → :{port} in ss:\n{ss}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
        let _ = self.server.kill();
        let _ = self.server.wait();
        // `_scratch` goes next: namespace, cgroup, directory.
    }
}

/// `(local ip, local port, peer port)` → congestion control, from `ss -tinH`.
fn congestion_controls(ss: &str) -> BTreeMap<(String, u16, u16), String> {
    let mut out = BTreeMap::new();
    let mut socket: Option<(String, u16, u16)> = None;
    for line in ss.lines() {
        if !line.starts_with(char::is_whitespace) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = |text: &str| {
                let (ip, port) = text.rsplit_once(':')?;
                Some((ip.to_string(), port.parse::<u16>().ok()?))
            };
            socket = match (
                fields.get(3).and_then(|f| address(f)),
                fields.get(4).and_then(|f| address(f)),
            ) {
                (Some((ip, local)), Some((_, peer))) => Some((ip, local, peer)),
                _ => None,
            };
        } else if let Some(key) = socket.take() {
            let cc = line
                .split_whitespace()
                .find(|word| ["cubic", "bbr", "reno"].contains(word))
                .unwrap_or("?");
            out.insert(key, cc.to_string());
        }
    }
    out
}

fn policy_picks_the_congestion_control_of_a_static_program(cgroup_root: PathBuf) {
    let mut lab = Lab::new(&cgroup_root);
    let mut hook = KernelHook::attach(&lab.cgroup, &table("BBR")).expect("attach the hook");
    assert_eq!(lab.connect("10.77.0.2", 5001, None), "bbr", "rule `two`");
    assert_eq!(
        lab.connect("10.77.0.3", 5002, None),
        "bbr",
        "rule `three`: Userspace skipped, its kernel fallback"
    );
    assert_eq!(
        lab.connect("10.77.0.3", 5001, None),
        "reno",
        "no rule: the default"
    );
    assert_eq!(
        lab.connect("10.77.0.4", 5001, None),
        "reno",
        "no rule: the default"
    );
    assert_eq!(
        lab.connect("10.77.0.2", 5001, Some("cubic")),
        "cubic",
        "the process's own choice is left alone"
    );
    let counters = hook.counters().unwrap();
    assert_eq!(counters.connects, 5, "{counters:?}");
    assert_eq!(counters.applied, 2, "{counters:?}");
    assert_eq!(counters.left_default, 2, "{counters:?}");
    assert_eq!(counters.chosen_by_process, 1, "{counters:?}");
    assert_eq!(counters.not_interposable, 1, "{counters:?}");
    assert_eq!(counters.no_entry + counters.set_failed, 0, "{counters:?}");

    // A new revision: new connections follow it (Reno set by the hook, not left as default).
    hook.update(&table("Reno")).expect("update the table");
    assert_eq!(
        lab.connect("10.77.0.2", 5001, None),
        "reno",
        "after the update"
    );
    assert_eq!(
        lab.connect("10.77.0.3", 5002, None),
        "bbr",
        "after the update"
    );
    let after = hook.counters().unwrap();
    assert_eq!(after.applied, counters.applied + 2, "{after:?}");

    // CUBIC for rule `two`: on a node whose allowed list has it, the hook sets it; with this
    // host's list (Reno and BBR here) the entry is skipped (no-capability) and the default
    // stays, as for an unprivileged program under the shim.
    let everything = [
        CongestionControl::Cubic,
        CongestionControl::Bbr,
        CongestionControl::Reno,
    ];
    hook.update(&table_allowing("Cubic", Some(&everything)))
        .expect("update the table");
    assert_eq!(
        lab.connect("10.77.0.2", 5001, None),
        "cubic",
        "CUBIC allowed"
    );
    hook.update(&table_allowing(
        "Cubic",
        Some(&[CongestionControl::Bbr, CongestionControl::Reno]),
    ))
    .expect("update the table");
    let before = hook.counters().unwrap();
    assert_eq!(
        lab.connect("10.77.0.2", 5001, None),
        "reno",
        "CUBIC not allowed"
    );
    let skipped = hook.counters().unwrap();
    assert_eq!(
        skipped.no_capability,
        before.no_capability + 1,
        "{skipped:?}"
    );

    drop(hook);
    assert_eq!(
        lab.connect("10.77.0.3", 5002, None),
        "reno",
        "hook detached"
    );
    let left: Vec<String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .filter(|name| name.starts_with("stackroute_sock") || name.starts_with("stackroute_sets"))
        .collect();
    assert!(left.is_empty(), "programs still loaded: {left:?}");
}

fn main() -> std::process::ExitCode {
    testkit::run(vec![Trial::gated(
        "policy_picks_the_congestion_control_of_a_static_program",
        gate,
        policy_picks_the_congestion_control_of_a_static_program,
    )])
}
