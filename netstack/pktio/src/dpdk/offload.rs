//! Which sent frames the port completes or cuts: TCP over IPv4 or IPv6 directly after Ethernet
//! (the frames the stack leaves unfinished when the engine offers the offloads).

/// Where a TCP frame's headers are, for the port's checksum and segmentation offloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpFrame {
    /// The IP header's length.
    pub(crate) l3_len: u16,
    /// The TCP header's length, options included.
    pub(crate) l4_len: u16,
    pub(crate) ipv6: bool,
}

/// `Some` for a TCP segment in IPv4 (any header length) or IPv6 (no extension headers).
pub(crate) fn tcp_frame(frame: &[u8]) -> Option<TcpFrame> {
    const TCP: u8 = 6;
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (l3_len, ipv6) = match ethertype {
        0x0800 => {
            let l3_len = u16::from(ip.first()? & 0x0f) * 4;
            (l3_len >= 20 && *ip.get(9)? == TCP).then_some((l3_len, false))?
        }
        0x86dd => (*ip.get(6)? == TCP).then_some((40, true))?,
        _ => return None,
    };
    let tcp = ip.get(usize::from(l3_len)..)?;
    let l4_len = u16::from(tcp.get(12)? >> 4) * 4;
    (l4_len >= 20 && tcp.len() >= usize::from(l4_len)).then_some(TcpFrame {
        l3_len,
        l4_len,
        ipv6,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(ip);
        frame
    }

    /// An IP packet of `l3_len` header bytes, then a TCP header of `l4_len` bytes.
    fn packet(version: u8, l3_len: usize, l4_len: usize) -> Vec<u8> {
        let mut ip = vec![0u8; l3_len + l4_len];
        if version == 4 {
            ip[0] = 0x40 | (l3_len / 4) as u8;
            ip[9] = 6;
        } else {
            ip[0] = 0x60;
            ip[6] = 6;
        }
        ip[l3_len + 12] = ((l4_len / 4) as u8) << 4;
        ip
    }

    #[test]
    fn tcp_over_ipv4_and_ipv6_only() {
        let v4 = packet(4, 20, 20);
        let found = |ethertype, ip: &[u8]| tcp_frame(&frame(ethertype, ip));
        let plain = TcpFrame {
            l3_len: 20,
            l4_len: 20,
            ipv6: false,
        };
        assert_eq!(found(0x0800, &v4), Some(plain));
        assert_eq!(
            found(0x0800, &packet(4, 20, 32)).map(|t| t.l4_len),
            Some(32)
        );
        assert_eq!(
            found(0x0800, &packet(4, 24, 20)).map(|t| t.l3_len),
            Some(24)
        );
        let mut icmp = v4.clone();
        icmp[9] = 1;
        assert_eq!(found(0x0800, &icmp), None);
        let v6 = TcpFrame {
            l3_len: 40,
            l4_len: 20,
            ipv6: true,
        };
        assert_eq!(found(0x86dd, &packet(6, 40, 20)), Some(v6));
        let mut hop_by_hop = packet(6, 40, 20);
        hop_by_hop[6] = 0;
        assert_eq!(found(0x86dd, &hop_by_hop), None);
        assert_eq!(found(0x0806, &[0u8; 28]), None, "ARP");
        assert_eq!(found(0x0800, &v4[..30]), None, "truncated");
        let mut short_header = v4.clone();
        short_header[32] = 0x40;
        assert_eq!(found(0x0800, &short_header), None, "data offset below 5");
        assert_eq!(tcp_frame(&[0u8; 10]), None);
    }
}
