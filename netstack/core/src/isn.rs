//! Initial sequence numbers per RFC 6528: `ISN = M + F(local, remote, secret)`, where `M` is a
//! 4 µs clock and `F` is SipHash-2-4 keyed with a secret the host supplies (the core has no
//! source of randomness of its own).

use std::net::{IpAddr, SocketAddr};

use crate::seq::Seq;
use crate::time::Instant;

/// Generates initial sequence numbers from a 128-bit secret.
#[derive(Clone)]
pub struct IsnGenerator {
    key: [u64; 2],
}

impl core::fmt::Debug for IsnGenerator {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The key is a secret: never print it.
        f.write_str("IsnGenerator { .. }")
    }
}

impl IsnGenerator {
    /// A generator keyed with `secret`, which the host must draw from a CSPRNG.
    pub fn new(secret: [u8; 16]) -> Self {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&secret[..8]);
        hi.copy_from_slice(&secret[8..]);
        Self {
            key: [u64::from_le_bytes(lo), u64::from_le_bytes(hi)],
        }
    }

    /// The ISN for a connection between `local` and `remote` created at `now`.
    pub fn isn(&self, now: Instant, local: SocketAddr, remote: SocketAddr) -> Seq {
        let hash = siphash24(self.key, &four_tuple(local, remote, None));
        // RFC 6528 §3: M is a timer that increments every 4 microseconds.
        let clock = (now.total_micros() / 4) as u32;
        Seq(clock.wrapping_add(hash as u32))
    }

    /// A per-connection hash used to offset TCP timestamps (RFC 7323 §5.4).
    pub(crate) fn timestamp_offset(&self, local: SocketAddr, remote: SocketAddr) -> u32 {
        (siphash24(self.key, &four_tuple(remote, local, Some(0x75))) >> 32) as u32
    }
}

/// Addresses and ports as hashed: `first` address and port, then `second`'s, then `tag`.
fn four_tuple(first: SocketAddr, second: SocketAddr, tag: Option<u8>) -> Vec<u8> {
    let mut message = Vec::with_capacity(37);
    for end in [first, second] {
        match end.ip() {
            IpAddr::V4(ip) => message.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => message.extend_from_slice(&ip.octets()),
        }
        message.extend_from_slice(&end.port().to_be_bytes());
    }
    message.extend(tag);
    message
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// SipHash-2-4 (Aumasson & Bernstein), the keyed PRF RFC 6528 suggests.
fn siphash24(key: [u64; 2], message: &[u8]) -> u64 {
    let mut v = [
        key[0] ^ 0x736f_6d65_7073_6575,
        key[1] ^ 0x646f_7261_6e64_6f6d,
        key[0] ^ 0x6c79_6765_6e65_7261,
        key[1] ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = message.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let m = u64::from_le_bytes(word);
        v[3] ^= m;
        sip_round(&mut v);
        sip_round(&mut v);
        v[0] ^= m;
    }
    let mut last = [0u8; 8];
    let tail = chunks.remainder();
    last[..tail.len()].copy_from_slice(tail);
    last[7] = message.len() as u8;
    let m = u64::from_le_bytes(last);
    v[3] ^= m;
    sip_round(&mut v);
    sip_round(&mut v);
    v[0] ^= m;
    v[2] ^= 0xff;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn siphash_matches_reference_vector() {
        // Reference vector from the SipHash paper: key 00..0f, message 00..0e.
        let key = [0x0706_0504_0302_0100, 0x0f0e_0d0c_0b0a_0908];
        let message: Vec<u8> = (0u8..15).collect();
        assert_eq!(siphash24(key, &message), 0xa129_ca61_49be_45e5);
    }

    #[test]
    fn isn_depends_on_tuple_secret_and_clock() {
        let local: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let remote: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let other: SocketAddr = "10.0.0.2:81".parse().unwrap();
        let a = IsnGenerator::new([1; 16]);
        let b = IsnGenerator::new([2; 16]);
        let t = Instant::from_micros(1_000);
        assert_ne!(a.isn(t, local, remote), a.isn(t, local, other));
        assert_ne!(a.isn(t, local, remote), b.isn(t, local, remote));
        let later = a.isn(t + std::time::Duration::from_micros(400), local, remote);
        assert_eq!(later.distance_from(a.isn(t, local, remote)), 100);
    }
}
