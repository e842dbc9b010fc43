//! The user-space stack instance's control socket (`stackroute-stackd`), used by the shim and by
//! `stackroute connections`.
//!
//! One instance serves one network namespace (a pod, or a standalone caller's namespace). It
//! listens on an **abstract** `AF_UNIX` `SOCK_SEQPACKET` socket named [`socket_name`] — abstract
//! names are scoped by network namespace, so every process of the pod reaches its own instance
//! with no file in a shared directory. Each packet is one JSON message (at most
//! [`MAX_MESSAGE`] bytes); one request, one reply, then either side may close.
//!
//! A relayed connection: the shim creates an `AF_UNIX` stream socketpair, keeps one end on the
//! application's fd number, writes [`RelayRequest::Connect::filler`] bytes into it (so the
//! application's end is not writable until the TCP handshake completes, as a connecting TCP
//! socket is not), and sends the other end with `SCM_RIGHTS` on the `Connect` packet. The
//! instance discards exactly `filler` bytes once the connection is established, then relays
//! bytes both ways; on failure it closes its end and keeps the error for [`RelayRequest::Status`].
//! The shim checks the instance's pid with `SO_PEERCRED` against the pid the agent named, so a
//! process squatting the abstract name is never handed a connection.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Largest message either side accepts, in bytes (a `Connections` reply is paged to fit).
pub const MAX_MESSAGE: usize = 60 * 1024;

/// One message as a packet (JSON); `None` if it does not fit [`MAX_MESSAGE`].
pub fn to_packet<T: Serialize>(message: &T) -> Option<Vec<u8>> {
    serde_json::to_vec(message)
        .ok()
        .filter(|bytes| bytes.len() <= MAX_MESSAGE)
}

/// A message from a packet.
pub fn from_packet<T: serde::de::DeserializeOwned>(packet: &[u8]) -> Result<T, String> {
    if packet.len() > MAX_MESSAGE {
        return Err(format!(
            "packet of {} bytes exceeds {MAX_MESSAGE}",
            packet.len()
        ));
    }
    serde_json::from_slice(packet).map_err(|e| e.to_string())
}

/// The instance's abstract socket name (without the leading NUL) for a tag the agent chooses.
pub fn socket_name(tag: &str) -> String {
    format!("stackroute-stackd.{tag}")
}

/// A request on the instance's control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum RelayRequest {
    /// Open a TCP connection to `remote` and relay it to the socket end passed with this
    /// packet (`SCM_RIGHTS`, exactly one fd).
    #[serde(rename_all = "camelCase")]
    Connect {
        /// Where to connect (after Service resolution, if any).
        remote: SocketAddr,
        /// What the application asked for, reported by `getpeername` (a Service ClusterIP);
        /// `remote` when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        original: Option<SocketAddr>,
        /// `Default`, `Cubic`, `BBR` or `Reno`.
        congestion_control: String,
        /// `TCP_NODELAY`.
        #[serde(default)]
        nodelay: bool,
        /// Bytes the shim wrote into the application's end before handing it over; the
        /// instance discards them once the connection is established.
        #[serde(default)]
        filler: u64,
    },
    /// The state of a connection this instance relays or relayed.
    #[serde(rename_all = "camelCase")]
    Status {
        /// The id `Connecting` returned.
        id: u64,
    },
    /// Set an option on a relayed connection.
    #[serde(rename_all = "camelCase")]
    SetOption {
        /// The connection.
        id: u64,
        /// The option.
        option: RelayOption,
    },
    /// Dual listen: the application listens on `port` (a kernel listener, bound to `address`);
    /// the instance also accepts user-space peers' connections to that port on the wire (peers
    /// whose source port is in the user-space range, which the kernel of this namespace never
    /// sees) and delivers each into the application's accept queue as a kernel TCP connection
    /// it makes to `address` over loopback. Idempotent; answered `Done`.
    #[serde(rename_all = "camelCase")]
    Listen {
        /// The application's listening address (`0.0.0.0:PORT` for a wildcard bind).
        address: SocketAddr,
    },
    /// The application's listener on `address` closed: stop accepting for it. Answered `Done`.
    #[serde(rename_all = "camelCase")]
    Unlisten {
        /// The address given to `Listen`.
        address: SocketAddr,
    },
    /// Who is really at the other end of a connection the application accepted from the
    /// instance: `local` is the instance's end of the loopback connection (what the accepted
    /// socket's `getpeername` shows). Answered `Peer`.
    #[serde(rename_all = "camelCase")]
    PeerOf {
        /// The loopback address and port the accepted socket's peer has.
        local: SocketAddr,
    },
    /// RDMA upgrade: open a queue pair with the instance's verbs provider, for the endpoint the
    /// upgrade exchange carries. Answered `RdmaOpened`, or `RdmaRefused` with the reason.
    RdmaOpen,
    /// RDMA upgrade: connect the queue pair `token` to the peer's endpoint and relay the
    /// application's socket end (the first descriptor) over it, watching the TCP connection
    /// the exchange ran on (the second) for the peer's death. Answered `Connecting`, or
    /// `RdmaRefused`; the queue pair is spent either way.
    #[serde(rename_all = "camelCase")]
    RdmaRelay {
        /// What `RdmaOpened` said.
        token: u64,
        /// The peer's endpoint, from its Proposal or Accept.
        peer: RdmaEndpoint,
        /// The TCP connection's local address (what `getsockname` keeps reporting).
        local: SocketAddr,
        /// Its remote address.
        remote: SocketAddr,
        /// How long connecting may take, in milliseconds (what is left of the exchange's
        /// deadline).
        timeout_ms: u32,
    },
    /// The connections, for `stackroute connections`: at most `limit` from the `after`th on.
    #[serde(rename_all = "camelCase")]
    Connections {
        /// Skip connections with an id up to this one.
        #[serde(default)]
        after: u64,
        /// At most this many (the instance may return fewer to fit [`MAX_MESSAGE`]).
        #[serde(default = "default_page")]
        limit: u32,
    },
}

fn default_page() -> u32 {
    100
}

/// An option of a relayed connection (what `setsockopt` forwards).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "name", content = "value", rename_all = "camelCase")]
pub enum RelayOption {
    /// `TCP_NODELAY`.
    NoDelay(bool),
    /// `SO_KEEPALIVE`.
    Keepalive(bool),
    /// `TCP_CONGESTION`: `cubic`, `bbr` or `reno`.
    CongestionControl(String),
    /// `SO_SNDBUF` in bytes.
    SendBuffer(u32),
    /// `SO_RCVBUF` in bytes.
    ReceiveBuffer(u32),
    /// Abort with a reset when the application closes (`SO_LINGER {1, 0}`).
    ResetOnClose(bool),
}

/// Where a relayed connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayState {
    /// Handshake in progress.
    Connecting,
    /// Established (data may flow; either side may have half-closed).
    Established,
    /// Closed cleanly (FIN both ways, or the application closed).
    Closed,
    /// The peer reset it, or it timed out after being established: reads report
    /// `ECONNRESET`/`ETIMEDOUT` (the `error`), never a clean end of file.
    Reset,
    /// The handshake failed (`error` says how: `ECONNREFUSED`, `ETIMEDOUT`, …).
    Failed,
}

/// A reply from the instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
// One reply at a time, built and dropped at once: a boxed `Status` would save nothing.
#[allow(clippy::large_enum_variant)]
pub enum RelayResponse {
    /// The connection was started (SYN sent).
    #[serde(rename_all = "camelCase")]
    Connecting {
        /// Its id on this instance.
        id: u64,
        /// The local address the instance chose (what `getsockname` reports).
        local: SocketAddr,
    },
    /// The answer to [`RelayRequest::Status`].
    #[serde(rename_all = "camelCase")]
    Status {
        /// The connection.
        id: u64,
        /// Its state.
        state: RelayState,
        /// The errno that describes a `Reset` or `Failed` state.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<i32>,
        /// `TCP_INFO`-like figures.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        info: Option<ConnectionInfo>,
    },
    /// An option was applied, a listener added or removed.
    Done,
    /// The answer to [`RelayRequest::PeerOf`]: the remote address on the wire and the
    /// connection's id, or `None` when that loopback connection is not the instance's.
    #[serde(rename_all = "camelCase")]
    Peer {
        /// The user-space peer, as the application would see it without the relay.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        remote: Option<SocketAddr>,
        /// The connection's id on the instance.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// The answer to [`RelayRequest::Connections`].
    #[serde(rename_all = "camelCase")]
    Connections {
        /// This page, by increasing id.
        connections: Vec<ConnectionInfo>,
        /// Whether more follow (ask again with `after` = the last id).
        more: bool,
    },
    /// The answer to [`RelayRequest::RdmaOpen`].
    #[serde(rename_all = "camelCase")]
    RdmaOpened {
        /// Names the queue pair in `RdmaRelay`.
        token: u64,
        /// Its endpoint, for the Proposal or Accept.
        endpoint: RdmaEndpoint,
    },
    /// An RDMA request refused: the upgrade falls back to TCP with `reason`.
    #[serde(rename_all = "camelCase")]
    RdmaRefused {
        /// A reason name of the upgrade exchange (`no-device`, `rdma-error`, …).
        reason: String,
        /// For people: what exactly failed.
        detail: String,
    },
    /// The request failed; `errno` is what the application should see.
    #[serde(rename_all = "camelCase")]
    Error {
        /// What was wrong.
        message: String,
        /// An errno for the application (`ENOBUFS` when out of ports or connections, …).
        errno: i32,
    },
}

/// An RDMA endpoint as the upgrade exchange carries it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RdmaEndpoint {
    /// The port's GID.
    pub gid: [u8; 16],
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
}

/// One relayed connection, as `stackroute connections` prints it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionInfo {
    /// Id on the instance.
    pub id: u64,
    /// Local address.
    pub local: SocketAddr,
    /// Remote address on the wire.
    pub remote: SocketAddr,
    /// What the application connected to, when it differs from `remote` (a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<SocketAddr>,
    /// The TCP state (`SYN-SENT`, `ESTABLISHED`, `FIN-WAIT-1`, …).
    pub tcp_state: String,
    /// Relay state.
    pub state: RelayState,
    /// Congestion control in use (`BBR`, `Cubic`, `Reno`).
    pub congestion_control: String,
    /// Payload bytes sent (acknowledged or not).
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Segments retransmitted.
    pub retransmits: u64,
    /// Smoothed RTT in microseconds.
    pub smoothed_rtt_us: u64,
    /// Minimum RTT in microseconds.
    pub min_rtt_us: u64,
    /// The latest delivery-rate estimate in bits per second.
    pub delivery_rate_bps: u64,
    /// Congestion window in bytes.
    pub cwnd_bytes: u64,
    /// `RDMA` for a connection relayed over a queue pair (its TCP figures are zero); absent
    /// for the user-space stack's TCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// For an RDMA connection: the addresses its queue pairs' GIDs stand for (RoCE v2: the
    /// RDMA network's addresses, which differ from `local`/`remote` on a secondary network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma: Option<RdmaPath>,
}

/// Where an RDMA connection runs: the addresses of this side's and the peer's GIDs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RdmaPath {
    /// This side's GID as an address.
    pub local: IpAddr,
    /// The peer's GID as an address.
    pub remote: IpAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_json_form() {
        let connect = RelayRequest::Connect {
            remote: "10.0.0.2:80".parse().unwrap(),
            original: None,
            congestion_control: "BBR".into(),
            nodelay: false,
            filler: 212_992,
        };
        assert_eq!(
            serde_json::to_string(&connect).unwrap(),
            r#"{"kind":"connect","remote":"10.0.0.2:80","congestionControl":"BBR","nodelay":false,"filler":212992}"#
        );
        let status: RelayResponse =
            serde_json::from_str(r#"{"kind":"status","id":7,"state":"failed","error":111}"#)
                .unwrap();
        assert_eq!(
            status,
            RelayResponse::Status {
                id: 7,
                state: RelayState::Failed,
                error: Some(111),
                info: None
            }
        );
        let option = RelayRequest::SetOption {
            id: 1,
            option: RelayOption::NoDelay(true),
        };
        assert_eq!(
            serde_json::to_string(&option).unwrap(),
            r#"{"kind":"setOption","id":1,"option":{"name":"noDelay","value":true}}"#
        );
        assert!(serde_json::from_str::<RelayRequest>(r#"{"kind":"listen"}"#).is_err());
    }
}
