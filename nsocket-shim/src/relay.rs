//! Connections on the user-space stack: the application's fd becomes one end of an `AF_UNIX`
//! stream socketpair whose other end the pod's stack instance (`stackroute-stackd`) relays to
//! its TCP connection. The kernel then computes readiness (epoll in every mode, poll, select,
//! io_uring) and carries the socket through `fork`, `exec`, `dup` and `SCM_RIGHTS` with nothing
//! emulated; the shim only answers what must look like TCP on that fd (addresses, `SO_ERROR`,
//! TCP options) and turns the end of file of a reset connection into `ECONNRESET`.
//!
//! What the shim knows of a relayed socket travels with the socket itself: its application end
//! is bound to an abstract name that encodes the instance, the connection id and both
//! addresses ([`RelayName`]), so a process that inherited or received it (after `exec`, over
//! `SCM_RIGHTS`) recognises it with one `getsockname`.
#![deny(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use stackroute_local_api::message::FallbackReason;
use stackroute_local_api::relay::{
    ConnectionInfo, MAX_MESSAGE, RelayOption, RelayRequest, RelayResponse, RelayState,
};
use stackroute_snapshot::{CongestionControl, Stack};

use crate::agent;
use crate::config::Config;
use crate::sys::relay as sys;

/// How long one request to the instance may take (it answers at once; a SYN is sent, not
/// waited for).
const TIMEOUT: Duration = Duration::from_secs(2);

/// Identifies relay names among abstract socket names.
const MAGIC: &[u8; 4] = b"srr1";
const ADDRESS_LEN: usize = 19;
const FIXED_LEN: usize = MAGIC.len() + 4 + 8 + 2 * ADDRESS_LEN;

/// What a relayed socket's abstract name says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RelayName {
    /// The instance's pid as the shim saw it (0: not visible from here).
    pub(crate) instance_pid: i32,
    /// The connection's id on the instance.
    pub(crate) id: u64,
    /// What `getsockname` reports.
    pub(crate) local: SocketAddr,
    /// What `getpeername` reports (what the application connected to).
    pub(crate) remote: SocketAddr,
    /// The instance's abstract socket name.
    socket: [u8; sys::MAX_NAME - FIXED_LEN],
    socket_len: usize,
}

impl RelayName {
    fn new(instance: &Instance, id: u64, local: SocketAddr, remote: SocketAddr) -> Option<Self> {
        let mut socket = [0; sys::MAX_NAME - FIXED_LEN];
        let bytes = instance.socket.as_bytes();
        if bytes.len() > socket.len() {
            return None;
        }
        socket[..bytes.len()].copy_from_slice(bytes);
        Some(Self {
            instance_pid: instance.pid,
            id,
            local,
            remote,
            socket,
            socket_len: bytes.len(),
        })
    }

    /// The abstract name (without the leading NUL).
    pub(crate) fn encode(&self, out: &mut [u8; sys::MAX_NAME]) -> usize {
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(MAGIC);
        put(&self.instance_pid.to_le_bytes());
        put(&self.id.to_le_bytes());
        put(&encode_address(self.local));
        put(&encode_address(self.remote));
        put(&self.socket[..self.socket_len]);
        at
    }

    /// Parses an abstract name; `None` for anything that is not a relay name.
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < FIXED_LEN || &bytes[..4] != MAGIC {
            return None;
        }
        let rest = &bytes[FIXED_LEN..];
        let mut socket = [0; sys::MAX_NAME - FIXED_LEN];
        if rest.len() > socket.len() {
            return None;
        }
        socket[..rest.len()].copy_from_slice(rest);
        Some(Self {
            instance_pid: i32::from_le_bytes(bytes[4..8].try_into().ok()?),
            id: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
            local: decode_address(&bytes[16..16 + ADDRESS_LEN])?,
            remote: decode_address(&bytes[16 + ADDRESS_LEN..FIXED_LEN])?,
            socket,
            socket_len: rest.len(),
        })
    }

    fn socket(&self) -> &[u8] {
        &self.socket[..self.socket_len]
    }
}

fn encode_address(address: SocketAddr) -> [u8; ADDRESS_LEN] {
    let mut out = [0; ADDRESS_LEN];
    match address.ip() {
        IpAddr::V4(ip) => {
            out[0] = 4;
            out[1..5].copy_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out[0] = 6;
            out[1..17].copy_from_slice(&ip.octets());
        }
    }
    out[17..].copy_from_slice(&address.port().to_be_bytes());
    out
}

fn decode_address(bytes: &[u8]) -> Option<SocketAddr> {
    let port = u16::from_be_bytes(bytes[17..19].try_into().ok()?);
    let ip = match bytes[0] {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[1..5]).ok()?)),
        6 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&bytes[1..17]).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The relay name of `fd`, if it is a relayed socket.
pub(crate) fn name_of(fd: RawFd) -> Option<RelayName> {
    let mut bytes = [0; sys::MAX_NAME];
    let len = sys::abstract_name(fd, &mut bytes)?;
    RelayName::decode(&bytes[..len])
}

/// The instance serving this process's network namespace, as the agent named it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Instance {
    pid: i32,
    socket: String,
}

/// The instance last named by the agent. Taken with `try_lock` only: a thread that finds it
/// busy (or a forked child that inherited it locked) asks the agent itself.
static INSTANCE: Mutex<Option<Instance>> = Mutex::new(None);

fn instance(config: &Config) -> Result<Instance, FallbackReason> {
    instance_within(config, agent::INSTANCE_TIMEOUT)
}

/// The instance, asking the agent (which may have to start it) for at most `timeout`.
fn instance_within(config: &Config, timeout: Duration) -> Result<Instance, FallbackReason> {
    if let Ok(cached) = INSTANCE.try_lock()
        && let Some(instance) = cached.as_ref()
    {
        return Ok(instance.clone());
    }
    let (pid, socket) = agent::userspace_instance(config, timeout)?;
    let instance = Instance { pid, socket };
    if let Ok(mut cached) = INSTANCE.try_lock() {
        *cached = Some(instance.clone());
    }
    Ok(instance)
}

/// Forgets `instance` (it did not answer): the next connection asks the agent again, which
/// restarts it or says why not.
fn forget(instance: &Instance) {
    if let Ok(mut cached) = INSTANCE.try_lock()
        && cached.as_ref() == Some(instance)
    {
        *cached = None;
    }
}

/// After `fork`: the child asks the agent afresh if the lock was held by another thread.
pub(crate) fn reset_after_fork() {
    if let Ok(mut cached) = INSTANCE.try_lock() {
        *cached = None;
    }
}

/// One request to an instance's control socket (with `passed` attached), checking that the
/// process answering is the one the agent named when this process can see it.
fn call(
    socket: &[u8],
    expected_pid: i32,
    request: &RelayRequest,
    passed: &[&OwnedFd],
) -> Result<RelayResponse, i32> {
    let stream = sys::seqpacket_connect(socket, TIMEOUT)?;
    if let Some(pid) = sys::peer_pid(&stream)
        && pid != 0
        && expected_pid != 0
        && pid != expected_pid
    {
        return Err(libc::EPERM);
    }
    let bytes = stackroute_local_api::relay::to_packet(request).ok_or(libc::EINVAL)?;
    sys::send_packet(&stream, &bytes, passed)?;
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let len = sys::receive_packet(&stream, &mut buffer)?;
    stackroute_local_api::relay::from_packet(&buffer[..len]).map_err(|_| libc::EPROTO)
}

/// The backend for a connection to `destination` when it is a Service frontend in the
/// node's snapshot; connections spread over equally near backends.
fn service_backend(config: &Config, destination: SocketAddr) -> Option<SocketAddr> {
    static SPREAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let spread =
        SPREAD.fetch_add(1, std::sync::atomic::Ordering::Relaxed) ^ u64::from(std::process::id());
    crate::reader::with_snapshot(config, |snapshot| {
        let (ip, port) = snapshot.ok()?.snapshot.service_backend(
            destination.ip(),
            destination.port(),
            stackroute_snapshot::Protocol::Tcp,
            spread,
        )?;
        Some(SocketAddr::new(ip, port))
    })
}

/// How a relayed `connect` went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Connected {
    /// Established (a blocking connect).
    Established,
    /// In progress (a non-blocking connect: `EINPROGRESS`).
    InProgress,
    /// The handshake failed with this errno (a blocking connect), or a signal came (`EINTR`).
    Failed(i32),
}

/// `connect(fd, destination)` on the user-space stack. `Err` before anything of the
/// application's socket changed: the caller falls back (the reason is counted).
pub(crate) fn connect(
    config: &Config,
    fd: RawFd,
    destination: SocketAddr,
    congestion_control: CongestionControl,
) -> Result<Connected, FallbackReason> {
    // A socket bound to a local address or port first: the instance cannot honour it.
    if crate::sys::local_address(fd).is_some_and(|local| local.port() != 0) {
        return Err(FallbackReason::Unsupported);
    }
    let (nonblocking, cloexec) = sys::fd_flags(fd).ok_or(FallbackReason::Other)?;
    let nodelay = sys::int_option(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY).unwrap_or(0) != 0;
    let instance = instance(config)?;
    let (application, stack) = sys::stream_pair().map_err(|_| FallbackReason::Other)?;
    let filler = sys::fill(&application);
    // A Service frontend: the instance's packets never pass kube-proxy, so the shim picks the
    // backend (the nearest ready one); `getpeername` still shows the frontend.
    let backend = service_backend(config, destination);
    let request = RelayRequest::Connect {
        remote: backend.unwrap_or(destination),
        original: backend.map(|_| destination),
        congestion_control: congestion_control.as_str().to_string(),
        nodelay,
        filler,
    };
    let reply = call(
        instance.socket.as_bytes(),
        instance.pid,
        &request,
        &[&stack],
    );
    drop(stack);
    let (id, local) = match reply {
        Ok(RelayResponse::Connecting { id, local }) => (id, local),
        Ok(_) => return Err(FallbackReason::ConnectFailed),
        Err(_) => {
            forget(&instance);
            return Err(FallbackReason::StackUnavailable);
        }
    };
    adopt(
        &instance,
        id,
        fd,
        application,
        local,
        destination,
        nonblocking,
        cloexec,
    )
    .map_err(|_| FallbackReason::Other)?;
    crate::fdtable::set(fd, crate::fdtable::get(fd).with_nodelay(nodelay));
    if nonblocking {
        return Ok(Connected::InProgress);
    }
    Ok(match sys::wait_writable(fd) {
        sys::Readiness::Writable => Connected::Established,
        sys::Readiness::Interrupted => Connected::Failed(libc::EINTR),
        sys::Readiness::HungUp => {
            // The blocking connect reports the error (Linux consumes it: `SO_ERROR` reads 0).
            crate::fdtable::set(fd, crate::fdtable::get(fd).with_error_reported());
            Connected::Failed(error(fd).filter(|e| *e != 0).unwrap_or(libc::ECONNREFUSED))
        }
    })
}

/// Puts `application`, the application's end of connection `id` of `instance`, on the
/// application's fd number `fd`, named so the shim recognises it (addresses, status).
/// Epoll registrations recorded for `fd` move to it.
#[allow(clippy::too_many_arguments)]
fn adopt(
    instance: &Instance,
    id: u64,
    fd: RawFd,
    application: OwnedFd,
    local: SocketAddr,
    remote: SocketAddr,
    nonblocking: bool,
    cloexec: bool,
) -> Result<(), i32> {
    if let Some(name) = RelayName::new(instance, id, local, remote) {
        let mut bytes = [0; sys::MAX_NAME];
        let len = name.encode(&mut bytes);
        // Without the name the socket still relays; only addresses and reset detection are
        // lost, so a failure here is not a reason to fall back.
        let _ = sys::bind_abstract(&application, &bytes[..len]);
    }
    if nonblocking {
        sys::set_nonblocking(&application)?;
    }
    let entry = crate::fdtable::get(fd);
    let mut registrations = [(0, 0, 0); crate::epollreg::CAPACITY];
    let mut count = 0;
    if entry.epoll_recorded() {
        crate::epollreg::replay(fd, |epoll, events, data| {
            if count < registrations.len() {
                registrations[count] = (epoll, events, data);
                count += 1;
            }
        });
    }
    // The registrations name the socket now on `fd`. Placing the relay socket closes it
    // unless someone else holds it (an RDMA relay keeps the TCP connection): remove them
    // first, so no event of the old socket ever reaches the application.
    for &(epoll, _, _) in &registrations[..count] {
        sys::epoll_delete(epoll, fd);
    }
    // From here on the application's fd is the relay socket, whatever happens.
    let placed = sys::place(application, fd, cloexec);
    // The relay socket (or, if placing failed, the old one) gets them again, with the same
    // events and data.
    for &(epoll, events, data) in &registrations[..count] {
        let _ = sys::epoll_add(epoll, fd, events, data);
    }
    placed?;
    crate::fdtable::set(fd, entry.with_epoll_recorded(false));
    Ok(())
}

/// A queue pair this namespace's instance opened for an RDMA upgrade exchange.
#[derive(Debug)]
pub(crate) struct RdmaOpened {
    instance: Instance,
    token: u64,
    /// Its endpoint, for the Proposal or Accept.
    pub(crate) endpoint: stackroute_rdma_upgrade::Endpoint,
}

/// An RDMA connection the instance relays, not yet on the application's fd.
#[derive(Debug)]
pub(crate) struct RdmaStarted {
    instance: Instance,
    id: u64,
    application: OwnedFd,
    local: SocketAddr,
    remote: SocketAddr,
}

fn rdma_reason(reason: &str) -> stackroute_rdma_upgrade::Reason {
    stackroute_rdma_upgrade::Reason::from_name(reason)
        .unwrap_or(stackroute_rdma_upgrade::Reason::Other)
}

/// Asks this namespace's instance for a queue pair (the instance is started if needed, but
/// waited for at most `timeout`).
pub(crate) fn rdma_open(
    config: &Config,
    timeout: Duration,
) -> Result<RdmaOpened, stackroute_rdma_upgrade::Reason> {
    use stackroute_rdma_upgrade::Reason;
    let instance = instance_within(config, timeout).map_err(|reason| match reason {
        FallbackReason::NoAgent | FallbackReason::StackUnavailable => Reason::StackUnavailable,
        _ => Reason::Other,
    })?;
    match call(
        instance.socket.as_bytes(),
        instance.pid,
        &RelayRequest::RdmaOpen,
        &[],
    ) {
        Ok(RelayResponse::RdmaOpened { token, endpoint }) => Ok(RdmaOpened {
            instance,
            token,
            endpoint: stackroute_rdma_upgrade::Endpoint {
                gid: endpoint.gid,
                qpn: endpoint.qpn,
                psn: endpoint.psn,
            },
        }),
        Ok(RelayResponse::RdmaRefused { reason, .. }) => {
            let reason = rdma_reason(&reason);
            crate::upgrade::remember_local_refusal(reason);
            Err(reason)
        }
        Ok(_) => Err(Reason::Other),
        Err(_) => {
            forget(&instance);
            Err(Reason::StackUnavailable)
        }
    }
}

/// Has the instance connect `opened` to `peer` and relay connection `fd` (a connected kernel
/// TCP socket, which it keeps watching) over it; the application's end is returned for
/// [`rdma_adopt`]. Nothing of `fd` changes here.
pub(crate) fn rdma_start(
    opened: RdmaOpened,
    fd: RawFd,
    peer: stackroute_rdma_upgrade::Endpoint,
    timeout: Duration,
) -> Result<RdmaStarted, stackroute_rdma_upgrade::Reason> {
    use stackroute_rdma_upgrade::Reason;
    let (Some(local), Some(remote)) = (crate::sys::local_address(fd), crate::sys::peer_address(fd))
    else {
        return Err(Reason::Other);
    };
    let (application, stack) = sys::stream_pair().map_err(|_| Reason::Other)?;
    let control = sys::duplicate(fd).map_err(|_| Reason::Other)?;
    let request = RelayRequest::RdmaRelay {
        token: opened.token,
        peer: stackroute_local_api::relay::RdmaEndpoint {
            gid: peer.gid,
            qpn: peer.qpn,
            psn: peer.psn,
        },
        local,
        remote,
        timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
    };
    let instance = opened.instance;
    match call(
        instance.socket.as_bytes(),
        instance.pid,
        &request,
        &[&stack, &control],
    ) {
        Ok(RelayResponse::Connecting { id, .. }) => Ok(RdmaStarted {
            instance,
            id,
            application,
            local,
            remote,
        }),
        Ok(RelayResponse::RdmaRefused { reason, .. }) => Err(rdma_reason(&reason)),
        Ok(_) => Err(Reason::Other),
        Err(_) => {
            forget(&instance);
            Err(Reason::StackUnavailable)
        }
    }
}

/// Puts a started RDMA connection on the application's fd: from here on `fd` is its relayed
/// socket (same flags; `getsockname`/`getpeername` as before).
pub(crate) fn rdma_adopt(started: RdmaStarted, fd: RawFd) -> Result<(), i32> {
    let (nonblocking, cloexec) = sys::fd_flags(fd).ok_or(libc::EBADF)?;
    adopt(
        &started.instance,
        started.id,
        fd,
        started.application,
        started.local,
        started.remote,
        nonblocking,
        cloexec,
    )?;
    let entry = crate::fdtable::get(fd)
        .with_decision(Stack::Rdma, CongestionControl::Default)
        .with_connected();
    crate::fdtable::set(fd, entry);
    Ok(())
}

/// The state of `fd`'s relayed connection: (state, errno, figures).
pub(crate) fn status(
    name: &RelayName,
) -> Option<(RelayState, Option<i32>, Option<ConnectionInfo>)> {
    match call(
        name.socket(),
        name.instance_pid,
        &RelayRequest::Status { id: name.id },
        &[],
    ) {
        Ok(RelayResponse::Status {
            state, error, info, ..
        }) => Some((state, error, info)),
        _ => None,
    }
}

/// `SO_ERROR` of a relayed socket: the handshake's or the reset's errno, else 0.
pub(crate) fn error(fd: RawFd) -> Option<i32> {
    let name = name_of(fd)?;
    Some(match status(&name) {
        Some((RelayState::Failed | RelayState::Reset, error, _)) => {
            error.unwrap_or(libc::ECONNRESET)
        }
        Some(_) => 0,
        // The instance is gone: its connections are reset.
        None => libc::ECONNRESET,
    })
}

/// What a read that returned end of file on `fd` should report instead: `ECONNRESET` (or
/// `ETIMEDOUT`) when the connection was reset, `None` for a clean end of file.
pub(crate) fn end_of_file(fd: RawFd) -> Option<i32> {
    let name = name_of(fd)?;
    match status(&name) {
        Some((RelayState::Reset, error, _)) => Some(error.unwrap_or(libc::ECONNRESET)),
        Some((RelayState::Failed, error, _)) => Some(error.unwrap_or(libc::ECONNREFUSED)),
        Some(_) => None,
        None => Some(libc::ECONNRESET),
    }
}

/// Forwards an option to the instance; whether it took it.
pub(crate) fn set_option(fd: RawFd, option: RelayOption) -> bool {
    let Some(name) = name_of(fd) else {
        return false;
    };
    matches!(
        call(
            name.socket(),
            name.instance_pid,
            &RelayRequest::SetOption {
                id: name.id,
                option
            },
            &[],
        ),
        Ok(RelayResponse::Done)
    )
}

/// The second `connect` on a relayed socket, as Linux answers it for TCP: `EALREADY` while
/// connecting, `EISCONN` once established, else the handshake's error.
pub(crate) fn connect_again(fd: RawFd) -> i32 {
    let Some(name) = name_of(fd) else {
        return libc::EISCONN;
    };
    match status(&name) {
        Some((RelayState::Connecting, ..)) => libc::EALREADY,
        Some((RelayState::Failed, error, _)) => error.unwrap_or(libc::ECONNREFUSED),
        _ => libc::EISCONN,
    }
}

/// Dual listen: asks this namespace's instance to accept user-space peers for the kernel
/// listener on `address` too; whether it will.
pub(crate) fn listen(config: &Config, address: SocketAddr) -> bool {
    let Ok(instance) = instance(config) else {
        return false;
    };
    matches!(
        call(
            instance.socket.as_bytes(),
            instance.pid,
            &RelayRequest::Listen { address },
            &[],
        ),
        Ok(RelayResponse::Done)
    )
}

/// Who is really at the other end of a connection the instance delivered to a dual listener:
/// `peer` is the accepted socket's (loopback) peer address. (remote, connection id).
pub(crate) fn peer_of(config: &Config, peer: SocketAddr) -> Option<(SocketAddr, u64)> {
    let instance = instance(config).ok()?;
    match call(
        instance.socket.as_bytes(),
        instance.pid,
        &RelayRequest::PeerOf { local: peer },
        &[],
    ) {
        Ok(RelayResponse::Peer {
            remote: Some(remote),
            id: Some(id),
        }) => Some((remote, id)),
        _ => None,
    }
}

/// The local (wire) address of connection `id` of this namespace's instance.
pub(crate) fn local_of(config: &Config, id: u64) -> Option<SocketAddr> {
    let instance = instance(config).ok()?;
    match call(
        instance.socket.as_bytes(),
        instance.pid,
        &RelayRequest::Status { id },
        &[],
    ) {
        Ok(RelayResponse::Status {
            info: Some(info), ..
        }) => Some(info.local),
        _ => None,
    }
}

/// The instance's figures for `fd`'s connection.
pub(crate) fn tcp_info(fd: RawFd) -> Option<ConnectionInfo> {
    status(&name_of(fd)?).and_then(|(_, _, info)| info)
}

/// The segment size the instance uses on Ethernet (what `TCP_MAXSEG` reports).
pub(crate) const MSS: u32 = 1448;

/// Length of the `struct tcp_info` prefix this shim fills (Linux 5.4's layout, up to
/// `tcpi_snd_wnd`); a caller's shorter buffer gets a prefix, as from the kernel.
pub(crate) const TCP_INFO_LEN: usize = 232;

/// `struct tcp_info` (linux/tcp.h) from the instance's figures; zeroes for what the instance
/// does not measure. State `CLOSE` without figures.
pub(crate) fn tcp_info_bytes(info: Option<&ConnectionInfo>) -> [u8; TCP_INFO_LEN] {
    let mut out = [0u8; TCP_INFO_LEN];
    let Some(info) = info else {
        out[0] = 7;
        return out;
    };
    let squeezed: String = info
        .tcp_state
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_uppercase();
    out[0] = match squeezed.as_str() {
        "ESTABLISHED" => 1,
        "SYNSENT" => 2,
        "SYNRECEIVED" | "SYNRECV" => 3,
        "FINWAIT1" => 4,
        "FINWAIT2" => 5,
        "TIMEWAIT" => 6,
        "CLOSEWAIT" => 8,
        "LASTACK" => 9,
        "LISTEN" => 10,
        "CLOSING" => 11,
        _ => 7,
    };
    let u32_at = |out: &mut [u8; TCP_INFO_LEN], at: usize, value: u64| {
        out[at..at + 4].copy_from_slice(&(value.min(u64::from(u32::MAX)) as u32).to_ne_bytes());
    };
    let u64_at = |out: &mut [u8; TCP_INFO_LEN], at: usize, value: u64| {
        out[at..at + 8].copy_from_slice(&value.to_ne_bytes());
    };
    u32_at(&mut out, 16, u64::from(MSS)); // tcpi_snd_mss
    u32_at(&mut out, 20, u64::from(MSS)); // tcpi_rcv_mss
    u32_at(&mut out, 68, info.smoothed_rtt_us); // tcpi_rtt
    u32_at(&mut out, 80, info.cwnd_bytes / u64::from(MSS)); // tcpi_snd_cwnd
    u32_at(&mut out, 100, info.retransmits); // tcpi_total_retrans
    u64_at(&mut out, 120, info.bytes_sent); // tcpi_bytes_acked (upper bound)
    u64_at(&mut out, 128, info.bytes_received); // tcpi_bytes_received
    u32_at(&mut out, 148, info.min_rtt_us); // tcpi_min_rtt
    u64_at(&mut out, 160, info.delivery_rate_bps / 8); // tcpi_delivery_rate (bytes/s)
    u64_at(&mut out, 200, info.bytes_sent); // tcpi_bytes_sent
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_not_relays() {
        let instance = Instance {
            pid: 4242,
            socket: "stackroute-stackd.0123456789ab".into(),
        };
        for (local, remote) in [
            ("10.0.0.1:61000", "10.0.0.2:80"),
            ("[fd00::1]:61001", "[2001:db8::ffff:1]:65535"),
        ] {
            let name = RelayName::new(
                &instance,
                u64::MAX - 3,
                local.parse().unwrap(),
                remote.parse().unwrap(),
            )
            .unwrap();
            let mut bytes = [0; sys::MAX_NAME];
            let len = name.encode(&mut bytes);
            assert!(len <= sys::MAX_NAME);
            let back = RelayName::decode(&bytes[..len]).unwrap();
            assert_eq!(back, name);
            assert_eq!(back.socket(), instance.socket.as_bytes());
        }
        assert_eq!(RelayName::decode(b"stackroute-lrd"), None);
        assert_eq!(RelayName::decode(&[0; FIXED_LEN]), None);
        let long = Instance {
            pid: 1,
            socket: "x".repeat(sys::MAX_NAME),
        };
        assert!(
            RelayName::new(
                &long,
                1,
                "1.1.1.1:1".parse().unwrap(),
                "1.1.1.1:2".parse().unwrap()
            )
            .is_none()
        );
    }

    #[test]
    fn tcp_info_matches_the_kernel_layout() {
        let info = ConnectionInfo {
            id: 1,
            local: "10.0.0.1:61000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            original: None,
            tcp_state: "ESTABLISHED".into(),
            state: RelayState::Established,
            congestion_control: "BBR".into(),
            bytes_sent: 1 << 40,
            bytes_received: 77,
            retransmits: 3,
            smoothed_rtt_us: 30_500,
            min_rtt_us: 30_000,
            delivery_rate_bps: 80_000_000,
            cwnd_bytes: 1448 * 10,
            transport: None,
            rdma: None,
        };
        let bytes = tcp_info_bytes(Some(&info));
        let u32_at = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
        assert_eq!(bytes[0], 1);
        assert_eq!(u32_at(68), 30_500);
        assert_eq!(u32_at(80), 10);
        assert_eq!(u32_at(100), 3);
        assert_eq!(u64_at(128), 77);
        assert_eq!(u32_at(148), 30_000);
        assert_eq!(u64_at(160), 10_000_000);
        assert_eq!(u64_at(200), 1 << 40);
        for (state, code) in [
            ("SynSent", 2),
            ("FIN-WAIT-2", 5),
            ("time_wait", 6),
            ("?", 7),
        ] {
            let info = ConnectionInfo {
                tcp_state: state.into(),
                ..info.clone()
            };
            assert_eq!(tcp_info_bytes(Some(&info))[0], code, "{state}");
        }
        assert_eq!(tcp_info_bytes(None)[0], 7);
    }
}
