//! One relayed connection: the application's socket end on one side, a stack connection on
//! the other, and the rules the application observes (see the crate docs and the shim's
//! `relay` protocol): no byte read from the application before the handshake completes, then
//! exactly `filler` bytes discarded, bytes moved both ways only as far as the other side
//! takes them, half-closes passed through, resets and failures remembered as an errno.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use rustix::io::Errno;
use stackroute_local_api::relay::{ConnectionInfo, RelayState};
use stackroute_netstack::{SocketError, SocketHandle, Stack, TcpError, TcpState};

/// How a relayed connection ended, as far as the relay is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum End {
    /// Both directions finished (FIN each way): the stack finishes the connection (ACKs,
    /// TIME-WAIT) on its own.
    Closed,
    /// The application went away without a clean close (it closed with unread data, or its end
    /// refused our bytes), or asked for a reset on close: abort with a RST.
    AppReset,
    /// The handshake failed with this errno.
    Failed(i32),
    /// The established connection was reset or timed out: this errno.
    Reset(i32),
    /// Dual listen: the loopback connection to the application's listener failed with this
    /// errno (`ECONNREFUSED`: it no longer listens); the wire connection is reset.
    LoopbackFailed(i32),
}

impl End {
    /// The relay state `Status` reports afterwards, and its errno.
    pub(crate) fn state(self) -> (RelayState, Option<i32>) {
        match self {
            Self::Closed | Self::AppReset => (RelayState::Closed, None),
            Self::Failed(errno) | Self::LoopbackFailed(errno) => (RelayState::Failed, Some(errno)),
            Self::Reset(errno) => (RelayState::Reset, Some(errno)),
        }
    }
}

/// The errno an application sees for a TCP failure.
pub(crate) fn errno_of(error: Option<TcpError>) -> i32 {
    match error {
        Some(TcpError::Refused) => Errno::CONNREFUSED,
        Some(TcpError::Reset) | None => Errno::CONNRESET,
        Some(TcpError::TimedOut) => Errno::TIMEDOUT,
        Some(TcpError::Aborted) => Errno::CONNABORTED,
    }
    .raw_os_error()
}

/// Bytes the shim pre-filled that still have to be read and dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Filler {
    left: u64,
}

impl Filler {
    pub(crate) fn new(bytes: u64) -> Self {
        Self { left: bytes }
    }

    /// How many bytes the next read may take without reaching into the application's data.
    pub(crate) fn next_read(&self, buffer: usize) -> usize {
        usize::try_from(self.left).map_or(buffer, |left| left.min(buffer))
    }

    /// `n` filler bytes were read.
    pub(crate) fn consumed(&mut self, n: usize) {
        self.left = self.left.saturating_sub(n as u64);
    }

    pub(crate) fn done(&self) -> bool {
        self.left == 0
    }
}

/// The application's side of a relay: our end of the shim's socket pair (a connection the
/// application opened), or our kernel TCP connection to the application's listener over
/// loopback (a connection a user-space peer opened to it: dual listen).
#[derive(Debug)]
pub(crate) enum AppSocket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl AppSocket {
    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Self::Unix(socket) => socket.shutdown(Shutdown::Write),
            Self::Tcp(socket) => socket.shutdown(Shutdown::Write),
        }
    }

    /// Closes a loopback connection with a RST (`SO_LINGER {1, 0}`), so the application reads
    /// `ECONNRESET` as it would from the peer; a socket pair end just closes.
    pub(crate) fn close_with_reset(self) {
        if let Self::Tcp(socket) = &self {
            let _ =
                rustix::net::sockopt::set_socket_linger(socket, Some(std::time::Duration::ZERO));
        }
    }
}

impl AsRawFd for AppSocket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Unix(socket) => socket.as_raw_fd(),
            Self::Tcp(socket) => socket.as_raw_fd(),
        }
    }
}

impl Read for AppSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(socket) => socket.read(buf),
            Self::Tcp(socket) => socket.read(buf),
        }
    }
}

impl Write for AppSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(socket) => socket.write(buf),
            Self::Tcp(socket) => socket.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A relayed connection while it lives.
#[derive(Debug)]
pub(crate) struct Relay {
    pub(crate) id: u64,
    pub(crate) handle: SocketHandle,
    /// The application's side (non-blocking).
    pub(crate) socket: AppSocket,
    pub(crate) local: SocketAddr,
    pub(crate) remote: SocketAddr,
    pub(crate) original: Option<SocketAddr>,
    /// Dual listen: our end of the loopback connection to the application's listener (what
    /// the application's accepted socket has as its peer).
    pub(crate) loopback: Option<SocketAddr>,
    /// Dual listen: the loopback connection is not established yet (nothing is read from the
    /// wire connection until it is: its window closes).
    app_connecting: bool,
    pub(crate) established: bool,
    pub(crate) reset_on_close: bool,
    filler: Filler,
    /// Readiness of `socket` as last seen (its events are edge-triggered).
    pub(crate) socket_readable: bool,
    pub(crate) socket_writable: bool,
    /// Read from the application, not yet taken by the stack (at most one read's worth).
    to_stack: Vec<u8>,
    /// Taken from the stack, not yet accepted by the application (at most one read's worth).
    to_app: Vec<u8>,
    /// The application shut down its write side (end of file on our end).
    app_eof: bool,
    /// Our FIN is queued.
    fin_queued: bool,
    /// The peer's FIN was read from the stack.
    peer_eof: bool,
    /// The application was given end of file.
    app_shut: bool,
}

/// What one [`Relay::pump`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pumped {
    /// Bytes moved, or the state changed.
    pub(crate) progress: bool,
    /// The relay is over.
    pub(crate) end: Option<End>,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        handle: SocketHandle,
        socket: UnixStream,
        local: SocketAddr,
        remote: SocketAddr,
        original: Option<SocketAddr>,
        filler: u64,
    ) -> Self {
        Self::build(
            id,
            handle,
            AppSocket::Unix(socket),
            local,
            remote,
            original,
            filler,
        )
    }

    fn build(
        id: u64,
        handle: SocketHandle,
        socket: AppSocket,
        local: SocketAddr,
        remote: SocketAddr,
        original: Option<SocketAddr>,
        filler: u64,
    ) -> Self {
        Self {
            id,
            handle,
            socket,
            local,
            remote,
            original,
            loopback: None,
            app_connecting: false,
            established: false,
            reset_on_close: false,
            filler: Filler::new(filler),
            socket_readable: true,
            socket_writable: true,
            to_stack: Vec::new(),
            to_app: Vec::new(),
            app_eof: false,
            fin_queued: false,
            peer_eof: false,
            app_shut: false,
        }
    }

    /// Dual listen: a wire connection the stack accepted, relayed to `socket`, a non-blocking
    /// kernel connection to the application's listener from `loopback` (connected already, or
    /// still connecting).
    pub(crate) fn accepted(
        id: u64,
        handle: SocketHandle,
        socket: TcpStream,
        local: SocketAddr,
        remote: SocketAddr,
        loopback: SocketAddr,
    ) -> Self {
        let mut relay = Self::build(id, handle, AppSocket::Tcp(socket), local, remote, None, 0);
        relay.loopback = Some(loopback);
        relay.app_connecting = true;
        relay.socket_readable = false;
        relay.socket_writable = false;
        relay
    }

    /// Moves what can be moved now, until each direction waits for something: the handshake,
    /// the application's socket (readable or writable), or the stack (room or data).
    pub(crate) fn pump(&mut self, stack: &mut Stack, scratch: &mut [u8]) -> Pumped {
        let mut pumped = Pumped::default();
        if !self.established {
            match stack.state(self.handle) {
                Ok(TcpState::SynSent | TcpState::SynReceived) => return pumped,
                Ok(TcpState::Closed) | Err(_) => {
                    let error = stack.error(self.handle).ok().flatten();
                    let errno = match error {
                        None => Errno::CONNREFUSED.raw_os_error(),
                        some => errno_of(some),
                    };
                    pumped.end = Some(End::Failed(errno));
                    return pumped;
                }
                Ok(_) => {
                    self.established = true;
                    pumped.progress = true;
                }
            }
        }
        if let Ok(Some(error)) = stack.error(self.handle) {
            pumped.end = Some(End::Reset(errno_of(Some(error))));
            return pumped;
        }
        if self.app_connecting {
            // A non-blocking connect completes (or fails) with a writable edge.
            if !self.socket_writable {
                return pumped;
            }
            let outcome = match &self.socket {
                AppSocket::Tcp(socket) => socket.take_error(),
                AppSocket::Unix(_) => Ok(None),
            };
            match outcome {
                Ok(None) => {
                    self.app_connecting = false;
                    self.socket_readable = true;
                    pumped.progress = true;
                }
                Ok(Some(e)) | Err(e) => {
                    let errno = e
                        .raw_os_error()
                        .unwrap_or(Errno::CONNREFUSED.raw_os_error());
                    pumped.end = Some(End::LoopbackFailed(errno));
                    return pumped;
                }
            }
        }
        let result = self
            .discard_filler(scratch)
            .and_then(|()| self.app_to_stack(stack, scratch, &mut pumped))
            .and_then(|()| self.stack_to_app(stack, scratch, &mut pumped));
        if let Err(end) = result {
            pumped.end = Some(end);
        } else if self.fin_queued && self.app_shut {
            pumped.end = Some(End::Closed);
        }
        pumped
    }

    fn discard_filler(&mut self, scratch: &mut [u8]) -> Result<(), End> {
        while !self.filler.done() && self.socket_readable && !self.app_eof {
            let want = self.filler.next_read(scratch.len());
            match self.socket.read(&mut scratch[..want]) {
                Ok(0) => {
                    // Fewer bytes than announced: nothing of the application's follows.
                    self.app_eof = true;
                    self.filler = Filler::new(0);
                }
                Ok(n) => self.filler.consumed(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.socket_readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(End::AppReset),
            }
        }
        Ok(())
    }

    fn app_to_stack(
        &mut self,
        stack: &mut Stack,
        scratch: &mut [u8],
        pumped: &mut Pumped,
    ) -> Result<(), End> {
        loop {
            if !self.to_stack.is_empty() {
                let sent = send(stack, self.handle, &self.to_stack)?;
                if sent == 0 {
                    // The stack's Writable event brings us back.
                    return Ok(());
                }
                self.to_stack.drain(..sent);
                if self.to_stack.is_empty() {
                    self.to_stack = Vec::new();
                }
                pumped.progress = true;
                continue;
            }
            if self.app_eof || !self.filler.done() || !self.socket_readable {
                break;
            }
            match self.socket.read(scratch) {
                Ok(0) => self.app_eof = true,
                Ok(n) => {
                    pumped.progress = true;
                    let sent = send(stack, self.handle, &scratch[..n])?;
                    self.to_stack.extend_from_slice(&scratch[sent..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.socket_readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(End::AppReset),
            }
        }
        if self.app_eof && self.filler.done() && self.to_stack.is_empty() && !self.fin_queued {
            if self.reset_on_close {
                return Err(End::AppReset);
            }
            let _ = stack.shutdown(self.handle);
            self.fin_queued = true;
            pumped.progress = true;
        }
        Ok(())
    }

    fn stack_to_app(
        &mut self,
        stack: &mut Stack,
        scratch: &mut [u8],
        pumped: &mut Pumped,
    ) -> Result<(), End> {
        loop {
            if !self.to_app.is_empty() {
                if !self.socket_writable {
                    return Ok(());
                }
                match self.socket.write(&self.to_app) {
                    Ok(n) => {
                        self.to_app.drain(..n);
                        if self.to_app.is_empty() {
                            self.to_app = Vec::new();
                        }
                        pumped.progress = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.socket_writable = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(End::AppReset),
                }
                continue;
            }
            // Unread data stays in the stack (its window closes) until the application takes
            // what we hold.
            if self.peer_eof || !self.socket_writable {
                break;
            }
            match stack.recv(self.handle, scratch) {
                Ok(0) => {
                    self.peer_eof = true;
                    pumped.progress = true;
                }
                Ok(n) => {
                    pumped.progress = true;
                    self.to_app.extend_from_slice(&scratch[..n]);
                }
                Err(SocketError::WouldBlock) => break,
                Err(SocketError::Connection(error)) => {
                    return Err(End::Reset(errno_of(Some(error))));
                }
                Err(_) => break,
            }
        }
        if self.peer_eof && self.to_app.is_empty() && !self.app_shut {
            let _ = self.socket.shutdown_write();
            self.app_shut = true;
            pumped.progress = true;
        }
        Ok(())
    }

    /// The relay state while it lives.
    pub(crate) fn state(&self) -> RelayState {
        if self.established && !self.app_connecting {
            RelayState::Established
        } else {
            RelayState::Connecting
        }
    }

    /// `Status`/`Connections` figures from the stack.
    pub(crate) fn info(&self, stack: &Stack, state: RelayState) -> ConnectionInfo {
        let mut info = ConnectionInfo {
            id: self.id,
            local: self.local,
            remote: self.remote,
            original: self.original,
            tcp_state: stack
                .state(self.handle)
                .map_or("CLOSED", tcp_state_name)
                .to_owned(),
            state,
            congestion_control: stack
                .congestion_control_name(self.handle)
                .unwrap_or("")
                .to_owned(),
            bytes_sent: 0,
            bytes_received: 0,
            retransmits: 0,
            smoothed_rtt_us: 0,
            min_rtt_us: 0,
            delivery_rate_bps: 0,
            cwnd_bytes: 0,
            transport: None,
            rdma: None,
        };
        if let Ok(stats) = stack.connection_stats(self.handle) {
            info.bytes_sent = stats.bytes_written;
            info.bytes_received = stats.bytes_read;
            info.retransmits = stats.retransmits;
            info.smoothed_rtt_us = stats.smoothed_rtt_us;
            info.min_rtt_us = stats.min_rtt_us;
            info.delivery_rate_bps = stats.bandwidth_estimate.saturating_mul(8);
            info.cwnd_bytes = stats.cwnd;
        }
        info
    }
}

/// `Stack::send` with "no room" as 0 and failures as how the relay ends.
fn send(stack: &mut Stack, handle: SocketHandle, bytes: &[u8]) -> Result<usize, End> {
    match stack.send(handle, bytes) {
        Ok(n) => Ok(n),
        Err(SocketError::WouldBlock) => Ok(0),
        Err(SocketError::Connection(error)) => Err(End::Reset(errno_of(Some(error)))),
        // Closed under us without an error recorded (it cannot be written any more).
        Err(_) => Err(End::Reset(Errno::CONNRESET.raw_os_error())),
    }
}

/// The TCP state as `ss` and RFC 9293 spell it.
pub(crate) fn tcp_state_name(state: TcpState) -> &'static str {
    match state {
        TcpState::Closed => "CLOSED",
        TcpState::SynSent => "SYN-SENT",
        TcpState::SynReceived => "SYN-RECEIVED",
        TcpState::Established => "ESTABLISHED",
        TcpState::FinWait1 => "FIN-WAIT-1",
        TcpState::FinWait2 => "FIN-WAIT-2",
        TcpState::CloseWait => "CLOSE-WAIT",
        TcpState::Closing => "CLOSING",
        TcpState::LastAck => "LAST-ACK",
        TcpState::TimeWait => "TIME-WAIT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filler_reads_never_reach_past_the_filler() {
        let mut filler = Filler::new(212_992 + 5);
        let mut read = 0u64;
        while !filler.done() {
            let n = filler.next_read(65536);
            assert!(n > 0 && n <= 65536);
            filler.consumed(n);
            read += n as u64;
        }
        assert_eq!(read, 212_997);
        assert_eq!(filler.next_read(65536), 0);
        // A short read leaves the rest to discard.
        let mut filler = Filler::new(10);
        assert_eq!(filler.next_read(4), 4);
        filler.consumed(3);
        assert_eq!(filler.next_read(65536), 7);
        assert!(Filler::new(0).done());
    }

    #[test]
    fn ends_map_to_the_states_and_errnos_the_shim_reports() {
        assert_eq!(End::Closed.state(), (RelayState::Closed, None));
        assert_eq!(End::AppReset.state(), (RelayState::Closed, None));
        let refused = errno_of(Some(TcpError::Refused));
        assert_eq!(refused, 111);
        assert_eq!(
            End::Failed(refused).state(),
            (RelayState::Failed, Some(111))
        );
        assert_eq!(errno_of(Some(TcpError::Reset)), 104);
        assert_eq!(errno_of(Some(TcpError::TimedOut)), 110);
        assert_eq!(End::Reset(104).state(), (RelayState::Reset, Some(104)));
    }
}
