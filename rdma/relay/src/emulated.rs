//! An **emulated** queue pair, for tests on machines without RDMA: two ends joined by an
//! `AF_UNIX` `SOCK_SEQPACKET` socketpair, one packet per SEND (immediate data, then payload),
//! with the semantics of an RC queue pair that the relay depends on and faults to inject.
//! It drives the relay's real code paths (credits, completions, error completions, a dead
//! peer); nothing it does counts as RDMA working.
//!
//! What it keeps of RC semantics: messages arrive once, in order, each into one receive buffer
//! (a payload longer than a buffer is `IBV_WC_LOC_LEN_ERR`); a SEND completes once the peer's
//! side has it; a dead peer is noticed **only by sending** (`IBV_WC_RETRY_EXC_ERR`), never by
//! a receiver — as on hardware, where only the retry counter tells. Its event fd is an epoll
//! instance over the packets and an eventfd for send and error completions, as pollable as a
//! completion channel.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::event::{EventfdFlags, epoll, eventfd};
use rustix::io::{Errno, read, write};
use rustix::net::{
    AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType, recv, send, socketpair, sockopt,
};
use stackroute_rdma_stream::Config;

use crate::queue_pair::{QueuePair, QueuePairError, Received};

/// Bytes of the immediate data in front of each packet's payload.
const IMMEDIATE_LEN: usize = 4;
/// What the kernel charges per queued packet beyond its bytes (an skb), generously.
const PACKET_OVERHEAD: usize = 1024;

/// Faults to inject at one end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// After this many SENDs, every further SEND completes with `IBV_WC_RETRY_EXC_ERR`.
    pub fail_after_sends: Option<u64>,
}

/// One end of an emulated queue pair (see the module docs).
#[derive(Debug)]
pub struct EmulatedQueuePair {
    /// The packets; `None` once the peer's end is gone.
    wire: Option<OwnedFd>,
    /// Readable when there is something to poll: the wire's packets or `completions`.
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

/// Two connected ends with `window` send slots each, sized by `config`.
pub fn pair(
    config: Config,
    faults: (Faults, Faults),
) -> io::Result<(EmulatedQueuePair, EmulatedQueuePair)> {
    config
        .check()
        .map_err(|message| io::Error::new(io::ErrorKind::InvalidInput, message))?;
    let (a, b) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    // A real receiver has all its buffers posted, so a window of SENDs never waits: the
    // socket buffer must hold a window of packets, or the emulation would block where RDMA
    // would not.
    let needed = config.window as usize * (config.buffer + IMMEDIATE_LEN + PACKET_OVERHEAD);
    for end in [&a, &b] {
        let size = sockopt::socket_send_buffer_size(end)?;
        if size < needed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a window of {} buffers of {} bytes needs {needed} bytes of socket buffer, the emulation has {size}: use smaller buffers",
                    config.window, config.buffer
                ),
            ));
        }
    }
    Ok((
        EmulatedQueuePair::new(a, config, faults.0)?,
        EmulatedQueuePair::new(b, config, faults.1)?,
    ))
}

impl EmulatedQueuePair {
    fn new(wire: OwnedFd, config: Config, faults: Faults) -> io::Result<Self> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
        let completions = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        for fd in [&wire, &completions] {
            epoll::add(
                &epoll,
                fd,
                epoll::EventData::new_u64(0),
                epoll::EventFlags::IN,
            )?;
        }
        Ok(Self {
            wire: Some(wire),
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

    fn signal(&self) {
        // An eventfd counter does not overflow at these rates; EAGAIN would mean it did.
        let _ = write(&self.completions, &1u64.to_ne_bytes());
    }

    fn fail(&mut self, why: String) {
        self.error.get_or_insert(why);
        self.signal();
    }

    fn peer_gone(&mut self) {
        if let Some(wire) = self.wire.take() {
            let _ = epoll::delete(&self.epoll, &wire);
        }
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
        let Some(wire) = &self.wire else {
            self.fail(
                "IBV_WC_RETRY_EXC_ERR: transport retry counter exceeded (emulated: the peer's queue pair is gone)"
                    .into(),
            );
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
                self.peer_gone();
                self.fail(
                    "IBV_WC_RETRY_EXC_ERR: transport retry counter exceeded (emulated: the peer's queue pair is gone)"
                        .into(),
                );
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
        if let Some(error) = &self.error {
            return Err(QueuePairError(error.clone()));
        }
        let mut packet = vec![0u8; IMMEDIATE_LEN + self.config.buffer + 1];
        while let Some(wire) = &self.wire {
            match recv(wire, &mut packet, RecvFlags::DONTWAIT) {
                Ok((0, _)) => self.peer_gone(),
                Ok((n, _)) if n < IMMEDIATE_LEN || n > IMMEDIATE_LEN + self.config.buffer => {
                    return Err(QueuePairError(format!(
                        "IBV_WC_LOC_LEN_ERR: a message of {} bytes for buffers of {}",
                        n.saturating_sub(IMMEDIATE_LEN),
                        self.config.buffer
                    )));
                }
                Ok((n, _)) => received.push(Received {
                    immediate: u32::from_be_bytes(packet[..IMMEDIATE_LEN].try_into().unwrap()),
                    payload: packet[IMMEDIATE_LEN..n].to_vec(),
                }),
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(Errno::CONNRESET) => self.peer_gone(),
                Err(errno) => {
                    return Err(QueuePairError(format!(
                        "emulated wire: {}",
                        io::Error::from(errno)
                    )));
                }
            }
        }
        Ok(())
    }

    fn event_fd(&self) -> BorrowedFd<'_> {
        self.epoll.as_fd()
    }
}
