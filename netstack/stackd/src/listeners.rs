//! The namespace's kernel TCP listeners, from `/proc/self/net/tcp` and `tcp6` (the network
//! namespace of the reading process). Dual listen follows them: the agent's raw-table rule keeps
//! this namespace's kernel from ever seeing a user-space peer (source port in the range), so the
//! instance must take those peers for every port the kernel listens on — not only for
//! listeners whose program runs under the shim and said `Listen`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `st` of a listening socket in `/proc/net/tcp`.
const LISTEN: &str = "0A";

/// Every listening port and the address to deliver to, by preference: a wildcard bind, else
/// `own` or `own6` (the instance's addresses), else whatever else listens there (loopback
/// binds, which `Listen` refuses).
pub(crate) fn kernel_listeners(own: Ipv4Addr, own6: Option<Ipv6Addr>) -> BTreeMap<u16, SocketAddr> {
    let mut found = BTreeMap::new();
    for file in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            for address in parse(&text) {
                let rank = |a: &SocketAddr| match a.ip() {
                    ip if ip.is_unspecified() => 0,
                    IpAddr::V4(ip) if ip == own => 1,
                    IpAddr::V6(ip) if Some(ip) == own6 => 1,
                    _ => 2,
                };
                let better = found
                    .get(&address.port())
                    .is_none_or(|known: &SocketAddr| rank(&address) < rank(known));
                if better {
                    found.insert(address.port(), address);
                }
            }
        }
    }
    found
}

/// The local addresses of the listening sockets in a `/proc/net/tcp{,6}` text.
fn parse(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            if state != LISTEN {
                return None;
            }
            let (ip, port) = local.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            let ip = match ip.len() {
                // One 32-bit word in host (little-endian) order.
                8 => IpAddr::V4(Ipv4Addr::from(
                    u32::from_str_radix(ip, 16).ok()?.swap_bytes(),
                )),
                // Four such words.
                32 => {
                    let mut bytes = [0u8; 16];
                    for (word, chunk) in bytes.chunks_mut(4).enumerate() {
                        let value = u32::from_str_radix(&ip[word * 8..word * 8 + 8], 16).ok()?;
                        chunk.copy_from_slice(&value.swap_bytes().to_be_bytes());
                    }
                    let v6 = Ipv6Addr::from(bytes);
                    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
                }
                _ => return None,
            };
            Some(SocketAddr::new(ip, port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_sockets_of_proc_net_tcp() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0000000000000000 100 0 0 10 0\n\
   1: 0100007F:0CEA 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0000000000000000 100 0 0 10 0\n\
   2: 02004D0A:0050 01004D0A:EE48 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0000000000000000 20 4 30 10 -1\n";
        assert_eq!(
            parse(tcp),
            [
                "0.0.0.0:8080".parse().unwrap(),
                "127.0.0.1:3306".parse().unwrap()
            ]
        );
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000000000000:1451 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 4 1\n\
   1: 0000000000000000FFFF00000200000A:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 5 1\n";
        assert_eq!(
            parse(tcp6),
            ["[::]:5201".parse().unwrap(), "10.0.0.2:22".parse().unwrap()]
        );
    }
}
