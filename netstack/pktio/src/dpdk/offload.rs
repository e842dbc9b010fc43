//! Which sent frames the port completes checksums for: TCP over IPv4 or IPv6 directly after
//! Ethernet (the frames the stack leaves unfinished when the engine offers the offload).

/// Where a TCP frame's headers are, for the port's checksum offload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TcpFrame {
    /// The IP header's length.
    pub(crate) l3_len: u16,
    pub(crate) ipv6: bool,
}

/// `Some` for a TCP segment in IPv4 (any header length) or IPv6 (no extension headers).
pub(crate) fn tcp_frame(frame: &[u8]) -> Option<TcpFrame> {
    const TCP: u8 = 6;
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    match ethertype {
        0x0800 => {
            let l3_len = u16::from(ip.first()? & 0x0f) * 4;
            (l3_len >= 20 && *ip.get(9)? == TCP && ip.len() >= usize::from(l3_len) + 20).then_some(
                TcpFrame {
                    l3_len,
                    ipv6: false,
                },
            )
        }
        0x86dd => (*ip.get(6)? == TCP && ip.len() >= 60).then_some(TcpFrame {
            l3_len: 40,
            ipv6: true,
        }),
        _ => None,
    }
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

    #[test]
    fn tcp_over_ipv4_and_ipv6_only() {
        let mut v4 = vec![0u8; 40];
        v4[0] = 0x45;
        v4[9] = 6;
        assert_eq!(
            tcp_frame(&frame(0x0800, &v4)),
            Some(TcpFrame {
                l3_len: 20,
                ipv6: false
            })
        );
        let mut options = vec![0u8; 44];
        options[0] = 0x46;
        options[9] = 6;
        assert_eq!(
            tcp_frame(&frame(0x0800, &options)).map(|t| t.l3_len),
            Some(24)
        );
        let mut icmp = v4.clone();
        icmp[9] = 1;
        assert_eq!(tcp_frame(&frame(0x0800, &icmp)), None);
        let mut v6 = vec![0u8; 60];
        v6[6] = 6;
        assert_eq!(
            tcp_frame(&frame(0x86dd, &v6)),
            Some(TcpFrame {
                l3_len: 40,
                ipv6: true
            })
        );
        let mut hop_by_hop = v6.clone();
        hop_by_hop[6] = 0;
        assert_eq!(tcp_frame(&frame(0x86dd, &hop_by_hop)), None);
        assert_eq!(tcp_frame(&frame(0x0806, &[0u8; 28])), None, "ARP");
        assert_eq!(tcp_frame(&frame(0x0800, &v4[..30])), None, "truncated");
        assert_eq!(tcp_frame(&[0u8; 10]), None);
    }
}
