//! TCP per RFC 9293: the per-connection state machine (`Connection`) and its configuration.
//!
//! A connection consumes parsed segments (`TcpRepr`) and produces segment headers; it never
//! touches bytes on the wire nor reads a clock. Sequence numbers are converted at the edge into
//! 64-bit stream offsets ("sequence-space offsets": 0 is the SYN, byte `i` of the stream is
//! `i + 1`), so the rest of the code never has to reason about wrap-around.

mod conn;
mod reassembly;
mod rtt;

use std::time::Duration;

pub(crate) use conn::{Connection, Endpoints};
pub use conn::{ConnectionStats, State};

use crate::congestion::CongestionControl;

/// Keepalive timing (RFC 9293 §3.8.4; defaults follow Linux: 2 h idle, 75 s interval, 9 probes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between unanswered probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is declared dead.
    pub probes: u32,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(7200),
            interval: Duration::from_secs(75),
            probes: 9,
        }
    }
}

/// Per-connection options. Defaults are chosen for bulk transfer on long, lossy paths.
#[derive(Clone, Debug, PartialEq)]
pub struct TcpConfig {
    /// Congestion controller (BBR by default).
    pub congestion_control: CongestionControl,
    /// Send buffer in bytes. 4 MiB covers 100 Mbit/s × 300 ms.
    pub send_buffer: usize,
    /// Receive buffer in bytes; also the largest window we advertise.
    pub recv_buffer: usize,
    /// Disable Nagle's algorithm (`TCP_NODELAY`).
    pub nodelay: bool,
    /// Keepalive probing, off unless set.
    pub keepalive: Option<Keepalive>,
    /// Delayed-ACK timer (RFC 9293 §3.8.6.3 allows up to 500 ms; Linux uses 40 ms).
    pub delayed_ack: Duration,
    /// Initial RTO (RFC 6298: 1 s).
    pub rto_initial: Duration,
    /// Lower bound on the RTO. RFC 6298 says 1 s; Linux and this stack use 200 ms.
    pub rto_min: Duration,
    /// Upper bound on the RTO (RFC 6298 allows 60 s).
    pub rto_max: Duration,
    /// Consecutive RTOs on data before the connection is aborted.
    pub max_retransmissions: u32,
    /// SYN retransmissions before connect fails.
    pub syn_retries: u32,
    /// TIME-WAIT duration (2·MSL). Linux uses 60 s.
    pub time_wait: Duration,
    /// Offer RFC 7323 timestamps.
    pub timestamps: bool,
    /// Offer RFC 2018 SACK.
    pub sack: bool,
    /// Offer RFC 7323 window scaling.
    pub window_scaling: bool,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            congestion_control: CongestionControl::Bbr,
            send_buffer: 4 << 20,
            recv_buffer: 4 << 20,
            nodelay: false,
            keepalive: None,
            delayed_ack: Duration::from_millis(40),
            rto_initial: Duration::from_secs(1),
            rto_min: Duration::from_millis(200),
            rto_max: Duration::from_secs(60),
            max_retransmissions: 15,
            syn_retries: 6,
            time_wait: Duration::from_secs(60),
            timestamps: true,
            sack: true,
            window_scaling: true,
        }
    }
}

/// Why a connection failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpError {
    /// The peer answered our SYN with a RST.
    Refused,
    /// The peer reset an established connection.
    Reset,
    /// Retransmissions or keepalive probes went unanswered.
    TimedOut,
    /// The local application aborted the connection.
    Aborted,
}

impl core::fmt::Display for TcpError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            Self::Refused => "connection refused",
            Self::Reset => "connection reset by peer",
            Self::TimedOut => "connection timed out",
            Self::Aborted => "connection aborted",
        })
    }
}

impl std::error::Error for TcpError {}
