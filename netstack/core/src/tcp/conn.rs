//! One TCP connection: RFC 9293 state machine, RFC 7323 options, SACK scoreboard with RACK-TLP
//! loss detection, RFC 6298 timers, delivery-rate sampling and pacing.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use smoltcp::wire::{TcpControl, TcpRepr, TcpSeqNumber, TcpTimestampRepr};

use super::reassembly::Reassembly;
use super::rtt::RttEstimator;
use super::{TcpConfig, TcpError};
use crate::congestion::{AckEvent, CongestionControl, Controller, RateSample};
use crate::seq::Seq;
use crate::time::{Instant, earliest};

/// RFC 9293 connection states (LISTEN lives in the stack's listener table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// No connection (initial, or after an abort or the final ACK).
    Closed,
    /// Active open: SYN sent.
    SynSent,
    /// SYN received and SYN-ACK sent.
    SynReceived,
    /// Data flows both ways.
    Established,
    /// We closed; our FIN is not yet acknowledged.
    FinWait1,
    /// We closed and our FIN is acknowledged; waiting for the peer's FIN.
    FinWait2,
    /// The peer closed; we may still send.
    CloseWait,
    /// Both closed at once (simultaneous close); waiting for the ACK of our FIN.
    Closing,
    /// The peer closed, then we did; waiting for the ACK of our FIN.
    LastAck,
    /// Both FINs acknowledged; lingering 2·MSL for stray segments.
    TimeWait,
}

/// Counters for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectionStats {
    /// Bytes the application handed to the connection.
    pub bytes_written: u64,
    /// Bytes acknowledged by the peer.
    pub bytes_acked: u64,
    /// Bytes delivered to the application.
    pub bytes_read: u64,
    /// Data segments sent (first transmissions and retransmissions).
    pub segments_sent: u64,
    /// Segments retransmitted (RACK, dup-ACK, RTO, TLP).
    pub retransmits: u64,
    /// Retransmission timeouts.
    pub rto_count: u64,
    /// Tail-loss probes sent.
    pub tlp_count: u64,
    /// Smoothed RTT in microseconds (0 if unknown).
    pub smoothed_rtt_us: u64,
    /// Minimum RTT seen, in microseconds (0 if unknown).
    pub min_rtt_us: u64,
    /// Current congestion window in bytes.
    pub cwnd: u64,
    /// Pacing rate in bytes per second (0 when not pacing).
    pub pacing_rate: u64,
    /// Bottleneck-bandwidth estimate in bytes per second (BBR only, else 0).
    pub bandwidth_estimate: u64,
    /// Bytes in flight (sent, not acknowledged, not SACKed, not marked lost).
    pub inflight: u64,
    /// The peer's receive window in bytes.
    pub peer_window: u64,
    /// Whether a loss-recovery episode is in progress.
    pub in_recovery: bool,
    /// DSACKs received (RFC 2883): the peer got a segment twice, so one retransmission was
    /// spurious.
    pub dsacks_received: u64,
    /// RACK's current reordering window in microseconds.
    pub reorder_window_us: u64,
}

/// The two ends of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Endpoints {
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
}

/// One transmitted, not yet cumulatively acknowledged run of sequence space.
#[derive(Clone, Debug)]
struct TxSegment {
    start: u64,
    end: u64,
    /// The segment carries our FIN (its last offset).
    fin: bool,
    tx_time: Instant,
    /// Delivery-rate bookkeeping captured at (re)transmission.
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
    app_limited: bool,
    sacked: bool,
    /// Marked lost and waiting for retransmission.
    lost: bool,
    retransmitted: bool,
}

impl TxSegment {
    fn len(&self) -> u64 {
        self.end - self.start
    }

    fn in_pipe(&self) -> bool {
        !self.sacked && !self.lost
    }
}

/// Token-bucket pacer.
#[derive(Clone, Debug)]
struct Pacer {
    tokens: f64,
    updated: Instant,
}

impl Pacer {
    fn burst(rate: u64, mss: u64) -> f64 {
        // One millisecond at the pacing rate, at least two segments, at most 64 KiB: the host
        // loop cannot time sends more finely than that without spinning.
        (rate as f64 / 200.0).clamp(2.0 * mss as f64, 262144.0_f64.max(2.0 * mss as f64))
    }

    fn refill(&mut self, now: Instant, rate: u64, mss: u64) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate as f64).min(Self::burst(rate, mss));
        self.updated = now;
    }

    /// When a send is allowed: now if the bucket is not in debt.
    fn ready_at(&self, rate: u64) -> Instant {
        if self.tokens >= 0.0 || rate == 0 {
            return self.updated;
        }
        let wait = -self.tokens / rate as f64;
        self.updated + Duration::from_secs_f64(wait)
    }
}

/// RACK state (RFC 8985 §6.1).
#[derive(Clone, Debug, Default)]
struct Rack {
    /// Transmit time and end offset of the most recently sent segment that was delivered.
    xmit_ts: Option<Instant>,
    end_seq: u64,
    rtt: Option<Duration>,
    /// Reordering-window adaptation (§6.2 step 4): the window is `min_RTT / 4 × multiplier`;
    /// each round trip with a DSACK (a spurious retransmission, so the window was too small)
    /// raises the multiplier once, and it returns to 1 after 16 recoveries without one.
    reo_wnd_mult: u32,
    reo_wnd_persist: u32,
    /// `snd_nxt` when the multiplier was last raised: one raise per round trip.
    dsack_round: Option<u64>,
}

/// A TCP connection.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) endpoints: Endpoints,
    state: State,
    config: TcpConfig,
    error: Option<TcpError>,

    // --- send side (offsets relative to ISS) ---
    iss: Seq,
    snd_una: u64,
    snd_nxt: u64,
    /// Offset of `send_buf[0]`.
    send_buf_start: u64,
    send_buf: VecDeque<u8>,
    fin_queued: bool,
    segments: VecDeque<TxSegment>,
    pipe: u64,
    sacked_bytes: u64,
    lost_segments: usize,
    snd_wnd: u64,
    snd_wl1: Seq,
    snd_wl2: Seq,
    snd_wscale: u8,
    /// Payload bytes per segment after options.
    mss: u64,
    peer_mss: u64,
    mtu_mss: u64,
    syn_tx_time: Option<Instant>,
    syn_retransmitted: bool,

    // --- receive side (offsets relative to IRS) ---
    irs: Seq,
    rcv_nxt: u64,
    rcv_wscale: u8,
    recv_buf: VecDeque<u8>,
    reassembly: Reassembly,
    /// A duplicate segment's range to report first in the next ACK (RFC 2883 DSACK).
    dsack: Option<(u64, u64)>,
    peer_fin: Option<u64>,
    /// Right edge of the last advertised window; never moved left (RFC 9293 §3.8.6.2.2).
    rcv_adv: u64,
    ack_now: bool,
    unacked_bytes: u64,
    delack_deadline: Option<Instant>,

    // --- options ---
    ts_enabled: bool,
    ts_offset: u32,
    ts_recent: u32,
    sack_enabled: bool,

    // --- timers ---
    rtt: RttEstimator,
    rto_deadline: Option<Instant>,
    rto_backoff: u32,
    tlp_deadline: Option<Instant>,
    tlp_end: Option<u64>,
    tlp_due: bool,
    peer_offered_wscale: bool,
    reorder_deadline: Option<Instant>,
    persist_deadline: Option<Instant>,
    persist_backoff: u32,
    probe_due: bool,
    keepalive_deadline: Option<Instant>,
    keepalive_sent: u32,
    time_wait_deadline: Option<Instant>,
    rst_due: Option<(Seq, Option<Seq>)>,

    // --- congestion control, recovery, rate sampling ---
    cc: Box<dyn Controller>,
    recovery_point: Option<u64>,
    /// The current recovery episode started with a retransmission timeout.
    rto_recovery: bool,
    dup_acks: u32,
    pacer: Pacer,
    rack: Rack,
    delivered: u64,
    delivered_time: Instant,
    first_sent_time: Instant,
    app_limited_until: u64,

    app_closed: bool,
    stats: ConnectionStats,
}

fn seq_number(seq: Seq) -> TcpSeqNumber {
    TcpSeqNumber(seq.0 as i32)
}

fn from_seq_number(seq: TcpSeqNumber) -> Seq {
    Seq(seq.0 as u32)
}

/// Bytes of TCP options on data segments: timestamps take 10, padded to 12.
const TIMESTAMP_OPTION_LEN: u64 = 12;
/// Minimum MSS for IPv4 (RFC 9293 §3.7.1 default when the peer sends none).
const DEFAULT_PEER_MSS: u64 = 536;

impl Connection {
    fn new(
        now: Instant,
        endpoints: Endpoints,
        iss: Seq,
        ts_offset: u32,
        config: TcpConfig,
        mtu_mss: u16,
    ) -> Self {
        let mtu_mss = u64::from(mtu_mss.max(64));
        let cc = config.congestion_control.build(mtu_mss, now);
        let rtt = RttEstimator::new(config.rto_initial, config.rto_min, config.rto_max);
        let rcv_wscale = if config.window_scaling {
            let mut shift = 0u8;
            while shift < 14 && (config.recv_buffer >> shift) > 65535 {
                shift += 1;
            }
            shift
        } else {
            0
        };
        Self {
            endpoints,
            state: State::Closed,
            error: None,
            iss,
            snd_una: 0,
            snd_nxt: 0,
            send_buf_start: 1,
            send_buf: VecDeque::new(),
            fin_queued: false,
            segments: VecDeque::new(),
            pipe: 0,
            sacked_bytes: 0,
            lost_segments: 0,
            snd_wnd: 0,
            snd_wl1: Seq(0),
            snd_wl2: Seq(0),
            snd_wscale: 0,
            mss: mtu_mss,
            peer_mss: DEFAULT_PEER_MSS,
            mtu_mss,
            syn_tx_time: None,
            syn_retransmitted: false,
            irs: Seq(0),
            rcv_nxt: 0,
            rcv_wscale,
            recv_buf: VecDeque::new(),
            reassembly: Reassembly::default(),
            dsack: None,
            peer_fin: None,
            rcv_adv: 0,
            ack_now: false,
            unacked_bytes: 0,
            delack_deadline: None,
            ts_enabled: false,
            ts_offset,
            ts_recent: 0,
            sack_enabled: false,
            rtt,
            rto_deadline: None,
            rto_backoff: 0,
            tlp_deadline: None,
            tlp_end: None,
            tlp_due: false,
            peer_offered_wscale: false,
            reorder_deadline: None,
            persist_deadline: None,
            persist_backoff: 0,
            probe_due: false,
            keepalive_deadline: None,
            keepalive_sent: 0,
            time_wait_deadline: None,
            rst_due: None,
            cc,
            recovery_point: None,
            rto_recovery: false,
            dup_acks: 0,
            pacer: Pacer {
                tokens: 0.0,
                updated: now,
            },
            rack: Rack::default(),
            delivered: 0,
            delivered_time: now,
            first_sent_time: now,
            app_limited_until: 0,
            app_closed: false,
            stats: ConnectionStats::default(),
            config,
        }
    }

    /// Active open: the connection sends a SYN on the next transmit poll.
    pub(crate) fn connect(
        now: Instant,
        endpoints: Endpoints,
        iss: Seq,
        ts_offset: u32,
        config: TcpConfig,
        mtu_mss: u16,
    ) -> Self {
        let mut conn = Self::new(now, endpoints, iss, ts_offset, config, mtu_mss);
        conn.state = State::SynSent;
        conn.pacer.tokens = Pacer::burst(0, conn.mss);
        conn
    }

    /// Passive open from a SYN that reached a listener.
    pub(crate) fn accept(
        now: Instant,
        endpoints: Endpoints,
        iss: Seq,
        ts_offset: u32,
        config: TcpConfig,
        mtu_mss: u16,
        syn: &TcpRepr<'_>,
    ) -> Self {
        let mut conn = Self::new(now, endpoints, iss, ts_offset, config, mtu_mss);
        conn.state = State::SynReceived;
        conn.pacer.tokens = Pacer::burst(0, conn.mss);
        conn.absorb_syn(now, syn);
        conn
    }

    // === impl Connection: application side ===

    /// RFC 6191: whether a SYN for this connection's four-tuple may open a new incarnation
    /// while it sits in TIME-WAIT. It must be impossible to confuse with the old one: a newer
    /// timestamp when both ends used timestamps, else an initial sequence number beyond all the
    /// old connection received (RFC 6528 ISNs grow with time for a given tuple).
    pub(crate) fn time_wait_accepts_syn(&self, seg: &TcpRepr<'_>) -> bool {
        if self.state != State::TimeWait
            || seg.control != TcpControl::Syn
            || seg.ack_number.is_some()
        {
            return false;
        }
        match (self.ts_enabled, seg.timestamp) {
            (true, Some(ts)) => Seq(ts.tsval).gt(Seq(self.ts_recent)),
            _ => from_seq_number(seg.seq_number).gt(self.peer_seq_at(self.rcv_nxt)),
        }
    }

    pub(crate) fn state(&self) -> State {
        self.state
    }

    pub(crate) fn error(&self) -> Option<TcpError> {
        self.error
    }

    pub(crate) fn config(&self) -> &TcpConfig {
        &self.config
    }

    pub(crate) fn set_nodelay(&mut self, nodelay: bool) {
        self.config.nodelay = nodelay;
    }

    pub(crate) fn set_keepalive(&mut self, now: Instant, keepalive: Option<super::Keepalive>) {
        self.config.keepalive = keepalive;
        self.keepalive_sent = 0;
        self.keepalive_deadline = keepalive.map(|k| now + k.idle);
    }

    pub(crate) fn set_send_buffer(&mut self, bytes: usize) {
        self.config.send_buffer = bytes.max(1);
    }

    /// A new receive-buffer size; a larger window is announced at once if it is worth it.
    pub(crate) fn set_recv_buffer(&mut self, bytes: usize) {
        self.config.recv_buffer = bytes.max(1);
        self.maybe_window_update();
    }

    pub(crate) fn set_congestion_control(&mut self, now: Instant, cc: CongestionControl) {
        if cc != self.config.congestion_control {
            self.config.congestion_control = cc;
            self.cc = cc.build(self.mss, now);
        }
    }

    pub(crate) fn stats(&self) -> ConnectionStats {
        let metrics = self.cc.metrics(self.rtt.smoothed());
        ConnectionStats {
            smoothed_rtt_us: self
                .rtt
                .smoothed()
                .map_or(0, |d| d.as_micros().min(u128::from(u64::MAX)) as u64),
            min_rtt_us: self
                .rtt
                .min()
                .map_or(0, |d| d.as_micros().min(u128::from(u64::MAX)) as u64),
            cwnd: self.cc.window(),
            pacing_rate: metrics.pacing_rate.unwrap_or(0),
            bandwidth_estimate: metrics.bandwidth_estimate.unwrap_or(0),
            inflight: self.pipe,
            peer_window: self.snd_wnd,
            in_recovery: self.recovery_point.is_some(),
            reorder_window_us: self.reorder_window().as_micros() as u64,
            ..self.stats
        }
    }

    pub(crate) fn congestion_control_name(&self) -> &'static str {
        self.cc.name()
    }

    fn can_send_state(&self) -> bool {
        matches!(
            self.state,
            State::SynSent | State::SynReceived | State::Established | State::CloseWait
        ) && !self.fin_queued
    }

    /// The application shut down the sending side.
    pub(crate) fn write_closed(&self) -> bool {
        self.fin_queued
    }

    /// Bytes the send buffer can still take.
    pub(crate) fn send_capacity(&self) -> usize {
        if !self.can_send_state() {
            return 0;
        }
        self.config.send_buffer.saturating_sub(self.send_buf.len())
    }

    /// Queues as much of `data` as fits; returns the count queued.
    pub(crate) fn send(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.send_capacity());
        self.send_buf.extend(&data[..n]);
        self.stats.bytes_written += n as u64;
        n
    }

    /// Bytes ready for the application.
    pub(crate) fn recv_available(&self) -> usize {
        self.recv_buf.len()
    }

    /// The peer's FIN has been received and all data before it read.
    pub(crate) fn at_eof(&self) -> bool {
        self.recv_buf.is_empty() && self.peer_fin.is_some_and(|fin| self.rcv_nxt > fin)
    }

    /// Copies received bytes into `buf`.
    pub(crate) fn recv(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.recv_buf.len());
        let (a, b) = self.recv_buf.as_slices();
        let from_a = n.min(a.len());
        buf[..from_a].copy_from_slice(&a[..from_a]);
        buf[from_a..n].copy_from_slice(&b[..n - from_a]);
        self.recv_buf.drain(..n);
        self.stats.bytes_read += n as u64;
        if n > 0 {
            self.maybe_window_update();
        }
        n
    }

    /// Half-close: send a FIN after the queued data.
    pub(crate) fn shutdown_write(&mut self) {
        match self.state {
            State::SynSent if self.app_closed && self.send_buf.is_empty() => self.enter_closed(),
            // The FIN waits for the handshake; the state moves on when it completes.
            State::SynSent | State::SynReceived => self.fin_queued = true,
            State::Established => {
                self.fin_queued = true;
                self.state = State::FinWait1;
            }
            State::CloseWait => {
                self.fin_queued = true;
                self.state = State::LastAck;
            }
            _ => {}
        }
    }

    /// Full close. Unread data makes it an abort (RFC 1122 §4.2.2.13).
    pub(crate) fn close(&mut self) {
        self.app_closed = true;
        if !self.recv_buf.is_empty() {
            self.abort();
            return;
        }
        self.shutdown_write();
    }

    /// Sends a RST and drops the connection.
    pub(crate) fn abort(&mut self) {
        if matches!(
            self.state,
            State::SynReceived
                | State::Established
                | State::FinWait1
                | State::FinWait2
                | State::CloseWait
        ) {
            self.rst_due = Some((self.seq_at(self.snd_nxt), None));
        }
        self.error.get_or_insert(TcpError::Aborted);
        self.enter_closed();
    }

    /// Readiness for the socket layer.
    pub(crate) fn readable(&self) -> bool {
        !self.recv_buf.is_empty() || self.at_eof() || self.error.is_some()
    }

    pub(crate) fn writable(&self) -> bool {
        self.error.is_some()
            || (matches!(self.state, State::Established | State::CloseWait)
                && !self.fin_queued
                && self.send_capacity() > 0)
    }

    /// Closed and nothing left to transmit: the stack may free it.
    pub(crate) fn is_finished(&self) -> bool {
        self.state == State::Closed && self.rst_due.is_none()
    }

    // === impl Connection: sequence helpers ===

    fn seq_at(&self, offset: u64) -> Seq {
        self.iss.add(offset as u32)
    }

    fn peer_seq_at(&self, offset: u64) -> Seq {
        self.irs.add(offset as u32)
    }

    /// Maps a peer sequence number to an offset near `rcv_nxt`.
    fn peer_offset(&self, seq: Seq) -> i64 {
        self.rcv_nxt as i64 + i64::from(seq.distance_from(self.peer_seq_at(self.rcv_nxt)))
    }

    /// Maps an acknowledgment number to our offset space near `snd_una`.
    fn ack_offset(&self, ack: Seq) -> i64 {
        self.snd_una as i64 + i64::from(ack.distance_from(self.seq_at(self.snd_una)))
    }

    fn data_end(&self) -> u64 {
        self.send_buf_start + self.send_buf.len() as u64
    }

    fn fin_offset(&self) -> Option<u64> {
        self.fin_queued.then(|| self.data_end())
    }

    fn fin_acked(&self) -> bool {
        self.fin_offset().is_some_and(|fin| self.snd_una > fin)
    }

    fn free_recv_space(&self) -> u64 {
        self.config.recv_buffer.saturating_sub(self.recv_buf.len()) as u64
    }

    // === impl Connection: segment arrival ===

    fn absorb_syn(&mut self, now: Instant, syn: &TcpRepr<'_>) {
        self.irs = from_seq_number(syn.seq_number);
        self.rcv_nxt = 1;
        self.rcv_adv = 1;
        self.peer_mss = syn.max_seg_size.map_or(DEFAULT_PEER_MSS, u64::from).max(64);
        match syn.window_scale {
            Some(shift) if self.config.window_scaling => {
                self.snd_wscale = shift.min(14);
                self.peer_offered_wscale = true;
            }
            _ => {
                // RFC 7323 §2.2: scaling applies only if both sides sent the option.
                self.snd_wscale = 0;
                self.rcv_wscale = 0;
            }
        }
        self.sack_enabled = self.config.sack && syn.sack_permitted;
        if let (true, Some(ts)) = (self.config.timestamps, syn.timestamp) {
            self.ts_enabled = true;
            self.ts_recent = ts.tsval;
        } else {
            self.ts_enabled = false;
        }
        // The window in a SYN is never scaled (RFC 7323 §2.2).
        self.snd_wnd = u64::from(syn.window_len);
        self.snd_wl1 = from_seq_number(syn.seq_number);
        self.update_mss();
        self.keepalive_deadline = self.config.keepalive.map(|k| now + k.idle);
    }

    fn update_mss(&mut self) {
        let options = if self.ts_enabled {
            TIMESTAMP_OPTION_LEN
        } else {
            0
        };
        let mss = self
            .peer_mss
            .min(self.mtu_mss)
            .saturating_sub(options)
            .max(64);
        if mss != self.mss {
            self.mss = mss;
            self.cc.on_mss_change(mss);
        }
    }

    /// ICMP "fragmentation needed" (RFC 1191) for this connection.
    pub(crate) fn on_path_mtu(&mut self, mtu: u16, seq: Seq) {
        // RFC 5927 §4.1: accept only if the quoted sequence number is outstanding.
        let offset = self.ack_offset(seq);
        if offset < self.snd_una as i64 || offset >= self.snd_nxt.max(1) as i64 {
            return;
        }
        // IP and TCP headers; the floor is what every path must carry (RFC 9293 §3.7.1's 576
        // bytes for IPv4, RFC 8200's 1280 for IPv6).
        let (headers, floor) = if self.endpoints.remote.is_ipv6() {
            (60, 1220)
        } else {
            (40, 536)
        };
        let new_mss = u64::from(mtu).saturating_sub(headers).max(floor);
        if new_mss < self.mtu_mss {
            self.mtu_mss = new_mss;
            self.update_mss();
            // Oversized segments in flight are lost; they are split when retransmitted.
            for i in 0..self.segments.len() {
                if self.segments[i].len() > self.mss && !self.segments[i].sacked {
                    self.mark_lost(i);
                }
            }
        }
    }

    /// Processes one incoming segment for this connection.
    pub(crate) fn handle_segment(&mut self, now: Instant, seg: &TcpRepr<'_>) {
        match self.state {
            State::Closed => {}
            State::SynSent => self.handle_syn_sent(now, seg),
            _ => self.handle_synchronized(now, seg),
        }
    }

    fn handle_syn_sent(&mut self, now: Instant, seg: &TcpRepr<'_>) {
        // RFC 9293 §3.10.7.3.
        let mut ack_ok = false;
        if let Some(ack) = seg.ack_number {
            let off = self.ack_offset(from_seq_number(ack));
            if off < 1 || off > self.snd_nxt.max(1) as i64 {
                if seg.control != TcpControl::Rst {
                    self.rst_due = Some((from_seq_number(ack), None));
                }
                return;
            }
            ack_ok = true;
        }
        if seg.control == TcpControl::Rst {
            if ack_ok {
                self.error = Some(TcpError::Refused);
                self.enter_closed();
            }
            return;
        }
        if seg.control != TcpControl::Syn {
            return;
        }
        self.absorb_syn(now, seg);
        if ack_ok {
            self.snd_una = 1;
            self.sample_syn_rtt(now);
            self.state = if self.fin_queued {
                State::FinWait1
            } else {
                State::Established
            };
            self.rto_deadline = None;
            self.rto_backoff = 0;
            self.ack_now = true;
        } else {
            // Simultaneous open: answer with SYN-ACK carrying our original ISS.
            self.state = State::SynReceived;
            self.syn_tx_time = None;
        }
    }

    fn sample_syn_rtt(&mut self, now: Instant) {
        if let (Some(sent), false) = (self.syn_tx_time, self.syn_retransmitted) {
            self.rtt.on_sample(now.saturating_duration_since(sent));
        }
    }

    fn window_from_segment(&self, seg: &TcpRepr<'_>) -> u64 {
        u64::from(seg.window_len) << self.snd_wscale
    }

    fn segment_acceptable(&self, seg: &TcpRepr<'_>, start: i64, len: i64) -> bool {
        // RFC 9293 §3.10.7.4, first check.
        let wnd = self
            .rcv_adv
            .saturating_sub(self.rcv_nxt)
            .max(self.free_recv_space()) as i64;
        let nxt = self.rcv_nxt as i64;
        let in_window = |off: i64| off >= nxt && off < nxt + wnd;
        let _ = seg;
        match (len, wnd) {
            (0, 0) => start == nxt,
            (0, _) => in_window(start),
            (_, 0) => false,
            _ => in_window(start) || in_window(start + len - 1),
        }
    }

    fn handle_synchronized(&mut self, now: Instant, seg: &TcpRepr<'_>) {
        let start = self.peer_offset(from_seq_number(seg.seq_number));
        let seg_len = seg.segment_len() as i64;

        // RFC 7323 §5.3 PAWS: drop old duplicates (RSTs are exempt).
        if self.ts_enabled
            && seg.control != TcpControl::Rst
            && let Some(ts) = seg.timestamp
            && Seq(ts.tsval).lt(Seq(self.ts_recent))
        {
            self.ack_now = true;
            return;
        }

        if !self.segment_acceptable(seg, start, seg_len) {
            if seg.control != TcpControl::Rst {
                self.ack_now = true;
                self.note_duplicate(start, seg.payload.len());
                if self.state == State::TimeWait && seg.control == TcpControl::Fin {
                    self.time_wait_deadline = Some(now + self.config.time_wait);
                }
            }
            // A zero-window probe still carries a valid ACK worth processing.
            if !(seg_len > 0 && start == self.rcv_nxt as i64 && seg.control == TcpControl::None) {
                return;
            }
            if let Some(ack) = seg.ack_number {
                self.process_ack(now, seg, from_seq_number(ack));
            }
            return;
        }

        if seg.control == TcpControl::Rst {
            // RFC 5961 §3.2: reset only on an exact match, challenge otherwise.
            if start == self.rcv_nxt as i64 {
                if self.state == State::SynReceived && self.app_closed {
                    self.enter_closed();
                } else {
                    self.error = Some(TcpError::Reset);
                    self.enter_closed();
                }
            } else {
                self.ack_now = true;
            }
            return;
        }

        if seg.control == TcpControl::Syn {
            if self.state == State::SynReceived && start + 1 == self.rcv_nxt as i64 {
                // Retransmitted SYN: our SYN-ACK was lost, send it again.
                self.syn_tx_time = None;
                return;
            }
            // RFC 5961 §4.2: challenge ACK instead of resetting.
            self.ack_now = true;
            return;
        }

        let Some(ack) = seg.ack_number else { return };
        let ack = from_seq_number(ack);

        if self.state == State::SynReceived {
            let off = self.ack_offset(ack);
            if off < 1 || off > self.snd_nxt.max(1) as i64 {
                self.rst_due = Some((ack, None));
                return;
            }
            self.snd_una = 1;
            self.sample_syn_rtt(now);
            self.rto_deadline = None;
            self.rto_backoff = 0;
            self.state = if self.fin_queued {
                State::FinWait1
            } else {
                State::Established
            };
            self.snd_wnd = self.window_from_segment(seg);
            self.snd_wl1 = from_seq_number(seg.seq_number);
            self.snd_wl2 = ack;
        }

        if self.ts_enabled
            && let Some(ts) = seg.timestamp
            && start <= self.rcv_nxt as i64
        {
            // RFC 7323 §4.3: remember the newest TSval from an in-order segment.
            self.ts_recent = ts.tsval;
        }

        if !self.process_ack(now, seg, ack) {
            return;
        }
        if self.state == State::Closed {
            return;
        }

        self.keepalive_sent = 0;
        if let Some(k) = self.config.keepalive {
            self.keepalive_deadline = Some(now + k.idle);
        }

        if !seg.payload.is_empty()
            && matches!(
                self.state,
                State::Established | State::FinWait1 | State::FinWait2
            )
        {
            self.receive_data(now, start, seg.payload);
        }

        if seg.control == TcpControl::Fin {
            let fin_at = start + seg.payload.len() as i64;
            if fin_at >= self.rcv_nxt as i64 {
                self.peer_fin = Some(fin_at as u64);
            }
            self.ack_now = true;
        }
        self.consume_fin(now);
    }

    fn consume_fin(&mut self, now: Instant) {
        let Some(fin) = self.peer_fin else { return };
        if self.rcv_nxt != fin {
            return;
        }
        self.rcv_nxt += 1;
        self.rcv_adv = self.rcv_adv.max(self.rcv_nxt);
        self.ack_now = true;
        match self.state {
            State::SynReceived | State::Established => self.state = State::CloseWait,
            State::FinWait1 => {
                if self.fin_acked() {
                    self.enter_time_wait(now);
                } else {
                    self.state = State::Closing;
                }
            }
            State::FinWait2 => self.enter_time_wait(now),
            _ => {}
        }
    }

    /// When this connection's port may go to a new active open to the same peer: `after` into
    /// TIME-WAIT, and only if it used timestamps (the new incarnation's are newer, so PAWS at
    /// the peer rejects the old one's stray segments). `None` in any other state.
    pub(crate) fn time_wait_reusable_since(&self, after: Duration) -> Option<Instant> {
        if self.state != State::TimeWait || !self.ts_enabled {
            return None;
        }
        let entered = self.time_wait_deadline? - self.config.time_wait;
        Some(entered + after)
    }

    fn enter_time_wait(&mut self, now: Instant) {
        self.state = State::TimeWait;
        self.time_wait_deadline = Some(now + self.config.time_wait);
        self.rto_deadline = None;
        self.tlp_deadline = None;
        self.persist_deadline = None;
        self.keepalive_deadline = None;
    }

    fn enter_closed(&mut self) {
        self.state = State::Closed;
        self.rto_deadline = None;
        self.tlp_deadline = None;
        self.reorder_deadline = None;
        self.persist_deadline = None;
        self.keepalive_deadline = None;
        self.delack_deadline = None;
        self.time_wait_deadline = None;
        self.ack_now = false;
        self.segments.clear();
        self.pipe = 0;
        self.reassembly.clear();
    }

    /// RFC 2883: data we already had is reported first in the next ACK (a DSACK), so the
    /// sender learns that its retransmission, or the network's copy, was not needed.
    fn note_duplicate(&mut self, start: i64, len: usize) {
        let end = (start + len as i64).min(self.rcv_nxt as i64);
        if self.sack_enabled && len > 0 && start >= 0 && start < end {
            self.dsack = Some((start as u64, end as u64));
            self.ack_now = true;
        }
    }

    fn receive_data(&mut self, now: Instant, start: i64, payload: &[u8]) {
        let nxt = self.rcv_nxt as i64;
        // Window already offered stays offered even if the buffer was made smaller since.
        let window_end = (nxt + self.free_recv_space() as i64).max(self.rcv_adv as i64);
        let mut data = payload;
        let mut at = start;
        if at < nxt {
            self.note_duplicate(start, payload.len());
            let skip = ((nxt - at) as usize).min(data.len());
            data = &data[skip..];
            at = nxt;
        }
        let room = (window_end - at).max(0) as usize;
        data = &data[..data.len().min(room)];
        if data.is_empty() {
            // Entirely duplicate (or beyond the window): tell the sender where we are.
            self.ack_now = true;
            return;
        }
        if at == nxt {
            let had_gap = !self.reassembly.is_empty();
            self.recv_buf.extend(data);
            self.rcv_nxt += data.len() as u64;
            while let Some(run) = self.reassembly.take_at(self.rcv_nxt) {
                self.rcv_nxt += run.len() as u64;
                self.recv_buf.extend(run);
            }
            self.unacked_bytes += data.len() as u64;
            if had_gap || self.unacked_bytes >= 2 * self.mss {
                // RFC 5681 §4.2: ACK at least every second full segment, and at once when a
                // gap is filled.
                self.ack_now = true;
            } else if self.delack_deadline.is_none() {
                self.delack_deadline = Some(now + self.config.delayed_ack);
            }
        } else {
            // RFC 5681 §4.2: out-of-order data is acknowledged immediately (with SACK blocks).
            let end = at as u64 + data.len() as u64;
            if self.sack_enabled && self.reassembly.covers(at as u64, end) {
                // RFC 2883: a duplicate of data held out of order is a DSACK too; the block
                // holding it follows as the second SACK block.
                self.dsack = Some((at as u64, end));
            }
            self.reassembly.insert(at as u64, data);
            self.ack_now = true;
        }
    }

    /// Returns false when the segment must be dropped.
    fn process_ack(&mut self, now: Instant, seg: &TcpRepr<'_>, ack: Seq) -> bool {
        let ack_off = self.ack_offset(ack);
        if ack_off > self.snd_nxt as i64 {
            // Acknowledges something not yet sent (RFC 9293 §3.10.7.4).
            self.ack_now = true;
            return false;
        }
        let ack_off = ack_off.max(0) as u64;
        let window = self.window_from_segment(seg);
        let seg_seq = from_seq_number(seg.seq_number);

        if ack_off < self.snd_una {
            // Old duplicate ACK: ignore its ACK field but keep the segment's data.
            return true;
        }

        // RFC 9293 §3.10.7.4: update the send window only from newer segments.
        let window_changed = window != self.snd_wnd;
        if self.snd_wl1.lt(seg_seq) || (self.snd_wl1 == seg_seq && self.snd_wl2.le(ack)) {
            self.snd_wnd = window;
            self.snd_wl1 = seg_seq;
            self.snd_wl2 = ack;
            if window > 0 {
                self.persist_deadline = None;
                self.persist_backoff = 0;
            }
        }

        let prior_inflight = self.pipe;
        let prior_delivered = self.delivered;
        let mut newest: Option<TxSegment> = None;
        let newly_acked = ack_off > self.snd_una;

        // Cumulative acknowledgment.
        if newly_acked {
            while let Some(front) = self.segments.front() {
                if front.end > ack_off {
                    break;
                }
                let Some(segment) = self.segments.pop_front() else {
                    break;
                };
                self.remove_from_accounting(&segment);
                if !segment.sacked {
                    self.on_delivered(now, &segment, &mut newest);
                }
            }
            if let Some(front) = self.segments.front_mut()
                && front.start < ack_off
            {
                // Partially acknowledged (the peer acked inside a segment).
                let acked = ack_off - front.start;
                if front.in_pipe() {
                    self.pipe -= acked;
                }
                if front.sacked {
                    self.sacked_bytes -= acked;
                }
                front.start = ack_off;
                self.delivered += acked;
            }
            let acked_data_end = ack_off.min(self.data_end());
            if acked_data_end > self.send_buf_start {
                let n = (acked_data_end - self.send_buf_start) as usize;
                self.send_buf.drain(..n.min(self.send_buf.len()));
                self.send_buf_start = acked_data_end;
            }
            self.stats.bytes_acked = self.send_buf_start.saturating_sub(1);
            self.snd_una = ack_off;
            self.rto_backoff = 0;
            self.dup_acks = 0;
            if self.tlp_end.is_some_and(|end| ack_off >= end) {
                self.tlp_end = None;
            }
        }

        // Selective acknowledgments.
        let mut sacked_new = false;
        if self.sack_enabled {
            if is_dsack(
                &seg.sack_ranges,
                |seq| self.ack_offset(Seq(seq)),
                self.snd_una,
            ) {
                self.stats.dsacks_received += 1;
                self.adapt_reorder_window();
            }
            for (left, right) in seg.sack_ranges.iter().flatten() {
                let l = self.ack_offset(Seq(*left));
                let r = self.ack_offset(Seq(*right));
                if l < self.snd_una as i64 || r > self.snd_nxt as i64 || l >= r {
                    continue;
                }
                sacked_new |= self.apply_sack(now, l as u64, r as u64, &mut newest);
            }
        }

        // RFC 5681 §3.2 duplicate ACKs, for peers without SACK.
        let is_dup = !newly_acked
            && seg.payload.is_empty()
            && !window_changed
            && self.snd_una < self.snd_nxt
            && seg.control == TcpControl::None;
        if is_dup && !self.sack_enabled {
            self.dup_acks += 1;
            if self.dup_acks == 3 && !self.segments.is_empty() {
                self.mark_lost(0);
            }
        }

        let rate = newest
            .as_ref()
            .and_then(|p| self.rate_sample(p, prior_delivered));
        let mut rtt_sampled = false;
        if let Some(p) = &newest {
            // Karn's algorithm: never sample a retransmitted segment.
            if !p.retransmitted {
                self.rtt.on_sample(now.saturating_duration_since(p.tx_time));
                rtt_sampled = true;
            }
            self.rack_update(p);
        }

        let lost_before = self.lost_bytes();
        if sacked_new || self.sacked_bytes > 0 || newest.is_some() {
            self.rack_detect_loss(now);
        }
        // NewReno (RFC 6582 §3.2 step 3): a partial ACK in recovery means the next hole is lost.
        if !self.sack_enabled
            && newly_acked
            && self.recovery_point.is_some_and(|point| ack_off < point)
            && let Some(front) = self.segments.front()
            && !front.lost
            && !front.retransmitted
        {
            self.mark_lost(0);
        }
        let newly_lost = self.lost_bytes().saturating_sub(lost_before);
        self.update_recovery(now);

        let delivered_bytes = self.delivered - prior_delivered;
        if delivered_bytes > 0 {
            if self.app_limited_until > 0 && self.delivered > self.app_limited_until {
                self.app_limited_until = 0;
            }
            let event = AckEvent {
                now,
                delivered_bytes,
                total_delivered: self.delivered,
                prior_inflight,
                inflight: self.pipe,
                rtt_sample: if rtt_sampled { self.rtt.latest() } else { None },
                smoothed_rtt: self.rtt.smoothed(),
                min_rtt: self.rtt.min(),
                rate,
                // After an RTO the sender slow-starts (RFC 5681 §3.1); only fast recovery
                // freezes window growth.
                in_recovery: self.recovery_point.is_some() && !self.rto_recovery,
                newly_lost,
            };
            self.cc.on_ack(&event);
        }

        if newly_acked {
            self.restart_timers(now);
            self.after_our_fin_acked(now);
        }
        true
    }

    fn after_our_fin_acked(&mut self, now: Instant) {
        if !self.fin_acked() {
            return;
        }
        match self.state {
            State::FinWait1 => {
                self.state = State::FinWait2;
                self.rto_deadline = None;
            }
            State::Closing => self.enter_time_wait(now),
            State::LastAck => self.enter_closed(),
            _ => {}
        }
    }

    fn restart_timers(&mut self, now: Instant) {
        if self.snd_una < self.snd_nxt {
            // RFC 6298 §5.3: restart the timer on new acknowledgments.
            self.rto_deadline = Some(now + self.rtt.rto_backed_off(self.rto_backoff));
            self.arm_tlp(now);
        } else {
            self.rto_deadline = None;
            self.tlp_deadline = None;
            self.reorder_deadline = None;
        }
    }

    fn lost_bytes(&self) -> u64 {
        if self.lost_segments == 0 {
            return 0;
        }
        self.segments
            .iter()
            .filter(|s| s.lost)
            .map(TxSegment::len)
            .sum()
    }

    fn remove_from_accounting(&mut self, segment: &TxSegment) {
        if segment.in_pipe() {
            self.pipe -= segment.len();
        }
        if segment.sacked {
            self.sacked_bytes -= segment.len();
        }
        if segment.lost {
            self.lost_segments -= 1;
        }
    }

    fn apply_sack(
        &mut self,
        now: Instant,
        left: u64,
        right: u64,
        newest: &mut Option<TxSegment>,
    ) -> bool {
        let mut any = false;
        let first = self.segments.partition_point(|s| s.end <= left);
        for i in first..self.segments.len() {
            let (start, end, sacked) = {
                let s = &self.segments[i];
                (s.start, s.end, s.sacked)
            };
            if start >= right {
                break;
            }
            if sacked || start < left || end > right {
                continue;
            }
            let segment = &mut self.segments[i];
            if segment.in_pipe() {
                self.pipe -= segment.len();
            }
            if segment.lost {
                segment.lost = false;
                self.lost_segments -= 1;
            }
            segment.sacked = true;
            self.sacked_bytes += segment.len();
            let copy = segment.clone();
            self.on_delivered(now, &copy, newest);
            any = true;
        }
        any
    }

    /// Delivery-rate bookkeeping for one newly delivered segment (draft-cheng §3.3).
    fn on_delivered(&mut self, now: Instant, segment: &TxSegment, newest: &mut Option<TxSegment>) {
        self.delivered += segment.len();
        self.delivered_time = now;
        let newer = newest.as_ref().is_none_or(|p| {
            segment.delivered > p.delivered
                || (segment.delivered == p.delivered && segment.tx_time > p.tx_time)
        });
        if newer {
            self.first_sent_time = segment.tx_time;
            *newest = Some(segment.clone());
        }
    }

    fn rate_sample(&self, p: &TxSegment, _prior_delivered: u64) -> Option<RateSample> {
        let send_elapsed = p.tx_time.saturating_duration_since(p.first_sent_time);
        let ack_elapsed = self
            .delivered_time
            .saturating_duration_since(p.delivered_time);
        let interval = send_elapsed.max(ack_elapsed);
        // Intervals shorter than min RTT come from ACK compression and overestimate the rate.
        if interval.is_zero() || self.rtt.min().is_some_and(|m| interval < m) {
            return None;
        }
        Some(RateSample {
            delivered: self.delivered - p.delivered,
            interval,
            prior_delivered: p.delivered,
            is_app_limited: p.app_limited,
        })
    }

    fn rack_update(&mut self, p: &TxSegment) {
        // RFC 8985 §6.2 step 2: ignore retransmissions that may have been spurious (their RTT
        // would be shorter than the minimum).
        let rtt = self.delivered_time.saturating_duration_since(p.tx_time);
        if p.retransmitted && self.rtt.min().is_some_and(|m| rtt < m) {
            return;
        }
        if self
            .rack
            .xmit_ts
            .is_none_or(|t| p.tx_time > t || (p.tx_time == t && p.end > self.rack.end_seq))
        {
            self.rack.xmit_ts = Some(p.tx_time);
            self.rack.end_seq = p.end;
            self.rack.rtt = Some(rtt);
        }
    }

    fn reorder_window(&self) -> Duration {
        // RFC 8985 §6.2 step 4: min_RTT / 4 times the DSACK multiplier, bounded by SRTT.
        let quarter = self.rtt.min().map_or(Duration::ZERO, |m| m / 4);
        let window = quarter * self.rack.reo_wnd_mult.max(1);
        self.rtt.smoothed().map_or(window, |s| window.min(s))
    }

    /// RFC 8985 §6.2 step 4 on a DSACK: widen the reordering window, at most once per round.
    fn adapt_reorder_window(&mut self) {
        if self
            .rack
            .dsack_round
            .is_some_and(|round| self.snd_una >= round)
        {
            self.rack.dsack_round = None;
        }
        if self.rack.dsack_round.is_none() {
            self.rack.dsack_round = Some(self.snd_nxt);
            self.rack.reo_wnd_mult = self.rack.reo_wnd_mult.max(1) + 1;
            self.rack.reo_wnd_persist = 16;
        }
    }

    /// RFC 8985 §6.2 step 5.
    fn rack_detect_loss(&mut self, now: Instant) {
        let (Some(xmit_ts), Some(rack_rtt)) = (self.rack.xmit_ts, self.rack.rtt) else {
            return;
        };
        let reo_wnd = self.reorder_window();
        let mut timeout: Option<Instant> = None;
        for i in 0..self.segments.len() {
            let segment = &self.segments[i];
            if segment.start >= self.rack.end_seq {
                // Sent after the RACK segment: cannot be judged yet.
                break;
            }
            if segment.sacked || segment.lost {
                continue;
            }
            let sent_before = segment.tx_time < xmit_ts
                || (segment.tx_time == xmit_ts && segment.end <= self.rack.end_seq);
            if !sent_before {
                continue;
            }
            let deadline = segment.tx_time + rack_rtt + reo_wnd;
            if deadline <= now {
                self.mark_lost(i);
            } else {
                timeout = earliest(timeout, Some(deadline));
            }
        }
        self.reorder_deadline = timeout;
    }

    fn mark_lost(&mut self, index: usize) {
        let Some(segment) = self.segments.get_mut(index) else {
            return;
        };
        if segment.lost || segment.sacked {
            return;
        }
        segment.lost = true;
        self.pipe -= segment.len();
        self.lost_segments += 1;
    }

    fn update_recovery(&mut self, now: Instant) {
        if let Some(point) = self.recovery_point
            && self.snd_una >= point
        {
            self.recovery_point = None;
            self.rto_recovery = false;
            self.cc.on_recovery_exit(now);
            // RFC 8985 §6.2 step 4: the widened window persists for 16 recoveries.
            self.rack.reo_wnd_persist = self.rack.reo_wnd_persist.saturating_sub(1);
            if self.rack.reo_wnd_persist == 0 {
                self.rack.reo_wnd_mult = 1;
            }
        }
        if self.recovery_point.is_none() && self.lost_segments > 0 {
            // A new loss episode: one congestion response per episode (RFC 6582, RFC 6675).
            self.recovery_point = Some(self.snd_nxt);
            self.cc
                .on_congestion_event(now, self.pipe + self.lost_bytes());
        }
    }

    // === impl Connection: timers ===

    fn arm_tlp(&mut self, now: Instant) {
        // RFC 8985 §7.2: only with SACK, one probe at a time. Unlike RFC 8985 (and like QUIC's
        // PTO, RFC 9002 §6.2) also during fast recovery, but not after an RTO: under random loss
        // a sender is in recovery nearly all the time, and a lost last segment (or a lost tail
        // whose later segments never arrive to let RACK see it) otherwise waits for the RTO,
        // 200 ms or more at the end of every transfer.
        if !self.sack_enabled || self.rto_recovery || self.tlp_end.is_some() {
            self.tlp_deadline = None;
            return;
        }
        let Some(srtt) = self.rtt.smoothed() else {
            self.tlp_deadline = None;
            return;
        };
        let mut pto = srtt * 2;
        if self.pipe <= self.mss {
            // Allow for a delayed ACK of a lone segment (RFC 8985 §7.2: WCDelAckT).
            pto += self.config.delayed_ack.max(Duration::from_millis(40));
        }
        let pto = pto.max(Duration::from_millis(10));
        let deadline = now + pto;
        self.tlp_deadline = Some(match self.rto_deadline {
            Some(rto) => deadline.min(rto),
            None => deadline,
        });
    }

    /// The earliest time `handle_timeout` or `poll_transmit` has work to do.
    pub(crate) fn poll_at(&self) -> Option<Instant> {
        let mut at = None;
        for deadline in [
            self.rto_deadline,
            self.delack_deadline,
            self.tlp_deadline,
            self.reorder_deadline,
            self.persist_deadline,
            self.keepalive_deadline,
            self.time_wait_deadline,
        ] {
            at = earliest(at, deadline);
        }
        if self.has_data_to_send() {
            let rate = self.cc.pacing_rate(self.rtt.smoothed()).unwrap_or(0);
            at = earliest(at, Some(self.pacer.ready_at(rate)));
        }
        at
    }

    /// Something to transmit right away, pacing aside.
    pub(crate) fn wants_transmit(&self) -> bool {
        self.ack_now
            || self.rst_due.is_some()
            || self.probe_due
            || (matches!(self.state, State::SynSent | State::SynReceived)
                && self.syn_tx_time.is_none())
    }

    fn has_data_to_send(&self) -> bool {
        if !self.established_for_data() {
            return false;
        }
        let cwnd_open = self.pipe < self.cc.window().max(self.mss);
        if !cwnd_open {
            return false;
        }
        if self.lost_segments > 0 {
            return true;
        }
        let unsent = self.data_end() > self.snd_nxt;
        let fin_unsent = self.fin_queued && self.snd_nxt <= self.data_end();
        let window_room = self.snd_una + self.snd_wnd > self.snd_nxt;
        (unsent && window_room) || fin_unsent
    }

    fn established_for_data(&self) -> bool {
        self.snd_una >= 1
            && matches!(
                self.state,
                State::Established
                    | State::CloseWait
                    | State::FinWait1
                    | State::Closing
                    | State::LastAck
            )
    }

    /// Fires expired timers.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.time_wait_deadline.is_some_and(|t| t <= now) {
            self.enter_closed();
            return;
        }
        if self.delack_deadline.is_some_and(|t| t <= now) {
            self.delack_deadline = None;
            self.ack_now = true;
        }
        if self.reorder_deadline.is_some_and(|t| t <= now) {
            self.reorder_deadline = None;
            self.rack_detect_loss(now);
            self.update_recovery(now);
        }
        if self.rto_deadline.is_some_and(|t| t <= now) {
            self.on_rto(now);
            if self.state == State::Closed {
                return;
            }
        }
        if self.tlp_deadline.is_some_and(|t| t <= now) {
            self.tlp_deadline = None;
            self.send_tail_loss_probe();
        }
        if self.persist_deadline.is_some_and(|t| t <= now) {
            self.persist_backoff += 1;
            self.persist_deadline =
                Some(now + self.rtt.rto_backed_off(self.persist_backoff.min(10)));
            self.probe_due = true;
        }
        if let (Some(deadline), Some(keepalive)) = (self.keepalive_deadline, self.config.keepalive)
            && deadline <= now
        {
            if self.keepalive_sent >= keepalive.probes {
                self.error = Some(TcpError::TimedOut);
                self.abort_quietly();
                return;
            }
            self.keepalive_sent += 1;
            self.probe_due = true;
            self.keepalive_deadline = Some(now + keepalive.interval);
        }
    }

    fn abort_quietly(&mut self) {
        self.rst_due = Some((self.seq_at(self.snd_nxt), None));
        self.enter_closed();
    }

    fn on_rto(&mut self, now: Instant) {
        self.rto_deadline = None;
        self.rto_backoff += 1;
        self.stats.rto_count += 1;
        if matches!(self.state, State::SynSent | State::SynReceived) && self.snd_una == 0 {
            if self.rto_backoff > self.config.syn_retries {
                self.error = Some(TcpError::TimedOut);
                self.enter_closed();
                return;
            }
            self.syn_tx_time = None;
            self.syn_retransmitted = true;
            return;
        }
        if self.rto_backoff > self.config.max_retransmissions {
            self.error = Some(TcpError::TimedOut);
            self.abort_quietly();
            return;
        }
        // RFC 6298 §5.4–5.6 with RFC 8985 §6.3: everything not SACKed is presumed lost.
        for i in 0..self.segments.len() {
            self.mark_lost(i);
        }
        self.tlp_end = None;
        self.tlp_deadline = None;
        self.cc.on_rto(now);
        self.recovery_point = Some(self.snd_nxt);
        self.rto_recovery = true;
        // Re-arm right away so a lost retransmission is still timed.
        self.rto_deadline = Some(now + self.rtt.rto_backed_off(self.rto_backoff));
    }

    fn send_tail_loss_probe(&mut self) {
        if self.snd_una >= self.snd_nxt || self.rto_recovery {
            return;
        }
        // RFC 8985 §7.3: send new data if possible, otherwise retransmit the last segment.
        self.tlp_end = Some(self.snd_nxt);
        self.stats.tlp_count += 1;
        let new_data = self.data_end() > self.snd_nxt && self.snd_una + self.snd_wnd > self.snd_nxt;
        let _ = new_data;
        // A probe is not a loss signal: it is sent outside the window and never marks loss.
        self.tlp_due = true;
    }

    // === impl Connection: transmission ===

    /// The next segment to send, if any. Payload bytes are written into `payload`; the returned
    /// header's own payload is empty and the caller attaches `payload`.
    /// The payload of one wire segment: what a segmentation-offload engine cuts frames into.
    pub(crate) fn mss(&self) -> u64 {
        self.mss
    }

    /// The next segment to send, if any. `max_payload` above the MSS means the engine cuts
    /// frames into MSS-sized segments (TSO): new data may then go out as several MSS at once,
    /// recorded as one entry per wire segment.
    pub(crate) fn poll_transmit(
        &mut self,
        now: Instant,
        payload: &mut Vec<u8>,
        max_payload: u64,
    ) -> Option<TcpRepr<'static>> {
        payload.clear();
        if let Some((seq, ack)) = self.rst_due.take() {
            let mut repr = self.bare_header(seq, TcpControl::Rst);
            repr.ack_number = ack.map(seq_number);
            return Some(repr);
        }
        match self.state {
            State::Closed => return None,
            State::SynSent | State::SynReceived if self.snd_una == 0 => {
                if self.syn_tx_time.is_none() {
                    return Some(self.syn_segment(now));
                }
                if self.state == State::SynReceived && self.ack_now {
                    return Some(self.ack_segment(now, self.seq_at(self.snd_nxt)));
                }
                return None;
            }
            _ => {}
        }
        if self.established_for_data()
            && let Some(segment) = self.transmit_data(now, payload, max_payload)
        {
            return Some(segment);
        }
        if self.probe_due {
            self.probe_due = false;
            // Linux-style probe: an already-acknowledged sequence number elicits an ACK with the
            // peer's current window without consuming sequence space.
            let seq = self.seq_at(self.snd_una).add(u32::MAX);
            return Some(self.ack_segment(now, seq));
        }
        if self.ack_now {
            return Some(self.ack_segment(now, self.seq_at(self.snd_nxt)));
        }
        None
    }

    fn bare_header(&self, seq: Seq, control: TcpControl) -> TcpRepr<'static> {
        TcpRepr {
            src_port: self.endpoints.local.port(),
            dst_port: self.endpoints.remote.port(),
            control,
            seq_number: seq_number(seq),
            ack_number: None,
            window_len: 0,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: &[],
        }
    }

    fn timestamp(&self, now: Instant) -> TcpTimestampRepr {
        TcpTimestampRepr {
            tsval: (now.total_millis() as u32).wrapping_add(self.ts_offset),
            tsecr: self.ts_recent,
        }
    }

    fn syn_segment(&mut self, now: Instant) -> TcpRepr<'static> {
        let mut repr = self.bare_header(self.iss, TcpControl::Syn);
        repr.max_seg_size = Some(self.mtu_mss.min(u64::from(u16::MAX)) as u16);
        repr.window_len = self.free_recv_space().min(65535) as u16;
        if self.state == State::SynSent {
            repr.window_scale = self.config.window_scaling.then_some(self.rcv_wscale);
            repr.sack_permitted = self.config.sack;
            repr.timestamp = self.config.timestamps.then(|| TcpTimestampRepr {
                tsecr: 0,
                ..self.timestamp(now)
            });
        } else {
            repr.ack_number = Some(seq_number(self.peer_seq_at(self.rcv_nxt)));
            repr.window_scale = self.peer_offered_wscale.then_some(self.rcv_wscale);
            repr.sack_permitted = self.sack_enabled;
            repr.timestamp = self.ts_enabled.then(|| self.timestamp(now));
            self.ack_sent();
        }
        self.rcv_adv = self.rcv_nxt + u64::from(repr.window_len);
        self.syn_tx_time = Some(now);
        self.snd_nxt = self.snd_nxt.max(1);
        self.rto_deadline = Some(now + self.rtt.rto_backed_off(self.rto_backoff));
        repr
    }

    fn ack_sent(&mut self) {
        self.ack_now = false;
        self.delack_deadline = None;
        self.unacked_bytes = 0;
    }

    /// Window to advertise, scaled; moves `rcv_adv` forward, never back.
    fn advertise_window(&mut self) -> u16 {
        let wnd = self
            .rcv_adv
            .saturating_sub(self.rcv_nxt)
            .max(self.free_recv_space());
        let scaled = (wnd >> self.rcv_wscale).min(65535);
        self.rcv_adv = self.rcv_adv.max(self.rcv_nxt + (scaled << self.rcv_wscale));
        scaled as u16
    }

    fn maybe_window_update(&mut self) {
        if !matches!(
            self.state,
            State::Established | State::FinWait1 | State::FinWait2
        ) {
            return;
        }
        let advertised = self.rcv_adv.saturating_sub(self.rcv_nxt);
        let possible = self.free_recv_space();
        // RFC 9293 §3.8.6.2.2 receiver SWS avoidance: update when the window grows by at least
        // min(buffer / 2, 2 MSS), or reopens from below one MSS.
        let threshold = (self.config.recv_buffer as u64 / 2).min(2 * self.mss);
        if possible >= advertised + threshold || (advertised < self.mss && possible >= self.mss) {
            self.ack_now = true;
        }
    }

    fn ack_segment(&mut self, now: Instant, seq: Seq) -> TcpRepr<'static> {
        let mut repr = self.bare_header(seq, TcpControl::None);
        self.fill_ack_fields(now, &mut repr);
        repr
    }

    fn fill_ack_fields(&mut self, now: Instant, repr: &mut TcpRepr<'static>) {
        repr.ack_number = Some(seq_number(self.peer_seq_at(self.rcv_nxt)));
        repr.window_len = self.advertise_window();
        if self.ts_enabled {
            repr.timestamp = Some(self.timestamp(now));
        }
        if self.sack_enabled {
            // A DSACK block goes first (RFC 2883 §4), then the out-of-order blocks.
            let dsack = self.dsack.take();
            // No allocation for the common in-order ACK: blocks only while data is held.
            let held = if self.reassembly.is_empty() {
                Vec::new()
            } else {
                self.reassembly.sack_blocks(3)
            };
            let blocks = dsack.into_iter().chain(held);
            for (slot, (start, end)) in repr.sack_ranges.iter_mut().zip(blocks) {
                *slot = Some((self.peer_seq_at(start).0, self.peer_seq_at(end).0));
            }
        }
        self.ack_sent();
    }

    fn transmit_data(
        &mut self,
        now: Instant,
        payload: &mut Vec<u8>,
        max_payload: u64,
    ) -> Option<TcpRepr<'static>> {
        let rate = self.cc.pacing_rate(self.rtt.smoothed());
        if let Some(rate) = rate {
            self.pacer.refill(now, rate, self.mss);
        }
        let paced_out = rate.is_some() && self.pacer.tokens < 0.0;
        if self.tlp_due && !paced_out {
            self.tlp_due = false;
            if let Some(segment) = self.send_new(now, payload, true, self.mss) {
                return Some(segment);
            }
            if let Some(last) = self.segments.iter().rposition(|s| !s.sacked) {
                return Some(self.retransmit(now, last, payload));
            }
        }
        if paced_out {
            return None;
        }
        let cwnd = self.cc.window().max(self.mss);
        if self.pipe >= cwnd {
            return None;
        }
        if self.lost_segments > 0
            && let Some(index) = self.segments.iter().position(|s| s.lost)
        {
            return Some(self.retransmit(now, index, payload));
        }
        let burst = if max_payload > self.mss {
            // Segmentation offload: whole MSS within the congestion window and the pacer's
            // bucket (as Linux sizes TSO frames by the pacing rate).
            let cwnd_room = cwnd - self.pipe;
            let paced = if rate.is_some() {
                self.pacer.tokens as u64
            } else {
                u64::MAX
            };
            (max_payload.min(cwnd_room).min(paced) / self.mss).max(1) * self.mss
        } else {
            self.mss
        };
        self.send_new(now, payload, false, burst)
    }

    fn copy_payload(&self, start: u64, end: u64, payload: &mut Vec<u8>) {
        let from = start.max(self.send_buf_start);
        let to = end.min(self.data_end());
        if to <= from {
            return;
        }
        let a = (from - self.send_buf_start) as usize;
        let b = (to - self.send_buf_start) as usize;
        let (head, tail) = self.send_buf.as_slices();
        if b <= head.len() {
            payload.extend_from_slice(&head[a..b]);
        } else if a >= head.len() {
            payload.extend_from_slice(&tail[a - head.len()..b - head.len()]);
        } else {
            payload.extend_from_slice(&head[a..]);
            payload.extend_from_slice(&tail[..b - head.len()]);
        }
    }

    fn stamp_for_rate(&mut self, now: Instant, segment: &mut TxSegment) {
        if self.pipe == 0 {
            self.first_sent_time = now;
            self.delivered_time = now;
        }
        segment.tx_time = now;
        segment.delivered = self.delivered;
        segment.delivered_time = self.delivered_time;
        segment.first_sent_time = self.first_sent_time;
        segment.app_limited = self.app_limited_until > 0;
    }

    fn data_segment(&mut self, now: Instant, start: u64, end: u64, fin: bool) -> TcpRepr<'static> {
        let control = if fin {
            TcpControl::Fin
        } else {
            TcpControl::Psh
        };
        let mut repr = self.bare_header(self.seq_at(start), control);
        self.fill_ack_fields(now, &mut repr);
        let bytes = end - start;
        if let Some(rate) = self.cc.pacing_rate(self.rtt.smoothed()) {
            let _ = rate;
            self.pacer.tokens -= bytes as f64;
        }
        self.cc.on_sent(now, bytes, self.pipe);
        self.stats.segments_sent += 1;
        if self.rto_deadline.is_none() {
            self.rto_deadline = Some(now + self.rtt.rto_backed_off(self.rto_backoff));
        }
        repr
    }

    /// New data from `snd_nxt`: at most `burst` bytes (one MSS, or several with segmentation
    /// offload), each MSS recorded as its own segment.
    fn send_new(
        &mut self,
        now: Instant,
        payload: &mut Vec<u8>,
        is_probe: bool,
        burst: u64,
    ) -> Option<TcpRepr<'static>> {
        let data_end = self.data_end();
        let avail = data_end.saturating_sub(self.snd_nxt);
        let window_room = (self.snd_una + self.snd_wnd).saturating_sub(self.snd_nxt);
        let fin_pending = self.fin_queued && self.snd_nxt <= data_end;
        let len = avail.min(burst).min(window_room);
        if !is_probe && avail > window_room && window_room < self.mss {
            // Limited by the peer's receive window, not by the network: like app-limited
            // rounds, these must not convince BBR that the bottleneck is full. A receiver whose
            // autotuning grows its window slowly otherwise ended Startup at a fraction of the
            // link rate, and ProbeBW then needed seconds to climb (1.25× per eight rounds).
            self.app_limited_until = (self.delivered + self.pipe).max(1);
        }
        if len == 0 && !(avail == 0 && fin_pending) {
            if avail == 0 {
                if !fin_pending && self.pipe < self.cc.window() {
                    // Nothing to send while the window is open: later rate samples are floors.
                    self.app_limited_until = (self.delivered + self.pipe).max(1);
                }
            } else if self.snd_una == self.snd_nxt && self.persist_deadline.is_none() {
                // RFC 9293 §3.8.6.1: zero window with data waiting, start probing.
                self.persist_deadline = Some(now + self.rtt.rto());
            }
            return None;
        }
        let outstanding = self.snd_nxt > self.snd_una;
        let completes_fin = fin_pending && len == avail;
        if !is_probe && len < self.mss && outstanding && !completes_fin {
            // Nagle (RFC 9293 §3.7.4), and sender-side SWS avoidance when the window is the
            // limit: hold a small segment while data is unacknowledged.
            if !self.config.nodelay || len < avail {
                return None;
            }
        }
        let fin = fin_pending && self.snd_nxt + len == data_end;
        let start = self.snd_nxt;
        let end = start + len + u64::from(fin);
        self.copy_payload(start, start + len, payload);
        // One entry per wire segment, so SACK, RACK and retransmission work per segment.
        let mut piece_start = start;
        let mut pieces = 0;
        while piece_start < end {
            let piece_end = if end - piece_start > self.mss + u64::from(fin) {
                piece_start + self.mss
            } else {
                end
            };
            let mut segment = TxSegment {
                start: piece_start,
                end: piece_end,
                fin: fin && piece_end == end,
                tx_time: now,
                delivered: 0,
                delivered_time: now,
                first_sent_time: now,
                app_limited: false,
                sacked: false,
                lost: false,
                retransmitted: false,
            };
            self.stamp_for_rate(now, &mut segment);
            self.pipe += piece_end - piece_start;
            self.segments.push_back(segment);
            piece_start = piece_end;
            pieces += 1;
        }
        self.snd_nxt = end;
        let repr = self.data_segment(now, start, end, fin);
        self.stats.segments_sent += pieces - 1;
        if !is_probe && self.tlp_deadline.is_none() {
            self.arm_tlp(now);
        }
        Some(repr)
    }

    fn retransmit(
        &mut self,
        now: Instant,
        index: usize,
        payload: &mut Vec<u8>,
    ) -> TcpRepr<'static> {
        // Split segments larger than the (possibly reduced) MSS; the tail stays lost.
        if self.segments[index].len() > self.mss + u64::from(self.segments[index].fin) {
            let mut tail = self.segments[index].clone();
            let split = tail.start + self.mss;
            tail.start = split;
            let head = &mut self.segments[index];
            head.end = split;
            head.fin = false;
            if tail.lost {
                self.lost_segments += 1;
            } else if tail.in_pipe() {
                // `head` keeps its place in the pipe accounting; count only its own length.
                self.pipe -= tail.len();
                tail.lost = true;
                self.lost_segments += 1;
            }
            self.segments.insert(index + 1, tail);
        }
        let mut segment = self.segments[index].clone();
        if segment.lost {
            segment.lost = false;
            self.lost_segments -= 1;
            self.pipe += segment.len();
        }
        segment.retransmitted = true;
        self.stamp_for_rate(now, &mut segment);
        let data_end = segment.end - u64::from(segment.fin);
        self.copy_payload(segment.start, data_end, payload);
        let (start, end, fin) = (segment.start, segment.end, segment.fin);
        self.segments[index] = segment;
        self.stats.retransmits += 1;
        self.data_segment(now, start, end, fin)
    }
}

/// Whether an ACK's first SACK block is a DSACK (RFC 2883 §4): below the cumulative ACK, or
/// inside the second block.
fn is_dsack(blocks: &[Option<(u32, u32)>; 3], offset: impl Fn(u32) -> i64, snd_una: u64) -> bool {
    let Some((left, right)) = blocks[0] else {
        return false;
    };
    let (l, r) = (offset(left), offset(right));
    if l >= r {
        return false;
    }
    if r <= snd_una as i64 {
        return true;
    }
    blocks[1].is_some_and(|(left2, right2)| offset(left2) <= l && r <= offset(right2))
}
