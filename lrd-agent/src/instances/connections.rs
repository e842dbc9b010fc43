//! The instances' connections as per-workload figures for `/metrics`: each running instance is
//! asked for its connections (`Connections` on its control socket) from a short-lived thread
//! that entered its network namespace — abstract socket names exist only there, and entering a
//! namespace changes only the calling thread, never the agent's runtime threads.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::AsFd as _;

use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};
use stackroute_local_api::relay::{
    ConnectionInfo, MAX_MESSAGE, RelayRequest, RelayResponse, RelayState, from_packet, to_packet,
};

use super::Record;

/// At most this many connections are read from one instance per collection.
const MAX_PER_INSTANCE: usize = 100_000;

/// One workload's connections, summed over its instance's live and recently finished ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Totals {
    /// Connections by relay state (`connecting`, `established`, `closed`, `reset`, `failed`).
    pub(super) by_state: BTreeMap<&'static str, u64>,
    /// Payload bytes sent.
    pub(super) bytes_sent: u64,
    /// Payload bytes received.
    pub(super) bytes_received: u64,
    /// Segments retransmitted.
    pub(super) retransmits: u64,
}

impl Totals {
    fn add(&mut self, connection: &ConnectionInfo) {
        *self
            .by_state
            .entry(state_name(connection.state))
            .or_default() += 1;
        self.bytes_sent += connection.bytes_sent;
        self.bytes_received += connection.bytes_received;
        self.retransmits += connection.retransmits;
    }
}

/// The label value of a relay state.
fn state_name(state: RelayState) -> &'static str {
    match state {
        RelayState::Connecting => "connecting",
        RelayState::Established => "established",
        RelayState::Closed => "closed",
        RelayState::Reset => "reset",
        RelayState::Failed => "failed",
    }
}

/// Totals per workload (`namespace/name`, or `netns:INODE` when unknown) of every instance that
/// answered.
pub(super) fn collect(records: &[Record]) -> BTreeMap<String, Totals> {
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    for record in records {
        let Ok(connections) = connections_of(record) else {
            continue;
        };
        let workload = record
            .workload
            .clone()
            .unwrap_or_else(|| format!("netns:{}", record.netns));
        let entry = totals.entry(workload).or_default();
        for connection in &connections {
            entry.add(connection);
        }
    }
    totals
}

/// Every connection of one instance, page by page.
fn connections_of(record: &Record) -> io::Result<Vec<ConnectionInfo>> {
    let namespace = File::open(format!("/proc/{}/ns/net", record.pid))?;
    let socket = stackroute_local_api::relay::socket_name(&record.tag);
    std::thread::spawn(move || -> io::Result<Vec<ConnectionInfo>> {
        move_into_link_name_space(namespace.as_fd(), Some(LinkNameSpaceType::Network))?;
        let mut all = Vec::new();
        let mut after = 0;
        while all.len() < MAX_PER_INSTANCE {
            match ask(&socket, &RelayRequest::Connections { after, limit: 100 })? {
                RelayResponse::Connections { connections, more } => {
                    let last = connections.last().map(|c| c.id);
                    all.extend(connections);
                    match (more, last) {
                        (true, Some(last)) => after = last,
                        _ => break,
                    }
                }
                _ => return Err(io::Error::other("unexpected answer")),
            }
        }
        Ok(all)
    })
    .join()
    .map_err(|_| io::Error::other("the query thread panicked"))?
}

/// One request on an instance's abstract control socket (this thread's namespace).
fn ask(socket: &str, request: &RelayRequest) -> io::Result<RelayResponse> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let timeout = Some(std::time::Duration::from_secs(1));
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, timeout)?;
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Send, timeout)?;
    rustix::net::connect(&fd, &SocketAddrUnix::new_abstract_name(socket.as_bytes())?)?;
    let packet = to_packet(request).ok_or_else(|| io::Error::other("request too large"))?;
    rustix::net::send(&fd, &packet, SendFlags::empty())?;
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let (len, _) = rustix::net::recv(&fd, &mut buffer[..], RecvFlags::empty())?;
    from_packet(&buffer[..len]).map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_by_state() {
        let connection = |state, sent, retransmits| ConnectionInfo {
            id: 1,
            local: "10.0.0.1:61000".parse().unwrap(),
            remote: "10.0.0.2:80".parse().unwrap(),
            original: None,
            tcp_state: "ESTABLISHED".into(),
            state,
            congestion_control: "bbr".into(),
            bytes_sent: sent,
            bytes_received: 7,
            retransmits,
            smoothed_rtt_us: 0,
            min_rtt_us: 0,
            delivery_rate_bps: 0,
            cwnd_bytes: 0,
            transport: None,
            rdma: None,
        };
        let mut totals = Totals::default();
        totals.add(&connection(RelayState::Established, 100, 1));
        totals.add(&connection(RelayState::Established, 50, 0));
        totals.add(&connection(RelayState::Reset, 1, 2));
        assert_eq!(totals.by_state["established"], 2);
        assert_eq!(totals.by_state["reset"], 1);
        assert_eq!(
            (totals.bytes_sent, totals.bytes_received, totals.retransmits),
            (151, 21, 3)
        );
    }
}
