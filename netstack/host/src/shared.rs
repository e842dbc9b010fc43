//! Sharing the kernel's IPv4 address: the stack gets TCP to a port range, the kernel the rest.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTOCOL_ICMP: u8 = 1;
const PROTOCOL_TCP: u8 = 6;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The stack owns TCP to `ports` on `address`, an address the kernel has too. AF_PACKET hands
/// the stack every frame, and a stack answers TCP segments for ports it does not know with RSTs
/// and echo requests with replies: both would break the kernel's own connections or duplicate
/// its answers, so such frames are never passed up. (The kernel, in turn, is kept away from
/// `ports` by whoever set the stack up: `ip_local_reserved_ports` and a netfilter DROP.)
///
/// Dual listen: TCP to a port in `listened` whose **source** port is in `ports` is the stack's
/// too — a user-space peer (another namespace's stack, connecting from its own range, which
/// every such namespace reserves from its kernel) reaching a port the application listens on
/// with a kernel socket. The same port from any other source port stays the kernel's, so the
/// stack never answers the kernel's clients, not even with a RST. (The kernel is kept away
/// from the peers' segments by a netfilter DROP of TCP *from* `ports`.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedAddress {
    /// The shared address.
    pub address: Ipv4Addr,
    /// The stack's TCP ports (its ephemeral ports), and the source ports of user-space peers.
    pub ports: RangeInclusive<u16>,
    /// Ports the stack accepts user-space peers on (dual listen).
    pub listened: BTreeSet<u16>,
}

impl SharedAddress {
    /// The stack owns `ports` on `address`, and listens on nothing.
    pub fn new(address: Ipv4Addr, ports: RangeInclusive<u16>) -> Self {
        Self {
            address,
            ports,
            listened: BTreeSet::new(),
        }
    }
}

impl SharedAddress {
    /// Whether the stack should see this Ethernet frame: anything not IPv4 to the shared
    /// address (ARP, other addresses, which the stack drops itself), TCP to the stack's ports,
    /// TCP to a listened port from a peer's port in the range, and ICMP other than echo
    /// requests (errors may concern the stack's connections).
    pub fn is_for_stack(&self, frame: &[u8]) -> bool {
        let Some(ethertype) = frame.get(12..14) else {
            return true;
        };
        if u16::from_be_bytes([ethertype[0], ethertype[1]]) != ETHERTYPE_IPV4 {
            return true;
        }
        let ip = &frame[14..];
        let (Some(&version_ihl), Some(&protocol), Some(destination)) =
            (ip.first(), ip.get(9), ip.get(16..20))
        else {
            return true;
        };
        if Ipv4Addr::new(
            destination[0],
            destination[1],
            destination[2],
            destination[3],
        ) != self.address
        {
            return true;
        }
        let header_len = usize::from(version_ihl & 0x0f) * 4;
        let Some(payload) = ip.get(header_len..) else {
            return false;
        };
        match protocol {
            PROTOCOL_TCP => match payload.get(2..4) {
                // A later fragment has no TCP header; the instance never fragments and Linux
                // sends TCP with DF, so these are for the kernel.
                Some(port) if fragment_offset(ip) == 0 => {
                    let destination = u16::from_be_bytes([port[0], port[1]]);
                    let source = u16::from_be_bytes([payload[0], payload[1]]);
                    self.ports.contains(&destination)
                        || (self.listened.contains(&destination) && self.ports.contains(&source))
                }
                _ => false,
            },
            PROTOCOL_ICMP => payload.first() != Some(&ICMP_ECHO_REQUEST),
            _ => false,
        }
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
}
