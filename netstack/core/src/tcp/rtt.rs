//! RTT estimation and the retransmission timeout, RFC 6298.

use std::time::Duration;

/// Smoothed RTT, variance and RTO.
#[derive(Debug, Clone)]
pub(crate) struct RttEstimator {
    smoothed: Option<Duration>,
    variance: Duration,
    latest: Option<Duration>,
    min: Option<Duration>,
    rto_min: Duration,
    rto_max: Duration,
    rto_initial: Duration,
}

impl RttEstimator {
    pub(crate) fn new(rto_initial: Duration, rto_min: Duration, rto_max: Duration) -> Self {
        Self {
            smoothed: None,
            variance: Duration::ZERO,
            latest: None,
            min: None,
            rto_min,
            rto_max,
            rto_initial,
        }
    }

    pub(crate) fn on_sample(&mut self, rtt: Duration) {
        self.latest = Some(rtt);
        self.min = Some(self.min.map_or(rtt, |m| m.min(rtt)));
        match self.smoothed {
            None => {
                // RFC 6298 §2.2.
                self.smoothed = Some(rtt);
                self.variance = rtt / 2;
            }
            Some(srtt) => {
                // RFC 6298 §2.3 with α = 1/8, β = 1/4.
                let delta = srtt.abs_diff(rtt);
                self.variance = (self.variance * 3 + delta) / 4;
                self.smoothed = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// The un-backed-off RTO: SRTT + max(G, 4·RTTVAR), clamped (RFC 6298 §2.3, §2.4, §2.5).
    pub(crate) fn rto(&self) -> Duration {
        let Some(srtt) = self.smoothed else {
            return self.rto_initial;
        };
        let granularity = Duration::from_millis(1);
        (srtt + (self.variance * 4).max(granularity)).clamp(self.rto_min, self.rto_max)
    }

    pub(crate) fn rto_backed_off(&self, backoffs: u32) -> Duration {
        // RFC 6298 §5.5: double per expiry, up to the maximum.
        let factor = 1u32 << backoffs.min(16);
        (self.rto() * factor).min(self.rto_max)
    }

    pub(crate) fn smoothed(&self) -> Option<Duration> {
        self.smoothed
    }

    pub(crate) fn latest(&self) -> Option<Duration> {
        self.latest
    }

    pub(crate) fn min(&self) -> Option<Duration> {
        self.min
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_rfc6298_formulas() {
        let ms = Duration::from_millis;
        let mut rtt = RttEstimator::new(ms(1000), ms(200), ms(60_000));
        assert_eq!(rtt.rto(), ms(1000));
        rtt.on_sample(ms(100));
        // SRTT = 100, RTTVAR = 50, RTO = 100 + 200 = 300.
        assert_eq!(rtt.rto(), ms(300));
        rtt.on_sample(ms(200));
        // RTTVAR = 3/4·50 + 1/4·100 = 62.5; SRTT = 112.5; RTO = 112.5 + 250 = 362.5.
        assert_eq!(rtt.rto(), Duration::from_micros(362_500));
        assert_eq!(rtt.rto_backed_off(2), Duration::from_micros(1_450_000));
        assert_eq!(rtt.rto_backed_off(30), ms(60_000));
        assert_eq!(rtt.min(), Some(ms(100)));
    }
}
