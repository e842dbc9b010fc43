//! An **emulated** queue pair, for tests on machines without RDMA: one packet of an `AF_UNIX`
//! `SOCK_SEQPACKET` socket per SEND (immediate data, then payload), with the semantics of an RC
//! queue pair that the relay depends on and faults to inject. It drives the relay's real code
//! paths (credits, completions, error completions, a dead peer); nothing it does counts as RDMA
//! working.
//!
//! Two ways to build one:
//!
//! - [`pair`]: both ends in one process, joined by a socketpair (each end sends and receives on
//!   its socket);
//! - [`EmulatedQueuePair::across_processes`]: one end per process (or network namespace: a
//!   path-named socket is reached through the file system, not the network), each with a
//!   **send wire** it connected to the peer's listener and a **listener** of its own whose
//!   first connection — the peer's send wire — becomes its **receive wire**. That connection is
//!   accepted lazily, in [`poll`](QueuePair::poll), because the peer may connect after this
//!   end did, as an RDMA peer may reach RTR after this one; SENDs posted before then wait in
//!   the peer's listener queue, as they would in its posted receives. Whoever connects first
//!   is taken: there is no authentication beyond the listener's file permissions.
//!
//! What it keeps of RC semantics: messages arrive once, in order, each into one receive buffer
//! (a payload longer than a buffer is `IBV_WC_LOC_LEN_ERR`); a SEND completes once the peer's
//! side has it (its socket queue); messages that arrived are delivered by the same
//! [`poll`](QueuePair::poll) that reports an error completion, before it, as their receive
//! completions would be; a window of SENDs never waits, because the sender's socket
//! buffer is made to hold a window of full packets ([`reserve_window`]), as a receiver has its
//! buffers posted; a dead peer is noticed **only by sending** (`EPIPE` or `ECONNRESET` on the
//! send wire: `IBV_WC_RETRY_EXC_ERR`), never by a receiver — as on hardware, where only the
//! retry counter tells. What it does not keep: timing, registered memory, RDMA READ/WRITE,
//! the 24-bit sequence numbers — only SEND with immediate data exists.
//!
//! Its event fd is an epoll instance over the receive wire (or, until the peer connected, the
//! listener) and an eventfd for send and error completions, as pollable as a completion
//! channel. A receive wire that reached its end leaves the set, so the fd does not stay
//! readable for nothing.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{EventfdFlags, epoll, eventfd};
use rustix::io::{Errno, ioctl_fionbio, read, write};
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, accept_with, recv, send,
    socketpair, sockopt,
};
use stackroute_rdma_stream::Config;

use crate::queue_pair::{QueuePair, QueuePairError, Received};

/// Bytes of the immediate data in front of each packet's payload.
const IMMEDIATE_LEN: usize = 4;
/// What the kernel charges a sender per queued packet beyond twice its bytes, generously: the
/// `sk_buff`, and page rounding of a large packet's fragments. (Twice its bytes: a packet's
/// linear part is allocated rounded up to a power of two.)
const PACKET_OVERHEAD: usize = 8 * 1024;
/// The error completion of a SEND that finds the peer's queue pair gone.
const PEER_GONE: &str = "IBV_WC_RETRY_EXC_ERR: transport retry counter exceeded (emulated: the peer's queue pair is gone)";

/// Faults to inject at one end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// After this many SENDs, every further SEND completes with `IBV_WC_RETRY_EXC_ERR`.
    pub fail_after_sends: Option<u64>,
}

/// Where the peer's SENDs come from.
#[derive(Debug)]
enum Receive {
    /// The peer has not connected yet: the listener whose first connection becomes the wire.
    Listening(OwnedFd),
    /// The peer's send wire.
    Wire(OwnedFd),
    /// The peer's send wire reached its end (the peer's queue pair is gone).
    Closed,
}

/// One end of an emulated queue pair (see the module docs).
#[derive(Debug)]
pub struct EmulatedQueuePair {
    /// This end's SENDs; `None` once a SEND found the peer gone.
    send_wire: Option<OwnedFd>,
    /// The peer's SENDs.
    receive: Receive,
    /// Readable when there is something to poll: the receive wire's packets (or the
    /// listener's connection) or `completions`.
    epoll: OwnedFd,
    /// Signalled when a SEND completed or failed.
    completions: OwnedFd,
    config: Config,
    free_slots: usize,
    /// SENDs handed to the wire whose completion `poll` has not reported.
    completed: usize,
    sends: u64,
    faults: Faults,
    /// An error completion waiting for `poll`.
    error: Option<String>,
}

/// Socket send buffer a window of `config`'s full packets needs: an upper bound of what the
/// kernel charges for them (see [`PACKET_OVERHEAD`]).
fn window_bytes(config: &Config) -> usize {
    let packet = 2 * (IMMEDIATE_LEN + config.buffer) + PACKET_OVERHEAD;
    (config.window as usize).saturating_mul(packet)
}

/// Makes the send buffer of `socket` (an `AF_UNIX` `SOCK_SEQPACKET` socket that sends SENDs)
/// hold a window of `config`'s full packets, so that a window of SENDs never waits, as on RDMA
/// where the peer has a window of receives posted. It raises the buffer when it is smaller:
/// with `SO_SNDBUFFORCE` where the process may (`CAP_NET_ADMIN`), else with `SO_SNDBUF`, which
/// `net.core.wmem_max` caps. An error says how much was needed and how much there is.
pub fn reserve_window(socket: impl AsFd, config: &Config) -> io::Result<()> {
    let socket = socket.as_fd();
    let needed = window_bytes(config);
    let mut size = sockopt::socket_send_buffer_size(socket)?;
    if size < needed {
        // The kernel doubles what it is given (its bookkeeping share), and takes a C int.
        let asked = needed.div_ceil(2).min(i32::MAX as usize);
        if sockopt::set_socket_send_buffer_size_force(socket, asked).is_err() {
            // Capped at net.core.wmem_max; what it came to is checked below.
            let _ = sockopt::set_socket_send_buffer_size(socket, asked);
        }
        size = sockopt::socket_send_buffer_size(socket)?;
    }
    if size < needed {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a window of {} buffers of {} bytes needs {needed} bytes of socket send buffer, the emulation got {size}: raise net.core.wmem_max, give it CAP_NET_ADMIN (SO_SNDBUFFORCE) or use smaller buffers",
                config.window, config.buffer
            ),
        ));
    }
    Ok(())
}

fn check(config: &Config) -> io::Result<()> {
    config
        .check()
        .map_err(|message| io::Error::new(io::ErrorKind::InvalidInput, message))
}

/// Two connected ends with `window` send slots each, sized by `config`.
pub fn pair(
    config: Config,
    faults: (Faults, Faults),
) -> io::Result<(EmulatedQueuePair, EmulatedQueuePair)> {
    check(&config)?;
    let (a, b) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    reserve_window(&a, &config)?;
    reserve_window(&b, &config)?;
    // Each end sends and receives on its one socket (a duplicate of it is the send wire).
    let (send_a, send_b) = (a.try_clone()?, b.try_clone()?);
    Ok((
        EmulatedQueuePair::new(send_a, Receive::Wire(a), config, faults.0)?,
        EmulatedQueuePair::new(send_b, Receive::Wire(b), config, faults.1)?,
    ))
}

impl EmulatedQueuePair {
    /// One end of a queue pair whose other end is in another process (see the module docs):
    /// `send`, an `AF_UNIX` `SOCK_SEQPACKET` socket connected to the peer's listener, carries
    /// this end's SENDs; the first connection `listener` (a listening `AF_UNIX`
    /// `SOCK_SEQPACKET` socket, whose address the peer connects its send wire to) accepts
    /// becomes the receive wire, accepted in [`poll`](QueuePair::poll) whenever the peer
    /// connects. Both are made non-blocking; `send`'s buffer is made to hold a window
    /// ([`reserve_window`]), or this fails saying why.
    pub fn across_processes(
        send: OwnedFd,
        listener: OwnedFd,
        config: Config,
        faults: Faults,
    ) -> io::Result<Self> {
        check(&config)?;
        reserve_window(&send, &config)?;
        ioctl_fionbio(&send, true)?;
        ioctl_fionbio(&listener, true)?;
        Self::new(send, Receive::Listening(listener), config, faults)
    }

    fn new(
        send_wire: OwnedFd,
        receive: Receive,
        config: Config,
        faults: Faults,
    ) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let completions = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        let receiving = match &receive {
            Receive::Listening(fd) | Receive::Wire(fd) => Some(fd),
            Receive::Closed => None,
        };
        for fd in [Some(&completions), receiving].into_iter().flatten() {
            epoll::add(
                &epoll,
                fd,
                epoll::EventData::new_u64(0),
                epoll::EventFlags::IN,
            )?;
        }
        Ok(Self {
            send_wire: Some(send_wire),
            receive,
            epoll,
            completions,
            free_slots: config.window as usize,
            config,
            completed: 0,
            sends: 0,
            faults,
            error: None,
        })
    }

    /// Whether the peer has yet to connect its send wire: the listener is still waiting
    /// (false once [`poll`](QueuePair::poll) accepted it, and for a [`pair`]).
    pub fn awaiting_peer(&self) -> bool {
        matches!(self.receive, Receive::Listening(_))
    }

    fn signal(&self) {
        // An eventfd counter does not overflow at these rates; EAGAIN would mean it did.
        let _ = write(&self.completions, &1u64.to_ne_bytes());
    }

    fn fail(&mut self, why: String) {
        self.error.get_or_insert(why);
        self.signal();
    }

    /// The peer's send wire reached its end: it leaves the epoll set (a socket at its end
    /// stays readable).
    fn receive_closed(&mut self) {
        if let Receive::Wire(wire) = std::mem::replace(&mut self.receive, Receive::Closed) {
            let _ = epoll::delete(&self.epoll, &wire);
        }
    }

    /// Takes the peer's connection from the listener, if it is there: the receive wire.
    fn accept_peer(&mut self) -> Result<(), String> {
        let Receive::Listening(listener) = &self.receive else {
            return Ok(());
        };
        match accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
            Ok(wire) => {
                let _ = epoll::delete(&self.epoll, listener);
                epoll::add(
                    &self.epoll,
                    &wire,
                    epoll::EventData::new_u64(0),
                    epoll::EventFlags::IN,
                )
                .map_err(|errno| format!("emulated wire: epoll: {}", io::Error::from(errno)))?;
                // The listener closes here: nobody else gets in.
                self.receive = Receive::Wire(wire);
                Ok(())
            }
            // Not yet (or a connection that gave up before it was taken): the listener stays
            // in the epoll set and signals the next one.
            Err(Errno::AGAIN | Errno::INTR | Errno::CONNABORTED) => Ok(()),
            Err(errno) => Err(format!(
                "emulated wire: accepting the peer's connection: {}",
                io::Error::from(errno)
            )),
        }
    }

    /// Takes the peer's connection if it is there, then every packet on the receive wire.
    fn receive(&mut self, received: &mut Vec<Received>) -> Result<(), String> {
        self.accept_peer()?;
        let mut packet = vec![0u8; IMMEDIATE_LEN + self.config.buffer + 1];
        while let Receive::Wire(wire) = &self.receive {
            match recv(wire, &mut packet, RecvFlags::DONTWAIT) {
                Ok((0, _)) => self.receive_closed(),
                Ok((n, _)) if n < IMMEDIATE_LEN || n > IMMEDIATE_LEN + self.config.buffer => {
                    return Err(format!(
                        "IBV_WC_LOC_LEN_ERR: a message of {} bytes for buffers of {}",
                        n.saturating_sub(IMMEDIATE_LEN),
                        self.config.buffer
                    ));
                }
                Ok((n, _)) => received.push(Received {
                    immediate: u32::from_be_bytes(packet[..IMMEDIATE_LEN].try_into().unwrap()),
                    payload: packet[IMMEDIATE_LEN..n].to_vec(),
                }),
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(Errno::CONNRESET) => self.receive_closed(),
                Err(errno) => return Err(format!("emulated wire: {}", io::Error::from(errno))),
            }
        }
        Ok(())
    }
}

impl QueuePair for EmulatedQueuePair {
    fn send_slots(&self) -> usize {
        self.free_slots
    }

    fn post_send(&mut self, immediate: u32, payload: &[u8]) -> Result<(), QueuePairError> {
        if payload.len() > self.config.buffer {
            return Err(QueuePairError(format!(
                "a SEND of {} bytes is longer than a buffer ({})",
                payload.len(),
                self.config.buffer
            )));
        }
        assert!(self.free_slots > 0, "post_send without a free send slot");
        self.free_slots -= 1;
        self.sends += 1;
        if self
            .faults
            .fail_after_sends
            .is_some_and(|limit| self.sends > limit)
        {
            self.fail(format!(
                "IBV_WC_RETRY_EXC_ERR: transport retry counter exceeded (emulated fault after {} SENDs)",
                self.sends - 1
            ));
            return Ok(());
        }
        let Some(wire) = &self.send_wire else {
            self.fail(PEER_GONE.into());
            return Ok(());
        };
        let mut packet = Vec::with_capacity(IMMEDIATE_LEN + payload.len());
        packet.extend_from_slice(&immediate.to_be_bytes());
        packet.extend_from_slice(payload);
        match send(wire, &packet, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(_) => {
                self.completed += 1;
                self.signal();
                Ok(())
            }
            Err(Errno::PIPE | Errno::CONNRESET) => {
                self.send_wire = None;
                self.fail(PEER_GONE.into());
                Ok(())
            }
            Err(errno) => Err(QueuePairError(format!(
                "emulated wire: {}",
                io::Error::from(errno)
            ))),
        }
    }

    fn poll(&mut self, received: &mut Vec<Received>) -> Result<(), QueuePairError> {
        let mut counter = [0u8; 8];
        let _ = read(&self.completions, &mut counter);
        // SENDs before a failed one completed (RC completes in order).
        self.free_slots += std::mem::take(&mut self.completed);
        // Messages that arrived count even when a SEND failed: on RC their receive completions
        // are in the completion queue too. A peer that finished its stream and closed makes
        // this side's last CREDIT fail while its FIN still waits here.
        if let Err(why) = self.receive(received) {
            self.error.get_or_insert(why);
        }
        match &self.error {
            Some(error) => Err(QueuePairError(error.clone())),
            None => Ok(()),
        }
    }

    fn event_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}
