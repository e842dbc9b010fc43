//! The namespace's kernel TCP listeners. Dual listen follows them: the agent's raw-table rule
//! keeps this namespace's kernel from ever seeing a user-space peer (source port in the range),
//! so the instance must take those peers for every port the kernel listens on — not only for
//! listeners whose program runs under the shim and said `Listen`.
//!
//! Asked of the kernel's sock_diag netlink interface for listening sockets only (what `ss -tl`
//! does), so only the listening hash is walked. `/proc/self/net/tcp{,6}`, the fallback, walks
//! every bucket of the established hash on each read: at one read per housekeeping period an
//! idle instance spent about 5 % of a core there (perf: `established_get_first`).

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};

/// `st` of a listening socket in `/proc/net/tcp`.
const LISTEN: &str = "0A";

/// Every listening port and the address to deliver to, by preference: a wildcard bind, else
/// `own` or `own6` (the instance's addresses), else whatever else listens there (loopback
/// binds, which `Listen` refuses).
pub(crate) fn kernel_listeners(own: Ipv4Addr, own6: Option<Ipv6Addr>) -> BTreeMap<u16, SocketAddr> {
    let listening = listening_sockets().unwrap_or_else(|error| {
        tracing::debug!(%error, "sock_diag unavailable: reading /proc/self/net/tcp{{,6}}");
        ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
            .iter()
            .filter_map(|file| std::fs::read_to_string(file).ok())
            .flat_map(|text| parse(&text))
            .collect()
    });
    let rank = |a: &SocketAddr| match a.ip() {
        ip if ip.is_unspecified() => 0,
        IpAddr::V4(ip) if ip == own => 1,
        IpAddr::V6(ip) if Some(ip) == own6 => 1,
        _ => 2,
    };
    let mut found = BTreeMap::new();
    for address in listening {
        let better = found
            .get(&address.port())
            .is_none_or(|known: &SocketAddr| rank(&address) < rank(known));
        if better {
            found.insert(address.port(), address);
        }
    }
    found
}

/// The local addresses of this namespace's listening TCP sockets, IPv4 and IPv6 (IPv4-mapped
/// ones as IPv4), by sock_diag.
fn listening_sockets() -> io::Result<Vec<SocketAddr>> {
    let mut found = Vec::new();
    for family in [AF_INET, AF_INET6] {
        dump_listening(family, &mut found)?;
    }
    Ok(found)
}

/// One `SOCK_DIAG_BY_FAMILY` dump of `family`'s TCP sockets in state LISTEN.
fn dump_listening(family: u8, found: &mut Vec<SocketAddr>) -> io::Result<()> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let socket_id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    let request = SockDiagMessage::InetRequest(InetRequest {
        family,
        protocol: IPPROTO_TCP,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::LISTEN,
        socket_id,
    });
    let mut packet = NetlinkMessage::new(header, request.into());
    packet.finalize();
    let mut request = vec![0; packet.buffer_len()];
    packet.serialize(&mut request);
    socket.send(&request, 0)?;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let size = socket.recv(&mut &mut buffer[..], 0)?;
        let mut offset = 0;
        while offset < size {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&buffer[offset..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let length = message.header.length as usize;
            match message.payload {
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    let id = &response.header.socket_id;
                    found.push(unmapped(SocketAddr::new(id.source_address, id.source_port)));
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(error) => {
                    return Err(io::Error::other(format!("sock_diag: {error:?}")));
                }
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length;
        }
        if size == 0 {
            return Ok(());
        }
    }
}

fn unmapped(address: SocketAddr) -> SocketAddr {
    match address.ip() {
        IpAddr::V6(ip) => ip.to_ipv4_mapped().map_or(address, |v4| {
            SocketAddr::new(IpAddr::V4(v4), address.port())
        }),
        IpAddr::V4(_) => address,
    }
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

    #[test]
    fn sock_diag_and_proc_agree_on_a_listener_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let by_diag = listening_sockets().expect("sock_diag answers an unprivileged dump");
        assert!(by_diag.contains(&address), "{address} in {by_diag:?}");
        let by_proc = parse(&std::fs::read_to_string("/proc/self/net/tcp").unwrap());
        assert!(by_proc.contains(&address), "{address} in {by_proc:?}");
        let six = std::net::TcpListener::bind("[::1]:0").unwrap();
        let address = six.local_addr().unwrap();
        assert!(listening_sockets().unwrap().contains(&address));
    }
}
