//! What the kernel says about TCP connections (`ss -tin`), read from outside the application.

use std::net::SocketAddr;

use anyhow::Result;

use crate::net::Net;

/// One open TCP connection as `ss -tin` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConn {
    /// Local address and port.
    pub local: SocketAddr,
    /// Peer address and port.
    pub peer: SocketAddr,
    /// The congestion control in use (`cubic`, `bbr`, `reno`), if `ss` showed one.
    pub cc: Option<String>,
}

/// Parses `ss -tinH` output: a line per socket (`STATE RECV-Q SEND-Q LOCAL PEER …`), followed
/// by indented info lines whose first word is the congestion control algorithm.
pub fn parse(output: &str) -> Vec<TcpConn> {
    let mut conns = Vec::new();
    for line in output.lines() {
        if line.starts_with(char::is_whitespace) {
            let Some(last) = conns.last_mut() else {
                continue;
            };
            let last: &mut TcpConn = last;
            if last.cc.is_none() {
                last.cc = line
                    .split_whitespace()
                    .next()
                    .filter(|w| w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                    .filter(|w| !w.contains(':'))
                    .map(str::to_string);
            }
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        // With a state filter ss omits the state column: take the two last address-like words.
        let addrs: Vec<SocketAddr> = words.iter().filter_map(|w| parse_addr(w)).collect();
        if let [local, peer, ..] = addrs[..] {
            conns.push(TcpConn {
                local,
                peer,
                cc: None,
            });
        }
    }
    conns
}

fn parse_addr(word: &str) -> Option<SocketAddr> {
    let word = word.replace(['[', ']'], "");
    let (ip, port) = word.rsplit_once(':')?;
    let ip = ip.split('%').next()?;
    let ip = ip.strip_prefix("::ffff:").unwrap_or(ip);
    format!(
        "{}:{port}",
        if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        }
    )
    .parse()
    .ok()
}

/// Open TCP connections in `host` whose peer is `peer` (ip and port): established, and those
/// the peer has already closed while the application still reads (CLOSE-WAIT). A server that
/// sends a small body at once closes within milliseconds while a rate-limited client reads for
/// a second: sampling only ESTABLISHED then missed the connection entirely (a CI failure).
pub fn connections_to(net: &Net, host: &str, peer: SocketAddr) -> Result<Vec<TcpConn>> {
    let output = net.exec(
        host,
        &["ss", "-tinH", "state", "established", "state", "close-wait"],
    )?;
    Ok(parse(&output)
        .into_iter()
        .filter(|c| c.peer == peer)
        .collect())
}

/// Every TCP socket `host`'s kernel holds towards `peer`, in any state (`ss -tanH`): the lines
/// as `ss` prints them. A connection on the user-space stack must leave this empty.
pub fn kernel_sockets_to(net: &Net, host: &str, peer: SocketAddr) -> Result<Vec<String>> {
    let output = net.exec(host, &["ss", "-tanH"])?;
    Ok(sockets_in(&output, peer))
}

fn sockets_in(output: &str, peer: SocketAddr) -> Vec<String> {
    output
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .skip(1)
                .filter_map(parse_addr)
                .nth(1)
                .is_some_and(|p| p == peer)
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ss_tin_with_and_without_state_column() {
        let out = "ESTAB 0 0 10.0.1.2:40122 10.244.1.10:5201\n\t cubic wscale:7,7 rto:204 rtt:0.1/0.05 mss:1448\nESTAB 0 0 [::ffff:10.0.1.1]:80 [::ffff:10.0.1.2]:5555 \n\t bbr wscale:7,7 rto:201 bbr:(bw:1Mbps)\n0 0 10.0.1.1:5000 203.0.113.10:443\n\t reno wscale:7,7\n";
        let conns = parse(out);
        assert_eq!(conns.len(), 3);
        assert_eq!(conns[0].peer, "10.244.1.10:5201".parse().unwrap());
        assert_eq!(conns[0].cc.as_deref(), Some("cubic"));
        assert_eq!(conns[1].local, "10.0.1.1:80".parse().unwrap());
        assert_eq!(conns[1].cc.as_deref(), Some("bbr"));
        assert_eq!(conns[2].cc.as_deref(), Some("reno"));
    }

    #[test]
    fn an_info_line_without_an_algorithm_gives_none() {
        let conns = parse("ESTAB 0 0 1.2.3.4:1 5.6.7.8:2\n\t wscale:7,7 rto:204\n");
        assert_eq!(conns[0].cc, None);
    }

    #[test]
    fn kernel_sockets_match_the_peer_column_in_any_state() {
        let out = "ESTAB 0 0 10.0.2.1:40122 203.0.113.10:5201\nTIME-WAIT 0 0 10.0.2.1:40124 203.0.113.10:5201\nLISTEN 0 128 0.0.0.0:5201 0.0.0.0:*\nESTAB 0 0 203.0.113.10:5201 10.0.2.1:5\n";
        let peer = "203.0.113.10:5201".parse().unwrap();
        let lines = sockets_in(out, peer);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[1].starts_with("TIME-WAIT"));
    }
}
