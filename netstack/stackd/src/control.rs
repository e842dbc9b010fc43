//! The control socket: one JSON message per `SOCK_SEQPACKET` packet, a `Connect` carrying the
//! application's socket end by `SCM_RIGHTS` (`stackroute_local_api::relay`).

use std::io::{IoSliceMut, Write as _};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendFlags,
    SocketAddrUnix, SocketFlags, SocketType,
};
use stackroute_local_api::relay::{ConnectionInfo, MAX_MESSAGE, RelayRequest, RelayResponse};

/// Descriptors one packet may carry before the rest are cut (and closed by the kernel).
const MAX_FDS: usize = 4;

/// Listens on the abstract `SOCK_SEQPACKET` address `name` (no leading NUL), non-blocking.
pub(crate) fn listen(name: &str) -> rustix::io::Result<OwnedFd> {
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    let address = SocketAddrUnix::new_abstract_name(name.as_bytes())?;
    rustix::net::bind(&socket, &address)?;
    rustix::net::listen(&socket, 128)?;
    Ok(socket)
}

/// One packet received on a control connection.
#[derive(Debug)]
pub(crate) enum Packet {
    /// A packet (maybe empty, maybe truncated) and the descriptors it carried.
    Message {
        bytes: usize,
        truncated: bool,
        fds: Vec<OwnedFd>,
    },
    /// The peer closed the connection.
    Closed,
    /// Nothing more for now.
    WouldBlock,
}

/// Receives one packet into `buffer` (which should hold `MAX_MESSAGE + 1` bytes, so an
/// oversized packet shows as truncated).
pub(crate) fn receive(socket: impl AsFd, buffer: &mut [u8]) -> rustix::io::Result<Packet> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = loop {
        match rustix::net::recvmsg(
            &socket,
            &mut [IoSliceMut::new(buffer)],
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => return Ok(Packet::WouldBlock),
            other => break other?,
        }
    };
    let mut fds = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received_fds) = message {
            fds.extend(received_fds);
        }
    }
    if received.bytes == 0 && fds.is_empty() {
        return Ok(Packet::Closed);
    }
    Ok(Packet::Message {
        bytes: received.bytes,
        truncated: received
            .flags
            .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC),
        fds,
    })
}

/// Sends one reply packet without blocking; `Ok(false)` if the socket is full.
pub(crate) fn send(socket: impl AsFd, message: &[u8]) -> rustix::io::Result<bool> {
    loop {
        match rustix::net::send(&socket, message, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(_) => return Ok(true),
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// A request refused before it reached the relay: what to answer, and that the control
/// connection is closed afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) message: String,
    pub(crate) errno: i32,
}

impl Refusal {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            errno: Errno::INVAL.raw_os_error(),
        }
    }

    pub(crate) fn response(&self) -> RelayResponse {
        RelayResponse::Error {
            message: self.message.clone(),
            errno: self.errno,
        }
    }
}

/// Checks a packet's shape and decodes its request: at most [`MAX_MESSAGE`] bytes of JSON,
/// exactly one descriptor with a `Connect` and none with anything else.
pub(crate) fn decode(
    message: &[u8],
    truncated: bool,
    fd_count: usize,
) -> Result<RelayRequest, Refusal> {
    if truncated || message.len() > MAX_MESSAGE {
        return Err(Refusal {
            message: format!(
                "message above {MAX_MESSAGE} bytes, or with more than {MAX_FDS} descriptors"
            ),
            errno: Errno::MSGSIZE.raw_os_error(),
        });
    }
    let request: RelayRequest = serde_json::from_slice(message)
        .map_err(|e| Refusal::invalid(format!("not a relay request: {e}")))?;
    match (&request, fd_count) {
        (RelayRequest::Connect { .. }, 1) => Ok(request),
        (RelayRequest::Connect { .. }, n) => Err(Refusal::invalid(format!(
            "connect carries exactly one descriptor (SCM_RIGHTS), not {n}"
        ))),
        (RelayRequest::RdmaRelay { .. }, 2) => Ok(request),
        (RelayRequest::RdmaRelay { .. }, n) => Err(Refusal::invalid(format!(
            "rdmaRelay carries exactly two descriptors (the application's end, the TCP connection), not {n}"
        ))),
        (_, 0) => Ok(request),
        (_, n) => Err(Refusal::invalid(format!(
            "only connect and rdmaRelay carry descriptors, this request carried {n}"
        ))),
    }
}

/// The JSON of a response (always fits [`MAX_MESSAGE`]: pages are cut to fit, and error
/// messages are short).
pub(crate) fn encode(response: &RelayResponse) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(256);
    // Serialising these types cannot fail (no maps with non-string keys, no custom impls).
    serde_json::to_writer(&mut bytes, response).unwrap_or_else(|_| {
        bytes.clear();
        let _ = bytes.write_all(br#"{"kind":"error","message":"encoding failed","errno":5}"#);
    });
    bytes
}

/// A `Connections` page: up to `limit` items, cut further so the reply fits `max_bytes`.
pub(crate) fn page(
    connections: impl Iterator<Item = ConnectionInfo>,
    limit: usize,
    max_bytes: usize,
) -> RelayResponse {
    let envelope = encode(&RelayResponse::Connections {
        connections: Vec::new(),
        more: false,
    })
    .len();
    let mut size = envelope;
    let mut page = Vec::new();
    let mut more = false;
    for info in connections {
        if page.len() >= limit {
            more = true;
            break;
        }
        let item = serde_json::to_vec(&info).map_or(usize::MAX / 2, |b| b.len());
        let separator = usize::from(!page.is_empty());
        if size + item + separator > max_bytes {
            more = true;
            break;
        }
        size += item + separator;
        page.push(info);
    }
    RelayResponse::Connections {
        connections: page,
        more,
    }
}

#[cfg(test)]
mod tests {
    use stackroute_local_api::relay::RelayState;

    use super::*;

    fn info(id: u64) -> ConnectionInfo {
        ConnectionInfo {
            id,
            local: "10.0.0.1:61000".parse().unwrap(),
            remote: "10.0.0.2:5201".parse().unwrap(),
            original: Some("10.96.0.10:80".parse().unwrap()),
            tcp_state: "ESTABLISHED".into(),
            state: RelayState::Established,
            congestion_control: "BBR".into(),
            bytes_sent: u64::MAX,
            bytes_received: u64::MAX,
            retransmits: u64::MAX,
            smoothed_rtt_us: u64::MAX,
            min_rtt_us: u64::MAX,
            delivery_rate_bps: u64::MAX,
            cwnd_bytes: u64::MAX,
            transport: None,
            rdma: None,
        }
    }

    #[test]
    fn pages_stop_at_the_limit_or_the_message_size() {
        let RelayResponse::Connections { connections, more } =
            page((1..=10).map(info), 3, MAX_MESSAGE)
        else {
            panic!("not a page");
        };
        assert_eq!(
            connections.iter().map(|c| c.id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(more);
        let RelayResponse::Connections { connections, more } =
            page((1..=3).map(info), 3, MAX_MESSAGE)
        else {
            panic!("not a page");
        };
        assert_eq!(connections.len(), 3);
        assert!(!more, "exactly the limit, nothing after");
        // Thousands of the largest entries: cut to fit, and the reply really fits.
        let response = page((1..=5000).map(info), 5000, MAX_MESSAGE);
        let encoded = encode(&response);
        assert!(encoded.len() <= MAX_MESSAGE, "{} bytes", encoded.len());
        let RelayResponse::Connections { connections, more } = response else {
            panic!("not a page");
        };
        assert!(
            more && connections.len() > 100,
            "{} entries",
            connections.len()
        );
        let next = page((1..=5000).map(info), 5000, encoded.len() + 1);
        assert!(
            matches!(next, RelayResponse::Connections { ref connections, .. } if connections.len() >= 100)
        );
        assert!(matches!(
            page(std::iter::empty(), 100, MAX_MESSAGE),
            RelayResponse::Connections { ref connections, more: false } if connections.is_empty()
        ));
    }

    #[test]
    fn packets_are_checked_before_they_are_served() {
        let connect =
            br#"{"kind":"connect","remote":"10.0.0.2:80","congestionControl":"BBR","filler":5}"#;
        assert!(matches!(
            decode(connect, false, 1),
            Ok(RelayRequest::Connect { filler: 5, .. })
        ));
        for fds in [0, 2] {
            let refusal = decode(connect, false, fds).unwrap_err();
            assert_eq!(refusal.errno, 22);
            assert!(
                refusal.message.contains("exactly one"),
                "{}",
                refusal.message
            );
        }
        let status = br#"{"kind":"status","id":3}"#;
        assert_eq!(decode(status, false, 0), Ok(RelayRequest::Status { id: 3 }));
        assert_eq!(decode(status, false, 1).unwrap_err().errno, 22);
        assert_eq!(decode(status, true, 0).unwrap_err().errno, 90);
        assert_eq!(
            decode(&vec![b' '; MAX_MESSAGE + 1], false, 0)
                .unwrap_err()
                .errno,
            90
        );
        for garbage in [
            &b""[..],
            b"{",
            b"null",
            br#"{"kind":"listen"}"#,
            b"\xff\xfe",
        ] {
            assert_eq!(
                decode(garbage, false, 0).unwrap_err().errno,
                22,
                "{garbage:?}"
            );
        }
        // Connections has defaults for both fields.
        assert_eq!(
            decode(br#"{"kind":"connections"}"#, false, 0),
            Ok(RelayRequest::Connections {
                after: 0,
                limit: 100
            })
        );
    }
}
