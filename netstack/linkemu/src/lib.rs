//! A user-space link emulator for tests and benchmarks. This kernel has no `netem`, so frames
//! are forwarded between two interfaces by a process that adds propagation delay, a rate limit
//! with a tail-drop queue, random loss and reordering.
//!
//! [`LinkModel`] is the pure decision logic (time passed in, seeded PRNG) and is unit-tested;
//! the binary wires two models (one per direction) to two AF_PACKET engines.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// Impairments of one direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Impairments {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Bottleneck rate in bits per second (0: unlimited).
    pub rate_bps: u64,
    /// Queue in front of the bottleneck, in bytes.
    pub queue_bytes: u64,
    /// Probability of dropping a frame.
    pub loss: f64,
    /// Probability of holding a frame back by `reorder_delay` (so later frames overtake it).
    pub reorder: f64,
    /// Extra delay of reordered frames.
    pub reorder_delay: Duration,
}

impl Default for Impairments {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            rate_bps: 0,
            queue_bytes: 1 << 20,
            loss: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(1),
        }
    }
}

/// Counters of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounters {
    /// Frames offered to the link.
    pub offered: u64,
    /// Frames dropped at random.
    pub lost: u64,
    /// Frames dropped because the queue was full.
    pub overflowed: u64,
    /// Frames held back for reordering.
    pub reordered: u64,
    /// Frames delivered.
    pub delivered: u64,
}

/// One direction of the emulated link. Times are microseconds on the caller's clock.
#[derive(Debug)]
pub struct LinkModel {
    config: Impairments,
    rng: u64,
    busy_until_us: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Vec<u8>)>>,
    sequence: u64,
    counters: LinkCounters,
}

impl LinkModel {
    /// A model with a PRNG seed (so runs are reproducible).
    pub fn new(config: Impairments, seed: u64) -> Self {
        Self {
            config,
            rng: seed,
            busy_until_us: 0,
            queue: BinaryHeap::new(),
            sequence: 0,
            counters: LinkCounters::default(),
        }
    }

    fn unit(&mut self) -> f64 {
        // SplitMix64.
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Offers a frame that arrived at `now_us`.
    pub fn offer(&mut self, now_us: u64, frame: &[u8]) {
        self.counters.offered += 1;
        if self.config.loss > 0.0 && self.unit() < self.config.loss {
            self.counters.lost += 1;
            return;
        }
        let mut depart = now_us;
        if self.config.rate_bps > 0 {
            let start = self.busy_until_us.max(now_us);
            // Bytes still ahead of this frame in the bottleneck queue.
            let backlog = (start - now_us) as u128 * u128::from(self.config.rate_bps) / 8_000_000;
            if backlog > u128::from(self.config.queue_bytes) {
                self.counters.overflowed += 1;
                return;
            }
            let serialization =
                (frame.len() as u128 * 8_000_000 / u128::from(self.config.rate_bps)) as u64;
            self.busy_until_us = start + serialization.max(1);
            depart = self.busy_until_us;
        }
        let mut deliver = depart + self.config.delay.as_micros() as u64;
        if self.config.reorder > 0.0 && self.unit() < self.config.reorder {
            self.counters.reordered += 1;
            deliver += self.config.reorder_delay.as_micros() as u64;
        }
        self.sequence += 1;
        self.queue
            .push(Reverse((deliver, self.sequence, frame.to_vec())));
    }

    /// When the next frame is due.
    pub fn next_due(&self) -> Option<u64> {
        self.queue.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Takes the next frame due by `now_us`.
    pub fn take_due(&mut self, now_us: u64) -> Option<Vec<u8>> {
        if self.next_due()? > now_us {
            return None;
        }
        let Reverse((_, _, frame)) = self.queue.pop()?;
        self.counters.delivered += 1;
        Some(frame)
    }

    /// Counters so far.
    pub fn counters(&self) -> LinkCounters {
        self.counters
    }
}

/// Completes the TCP or UDP checksum of an Ethernet/IPv4 frame in place. Frames captured from a
/// local sender with checksum offload carry only the pseudo-header sum; forwarding them as they
/// are would make the receiver drop them.
pub fn complete_checksum(frame: &mut [u8]) {
    use stackroute_netstack::wire::{
        EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket,
    };
    let Ok(mut eth) = EthernetFrame::new_checked(&mut *frame) else {
        return;
    };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else {
        return;
    };
    let src = IpAddress::Ipv4(ip.src_addr());
    let dst = IpAddress::Ipv4(ip.dst_addr());
    let protocol = ip.next_header();
    if ip.more_frags() || ip.frag_offset() != 0 {
        return;
    }
    let payload = ip.payload_mut();
    match protocol {
        IpProtocol::Tcp => {
            if let Ok(mut tcp) = TcpPacket::new_checked(payload) {
                tcp.fill_checksum(&src, &dst);
            }
        }
        IpProtocol::Udp => {
            if let Ok(mut udp) = UdpPacket::new_checked(payload) {
                udp.fill_checksum(&src, &dst);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_rate_limits_and_drops_on_overflow() {
        let mut link = LinkModel::new(
            Impairments {
                delay: Duration::from_millis(10),
                rate_bps: 8_000_000, // 1 byte per µs
                queue_bytes: 3000,
                ..Impairments::default()
            },
            1,
        );
        for _ in 0..5 {
            link.offer(0, &[0u8; 1000]);
        }
        // 1000 µs serialization each; the fifth would queue 4000 bytes: dropped.
        assert_eq!(link.counters().overflowed, 1);
        assert_eq!(link.next_due(), Some(11_000));
        assert!(link.take_due(10_999).is_none());
        let due: Vec<u64> = (0..4)
            .map(|i| {
                let at = 11_000 + i * 1000;
                assert!(link.take_due(at).is_some());
                at
            })
            .collect();
        assert_eq!(due, vec![11_000, 12_000, 13_000, 14_000]);
        assert_eq!(link.counters().delivered, 4);
    }

    #[test]
    fn random_loss_matches_probability_and_reordering_swaps_frames() {
        let mut lossy = LinkModel::new(
            Impairments {
                loss: 0.1,
                ..Impairments::default()
            },
            42,
        );
        for t in 0..100_000 {
            lossy.offer(t, &[1]);
        }
        let lost = lossy.counters().lost as f64 / 100_000.0;
        assert!((0.09..0.11).contains(&lost), "loss rate {lost}");

        let mut reordering = LinkModel::new(
            Impairments {
                reorder: 1.0,
                reorder_delay: Duration::from_micros(500),
                ..Impairments::default()
            },
            7,
        );
        reordering.offer(0, &[1]);
        let mut plain = reordering;
        plain.config.reorder = 0.0;
        plain.offer(100, &[2]);
        assert_eq!(plain.take_due(1_000), Some(vec![2]));
        assert_eq!(plain.take_due(1_000), Some(vec![1]));
    }
}
