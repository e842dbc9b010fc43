//! Starting one instance, on a blocking thread: check the caller's namespace, prepare it
//! (reserved ports, the raw-table DROP rule), spawn `stackroute-stackd` into it and wait for
//! its `ready` line.

use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use stackroute_local_api::message::FallbackReason;
use stackroute_pktio::{SharedXdp, XdpHandover};
use tracing::{debug, warn};

use super::cgroup;
use super::sys::{self, InstanceSetup};
use super::{PortRange, Record};

/// Time a failed instance has to exit by itself before it is killed.
const EXIT_GRACE: Duration = Duration::from_millis(500);
/// Time allowed for each helper command (`cat`, `tee`, `iptables`).
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
/// The binary's name, looked for next to the agent's executable, then on `PATH`.
pub(super) const STACKD: &str = "stackroute-stackd";
/// A minimal `PATH` for the helpers and the instance (the agent's environment is not passed).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything one start needs, taken from the caller's `Peer` and the agent's flags.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    /// `namespace/name` of the caller's pod or workload, recorded for `stackroute connections`.
    pub(super) workload: Option<String>,
    pub(super) pid: i32,
    pub(super) netns: u64,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) cgroup: Option<String>,
    pub(super) cgroup_required: bool,
    pub(super) binary: PathBuf,
    pub(super) tag: String,
    pub(super) ports: PortRange,
    pub(super) ready_timeout: Duration,
    pub(super) log: PathBuf,
    /// Try AF_XDP before AF_PACKET (`--userspace-packet-io af-xdp`).
    pub(super) af_xdp: bool,
    /// `ip_local_reserved_ports` as the agent reaches it (`--proc-sys-net`).
    pub(super) reserved_ports: PathBuf,
    /// `--rdma-provider`.
    pub(super) rdma_provider: Option<PathBuf>,
    /// The caller's addresses, for its queue pairs' GID (`STACKROUTE_RDMA_ADDRESSES`).
    pub(super) rdma_addresses: Vec<IpAddr>,
}

/// Why a start failed: the reason the shim records and a message for logs.
#[derive(Debug)]
pub(super) struct Failure {
    pub(super) reason: FallbackReason,
    pub(super) message: String,
}

impl Failure {
    fn stack(message: impl Into<String>) -> Self {
        Self {
            reason: FallbackReason::StackUnavailable,
            message: message.into(),
        }
    }

    fn capability(message: impl Into<String>) -> Self {
        Self {
            reason: FallbackReason::NoCapability,
            message: message.into(),
        }
    }
}

/// A started, ready instance.
#[derive(Debug)]
pub(super) struct Started {
    pub(super) record: Record,
    pub(super) child: Child,
}

/// Starts the instance of `plan`.
pub(super) fn start(plan: &Plan) -> Result<Started, Failure> {
    let netns = open_netns(plan.pid, plan.netns)?;
    let began = Instant::now();
    reserve_ports(&netns, &plan.reserved_ports, plan.ports).map_err(Failure::capability)?;
    drop_rule(&netns, plan.ports, "iptables").map_err(Failure::capability)?;
    // IPv6 is served only where the kernel is kept off the ports for it too.
    let ipv6 = match drop_rule(&netns, plan.ports, "ip6tables") {
        Ok(()) => true,
        Err(why) => {
            warn!(netns = plan.netns, %why, "the instance serves IPv4 only");
            false
        }
    };
    debug!(
        netns = plan.netns,
        ipv6,
        elapsed_ms = began.elapsed().as_millis() as u64,
        "network namespace prepared"
    );
    let xdp = if plan.af_xdp {
        match prepare_xdp(&netns) {
            Ok(prepared) => Some(prepared),
            Err(why) => {
                warn!(netns = plan.netns, %why, "AF_XDP is unavailable; the instance uses AF_PACKET");
                None
            }
        }
    } else {
        None
    };
    spawn(plan, &netns, ipv6, xdp.as_ref())
}

/// AF_XDP prepared in the caller's network namespace for its instance.
#[derive(Debug)]
struct XdpPrepared {
    interface: String,
    handover: XdpHandover,
    /// The packet socket for ARP/ICMP that goes with it.
    neighbours: OwnedFd,
}

/// Prepares AF_XDP on the caller's interface, from a thread that enters the caller's network
/// namespace (the rest of the agent stays where it is): the XDP program, the AF_XDP socket
/// and its UMEM, and the neighbour socket (CAP_NET_RAW, CAP_BPF, CAP_NET_ADMIN, CAP_IPC_LOCK
/// for the UMEM's pinned pages).
fn prepare_xdp(netns: &File) -> Result<XdpPrepared, String> {
    let netns = netns
        .try_clone()
        .map_err(|e| format!("cannot duplicate the namespace descriptor: {e}"))?;
    std::thread::Builder::new()
        .name("prepare-af-xdp".into())
        .spawn(move || {
            rustix::thread::move_into_link_name_space(
                netns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| format!("cannot enter the caller's network namespace: {e}"))?;
            let interface = the_interface()?;
            let (handover, neighbours) = SharedXdp::prepare(&interface)
                .map_err(|e| format!("preparing AF_XDP on {interface}: {e}"))?;
            Ok(XdpPrepared {
                interface,
                handover,
                neighbours,
            })
        })
        .map_err(|e| format!("cannot start a thread: {e}"))?
        .join()
        .map_err(|_| "the thread preparing AF_XDP panicked".to_owned())?
}

/// The namespace's one interface that is up and not loopback (a pod's `eth0`): AF_XDP is
/// set up on one interface, so a namespace with several is left to AF_PACKET.
fn the_interface() -> Result<String, String> {
    use stackroute_pktio::interface;
    let names = interface::names().map_err(|e| format!("cannot list interfaces: {e}"))?;
    let candidates: Vec<String> = names
        .into_iter()
        .filter(|name| {
            interface::is_up(name).unwrap_or(false) && !interface::is_loopback(name).unwrap_or(true)
        })
        .collect();
    match <[String; 1]>::try_from(candidates) {
        Ok([only]) => Ok(only),
        Err(candidates) => Err(format!(
            "AF_XDP needs exactly one interface up besides loopback, found {candidates:?}"
        )),
    }
}

/// `/proc/PID/ns/net` of the caller, if it is still the namespace the caller was seen in (a
/// reused pid, or a caller that moved, is refused).
fn open_netns(pid: i32, expected: u64) -> Result<File, Failure> {
    let path = format!("/proc/{pid}/ns/net");
    let file = File::open(&path)
        .map_err(|e| Failure::stack(format!("cannot open {path}: {e} (did the caller exit?)")))?;
    let inode = file
        .metadata()
        .map_err(|e| Failure::stack(format!("cannot stat {path}: {e}")))?
        .ino();
    if inode != expected {
        return Err(Failure::stack(format!(
            "process {pid} is no longer in network namespace {expected} (now {inode}): the caller exited or moved"
        )));
    }
    Ok(file)
}

/// A helper command run inside `netns`, with a minimal environment.
fn in_netns(netns: &File, program: &str) -> Command {
    let mut command = Command::new(program);
    command.env_clear().env("PATH", PATH).current_dir("/");
    sys::enter_netns_before_exec(&mut command, netns.as_raw_fd());
    command
}

/// Runs `command` with `input` on its stdin; its stdout if it exits with 0, else what it said.
fn run(mut command: Command, input: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let described = format!("{command:?}");
    command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => format!("{described}: not found on {PATH}"),
        _ => format!("{described}: cannot start: {e}"),
    })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        let _ = stdin.write_all(input);
    }
    let deadline = Instant::now() + HELPER_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(2)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{described}: no answer within {HELPER_TIMEOUT:?}"));
            }
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("{described}: {e}"))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(format!(
            "{described}: {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Adds `ports` to the namespace's `ip_local_reserved_ports` (kept with what is there), so
/// the kernel never picks them for its own connections. Nothing is written when they are
/// already reserved.
fn reserve_ports(netns: &File, file: &Path, ports: PortRange) -> Result<(), String> {
    let read = || -> Result<String, String> {
        let mut cat = in_netns(netns, "cat");
        cat.arg(file);
        let bytes = run(cat, None).map_err(|e| format!("cannot read the reserved ports: {e}"))?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    };
    let current = read()?;
    if covers(&current, ports) {
        return Ok(());
    }
    let merged = if current.is_empty() {
        ports.to_string()
    } else {
        format!("{current},{ports}")
    };
    let mut tee = in_netns(netns, "tee");
    tee.arg(file);
    run(tee, Some(format!("{merged}\n").as_bytes())).map_err(|e| {
        let hint = if e.contains("Read-only file system") {
            " (a container's /proc/sys is read-only: mount the host's /proc/sys/net \
                 writable and pass --proc-sys-net)"
        } else {
            ""
        };
        format!("cannot reserve ports {ports}: {e}{hint}")
    })?;
    let now = read()?;
    if !covers(&now, ports) {
        return Err(format!(
            "ports {ports} are not reserved after writing {merged:?} (the namespace has {now:?})"
        ));
    }
    Ok(())
}

/// Whether a reserved-ports list (`1,5-9`) covers every port of `ports`.
pub(super) fn covers(list: &str, ports: PortRange) -> bool {
    let mut ranges: Vec<(u16, u16)> = list
        .split(',')
        .filter_map(|item| {
            let item = item.trim();
            let (lo, hi) = item.split_once('-').unwrap_or((item, item));
            Some((lo.trim().parse().ok()?, hi.trim().parse().ok()?))
        })
        .collect();
    ranges.sort_unstable();
    let mut next = u32::from(ports.lo);
    for (lo, hi) in ranges {
        if u32::from(lo) > next {
            break;
        }
        next = next.max(u32::from(hi) + 1);
        if next > u32::from(ports.hi) {
            return true;
        }
    }
    next > u32::from(ports.hi)
}

/// Keeps the namespace's kernel from answering the instance's flows (it would reset them: it
/// knows no such connection). Two raw-table DROP rules, each inserted only if missing, both
/// for segments arriving on any interface but loopback (the instance's own loopback
/// connections to the application, for dual listen, use kernel ephemeral ports anyway):
///
/// - TCP **to** the instance's ports: the replies of the instance's client connections;
/// - TCP **from** the instance's ports: user-space peers (other namespaces' instances)
///   connecting to a port the application listens on, which this namespace's instance accepts
///   on the wire (dual listen) while the kernel must not see them (it would answer the SYN
///   from the application's kernel listener, or reset the flow). By convention a segment from
///   a source port in the range is a user-space peer: every stackroute namespace reserves the
///   range from its kernel, and Linux's default ephemeral range ends at 60999. A foreign host
///   with a widened ephemeral range (`ip_local_port_range` reaching into it) would be taken
///   for one: its connections from such ports reach the instance, not the kernel.
///
/// AF_PACKET sees frames before netfilter, so the instance still gets them. `tool` is
/// `iptables` or `ip6tables`.
fn drop_rule(netns: &File, ports: PortRange, tool: &str) -> Result<(), String> {
    for direction in ["--dport", "--sport"] {
        drop_rule_for(netns, ports, direction, tool)?;
    }
    Ok(())
}

/// The arguments of one DROP rule after the action (`-C`, `-I`): `PREROUTING ! -i lo -p tcp
/// DIRECTION LO:HI -j DROP`.
fn drop_rule_args(ports: PortRange, direction: &str) -> Vec<String> {
    [
        "PREROUTING",
        "!",
        "-i",
        "lo",
        "-p",
        "tcp",
        direction,
        &format!("{}:{}", ports.lo, ports.hi),
        "-j",
        "DROP",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

fn drop_rule_for(
    netns: &File,
    ports: PortRange,
    direction: &str,
    tool: &str,
) -> Result<(), String> {
    let rule = |action: &str| {
        let mut iptables = in_netns(netns, tool);
        iptables.args(["-w", "5", "-t", "raw", action]);
        iptables.args(drop_rule_args(ports, direction));
        iptables
    };
    match run(rule("-C"), None) {
        Ok(_) => Ok(()),
        Err(missing) if missing.contains("not found on") => Err(format!(
            "{tool} is needed to keep the kernel from answering the instance's ports: {missing}"
        )),
        Err(_) => run(rule("-I"), None).map(drop).map_err(|e| {
            format!("cannot add the {tool} raw-table DROP rule for TCP {direction} {ports}: {e}")
        }),
    }
}

fn spawn(
    plan: &Plan,
    netns: &File,
    ipv6: bool,
    xdp: Option<&XdpPrepared>,
) -> Result<Started, Failure> {
    let cgroups = match cgroup::Membership::open(plan.pid, plan.cgroup.as_deref()) {
        Ok(cgroups) => cgroups,
        Err(why) if plan.cgroup_required => {
            return Err(Failure::stack(format!(
                "cannot join the pod's cgroups, which must pay for the instance: {why}"
            )));
        }
        Err(why) => {
            debug!(%why, "the instance stays in the agent's cgroups");
            cgroup::Membership::default()
        }
    };
    let log =
        open_log(&plan.log).map_err(|e| Failure::stack(format!("{}: {e}", plan.log.display())))?;
    let log_err = log
        .try_clone()
        .map_err(|e| Failure::stack(format!("{}: {e}", plan.log.display())))?;
    let (mut ready_read, ready_write) =
        io::pipe().map_err(|e| Failure::stack(format!("cannot create the ready pipe: {e}")))?;
    let mut command = Command::new(&plan.binary);
    command
        .args(["--socket-name", &plan.tag])
        .args(["--packet-fd", &sys::PACKET_FD.to_string()])
        .args(["--ports", &plan.ports.to_string()])
        .args(["--ready-fd", &sys::READY_FD.to_string()])
        .args((!ipv6).then_some("--ipv4-only"))
        .args(xdp.into_iter().flat_map(|prepared| {
            let fds = sys::XDP_FDS.map(|fd| fd.to_string()).join(",");
            [
                "--interface".to_owned(),
                prepared.interface.clone(),
                "--xdp-fds".to_owned(),
                fds,
            ]
        }))
        .env_clear()
        .env("PATH", PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    if let Some(level) = std::env::var_os("STACKROUTE_STACKD_LOG") {
        command.env("STACKROUTE_LOG", level);
    }
    if let Some(provider) = &plan.rdma_provider {
        command.arg("--rdma-provider").arg(provider);
        // The test provider's settings (`libstackroute_rdma_fault.so`); rdma-core's own
        // environment (`RDMAV_*`, `MLX5_*`) is not passed on.
        for name in ["STACKROUTE_RDMA_FAULTS", "STACKROUTE_RDMA_FAULT_DIR"] {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        if !plan.rdma_addresses.is_empty() {
            let addresses: Vec<String> = plan
                .rdma_addresses
                .iter()
                .map(|ip| ip.to_string())
                .collect();
            command.env(stackroute_rdma_discover::ADDRESSES_VAR, addresses.join(","));
        }
    }
    sys::instance_before_exec(
        &mut command,
        InstanceSetup {
            netns: netns.as_raw_fd(),
            ready: ready_write.as_fd().as_raw_fd(),
            packet: xdp.map(|prepared| prepared.neighbours.as_raw_fd()),
            xdp: xdp.map(|prepared| {
                let h = &prepared.handover;
                [&h.socket, &h.umem, &h.sockets, &h.config, &h.link].map(AsRawFd::as_raw_fd)
            }),
            cgroup_procs: cgroups.procs_fds(),
            cgroup_required: plan.cgroup_required,
            uid: plan.uid,
            gid: plan.gid,
        },
    );
    let spawned = command.spawn();
    // The parent's write end must be closed, or the pipe never reports the instance's exit.
    drop(command);
    drop(ready_write);
    drop(cgroups);
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            let mut step = String::new();
            let _ = ready_read.read_to_string(&mut step);
            let binary = plan.binary.display();
            // The agent lacking a privilege for a step (setns, the packet socket) is a node
            // without the capability, not an instance that failed.
            let denied = matches!(error.raw_os_error(), Some(libc::EPERM | libc::EACCES));
            let message = if step.is_empty() {
                match error.kind() {
                    io::ErrorKind::NotFound => format!("{binary}: not found (--stackd-binary)"),
                    _ => format!("cannot start {binary}: {error}"),
                }
            } else {
                format!("cannot start {binary}: {step}: {error}")
            };
            return Err(if denied && !step.is_empty() {
                Failure::capability(message)
            } else {
                Failure::stack(message)
            });
        }
    };
    let pid = child.id() as i32;
    let engine = match wait_ready(&mut ready_read, plan.ready_timeout) {
        Ok(engine) => engine,
        Err(why) => {
            let status = stop(&mut child);
            return Err(Failure::stack(format!(
                "{} (pid {pid}) {why} ({}); its log {}{}",
                plan.binary.display(),
                status.map_or_else(|| "no exit status".into(), |s| s.to_string()),
                plan.log.display(),
                log_tail(&plan.log)
                    .map(|tail| format!(" ends: {tail}"))
                    .unwrap_or_default()
            )));
        }
    };
    let start_time = crate::peer::parent_and_start(Path::new("/proc"), pid).map(|(_, start)| start);
    let in_netns = crate::peer::netns_inode(Path::new("/proc"), pid);
    let Some(start_time) = start_time.filter(|_| in_netns == Some(plan.netns)) else {
        let status = stop(&mut child);
        return Err(Failure::stack(format!(
            "the instance (pid {pid}) said ready but is not running in network namespace {} (it is in {in_netns:?}, exit status {status:?})",
            plan.netns
        )));
    };
    if let Some(cgroup) = &plan.cgroup {
        let actual = crate::peer::cgroup(Path::new("/proc"), pid);
        if actual.as_deref() != Some(cgroup.as_str()) {
            warn!(pid, expected = %cgroup, ?actual, "the instance runs outside the caller's cgroup");
        }
    }
    Ok(Started {
        record: Record {
            netns: plan.netns,
            pid,
            start_time,
            tag: plan.tag.clone(),
            ports: plan.ports.to_string(),
            workload: plan.workload.clone(),
            engine,
        },
        child,
    })
}

/// The instance's log file, emptied at every start so it stays bounded by one run's output.
fn open_log(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        crate::files::ensure_dir(dir, 0o700)?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Waits for `ready\n` on the pipe; the engine the instance named on an `engine NAME` line
/// before it, if any. Err says what happened instead.
fn wait_ready(pipe: &mut io::PipeReader, timeout: Duration) -> Result<Option<String>, String> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let deadline = Instant::now() + timeout;
    let mut said = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "was not ready within {} ms (--userspace-start-timeout-ms)",
                timeout.as_millis()
            ));
        }
        let mut fds = [PollFd::new(&*pipe, PollFlags::IN)];
        let wait = Timespec::try_from(left).unwrap_or(Timespec {
            tv_sec: 1,
            tv_nsec: 0,
        });
        match poll(&mut fds, Some(&wait)) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => return Err(format!("poll on the ready pipe failed: {error}")),
        }
        let mut buffer = [0; 64];
        match pipe.read(&mut buffer) {
            Ok(0) => {
                return Err(format!(
                    "closed its ready descriptor (or exited) before it was ready{}",
                    if said.is_empty() {
                        String::new()
                    } else {
                        format!(" (it wrote {:?})", String::from_utf8_lossy(&said))
                    }
                ));
            }
            Ok(n) => {
                said.extend_from_slice(&buffer[..n]);
                let text = String::from_utf8_lossy(&said);
                if text.lines().any(|line| line == "ready") && text.ends_with('\n') {
                    let engine = text
                        .lines()
                        .find_map(|line| line.strip_prefix("engine "))
                        .map(str::to_owned);
                    return Ok(engine);
                }
                if said.len() > 256 {
                    return Err("wrote something other than `ready` on its ready descriptor".into());
                }
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(format!("reading the ready pipe failed: {error}")),
        }
    }
}

/// Reaps a child that failed to start, killing it (by its pid, through its handle) unless it
/// exits by itself within [`EXIT_GRACE`]: one that closed its ready descriptor is usually on
/// its way out, and its own error message is the useful one.
fn stop(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + EXIT_GRACE;
    while Instant::now() < deadline {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    child.wait().ok()
}

/// The last line of an instance's log (without colour codes), at most 300 characters.
fn log_tail(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let text = String::from_utf8_lossy(&text[text.len().saturating_sub(4096)..]).into_owned();
    let line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ … final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let plain = plain.trim();
    Some(match plain.char_indices().nth(300) {
        Some((at, _)) => format!("{}…", &plain[..at]),
        None => plain.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_rules_spare_loopback_and_cover_both_directions() {
        let ports = PortRange {
            lo: 61000,
            hi: 62999,
        };
        assert_eq!(
            drop_rule_args(ports, "--sport").join(" "),
            "PREROUTING ! -i lo -p tcp --sport 61000:62999 -j DROP"
        );
        assert_eq!(
            drop_rule_args(ports, "--dport").join(" "),
            "PREROUTING ! -i lo -p tcp --dport 61000:62999 -j DROP"
        );
    }

    #[test]
    fn reserved_port_lists_are_read_as_ranges() {
        let ports = PortRange {
            lo: 61000,
            hi: 62999,
        };
        assert!(covers("61000-62999", ports));
        assert!(covers("80,60000-61999,62000-63000", ports));
        assert!(covers("1-65535", ports));
        assert!(!covers("", ports));
        assert!(!covers("61000-62998", ports));
        assert!(!covers("61001-62999", ports));
        assert!(!covers("61000-61500,61502-62999", ports));
        assert!(covers("61000-61500,61501,61502-62999", ports));
        assert!(covers(
            "65535",
            PortRange {
                lo: 65535,
                hi: 65535
            }
        ));
        assert!(!covers("garbage", ports));
    }

    #[test]
    fn log_tails_lose_colours() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.log");
        std::fs::write(
            &path,
            "first\n\x1b[2m2026-12-03T14:10:02Z\x1b[0m \x1b[31mERROR\x1b[0m no interface\n\n",
        )
        .unwrap();
        assert_eq!(
            log_tail(&path).as_deref(),
            Some("2026-12-03T14:10:02Z ERROR no interface")
        );
        assert_eq!(log_tail(&dir.path().join("none")), None);
    }
}
