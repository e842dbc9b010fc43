//! CUBIC congestion control, RFC 9438.

use std::time::Duration;

use super::{AckEvent, Controller, INITIAL_WINDOW_SEGMENTS, window_pacing_rate};
use crate::time::Instant;

/// RFC 9438 §4.6: β_cubic = 0.7.
const BETA_CUBIC: f64 = 0.7;
/// RFC 9438 §5: C = 0.4.
const C_CUBIC: f64 = 0.4;
/// RFC 9438 §4.3: α_cubic = 3 (1 − β) / (1 + β), the Reno-friendly additive increase.
const ALPHA_CUBIC: f64 = 3.0 * (1.0 - BETA_CUBIC) / (1.0 + BETA_CUBIC);

/// CUBIC state. Windows are tracked in segments (f64) as the RFC's formulas are.
#[derive(Debug, Clone)]
pub struct Cubic {
    mss: u64,
    cwnd: f64,
    ssthresh: f64,
    /// W_max: the window just before the last reduction.
    w_max: f64,
    /// K: time to reach W_max again, in seconds.
    k: f64,
    /// Start of the current congestion-avoidance epoch.
    epoch_start: Option<Instant>,
    /// W_est: the Reno-friendly window estimate (RFC 9438 §4.3).
    w_est: f64,
}

impl Cubic {
    /// A controller starting at the RFC 6928 initial window.
    pub fn new(mss: u64) -> Self {
        Self {
            mss,
            cwnd: INITIAL_WINDOW_SEGMENTS as f64,
            ssthresh: f64::INFINITY,
            w_max: 0.0,
            k: 0.0,
            epoch_start: None,
            w_est: 0.0,
        }
    }

    fn in_slow_start(&self) -> bool {
        self.cwnd < self.ssthresh
    }
}

impl Controller for Cubic {
    fn on_ack(&mut self, ack: &AckEvent) {
        if ack.in_recovery {
            return;
        }
        let acked_segments = ack.delivered_bytes as f64 / self.mss as f64;
        if self.in_slow_start() {
            // RFC 9438 §4.10 defers to RFC 5681 slow start (byte counting, L = 2).
            self.cwnd += acked_segments.min(2.0);
            return;
        }
        let Some(rtt) = ack.smoothed_rtt else {
            self.cwnd += acked_segments / self.cwnd;
            return;
        };
        // A new epoch starts on the first ACK of congestion avoidance (§4.2).
        let epoch_start = *self.epoch_start.get_or_insert(ack.now);
        if self.w_max < self.cwnd && self.k == 0.0 {
            // No reduction has happened yet (slow start exited on ssthresh): start at the plateau.
            self.w_max = self.cwnd;
        }
        if self.w_est == 0.0 {
            self.w_est = self.cwnd;
        }
        let t = ack.now.saturating_duration_since(epoch_start).as_secs_f64();
        let rtt_secs = rtt.as_secs_f64();
        // RFC 9438 eq. 1: W_cubic(t) = C (t − K)^3 + W_max, evaluated one RTT ahead (§4.4).
        let target_time = t + rtt_secs;
        let w_cubic = C_CUBIC * (target_time - self.k).powi(3) + self.w_max;
        // RFC 9438 eq. 4: W_est += α_cubic · segments_acked / cwnd.
        self.w_est += ALPHA_CUBIC * acked_segments / self.cwnd;
        if w_cubic < self.w_est {
            // Reno-friendly region (§4.3).
            self.cwnd = self.w_est;
        } else {
            // Concave and convex regions (§4.4, §4.5): the target is capped at 1.5 cwnd.
            let target = w_cubic.clamp(self.cwnd, 1.5 * self.cwnd);
            self.cwnd += (target - self.cwnd) / self.cwnd * acked_segments;
        }
    }

    fn on_congestion_event(&mut self, _now: Instant, inflight: u64) {
        let flight = inflight as f64 / self.mss as f64;
        let current = self.cwnd.max(flight.min(self.cwnd));
        // RFC 9438 §4.7 fast convergence.
        self.w_max = if current < self.w_max {
            current * (1.0 + BETA_CUBIC) / 2.0
        } else {
            current
        };
        // RFC 9438 §4.6: ssthresh = cwnd · β_cubic, at least two segments.
        self.ssthresh = (current * BETA_CUBIC).max(2.0);
        self.cwnd = self.ssthresh;
        // RFC 9438 eq. 2: K = cbrt(W_max (1 − β) / C).
        self.k = (self.w_max * (1.0 - BETA_CUBIC) / C_CUBIC).cbrt();
        self.epoch_start = None;
        self.w_est = self.cwnd;
    }

    fn on_rto(&mut self, now: Instant) {
        // RFC 9438 §4.8: treat as a congestion event, then restart from one segment.
        let inflight = (self.cwnd * self.mss as f64) as u64;
        self.on_congestion_event(now, inflight);
        self.cwnd = 1.0;
    }

    fn on_mss_change(&mut self, mss: u64) {
        self.mss = mss.max(1);
    }

    fn window(&self) -> u64 {
        (self.cwnd * self.mss as f64) as u64
    }

    fn pacing_rate(&self, smoothed_rtt: Option<Duration>) -> Option<u64> {
        window_pacing_rate(self.window(), smoothed_rtt, self.in_slow_start())
    }

    fn name(&self) -> &'static str {
        "cubic"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack_at(now: Instant, bytes: u64) -> AckEvent {
        AckEvent {
            now,
            delivered_bytes: bytes,
            total_delivered: 0,
            prior_inflight: 0,
            inflight: 0,
            rtt_sample: Some(Duration::from_millis(10)),
            smoothed_rtt: Some(Duration::from_millis(10)),
            min_rtt: Some(Duration::from_millis(10)),
            rate: None,
            in_recovery: false,
            newly_lost: 0,
        }
    }

    #[test]
    fn reduces_by_beta_and_regrows_towards_w_max() {
        let mss = 1000;
        let mut cubic = Cubic::new(mss);
        let mut now = Instant::ZERO;
        // Slow start to 100 segments.
        while cubic.window() < 100 * mss {
            cubic.on_ack(&ack_at(now, 2 * mss));
        }
        let before = cubic.window();
        cubic.on_congestion_event(now, before);
        assert_eq!(cubic.window(), (before as f64 * BETA_CUBIC) as u64);
        // One second of ACKs at one window per 10 ms RTT: back near W_max, and no further than
        // the cubic function allows.
        for _ in 0..100 {
            now = now + Duration::from_millis(10);
            let w = cubic.window();
            cubic.on_ack(&ack_at(now, w));
        }
        let regrown = cubic.window();
        assert!(regrown > before * 9 / 10, "regrown {regrown} vs {before}");
        assert!(regrown < before * 2, "regrown {regrown} vs {before}");
    }
}
