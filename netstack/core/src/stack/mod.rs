//! The stack: one interface (Ethernet; ARP, IPv4 and ICMP; IPv6, NDP and ICMPv6), the socket
//! table and the socket API.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6Packet, Icmpv6Repr,
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags,
    NdiscRepr, RawHardwareAddress, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
};

use crate::congestion::CongestionControl;
use crate::isn::IsnGenerator;
use crate::phy::{Device, RxMeta};
use crate::seq::Seq;
use crate::tcp::{Connection, ConnectionStats, Endpoints, Keepalive, State, TcpConfig, TcpError};
use crate::time::{Instant, earliest};

/// Interface and defaults for a [`Stack`].
#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Our Ethernet address.
    pub mac: [u8; 6],
    /// Our IPv4 address (unspecified: no IPv4).
    pub address: Ipv4Addr,
    /// Prefix length of the on-link subnet.
    pub prefix_len: u8,
    /// Next hop for destinations off the subnet.
    pub gateway: Option<Ipv4Addr>,
    /// IPv6, if the interface has it.
    pub ipv6: Option<Ipv6Config>,
    /// IP MTU.
    pub mtu: usize,
    /// Secret for RFC 6528 initial sequence numbers; draw it from a CSPRNG.
    pub isn_secret: [u8; 16],
    /// Defaults for new connections.
    pub tcp: TcpConfig,
    /// Local ports for active opens.
    pub ephemeral_ports: RangeInclusive<u16>,
    /// When no ephemeral port is free for a destination, an active open may take the port of a
    /// connection that has sat in TIME-WAIT for this long, if that connection used timestamps
    /// (Linux's `net.ipv4.tcp_tw_reuse`): the new SYN's timestamps are newer than anything the
    /// old incarnation sent, so the peer's PAWS check tells the two apart. A small port range
    /// then serves more than range / 60 s connections per second to one server. `None`: never.
    pub time_wait_reuse_after: Option<Duration>,
    /// How long a learned neighbour (ARP or NDP) entry stays valid.
    pub arp_timeout: Duration,
}

/// The interface's IPv6 configuration. Its link-local address is derived from the MAC address
/// (modified EUI-64, RFC 4291 appendix A); neighbours are found with NDP (RFC 4861).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Config {
    /// Our global (or unique-local) address.
    pub address: Ipv6Addr,
    /// Prefix length of the on-link subnet.
    pub prefix_len: u8,
    /// Next hop for destinations off the subnet (often a link-local router address).
    pub gateway: Option<Ipv6Addr>,
}

impl Ipv6Config {
    /// An address on a subnet, no gateway.
    pub fn new(address: Ipv6Addr, prefix_len: u8) -> Self {
        Self {
            address,
            prefix_len: prefix_len.min(128),
            gateway: None,
        }
    }
}

impl StackConfig {
    /// A configuration with default TCP settings, a 1500-byte MTU and no gateway.
    pub fn new(mac: [u8; 6], address: Ipv4Addr, prefix_len: u8, isn_secret: [u8; 16]) -> Self {
        Self {
            mac,
            address,
            prefix_len: prefix_len.min(32),
            gateway: None,
            ipv6: None,
            mtu: 1500,
            isn_secret,
            tcp: TcpConfig::default(),
            ephemeral_ports: 49152..=65535,
            time_wait_reuse_after: Some(Duration::from_secs(1)),
            arp_timeout: Duration::from_secs(60),
        }
    }
}

/// Names a listener or connection in a [`Stack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketHandle {
    index: u32,
    generation: u32,
}

/// Level-triggered readiness of a socket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// `recv` returns data, EOF or an error without blocking (for a listener: `accept` does).
    pub readable: bool,
    /// `send` accepts at least one byte.
    pub writable: bool,
    /// The connection failed.
    pub error: bool,
    /// The connection is fully closed.
    pub closed: bool,
}

/// What became ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A listener has a connection to accept.
    Acceptable,
    /// Data or EOF can be read.
    Readable,
    /// Buffer space opened (or the handshake completed).
    Writable,
    /// The connection failed.
    Error(TcpError),
    /// The connection reached CLOSED.
    Closed,
}

/// An edge-triggered readiness event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// The socket it concerns.
    pub handle: SocketHandle,
    /// What happened.
    pub kind: EventKind,
}

/// Why `listen` failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenError {
    /// Another listener owns the port.
    PortInUse,
    /// Port 0 cannot be listened on.
    InvalidPort,
}

impl core::fmt::Display for ListenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::PortInUse => "port already has a listener",
            Self::InvalidPort => "port 0 is not valid",
        })
    }
}

impl std::error::Error for ListenError {}

/// Why a socket call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketError {
    /// The handle does not name a socket of the right kind (closed, or a listener).
    InvalidHandle,
    /// Nothing can be done now; wait for a readiness event.
    WouldBlock,
    /// The connection is not in a state that allows the call.
    NotConnected,
    /// Writing after `shutdown` or `close`.
    Shutdown,
    /// No local port is free.
    NoPortsAvailable,
    /// The destination is unusable (our own address, port 0, unspecified, multicast).
    InvalidAddress,
    /// The interface has no address of the destination's family.
    NoSourceAddress,
    /// The connection failed.
    Connection(TcpError),
}

impl core::fmt::Display for SocketError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::InvalidHandle => f.write_str("invalid socket handle"),
            Self::WouldBlock => f.write_str("operation would block"),
            Self::NotConnected => f.write_str("socket is not connected"),
            Self::Shutdown => f.write_str("socket is shut down for writing"),
            Self::NoPortsAvailable => f.write_str("no ephemeral port available"),
            Self::InvalidAddress => f.write_str("invalid destination address"),
            Self::NoSourceAddress => {
                f.write_str("no local address of the destination's address family")
            }
            Self::Connection(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SocketError {}

/// Per-socket options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketOption {
    /// `TCP_NODELAY`: disable Nagle's algorithm.
    NoDelay(bool),
    /// `SO_KEEPALIVE` with its timing.
    Keepalive(Option<Keepalive>),
    /// `SO_SNDBUF` in bytes.
    SendBuffer(usize),
    /// `SO_RCVBUF` in bytes. After the handshake the window scale is fixed, so a larger buffer
    /// only widens the window up to `65535 << scale`; a smaller one never takes back window
    /// already offered (RFC 9293 §3.8.6.2.2).
    ReceiveBuffer(usize),
    /// `TCP_CONGESTION`: switch controller. Like Linux, the new controller starts from its
    /// initial state.
    CongestionControl(CongestionControl),
}

/// Interface counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StackStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames dropped as malformed, misaddressed or failing checksums.
    pub rx_dropped: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Segments the engine had no buffer for (they count as lost).
    pub tx_dropped: u64,
    /// RSTs sent for segments that matched no socket.
    pub rst_sent: u64,
    /// SYNs dropped because a listener's backlog was full.
    pub syn_dropped: u64,
    /// Connections in TIME-WAIT replaced by a new SYN for the same four-tuple (RFC 6191).
    pub time_wait_reused: u64,
    /// Connections in TIME-WAIT whose port an active open of ours took over
    /// ([`StackConfig::time_wait_reuse_after`]).
    pub time_wait_reused_by_connect: u64,
}

#[derive(Debug)]
struct Listener {
    /// Configuration of the connections it accepts (socket options set on the listener).
    config: TcpConfig,
    port: u16,
    backlog: usize,
    embryonic: usize,
    ready: VecDeque<SocketHandle>,
}

#[derive(Debug)]
struct ConnSlot {
    conn: Connection,
    listener: Option<SocketHandle>,
    /// The application holds the handle (accepted or connected, not yet closed).
    app_owned: bool,
    last: Readiness,
}

#[derive(Debug)]
enum Entry {
    Listener(Listener),
    Conn(Box<ConnSlot>),
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    entry: Option<Entry>,
}

/// (local port, remote address, remote port).
type TupleKey = (u16, IpAddr, u16);

/// Frames processed per `poll` before egress gets a turn.
const RX_BUDGET: usize = 256;
/// Segments one connection may emit per `poll`.
const TX_BUDGET_PER_SOCKET: usize = 128;

/// The user-space TCP/IP stack. See the crate docs.
#[derive(Debug)]
pub struct Stack {
    config: StackConfig,
    isn: IsnGenerator,
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    tuples: HashMap<TupleKey, SocketHandle>,
    listeners: HashMap<u16, SocketHandle>,
    ports_in_use: HashMap<u16, usize>,
    next_port: u16,
    /// Our IPv6 link-local address, when IPv6 is configured.
    link_local: Option<Ipv6Addr>,
    /// Neighbour cache (ARP and NDP): MAC address and expiry.
    neighbors: HashMap<IpAddr, ([u8; 6], Instant)>,
    /// When we last asked for a neighbour (ARP request or neighbour solicitation).
    solicited: HashMap<IpAddr, Instant>,
    control_frames: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    scratch: Vec<u8>,
    /// Who completes sent TCP frames' checksums: the engine's capability, read at each poll.
    tx_checksum: TxChecksum,
    stats: StackStats,
    now: Instant,
}

impl Stack {
    /// A stack with no sockets.
    pub fn new(config: StackConfig) -> Self {
        let next_port = *config.ephemeral_ports.start();
        Self {
            isn: IsnGenerator::new(config.isn_secret),
            slots: Vec::new(),
            free_slots: Vec::new(),
            tuples: HashMap::new(),
            listeners: HashMap::new(),
            ports_in_use: HashMap::new(),
            next_port,
            link_local: config.ipv6.map(|_| link_local_address(config.mac)),
            neighbors: HashMap::new(),
            solicited: HashMap::new(),
            control_frames: VecDeque::new(),
            events: VecDeque::new(),
            scratch: Vec::with_capacity(2048),
            tx_checksum: TxChecksum::Full,
            stats: StackStats::default(),
            now: Instant::ZERO,
            config,
        }
    }

    /// The interface configuration.
    pub fn config(&self) -> &StackConfig {
        &self.config
    }

    /// Interface counters.
    pub fn stats(&self) -> StackStats {
        self.stats
    }

    /// Adds a static neighbour entry (useful for point-to-point links and tests).
    pub fn add_neighbor(&mut self, ip: impl Into<IpAddr>, mac: [u8; 6]) {
        self.neighbors
            .insert(ip.into(), (mac, Instant::from_micros(u64::MAX)));
    }

    /// Our IPv6 link-local address, when IPv6 is configured.
    pub fn link_local_address(&self) -> Option<Ipv6Addr> {
        self.link_local
    }

    /// Whether `ip` is one of our unicast addresses.
    fn is_our_address(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => !v4.is_unspecified() && v4 == self.config.address,
            IpAddr::V6(v6) => {
                Some(v6) == self.link_local || self.config.ipv6.is_some_and(|c| c.address == v6)
            }
        }
    }

    /// The source address for talking to `remote`.
    fn source_address_for(&self, remote: IpAddr) -> Option<IpAddr> {
        match remote {
            IpAddr::V4(_) => {
                (!self.config.address.is_unspecified()).then_some(IpAddr::V4(self.config.address))
            }
            IpAddr::V6(v6) if is_link_local(v6) => self.link_local.map(IpAddr::V6),
            IpAddr::V6(_) => self.config.ipv6.map(|c| IpAddr::V6(c.address)),
        }
    }

    // === impl Stack: handles ===

    fn insert(&mut self, entry: Entry) -> SocketHandle {
        if let Some(index) = self.free_slots.pop() {
            let slot = &mut self.slots[index as usize];
            slot.generation = slot.generation.wrapping_add(1);
            slot.entry = Some(entry);
            return SocketHandle {
                index,
                generation: slot.generation,
            };
        }
        self.slots.push(Slot {
            generation: 0,
            entry: Some(entry),
        });
        SocketHandle {
            index: (self.slots.len() - 1) as u32,
            generation: 0,
        }
    }

    fn entry(&self, handle: SocketHandle) -> Option<&Entry> {
        let slot = self.slots.get(handle.index as usize)?;
        (slot.generation == handle.generation)
            .then_some(slot.entry.as_ref())
            .flatten()
    }

    fn entry_mut(&mut self, handle: SocketHandle) -> Option<&mut Entry> {
        let slot = self.slots.get_mut(handle.index as usize)?;
        if slot.generation != handle.generation {
            return None;
        }
        slot.entry.as_mut()
    }

    fn conn(&self, handle: SocketHandle) -> Result<&ConnSlot, SocketError> {
        match self.entry(handle) {
            Some(Entry::Conn(c)) if c.app_owned => Ok(c),
            _ => Err(SocketError::InvalidHandle),
        }
    }

    fn conn_mut(&mut self, handle: SocketHandle) -> Result<&mut ConnSlot, SocketError> {
        match self.entry_mut(handle) {
            Some(Entry::Conn(c)) if c.app_owned => Ok(c),
            _ => Err(SocketError::InvalidHandle),
        }
    }

    fn remove(&mut self, handle: SocketHandle) {
        let Some(slot) = self.slots.get_mut(handle.index as usize) else {
            return;
        };
        if slot.generation != handle.generation {
            return;
        }
        match slot.entry.take() {
            Some(Entry::Conn(c)) => {
                let ep = c.conn.endpoints;
                let key = (ep.local.port(), ep.remote.ip(), ep.remote.port());
                if self.tuples.get(&key) == Some(&handle) {
                    self.tuples.remove(&key);
                }
                self.release_port(ep.local.port());
            }
            Some(Entry::Listener(l)) => {
                self.listeners.remove(&l.port);
                self.release_port(l.port);
            }
            None => return,
        }
        self.free_slots.push(handle.index);
    }

    fn claim_port(&mut self, port: u16) {
        *self.ports_in_use.entry(port).or_default() += 1;
    }

    fn release_port(&mut self, port: u16) {
        if let Some(count) = self.ports_in_use.get_mut(&port) {
            *count -= 1;
            if *count == 0 {
                self.ports_in_use.remove(&port);
            }
        }
    }

    // === impl Stack: socket API ===

    /// Listens on `port`, keeping at most `backlog` connections that are being established or
    /// waiting for `accept`.
    pub fn listen(&mut self, port: u16, backlog: usize) -> Result<SocketHandle, ListenError> {
        let config = self.config.tcp.clone();
        self.listen_with(port, backlog, config)
    }

    /// Listens with its own TCP configuration for the connections it accepts.
    pub fn listen_with(
        &mut self,
        port: u16,
        backlog: usize,
        config: TcpConfig,
    ) -> Result<SocketHandle, ListenError> {
        if port == 0 {
            return Err(ListenError::InvalidPort);
        }
        if self.listeners.contains_key(&port) {
            return Err(ListenError::PortInUse);
        }
        let handle = self.insert(Entry::Listener(Listener {
            config,
            port,
            backlog: backlog.max(1),
            embryonic: 0,
            ready: VecDeque::new(),
        }));
        self.listeners.insert(port, handle);
        self.claim_port(port);
        Ok(handle)
    }

    /// Takes the next established connection from a listener's accept queue.
    pub fn accept(&mut self, listener: SocketHandle) -> Result<SocketHandle, SocketError> {
        let Some(Entry::Listener(l)) = self.entry_mut(listener) else {
            return Err(SocketError::InvalidHandle);
        };
        let handle = l.ready.pop_front().ok_or(SocketError::WouldBlock)?;
        if let Some(Entry::Conn(c)) = self.entry_mut(handle) {
            c.app_owned = true;
            c.listener = None;
            c.last = Readiness::default();
        }
        self.refresh(handle);
        Ok(handle)
    }

    /// Opens a connection (IPv4 or IPv6) with the stack's default TCP configuration.
    pub fn connect(
        &mut self,
        now: Instant,
        remote: impl Into<SocketAddr>,
    ) -> Result<SocketHandle, SocketError> {
        let config = self.config.tcp.clone();
        self.connect_with(now, remote, config)
    }

    /// Opens a connection with its own TCP configuration (for example another controller).
    pub fn connect_with(
        &mut self,
        now: Instant,
        remote: impl Into<SocketAddr>,
        config: TcpConfig,
    ) -> Result<SocketHandle, SocketError> {
        let remote = remote.into();
        self.check_destination(remote)?;
        let port = self.pick_port(now, remote)?;
        self.open(now, port, remote, config)
    }

    /// Opens a connection from a chosen local port (`bind` then `connect`).
    pub fn connect_from(
        &mut self,
        now: Instant,
        local_port: u16,
        remote: impl Into<SocketAddr>,
        config: TcpConfig,
    ) -> Result<SocketHandle, SocketError> {
        let remote = remote.into();
        self.check_destination(remote)?;
        if local_port == 0
            || self
                .tuples
                .contains_key(&(local_port, remote.ip(), remote.port()))
        {
            return Err(SocketError::InvalidAddress);
        }
        self.open(now, local_port, remote, config)
    }

    fn check_destination(&self, remote: SocketAddr) -> Result<(), SocketError> {
        let ip = remote.ip();
        if remote.port() == 0 || ip.is_unspecified() || ip.is_multicast() || self.is_our_address(ip)
        {
            return Err(SocketError::InvalidAddress);
        }
        if let IpAddr::V4(v4) = ip
            && v4.is_broadcast()
        {
            return Err(SocketError::InvalidAddress);
        }
        self.source_address_for(ip)
            .map(|_| ())
            .ok_or(SocketError::NoSourceAddress)
    }

    fn open(
        &mut self,
        now: Instant,
        port: u16,
        remote: SocketAddr,
        config: TcpConfig,
    ) -> Result<SocketHandle, SocketError> {
        let local_ip = self
            .source_address_for(remote.ip())
            .ok_or(SocketError::NoSourceAddress)?;
        let endpoints = Endpoints {
            local: SocketAddr::new(local_ip, port),
            remote,
        };
        let iss = self.isn.isn(now, endpoints.local, endpoints.remote);
        let ts = self.isn.timestamp_offset(endpoints.local, endpoints.remote);
        let conn = Connection::connect(now, endpoints, iss, ts, config, self.mtu_mss(remote.ip()));
        let handle = self.insert(Entry::Conn(Box::new(ConnSlot {
            conn,
            listener: None,
            app_owned: true,
            last: Readiness::default(),
        })));
        self.tuples
            .insert((port, remote.ip(), remote.port()), handle);
        self.claim_port(port);
        Ok(handle)
    }

    /// A free port for `remote`, round robin over the ephemeral range; failing that, the port
    /// of the connection to `remote` longest in TIME-WAIT, if it may be reused.
    fn pick_port(&mut self, now: Instant, remote: SocketAddr) -> Result<u16, SocketError> {
        let range = self.config.ephemeral_ports.clone();
        let span = u32::from(*range.end()) - u32::from(*range.start()) + 1;
        for _ in 0..span {
            let port = self.next_port;
            self.next_port = if port >= *range.end() {
                *range.start()
            } else {
                port + 1
            };
            let key = (port, remote.ip(), remote.port());
            if !self.listeners.contains_key(&port) && !self.tuples.contains_key(&key) {
                return Ok(port);
            }
        }
        let after = self
            .config
            .time_wait_reuse_after
            .ok_or(SocketError::NoPortsAvailable)?;
        let oldest = range
            .filter(|port| !self.listeners.contains_key(port))
            .filter_map(|port| {
                let handle = *self.tuples.get(&(port, remote.ip(), remote.port()))?;
                match self.entry(handle) {
                    Some(Entry::Conn(slot)) if !slot.app_owned => {
                        let since = slot.conn.time_wait_reusable_since(after)?;
                        (since <= now).then_some((since, port, handle))
                    }
                    _ => None,
                }
            })
            .min_by_key(|&(since, ..)| since);
        let (_, port, handle) = oldest.ok_or(SocketError::NoPortsAvailable)?;
        self.remove(handle);
        self.stats.time_wait_reused_by_connect += 1;
        Ok(port)
    }

    /// MSS the interface MTU allows towards `remote` (IP and TCP headers off).
    fn mtu_mss(&self, remote: IpAddr) -> u16 {
        let headers = if remote.is_ipv6() { 60 } else { 40 };
        self.config.mtu.saturating_sub(headers).clamp(88, 65535) as u16
    }

    /// Queues bytes for sending; returns how many were taken.
    pub fn send(&mut self, handle: SocketHandle, data: &[u8]) -> Result<usize, SocketError> {
        let slot = self.conn_mut(handle)?;
        if let Some(e) = slot.conn.error() {
            return Err(SocketError::Connection(e));
        }
        match slot.conn.state() {
            State::Closed => return Err(SocketError::NotConnected),
            State::FinWait1
            | State::FinWait2
            | State::Closing
            | State::LastAck
            | State::TimeWait => {
                return Err(SocketError::Shutdown);
            }
            _ => {}
        }
        if slot.conn.write_closed() {
            return Err(SocketError::Shutdown);
        }
        let n = slot.conn.send(data);
        if n == 0 && !data.is_empty() {
            slot.last.writable = false;
            return Err(SocketError::WouldBlock);
        }
        self.refresh(handle);
        Ok(n)
    }

    /// Reads received bytes. `Ok(0)` means the peer closed (EOF).
    pub fn recv(&mut self, handle: SocketHandle, buf: &mut [u8]) -> Result<usize, SocketError> {
        let slot = self.conn_mut(handle)?;
        let n = slot.conn.recv(buf);
        if n > 0 || buf.is_empty() {
            if slot.conn.recv_available() == 0 {
                slot.last.readable = slot.conn.at_eof();
            }
            return Ok(n);
        }
        if let Some(e) = slot.conn.error() {
            return Err(SocketError::Connection(e));
        }
        if slot.conn.at_eof() {
            return Ok(0);
        }
        if slot.conn.state() == State::Closed {
            return Ok(0);
        }
        slot.last.readable = false;
        Err(SocketError::WouldBlock)
    }

    /// Half-closes the sending side: a FIN follows the queued data.
    pub fn shutdown(&mut self, handle: SocketHandle) -> Result<(), SocketError> {
        self.conn_mut(handle)?.conn.shutdown_write();
        self.refresh(handle);
        Ok(())
    }

    /// Closes the socket. The connection finishes (FIN, TIME-WAIT) in the background; the handle
    /// is invalid afterwards. Closing a listener resets connections waiting in its queue.
    pub fn close(&mut self, handle: SocketHandle) -> Result<(), SocketError> {
        match self.entry_mut(handle) {
            Some(Entry::Listener(l)) => {
                let queued: Vec<SocketHandle> = l.ready.drain(..).collect();
                for child in queued {
                    if let Some(Entry::Conn(c)) = self.entry_mut(child) {
                        c.conn.abort();
                    }
                }
                self.remove(handle);
                Ok(())
            }
            Some(Entry::Conn(c)) if c.app_owned => {
                c.app_owned = false;
                c.conn.close();
                if c.conn.is_finished() {
                    self.remove(handle);
                }
                Ok(())
            }
            _ => Err(SocketError::InvalidHandle),
        }
    }

    /// Resets the connection (RST) and releases the handle.
    pub fn abort(&mut self, handle: SocketHandle) -> Result<(), SocketError> {
        let slot = self.conn_mut(handle)?;
        slot.app_owned = false;
        slot.conn.abort();
        Ok(())
    }

    /// Sets a socket option on a connection, or on a listener for the connections it accepts
    /// from now on (as Linux's accepted sockets inherit the listener's options).
    pub fn set_option(
        &mut self,
        handle: SocketHandle,
        option: SocketOption,
    ) -> Result<(), SocketError> {
        let now = self.now;
        if let Some(Entry::Listener(l)) = self.entry_mut(handle) {
            let config = &mut l.config;
            match option {
                SocketOption::NoDelay(on) => config.nodelay = on,
                SocketOption::Keepalive(k) => config.keepalive = k,
                SocketOption::SendBuffer(bytes) => config.send_buffer = bytes.max(1),
                SocketOption::ReceiveBuffer(bytes) => config.recv_buffer = bytes.max(1),
                SocketOption::CongestionControl(cc) => config.congestion_control = cc,
            }
            return Ok(());
        }
        let slot = self.conn_mut(handle)?;
        match option {
            SocketOption::NoDelay(on) => slot.conn.set_nodelay(on),
            SocketOption::Keepalive(k) => slot.conn.set_keepalive(now, k),
            SocketOption::SendBuffer(bytes) => slot.conn.set_send_buffer(bytes),
            SocketOption::ReceiveBuffer(bytes) => slot.conn.set_recv_buffer(bytes),
            SocketOption::CongestionControl(cc) => slot.conn.set_congestion_control(now, cc),
        }
        self.refresh(handle);
        Ok(())
    }

    /// The connection's TCP state.
    pub fn state(&self, handle: SocketHandle) -> Result<State, SocketError> {
        Ok(self.conn(handle)?.conn.state())
    }

    /// The connection's failure, if any.
    pub fn error(&self, handle: SocketHandle) -> Result<Option<TcpError>, SocketError> {
        Ok(self.conn(handle)?.conn.error())
    }

    /// Counters of one connection.
    pub fn connection_stats(&self, handle: SocketHandle) -> Result<ConnectionStats, SocketError> {
        Ok(self.conn(handle)?.conn.stats())
    }

    /// The congestion controller a connection runs.
    pub fn congestion_control(
        &self,
        handle: SocketHandle,
    ) -> Result<CongestionControl, SocketError> {
        Ok(self.conn(handle)?.conn.config().congestion_control)
    }

    /// Name of the controller instance (for reports).
    pub fn congestion_control_name(
        &self,
        handle: SocketHandle,
    ) -> Result<&'static str, SocketError> {
        Ok(self.conn(handle)?.conn.congestion_control_name())
    }

    /// Local and remote addresses of a connection.
    pub fn addresses(&self, handle: SocketHandle) -> Result<(SocketAddr, SocketAddr), SocketError> {
        let ep = self.conn(handle)?.conn.endpoints;
        Ok((ep.local, ep.remote))
    }

    /// Current readiness (level-triggered).
    pub fn readiness(&self, handle: SocketHandle) -> Result<Readiness, SocketError> {
        match self.entry(handle) {
            Some(Entry::Listener(l)) => Ok(Readiness {
                readable: !l.ready.is_empty(),
                ..Readiness::default()
            }),
            Some(Entry::Conn(c)) if c.app_owned => Ok(readiness_of(&c.conn)),
            _ => Err(SocketError::InvalidHandle),
        }
    }

    /// The next readiness event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Number of sockets (listeners and connections, including ones closing in the background).
    pub fn socket_count(&self) -> usize {
        self.slots.iter().filter(|s| s.entry.is_some()).count()
    }

    /// Re-evaluates one socket after a change: readiness events, accept queue, freeing.
    fn refresh(&mut self, handle: SocketHandle) {
        let Some(Entry::Conn(slot)) = self.entry_mut(handle) else {
            return;
        };
        let now_ready = readiness_of(&slot.conn);
        let state = slot.conn.state();
        let finished = slot.conn.is_finished();
        let mut new_events = Vec::new();
        if slot.app_owned {
            let last = slot.last;
            if now_ready.readable && !last.readable {
                new_events.push(EventKind::Readable);
            }
            if now_ready.writable && !last.writable {
                new_events.push(EventKind::Writable);
            }
            if now_ready.error
                && !last.error
                && let Some(e) = slot.conn.error()
            {
                new_events.push(EventKind::Error(e));
            }
            if now_ready.closed && !last.closed {
                new_events.push(EventKind::Closed);
            }
            slot.last = now_ready;
        }
        let app_owned = slot.app_owned;
        let listener = slot.listener;
        for kind in new_events {
            self.events.push_back(Event { handle, kind });
        }
        if let Some(listener_handle) = listener {
            let established = !matches!(state, State::SynReceived | State::Closed);
            if established || finished {
                if let Some(Entry::Conn(slot)) = self.entry_mut(handle) {
                    slot.listener = None;
                }
                if let Some(Entry::Listener(l)) = self.entry_mut(listener_handle) {
                    l.embryonic = l.embryonic.saturating_sub(1);
                    if established {
                        l.ready.push_back(handle);
                        self.events.push_back(Event {
                            handle: listener_handle,
                            kind: EventKind::Acceptable,
                        });
                    }
                } else if established {
                    // The listener went away before the handshake completed.
                    if let Some(Entry::Conn(slot)) = self.entry_mut(handle) {
                        slot.conn.abort();
                    }
                }
            }
        }
        if finished && !app_owned && listener.is_none() {
            // Still referenced from an accept queue: keep until accepted or the listener closes.
            let queued = self.listeners.values().any(|l| match self.entry(*l) {
                Some(Entry::Listener(l)) => l.ready.contains(&handle),
                _ => false,
            });
            if !queued {
                self.remove(handle);
            }
        }
    }

    // === impl Stack: driving ===

    /// When `poll` should next be called, if nothing arrives before.
    pub fn poll_at(&self) -> Option<Instant> {
        if !self.control_frames.is_empty() {
            return Some(self.now);
        }
        let mut at = None;
        for slot in &self.slots {
            if let Some(Entry::Conn(c)) = &slot.entry {
                let remote = c.conn.endpoints.remote.ip();
                if self.cached_neighbor(remote).is_none() && !c.conn.is_finished() {
                    // Blocked on ARP/NDP: wake for the next request instead of spinning.
                    let hop = self.next_hop(remote);
                    let retry = self
                        .solicited
                        .get(&hop)
                        .map_or(self.now, |last| *last + Duration::from_secs(1));
                    at = earliest(at, Some(retry));
                    continue;
                }
                if c.conn.wants_transmit() {
                    return Some(self.now);
                }
                at = earliest(at, c.conn.poll_at());
            }
        }
        at
    }

    /// Processes received frames, fires timers and transmits. Returns true if anything was
    /// received or sent.
    pub fn poll<D: Device>(&mut self, now: Instant, device: &mut D) -> bool {
        self.now = self.now.max(now);
        self.tx_checksum = if device.capabilities().tx_checksum_offload {
            TxChecksum::Offloaded
        } else {
            TxChecksum::Full
        };
        let mut activity = false;
        for _ in 0..RX_BUDGET {
            let mut frame = std::mem::take(&mut self.scratch);
            let got = device.receive(|bytes, meta| {
                frame.clear();
                frame.extend_from_slice(bytes);
                meta
            });
            let Some(meta) = got else {
                self.scratch = frame;
                break;
            };
            activity = true;
            self.stats.rx_frames += 1;
            // Process each frame no earlier than the host took it from the engine (see
            // `RxMeta::received_at`): an ACK handled at a stale `now` yields a too-short RTT.
            if let Some(at) = meta.received_at {
                self.now = self.now.max(at);
            }
            let now = self.now;
            self.ingress(now, &frame, meta);
            self.scratch = frame;
        }
        let now = self.now;
        activity |= self.egress(now, device);
        device.flush();
        activity
    }

    fn ingress(&mut self, now: Instant, frame: &[u8], meta: RxMeta) {
        if !self.process_frame(now, frame, meta) {
            self.stats.rx_dropped += 1;
        }
    }

    /// Returns false when the frame was dropped.
    fn process_frame(&mut self, now: Instant, frame: &[u8], meta: RxMeta) -> bool {
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            return false;
        };
        let Ok(eth_repr) = EthernetRepr::parse(&eth) else {
            return false;
        };
        let ours = EthernetAddress(self.config.mac);
        // IPv6 multicast (33:33:…) carries neighbour solicitations; the IPv6 layer then keeps
        // only the groups we are in.
        let ipv6_multicast = self.link_local.is_some() && eth_repr.dst_addr.0[..2] == [0x33, 0x33];
        if eth_repr.dst_addr != ours && !eth_repr.dst_addr.is_broadcast() && !ipv6_multicast {
            return false;
        }
        match eth_repr.ethertype {
            EthernetProtocol::Arp => self.process_arp(now, eth.payload()),
            EthernetProtocol::Ipv4 => self.process_ipv4(now, eth.payload(), meta),
            EthernetProtocol::Ipv6 if self.link_local.is_some() => {
                self.process_ipv6(now, eth_repr.src_addr, eth.payload(), meta)
            }
            _ => false,
        }
    }

    fn process_arp(&mut self, now: Instant, payload: &[u8]) -> bool {
        let Ok(packet) = ArpPacket::new_checked(payload) else {
            return false;
        };
        let Ok(ArpRepr::EthernetIpv4 {
            operation,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = ArpRepr::parse(&packet)
        else {
            return false;
        };
        if self.config.address.is_unspecified() {
            return false;
        }
        let sender: Ipv4Addr = source_protocol_addr;
        if target_protocol_addr == self.config.address
            || self.solicited.contains_key(&IpAddr::V4(sender))
        {
            // RFC 826: learn the sender when the packet concerns us.
            self.learn_neighbor(now, IpAddr::V4(sender), source_hardware_addr);
        }
        if operation == ArpOperation::Request && target_protocol_addr == self.config.address {
            let reply = ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(self.config.mac),
                source_protocol_addr: self.config.address,
                target_hardware_addr: source_hardware_addr,
                target_protocol_addr: sender,
            };
            self.queue_arp(reply, source_hardware_addr);
        }
        true
    }

    fn queue_arp(&mut self, repr: ArpRepr, dst: EthernetAddress) {
        let mut frame = vec![0u8; 14 + repr.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: EthernetAddress(self.config.mac),
            dst_addr: dst,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut eth);
        repr.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        self.control_frames.push_back(frame);
    }

    fn learn_neighbor(&mut self, now: Instant, ip: IpAddr, mac: EthernetAddress) {
        if mac.is_unicast() {
            self.neighbors
                .insert(ip, (mac.0, now + self.config.arp_timeout));
            self.solicited.remove(&ip);
        }
    }

    fn process_ipv4(&mut self, now: Instant, payload: &[u8], meta: RxMeta) -> bool {
        let Ok(packet) = Ipv4Packet::new_checked(payload) else {
            return false;
        };
        let Ok(ip) = Ipv4Repr::parse(&packet, &ChecksumCapabilities::default()) else {
            return false;
        };
        if ip.dst_addr != self.config.address || ip.dst_addr.is_unspecified() {
            return false;
        }
        let body = packet.payload();
        match ip.next_header {
            IpProtocol::Tcp => self.process_tcp(
                now,
                IpAddr::V4(ip.src_addr),
                IpAddr::V4(ip.dst_addr),
                body,
                meta,
            ),
            IpProtocol::Icmp => self.process_icmp(&ip, body),
            _ => false,
        }
    }

    fn process_ipv6(
        &mut self,
        now: Instant,
        src_mac: EthernetAddress,
        payload: &[u8],
        meta: RxMeta,
    ) -> bool {
        let Ok(packet) = Ipv6Packet::new_checked(payload) else {
            return false;
        };
        let Ok(ip) = Ipv6Repr::parse(&packet) else {
            return false;
        };
        let dst = ip.dst_addr;
        let unicast_to_us = self.is_our_address(IpAddr::V6(dst));
        let group_we_are_in =
            dst == IPV6_ALL_NODES || self.our_ipv6().any(|ours| solicited_node(ours) == dst);
        if !unicast_to_us && !group_we_are_in {
            return false;
        }
        // Extension headers are not followed: TCP and ICMPv6 directly after the fixed header.
        let body = &packet.payload()[..ip.payload_len.min(packet.payload().len())];
        match ip.next_header {
            IpProtocol::Tcp if unicast_to_us => {
                self.process_tcp(now, IpAddr::V6(ip.src_addr), IpAddr::V6(dst), body, meta)
            }
            IpProtocol::Icmpv6 => self.process_icmpv6(now, &ip, src_mac, body, unicast_to_us),
            _ => false,
        }
    }

    /// Our IPv6 unicast addresses: link-local, then global.
    fn our_ipv6(&self) -> impl Iterator<Item = Ipv6Addr> + '_ {
        self.link_local
            .into_iter()
            .chain(self.config.ipv6.map(|c| c.address))
    }

    fn process_icmpv6(
        &mut self,
        now: Instant,
        ip: &Ipv6Repr,
        src_mac: EthernetAddress,
        body: &[u8],
        unicast_to_us: bool,
    ) -> bool {
        let Ok(packet) = Icmpv6Packet::new_checked(body) else {
            return false;
        };
        let Ok(repr) = Icmpv6Repr::parse(
            &ip.src_addr,
            &ip.dst_addr,
            &packet,
            &ChecksumCapabilities::default(),
        ) else {
            return false;
        };
        match repr {
            Icmpv6Repr::EchoRequest {
                ident,
                seq_no,
                data,
            } if unicast_to_us => {
                let reply = Icmpv6Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                self.queue_icmpv6(ip.dst_addr, ip.src_addr, None, 64, &reply);
                true
            }
            Icmpv6Repr::PktTooBig { mtu, header, data }
                if header.next_header == IpProtocol::Tcp && data.len() >= 8 =>
            {
                let local_port = u16::from_be_bytes([data[0], data[1]]);
                let remote_port = u16::from_be_bytes([data[2], data[3]]);
                let seq = Seq(u32::from_be_bytes([data[4], data[5], data[6], data[7]]));
                let key = (local_port, IpAddr::V6(header.dst_addr), remote_port);
                if self.is_our_address(IpAddr::V6(header.src_addr))
                    && let Some(&handle) = self.tuples.get(&key)
                    && let Some(Entry::Conn(slot)) = self.entry_mut(handle)
                {
                    slot.conn
                        .on_path_mtu(mtu.min(u32::from(u16::MAX)) as u16, seq);
                }
                true
            }
            // RFC 4861 §7.1: neighbour discovery only from the link itself (hop limit 255).
            Icmpv6Repr::Ndisc(ndisc) if ip.hop_limit == 255 => {
                self.process_ndisc(now, ip, src_mac, ndisc)
            }
            _ => false,
        }
    }

    fn process_ndisc(
        &mut self,
        now: Instant,
        ip: &Ipv6Repr,
        src_mac: EthernetAddress,
        ndisc: NdiscRepr<'_>,
    ) -> bool {
        match ndisc {
            NdiscRepr::NeighborSolicit {
                target_addr,
                lladdr,
            } if self.is_our_address(IpAddr::V6(target_addr)) => {
                let from_dad = ip.src_addr.is_unspecified();
                if !from_dad && let Some(mac) = ethernet_lladdr(lladdr) {
                    self.learn_neighbor(now, IpAddr::V6(ip.src_addr), mac);
                }
                // §7.2.4: answer the soliciting node, or all nodes for a DAD probe.
                let (dst, flags, dst_mac) = if from_dad {
                    (
                        IPV6_ALL_NODES,
                        NdiscNeighborFlags::OVERRIDE,
                        ipv6_multicast_mac(IPV6_ALL_NODES),
                    )
                } else {
                    (
                        ip.src_addr,
                        NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE,
                        ethernet_lladdr(lladdr).unwrap_or(src_mac),
                    )
                };
                let advert = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
                    flags,
                    target_addr,
                    lladdr: Some(EthernetAddress(self.config.mac).into()),
                });
                self.queue_icmpv6(target_addr, dst, Some(dst_mac.0), 255, &advert);
                true
            }
            NdiscRepr::NeighborAdvert {
                target_addr,
                lladdr,
                ..
            } => {
                let target = IpAddr::V6(target_addr);
                if self.solicited.contains_key(&target) || self.neighbors.contains_key(&target) {
                    let mac = ethernet_lladdr(lladdr).unwrap_or(src_mac);
                    self.learn_neighbor(now, target, mac);
                }
                true
            }
            _ => false,
        }
    }

    /// Queues an ICMPv6 message; to the neighbour's cached MAC address unless `dst_mac` is given
    /// (dropped if neither is known).
    fn queue_icmpv6(
        &mut self,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        dst_mac: Option<[u8; 6]>,
        hop_limit: u8,
        repr: &Icmpv6Repr<'_>,
    ) {
        let Some(mac) = dst_mac.or_else(|| self.cached_neighbor(IpAddr::V6(dst))) else {
            return;
        };
        let ip = Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: IpProtocol::Icmpv6,
            payload_len: repr.buffer_len(),
            hop_limit,
        };
        let mut frame = vec![0u8; 14 + ip.buffer_len() + repr.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: EthernetAddress(self.config.mac),
            dst_addr: EthernetAddress(mac),
            ethertype: EthernetProtocol::Ipv6,
        }
        .emit(&mut eth);
        let mut ip_packet = Ipv6Packet::new_unchecked(eth.payload_mut());
        ip.emit(&mut ip_packet);
        repr.emit(
            &src,
            &dst,
            &mut Icmpv6Packet::new_unchecked(ip_packet.payload_mut()),
            &ChecksumCapabilities::default(),
        );
        self.control_frames.push_back(frame);
    }

    fn process_icmp(&mut self, ip: &Ipv4Repr, body: &[u8]) -> bool {
        let Ok(packet) = Icmpv4Packet::new_checked(body) else {
            return false;
        };
        let Ok(repr) = Icmpv4Repr::parse(&packet, &ChecksumCapabilities::default()) else {
            return false;
        };
        match repr {
            Icmpv4Repr::EchoRequest {
                ident,
                seq_no,
                data,
            } => {
                let reply = Icmpv4Repr::EchoReply {
                    ident,
                    seq_no,
                    data,
                };
                self.queue_icmp(ip.src_addr, reply);
                true
            }
            Icmpv4Repr::DstUnreachable {
                reason: Icmpv4DstUnreachable::FragRequired,
                header,
                data,
            } if header.next_header == IpProtocol::Tcp && data.len() >= 8 => {
                // RFC 1191: the next-hop MTU sits in bytes 6..8 of the ICMP header.
                let mtu = u16::from_be_bytes([body[6], body[7]]);
                let local_port = u16::from_be_bytes([data[0], data[1]]);
                let remote_port = u16::from_be_bytes([data[2], data[3]]);
                let seq = Seq(u32::from_be_bytes([data[4], data[5], data[6], data[7]]));
                let key = (local_port, IpAddr::V4(header.dst_addr), remote_port);
                if header.src_addr == self.config.address
                    && let Some(&handle) = self.tuples.get(&key)
                    && let Some(Entry::Conn(slot)) = self.entry_mut(handle)
                {
                    slot.conn.on_path_mtu(mtu, seq);
                }
                true
            }
            _ => false,
        }
    }

    fn queue_icmp(&mut self, dst: Ipv4Addr, repr: Icmpv4Repr<'_>) {
        let Some(mac) = self.cached_neighbor(IpAddr::V4(dst)) else {
            return;
        };
        let ip = Ipv4Repr {
            src_addr: self.config.address,
            dst_addr: dst,
            next_header: IpProtocol::Icmp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        };
        let mut frame = vec![0u8; 14 + ip.buffer_len() + repr.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: EthernetAddress(self.config.mac),
            dst_addr: EthernetAddress(mac),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        let mut ip_packet = Ipv4Packet::new_unchecked(eth.payload_mut());
        let caps = ChecksumCapabilities::default();
        ip.emit(&mut ip_packet, &caps);
        repr.emit(
            &mut Icmpv4Packet::new_unchecked(ip_packet.payload_mut()),
            &caps,
        );
        self.control_frames.push_back(frame);
    }

    fn process_tcp(
        &mut self,
        now: Instant,
        src_ip: IpAddr,
        dst_ip: IpAddr,
        body: &[u8],
        meta: RxMeta,
    ) -> bool {
        let Ok(packet) = TcpPacket::new_checked(body) else {
            return false;
        };
        let mut caps = ChecksumCapabilities::default();
        if meta.checksum_trusted {
            caps = ChecksumCapabilities::ignored();
        }
        let src = IpAddress::from(src_ip);
        let dst = IpAddress::from(dst_ip);
        if meta.partial_checksum_possible
            && !meta.checksum_trusted
            && !packet.verify_checksum(&src, &dst)
            && packet.checksum() == pseudo_header_sum(src_ip, dst_ip, body.len())
        {
            caps = ChecksumCapabilities::ignored();
        }
        let Ok(seg) = TcpRepr::parse(&packet, &src, &dst, &caps) else {
            return false;
        };
        let key = (seg.dst_port, src_ip, seg.src_port);
        if let Some(&handle) = self.tuples.get(&key) {
            // Checked only for a SYN: every other segment goes straight to its connection.
            let reincarnation = seg.control == TcpControl::Syn
                && seg.ack_number.is_none()
                && self.listeners.contains_key(&seg.dst_port)
                && matches!(self.entry(handle), Some(Entry::Conn(slot))
                    if !slot.app_owned && slot.conn.time_wait_accepts_syn(&seg));
            if !reincarnation {
                if let Some(Entry::Conn(slot)) = self.entry_mut(handle) {
                    slot.conn.handle_segment(now, &seg);
                }
                self.refresh(handle);
                return true;
            }
            // The old incarnation ends here; the SYN goes to the listener below.
            self.remove(handle);
            self.stats.time_wait_reused += 1;
        }
        if let Some(&listener) = self.listeners.get(&seg.dst_port)
            && seg.control == TcpControl::Syn
            && seg.ack_number.is_none()
        {
            self.accept_syn(now, listener, dst_ip, src_ip, &seg);
            return true;
        }
        if seg.control != TcpControl::Rst {
            self.reset_unknown(dst_ip, src_ip, &seg);
        }
        true
    }

    fn accept_syn(
        &mut self,
        now: Instant,
        listener: SocketHandle,
        local: IpAddr,
        from: IpAddr,
        seg: &TcpRepr<'_>,
    ) {
        let Some(Entry::Listener(l)) = self.entry_mut(listener) else {
            return;
        };
        if l.embryonic + l.ready.len() >= l.backlog {
            // Drop rather than reset: the client retries, as with Linux's full backlog.
            self.stats.syn_dropped += 1;
            return;
        }
        l.embryonic += 1;
        let config = l.config.clone();
        let endpoints = Endpoints {
            local: SocketAddr::new(local, seg.dst_port),
            remote: SocketAddr::new(from, seg.src_port),
        };
        let iss = self.isn.isn(now, endpoints.local, endpoints.remote);
        let ts = self.isn.timestamp_offset(endpoints.local, endpoints.remote);
        let conn = Connection::accept(now, endpoints, iss, ts, config, self.mtu_mss(from), seg);
        let handle = self.insert(Entry::Conn(Box::new(ConnSlot {
            conn,
            listener: Some(listener),
            app_owned: false,
            last: Readiness::default(),
        })));
        self.tuples
            .insert((seg.dst_port, from, seg.src_port), handle);
        self.claim_port(seg.dst_port);
    }

    /// RFC 9293 §3.10.7.1: a segment for no connection gets a RST.
    fn reset_unknown(&mut self, local: IpAddr, peer: IpAddr, seg: &TcpRepr<'_>) {
        let (seq, ack) = match seg.ack_number {
            Some(ack) => (ack, None),
            None => (TcpSeqNumber(0), Some(seg.seq_number + seg.segment_len())),
        };
        let repr = TcpRepr {
            src_port: seg.dst_port,
            dst_port: seg.src_port,
            control: TcpControl::Rst,
            seq_number: seq,
            ack_number: ack,
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        };
        let Some(mac) = self.cached_neighbor(peer) else {
            return;
        };
        let mut frame = vec![0u8; 14 + 40 + repr.buffer_len()];
        let len = emit_tcp_frame(
            &mut frame,
            self.config.mac,
            mac,
            local,
            peer,
            &repr,
            self.tx_checksum,
        );
        frame.truncate(len);
        self.stats.rst_sent += 1;
        self.control_frames.push_back(frame);
    }

    fn next_hop(&self, dst: IpAddr) -> IpAddr {
        match dst {
            IpAddr::V4(dst) => {
                let mask = prefix_mask_v4(self.config.prefix_len);
                let on_link = (u32::from(dst) & mask) == (u32::from(self.config.address) & mask);
                match (on_link, self.config.gateway) {
                    (false, Some(gateway)) => IpAddr::V4(gateway),
                    _ => IpAddr::V4(dst),
                }
            }
            IpAddr::V6(dst) => {
                let Some(v6) = self.config.ipv6 else {
                    return IpAddr::V6(dst);
                };
                let mask = prefix_mask_v6(v6.prefix_len);
                let on_link = is_link_local(dst)
                    || (u128::from(dst) & mask) == (u128::from(v6.address) & mask);
                match (on_link, v6.gateway) {
                    (false, Some(gateway)) => IpAddr::V6(gateway),
                    _ => IpAddr::V6(dst),
                }
            }
        }
    }

    fn cached_neighbor(&self, dst: IpAddr) -> Option<[u8; 6]> {
        let hop = self.next_hop(dst);
        self.neighbors
            .get(&hop)
            .filter(|(_, expires)| *expires > self.now)
            .map(|(mac, _)| *mac)
    }

    /// Resolves the next hop's MAC, sending an ARP request (at most one per second) if unknown.
    fn resolve(&mut self, now: Instant, dst: IpAddr) -> Option<[u8; 6]> {
        if let Some(mac) = self.cached_neighbor(dst) {
            return Some(mac);
        }
        let hop = self.next_hop(dst);
        let due = self
            .solicited
            .get(&hop)
            .is_none_or(|last| now.saturating_duration_since(*last) >= Duration::from_secs(1));
        if !due {
            return None;
        }
        self.solicited.insert(hop, now);
        match hop {
            IpAddr::V4(hop) => {
                let request = ArpRepr::EthernetIpv4 {
                    operation: ArpOperation::Request,
                    source_hardware_addr: EthernetAddress(self.config.mac),
                    source_protocol_addr: self.config.address,
                    target_hardware_addr: EthernetAddress([0; 6]),
                    target_protocol_addr: hop,
                };
                self.queue_arp(request, EthernetAddress::BROADCAST);
            }
            IpAddr::V6(hop) => {
                // RFC 4861 §7.2.2: to the target's solicited-node group, from an address of
                // ours (link-local for a link-local target), with our MAC address attached.
                let Some(IpAddr::V6(src)) = self.source_address_for(IpAddr::V6(hop)) else {
                    return None;
                };
                let group = solicited_node(hop);
                let solicit = Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
                    target_addr: hop,
                    lladdr: Some(EthernetAddress(self.config.mac).into()),
                });
                self.queue_icmpv6(src, group, Some(ipv6_multicast_mac(group).0), 255, &solicit);
            }
        }
        None
    }

    fn egress<D: Device>(&mut self, now: Instant, device: &mut D) -> bool {
        let mut activity = false;
        // With segmentation offload a frame may carry up to the engine's limit less the largest
        // headers (Ethernet, IPv6, TCP with options).
        let (max_frame, max_payload) = match device.capabilities().tso_max_frame {
            Some(limit) if limit > self.config.mtu + 14 + 114 => (limit, (limit - 114) as u64),
            _ => (self.config.mtu + 14, 0),
        };
        for index in 0..self.slots.len() {
            let generation = self.slots[index].generation;
            let handle = SocketHandle {
                index: index as u32,
                generation,
            };
            let remote = match &mut self.slots[index].entry {
                Some(Entry::Conn(slot)) => {
                    slot.conn.handle_timeout(now);
                    slot.conn.endpoints.remote.ip()
                }
                _ => continue,
            };
            let mac = self.resolve(now, remote);
            if let Some(mac) = mac {
                for _ in 0..TX_BUDGET_PER_SOCKET {
                    let Some(Entry::Conn(slot)) = &mut self.slots[index].entry else {
                        break;
                    };
                    let conn = &mut slot.conn;
                    let scratch = &mut self.scratch;
                    let config = &self.config;
                    let tx_checksum = self.tx_checksum;
                    let mut produced = false;
                    let segment_size = conn.mss() as usize;
                    // IPv4 only: DPDK's segmentation library (behind net_tap's TSO and GSO)
                    // cuts TCP over IPv4 in 22.11, and NICs do not all take IPv6.
                    let (max_frame, max_payload) = if conn.endpoints.remote.is_ipv4() {
                        (max_frame, max_payload)
                    } else {
                        (self.config.mtu + 14, 0)
                    };
                    let write = |buf: &mut [u8]| {
                        let Some(mut repr) = conn.poll_transmit(now, scratch, max_payload) else {
                            return 0;
                        };
                        produced = true;
                        repr.payload = scratch;
                        emit_tcp_frame(
                            buf,
                            config.mac,
                            mac,
                            conn.endpoints.local.ip(),
                            conn.endpoints.remote.ip(),
                            &repr,
                            tx_checksum,
                        )
                    };
                    let sent = if max_payload > 0 {
                        device.transmit_segmented(max_frame, segment_size, write)
                    } else {
                        device.transmit(max_frame, write)
                    };
                    match sent {
                        Some(0) => break,
                        Some(_) => {
                            self.stats.tx_frames += 1;
                            activity = true;
                        }
                        None => {
                            if produced {
                                self.stats.tx_dropped += 1;
                            }
                            break;
                        }
                    }
                }
            }
            self.refresh(handle);
        }
        while let Some(frame) = self.control_frames.pop_front() {
            let sent = device.transmit(frame.len(), |buf| {
                buf[..frame.len()].copy_from_slice(&frame);
                frame.len()
            });
            if sent.is_none() {
                self.control_frames.push_front(frame);
                break;
            }
            self.stats.tx_frames += 1;
            activity = true;
        }
        activity
    }
}

/// The folded (not complemented) TCP pseudo-header sum: what a sender using checksum offload
/// leaves in the checksum field for the NIC to finish.
/// All-nodes multicast group, ff02::1.
const IPV6_ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Sum of an address's 16-bit words (no allocation: this runs per frame on AF_XDP).
fn address_word_sum(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            u32::from(u16::from_be_bytes([o[0], o[1]]))
                + u32::from(u16::from_be_bytes([o[2], o[3]]))
        }
        IpAddr::V6(v6) => v6.segments().iter().map(|&w| u32::from(w)).sum(),
    }
}

/// The TCP pseudo-header's one's-complement sum (RFC 9293 §3.1, RFC 8200 §8.1): what a sender
/// using checksum offload leaves in the checksum field.
fn pseudo_header_sum(src: IpAddr, dst: IpAddr, tcp_len: usize) -> u16 {
    let mut sum: u32 = address_word_sum(src) + address_word_sum(dst);
    sum += u32::from(u8::from(IpProtocol::Tcp));
    sum += tcp_len as u32;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn prefix_mask_v4(prefix_len: u8) -> u32 {
    match prefix_len {
        0 => 0,
        n => u32::MAX << (32 - u32::from(n.min(32))),
    }
}

fn prefix_mask_v6(prefix_len: u8) -> u128 {
    match prefix_len {
        0 => 0,
        n => u128::MAX << (128 - u32::from(n.min(128))),
    }
}

/// fe80::/10.
fn is_link_local(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The solicited-node multicast group of an address (RFC 4291 §2.7.1): ff02::1:ffXX:XXXX.
fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0xff, o[13], o[14], o[15],
    ])
}

/// The Ethernet address of an IPv6 multicast group (RFC 2464 §7): 33:33 and its last 32 bits.
fn ipv6_multicast_mac(group: Ipv6Addr) -> EthernetAddress {
    let o = group.octets();
    EthernetAddress([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// An NDP link-layer address option holding an Ethernet address.
fn ethernet_lladdr(lladdr: Option<RawHardwareAddress>) -> Option<EthernetAddress> {
    let raw = lladdr?;
    let bytes = raw.as_bytes();
    (bytes.len() == 6).then(|| EthernetAddress::from_bytes(bytes))
}

/// The link-local address from a MAC address: fe80::/64 and the modified EUI-64 interface
/// identifier (RFC 4291 appendix A).
fn link_local_address(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

fn readiness_of(conn: &Connection) -> Readiness {
    Readiness {
        readable: conn.readable(),
        writable: conn.writable(),
        error: conn.error().is_some(),
        closed: conn.state() == State::Closed,
    }
}

/// Who completes a sent TCP frame's checksums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum TxChecksum {
    /// The stack: both checksums filled in.
    #[default]
    Full,
    /// The engine (`DeviceCapabilities::tx_checksum_offload`): IPv4 header checksum 0, TCP
    /// checksum field the pseudo-header sum.
    Offloaded,
}

/// Writes Ethernet, IP (the family of the addresses) and TCP headers plus payload into `buf`;
/// returns the frame length, or 0 if it does not fit or the families differ.
pub(crate) fn emit_tcp_frame(
    buf: &mut [u8],
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src_ip: IpAddr,
    dst_ip: IpAddr,
    repr: &TcpRepr<'_>,
    checksum: TxChecksum,
) -> usize {
    let (ethertype, ip_header_len) = match src_ip {
        IpAddr::V4(_) => (EthernetProtocol::Ipv4, 20),
        IpAddr::V6(_) => (EthernetProtocol::Ipv6, 40),
    };
    let total = 14 + ip_header_len + repr.buffer_len();
    if total > buf.len() || src_ip.is_ipv6() != dst_ip.is_ipv6() {
        return 0;
    }
    let buf = &mut buf[..total];
    let mut eth = EthernetFrame::new_unchecked(&mut *buf);
    EthernetRepr {
        src_addr: EthernetAddress(src_mac),
        dst_addr: EthernetAddress(dst_mac),
        ethertype,
    }
    .emit(&mut eth);
    let caps = match checksum {
        TxChecksum::Full => ChecksumCapabilities::default(),
        // Zeroed by smoltcp; the engine fills them in.
        TxChecksum::Offloaded => {
            let mut caps = ChecksumCapabilities::default();
            caps.ipv4 = smoltcp::phy::Checksum::Rx;
            caps.tcp = smoltcp::phy::Checksum::Rx;
            caps
        }
    };
    let ip_bytes = eth.payload_mut();
    match (src_ip, dst_ip) {
        (IpAddr::V4(src_addr), IpAddr::V4(dst_addr)) => Ipv4Repr {
            src_addr,
            dst_addr,
            next_header: IpProtocol::Tcp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        }
        .emit(&mut Ipv4Packet::new_unchecked(&mut *ip_bytes), &caps),
        (IpAddr::V6(src_addr), IpAddr::V6(dst_addr)) => Ipv6Repr {
            src_addr,
            dst_addr,
            next_header: IpProtocol::Tcp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut *ip_bytes)),
        _ => return 0,
    }
    let mut tcp = TcpPacket::new_unchecked(&mut ip_bytes[ip_header_len..]);
    repr.emit(
        &mut tcp,
        &IpAddress::from(src_ip),
        &IpAddress::from(dst_ip),
        &caps,
    );
    if checksum == TxChecksum::Offloaded {
        tcp.set_checksum(pseudo_header_sum(src_ip, dst_ip, repr.buffer_len()));
    }
    total
}

#[cfg(test)]
mod tests;
