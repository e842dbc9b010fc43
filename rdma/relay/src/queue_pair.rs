//! What the relay needs of a queue pair: the verbs a byte stream over RC uses (SEND with
//! immediate data into the peer's posted buffers), completions taken without blocking, and an
//! fd that becomes readable when there are some (the completion channel's).

use std::os::fd::BorrowedFd;

/// A message a receive completion delivered. Its buffer is reposted as soon as the payload is
/// copied out: the peer's right to send is the stream's credits, not the posting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The immediate data.
    pub immediate: u32,
    /// The bytes (at most the stream's buffer size).
    pub payload: Vec<u8>,
}

/// Why the queue pair is unusable: an error completion (`IBV_WC_RETRY_EXC_ERR` when the peer
/// is gone, …) or a failed verbs call. The connection is then reset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct QueuePairError(pub String);

/// One connected reliable-connected queue pair with registered send and receive rings, each
/// of the stream's window of buffers.
pub trait QueuePair {
    /// SENDs that may be posted now: send buffers whose earlier SEND has completed.
    fn send_slots(&self) -> usize;

    /// Copies `payload` (at most one buffer) into a free registered send buffer and posts a
    /// signaled SEND with `immediate`. Only called while [`send_slots`](Self::send_slots) > 0.
    fn post_send(&mut self, immediate: u32, payload: &[u8]) -> Result<(), QueuePairError>;

    /// Takes every completion ready now, without blocking: received messages are appended to
    /// `received` in arrival order (their buffers reposted), send completions free slots. It
    /// also re-arms the notification, so [`event_fd`](Self::event_fd) signals the next one.
    fn poll(&mut self, received: &mut Vec<Received>) -> Result<(), QueuePairError>;

    /// A non-blocking fd that becomes readable when [`poll`](Self::poll) has work.
    fn event_fd(&self) -> BorrowedFd<'_>;
}
