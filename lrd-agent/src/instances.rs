//! User-space stack instances: one `stackroute-stackd` per network namespace, started by the
//! agent when a shim there asks (`userspaceInstance`), in the caller's namespace and cgroup and
//! as the caller's uid/gid, with the packet socket the agent created there (the instance holds
//! no privilege). See the crate README, "User-space stack instances".
//!
//! - **Keyed by network namespace inode**: a live instance is named at once; concurrent first
//!   requests for one namespace wait for the one start; a failed start (or an instance dying
//!   within [`EARLY_EXIT`]) backs the namespace off, 1 s doubling to 30 s.
//! - **Lifetime**: a reaper drops instances that exited and stops (SIGTERM) those whose
//!   namespace has had no other process for the idle timeout; in Kubernetes, at once those left
//!   alone in their caller's container cgroup (the container exited; the pod's teardown waits
//!   for that cgroup to empty).
//! - **Restart and hand-over**: instances are recorded in `STATE_DIR/instances.json`; a new
//!   agent adopts the live ones (same pid and start time); no agent ever stops instances when
//!   it exits or hands over.

mod cgroup;
mod connections;
mod start;
mod sys;

pub(crate) use cgroup::v2_root as cgroup_v2_root;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stackroute_local_api::message::{FallbackReason, InstanceInfo, Response};
use tracing::{debug, info, warn};

use crate::local::{Mode, identity};
use crate::metrics::{
    InstanceMetrics, WorkloadDirectionLabels, WorkloadLabels, WorkloadStateLabels,
};
use crate::peer::{self, Peer, ProcNet};
use crate::state::{Agent, Role};

/// The instances' record in the state directory.
pub const INSTANCES_FILE: &str = "instances.json";
const INSTANCES_TMP_FILE: &str = ".instances.json.tmp";
/// The instances' logs: `STATE_DIR/instances/NETNS.log`.
pub const LOG_DIR: &str = "instances";
/// An instance that exits this soon after it started counts as a failed start (back-off).
pub const EARLY_EXIT: Duration = Duration::from_secs(5);
/// First back-off after a failure; doubled on each further one, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Failures of a namespace are forgotten this long after its back-off ended.
const FORGET_FAILURES: Duration = Duration::from_secs(60);
/// How long an instance told to stop (SIGTERM) has before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// Time a request may spend waiting on top of the ready timeout (namespace preparation).
const PREPARE_ALLOWANCE: Duration = Duration::from_secs(15);

/// A port range `LO-HI`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub lo: u16,
    /// Last port.
    pub hi: u16,
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (lo, hi) = text
            .split_once('-')
            .ok_or_else(|| format!("{text:?}: expected LO-HI, e.g. 61000-62999"))?;
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .map_err(|e| format!("{text:?}: {p:?} is not a port: {e}"))
        };
        let range = Self {
            lo: port(lo)?,
            hi: port(hi)?,
        };
        if range.lo > range.hi {
            return Err(format!("{text:?}: LO must not be above HI"));
        }
        if range.lo < 1024 {
            return Err(format!(
                "{text:?}: the range must start at 1024 or above (privileged ports are not reserved for the instance)"
            ));
        }
        Ok(range)
    }
}

/// Flags of `stackroute-lrd` for user-space stack instances.
#[derive(Clone, Debug, PartialEq, Eq, clap::Args)]
pub struct InstanceFlags {
    /// The user-space stack instance binary. Default: `stackroute-stackd` next to the agent's
    /// executable if it is there, else on `PATH`.
    #[arg(long, env = "STACKROUTE_STACKD_BINARY")]
    pub stackd_binary: Option<PathBuf>,
    /// Ports the instances use for their connections, reserved from the kernel in each
    /// instance's network namespace (`ip_local_reserved_ports`) and dropped in its raw table.
    #[arg(
        long,
        env = "STACKROUTE_USERSPACE_PORTS",
        default_value = "61000-62999"
    )]
    pub userspace_ports: PortRange,
    /// How long a started instance has to report ready (milliseconds).
    #[arg(
        long,
        env = "STACKROUTE_USERSPACE_START_TIMEOUT_MS",
        default_value_t = 3000
    )]
    pub userspace_start_timeout_ms: u64,
    /// Most instances running on this node at once.
    #[arg(
        long,
        env = "STACKROUTE_MAX_USERSPACE_INSTANCES",
        default_value_t = 256
    )]
    pub max_userspace_instances: usize,
    /// Standalone mode: also start an instance for a caller in the agent's own (the host's)
    /// network namespace. Off by default: that instance would share the host's interfaces
    /// with everything on the host.
    #[arg(long, env = "STACKROUTE_USERSPACE_HOST_NETNS")]
    pub userspace_host_netns: bool,
    /// Stop an instance once its network namespace has had no other process for this long
    /// (milliseconds).
    #[arg(
        long,
        env = "STACKROUTE_USERSPACE_IDLE_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub userspace_idle_timeout_ms: u64,
    /// How instances read and write the pod's interface: `af-xdp` (the agent attaches an XDP
    /// program that steers only the instance's flows to an AF_XDP socket, and gives the
    /// instance a packet socket filtered to ARP/ICMP; falls back to AF_PACKET where that
    /// cannot be set up) or `af-packet` (every frame of the interface copied to the instance).
    #[arg(
        long,
        env = "STACKROUTE_USERSPACE_PACKET_IO",
        default_value = "af-xdp",
        value_parser = ["af-xdp", "af-packet"]
    )]
    pub userspace_packet_io: String,
    /// Where the per-network-namespace sysctls are written from (`ip_local_reserved_ports`,
    /// resolved in the namespace of the writer). A container's `/proc/sys` is read-only, so
    /// the chart mounts the host's `/proc/sys/net` writable at `/host/proc/sys/net`.
    #[arg(long, env = "STACKROUTE_PROC_SYS_NET", default_value = "/proc/sys/net")]
    pub proc_sys_net: PathBuf,
    /// The verbs provider (`libstackroute_rdma.so`) instances relay connections upgraded to
    /// RDMA with; without it they decline every upgrade (`stack-unavailable`).
    #[arg(long, env = "STACKROUTE_RDMA_PROVIDER_LIBRARY")]
    pub rdma_provider: Option<PathBuf>,
}

impl Default for InstanceFlags {
    fn default() -> Self {
        Self {
            stackd_binary: None,
            userspace_ports: PortRange {
                lo: 61000,
                hi: 62999,
            },
            userspace_start_timeout_ms: 3000,
            max_userspace_instances: 256,
            userspace_host_netns: false,
            userspace_idle_timeout_ms: 30_000,
            userspace_packet_io: "af-xdp".into(),
            proc_sys_net: PathBuf::from("/proc/sys/net"),
            rdma_provider: None,
        }
    }
}

/// One instance as recorded in `instances.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Inode of its network namespace.
    pub netns: u64,
    /// Its pid.
    pub pid: i32,
    /// Its start time (`/proc/PID/stat` field 22): a reused pid has another.
    pub start_time: u64,
    /// The tag of its abstract socket name.
    pub tag: String,
    /// Its port range, `LO-HI`.
    pub ports: String,
    /// Who asked for it first: `namespace/name` of the pod or workload, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    /// Its packet engine as it reported it (`af_xdp`, `af_packet`), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
}

impl Record {
    /// Whether the process still runs: same start time, not a zombie.
    fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next());
        !matches!(state, Some("Z" | "X"))
            && peer::parse_parent_and_start(&stat).map(|(_, start)| start) == Some(self.start_time)
    }

    fn info(&self) -> InstanceInfo {
        InstanceInfo {
            pid: self.pid,
            socket: stackroute_local_api::relay::socket_name(&self.tag),
            netns: self.netns,
            workload: self.workload.clone(),
        }
    }

    fn answer(&self) -> Response {
        Response::Instance {
            pid: self.pid,
            socket: stackroute_local_api::relay::socket_name(&self.tag),
        }
    }
}

/// A running instance.
#[derive(Debug)]
struct Instance {
    record: Record,
    /// Our child (reaped with `try_wait`); `None` for one adopted from an earlier agent.
    child: Option<Child>,
    /// When it started; `None` if adopted (its age is unknown, so never an early exit).
    started: Option<Instant>,
    /// Since when its namespace has had no other process.
    idle_since: Option<Instant>,
    /// When it was told to stop for being idle.
    terminated: Option<Instant>,
}

impl Instance {
    /// Whether it still runs (a child of ours is reaped here when it has exited).
    fn alive(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(status))) => {
                info!(pid = self.record.pid, netns = self.record.netns, %status, "user-space stack instance exited");
                self.child = None;
                false
            }
            Some(Ok(None)) => true,
            Some(Err(_)) | None => self.record.alive(),
        }
    }
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    /// A start is under way; the sender is dropped when it is over.
    Starting(tokio::sync::watch::Receiver<()>),
    Running(Box<Instance>),
}

/// One network namespace's instance and its failure history.
#[derive(Debug, Default)]
struct Entry {
    state: State,
    /// Failed starts (and early exits) in a row.
    failures: u32,
    /// No start before this (back-off).
    retry_at: Option<Instant>,
    /// Why the last start failed.
    last_failure: Option<(FallbackReason, String)>,
}

impl Entry {
    fn failed(&mut self, reason: FallbackReason, message: String) {
        self.failures = self.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << self.failures.saturating_sub(1).min(16))
            .min(MAX_BACKOFF);
        self.retry_at = Some(Instant::now() + backoff);
        self.last_failure = Some((reason, message));
    }
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<u64, Entry>,
    /// Changed since `instances.json` was last written.
    dirty: bool,
    /// Bumped on every change, so a slow writer never replaces a newer file with an older one.
    version: u64,
    /// Children left when this agent stopped serving: reaped, never stopped.
    orphans: Vec<Child>,
}

impl Table {
    fn changed(&mut self) {
        self.dirty = true;
        self.version += 1;
    }

    fn running(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e.state, State::Running(_) | State::Starting(_)))
            .count()
    }

    fn records(&self) -> Vec<Record> {
        let mut records: Vec<Record> = self
            .entries
            .values()
            .filter_map(|e| match &e.state {
                State::Running(instance) => Some(instance.record.clone()),
                _ => None,
            })
            .collect();
        records.sort_by_key(|r| r.netns);
        records
    }
}

/// What a request does next.
enum Step {
    Answer(Response, &'static str),
    Wait(tokio::sync::watch::Receiver<()>),
    Start(tokio::sync::watch::Sender<()>),
}

/// The node's instances.
#[derive(Debug)]
pub struct Instances {
    flags: InstanceFlags,
    mode: Mode,
    tag: String,
    binary: PathBuf,
    state_dir: PathBuf,
    own_netns: Option<u64>,
    metrics: InstanceMetrics,
    agent: Weak<Agent>,
    table: Mutex<Table>,
    /// Serialises writes of `instances.json`; holds the version last written.
    written: Mutex<u64>,
}

/// The tag of this agent's instances' socket names: 12 hex digits of a hash (FNV-1a, stable
/// across releases) of the canonical socket directory — the same for this agent across
/// restarts and hand-overs, different for two agents on one machine.
pub fn tag(socket_dir: &Path) -> String {
    let dir = std::fs::canonicalize(socket_dir).unwrap_or_else(|_| socket_dir.to_path_buf());
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in dir.as_os_str().as_encoded_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")[..12].to_string()
}

/// `stackroute-stackd` next to the agent's own executable if it is there, else the bare name
/// (looked up on `PATH` when spawned).
fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(start::STACKD)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(start::STACKD))
}

fn lock(mutex: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // Every critical section leaves the table consistent; a panic does not poison it.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unavailable(reason: FallbackReason, message: String) -> Response {
    Response::Unavailable { reason, message }
}

impl Instances {
    /// The instances of `agent` (which must be the agent's state and socket directories) with
    /// `flags`, in `mode`.
    pub fn new(agent: &Arc<Agent>, flags: InstanceFlags, mode: Mode) -> Arc<Self> {
        let binary = flags.stackd_binary.clone().unwrap_or_else(default_binary);
        Arc::new(Self {
            tag: tag(&agent.config.socket_dir),
            binary,
            state_dir: agent.config.state_dir.clone(),
            own_netns: peer::netns_inode(Path::new("/proc"), std::process::id() as i32),
            metrics: agent.metrics.instances.clone(),
            agent: Arc::downgrade(agent),
            flags,
            mode,
            table: Mutex::default(),
            written: Mutex::new(0),
        })
    }

    /// The socket-name tag of the instances this agent starts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The flags in force.
    pub fn flags(&self) -> &InstanceFlags {
        &self.flags
    }

    /// The instance binary.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    fn ready_timeout(&self) -> Duration {
        Duration::from_millis(self.flags.userspace_start_timeout_ms.max(1))
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.flags.userspace_idle_timeout_ms.max(1))
    }

    /// How often the reaper looks: a quarter of the idle timeout, between 200 ms and 5 s.
    pub fn reap_interval(&self) -> Duration {
        (self.idle_timeout() / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// Whether this agent may act for the node: it serves (or is handing over) its socket
    /// directory. An agent that handed over leaves the instances and their file to the new one.
    fn in_charge(&self) -> bool {
        self.agent
            .upgrade()
            .is_some_and(|agent| agent.role() != Role::Stopped && agent.owns_directory())
    }

    /// Adopts the instances recorded in `instances.json` that still run (same pid and start
    /// time, same network namespace); forgets the others.
    pub fn adopt(&self) {
        let path = self.state_dir.join(INSTANCES_FILE);
        let records: Vec<Record> = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(records) => records,
                Err(error) => {
                    warn!(path = %path.display(), %error, "ignoring an unreadable instance record");
                    Vec::new()
                }
            },
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error) => {
                warn!(path = %path.display(), %error, "cannot read the instance record");
                return;
            }
        };
        let mut table = lock(&self.table);
        let (mut adopted, mut gone) = (0, 0);
        for record in records {
            let live = record.alive()
                && peer::netns_inode(Path::new("/proc"), record.pid) == Some(record.netns);
            if !live || table.entries.contains_key(&record.netns) {
                debug!(?record, "not adopting an instance that is gone");
                gone += 1;
                continue;
            }
            info!(netns = record.netns, pid = record.pid, tag = %record.tag, "adopted a running user-space stack instance");
            table.entries.insert(
                record.netns,
                Entry {
                    state: State::Running(Box::new(Instance {
                        record,
                        child: None,
                        started: None,
                        idle_since: None,
                        terminated: None,
                    })),
                    ..Entry::default()
                },
            );
            adopted += 1;
        }
        self.metrics.running.set(table.running() as i64);
        if gone > 0 {
            table.changed();
        }
        if adopted + gone > 0 {
            info!(adopted, gone, "instances recorded by an earlier agent");
        }
    }

    /// Who may have an instance, and for which namespace: Err says why not (the shim records
    /// it as `no-capability`).
    fn admit(&self, agent: &Agent, peer: &Peer) -> Result<u64, String> {
        let refuse = |message: String| Err(message);
        if peer.pid.is_none() {
            return refuse(
                "the caller's pid is not visible to the agent (it needs the host's pid namespace)"
                    .into(),
            );
        }
        let Some(netns) = peer.netns else {
            return refuse("the caller's network namespace cannot be read".into());
        };
        let host = self.own_netns == Some(netns);
        match self.mode {
            Mode::Kubernetes => {
                if let identity::Identity::Unknown(why) = identity::resolve(agent, peer) {
                    return refuse(format!(
                        "only a pod of this node may have a user-space stack instance; cannot tell which pod the caller is ({why})"
                    ));
                }
                if host {
                    return refuse("a host-network pod shares the node's network namespace: an instance there would own the node's interface".into());
                }
            }
            Mode::Standalone if host && !self.flags.userspace_host_netns => {
                return refuse("the caller is in the agent's (the host's) network namespace, whose interfaces an instance would share with everything on the host (start the agent with --userspace-host-netns to allow it)".into());
            }
            Mode::Standalone => {}
        }
        Ok(netns)
    }

    /// Asks every running instance for its connections and sets the per-workload metrics
    /// (blocking: a thread per instance enters its namespace).
    pub fn sum_connections(&self) {
        let records = lock(&self.table).records();
        let totals = connections::collect(&records);
        let metrics = &self.metrics;
        metrics.connections.clear();
        metrics.bytes.clear();
        metrics.retransmits.clear();
        for (workload, totals) in totals {
            for (state, count) in &totals.by_state {
                metrics
                    .connections
                    .get_or_create(&WorkloadStateLabels {
                        workload: workload.clone(),
                        state,
                    })
                    .set(*count as i64);
            }
            for (direction, bytes) in [
                ("sent", totals.bytes_sent),
                ("received", totals.bytes_received),
            ] {
                metrics
                    .bytes
                    .get_or_create(&WorkloadDirectionLabels {
                        workload: workload.clone(),
                        direction,
                    })
                    .set(bytes as i64);
            }
            metrics
                .retransmits
                .get_or_create(&WorkloadLabels { workload })
                .set(totals.retransmits as i64);
        }
    }

    /// The running instances, for `userspaceInstances` (`stackroute connections`).
    pub fn list(&self) -> Vec<InstanceInfo> {
        lock(&self.table)
            .records()
            .iter()
            .map(Record::info)
            .collect()
    }

    /// Answers `userspaceInstance` for `peer`: the running instance of its network namespace,
    /// started if needed, or why there is none. The result label is for the request metric.
    pub async fn request(self: &Arc<Self>, agent: &Agent, peer: &Peer) -> (Response, &'static str) {
        let netns = match self.admit(agent, peer) {
            Ok(netns) => netns,
            Err(why) => {
                self.metrics.start("refused");
                return (
                    unavailable(FallbackReason::NoCapability, why),
                    "unavailable",
                );
            }
        };
        let deadline = tokio::time::Instant::now() + self.ready_timeout() + PREPARE_ALLOWANCE;
        let mut waited = false;
        loop {
            match self.step(netns, waited) {
                Step::Answer(response, result) => return (response, result),
                Step::Wait(mut done) => {
                    waited = true;
                    if tokio::time::timeout_at(deadline, done.changed())
                        .await
                        .is_err()
                    {
                        return (
                            unavailable(
                                FallbackReason::StackUnavailable,
                                "the instance for this network namespace is still starting".into(),
                            ),
                            "unavailable",
                        );
                    }
                }
                Step::Start(done) => {
                    waited = true;
                    let receiver = done.subscribe();
                    let plan = self.plan(agent, peer, netns);
                    let this = self.clone();
                    // On a blocking thread, and never cancelled with the request: the table is
                    // always updated and the waiters woken.
                    tokio::task::spawn_blocking(move || this.run_start(plan, done));
                    let mut receiver = receiver;
                    if tokio::time::timeout_at(deadline, receiver.changed())
                        .await
                        .is_err()
                    {
                        return (
                            unavailable(
                                FallbackReason::StackUnavailable,
                                "the instance for this network namespace is still starting".into(),
                            ),
                            "unavailable",
                        );
                    }
                }
            }
        }
    }

    /// Looks at the namespace's entry: answer, wait for the start under way, or start.
    fn step(&self, netns: u64, waited: bool) -> Step {
        let mut table = lock(&self.table);
        let entry = table.entries.entry(netns).or_default();
        let exited = match &mut entry.state {
            State::Running(instance) => {
                if instance.alive() {
                    return Step::Answer(instance.record.answer(), "ok");
                }
                true
            }
            State::Starting(done) => return Step::Wait(done.clone()),
            State::Idle => false,
        };
        if exited {
            self.exited(entry);
            table.changed();
        }
        self.step_idle(&mut table, netns, waited)
    }

    fn step_idle(&self, table: &mut Table, netns: u64, waited: bool) -> Step {
        let running = table.running();
        let entry = table.entries.entry(netns).or_default();
        if let Some(retry_at) = entry.retry_at.filter(|at| *at > Instant::now()) {
            if !waited {
                self.metrics.start("refused");
            }
            let (reason, why) = entry.last_failure.clone().unwrap_or((
                FallbackReason::StackUnavailable,
                "the instance failed".into(),
            ));
            return Step::Answer(
                unavailable(
                    reason,
                    format!(
                        "{why} (failure {} in a row; no new start for {} ms)",
                        entry.failures,
                        retry_at
                            .saturating_duration_since(Instant::now())
                            .as_millis()
                    ),
                ),
                "unavailable",
            );
        }
        if waited {
            // The start waited for ended without leaving an instance or a back-off (it was
            // stopped already): one more try is a new start.
            debug!(netns, "the awaited start left no instance; starting again");
        }
        if running >= self.flags.max_userspace_instances {
            self.metrics.start("refused");
            return Step::Answer(
                unavailable(
                    FallbackReason::StackUnavailable,
                    format!(
                        "this node runs its maximum of {} user-space stack instances (--max-userspace-instances)",
                        self.flags.max_userspace_instances
                    ),
                ),
                "unavailable",
            );
        }
        let (done, receiver) = tokio::sync::watch::channel(());
        entry.state = State::Starting(receiver);
        Step::Start(done)
    }

    /// Counts an instance that was seen to have exited and sets its entry idle (backing off
    /// if it died soon after it started).
    fn exited(&self, entry: &mut Entry) {
        let State::Running(instance) = std::mem::take(&mut entry.state) else {
            return;
        };
        self.metrics.exits.inc();
        self.metrics.running.dec();
        let lived = instance.started.map(|at| at.elapsed());
        match lived {
            Some(lived) if lived < EARLY_EXIT && instance.terminated.is_none() => {
                warn!(
                    pid = instance.record.pid,
                    netns = instance.record.netns,
                    lived_ms = lived.as_millis() as u64,
                    "user-space stack instance exited soon after it started; backing off"
                );
                entry.failed(
                    FallbackReason::StackUnavailable,
                    format!(
                        "the instance (pid {}) exited {} ms after it started; its log: {}",
                        instance.record.pid,
                        lived.as_millis(),
                        self.log_path(instance.record.netns).display()
                    ),
                );
            }
            _ => {
                info!(
                    pid = instance.record.pid,
                    netns = instance.record.netns,
                    "user-space stack instance gone"
                );
                entry.failures = 0;
                entry.retry_at = None;
                entry.last_failure = None;
            }
        }
    }

    fn log_path(&self, netns: u64) -> PathBuf {
        self.state_dir.join(LOG_DIR).join(format!("{netns}.log"))
    }

    fn plan(&self, agent: &Agent, peer: &Peer, netns: u64) -> start::Plan {
        let identity = identity::resolve(agent, peer);
        let (workload, primary) = match &identity {
            identity::Identity::Known(known) => (
                known
                    .workloads
                    .iter()
                    .next()
                    .map(|(namespace, name)| format!("{namespace}/{name}")),
                known.ips.clone(),
            ),
            identity::Identity::Unknown(_) => (None, Vec::new()),
        };
        let rdma_addresses = match (&self.flags.rdma_provider, peer.pid) {
            (Some(_), Some(pid)) => match ProcNet::default().namespace_addresses(pid) {
                Ok((_, addresses)) => rdma_addresses(&addresses, &primary),
                Err(error) => {
                    debug!(pid, "the caller's addresses, for its RDMA GID: {error}");
                    Vec::new()
                }
            },
            _ => Vec::new(),
        };
        start::Plan {
            workload,
            pid: peer.pid.unwrap_or(0),
            netns,
            uid: peer.uid,
            gid: peer.gid,
            cgroup: peer.cgroup.clone(),
            cgroup_required: self.mode == Mode::Kubernetes,
            binary: self.binary.clone(),
            tag: self.tag.clone(),
            ports: self.flags.userspace_ports,
            ready_timeout: self.ready_timeout(),
            log: self.log_path(netns),
            af_xdp: self.flags.userspace_packet_io == "af-xdp",
            reserved_ports: self.flags.proc_sys_net.join("ipv4/ip_local_reserved_ports"),
            rdma_provider: self.flags.rdma_provider.clone(),
            rdma_addresses,
        }
    }

    /// One start, on a blocking thread; updates the table, then wakes the waiters (`done`
    /// dropped).
    fn run_start(&self, plan: start::Plan, done: tokio::sync::watch::Sender<()>) {
        let began = Instant::now();
        // Whatever happens (a panic included), the entry leaves `Starting`.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start::start(&plan)))
            .unwrap_or_else(|_| {
                Err(start::Failure {
                    reason: FallbackReason::StackUnavailable,
                    message: "the agent failed while starting the instance".into(),
                })
            });
        let elapsed = began.elapsed();
        {
            let mut table = lock(&self.table);
            let entry = table.entries.entry(plan.netns).or_default();
            match result {
                Ok(started) => {
                    info!(
                        netns = plan.netns,
                        pid = started.record.pid,
                        uid = plan.uid,
                        gid = plan.gid,
                        cgroup = ?plan.cgroup,
                        socket = %stackroute_local_api::relay::socket_name(&plan.tag),
                        start_ms = elapsed.as_millis() as u64,
                        "started a user-space stack instance"
                    );
                    self.metrics.start("ok");
                    self.metrics.start_seconds.observe(elapsed.as_secs_f64());
                    self.metrics.running.inc();
                    entry.last_failure = None;
                    entry.retry_at = None;
                    entry.state = State::Running(Box::new(Instance {
                        record: started.record,
                        child: Some(started.child),
                        started: Some(Instant::now()),
                        idle_since: None,
                        terminated: None,
                    }));
                }
                Err(failure) => {
                    warn!(
                        netns = plan.netns,
                        caller = plan.pid,
                        reason = failure.reason.as_str(),
                        elapsed_ms = elapsed.as_millis() as u64,
                        "cannot start a user-space stack instance: {}",
                        failure.message
                    );
                    self.metrics.start("failed");
                    entry.state = State::Idle;
                    entry.failed(failure.reason, failure.message);
                }
            }
            table.changed();
        }
        // Recorded before anyone is told, so a restart right after adopts it.
        self.persist();
        drop(done);
    }

    /// Writes `instances.json` if the table changed and this agent is in charge.
    fn persist(&self) {
        if !self.in_charge() {
            return;
        }
        let mut written = self.written.lock().unwrap_or_else(PoisonError::into_inner);
        let (records, version) = {
            let mut table = lock(&self.table);
            if !table.dirty {
                return;
            }
            table.dirty = false;
            (table.records(), table.version)
        };
        if version <= *written {
            return;
        }
        let bytes = match serde_json::to_vec_pretty(&records) {
            Ok(bytes) => bytes,
            Err(error) => {
                warn!(%error, "cannot encode the instance record");
                return;
            }
        };
        match crate::files::replace_atomically(
            &self.state_dir,
            INSTANCES_TMP_FILE,
            INSTANCES_FILE,
            0o600,
            &[&bytes],
        ) {
            Ok(()) => *written = version,
            Err(error) => {
                warn!(%error, dir = %self.state_dir.display(), "cannot write the instance record; will retry");
                lock(&self.table).dirty = true;
            }
        }
    }

    /// One pass of the reaper (blocking): drops instances that exited, stops those idle for
    /// the idle timeout, writes the record if it changed. An agent that no longer serves only
    /// reaps its children.
    pub fn reap(&self) {
        let Some(agent) = self.agent.upgrade() else {
            return;
        };
        let role = agent.role();
        drop(agent);
        let mut table = lock(&self.table);
        table
            .orphans
            .retain_mut(|child| matches!(child.try_wait(), Ok(None)));
        if role == Role::Stopped || !self.in_charge() {
            // The new agent adopted them; this one keeps only its children's exit statuses.
            let entries = std::mem::take(&mut table.entries);
            for entry in entries.into_values() {
                if let State::Running(instance) = entry.state
                    && let Some(child) = instance.child
                {
                    table.orphans.push(child);
                }
            }
            self.metrics.running.set(0);
            return;
        }
        let mut changed = false;
        let netnses: Vec<u64> = table.entries.keys().copied().collect();
        for netns in &netnses {
            let Some(entry) = table.entries.get_mut(netns) else {
                continue;
            };
            if let State::Running(instance) = &mut entry.state
                && !instance.alive()
            {
                self.exited(entry);
                changed = true;
            }
        }
        // Entries with nothing left to remember.
        let now = Instant::now();
        table.entries.retain(|_, entry| {
            !matches!(entry.state, State::Idle)
                || entry.retry_at.is_some_and(|at| now < at + FORGET_FAILURES)
        });
        let instance_pids: HashSet<i32> = table
            .entries
            .values()
            .filter_map(|e| match &e.state {
                State::Running(instance) => Some(instance.record.pid),
                _ => None,
            })
            .collect();
        if role == Role::Serving && !instance_pids.is_empty() {
            drop(table);
            let busy = busy_namespaces(&instance_pids);
            table = lock(&self.table);
            for entry in table.entries.values_mut() {
                let State::Running(instance) = &mut entry.state else {
                    continue;
                };
                // A pod's instance is in its caller's container cgroup: alone there, the
                // container has exited, and the pod's teardown waits for that cgroup to empty.
                if self.mode == Mode::Kubernetes && cgroup::alone_in_cgroup(instance.record.pid) {
                    self.stop(instance, Stop::ContainerExited);
                    continue;
                }
                if busy.contains(&instance.record.netns) {
                    instance.idle_since = None;
                    continue;
                }
                let idle_since = *instance.idle_since.get_or_insert(now);
                let idle = now.saturating_duration_since(idle_since);
                if idle >= self.idle_timeout() {
                    self.stop(instance, Stop::Idle(idle));
                }
            }
        }
        if changed {
            table.changed();
        }
        drop(table);
        self.persist();
    }

    /// SIGTERM to an instance, SIGKILL if it is still there [`TERM_GRACE`] later; by pid,
    /// after checking it is still the same process.
    fn stop(&self, instance: &mut Instance, why: Stop) {
        if !instance.record.alive() {
            return;
        }
        let signal = match instance.terminated {
            None => rustix::process::Signal::TERM,
            Some(at) if at.elapsed() >= TERM_GRACE => rustix::process::Signal::KILL,
            Some(_) => return,
        };
        let Some(pid) = rustix::process::Pid::from_raw(instance.record.pid) else {
            return;
        };
        match why {
            Stop::Idle(idle) => info!(
                pid = instance.record.pid,
                netns = instance.record.netns,
                idle_ms = idle.as_millis() as u64,
                ?signal,
                "stopping an idle user-space stack instance: no other process is left in its network namespace"
            ),
            Stop::ContainerExited => info!(
                pid = instance.record.pid,
                netns = instance.record.netns,
                ?signal,
                "stopping a user-space stack instance: its caller's container has exited (no other process in its cgroup)"
            ),
        }
        if let Err(error) = rustix::process::kill_process(pid, signal) {
            warn!(pid = instance.record.pid, %error, "cannot signal the instance");
        }
        instance.terminated.get_or_insert_with(Instant::now);
    }
}

/// Why the reaper stops an instance.
#[derive(Clone, Copy, Debug)]
enum Stop {
    /// No other process in its network namespace for this long (the idle timeout or more).
    Idle(Duration),
    /// Alone in its caller's container cgroup (Kubernetes).
    ContainerExited,
}

/// The network namespaces (inodes) in which some process other than `instances` runs.
fn busy_namespaces(instances: &HashSet<i32>) -> HashSet<u64> {
    peer::processes(Path::new("/proc"))
        .filter(|(pid, _)| !instances.contains(pid))
        .filter_map(|(pid, _)| peer::netns_inode(Path::new("/proc"), pid))
        .collect()
}

/// How often the instances' connections are summed into the metrics.
const CONNECTIONS_EVERY: Duration = Duration::from_secs(10);

/// Runs the reaper every [`Instances::reap_interval`] for the life of the process, and sums
/// the instances' connections into the metrics every [`CONNECTIONS_EVERY`].
pub async fn reaper(instances: Arc<Instances>) {
    let mut ticker = tokio::time::interval(instances.reap_interval());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut summed: Option<Instant> = None;
    loop {
        ticker.tick().await;
        let this = instances.clone();
        let sum = summed.is_none_or(|at| at.elapsed() >= CONNECTIONS_EVERY);
        if sum {
            summed = Some(Instant::now());
        }
        let work = move || {
            this.reap();
            if sum {
                this.sum_connections();
            }
        };
        if let Err(error) = tokio::task::spawn_blocking(work).await {
            warn!(%error, "the instance reaper failed; going on");
        }
    }
}

/// The addresses whose GID a pod's queue pairs should use, in order of preference: those of
/// its network namespace besides its primary ones (`primary`: the pod IPs of the snapshot, or
/// a standalone workload's registered addresses) first — a secondary network (a Multus
/// attachment, the addresses its `network-status` annotation reports) is where RoCE usually
/// runs — then the primary ones. Read from the kernel (`/proc/PID/net`), not from an annotation
/// the pod's CNI plugins wrote: only an address the pod holds can be chosen, and the RDMA
/// device's GID table decides which of them is an RDMA address (`stackroute-rdma-discover`).
fn rdma_addresses(namespace: &BTreeSet<IpAddr>, primary: &[IpAddr]) -> Vec<IpAddr> {
    let routable = namespace
        .iter()
        .copied()
        .filter(|ip| peer::is_routable(*ip));
    let (mut primary_held, secondary): (Vec<_>, Vec<_>) =
        routable.partition(|ip| primary.contains(ip));
    primary_held.sort_by_key(|ip| primary.iter().position(|p| p == ip));
    secondary.into_iter().chain(primary_held).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_addresses_put_secondary_networks_first() {
        let ip = |text: &str| -> IpAddr { text.parse().unwrap() };
        let namespace = [
            "127.0.0.1",
            "10.244.1.5",
            "192.168.100.7",
            "fd00:10:244::5",
            "fe80::1",
            "fd00:100::7",
        ]
        .map(ip)
        .into_iter()
        .collect();
        let primary = [ip("fd00:10:244::5"), ip("10.244.1.5")];
        assert_eq!(
            rdma_addresses(&namespace, &primary),
            [
                "192.168.100.7",
                "fd00:100::7",
                "fd00:10:244::5",
                "10.244.1.5"
            ]
            .map(ip)
        );
        // A standalone workload sharing the node's addresses registers none: all count.
        assert_eq!(
            rdma_addresses(&namespace, &[]),
            [
                "10.244.1.5",
                "192.168.100.7",
                "fd00:10:244::5",
                "fd00:100::7"
            ]
            .map(ip)
        );
    }

    #[test]
    fn port_ranges_are_validated() {
        assert_eq!(
            "61000-62999".parse::<PortRange>(),
            Ok(PortRange {
                lo: 61000,
                hi: 62999
            })
        );
        assert_eq!(
            "2000-2000".parse::<PortRange>().unwrap().to_string(),
            "2000-2000"
        );
        for bad in [
            "62999-61000",
            "80-90",
            "1023-2000",
            "61000",
            "a-b",
            "0-65536",
        ] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn tags_are_stable_per_directory() {
        let a = tag(Path::new("/nonexistent/run-a"));
        assert_eq!(a.len(), 12);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a, tag(Path::new("/nonexistent/run-a")));
        assert_ne!(a, tag(Path::new("/nonexistent/run-b")));
        // FNV-1a of the path's bytes: fixed here so a change of the function is noticed
        // (instances of an earlier agent would no longer match its tag).
        assert_eq!(
            tag(Path::new("/run/stackroute")),
            tag(Path::new("/run/stackroute"))
        );
    }

    #[test]
    fn backoff_doubles_to_thirty_seconds() {
        let mut entry = Entry::default();
        let mut waits = Vec::new();
        for _ in 0..8 {
            entry.failed(FallbackReason::StackUnavailable, "x".into());
            let wait = entry
                .retry_at
                .unwrap()
                .saturating_duration_since(Instant::now());
            waits.push((wait.as_millis() as u64).div_ceil(1000));
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn records_check_pid_and_start_time() {
        let me = std::process::id() as i32;
        let (_, start_time) = peer::parent_and_start(Path::new("/proc"), me).unwrap();
        let record = Record {
            netns: 1,
            pid: me,
            start_time,
            tag: "t".into(),
            ports: "61000-62999".into(),
            workload: None,
            engine: None,
        };
        assert!(record.alive());
        assert!(
            !Record {
                start_time: start_time + 1,
                ..record.clone()
            }
            .alive()
        );
        assert_eq!(
            record.answer(),
            Response::Instance {
                pid: me,
                socket: "stackroute-stackd.t".into()
            }
        );
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""startTime""#), "{json}");
    }
}
