//! Sharing the kernel's addresses: the stack gets TCP to a port range, the kernel the rest.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::ops::RangeInclusive;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTOCOL_ICMP: u8 = 1;
const PROTOCOL_TCP: u8 = 6;
const PROTOCOL_ICMPV6: u8 = 58;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;

/// The stack owns TCP to `ports` on `address` (and `address6`), addresses the kernel has too.
/// AF_PACKET hands the stack every frame, and a stack answers TCP segments for ports it does
/// not know with RSTs and echo requests with replies: both would break the kernel's own
/// connections or duplicate its answers, so such frames are never passed up. (The kernel, in
/// turn, is kept away from `ports` by whoever set the stack up: `ip_local_reserved_ports` and
/// a netfilter DROP, for IPv6 too.)
///
/// Dual listen: TCP to a port in `listened` whose **source** port is in `ports` is the stack's
/// too — a user-space peer (another namespace's stack, connecting from its own range, which
/// every such namespace reserves from its kernel) reaching a port the application listens on
/// with a kernel socket. The same port from any other source port stays the kernel's, so the
/// stack never answers the kernel's clients, not even with a RST. (The kernel is kept away
/// from the peers' segments by a netfilter DROP of TCP *from* `ports`.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedAddress {
    /// The shared IPv4 address.
    pub address: Ipv4Addr,
    /// The shared IPv6 address, if the stack serves IPv6.
    pub address6: Option<Ipv6Addr>,
    /// The stack's TCP ports (its ephemeral ports), and the source ports of user-space peers.
    pub ports: RangeInclusive<u16>,
    /// Ports the stack accepts user-space peers on (dual listen).
    pub listened: BTreeSet<u16>,
}

impl SharedAddress {
    /// The stack owns `ports` on `address` (IPv4 only), and listens on nothing.
    pub fn new(address: Ipv4Addr, ports: RangeInclusive<u16>) -> Self {
        Self {
            address,
            address6: None,
            ports,
            listened: BTreeSet::new(),
        }
    }

    /// Whether the stack should see this Ethernet frame: anything not IP to a shared address
    /// (ARP, neighbour discovery to multicast, other addresses, which the stack drops itself),
    /// TCP to the stack's ports, TCP to a listened port from a peer's port in the range, and
    /// ICMP other than echo requests (errors may concern the stack's connections; for IPv6
    /// also neighbour advertisements).
    pub fn is_for_stack(&self, frame: &[u8]) -> bool {
        let Some(ethertype) = frame.get(12..14) else {
            return true;
        };
        let ip = &frame[14..];
        match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
            ETHERTYPE_IPV4 => self.ipv4_is_for_stack(ip),
            ETHERTYPE_IPV6 => self.ipv6_is_for_stack(ip),
            _ => true,
        }
    }

    fn ipv4_is_for_stack(&self, ip: &[u8]) -> bool {
        let (Some(&version_ihl), Some(&protocol), Some(destination)) =
            (ip.first(), ip.get(9), ip.get(16..20))
        else {
            return true;
        };
        if <[u8; 4]>::try_from(destination).map(Ipv4Addr::from).ok() != Some(self.address) {
            return true;
        }
        let header_len = usize::from(version_ihl & 0x0f) * 4;
        let Some(payload) = ip.get(header_len..) else {
            return false;
        };
        match protocol {
            // A later fragment has no TCP header; the instance never fragments and Linux
            // sends TCP with DF, so these are for the kernel.
            PROTOCOL_TCP => fragment_offset(ip) == 0 && self.tcp_is_for_stack(payload),
            PROTOCOL_ICMP => payload.first() != Some(&ICMP_ECHO_REQUEST),
            _ => false,
        }
    }

    /// IPv6 with TCP or ICMPv6 right after the fixed header; extension headers (fragments
    /// among them) are the kernel's: the stack sends none, and Linux's TCP none either.
    fn ipv6_is_for_stack(&self, ip: &[u8]) -> bool {
        let (Some(&next_header), Some(destination)) = (ip.get(6), ip.get(24..40)) else {
            return true;
        };
        let destination = <[u8; 16]>::try_from(destination).map(Ipv6Addr::from);
        if self.address6.is_none() || destination.ok() != self.address6 {
            return true;
        }
        let Some(payload) = ip.get(40..) else {
            return false;
        };
        match next_header {
            PROTOCOL_TCP => self.tcp_is_for_stack(payload),
            PROTOCOL_ICMPV6 => payload.first() != Some(&ICMPV6_ECHO_REQUEST),
            _ => false,
        }
    }

    fn tcp_is_for_stack(&self, segment: &[u8]) -> bool {
        let (Some(source), Some(destination)) = (segment.get(0..2), segment.get(2..4)) else {
            return false;
        };
        let source = u16::from_be_bytes([source[0], source[1]]);
        let destination = u16::from_be_bytes([destination[0], destination[1]]);
        self.ports.contains(&destination)
            || (self.listened.contains(&destination) && self.ports.contains(&source))
    }
}

fn fragment_offset(ip: &[u8]) -> u16 {
    ip.get(6..8)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) & 0x1fff)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ethernet + IPv4 (20-byte header) + 4 payload bytes.
    fn frame(protocol: u8, destination: [u8; 4], payload: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[9] = protocol;
        ip[16..20].copy_from_slice(&destination);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&payload);
        frame
    }

    #[test]
    fn only_the_stacks_tcp_ports_and_icmp_errors_reach_the_stack() {
        let mut shared = SharedAddress::new(Ipv4Addr::new(10, 0, 0, 1), 61000..=62999);
        let ours = [10, 0, 0, 1];
        let tcp_to = |port: u16| {
            let p = port.to_be_bytes();
            frame(PROTOCOL_TCP, ours, [0x30, 0x39, p[0], p[1]])
        };
        assert!(shared.is_for_stack(&tcp_to(61000)));
        assert!(shared.is_for_stack(&tcp_to(62999)));
        assert!(!shared.is_for_stack(&tcp_to(60999)));
        assert!(!shared.is_for_stack(&tcp_to(22)));
        // Another address: the stack drops it itself.
        assert!(shared.is_for_stack(&frame(PROTOCOL_TCP, [10, 0, 0, 9], [0, 1, 0, 22])));
        assert!(!shared.is_for_stack(&frame(PROTOCOL_ICMP, ours, [ICMP_ECHO_REQUEST, 0, 0, 0])));
        // Destination unreachable, fragmentation needed.
        assert!(shared.is_for_stack(&frame(PROTOCOL_ICMP, ours, [3, 4, 0, 0])));
        assert!(!shared.is_for_stack(&frame(17, ours, [0, 53, 0, 53])));
        // ARP, and a frame too short to tell.
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(shared.is_for_stack(&arp));
        assert!(shared.is_for_stack(&[0u8; 10]));
        // A later fragment of TCP to our address, and truncated headers.
        let mut fragment = tcp_to(61000);
        fragment[14 + 6] = 0x00;
        fragment[14 + 7] = 0x10;
        assert!(!shared.is_for_stack(&fragment));
        assert!(!shared.is_for_stack(&tcp_to(61000)[..14 + 21]));
        // Dual listen: a listened port from a peer's port in the range, and only from there.
        let tcp = |source: u16, destination: u16| {
            let (s, d) = (source.to_be_bytes(), destination.to_be_bytes());
            frame(PROTOCOL_TCP, ours, [s[0], s[1], d[0], d[1]])
        };
        assert!(!shared.is_for_stack(&tcp(61005, 8080)));
        shared.listened.insert(8080);
        assert!(shared.is_for_stack(&tcp(61005, 8080)));
        assert!(shared.is_for_stack(&tcp(62999, 8080)));
        assert!(!shared.is_for_stack(&tcp(60999, 8080)), "a kernel client");
        assert!(!shared.is_for_stack(&tcp(45000, 8080)), "a kernel client");
        assert!(!shared.is_for_stack(&tcp(61005, 8081)), "not listened");
        assert!(
            shared.is_for_stack(&tcp(80, 61005)),
            "the stack's own client flow"
        );
    }

    /// Ethernet + IPv6 (40-byte header) + 4 payload bytes.
    fn frame6(next_header: u8, destination: Ipv6Addr, payload: [u8; 4]) -> Vec<u8> {
        let mut frame = vec![0u8; 14];
        frame[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[6] = next_header;
        ip[24..40].copy_from_slice(&destination.octets());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&payload);
        frame
    }

    #[test]
    fn ipv6_to_the_shared_address_splits_the_same_way() {
        let ours: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut shared = SharedAddress::new(Ipv4Addr::new(10, 0, 0, 1), 61000..=62999);
        let tcp = |source: u16, destination: u16| {
            let (s, d) = (source.to_be_bytes(), destination.to_be_bytes());
            frame6(PROTOCOL_TCP, ours, [s[0], s[1], d[0], d[1]])
        };
        // Without an IPv6 address the stack drops IPv6 itself: everything passes.
        assert!(shared.is_for_stack(&tcp(80, 22)));
        shared.address6 = Some(ours);
        assert!(shared.is_for_stack(&tcp(80, 61000)));
        assert!(!shared.is_for_stack(&tcp(80, 60999)));
        assert!(!shared.is_for_stack(&tcp(45000, 8080)));
        shared.listened.insert(8080);
        assert!(shared.is_for_stack(&tcp(61005, 8080)));
        assert!(!shared.is_for_stack(&tcp(45000, 8080)), "a kernel client");
        // Another address, neighbour discovery to a solicited-node multicast address.
        let other: Ipv6Addr = "fd00::9".parse().unwrap();
        assert!(shared.is_for_stack(&frame6(PROTOCOL_TCP, other, [0, 1, 0, 22])));
        let solicited: Ipv6Addr = "ff02::1:ff00:1".parse().unwrap();
        assert!(shared.is_for_stack(&frame6(PROTOCOL_ICMPV6, solicited, [135, 0, 0, 0])));
        // Echo requests are the kernel's; errors and advertisements reach the stack too.
        let icmp = |kind: u8| frame6(PROTOCOL_ICMPV6, ours, [kind, 0, 0, 0]);
        assert!(!shared.is_for_stack(&icmp(ICMPV6_ECHO_REQUEST)));
        assert!(shared.is_for_stack(&icmp(2)), "packet too big");
        assert!(shared.is_for_stack(&icmp(136)), "neighbour advertisement");
        // UDP, a fragment header, truncated headers.
        assert!(!shared.is_for_stack(&frame6(17, ours, [0, 53, 0, 53])));
        assert!(!shared.is_for_stack(&frame6(44, ours, [6, 0, 0, 0])));
        assert!(!shared.is_for_stack(&tcp(80, 61000)[..14 + 41]));
        assert!(shared.is_for_stack(&tcp(80, 61000)[..14 + 30]));
    }
}
