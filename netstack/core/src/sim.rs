//! A deterministic simulated network: two stacks joined by a link with propagation delay, a
//! rate-limited bottleneck queue, random loss, duplication and reordering, all driven by a
//! seeded PRNG and simulated time. Used by the tests, the goodput tables and the fuzz targets.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use crate::phy::{Device, DeviceCapabilities, RxMeta};
use crate::stack::{Ipv6Config, Stack, StackConfig};
use crate::time::Instant;

/// SplitMix64: tiny, fast and good enough for impairment decisions.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform value in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// Impairments of one direction of the link.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Bottleneck rate in bits per second; 0 means unlimited.
    pub rate_bps: u64,
    /// Bottleneck queue in bytes; frames arriving to a fuller queue are dropped.
    pub queue_bytes: usize,
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Probability that a frame is delivered twice.
    pub duplicate: f64,
    /// Probability that a frame is held back by `reorder_delay`.
    pub reorder: f64,
    /// Extra delay of reordered frames.
    pub reorder_delay: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(1),
            rate_bps: 0,
            queue_bytes: 1 << 20,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(2),
        }
    }
}

#[derive(Debug)]
struct Link {
    config: LinkConfig,
    busy_until: Instant,
    in_flight: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    counter: u64,
    dropped: u64,
}

impl Link {
    fn new(config: LinkConfig) -> Self {
        Self {
            config,
            busy_until: Instant::ZERO,
            in_flight: BinaryHeap::new(),
            counter: 0,
            dropped: 0,
        }
    }

    fn send(&mut self, now: Instant, frame: Vec<u8>, rng: &mut SimRng) {
        if rng.chance(self.config.loss) {
            self.dropped += 1;
            return;
        }
        let mut arrive = now;
        if self.config.rate_bps > 0 {
            let start = self.busy_until.max(now);
            let backlog = start.saturating_duration_since(now).as_secs_f64();
            let queued = backlog * self.config.rate_bps as f64 / 8.0;
            if queued > self.config.queue_bytes as f64 {
                self.dropped += 1;
                return;
            }
            let serialization =
                Duration::from_secs_f64(frame.len() as f64 * 8.0 / self.config.rate_bps as f64);
            self.busy_until = start + serialization;
            arrive = self.busy_until;
        }
        arrive = arrive + self.config.delay;
        if rng.chance(self.config.reorder) {
            arrive = arrive + self.config.reorder_delay;
        }
        if rng.chance(self.config.duplicate) {
            self.counter += 1;
            self.in_flight
                .push(Reverse((arrive, self.counter, frame.clone())));
        }
        self.counter += 1;
        self.in_flight.push(Reverse((arrive, self.counter, frame)));
    }

    fn next_arrival(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse((at, _, _))| *at)
    }

    fn deliver(&mut self, now: Instant, to: &mut SimDevice) {
        while let Some(Reverse((at, _, _))) = self.in_flight.peek() {
            if *at > now {
                break;
            }
            if let Some(Reverse((_, _, frame))) = self.in_flight.pop() {
                to.rx.push_back(frame);
            }
        }
    }
}

/// An in-memory device: frames to transmit pile up in `tx`, frames to receive wait in `rx`.
#[derive(Debug, Default)]
pub struct SimDevice {
    /// Frames waiting to be received by the stack.
    pub rx: VecDeque<Vec<u8>>,
    /// Frames the stack transmitted.
    pub tx: Vec<Vec<u8>>,
    /// Stamped on received frames as `RxMeta::received_at`.
    pub receive_time: Option<Instant>,
    /// Advertise transmit checksum offload (the frames in `tx` are then left unfinished).
    pub tx_checksum_offload: bool,
    /// Behave as a NIC with TCP segmentation offload up to this frame size: checksums are
    /// completed and frames longer than the MTU are cut into segments before they reach `tx`.
    pub tso_max_frame: Option<usize>,
    /// Frames longer than the MTU the stack handed over (and this device cut).
    pub tso_frames: u64,
}

impl SimDevice {
    /// What the NIC does with a sent frame: complete the TCP checksums and, for a frame
    /// longer than the MTU, cut its TCP payload into `segment_size` pieces.
    fn offload(&mut self, frame: Vec<u8>, segment_size: usize) {
        let mtu_frame = DeviceCapabilities::default().mtu + 14;
        if frame.len() <= mtu_frame {
            self.tx.push(finish_tcp_checksums(frame));
            return;
        }
        self.tso_frames += 1;
        let ip_len = match frame[14] >> 4 {
            4 => usize::from(frame[14] & 0x0f) * 4,
            _ => 40,
        };
        let tcp_at = 14 + ip_len;
        let headers = tcp_at + usize::from(frame[tcp_at + 12] >> 4) * 4;
        let payload = &frame[headers..];
        let seq = u32::from_be_bytes(frame[tcp_at + 4..tcp_at + 8].try_into().unwrap());
        let chunks = payload.chunks(segment_size).count();
        for (i, chunk) in payload.chunks(segment_size).enumerate() {
            let mut piece = frame[..headers].to_vec();
            piece.extend_from_slice(chunk);
            let offset = (i * segment_size) as u32;
            piece[tcp_at + 4..tcp_at + 8].copy_from_slice(&seq.wrapping_add(offset).to_be_bytes());
            if i + 1 < chunks {
                piece[tcp_at + 13] &= !0x09; // FIN and PSH only on the last piece
            }
            let ip_payload = (piece.len() - 14 - ip_len) as u16;
            if ip_len == 40 {
                piece[18..20].copy_from_slice(&ip_payload.to_be_bytes());
            } else {
                piece[16..18].copy_from_slice(&(ip_payload + ip_len as u16).to_be_bytes());
            }
            self.tx.push(finish_tcp_checksums(piece));
        }
    }
}

/// Fills in an IPv4 header checksum and a TCP checksum, as a NIC's offload does.
fn finish_tcp_checksums(mut frame: Vec<u8>) -> Vec<u8> {
    use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpAddress, Ipv4Packet, Ipv6Packet};
    use smoltcp::wire::{IpProtocol, TcpPacket};
    let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
            if ip.next_header() != IpProtocol::Tcp {
                return frame;
            }
            ip.fill_checksum();
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let header = usize::from(ip.header_len());
            let mut tcp = TcpPacket::new_unchecked(&mut ip.into_inner()[header..]);
            tcp.fill_checksum(&IpAddress::Ipv4(src), &IpAddress::Ipv4(dst));
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_unchecked(eth.payload_mut());
            if ip.next_header() != IpProtocol::Tcp {
                return frame;
            }
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let mut tcp = TcpPacket::new_unchecked(&mut ip.into_inner()[40..]);
            tcp.fill_checksum(&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst));
        }
        _ => {}
    }
    frame
}

impl Device for SimDevice {
    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities {
            tx_checksum_offload: self.tx_checksum_offload || self.tso_max_frame.is_some(),
            tso_max_frame: self.tso_max_frame,
            ..DeviceCapabilities::default()
        }
    }

    fn transmit_segmented(
        &mut self,
        max_len: usize,
        segment_size: usize,
        f: impl FnOnce(&mut [u8]) -> usize,
    ) -> Option<usize> {
        let mut buf = vec![0u8; max_len];
        let len = f(&mut buf).min(max_len);
        if len > 0 {
            buf.truncate(len);
            self.offload(buf, segment_size);
        }
        Some(len)
    }

    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        let frame = self.rx.pop_front()?;
        let meta = RxMeta {
            received_at: self.receive_time,
            ..RxMeta::default()
        };
        Some(f(&frame, meta))
    }

    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        let mut buf = vec![0u8; max_len];
        let len = f(&mut buf).min(max_len);
        if len > 0 {
            buf.truncate(len);
            match self.tso_max_frame {
                Some(_) => self.tx.push(finish_tcp_checksums(buf)),
                None => self.tx.push(buf),
            }
        }
        Some(len)
    }
}

/// Host stalls of stack `a`: every `every`, its host reads the clock, is descheduled for
/// `length` (as a real-time task throttled by the kernel, or any task on a busy machine), and
/// only then polls the stack with the time it read before the stall, while the frames that
/// arrived meanwhile wait in its ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostStall {
    /// Time between the starts of two stalls.
    pub every: Duration,
    /// How long the host is away.
    pub length: Duration,
    /// Whether the host stamps each frame with the time it takes it from the ring
    /// (`RxMeta::received_at`), as `stackroute-netperf` does.
    pub stamp_receive_time: bool,
}

/// Two stacks, `a` (10.0.0.1) and `b` (10.0.0.2), on one simulated link.
#[derive(Debug)]
pub struct Network {
    /// The first stack.
    pub a: Stack,
    /// The second stack.
    pub b: Stack,
    dev_a: SimDevice,
    dev_b: SimDevice,
    a_to_b: Link,
    b_to_a: Link,
    rng: SimRng,
    now: Instant,
    stall: Option<HostStall>,
    next_stall: Instant,
    /// (the time the stalled host read, when it resumes)
    stalled: Option<(Instant, Instant)>,
}

/// Address of stack `a`.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// Address of stack `b`.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// IPv6 address of stack `a` (fd00::1/64; both stacks are dual-stack).
pub const ADDR6_A: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// IPv6 address of stack `b`.
pub const ADDR6_B: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

impl Network {
    /// A network whose stacks use `configure` on their default configs.
    pub fn new(
        seed: u64,
        a_to_b: LinkConfig,
        b_to_a: LinkConfig,
        configure: impl Fn(&mut StackConfig),
    ) -> Self {
        let mut config_a = StackConfig::new([2, 0, 0, 0, 0, 1], ADDR_A, 24, [0xa5; 16]);
        let mut config_b = StackConfig::new([2, 0, 0, 0, 0, 2], ADDR_B, 24, [0x5a; 16]);
        config_a.ipv6 = Some(Ipv6Config::new(ADDR6_A, 64));
        config_b.ipv6 = Some(Ipv6Config::new(ADDR6_B, 64));
        configure(&mut config_a);
        configure(&mut config_b);
        Self {
            a: Stack::new(config_a),
            b: Stack::new(config_b),
            dev_a: SimDevice::default(),
            dev_b: SimDevice::default(),
            a_to_b: Link::new(a_to_b),
            b_to_a: Link::new(b_to_a),
            rng: SimRng::new(seed),
            // Start away from zero so "time since" arithmetic is exercised honestly.
            now: Instant::from_millis(1_000),
            stall: None,
            next_stall: Instant::ZERO,
            stalled: None,
        }
    }

    /// Makes stack `a`'s host stall periodically (see [`HostStall`]); the first stall starts
    /// one period from now.
    pub fn set_host_stall(&mut self, stall: Option<HostStall>) {
        self.stall = stall;
        self.next_stall = self.now + stall.map_or(Duration::ZERO, |s| s.every);
        self.stalled = None;
    }

    /// Simulated time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Frames dropped by the links (random loss plus queue overflow).
    pub fn dropped_frames(&self) -> u64 {
        self.a_to_b.dropped + self.b_to_a.dropped
    }

    /// Gives both hosts a NIC with segmentation offload up to `max_frame` (see
    /// [`SimDevice::tso_max_frame`]), or none.
    pub fn set_tso(&mut self, max_frame: Option<usize>) {
        self.dev_a.tso_max_frame = max_frame;
        self.dev_b.tso_max_frame = max_frame;
    }

    /// Frames longer than the MTU the stacks handed to their NICs (cut into segments there).
    pub fn tso_frames(&self) -> u64 {
        self.dev_a.tso_frames + self.dev_b.tso_frames
    }

    /// Changes the impairments of both directions.
    pub fn set_links(&mut self, a_to_b: LinkConfig, b_to_a: LinkConfig) {
        self.a_to_b.config = a_to_b;
        self.b_to_a.config = b_to_a;
    }

    /// Polls both stacks, moves frames onto the links and advances time to the next event,
    /// never past `limit`. Returns false when nothing is scheduled before `limit`.
    pub fn step(&mut self, limit: Instant) -> bool {
        let now = self.now;
        if let Some(stall) = self.stall
            && self.stalled.is_none()
            && now >= self.next_stall
        {
            self.stalled = Some((now, now + stall.length));
            self.next_stall = now + stall.every;
        }
        match self.stalled {
            Some((_, resume)) if now < resume => {}
            Some((read, _)) => {
                // Back from the stall: poll with the clock value read before it.
                self.stalled = None;
                let stamp = self.stall.is_some_and(|s| s.stamp_receive_time);
                self.dev_a.receive_time = stamp.then_some(now);
                self.a.poll(read, &mut self.dev_a);
                self.dev_a.receive_time = None;
            }
            None => {
                self.a.poll(now, &mut self.dev_a);
            }
        }
        self.b.poll(now, &mut self.dev_b);
        for frame in self.dev_a.tx.drain(..) {
            self.a_to_b.send(now, frame, &mut self.rng);
        }
        for frame in self.dev_b.tx.drain(..) {
            self.b_to_a.send(now, frame, &mut self.rng);
        }
        let mut next = None;
        let a_due = match self.stalled {
            Some((_, resume)) => Some(resume),
            None => self.a.poll_at(),
        };
        for candidate in [
            a_due,
            self.b.poll_at(),
            self.a_to_b.next_arrival(),
            self.b_to_a.next_arrival(),
        ]
        .into_iter()
        .flatten()
        {
            next = Some(next.map_or(candidate, |n: Instant| n.min(candidate)));
        }
        let Some(next) = next.filter(|n| *n <= limit) else {
            // Idle until `limit`: callers decide whether to jump there.
            return false;
        };
        // Time always moves forward by at least 1 µs so a busy stack cannot stall the clock.
        self.now = next.max(now + Duration::from_micros(1));
        self.a_to_b.deliver(self.now, &mut self.dev_b);
        self.b_to_a.deliver(self.now, &mut self.dev_a);
        true
    }

    /// Runs until `done` holds or `limit` passes; returns whether `done` held.
    pub fn run_until(&mut self, limit: Instant, mut done: impl FnMut(&mut Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if !self.step(limit) {
                if done(self) {
                    return true;
                }
                self.now = self.now.max(limit);
                return false;
            }
        }
    }

    /// Runs for `duration` of simulated time.
    pub fn run_for(&mut self, duration: Duration) {
        let limit = self.now + duration;
        while self.step(limit) {}
        self.now = self.now.max(limit);
    }
}
