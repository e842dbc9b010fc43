//! `libstackroute_rdma_fault.so`: a verbs provider for tests (`STACKROUTE_RDMA_PROVIDER`) with
//! no verbs behind it, for machines without an RDMA device. It has two ABIs:
//!
//! - the shim's capability probe (`nsocket-shim/src/sys/upgrade.rs`): `stackroute_rdma_probe`,
//!   which answers what `STACKROUTE_RDMA_FAULTS` names;
//! - the data-path ABI of `stackroute-rdma-provider` (`stackroute_rdma_qp_*`, through
//!   [`export!`](stackroute_rdma_provider::export)): queue pairs that move bytes, **emulated**
//!   over `AF_UNIX` `SOCK_SEQPACKET` sockets (`stackroute_rdma_relay::emulated`: RC's
//!   semantics as the relay depends on them, and faults), between two queue pairs of one
//!   process or of two processes — two stack instances, in different network namespaces too,
//!   as long as they share the socket directory's file system.
//!
//! It exists to drive the upgrade's negotiation, fallback and data paths where no RDMA device
//! exists; nothing it does counts as RDMA working.
//!
//! # Faults
//!
//! `STACKROUTE_RDMA_FAULTS` is a list `key=value,…`, read at each probe and at each `open` and
//! `connect` of the data path; where it is not set, the file `faults` in the socket directory
//! (below) holds the list, so that a test changes the faults of running stack instances:
//!
//! - `probe=ok|no-device|no-gid|memlock|rdma-error` (negotiation) — this side's capability
//!   (default `no-device`); `ok` answers a fixed link-local GID, the pid as queue pair, PSN 1;
//! - `connect=error|hang|ok` (data path) — the RDMA connect: `error` is `rdma-error` at once;
//!   `hang` waits out the whole timeout it is given, then `connect-timeout`; `ok` (default)
//!   connects;
//! - `open=<reason>` (data path) — any reason name of `stackroute_rdma_upgrade::Reason`
//!   (`no-device`, `memlock`, …) refuses `open` with that reason (default `ok`);
//! - `gids=ADDRESS ADDRESS…` (data path, read at `open`) — an emulated RoCE v2 GID table
//!   holding these addresses (space-separated); `open` chooses from it as the verbs provider
//!   chooses from a device's (`stackroute_rdma_discover::usable_for` with the addresses of
//!   `STACKROUTE_RDMA_ADDRESSES`, which the agent sets for a pod's instance);
//! - `send-fail-after=N` (data path, read at `open`) — after N SENDs, every SEND completes
//!   with `IBV_WC_RETRY_EXC_ERR … (emulated fault after N SENDs)`.
//!
//! A value it does not know refuses the call with reason `other`, saying so.
//!
//! # Queue pairs
//!
//! `open` answers the endpoint {GID: the fault GID (as `probe=ok`), or the GID chosen from
//! `gids=` (above); QPN: a counter of the process from 1; PSN: the process id} and binds a
//! non-blocking `SOCK_SEQPACKET` listener at `<dir>/<psn>-<qpn>`, where `<dir>` is `STACKROUTE_RDMA_FAULT_DIR` (default
//! `/tmp/stackroute-rdma-fault`, created mode `1777` — sticky and world-writable like `/tmp`,
//! because stack instances of several users may share it and each may remove only its own
//! sockets; the sockets themselves get the process's umask, so a peer of another user than
//! root needs a umask that lets it connect). A name in use — a socket left by an ended process
//! of the same pid, or a process of another pid namespace — is skipped for the next QPN.
//! `connect` connects this side's send wire to the peer's path, retrying while nobody listens
//! there (`ENOENT`, `ECONNREFUSED`) until the timeout (then `connect-timeout`; any other error
//! is `rdma-error`, the detail naming path and errno). The receive wire is the peer's send
//! wire, accepted from the listener when the peer connects, which may be after this side's
//! `connect` returned (see `EmulatedQueuePair::across_processes`); the listener's path is
//! removed then, or when the queue pair closes.

use std::fs::{self, DirBuilder, Permissions};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, SocketAddrUnix, SocketFlags, SocketType, bind, connect, listen, socket_with,
};
use stackroute_rdma_provider::{Provider, Refusal};
use stackroute_rdma_relay::emulated::{self, EmulatedQueuePair, Faults};
use stackroute_rdma_relay::{Config, QueuePair, QueuePairError, Received};
use stackroute_rdma_upgrade::{Endpoint, Reason};

/// The faults to inject (see the crate docs).
const FAULTS_VAR: &str = "STACKROUTE_RDMA_FAULTS";
/// The directory of the queue pairs' listeners.
const DIR_VAR: &str = "STACKROUTE_RDMA_FAULT_DIR";
/// The directory when [`DIR_VAR`] is not set.
const DEFAULT_DIR: &str = "/tmp/stackroute-rdma-fault";
/// How long `connect` waits between attempts while nobody listens at the peer's path.
const CONNECT_RETRY: Duration = Duration::from_millis(5);
/// Names tried by one `open` when earlier ones are in use.
const NAME_ATTEMPTS: u32 = 64;

/// The fault named for `key` in `STACKROUTE_RDMA_FAULTS` (`key=value,…`), or in the socket
/// directory's `faults` file when the variable is not set.
fn fault(key: &str) -> Option<String> {
    let list = std::env::var(FAULTS_VAR).ok().or_else(|| {
        let dir = std::env::var_os(DIR_VAR).filter(|dir| !dir.is_empty())?;
        fs::read_to_string(PathBuf::from(dir).join("faults")).ok()
    })?;
    list.split([',', '\n']).find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// The GID `probe=ok` and every queue pair answer: fe80::5352:4641:554c:5401 ("SRFAULT" in
/// hex, roughly).
const GID: [u8; 16] = [
    0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0x53, 0x52, 0x46, 0x41, 0x55, 0x4c, 0x54, 0x01,
];

/// This side's queue pairs' GID: [`GID`], or the one chosen from the emulated table `gids=`
/// for the addresses of `STACKROUTE_RDMA_ADDRESSES`, by the verbs provider's rule.
fn local_gid() -> Result<[u8; 16], Refusal> {
    use stackroute_rdma_discover::{self as discover, Device, Discovery, Gid, Port};
    let Some(table) = fault("gids") else {
        return Ok(GID);
    };
    let gids = table
        .split_whitespace()
        .enumerate()
        .map(|(index, text)| {
            let ip: std::net::IpAddr = text
                .parse()
                .map_err(|_| fault_refusal("gids", &table, "a list of IP addresses"))?;
            Ok(Gid {
                index: index as u32,
                gid: discover::format_gid(discover::address_gid(ip)),
                kind: "RoCE v2".into(),
                netdev: "fault0".into(),
            })
        })
        .collect::<Result<Vec<_>, Refusal>>()?;
    let discovery = Discovery {
        devices: vec![Device {
            name: "fault0".into(),
            ports: vec![Port {
                number: 1,
                state: "active".into(),
                phys_state: "linkup".into(),
                link_layer: "Ethernet".into(),
                active_mtu: 4096,
                gids,
            }],
        }],
        rdma_cm: true,
        uverbs: vec!["uverbs0".into()],
    };
    let preferred =
        discover::preferred_addresses().map_err(|message| Refusal::new(Reason::Other, message))?;
    discover::usable_for(&discovery, &preferred)
        .map(|usable| usable.gid)
        .map_err(|why| {
            Refusal::new(
                Reason::NoGid,
                format!("emulated GID table {table:?}: {why}"),
            )
        })
}

/// Whether a peer's GID is one of an emulated table (an address, not link-local).
fn is_address_gid(gid: [u8; 16]) -> bool {
    gid[..2] != [0xfe, 0x80] && gid != [0; 16]
}

// === the negotiation ABI ===

/// `stackroute_rdma_probe(gid[16], *qpn, *psn)`: 0 with the endpoint, or a reason code.
///
/// # Safety
///
/// `gid` must point to 16 writable bytes and `qpn`, `psn` to writable `u32`s (the provider ABI).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn stackroute_rdma_probe(gid: *mut u8, qpn: *mut u32, psn: *mut u32) -> u16 {
    let answer = fault("probe").unwrap_or_else(|| "no-device".into());
    if answer != "ok" {
        return Reason::from_name(&answer).unwrap_or(Reason::Other).code();
    }
    // SAFETY: the caller passes 16 writable bytes and two writable u32s (see above).
    unsafe {
        std::ptr::copy_nonoverlapping(GID.as_ptr(), gid, GID.len());
        *qpn = std::process::id();
        *psn = 1;
    }
    0
}

// === the data path ===

stackroute_rdma_provider::export!(FaultProvider);

/// The data path's provider (see the crate docs).
struct FaultProvider;

/// The next queue pair number of this process.
static NEXT_QPN: AtomicU32 = AtomicU32::new(1);

/// A listener's path, removed on drop.
#[derive(Debug)]
struct SocketPath(PathBuf);

impl Drop for SocketPath {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A queue pair opened and not yet connected.
#[derive(Debug)]
struct Opened {
    dir: PathBuf,
    listener: OwnedFd,
    path: SocketPath,
    /// The send wire, not yet connected.
    send: OwnedFd,
    config: Config,
    faults: Faults,
}

/// A connected queue pair: an emulated one, and its listener's path until the peer connected.
#[derive(Debug)]
struct FaultQueuePair {
    qp: EmulatedQueuePair,
    listening: Option<SocketPath>,
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?)
}

/// The listeners' directory, created if missing (see the crate docs).
fn socket_dir() -> Result<PathBuf, Refusal> {
    let dir = std::env::var_os(DIR_VAR)
        .filter(|dir| !dir.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_DIR), PathBuf::from);
    let created = DirBuilder::new()
        .mode(0o1777)
        .create(&dir)
        // The umask took bits the mode asked for.
        .and_then(|()| fs::set_permissions(&dir, Permissions::from_mode(0o1777)));
    match created {
        Err(error) if error.kind() != io::ErrorKind::AlreadyExists => Err(Refusal::new(
            Reason::RdmaError,
            format!("the fault provider's directory {}: {error}", dir.display()),
        )),
        _ => Ok(dir),
    }
}

/// Binds and listens at a fresh name in `dir`: the listener, its path and its endpoint (with
/// `gid`).
fn listen_in(
    dir: &std::path::Path,
    gid: [u8; 16],
) -> Result<(OwnedFd, SocketPath, Endpoint), Refusal> {
    let failed = |what: &str, path: &std::path::Path, error: io::Error| {
        Refusal::new(
            Reason::RdmaError,
            format!("{what} {}: {error}", path.display()),
        )
    };
    for _ in 0..NAME_ATTEMPTS {
        let endpoint = Endpoint {
            gid,
            qpn: NEXT_QPN.fetch_add(1, Ordering::Relaxed),
            psn: std::process::id(),
        };
        let path = dir.join(format!("{}-{}", endpoint.psn, endpoint.qpn));
        let address = SocketAddrUnix::new(&path).map_err(|e| failed("bind", &path, e.into()))?;
        let listener = seqpacket().map_err(|e| failed("socket for", &path, e))?;
        match bind(&listener, &address) {
            Ok(()) => {}
            Err(Errno::ADDRINUSE) => continue,
            Err(errno) => return Err(failed("bind", &path, errno.into())),
        }
        let path = SocketPath(path);
        listen(&listener, 4).map_err(|e| failed("listen", &path.0, e.into()))?;
        return Ok((listener, path, endpoint));
    }
    Err(Refusal::new(
        Reason::RdmaError,
        format!(
            "{}: {NAME_ATTEMPTS} listener names in a row in use",
            dir.display()
        ),
    ))
}

fn fault_refusal(key: &str, value: &str, expected: &str) -> Refusal {
    Refusal::new(
        Reason::Other,
        format!("{FAULTS_VAR}: {key}={value} is not {expected}"),
    )
}

impl Provider for FaultProvider {
    type Opened = Opened;
    type QueuePair = FaultQueuePair;

    fn open(config: &Config) -> Result<(Opened, Endpoint), Refusal> {
        match fault("open").as_deref() {
            None | Some("ok") => {}
            Some(name) => {
                return Err(match Reason::from_name(name) {
                    Some(reason) => {
                        Refusal::new(reason, format!("emulated fault: {FAULTS_VAR} open={name}"))
                    }
                    None => fault_refusal("open", name, "ok or a reason name"),
                });
            }
        }
        let fail_after_sends = match fault("send-fail-after") {
            None => None,
            Some(count) => Some(
                count
                    .parse()
                    .map_err(|_| fault_refusal("send-fail-after", &count, "a count of SENDs"))?,
            ),
        };
        config.check().map_err(|message| {
            Refusal::new(Reason::RdmaError, format!("queue pair sizes: {message}"))
        })?;
        let gid = local_gid()?;
        let dir = socket_dir()?;
        let (listener, path, endpoint) = listen_in(&dir, gid)?;
        let send = seqpacket().map_err(|error| {
            Refusal::new(Reason::RdmaError, format!("send wire socket: {error}"))
        })?;
        // As registering the buffers would, at open: the send wire must hold a window.
        emulated::reserve_window(&send, config).map_err(|error| {
            Refusal::new(Reason::Memlock, format!("emulated queue pair: {error}"))
        })?;
        let opened = Opened {
            dir,
            listener,
            path,
            send,
            config: *config,
            faults: Faults { fail_after_sends },
        };
        Ok((opened, endpoint))
    }

    fn connect(
        opened: Opened,
        peer: &Endpoint,
        timeout: Duration,
    ) -> Result<FaultQueuePair, Refusal> {
        let start = Instant::now();
        match fault("connect").as_deref() {
            None | Some("ok") => {}
            Some("error") => {
                return Err(Refusal::new(
                    Reason::RdmaError,
                    format!("emulated fault: {FAULTS_VAR} connect=error"),
                ));
            }
            Some("hang") => {
                std::thread::sleep(timeout);
                return Err(Refusal::new(
                    Reason::ConnectTimeout,
                    format!("emulated fault: {FAULTS_VAR} connect=hang (waited {timeout:?})"),
                ));
            }
            Some(other) => return Err(fault_refusal("connect", other, "error, hang or ok")),
        }
        if peer.gid != GID && !is_address_gid(peer.gid) {
            return Err(Refusal::new(
                Reason::RdmaError,
                format!(
                    "the peer's GID {:02x?} is not the fault provider's: a peer on another provider",
                    peer.gid
                ),
            ));
        }
        let path = opened.dir.join(format!("{}-{}", peer.psn, peer.qpn));
        let failed = |reason, error: Errno| {
            Refusal::new(
                reason,
                format!("connect {}: {}", path.display(), io::Error::from(error)),
            )
        };
        let address =
            SocketAddrUnix::new(&path).map_err(|errno| failed(Reason::RdmaError, errno))?;
        loop {
            match connect(&opened.send, &address) {
                Ok(()) => break,
                Err(Errno::INTR) => {}
                // Nobody listens there yet (the peer opens later, or never), or its backlog is
                // full: again, until the timeout.
                Err(errno @ (Errno::NOENT | Errno::CONNREFUSED | Errno::AGAIN)) => {
                    let left = timeout.saturating_sub(start.elapsed());
                    if left.is_zero() {
                        return Err(Refusal::new(
                            Reason::ConnectTimeout,
                            format!(
                                "connect {}: nobody listening after {timeout:?} (last: {})",
                                path.display(),
                                io::Error::from(errno)
                            ),
                        ));
                    }
                    std::thread::sleep(left.min(CONNECT_RETRY));
                }
                Err(errno) => return Err(failed(Reason::RdmaError, errno)),
            }
        }
        let Opened {
            listener,
            path: listening,
            send,
            config,
            faults,
            ..
        } = opened;
        let qp = EmulatedQueuePair::across_processes(send, listener, config, faults).map_err(
            |error| Refusal::new(Reason::RdmaError, format!("emulated queue pair: {error}")),
        )?;
        Ok(FaultQueuePair {
            qp,
            listening: Some(listening),
        })
    }
}

impl QueuePair for FaultQueuePair {
    fn send_slots(&self) -> usize {
        self.qp.send_slots()
    }

    fn post_send(&mut self, immediate: u32, payload: &[u8]) -> Result<(), QueuePairError> {
        self.qp.post_send(immediate, payload)
    }

    fn poll(&mut self, received: &mut Vec<Received>) -> Result<(), QueuePairError> {
        let polled = self.qp.poll(received);
        if self.listening.is_some() && !self.qp.awaiting_peer() {
            // The peer is connected: nobody else needs the name.
            self.listening = None;
        }
        polled
    }

    fn event_fd(&self) -> BorrowedFd<'_> {
        self.qp.event_fd()
    }
}
