//! Congestion control behind one trait, chosen per connection.
//!
//! The connection reports events (data sent, ACKs with a delivery-rate sample, the start of a
//! loss-recovery episode, retransmission timeouts); the controller answers with a congestion
//! window and, optionally, a pacing rate. Controllers never see packets or sequence numbers.

mod bbr;
mod cubic;
mod reno;

use core::fmt;
use std::time::Duration;

use crate::time::Instant;

pub use bbr::Bbr;
pub use cubic::Cubic;
pub use reno::NewReno;

/// Which controller a connection uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CongestionControl {
    /// BBRv1-style model-based control, tuned to tolerate random loss (the default).
    #[default]
    Bbr,
    /// CUBIC, RFC 9438.
    Cubic,
    /// NewReno, RFC 5681 and RFC 6582.
    Reno,
}

impl CongestionControl {
    /// Builds a controller for a connection with the given maximum segment size.
    pub fn build(self, mss: u64, now: Instant) -> Box<dyn Controller> {
        match self {
            Self::Bbr => Box::new(Bbr::new(mss, now)),
            Self::Cubic => Box::new(Cubic::new(mss)),
            Self::Reno => Box::new(NewReno::new(mss)),
        }
    }

    /// The lower-case name used on command lines and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Bbr => "bbr",
            Self::Cubic => "cubic",
            Self::Reno => "reno",
        }
    }
}

impl core::str::FromStr for CongestionControl {
    type Err = UnknownController;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bbr" => Ok(Self::Bbr),
            "cubic" => Ok(Self::Cubic),
            "reno" | "newreno" => Ok(Self::Reno),
            _ => Err(UnknownController),
        }
    }
}

/// A congestion controller name that is not `bbr`, `cubic` or `reno`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownController;

impl fmt::Display for UnknownController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown congestion controller (expected bbr, cubic or reno)")
    }
}

impl std::error::Error for UnknownController {}

/// A delivery-rate sample (draft-cheng-iccrg-delivery-rate-estimation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateSample {
    /// Bytes delivered over `interval`.
    pub delivered: u64,
    /// The sampling interval: the longer of the send and ACK intervals.
    pub interval: Duration,
    /// Total bytes delivered by the connection when the sampled packet was sent.
    pub prior_delivered: u64,
    /// The sender had nothing to send when the sampled packet left, so the rate is a floor.
    pub is_app_limited: bool,
}

impl RateSample {
    /// Delivery rate in bytes per second, `None` for an empty interval.
    pub fn bytes_per_second(&self) -> Option<u64> {
        let micros = self.interval.as_micros();
        if micros == 0 {
            return None;
        }
        Some((u128::from(self.delivered) * 1_000_000 / micros) as u64)
    }
}

/// What one incoming ACK did, as seen by the controller.
#[derive(Clone, Copy, Debug)]
pub struct AckEvent {
    /// When the ACK was processed.
    pub now: Instant,
    /// Bytes newly delivered (cumulatively acknowledged or selectively acknowledged).
    pub delivered_bytes: u64,
    /// Total bytes delivered on the connection, after this ACK.
    pub total_delivered: u64,
    /// Bytes in flight before this ACK.
    pub prior_inflight: u64,
    /// Bytes in flight after this ACK (and after loss marking).
    pub inflight: u64,
    /// The newest RTT sample this ACK produced.
    pub rtt_sample: Option<Duration>,
    /// Smoothed RTT, when known.
    pub smoothed_rtt: Option<Duration>,
    /// Minimum RTT seen on the connection.
    pub min_rtt: Option<Duration>,
    /// The delivery-rate sample for this ACK, when valid.
    pub rate: Option<RateSample>,
    /// The connection is in loss recovery.
    pub in_recovery: bool,
    /// Bytes newly marked lost while processing this ACK.
    pub newly_lost: u64,
}

/// Counters a controller exposes for reports and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControllerMetrics {
    /// Congestion window in bytes.
    pub window: u64,
    /// Pacing rate in bytes per second, if pacing.
    pub pacing_rate: Option<u64>,
    /// Bottleneck-bandwidth estimate in bytes per second (model-based controllers only).
    pub bandwidth_estimate: Option<u64>,
}

/// A congestion controller. Hooks other than `on_ack`, `window` and `name` default to no-ops.
pub trait Controller: fmt::Debug + Send {
    /// `bytes` left the host; `inflight` includes them.
    fn on_sent(&mut self, now: Instant, bytes: u64, inflight: u64) {
        let _ = (now, bytes, inflight);
    }

    /// An ACK delivered data.
    fn on_ack(&mut self, ack: &AckEvent);

    /// Loss was detected outside any recovery episode: a new episode starts.
    fn on_congestion_event(&mut self, now: Instant, inflight: u64) {
        let _ = (now, inflight);
    }

    /// The recovery episode ended (everything outstanding at its start was acknowledged).
    fn on_recovery_exit(&mut self, now: Instant) {
        let _ = now;
    }

    /// The retransmission timer expired.
    fn on_rto(&mut self, now: Instant);

    /// The maximum segment size changed (for example after a PMTU update).
    fn on_mss_change(&mut self, mss: u64) {
        let _ = mss;
    }

    /// The congestion window in bytes.
    fn window(&self) -> u64;

    /// The rate to pace at in bytes per second; `None` sends as fast as the window allows.
    fn pacing_rate(&self, smoothed_rtt: Option<Duration>) -> Option<u64>;

    /// Short name of the algorithm.
    fn name(&self) -> &'static str;

    /// A snapshot of the controller's state.
    fn metrics(&self, smoothed_rtt: Option<Duration>) -> ControllerMetrics {
        ControllerMetrics {
            window: self.window(),
            pacing_rate: self.pacing_rate(smoothed_rtt),
            bandwidth_estimate: None,
        }
    }
}

/// RFC 6928: initial window of ten segments.
pub(crate) const INITIAL_WINDOW_SEGMENTS: u64 = 10;

/// Pacing for window-based controllers, as Linux does for them: twice cwnd/srtt in slow start,
/// 1.2 times in congestion avoidance, so bursts are spread without limiting the window.
pub(crate) fn window_pacing_rate(
    window: u64,
    smoothed_rtt: Option<Duration>,
    slow_start: bool,
) -> Option<u64> {
    let rtt = smoothed_rtt?.as_micros().max(1);
    let gain_percent: u128 = if slow_start { 200 } else { 120 };
    Some((u128::from(window) * 1_000_000 * gain_percent / 100 / rtt) as u64)
}
