//! The event loop: one thread drives the stack, the control socket and every relayed
//! connection's application socket, with `mio` (edge-triggered epoll) for the descriptors and
//! the stack's own timers (`poll_at`) for the rest.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant as StdInstant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use rustix::io::Errno;
use stackroute_local_api::relay::{
    ConnectionInfo, MAX_MESSAGE, RelayOption, RelayRequest, RelayResponse, RelayState,
};
use stackroute_nethost::{Host, Wait};
use stackroute_netstack::congestion::CongestionControl;
use stackroute_netstack::{
    Ipv6Config, Keepalive, SocketError, SocketHandle, SocketOption, TcpConfig, TcpState,
};
use stackroute_pktio::AnyDevice;
use tracing::{debug, info, warn};

use crate::control::{self, Packet, Refusal};
use crate::rdma::Rdma;
use crate::relay::{End, Relay};

const PACKETS: Token = Token(0);
const LISTENER: Token = Token(1);
const SIGNAL: Token = Token(2);
/// Control connections: this bit plus a key; relayed connections: this bit plus their id.
const CONTROL_BIT: usize = 1 << 62;
const RELAY_BIT: usize = 1 << 61;

/// Finished connections' status is kept this long (and at most `FINISHED_KEPT` of them).
const FINISHED_FOR: Duration = Duration::from_secs(60);
const FINISHED_KEPT: usize = 16384;
/// Replies queued for a control client that does not read before it is dropped.
const OUTBOX_LIMIT: usize = 16;
/// Control connections at once.
const CONTROL_LIMIT: usize = 1024;
/// How often every live relay is looked at regardless of events (a safety net against a
/// missed edge), connections that finish in the background are released, and old status is
/// forgotten.
const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(200);
/// A relay read or write moves at most this much at a time (and holds at most this much).
const SCRATCH: usize = 64 * 1024;
/// Dual listen: wire connections being established or waiting for the instance to accept
/// them, per listened port (the instance accepts them at once).
const WIRE_BACKLOG: usize = 128;

/// Dual listen: a port the application listens on, where the instance accepts user-space
/// peers.
#[derive(Debug)]
struct Listening {
    /// The stack's listener.
    handle: SocketHandle,
    /// Where the instance connects for each accepted connection.
    app: SocketAddr,
}

/// Dual listen: who is behind one of the instance's loopback connections.
#[derive(Clone, Copy, Debug)]
struct PeerEntry {
    id: u64,
    remote: SocketAddr,
}

/// How the instance behaves.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Live relayed connections at most (`ENOBUFS` beyond).
    pub(crate) max_connections: usize,
    /// The stack's IPv4 subnet and gateway, to answer `ENETUNREACH` without a route.
    pub(crate) address: Ipv4Addr,
    pub(crate) prefix_len: u8,
    pub(crate) gateway: Option<Ipv4Addr>,
    /// The stack's IPv6 subnet and gateway, if it serves IPv6.
    pub(crate) ipv6: Option<Ipv6Config>,
    /// The verbs provider for RDMA upgrades, if any.
    pub(crate) rdma_provider: Option<std::path::PathBuf>,
}

/// A finished connection's last status.
#[derive(Debug)]
struct Finished {
    state: RelayState,
    error: Option<i32>,
    info: ConnectionInfo,
    at: StdInstant,
}

#[derive(Debug)]
struct Control {
    socket: OwnedFd,
    outbox: VecDeque<Vec<u8>>,
    /// Close once the outbox is sent (after a refused packet).
    closing: bool,
}

pub(crate) struct Instance {
    host: Host<AnyDevice>,
    poll: Poll,
    listener: OwnedFd,
    /// Becomes readable on SIGTERM (kept open for that).
    _signal: UnixStream,
    settings: Settings,
    controls: HashMap<usize, Control>,
    next_control: usize,
    relays: BTreeMap<u64, Relay>,
    by_handle: HashMap<SocketHandle, u64>,
    /// Dual listen: by port.
    listening: BTreeMap<u16, Listening>,
    /// Dual listen: ports an `Unlisten` withdrew; not followed again while the kernel still
    /// listens there.
    withdrawn: BTreeSet<u16>,
    /// Dual listen: our loopback end → the wire peer, while the connection lives and for
    /// `FINISHED_FOR` after (`peers_finished`, oldest first).
    peers: HashMap<SocketAddr, PeerEntry>,
    peers_finished: VecDeque<(StdInstant, SocketAddr, u64)>,
    finished: BTreeMap<u64, Finished>,
    finished_order: VecDeque<u64>,
    /// Closed by us, still finishing in the stack (FIN, ACK, TIME-WAIT): released once done,
    /// reset on SIGTERM.
    lingering: Vec<SocketHandle>,
    next_id: u64,
    dirty: Vec<u64>,
    scratch: Vec<u8>,
    packet: Vec<u8>,
    terminate: bool,
    rdma: Rdma,
}

impl Instance {
    pub(crate) fn new(
        host: Host<AnyDevice>,
        listener: OwnedFd,
        signal: UnixStream,
        settings: Settings,
    ) -> io::Result<Self> {
        let rdma = Rdma::new(settings.rdma_provider.clone());
        let poll = Poll::new()?;
        let registry = poll.registry();
        // A polled engine (DPDK) has no descriptor: `run` caps its sleeps instead.
        if let Some(fd) = host.device.wait_fd() {
            registry.register(&mut SourceFd(&fd), PACKETS, Interest::READABLE)?;
        }
        registry.register(
            &mut SourceFd(&listener.as_raw_fd()),
            LISTENER,
            Interest::READABLE,
        )?;
        signal.set_nonblocking(true)?;
        registry.register(
            &mut SourceFd(&signal.as_raw_fd()),
            SIGNAL,
            Interest::READABLE,
        )?;
        Ok(Self {
            host,
            poll,
            listener,
            _signal: signal,
            settings,
            controls: HashMap::new(),
            next_control: 0,
            relays: BTreeMap::new(),
            by_handle: HashMap::new(),
            listening: BTreeMap::new(),
            withdrawn: BTreeSet::new(),
            peers: HashMap::new(),
            peers_finished: VecDeque::new(),
            finished: BTreeMap::new(),
            finished_order: VecDeque::new(),
            lingering: Vec::new(),
            next_id: 1,
            dirty: Vec::new(),
            scratch: vec![0; SCRATCH],
            packet: vec![0; MAX_MESSAGE + 1],
            terminate: false,
            rdma,
        })
    }

    /// Runs until SIGTERM, then resets every connection.
    pub(crate) fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut next_housekeeping = StdInstant::now() + HOUSEKEEPING_EVERY;
        loop {
            let now = self.host.now();
            let mut busy = self.host.poll(now);
            if !self.listening.is_empty() {
                busy |= self.accept_wire();
            }
            while let Some(event) = self.host.stack.poll_event() {
                if let Some(&id) = self.by_handle.get(&event.handle) {
                    self.dirty.push(id);
                }
            }
            if self.pump_dirty() {
                self.host.note_activity();
                busy = true;
            }
            if StdInstant::now() >= next_housekeeping {
                next_housekeeping = StdInstant::now() + HOUSEKEEPING_EVERY;
                self.housekeeping();
            }
            let timeout = if busy {
                Duration::ZERO
            } else {
                match self.host.wait_plan(now) {
                    Wait::Now | Wait::Spin => Duration::ZERO,
                    Wait::Yield => {
                        std::thread::yield_now();
                        Duration::ZERO
                    }
                    Wait::Sleep(sleep) => {
                        let sleep = self
                            .host
                            .device
                            .max_idle()
                            .map_or(sleep, |idle| sleep.min(idle));
                        sleep.min(next_housekeeping.saturating_duration_since(StdInstant::now()))
                    }
                }
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for event in &events {
                match event.token() {
                    PACKETS => {}
                    LISTENER => self.accept_controls(),
                    SIGNAL => self.terminate = true,
                    Token(token) if token & CONTROL_BIT != 0 => {
                        self.serve_control(token & !CONTROL_BIT);
                    }
                    Token(token) if token & RELAY_BIT != 0 => {
                        let id = (token & !RELAY_BIT) as u64;
                        if let Some(relay) = self.relays.get_mut(&id) {
                            // Errors and hang-ups show up on the next read or write.
                            relay.socket_readable |=
                                event.is_readable() || event.is_read_closed() || event.is_error();
                            relay.socket_writable |=
                                event.is_writable() || event.is_write_closed() || event.is_error();
                            self.dirty.push(id);
                        }
                    }
                    Token(_) => {}
                }
            }
            if self.terminate {
                self.reset_all();
                return Ok(());
            }
        }
    }

    /// Pumps every relay with something new; returns whether any moved bytes.
    fn pump_dirty(&mut self) -> bool {
        let mut progress = false;
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for id in dirty.drain(..) {
            let Some(relay) = self.relays.get_mut(&id) else {
                continue;
            };
            let pumped = relay.pump(&mut self.host.stack, &mut self.scratch);
            progress |= pumped.progress;
            if let Some(end) = pumped.end {
                self.finish(id, end);
            }
        }
        self.dirty = dirty;
        progress
    }

    /// Ends a relay: its status is kept, its socket closed, its stack connection closed
    /// (finishing in the background) or reset.
    fn finish(&mut self, id: u64, end: End) {
        let Some(relay) = self.relays.remove(&id) else {
            return;
        };
        let (state, error) = end.state();
        let info = relay.info(&self.host.stack, state);
        let _ = self
            .poll
            .registry()
            .deregister(&mut SourceFd(&relay.socket.as_raw_fd()));
        self.by_handle.remove(&relay.handle);
        if let Some(loopback) = relay.loopback {
            self.peers_finished
                .push_back((StdInstant::now(), loopback, id));
        }
        match end {
            End::Closed => {
                debug!(id, remote = %relay.remote, "connection closed");
                self.lingering.push(relay.handle);
            }
            End::AppReset => {
                debug!(id, remote = %relay.remote, "application went away: reset");
                let _ = self.host.stack.abort(relay.handle);
            }
            End::Failed(errno) | End::Reset(errno) => {
                debug!(id, remote = %relay.remote, errno, ?state, "connection failed");
                let _ = self.host.stack.close(relay.handle);
            }
            End::LoopbackFailed(errno) => {
                debug!(id, remote = %relay.remote, errno, "the application's listener refused: reset");
                let _ = self.host.stack.abort(relay.handle);
            }
        }
        let Relay { socket, .. } = relay;
        if matches!(end, End::Failed(_) | End::Reset(_)) {
            // The wire connection was reset: so is the application's loopback connection.
            socket.close_with_reset();
        }
        self.finished.insert(
            id,
            Finished {
                state,
                error,
                info,
                at: StdInstant::now(),
            },
        );
        self.finished_order.push_back(id);
        self.forget_old_status();
    }

    fn forget_old_status(&mut self) {
        while let Some(&oldest) = self.finished_order.front() {
            let expired = self
                .finished
                .get(&oldest)
                .is_none_or(|f| f.at.elapsed() >= FINISHED_FOR);
            if !expired && self.finished_order.len() <= FINISHED_KEPT {
                break;
            }
            self.finished_order.pop_front();
            self.finished.remove(&oldest);
        }
        while let Some(&(at, loopback, id)) = self.peers_finished.front() {
            if at.elapsed() < FINISHED_FOR && self.peers_finished.len() <= FINISHED_KEPT {
                break;
            }
            self.peers_finished.pop_front();
            // The port may serve a newer connection by now.
            if self.peers.get(&loopback).is_some_and(|peer| peer.id == id) {
                self.peers.remove(&loopback);
            }
        }
    }

    fn housekeeping(&mut self) {
        self.follow_kernel_listeners();
        self.dirty.extend(self.relays.keys().copied());
        self.forget_old_status();
        let stack = &mut self.host.stack;
        self.lingering.retain(|&handle| match stack.state(handle) {
            Ok(TcpState::TimeWait | TcpState::Closed) | Err(_) => {
                // TIME-WAIT (or done): the stack keeps what it must on its own.
                let _ = stack.close(handle);
                false
            }
            Ok(_) => true,
        });
    }

    /// SIGTERM: every connection, relayed or finishing, is reset; the RSTs are sent.
    fn reset_all(&mut self) {
        let count = self.relays.len() + self.lingering.len();
        for (_, relay) in std::mem::take(&mut self.relays) {
            let _ = self.host.stack.abort(relay.handle);
            relay.socket.close_with_reset();
        }
        for handle in std::mem::take(&mut self.lingering) {
            let _ = self.host.stack.abort(handle);
        }
        self.by_handle.clear();
        for _ in 0..4 {
            let now = self.host.now();
            self.host.poll(now);
        }
        info!(connections = count, "terminated: connections reset");
    }

    fn accept_controls(&mut self) {
        loop {
            match rustix::net::accept_with(
                &self.listener,
                rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
            ) {
                Ok(socket) => {
                    if self.controls.len() >= CONTROL_LIMIT {
                        warn!("{CONTROL_LIMIT} control connections open: refusing another");
                        continue;
                    }
                    let key = self.next_control;
                    self.next_control = (self.next_control + 1) % (RELAY_BIT - 1);
                    let registered = self.poll.registry().register(
                        &mut SourceFd(&socket.as_raw_fd()),
                        Token(CONTROL_BIT | key),
                        Interest::READABLE | Interest::WRITABLE,
                    );
                    match registered {
                        Ok(()) => {
                            self.controls.insert(
                                key,
                                Control {
                                    socket,
                                    outbox: VecDeque::new(),
                                    closing: false,
                                },
                            );
                            self.serve_control(key);
                        }
                        Err(e) => warn!("registering a control connection: {e}"),
                    }
                }
                Err(Errno::AGAIN) => return,
                Err(Errno::INTR | Errno::CONNABORTED) => {}
                Err(e) => {
                    // EMFILE and the like: the listener stays readable; try again later.
                    warn!("accepting a control connection: {e}");
                    return;
                }
            }
        }
    }

    /// Reads and answers every packet a control connection has sent, flushes its replies.
    fn serve_control(&mut self, key: usize) {
        loop {
            let Some(control) = self.controls.get_mut(&key) else {
                return;
            };
            if control.closing {
                break;
            }
            let packet = match control::receive(&control.socket, &mut self.packet) {
                Ok(packet) => packet,
                Err(e) => {
                    debug!("control connection: {e}");
                    self.drop_control(key);
                    return;
                }
            };
            match packet {
                Packet::WouldBlock => break,
                Packet::Closed => {
                    self.drop_control(key);
                    return;
                }
                Packet::Message {
                    bytes,
                    truncated,
                    fds,
                } => {
                    let length = bytes.min(self.packet.len());
                    let response =
                        match control::decode(&self.packet[..length], truncated, fds.len()) {
                            Ok(request) => self.handle(request, fds),
                            Err(refusal) => {
                                warn!(
                                    "refused a control packet ({} bytes, {} descriptors): {}",
                                    bytes,
                                    fds.len(),
                                    refusal.message
                                );
                                drop(fds);
                                if let Some(control) = self.controls.get_mut(&key) {
                                    control.closing = true;
                                }
                                refusal.response()
                            }
                        };
                    if let Some(control) = self.controls.get_mut(&key) {
                        control.outbox.push_back(control::encode(&response));
                    }
                }
            }
        }
        self.flush_control(key);
    }

    fn flush_control(&mut self, key: usize) {
        let Some(control) = self.controls.get_mut(&key) else {
            return;
        };
        while let Some(reply) = control.outbox.front() {
            match control::send(&control.socket, reply) {
                Ok(true) => {
                    control.outbox.pop_front();
                }
                Ok(false) => break,
                Err(_) => {
                    self.drop_control(key);
                    return;
                }
            }
        }
        if (control.closing && control.outbox.is_empty()) || control.outbox.len() > OUTBOX_LIMIT {
            self.drop_control(key);
        }
    }

    fn drop_control(&mut self, key: usize) {
        if let Some(control) = self.controls.remove(&key) {
            let _ = self
                .poll
                .registry()
                .deregister(&mut SourceFd(&control.socket.as_raw_fd()));
        }
    }

    fn handle(&mut self, request: RelayRequest, mut fds: Vec<OwnedFd>) -> RelayResponse {
        let fd = fds.pop();
        match request {
            RelayRequest::Connect {
                remote,
                original,
                congestion_control,
                nodelay,
                filler,
            } => match fd {
                Some(fd) => self
                    .connect(remote, original, &congestion_control, nodelay, filler, fd)
                    .unwrap_or_else(|refusal| {
                        debug!(%remote, errno = refusal.errno, "connect refused: {}", refusal.message);
                        refusal.response()
                    }),
                None => error("connect carries one descriptor", Errno::INVAL),
            },
            RelayRequest::Status { id } => self.status(id),
            RelayRequest::RdmaOpen => self.rdma.open(),
            RelayRequest::RdmaRelay {
                token,
                peer,
                local,
                remote,
                timeout_ms,
            } => match (fds.pop(), fd) {
                (Some(app), Some(control)) => {
                    let id = self.next_id;
                    self.next_id += 1;
                    let timeout = Duration::from_millis(u64::from(timeout_ms));
                    self.rdma
                        .relay(id, token, peer, local, remote, timeout, app, control)
                }
                _ => error("rdmaRelay carries two descriptors", Errno::INVAL),
            },
            RelayRequest::Listen { address } => self.listen(address),
            RelayRequest::Unlisten { address } => self.unlisten(address),
            RelayRequest::PeerOf { local } => match self.peers.get(&unmapped(local)) {
                Some(peer) => RelayResponse::Peer {
                    remote: Some(peer.remote),
                    id: Some(peer.id),
                },
                None => RelayResponse::Peer {
                    remote: None,
                    id: None,
                },
            },
            RelayRequest::SetOption { id, option } => self.set_option(id, option),
            RelayRequest::Connections { after, limit } => {
                let live = self
                    .relays
                    .range(after.saturating_add(1)..)
                    .map(|(&id, relay)| (id, relay.info(&self.host.stack, relay.state())));
                let finished = self
                    .finished
                    .range(after.saturating_add(1)..)
                    .map(|(&id, f)| (id, f.info.clone()));
                let tcp = merge_by_id(live, finished).map(|info| (info.id, info));
                control::page(
                    merge_by_id(tcp, self.rdma.infos(after)),
                    limit as usize,
                    MAX_MESSAGE,
                )
            }
        }
    }

    fn connect(
        &mut self,
        remote: SocketAddr,
        original: Option<SocketAddr>,
        congestion_control: &str,
        nodelay: bool,
        filler: u64,
        fd: OwnedFd,
    ) -> Result<RelayResponse, Refusal> {
        let refuse = |message: String, errno: Errno| Refusal {
            message,
            errno: errno.raw_os_error(),
        };
        let socket_type = rustix::net::sockopt::socket_type(&fd)
            .map_err(|e| refuse(format!("the descriptor is not a socket: {e}"), Errno::INVAL))?;
        let domain = rustix::net::sockopt::socket_domain(&fd)
            .map_err(|e| refuse(format!("the descriptor is not a socket: {e}"), Errno::INVAL))?;
        if socket_type != rustix::net::SocketType::STREAM
            || domain != rustix::net::AddressFamily::UNIX
        {
            return Err(refuse(
                "the descriptor is not an AF_UNIX SOCK_STREAM socket".into(),
                Errno::INVAL,
            ));
        }
        let congestion_control = match congestion_control.to_ascii_lowercase().as_str() {
            "default" | "" => self.host.stack.config().tcp.congestion_control,
            name => parse_congestion_control(name).ok_or_else(|| {
                refuse(format!("unknown congestion control {name:?}"), Errno::INVAL)
            })?,
        };
        if self.relays.len() >= self.settings.max_connections {
            return Err(refuse(
                format!("{} connections relayed already", self.relays.len()),
                Errno::NOBUFS,
            ));
        }
        if !self.reachable(remote.ip()) {
            return Err(refuse(
                format!(
                    "no route to {remote} (the instance serves {}/{}{})",
                    self.settings.address,
                    self.settings.prefix_len,
                    self.settings.ipv6.map_or_else(
                        || " only".to_owned(),
                        |v6| format!(" and {}/{}", v6.address, v6.prefix_len)
                    )
                ),
                Errno::NETUNREACH,
            ));
        }
        let socket = UnixStream::from(fd);
        socket.set_nonblocking(true).map_err(|e| {
            refuse(
                format!("making the descriptor non-blocking: {e}"),
                Errno::INVAL,
            )
        })?;
        let mut tcp: TcpConfig = self.host.stack.config().tcp.clone();
        tcp.congestion_control = congestion_control;
        tcp.nodelay = nodelay;
        let now = self.host.now();
        let handle = self
            .host
            .stack
            .connect_with(now, remote, tcp)
            .map_err(|e| match e {
                SocketError::NoPortsAvailable => {
                    refuse(format!("connect to {remote}: {e}"), Errno::NOBUFS)
                }
                SocketError::NoSourceAddress => {
                    refuse(format!("connect to {remote}: {e}"), Errno::NETUNREACH)
                }
                _ => refuse(format!("connect to {remote}: {e}"), Errno::INVAL),
            })?;
        let local = self
            .host
            .stack
            .addresses(handle)
            .map(|(local, _)| local)
            .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(self.settings.address), 0));
        let id = self.next_id;
        let registered = self.poll.registry().register(
            &mut SourceFd(&socket.as_raw_fd()),
            Token(RELAY_BIT | id as usize),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            let _ = self.host.stack.abort(handle);
            return Err(refuse(
                format!("registering the descriptor: {e}"),
                Errno::NOBUFS,
            ));
        }
        self.next_id += 1;
        self.by_handle.insert(handle, id);
        self.relays.insert(
            id,
            Relay::new(id, handle, socket, local, remote, original, filler),
        );
        // Send the SYN now rather than on the next loop turn.
        let now = self.host.now();
        self.host.poll(now);
        debug!(id, %remote, %local, filler, "connecting");
        Ok(RelayResponse::Connecting { id, local })
    }

    /// Dual listen: accept user-space peers on `address`'s port and hand each to the
    /// application's listener there over loopback.
    fn listen(&mut self, address: SocketAddr) -> RelayResponse {
        let address = unmapped(address);
        let port = address.port();
        if port == 0 {
            return error("listen on port 0", Errno::INVAL);
        }
        self.withdrawn.remove(&port);
        let own6 = self.settings.ipv6.map(|v6| v6.address);
        let app = match address.ip() {
            // A wildcard listener (`0.0.0.0`, or `[::]` with or without `IPV6_V6ONLY`): IPv4
            // peers are delivered to 127.0.0.1, IPv6 ones to ::1 (`delivery`).
            ip if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            IpAddr::V4(ip) if ip == self.settings.address => address,
            IpAddr::V6(ip) if Some(ip) == own6 => address,
            // A listener bound to loopback or another address is not reachable from the wire
            // through the kernel either: relaying to it would expose it.
            _ => {
                return error(
                    &format!(
                        "{address} is not reachable from the wire (the instance accepts on {}{} only)",
                        self.settings.address,
                        own6.map_or_else(String::new, |ip| format!(" and {ip}"))
                    ),
                    Errno::ADDRNOTAVAIL,
                );
            }
        };
        let Some(shared) = self.host.shared.as_mut() else {
            return error("the instance shares no address", Errno::OPNOTSUPP);
        };
        if shared.ports.contains(&port) {
            return error(
                &format!("port {port} is in the user-space range"),
                Errno::ADDRINUSE,
            );
        }
        if let Some(listening) = self.listening.get_mut(&port) {
            listening.app = app;
            return RelayResponse::Done;
        }
        let tcp = self.host.stack.config().tcp.clone();
        match self.host.stack.listen_with(port, WIRE_BACKLOG, tcp) {
            Ok(handle) => {
                shared.listened.insert(port);
                self.listening.insert(port, Listening { handle, app });
                info!(port, %app, "accepting user-space peers");
                RelayResponse::Done
            }
            Err(e) => error(&format!("listen on {port}: {e:?}"), Errno::ADDRINUSE),
        }
    }

    /// Dual listen for every kernel listener of the namespace (see `listeners`): a new one is
    /// taken within a housekeeping period (a peer's SYN that came earlier is retried), a
    /// closed one is let go. Listeners the instance cannot serve (loopback binds, ports in the
    /// user-space range) are skipped quietly.
    fn follow_kernel_listeners(&mut self) {
        if self.host.shared.is_none() {
            return;
        }
        let kernel = crate::listeners::kernel_listeners(
            self.settings.address,
            self.settings.ipv6.map(|v6| v6.address),
        );
        self.withdrawn.retain(|port| kernel.contains_key(port));
        for (port, address) in &kernel {
            if !self.listening.contains_key(port) && !self.withdrawn.contains(port) {
                let _ = self.listen(*address);
            }
        }
        let gone: Vec<u16> = self
            .listening
            .keys()
            .filter(|port| !kernel.contains_key(port))
            .copied()
            .collect();
        for port in gone {
            self.unlisten(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port));
        }
    }

    /// Stops accepting on `address`'s port; connections accepted go on. The port stays
    /// steered to the stack, which now answers new peers' SYNs with a RST (connection
    /// refused, as the kernel would once the listener is gone; the kernel never sees them).
    fn unlisten(&mut self, address: SocketAddr) -> RelayResponse {
        self.withdrawn.insert(address.port());
        if let Some(listening) = self.listening.remove(&address.port()) {
            let _ = self.host.stack.close(listening.handle);
            info!(
                port = address.port(),
                "no longer accepting user-space peers"
            );
        }
        RelayResponse::Done
    }

    /// Accepts every wire connection the listeners have; returns whether there was any.
    fn accept_wire(&mut self) -> bool {
        let mut accepted = false;
        let listeners: Vec<(SocketHandle, SocketAddr)> = self
            .listening
            .values()
            .map(|listening| (listening.handle, listening.app))
            .collect();
        for (listener, app) in listeners {
            while let Ok(handle) = self.host.stack.accept(listener) {
                accepted = true;
                self.start_accepted(handle, app);
            }
        }
        accepted
    }

    /// A wire connection was accepted: connect to the application over loopback and relay.
    fn start_accepted(&mut self, handle: SocketHandle, app: SocketAddr) {
        let Ok((local, remote)) = self.host.stack.addresses(handle) else {
            let _ = self.host.stack.close(handle);
            return;
        };
        if self.relays.len() >= self.settings.max_connections {
            warn!(%remote, "{} connections relayed already: resetting a peer's", self.relays.len());
            let _ = self.host.stack.abort(handle);
            return;
        }
        let Some(app) = delivery(app, remote) else {
            debug!(%remote, %app, "a peer of the other address family than the listener's; reset");
            let _ = self.host.stack.abort(handle);
            return;
        };
        let (socket, loopback) = match connect_loopback(app) {
            Ok(connected) => connected,
            Err(e) => {
                debug!(%remote, %app, "the application's listener refused: {e}; reset");
                let _ = self.host.stack.abort(handle);
                return;
            }
        };
        let id = self.next_id;
        let registered = self.poll.registry().register(
            &mut SourceFd(&socket.as_raw_fd()),
            Token(RELAY_BIT | id as usize),
            Interest::READABLE | Interest::WRITABLE,
        );
        if let Err(e) = registered {
            warn!("registering a loopback connection: {e}");
            let _ = self.host.stack.abort(handle);
            return;
        }
        self.next_id += 1;
        self.by_handle.insert(handle, id);
        self.peers.insert(loopback, PeerEntry { id, remote });
        self.relays.insert(
            id,
            Relay::accepted(id, handle, socket, local, remote, loopback),
        );
        self.dirty.push(id);
        debug!(id, %remote, %local, %loopback, "accepted a user-space peer");
    }

    /// Whether an IPv4 destination is on-link or behind the gateway.
    fn reachable(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.settings.prefix_len))
                    .unwrap_or(0);
                let on_link = u32::from(ip) & mask == u32::from(self.settings.address) & mask;
                on_link || self.settings.gateway.is_some()
            }
            IpAddr::V6(ip) => self.settings.ipv6.is_some_and(|v6| {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(v6.prefix_len))
                    .unwrap_or(0);
                let on_link = u128::from(ip) & mask == u128::from(v6.address) & mask;
                on_link || v6.gateway.is_some()
            }),
        }
    }

    fn status(&self, id: u64) -> RelayResponse {
        if let Some(relay) = self.relays.get(&id) {
            let state = relay.state();
            return RelayResponse::Status {
                id,
                state,
                error: None,
                info: Some(relay.info(&self.host.stack, state)),
            };
        }
        match self.finished.get(&id) {
            Some(finished) => RelayResponse::Status {
                id,
                state: finished.state,
                error: finished.error,
                info: Some(finished.info.clone()),
            },
            None => self
                .rdma
                .status(id)
                .unwrap_or_else(|| error(&format!("no connection {id}"), Errno::NOENT)),
        }
    }

    fn set_option(&mut self, id: u64, option: RelayOption) -> RelayResponse {
        if self.rdma.status(id).is_some() {
            // TCP options mean nothing on a queue pair (no Nagle, no congestion control of
            // ours): taken and ignored, as a kernel socket would take them.
            return RelayResponse::Done;
        }
        let Some(relay) = self.relays.get_mut(&id) else {
            return if self.finished.contains_key(&id) {
                error(&format!("connection {id} is closed"), Errno::NOTCONN)
            } else {
                error(&format!("no connection {id}"), Errno::NOENT)
            };
        };
        let option = match option {
            RelayOption::ResetOnClose(on) => {
                relay.reset_on_close = on;
                self.dirty.push(id);
                return RelayResponse::Done;
            }
            RelayOption::NoDelay(on) => SocketOption::NoDelay(on),
            RelayOption::Keepalive(on) => SocketOption::Keepalive(on.then(Keepalive::default)),
            RelayOption::CongestionControl(name) => {
                match parse_congestion_control(&name.to_ascii_lowercase()) {
                    Some(cc) => SocketOption::CongestionControl(cc),
                    None => {
                        return error(
                            &format!("unknown congestion control {name:?}"),
                            Errno::NOENT,
                        );
                    }
                }
            }
            RelayOption::SendBuffer(bytes) => SocketOption::SendBuffer(bytes as usize),
            RelayOption::ReceiveBuffer(bytes) => SocketOption::ReceiveBuffer(bytes as usize),
        };
        match self.host.stack.set_option(relay.handle, option) {
            Ok(()) => {
                self.dirty.push(id);
                RelayResponse::Done
            }
            Err(e) => error(&format!("connection {id}: {e}"), Errno::NOTCONN),
        }
    }
}

/// A non-blocking kernel TCP connection to `to` (usually completing later), with our end's
/// address.
/// Where a peer from `remote` goes for a listener delivered at `app`: an IPv6 peer of a
/// wildcard listener (delivered at 127.0.0.1 for IPv4) over ::1 — refused there, as on the
/// wire, when the application listens on IPv4 only; a peer of the other family than a
/// listener bound to one address nowhere.
fn delivery(app: SocketAddr, remote: SocketAddr) -> Option<SocketAddr> {
    match (app.ip(), remote.ip()) {
        (IpAddr::V4(ip), IpAddr::V6(_)) if ip.is_loopback() => {
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), app.port()))
        }
        (app_ip, remote_ip) if app_ip.is_ipv4() == remote_ip.is_ipv4() => Some(app),
        _ => None,
    }
}

fn connect_loopback(to: SocketAddr) -> io::Result<(TcpStream, SocketAddr)> {
    let family = match to {
        SocketAddr::V4(_) => rustix::net::AddressFamily::INET,
        SocketAddr::V6(_) => rustix::net::AddressFamily::INET6,
    };
    let socket = rustix::net::socket_with(
        family,
        rustix::net::SocketType::STREAM,
        rustix::net::SocketFlags::NONBLOCK | rustix::net::SocketFlags::CLOEXEC,
        None,
    )?;
    // The relay forwards what arrives at once; Nagle would only add delay.
    let _ = rustix::net::sockopt::set_tcp_nodelay(&socket, true);
    match rustix::net::connect(&socket, &to) {
        Ok(()) | Err(Errno::INPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    let socket = TcpStream::from(socket);
    let local = socket.local_addr()?;
    Ok((socket, unmapped(local)))
}

/// An IPv4-mapped IPv6 address as IPv4 (what a dual-stack socket reports).
fn unmapped(address: SocketAddr) -> SocketAddr {
    match address {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(ip) => SocketAddr::new(IpAddr::V4(ip), v6.port()),
            None => address,
        },
        SocketAddr::V4(_) => address,
    }
}

fn error(message: &str, errno: Errno) -> RelayResponse {
    RelayResponse::Error {
        message: message.to_owned(),
        errno: errno.raw_os_error(),
    }
}

fn parse_congestion_control(name: &str) -> Option<CongestionControl> {
    match name {
        "bbr" => Some(CongestionControl::Bbr),
        "cubic" => Some(CongestionControl::Cubic),
        "reno" | "newreno" => Some(CongestionControl::Reno),
        _ => None,
    }
}

/// Two id-ordered sequences as one, by increasing id.
fn merge_by_id(
    a: impl Iterator<Item = (u64, ConnectionInfo)>,
    b: impl Iterator<Item = (u64, ConnectionInfo)>,
) -> impl Iterator<Item = ConnectionInfo> {
    let mut a = a.peekable();
    let mut b = b.peekable();
    std::iter::from_fn(move || {
        let take_a = match (a.peek(), b.peek()) {
            (Some((x, _)), Some((y, _))) => x <= y,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return None,
        };
        if take_a { a.next() } else { b.next() }.map(|(_, info)| info)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_delivered_over_loopback_of_their_own_family() {
        let addr = |text: &str| text.parse::<SocketAddr>().unwrap();
        let wildcard = addr("127.0.0.1:7070");
        assert_eq!(delivery(wildcard, addr("10.0.0.1:61000")), Some(wildcard));
        assert_eq!(
            delivery(wildcard, addr("[fd00::1]:61000")),
            Some(addr("[::1]:7070"))
        );
        let bound4 = addr("10.0.0.2:7070");
        assert_eq!(delivery(bound4, addr("10.0.0.1:61000")), Some(bound4));
        assert_eq!(delivery(bound4, addr("[fd00::1]:61000")), None);
        let bound6 = addr("[fd00::2]:7070");
        assert_eq!(delivery(bound6, addr("[fd00::1]:61000")), Some(bound6));
        assert_eq!(delivery(bound6, addr("10.0.0.1:61000")), None);
    }
}
