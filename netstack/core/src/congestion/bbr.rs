//! BBR congestion control, the BBRv1 model (draft-cardwell-iccrg-bbr-congestion-control-00 and
//! Linux `tcp_bbr.c`), tuned for random loss.
//!
//! Variant and tuning: the controller sends at the estimated bottleneck bandwidth (a windowed
//! maximum of delivery-rate samples over 10 round trips) times a pacing gain, and caps inflight
//! at `cwnd_gain × BDP`. Loss is not a congestion signal here: unlike Linux BBRv1 there is not
//! even the one-round "packet conservation" cut on entering recovery, and unlike BBRv3 there is
//! no `inflight_hi` bound from the loss rate (BBRv3 backs off once loss exceeds 2%, which is
//! exactly what a lossy path must not do). Random loss lowers the delivery rate only by the
//! lost fraction, so goodput stays near `link × (1 − loss)`. Only a retransmission timeout
//! shrinks the window (to the four-segment minimum), as in Linux.

use std::time::Duration;

use super::{AckEvent, Controller, ControllerMetrics, INITIAL_WINDOW_SEGMENTS};
use crate::time::Instant;

/// 2/ln(2): the smallest gain that doubles the sending rate each round in Startup.
const HIGH_GAIN: f64 = 2.885;
/// Inflight cap in BDPs in Startup and Drain (BBRv3's `startup_cwnd_gain`; BBRv1 uses 2.885).
/// Pacing at 2.885 still doubles the rate each round, but inflight stops at the pipe plus one
/// BDP of queue: BBRv1's 2.885 BDPs overflowed a one-BDP bottleneck queue at the end of every
/// Startup (≈ 600 retransmissions at 100 Mbit/s, 30 ms), which then had to be repaired.
const STARTUP_CWND_GAIN: f64 = 2.0;
/// Drain undoes Startup's queue in one round.
const DRAIN_GAIN: f64 = 1.0 / HIGH_GAIN;
/// Inflight cap in BDPs outside Startup; 2 absorbs delayed and aggregated ACKs.
const CWND_GAIN: f64 = 2.0;
/// ProbeBW gain cycle: probe up, drain the probe's queue, then cruise for six phases.
const PACING_GAIN_CYCLE: [f64; 8] = [1.25, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0];
/// Bandwidth filter length, in round trips.
const BW_FILTER_ROUNDS: u64 = 10;
/// Min-RTT filter length.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(10);
/// A sample within 1/64 of the minimum RTT, or this much, confirms it (see `update_min_rtt`).
const MIN_RTT_CONFIRM_SLACK: Duration = Duration::from_micros(100);
/// Time spent at the ProbeRTT window.
const PROBE_RTT_DURATION: Duration = Duration::from_millis(200);
/// ProbeRTT's window in BDPs (BBRv2/v3 `probe_rtt_cwnd_gain`): half a BDP of inflight empties
/// the bottleneck queue as surely as BBRv1's four segments, while the flow keeps about half its
/// rate for the 200 ms instead of stopping (a 125 MB transfer always contains one ProbeRTT).
const PROBE_RTT_CWND_GAIN: f64 = 0.5;
/// Startup ends after three rounds without 25% bandwidth growth.
const FULL_BW_GROWTH: f64 = 1.25;
const FULL_BW_ROUNDS: u32 = 3;
/// Minimum window in segments.
const MIN_WINDOW_SEGMENTS: u64 = 4;
/// Floor on the RTT used for the BDP. On sub-millisecond paths (veth, a LAN) the measured
/// minimum RTT is far below the RTT a user-space host loop actually sees under load (ACKs wait
/// for the next poll), so a BDP from the raw minimum starves the window and the bandwidth
/// estimate collapses with it. Paths with a larger RTT are unaffected.
const MIN_RTT_FLOOR_FOR_BDP: Duration = Duration::from_micros(500);
/// Pace 1% below the estimate so the bottleneck queue drains (Linux `bbr_pacing_margin_percent`).
const PACING_MARGIN: f64 = 0.99;
/// Largest loss rate the cruise phases compensate for (see `Bbr::loss_compensation`).
const MAX_COMPENSATED_LOSS: f64 = 0.15;
/// Weight of one round's loss rate in the loss-rate average.
const LOSS_EWMA_WEIGHT: f64 = 0.125;
/// Compensate only while the smoothed RTT is within this factor of the minimum (no standing
/// queue: the losses are not the bottleneck overflowing).
const COMPENSATE_BELOW_RTT_RATIO: f64 = 1.25;
/// A round whose loss rate exceeds twice the average and the average plus this, while a
/// queue stands, overflowed the bottleneck queue.
const OVERFLOW_EXCESS_LOSS: f64 = 0.10;
/// ...and lost at least this many segments (small rounds are noisy).
const OVERFLOW_MIN_LOST_SEGMENTS: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Startup,
    Drain,
    ProbeBw,
    ProbeRtt,
}

/// A windowed maximum over the last `BW_FILTER_ROUNDS` rounds: one slot per round.
#[derive(Debug, Clone, Default)]
struct MaxBandwidthFilter {
    /// (round, max bytes/s seen in that round)
    slots: [(u64, u64); BW_FILTER_ROUNDS as usize],
}

impl MaxBandwidthFilter {
    fn update(&mut self, round: u64, bw: u64) {
        let slot = &mut self.slots[(round % BW_FILTER_ROUNDS) as usize];
        if slot.0 != round {
            *slot = (round, 0);
        }
        slot.1 = slot.1.max(bw);
    }

    fn get(&self, round: u64) -> u64 {
        self.slots
            .iter()
            .filter(|(r, _)| round.saturating_sub(*r) < BW_FILTER_ROUNDS)
            .map(|(_, bw)| *bw)
            .max()
            .unwrap_or(0)
    }
}

/// BBR state.
#[derive(Debug, Clone)]
pub struct Bbr {
    mss: u64,
    mode: Mode,
    cwnd: u64,
    max_bw: MaxBandwidthFilter,
    min_rtt: Option<Duration>,
    min_rtt_stamp: Instant,
    round_count: u64,
    next_round_delivered: u64,
    full_bw: u64,
    full_bw_count: u32,
    full_bw_reached: bool,
    pacing_gain: f64,
    cwnd_gain: f64,
    cycle_index: usize,
    cycle_stamp: Instant,
    probe_rtt_done: Option<Instant>,
    /// Window to restore when ProbeRTT ends.
    probe_rtt_saved_cwnd: u64,
    /// Window to restore when the recovery episode an RTO started ends. Kept apart from the
    /// ProbeRTT one: with random loss, recovery episodes end inside ProbeRTT all the time, and
    /// one shared slot let them erase the ProbeRTT restore point, collapsing the window to four
    /// segments and the bandwidth estimate with it.
    rto_saved_cwnd: u64,
    /// Bytes handed to the network, retransmissions included.
    sent: u64,
    /// (bytes sent, bytes delivered, inflight) at the start of the current round.
    round_snapshot: (u64, u64, u64),
    /// Moving average of the per-round fraction of sent bytes that were lost (rounds where the
    /// bottleneck queue overflowed left out); `None` before the first round with traffic.
    loss_rate: Option<f64>,
    /// The smoothed RTT was near the minimum at the last ACK.
    queue_small: bool,
}

impl Bbr {
    /// A controller in Startup with the RFC 6928 initial window.
    pub fn new(mss: u64, now: Instant) -> Self {
        Self {
            mss,
            mode: Mode::Startup,
            cwnd: INITIAL_WINDOW_SEGMENTS * mss,
            max_bw: MaxBandwidthFilter::default(),
            min_rtt: None,
            min_rtt_stamp: now,
            round_count: 0,
            next_round_delivered: 0,
            full_bw: 0,
            full_bw_count: 0,
            full_bw_reached: false,
            pacing_gain: HIGH_GAIN,
            cwnd_gain: STARTUP_CWND_GAIN,
            cycle_index: 0,
            cycle_stamp: now,
            probe_rtt_done: None,
            probe_rtt_saved_cwnd: 0,
            rto_saved_cwnd: 0,
            sent: 0,
            round_snapshot: (0, 0, 0),
            loss_rate: None,
            queue_small: false,
        }
    }

    /// Updates the loss-rate average at the start of a round. Every byte sent is, by now,
    /// delivered, marked lost or still in flight, so the bytes lost during the round are
    /// `sent − delivered − growth of inflight`: this counts losses found by RACK's reordering
    /// timer as well, which never reach the controller as `newly_lost`.
    fn update_loss_rate(&mut self, ack: &AckEvent) {
        let (sent0, delivered0, inflight0) = self.round_snapshot;
        let sent = self.sent.saturating_sub(sent0);
        let accounted = i128::from(ack.total_delivered.saturating_sub(delivered0))
            + i128::from(ack.inflight)
            - i128::from(inflight0);
        if sent >= 8 * self.mss {
            let lost = (i128::from(sent) - accounted).max(0) as f64;
            let rate = (lost / sent as f64).min(1.0);
            let baseline = self.loss_rate.unwrap_or(rate);
            // A round losing far more than the path's usual random loss while a queue stands:
            // the bottleneck queue overflowed. Not random loss, so not averaged in; in Startup
            // it means the pipe is full (BBRv2/v3 leave Startup on loss too, but above a fixed
            // 2%, which random loss alone exceeds).
            let overflow = !self.queue_small
                && lost >= (OVERFLOW_MIN_LOST_SEGMENTS * self.mss) as f64
                && rate > (baseline * 2.0).max(baseline + OVERFLOW_EXCESS_LOSS);
            if overflow {
                if self.mode == Mode::Startup {
                    self.full_bw_reached = true;
                }
            } else {
                self.loss_rate = Some(baseline + LOSS_EWMA_WEIGHT * (rate - baseline));
            }
        }
        self.round_snapshot = (self.sent, ack.total_delivered, ack.inflight);
    }

    /// Pacing-gain factor of the cruise phases: `1 / (1 − loss rate)`. Random loss upstream of
    /// the bottleneck removes that fraction of what is sent before it reaches the link, so a
    /// sender pacing at exactly the bottleneck rate leaves the link idle by the loss rate (at
    /// 5% loss BBRv1, Linux's included, cruises at 0.95 × 0.99 of the link). Only outside
    /// Startup/Drain/ProbeRTT, in phases with gain 1, up to `MAX_COMPENSATED_LOSS`, and while
    /// the RTT shows no standing queue: losses from a full queue are not compensated. The
    /// bandwidth estimate is a delivery rate, so it cannot grow from this; cwnd still caps
    /// inflight at 2 × BDP.
    fn loss_compensation(&self) -> f64 {
        if self.mode != Mode::ProbeBw || self.pacing_gain != 1.0 || !self.queue_small {
            return 1.0;
        }
        1.0 / (1.0
            - self
                .loss_rate
                .unwrap_or(0.0)
                .clamp(0.0, MAX_COMPENSATED_LOSS))
    }

    fn bandwidth(&self) -> u64 {
        self.max_bw.get(self.round_count)
    }

    /// Bandwidth-delay product times `gain`, in bytes; `None` before the first samples.
    fn bdp(&self, gain: f64) -> Option<u64> {
        let rtt = self.min_rtt?;
        let bw = self.bandwidth();
        if bw == 0 {
            return None;
        }
        Some((bw as f64 * rtt.max(MIN_RTT_FLOOR_FOR_BDP).as_secs_f64() * gain) as u64)
    }

    fn min_window(&self) -> u64 {
        MIN_WINDOW_SEGMENTS * self.mss
    }

    fn probe_rtt_window(&self) -> u64 {
        self.bdp(PROBE_RTT_CWND_GAIN)
            .unwrap_or(0)
            .max(self.min_window())
    }

    fn target_window(&self, gain: f64) -> u64 {
        match self.bdp(gain) {
            // Linux adds three segments of quanta so small BDPs still keep the pipe full.
            Some(bdp) => (bdp + 3 * self.mss).max(self.min_window()),
            None => INITIAL_WINDOW_SEGMENTS * self.mss,
        }
    }

    fn enter_probe_bw(&mut self, now: Instant) {
        self.mode = Mode::ProbeBw;
        self.cwnd_gain = CWND_GAIN;
        // Start the cycle at a random-ish phase other than the drain phase; the round count is
        // as good a source of variety as any and keeps the core deterministic.
        self.cycle_index = [0, 2, 3, 4, 5, 6, 7][(self.round_count % 7) as usize];
        self.pacing_gain = PACING_GAIN_CYCLE[self.cycle_index];
        self.cycle_stamp = now;
    }

    fn update_round(&mut self, ack: &AckEvent) -> bool {
        let Some(rate) = ack.rate else { return false };
        if rate.prior_delivered >= self.next_round_delivered {
            self.next_round_delivered = ack.total_delivered;
            self.round_count += 1;
            true
        } else {
            false
        }
    }

    fn update_bandwidth(&mut self, ack: &AckEvent) {
        let Some(rate) = ack.rate else { return };
        let Some(bw) = rate.bytes_per_second() else {
            return;
        };
        // App-limited samples only count when they raise the estimate.
        if !rate.is_app_limited || bw >= self.bandwidth() {
            self.max_bw.update(self.round_count, bw);
        }
    }

    fn check_full_bandwidth(&mut self, round_start: bool, app_limited: bool) {
        if self.full_bw_reached || !round_start || app_limited {
            return;
        }
        let bw = self.bandwidth();
        if bw as f64 >= self.full_bw as f64 * FULL_BW_GROWTH {
            self.full_bw = bw;
            self.full_bw_count = 0;
            return;
        }
        self.full_bw_count += 1;
        self.full_bw_reached = self.full_bw_count >= FULL_BW_ROUNDS;
    }

    fn advance_cycle(&mut self, ack: &AckEvent) {
        let Some(min_rtt) = self.min_rtt else { return };
        let phase_done = ack.now.saturating_duration_since(self.cycle_stamp) > min_rtt;
        let gain = self.pacing_gain;
        let advance = if gain > 1.0 {
            // Probe until the extra inflight is really out there (or loss says the pipe is full).
            phase_done && (ack.newly_lost > 0 || ack.prior_inflight >= self.bdp(gain).unwrap_or(0))
        } else if gain < 1.0 {
            phase_done || ack.inflight <= self.bdp(1.0).unwrap_or(0)
        } else {
            phase_done
        };
        if advance {
            self.cycle_index = (self.cycle_index + 1) % PACING_GAIN_CYCLE.len();
            self.cycle_stamp = ack.now;
            self.pacing_gain = PACING_GAIN_CYCLE[self.cycle_index];
        }
    }

    fn update_min_rtt(&mut self, ack: &AckEvent) {
        let expired = ack.now.saturating_duration_since(self.min_rtt_stamp) > MIN_RTT_WINDOW;
        if let Some(sample) = ack.rtt_sample {
            if self.min_rtt.is_none_or(|m| sample < m) || expired {
                self.min_rtt = Some(sample);
                self.min_rtt_stamp = ack.now;
            } else if self
                .min_rtt
                .is_some_and(|m| sample <= m + (m / 64).max(MIN_RTT_CONFIRM_SLACK))
            {
                // The queue was empty again (the ProbeBW drain phase does that when the flow
                // is alone): the minimum is confirmed, so ProbeRTT, which exists to empty the
                // queue and see it, is not needed yet. Flows that share a standing queue never
                // see such samples and probe every 10 s as before.
                self.min_rtt_stamp = ack.now;
            }
        }
        if expired && self.mode != Mode::ProbeRtt && self.min_rtt.is_some() {
            self.mode = Mode::ProbeRtt;
            self.pacing_gain = 1.0;
            self.cwnd_gain = 1.0;
            self.probe_rtt_saved_cwnd = self.cwnd.max(self.rto_saved_cwnd);
            self.probe_rtt_done = None;
        }
        if self.mode == Mode::ProbeRtt {
            match self.probe_rtt_done {
                None if ack.inflight <= self.probe_rtt_window() => {
                    self.probe_rtt_done = Some(ack.now + PROBE_RTT_DURATION);
                }
                Some(done) if ack.now >= done => {
                    self.min_rtt_stamp = ack.now;
                    self.cwnd = self.cwnd.max(self.probe_rtt_saved_cwnd);
                    self.probe_rtt_saved_cwnd = 0;
                    if self.full_bw_reached {
                        self.enter_probe_bw(ack.now);
                    } else {
                        self.mode = Mode::Startup;
                        self.pacing_gain = HIGH_GAIN;
                        self.cwnd_gain = STARTUP_CWND_GAIN;
                    }
                }
                _ => {}
            }
        }
    }

    fn update_window(&mut self, ack: &AckEvent) {
        if self.mode == Mode::ProbeRtt {
            self.cwnd = self.cwnd.min(self.probe_rtt_window());
            return;
        }
        let target = self.target_window(self.cwnd_gain);
        if self.full_bw_reached {
            self.cwnd = (self.cwnd + ack.delivered_bytes).min(target);
        } else if self.cwnd < target || ack.total_delivered < INITIAL_WINDOW_SEGMENTS * self.mss {
            self.cwnd += ack.delivered_bytes;
        }
        self.cwnd = self.cwnd.max(self.min_window());
    }
}

impl Controller for Bbr {
    fn on_ack(&mut self, ack: &AckEvent) {
        let round_start = self.update_round(ack);
        self.queue_small = match (ack.smoothed_rtt, self.min_rtt) {
            (Some(srtt), Some(min)) => {
                srtt.as_secs_f64() <= min.as_secs_f64() * COMPENSATE_BELOW_RTT_RATIO
            }
            _ => false,
        };
        if round_start {
            self.update_loss_rate(ack);
        }
        self.update_bandwidth(ack);
        let app_limited = ack.rate.is_some_and(|r| r.is_app_limited);
        self.check_full_bandwidth(round_start, app_limited);
        match self.mode {
            Mode::Startup if self.full_bw_reached => {
                self.mode = Mode::Drain;
                self.pacing_gain = DRAIN_GAIN;
                self.cwnd_gain = STARTUP_CWND_GAIN;
            }
            Mode::ProbeBw => self.advance_cycle(ack),
            _ => {}
        }
        if self.mode == Mode::Drain && ack.inflight <= self.bdp(1.0).unwrap_or(0) {
            self.enter_probe_bw(ack.now);
        }
        self.update_min_rtt(ack);
        self.update_window(ack);
    }

    fn on_rto(&mut self, _now: Instant) {
        if self.mode != Mode::ProbeRtt {
            self.rto_saved_cwnd = self.cwnd.max(self.rto_saved_cwnd);
        }
        self.cwnd = self.min_window();
    }

    fn on_recovery_exit(&mut self, _now: Instant) {
        // Restore what an RTO took away once the lost data is repaired (ProbeRTT restores its
        // own window when it ends).
        if self.mode != Mode::ProbeRtt {
            self.cwnd = self.cwnd.max(self.rto_saved_cwnd);
        }
        self.rto_saved_cwnd = 0;
    }

    fn on_sent(&mut self, _now: Instant, bytes: u64, _inflight: u64) {
        self.sent += bytes;
    }

    fn on_mss_change(&mut self, mss: u64) {
        self.mss = mss.max(1);
    }

    fn window(&self) -> u64 {
        self.cwnd
    }

    fn pacing_rate(&self, smoothed_rtt: Option<Duration>) -> Option<u64> {
        let bw = self.bandwidth();
        if bw == 0 {
            // No sample yet: pace the initial window over the handshake RTT (1 ms if unknown).
            let rtt = smoothed_rtt
                .unwrap_or(Duration::from_millis(1))
                .as_secs_f64();
            let initial = (INITIAL_WINDOW_SEGMENTS * self.mss) as f64;
            return Some((HIGH_GAIN * initial / rtt.max(1e-6)) as u64);
        }
        Some((bw as f64 * self.pacing_gain * self.loss_compensation() * PACING_MARGIN) as u64)
    }

    fn name(&self) -> &'static str {
        "bbr"
    }

    fn metrics(&self, smoothed_rtt: Option<Duration>) -> ControllerMetrics {
        ControllerMetrics {
            window: self.cwnd,
            pacing_rate: self.pacing_rate(smoothed_rtt),
            bandwidth_estimate: Some(self.bandwidth()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::congestion::RateSample;

    fn ack(now: Instant, delivered: u64, inflight: u64, rtt: Duration) -> AckEvent {
        AckEvent {
            now,
            delivered_bytes: 1000,
            total_delivered: delivered,
            prior_inflight: inflight,
            inflight,
            rtt_sample: Some(rtt),
            smoothed_rtt: Some(rtt),
            min_rtt: Some(rtt),
            rate: Some(RateSample {
                delivered: 100_000,
                interval: Duration::from_millis(10),
                prior_delivered: delivered.saturating_sub(100_000),
                is_app_limited: false,
            }),
            in_recovery: false,
            newly_lost: 0,
        }
    }

    #[test]
    fn probe_rtt_restores_its_window_even_if_recovery_ends_inside_it() {
        let mss = 1000;
        let mut bbr = Bbr::new(mss, Instant::ZERO);
        bbr.cwnd = 400_000;
        bbr.full_bw_reached = true;
        bbr.mode = Mode::ProbeBw;
        bbr.min_rtt = Some(Duration::from_millis(10));
        bbr.min_rtt_stamp = Instant::ZERO;
        // 11 s later with a larger RTT sample: the min-RTT filter expires and ProbeRTT starts.
        let t = Instant::from_millis(11_000);
        bbr.on_ack(&ack(t, 1_000_000, 4 * mss, Duration::from_millis(12)));
        assert_eq!(bbr.mode, Mode::ProbeRtt);
        // Half a BDP (10 MB/s × 12 ms / 2 = 60 segments), far below the 400 it had.
        let probe_window = bbr.probe_rtt_window();
        assert_eq!(probe_window, 60 * mss);
        assert_eq!(bbr.window(), probe_window);
        // A loss-recovery episode ends during ProbeRTT (frequent under random loss).
        bbr.on_recovery_exit(t + Duration::from_millis(50));
        assert_eq!(bbr.window(), probe_window, "ProbeRTT keeps its window");
        // ProbeRTT ends 200 ms after inflight reached the minimum.
        bbr.on_ack(&ack(
            t + Duration::from_millis(250),
            1_010_000,
            4 * mss,
            Duration::from_millis(12),
        ));
        assert_eq!(bbr.mode, Mode::ProbeBw);
        // Restored (then capped at 2 × BDP of the model), not left at four segments.
        assert!(
            bbr.window() > 200 * mss,
            "window {} not restored",
            bbr.window()
        );
    }

    /// Startup rounds of 30 ms whose sending doubles each round; `loss` and the smoothed RTT
    /// (in min-RTT multiples) per round. Returns the mode after each round.
    fn startup_rounds(loss: &[f64], rtt_factor: &[f64]) -> Vec<Mode> {
        let mss = 1000;
        let min_rtt = Duration::from_millis(30);
        let mut bbr = Bbr::new(mss, Instant::ZERO);
        let mut delivered = 0u64;
        let mut modes = Vec::new();
        for (round, (&loss, &factor)) in loss.iter().zip(rtt_factor).enumerate() {
            let now = Instant::from_millis(30 * (round as u64 + 1));
            let sent = 50_000u64 << round;
            bbr.on_sent(now, sent, sent);
            let prior = delivered;
            let got = (sent as f64 * (1.0 - loss)) as u64;
            delivered += got;
            bbr.on_ack(&AckEvent {
                now,
                delivered_bytes: got,
                total_delivered: delivered,
                prior_inflight: 0,
                inflight: 0,
                rtt_sample: Some(min_rtt),
                smoothed_rtt: Some(min_rtt.mul_f64(factor)),
                min_rtt: Some(min_rtt),
                rate: Some(RateSample {
                    delivered: got,
                    interval: min_rtt,
                    prior_delivered: prior,
                    is_app_limited: false,
                }),
                in_recovery: loss > 0.0,
                newly_lost: 0,
            });
            modes.push(bbr.mode);
        }
        modes
    }

    #[test]
    fn startup_survives_random_loss_but_ends_when_the_queue_overflows() {
        // 5% (and 10%) random loss with no queue: Startup keeps doubling.
        for loss in [0.05, 0.10] {
            let modes = startup_rounds(&[loss; 6], &[1.0; 6]);
            assert!(
                modes.iter().all(|m| *m == Mode::Startup),
                "{loss}: {modes:?}"
            );
        }
        // Even a loss spike does not end it while the RTT shows no queue (random loss).
        let modes = startup_rounds(&[0.05, 0.05, 0.05, 0.05, 0.40, 0.05], &[1.0; 6]);
        assert!(modes.iter().all(|m| *m == Mode::Startup), "{modes:?}");
        // The queue fills (RTT 1.6 × min) and a round loses 40% on top of 5% random loss:
        // the bottleneck overflowed, Startup ends at once.
        let modes = startup_rounds(
            &[0.05, 0.05, 0.05, 0.05, 0.40, 0.05],
            &[1.0, 1.0, 1.0, 1.3, 1.6, 1.6],
        );
        assert_eq!(modes[3], Mode::Startup);
        // (Drain, or already ProbeBW: this model's inflight is zero.)
        assert_ne!(modes[4], Mode::Startup, "{modes:?}");
    }

    #[test]
    fn samples_near_the_minimum_rtt_postpone_probe_rtt() {
        let mss = 1000;
        let mut bbr = Bbr::new(mss, Instant::ZERO);
        bbr.cwnd = 400_000;
        bbr.full_bw_reached = true;
        bbr.mode = Mode::ProbeBw;
        bbr.min_rtt = Some(Duration::from_millis(30));
        bbr.min_rtt_stamp = Instant::ZERO;
        // 9 s later the queue drains and a sample comes within 1/64 of the minimum.
        let t = Instant::from_millis(9_000);
        bbr.on_ack(&ack(t, 1_000_000, 300 * mss, Duration::from_micros(30_300)));
        // 11 s after the minimum was set, but 2 s after it was confirmed: no ProbeRTT.
        let later = Instant::from_millis(11_000);
        bbr.on_ack(&ack(later, 1_100_000, 300 * mss, Duration::from_millis(36)));
        assert_eq!(bbr.mode, Mode::ProbeBw);
        assert_eq!(bbr.min_rtt, Some(Duration::from_millis(30)));
        // With only queued samples (36 ms), the filter expires 10 s after the confirmation.
        bbr.on_ack(&ack(
            Instant::from_millis(19_100),
            1_200_000,
            300 * mss,
            Duration::from_millis(36),
        ));
        assert_eq!(bbr.mode, Mode::ProbeRtt);
    }

    #[test]
    fn converges_to_link_rate_and_two_bdp_window() {
        // A fluid model of a 10 MB/s link with 20 ms RTT: each ms the link delivers 10 kB.
        let mss = 1000;
        let mut bbr = Bbr::new(mss, Instant::ZERO);
        let rtt = Duration::from_millis(20);
        let mut delivered = 0u64;
        for ms in 1..3000u64 {
            let now = Instant::from_millis(ms);
            let sending = bbr.pacing_rate(Some(rtt)).unwrap().min(10_000_000);
            let bytes = sending / 1000;
            let prior = delivered;
            delivered += bytes;
            bbr.on_ack(&AckEvent {
                now,
                delivered_bytes: bytes,
                total_delivered: delivered,
                prior_inflight: bbr.window(),
                inflight: bbr.window().min(sending / 50),
                rtt_sample: Some(rtt),
                smoothed_rtt: Some(rtt),
                min_rtt: Some(rtt),
                rate: Some(RateSample {
                    delivered: bytes * 20,
                    interval: rtt,
                    prior_delivered: prior.saturating_sub(bytes * 20),
                    is_app_limited: false,
                }),
                in_recovery: false,
                newly_lost: 0,
            });
        }
        assert_eq!(bbr.mode, Mode::ProbeBw);
        assert!(bbr.bandwidth() >= 9_000_000, "bw {}", bbr.bandwidth());
        let bdp = 10_000_000 / 50;
        assert!(bbr.window() <= 2 * bdp + 3 * mss, "cwnd {}", bbr.window());
        // Loss is not a signal: a congestion event leaves the window alone.
        let before = bbr.window();
        bbr.on_congestion_event(Instant::from_millis(3000), before);
        assert_eq!(bbr.window(), before);
    }
}
