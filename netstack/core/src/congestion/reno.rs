//! NewReno congestion control: RFC 5681 slow start and congestion avoidance, with the RFC 6582
//! recovery episode handled by the connection (one window reduction per episode).

use std::time::Duration;

use super::{AckEvent, Controller, INITIAL_WINDOW_SEGMENTS, window_pacing_rate};
use crate::time::Instant;

/// NewReno state.
#[derive(Debug, Clone)]
pub struct NewReno {
    mss: u64,
    window: u64,
    ssthresh: u64,
    /// Bytes acknowledged since the window last grew in congestion avoidance.
    bytes_acked: u64,
}

impl NewReno {
    /// A controller starting at the RFC 6928 initial window.
    pub fn new(mss: u64) -> Self {
        Self {
            mss,
            window: INITIAL_WINDOW_SEGMENTS * mss,
            ssthresh: u64::MAX,
            bytes_acked: 0,
        }
    }

    fn minimum_window(&self) -> u64 {
        2 * self.mss
    }
}

impl Controller for NewReno {
    fn on_ack(&mut self, ack: &AckEvent) {
        if ack.in_recovery {
            // RFC 6582 §3.2: the window stays at ssthresh during recovery.
            return;
        }
        if self.window < self.ssthresh {
            // RFC 5681 §3.1: grow by at most one SMSS per ACK... but with ACK thinning (delayed
            // ACKs) RFC 3465 byte counting with L = 2 SMSS keeps growth per RTT unchanged.
            self.window += ack.delivered_bytes.min(2 * self.mss);
        } else {
            // RFC 5681 §3.1, eq. 3 with appropriate byte counting: one SMSS per window acked.
            self.bytes_acked += ack.delivered_bytes;
            if self.bytes_acked >= self.window {
                self.bytes_acked -= self.window;
                self.window += self.mss;
            }
        }
    }

    fn on_congestion_event(&mut self, _now: Instant, inflight: u64) {
        // RFC 5681 eq. 4: ssthresh = max(FlightSize / 2, 2 * SMSS).
        self.ssthresh = (inflight / 2).max(self.minimum_window());
        self.window = self.ssthresh;
        self.bytes_acked = 0;
    }

    fn on_rto(&mut self, _now: Instant) {
        self.ssthresh = (self.window / 2).max(self.minimum_window());
        // RFC 5681 §3.1: after a timeout the loss window is one segment.
        self.window = self.mss;
        self.bytes_acked = 0;
    }

    fn on_mss_change(&mut self, mss: u64) {
        self.mss = mss;
        self.window = self.window.max(self.minimum_window());
    }

    fn window(&self) -> u64 {
        self.window
    }

    fn pacing_rate(&self, smoothed_rtt: Option<Duration>) -> Option<u64> {
        window_pacing_rate(self.window, smoothed_rtt, self.window < self.ssthresh)
    }

    fn name(&self) -> &'static str {
        "reno"
    }
}
