//! The host loop of the stackroute netstack: it owns the clock and the packet engine and drives
//! the sans-IO [`Stack`] — `stackroute-netperf` and `stackroute-stackd` run on it.
//!
//! - [`open_engine`] opens AF_PACKET, AF_XDP, DPDK or TAP and tells the MAC the stack should
//!   use; [`open_first`] tries engines in order and says why each earlier one was unavailable;
//! - [`Host`] holds the stack and the engine: [`Host::poll`] runs one `Stack::poll` with every
//!   received frame stamped with the time it left the ring ([`Stamped`]); [`Host::turn`]
//!   polls, then busy-polls or sleeps until the next timer or frame; [`Host::wait_plan`] is
//!   that decision alone, for callers that wait in their own event loop (mio, epoll);
//! - [`SharedAddress`] keeps the stack to a port range when it shares the kernel's address.

#![forbid(unsafe_code)]

mod shared;

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;
use std::time::{Duration, Instant as StdInstant};

pub use shared::SharedAddress;
use stackroute_netstack::{
    Device, DeviceCapabilities, Instant, RxMeta, SocketError, SocketHandle, Stack, TcpConfig,
    TcpError, TcpState,
};
use stackroute_pktio::{AfPacket, AfXdp, AnyDevice, Dpdk, DpdkConfig, RingConfig, Tap};

/// Which packet engine to open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EngineKind {
    /// AF_PACKET with TPACKET_V2 rings.
    AfPacket,
    /// AF_XDP in copy mode; its XDP program steers frames for this IPv4 address (and ARP).
    AfXdp(Ipv4Addr),
    /// A TAP interface (created if missing).
    Tap,
    /// A DPDK port (the interface name is not used: EAL's arguments name the device).
    Dpdk(DpdkConfig),
}

impl EngineKind {
    /// The engine's name, as reports and logs say it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AfPacket => "af_packet",
            Self::AfXdp(_) => "af_xdp",
            Self::Tap => "tap",
            Self::Dpdk(_) => "dpdk",
        }
    }
}

/// An engine opened by [`open_first`].
#[derive(Debug)]
pub struct Opened {
    /// The engine.
    pub device: AnyDevice,
    /// The MAC the stack should use.
    pub mac: [u8; 6],
    /// The engines tried before it, each with why it could not be opened.
    pub fallbacks: Vec<(&'static str, io::Error)>,
}

/// Opens the first of `kinds` that opens on `interface`; each failure before it is logged on
/// stderr and kept in [`Opened::fallbacks`]. Fails with every reason when none opens.
pub fn open_first(kinds: &[EngineKind], interface: &str) -> io::Result<Opened> {
    let mut fallbacks: Vec<(&'static str, io::Error)> = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        match open_engine(kind.clone(), interface) {
            Ok((device, mac)) => {
                return Ok(Opened {
                    device,
                    mac,
                    fallbacks,
                });
            }
            Err(e) => {
                if let Some(next) = kinds.get(i + 1) {
                    eprintln!("{} unavailable: {e}; trying {}", kind.name(), next.name());
                }
                fallbacks.push((kind.name(), e));
            }
        }
    }
    let reasons: Vec<String> = fallbacks
        .iter()
        .map(|(name, e)| format!("{name}: {e}"))
        .collect();
    let kind = fallbacks
        .last()
        .map_or(io::ErrorKind::InvalidInput, |(_, e)| e.kind());
    Err(io::Error::new(
        kind,
        if reasons.is_empty() {
            "no packet engine given".to_string()
        } else {
            reasons.join("; ")
        },
    ))
}

/// Opens an engine on `interface`; returns it with the MAC the stack should use (the
/// interface's own, or for a TAP, one derived from it: a TAP's own MAC is the kernel side's).
pub fn open_engine(kind: EngineKind, interface: &str) -> io::Result<(AnyDevice, [u8; 6])> {
    let context = |e: io::Error, what: &str| io::Error::new(e.kind(), format!("{what}: {e}"));
    Ok(match kind {
        EngineKind::AfPacket => {
            let dev = AfPacket::open(interface, RingConfig::default()).map_err(|e| {
                context(e, &format!("opening AF_PACKET on {interface} (needs root)"))
            })?;
            let mac = dev.mac();
            (AnyDevice::AfPacket(dev), mac)
        }
        EngineKind::AfXdp(address) => {
            let dev = AfXdp::open(interface, address)
                .map_err(|e| context(e, &format!("opening AF_XDP on {interface} (needs root)")))?;
            let mac = dev.mac();
            (AnyDevice::AfXdp(Box::new(dev)), mac)
        }
        EngineKind::Tap => {
            let dev = Tap::open(interface)
                .map_err(|e| context(e, &format!("opening TAP {interface}")))?;
            let mut mac = stackroute_pktio::interface::mac(interface)?;
            mac[5] ^= 0x01;
            mac[0] = (mac[0] | 0x02) & 0xfe;
            (AnyDevice::Tap(dev), mac)
        }
        EngineKind::Dpdk(config) => {
            let dev = Dpdk::open(&config).map_err(|e| context(e, "opening DPDK"))?;
            let mac = dev.mac();
            (AnyDevice::Dpdk(Box::new(dev)), mac)
        }
    })
}

/// 16 bytes from `/dev/urandom`, for `StackConfig::isn_secret`.
pub fn random_secret() -> io::Result<[u8; 16]> {
    let mut secret = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .map_err(|e| io::Error::new(e.kind(), format!("reading /dev/urandom: {e}")))?;
    Ok(secret)
}

/// Microseconds since `epoch`: the clock the host passes to the stack.
pub fn elapsed_instant(epoch: StdInstant) -> Instant {
    Instant::from_micros(epoch.elapsed().as_micros() as u64)
}

/// The engine as the stack sees it: each received frame carries the time the host took it out
/// of the ring (`RxMeta::received_at`), read once the frame is there. The `now` a poll starts
/// with can be tens of milliseconds old by the time the ring is read (under `chrt -f` the
/// kernel throttles a busy real-time task for 50 ms once a second; on a loaded 2-core machine
/// any task can be descheduled), and ACKs processed at that stale time gave BBR RTT samples of
/// 12 µs to 18 ms on a 30 ms path. With a [`SharedAddress`], frames that belong to the kernel
/// are skipped before the stack sees them.
pub struct Stamped<'a, D> {
    /// The engine.
    pub device: &'a mut D,
    /// The clock's origin.
    pub epoch: StdInstant,
    /// Frames outside the stack's share are not passed up.
    pub shared: Option<&'a SharedAddress>,
}

impl<D: Device> Device for Stamped<'_, D> {
    fn capabilities(&self) -> DeviceCapabilities {
        self.device.capabilities()
    }

    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        let epoch = self.epoch;
        let Some(shared) = self.shared else {
            return self.device.receive(|frame, mut meta| {
                meta.received_at = Some(elapsed_instant(epoch));
                f(frame, meta)
            });
        };
        // Skipped frames are consumed; keep reading until one is ours or the ring is empty.
        let mut f = Some(f);
        loop {
            let outcome = self.device.receive(|frame, mut meta| {
                if !shared.is_for_stack(frame) {
                    return None;
                }
                meta.received_at = Some(elapsed_instant(epoch));
                f.take().map(|f| f(frame, meta))
            })?;
            if outcome.is_some() {
                return outcome;
            }
        }
    }

    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        self.device.transmit(max_len, f)
    }

    fn transmit_segmented(
        &mut self,
        max_len: usize,
        segment_size: usize,
        f: impl FnOnce(&mut [u8]) -> usize,
    ) -> Option<usize> {
        self.device.transmit_segmented(max_len, segment_size, f)
    }

    fn flush(&mut self) {
        self.device.flush();
    }
}

/// Busy polling after activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusyPoll {
    /// How long to keep polling without sleeping after the last activity (zero: never).
    pub window: Duration,
    /// `sched_yield()` between empty polls instead of spinning.
    pub yield_between: bool,
}

impl BusyPoll {
    /// 200 µs with `sched_yield()`: see [`Host::turn`].
    pub const DEFAULT: Self = Self {
        window: Duration::from_micros(200),
        yield_between: true,
    };
    /// Always sleep when idle.
    pub const OFF: Self = Self {
        window: Duration::ZERO,
        yield_between: true,
    };
}

/// What the loop should do after a poll that found nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Poll again at once (a timer is due, or there was activity).
    Now,
    /// Inside the busy-poll window: give the CPU away briefly (`sched_yield`), then poll.
    Yield,
    /// Inside the busy-poll window: spin once, then poll.
    Spin,
    /// Sleep until a frame arrives (or another descriptor is ready), at most this long.
    Sleep(Duration),
}

/// The stack, its engine and its clock.
pub struct Host<D = AnyDevice> {
    /// The stack.
    pub stack: Stack,
    /// The engine.
    pub device: D,
    /// Frames for the kernel's ports on a shared address are skipped.
    pub shared: Option<SharedAddress>,
    epoch: StdInstant,
    busy_poll: BusyPoll,
    last_activity: StdInstant,
    /// The longest sleep, so a caller's own deadlines are checked now and then.
    pub max_sleep: Duration,
}

/// Why [`Host::connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The stack refused to start the connection.
    Socket(SocketError),
    /// The handshake failed.
    Failed(Option<TcpError>),
    /// `deadline` passed first.
    TimedOut,
    /// Waiting for the engine failed.
    Io(io::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(e) => write!(f, "connect: {e}"),
            Self::Failed(Some(e)) => write!(f, "connect failed: {e}"),
            Self::Failed(None) => f.write_str("connect failed"),
            Self::TimedOut => f.write_str("timed out"),
            Self::Io(e) => write!(f, "waiting for the engine: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

impl<D: Device + HasFd> Host<D> {
    /// A host for `stack` over `device`; the clock starts now.
    pub fn new(stack: Stack, device: D, busy_poll: BusyPoll) -> Self {
        let now = StdInstant::now();
        Self {
            stack,
            device,
            shared: None,
            epoch: now,
            busy_poll,
            last_activity: now,
            max_sleep: Duration::from_millis(50),
        }
    }

    /// The stack's clock now.
    pub fn now(&self) -> Instant {
        elapsed_instant(self.epoch)
    }

    /// One `Stack::poll` with receive times stamped on every frame. Returns true if anything
    /// was received or sent (and restarts the busy-poll window then).
    pub fn poll(&mut self, now: Instant) -> bool {
        let mut device = Stamped {
            device: &mut self.device,
            epoch: self.epoch,
            shared: self.shared.as_ref(),
        };
        let active = self.stack.poll(now, &mut device);
        if active {
            self.last_activity = StdInstant::now();
        }
        active
    }

    /// Restarts the busy-poll window: the caller did work (for example moved bytes between the
    /// stack and its application), so more is likely to follow soon.
    pub fn note_activity(&mut self) {
        self.last_activity = StdInstant::now();
    }

    /// What to do after a poll at `now` that found nothing: poll again, busy-poll, or sleep
    /// until the next timer. See [`Host::turn`] for why busy polling yields.
    pub fn wait_plan(&self, now: Instant) -> Wait {
        if self.last_activity.elapsed() < self.busy_poll.window {
            return if self.busy_poll.yield_between {
                Wait::Yield
            } else {
                Wait::Spin
            };
        }
        match self.stack.poll_at() {
            Some(at) if at <= now => Wait::Now,
            Some(at) => Wait::Sleep(at.saturating_duration_since(now).min(self.max_sleep)),
            None => Wait::Sleep(self.max_sleep),
        }
    }

    /// Runs the stack once, then sleeps until the next timer or a received frame. Right after
    /// activity it busy-polls for the busy-poll window instead of sleeping, as user-space
    /// stacks do: a sleep/wake-up round trip through the scheduler costs tens of microseconds
    /// of latency. Between empty polls it calls `sched_yield()` (unless `yield_between` is
    /// off): on a 2-core machine the peer or ksoftirqd is often woken on this CPU, and a plain
    /// spin kept it waiting until the window ran out, so the request/response p99 was the
    /// window plus the round trip (214–233 µs at 200 µs; 22–50 µs with the yield, median
    /// unchanged).
    pub fn turn(&mut self) -> io::Result<()> {
        self.turn_with(&[]).map(|_| ())
    }

    /// [`Host::turn`] that also wakes when any of `extra_fds` becomes readable; returns
    /// whether the sleep ended because a descriptor was readable.
    pub fn turn_with(&mut self, extra_fds: &[RawFd]) -> io::Result<bool> {
        let now = self.now();
        if self.poll(now) {
            return Ok(false);
        }
        match self.wait_plan(now) {
            Wait::Now => Ok(false),
            Wait::Yield => {
                std::thread::yield_now();
                Ok(false)
            }
            Wait::Spin => {
                std::hint::spin_loop();
                Ok(false)
            }
            Wait::Sleep(timeout) => {
                let timeout = self
                    .device
                    .max_idle()
                    .map_or(timeout, |idle| timeout.min(idle));
                let mut fds = Vec::with_capacity(1 + extra_fds.len());
                fds.extend(self.device.wait_fd());
                fds.extend_from_slice(extra_fds);
                stackroute_pktio::wait_any_readable(&fds, Some(timeout))
            }
        }
    }

    /// Keeps the stack running for `duration` so final ACKs and FINs leave.
    pub fn linger(&mut self, duration: Duration) -> io::Result<()> {
        let until = StdInstant::now() + duration;
        while StdInstant::now() < until {
            self.turn()?;
        }
        Ok(())
    }

    /// Connects to `remote` and runs the stack until the handshake completes, fails or
    /// `deadline` passes.
    pub fn connect(
        &mut self,
        remote: SocketAddr,
        tcp: TcpConfig,
        deadline: StdInstant,
    ) -> Result<SocketHandle, ConnectError> {
        let now = self.now();
        let handle = self
            .stack
            .connect_with(now, remote, tcp)
            .map_err(ConnectError::Socket)?;
        loop {
            if StdInstant::now() >= deadline {
                let _ = self.stack.abort(handle);
                return Err(ConnectError::TimedOut);
            }
            match self.stack.state(handle).map_err(ConnectError::Socket)? {
                TcpState::SynSent | TcpState::SynReceived => {
                    self.turn().map_err(ConnectError::Io)?;
                }
                TcpState::Closed => {
                    let error = self.stack.error(handle).ok().flatten();
                    let _ = self.stack.close(handle);
                    return Err(ConnectError::Failed(error));
                }
                _ => return Ok(handle),
            }
        }
    }
}

/// How the host waits for an engine's frames.
pub trait HasFd {
    /// The descriptor that becomes readable when frames arrive; `None`: poll the engine.
    fn wait_fd(&self) -> Option<RawFd>;

    /// The longest sleep between polls of an engine without a descriptor.
    fn max_idle(&self) -> Option<Duration> {
        None
    }
}

impl HasFd for AnyDevice {
    fn wait_fd(&self) -> Option<RawFd> {
        Self::wait_fd(self)
    }

    fn max_idle(&self) -> Option<Duration> {
        Self::max_idle(self)
    }
}

impl HasFd for AfPacket {
    fn wait_fd(&self) -> Option<RawFd> {
        Some(self.raw_fd())
    }
}
