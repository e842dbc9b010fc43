//! A TCP-like byte stream over an RDMA reliable-connected (RC) queue pair, the way rsockets
//! carries one (`librdmacm/docs/rsocket`, "Data Streaming (TCP) Overview"), as a sans-IO state
//! machine: what to post, what arrived, what the application may read — no verbs, no clock.
//! The verbs glue (posting sends and receives, polling completions, the relayed socket's
//! readiness) drives it.
//!
//! Each side posts `window` receive buffers of `buffer` bytes. Every message is one SEND with
//! immediate data and lands in one of the peer's posted buffers, so a side may send only while
//! it holds **credits** (buffers the peer has posted and not yet seen filled). The immediate
//! data carries the message's kind and the credits it **returns**: buffers its sender reposted
//! since it last said so (a buffer is reposted once the application has read all its bytes —
//! that is the flow control: a reader that stops reading stops the writer).
//!
//! Deadlock freedom, the two rules that give it:
//! - Data and FIN need two credits: the last one is kept for a CREDIT message, which only
//!   returns credits. So a side that has read everything can always hand its peer credits.
//! - A CREDIT message is sent when at least half the window is owed. A CREDIT consumes one
//!   buffer at the peer, which owes one back — below half a window (window ≥ 4), so credits
//!   never ping-pong. When a writer is stuck at one credit with the reader idle, the reader
//!   owes `window − 1 ≥ window / 2` and answers; if the reader has no credit either, its own
//!   last message was a CREDIT that the writer received, so the writer owes `window` and
//!   answers first. `tests/exchange.rs` runs both ends against each other on random schedules.
#![forbid(unsafe_code)]

use std::collections::VecDeque;

/// The immediate data's kind bits.
const KIND_SHIFT: u32 = 30;
/// The returned-credits bits.
const RETURNED_MASK: u32 = (1 << KIND_SHIFT) - 1;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Application bytes (1 to `buffer` of them).
    Data = 0,
    /// Only returns credits.
    Credit = 1,
    /// The sender will send no more data (its application shut down writing or closed).
    Fin = 2,
}

/// One message: a SEND with immediate data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its kind.
    pub kind: Kind,
    /// Credits it returns to the receiver.
    pub returned: u32,
    /// Its payload (data messages only).
    pub payload: Vec<u8>,
}

impl Message {
    /// The 32-bit immediate data that carries kind and returned credits.
    pub fn immediate(&self) -> u32 {
        (self.kind as u32) << KIND_SHIFT | self.returned.min(RETURNED_MASK)
    }

    /// The message a completion with `immediate` and `payload` carried.
    pub fn from_immediate(immediate: u32, payload: Vec<u8>) -> Result<Self, ProtocolError> {
        let kind = match immediate >> KIND_SHIFT {
            0 => Kind::Data,
            1 => Kind::Credit,
            2 => Kind::Fin,
            other => return Err(ProtocolError::UnknownKind(other)),
        };
        Ok(Self {
            kind,
            returned: immediate & RETURNED_MASK,
            payload,
        })
    }
}

/// Both sides' sizes (the same on both: the upgrade exchange agrees on them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Receive buffers each side keeps posted (at least 4).
    pub window: u32,
    /// Bytes per buffer (per message).
    pub buffer: usize,
    /// Bytes the application may queue for sending beyond what credits allow.
    pub send_queue: usize,
}

impl Config {
    /// Checks the sizes.
    pub fn check(&self) -> Result<(), String> {
        if self.window < 4 || self.window > RETURNED_MASK {
            return Err(format!(
                "window {} is not in 4..={RETURNED_MASK}",
                self.window
            ));
        }
        if self.buffer == 0 || self.send_queue == 0 {
            return Err("buffer and send queue must hold at least one byte".into());
        }
        Ok(())
    }
}

/// What the peer did wrong (the connection is then unusable: reset it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// A message arrived with no buffer posted for it: the peer ignored its credits.
    NoBuffer,
    /// A payload longer than a buffer.
    Oversized(usize),
    /// A data message without payload, or a non-data message with one.
    BadPayload(Kind),
    /// Data after the peer's FIN.
    DataAfterFin,
    /// An unknown kind in the immediate data.
    UnknownKind(u32),
    /// More credits returned than buffers exist.
    TooManyCredits,
}

/// How a read ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// This many bytes were copied.
    Data(usize),
    /// Nothing yet.
    WouldBlock,
    /// The peer sent FIN and every byte before it was read.
    Eof,
    /// The connection failed (an error completion, the peer's death, a protocol error).
    Failed,
}

/// One end of the stream.
#[derive(Debug)]
pub struct Stream {
    config: Config,
    /// Messages this side may still send.
    credits: u32,
    /// Buffers reposted and not yet returned to the peer.
    owed: u32,
    /// Buffers holding data the application has not read completely, oldest first: bytes
    /// left in each.
    held: VecDeque<usize>,
    /// Received bytes not yet read.
    received: VecDeque<u8>,
    /// Bytes the application wrote, not yet sent.
    unsent: VecDeque<u8>,
    /// Buffers in use by messages received and not yet reposted (held ones included).
    in_use: u32,
    write_closed: bool,
    fin_sent: bool,
    fin_received: bool,
    failed: bool,
}

impl Stream {
    /// A fresh connection: the peer has posted `window` buffers for this side.
    pub fn new(config: Config) -> Self {
        Self {
            credits: config.window,
            config,
            owed: 0,
            held: VecDeque::new(),
            received: VecDeque::new(),
            unsent: VecDeque::new(),
            in_use: 0,
            write_closed: false,
            fin_sent: false,
            fin_received: false,
            failed: false,
        }
    }

    /// Queues up to the send queue's room of `data`: how many bytes were taken (0: full, or
    /// writing is shut down, or the connection failed).
    pub fn write(&mut self, data: &[u8]) -> usize {
        let taken = self.room().min(data.len());
        self.unsent.extend(&data[..taken]);
        taken
    }

    /// No more writes; a FIN follows the queued bytes.
    pub fn shutdown_write(&mut self) {
        self.write_closed = true;
    }

    /// Whether a write would take bytes.
    pub fn writable(&self) -> bool {
        self.room() > 0
    }

    /// How many bytes a write would take now.
    pub fn room(&self) -> usize {
        if self.write_closed || self.failed {
            return 0;
        }
        self.config.send_queue.saturating_sub(self.unsent.len())
    }

    /// Whether the peer's FIN arrived (the application may still have bytes to read).
    pub fn fin_received(&self) -> bool {
        self.fin_received
    }

    /// Whether this side's FIN has been handed to the transport.
    pub fn fin_sent(&self) -> bool {
        self.fin_sent
    }

    /// Whether a read would return something other than `WouldBlock`.
    pub fn readable(&self) -> bool {
        !self.received.is_empty() || self.fin_received || self.failed
    }

    /// Copies received bytes into `out`; buffers emptied by it are reposted (owed back).
    pub fn read(&mut self, out: &mut [u8]) -> Read {
        if self.failed {
            return Read::Failed;
        }
        if self.received.is_empty() {
            return if self.fin_received {
                Read::Eof
            } else {
                Read::WouldBlock
            };
        }
        let n = out.len().min(self.received.len());
        for (slot, byte) in out.iter_mut().zip(self.received.drain(..n)) {
            *slot = byte;
        }
        let mut left = n;
        while left > 0 {
            let Some(head) = self.held.front_mut() else {
                break;
            };
            let taken = (*head).min(left);
            *head -= taken;
            left -= taken;
            if *head == 0 {
                self.held.pop_front();
                self.repost();
            }
        }
        Read::Data(n)
    }

    fn repost(&mut self) {
        self.in_use -= 1;
        self.owed += 1;
    }

    /// The next message to post, if the credit rules allow one: data (and the FIN after it)
    /// while two credits remain; a CREDIT with the last one once half the window is owed.
    pub fn poll_transmit(&mut self) -> Option<Message> {
        if self.failed {
            return None;
        }
        if self.credits >= 2 && !self.unsent.is_empty() {
            let n = self.unsent.len().min(self.config.buffer);
            let payload = self.unsent.drain(..n).collect();
            return Some(self.send(Kind::Data, payload));
        }
        if self.credits >= 2 && self.write_closed && !self.fin_sent && self.unsent.is_empty() {
            self.fin_sent = true;
            return Some(self.send(Kind::Fin, Vec::new()));
        }
        // Once both FINs are out, neither side sends data again: credits would buy nothing,
        // and a CREDIT could reach a peer that has already torn its queue pair down.
        let both_fins = self.fin_sent && self.fin_received;
        if self.credits >= 1 && self.owed >= self.config.window / 2 && !both_fins {
            return Some(self.send(Kind::Credit, Vec::new()));
        }
        None
    }

    fn send(&mut self, kind: Kind, payload: Vec<u8>) -> Message {
        self.credits -= 1;
        let returned = std::mem::take(&mut self.owed);
        Message {
            kind,
            returned,
            payload,
        }
    }

    /// A receive completed with `message`: its buffer is in use until its bytes are read.
    pub fn on_message(&mut self, message: Message) -> Result<(), ProtocolError> {
        let result = self.take(message);
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn take(&mut self, message: Message) -> Result<(), ProtocolError> {
        if self.in_use + self.owed >= self.config.window {
            return Err(ProtocolError::NoBuffer);
        }
        let credits = self.credits.checked_add(message.returned);
        match credits {
            Some(credits) if credits <= self.config.window => self.credits = credits,
            _ => return Err(ProtocolError::TooManyCredits),
        }
        self.in_use += 1;
        match message.kind {
            Kind::Data if self.fin_received => Err(ProtocolError::DataAfterFin),
            Kind::Data if message.payload.is_empty() => Err(ProtocolError::BadPayload(Kind::Data)),
            Kind::Data if message.payload.len() > self.config.buffer => {
                Err(ProtocolError::Oversized(message.payload.len()))
            }
            Kind::Data => {
                self.held.push_back(message.payload.len());
                self.received.extend(message.payload);
                Ok(())
            }
            kind if !message.payload.is_empty() => Err(ProtocolError::BadPayload(kind)),
            Kind::Fin => {
                self.fin_received = true;
                self.repost();
                Ok(())
            }
            Kind::Credit => {
                self.repost();
                Ok(())
            }
        }
    }

    /// An error completion, a disconnect, or the peer's death: reads and writes fail from now.
    pub fn on_error(&mut self) {
        self.failed = true;
    }

    /// Whether every queued byte and the FIN (if asked) have been handed to the transport.
    pub fn flushed(&self) -> bool {
        self.unsent.is_empty() && (!self.write_closed || self.fin_sent)
    }

    /// Credits held (for diagnostics and tests).
    pub fn credits(&self) -> u32 {
        self.credits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config {
            window: 4,
            buffer: 8,
            send_queue: 64,
        }
    }

    #[test]
    fn immediates_round_trip_and_bad_kinds_are_refused() {
        for kind in [Kind::Data, Kind::Credit, Kind::Fin] {
            let message = Message {
                kind,
                returned: 123,
                payload: Vec::new(),
            };
            let back = Message::from_immediate(message.immediate(), Vec::new()).unwrap();
            assert_eq!((back.kind, back.returned), (kind, 123));
        }
        assert_eq!(
            Message::from_immediate(3 << KIND_SHIFT, Vec::new()),
            Err(ProtocolError::UnknownKind(3))
        );
        assert!(
            Config {
                window: 3,
                ..config()
            }
            .check()
            .is_err()
        );
        assert!(config().check().is_ok());
    }

    #[test]
    fn data_keeps_the_last_credit_for_a_credit_message() {
        let mut a = Stream::new(config());
        assert_eq!(a.write(&[7; 40]), 40);
        let sent: Vec<_> = std::iter::from_fn(|| a.poll_transmit()).collect();
        assert_eq!(sent.len(), 3, "three data messages, the fourth credit kept");
        assert!(
            sent.iter()
                .all(|m| m.kind == Kind::Data && m.payload.len() == 8)
        );
        assert_eq!(a.credits(), 1);
    }

    #[test]
    fn a_peer_that_ignores_credits_or_sizes_is_refused() {
        let mut b = Stream::new(config());
        let data = |n| Message {
            kind: Kind::Data,
            returned: 0,
            payload: vec![1; n],
        };
        for _ in 0..4 {
            b.on_message(data(1)).unwrap();
        }
        assert_eq!(b.on_message(data(1)), Err(ProtocolError::NoBuffer));
        assert_eq!(b.read(&mut [0; 4]), Read::Failed);
        let mut c = Stream::new(config());
        assert_eq!(c.on_message(data(9)), Err(ProtocolError::Oversized(9)));
        let mut d = Stream::new(config());
        let too_many = Message {
            kind: Kind::Credit,
            returned: 1,
            payload: Vec::new(),
        };
        assert_eq!(d.on_message(too_many), Err(ProtocolError::TooManyCredits));
    }

    #[test]
    fn reading_reposts_buffers_and_returns_them_in_batches() {
        let mut b = Stream::new(config());
        for byte in 0..3u8 {
            b.on_message(Message {
                kind: Kind::Data,
                returned: 0,
                payload: vec![byte; 8],
            })
            .unwrap();
        }
        let mut out = [0u8; 12];
        assert_eq!(b.read(&mut out), Read::Data(12));
        assert_eq!(&out[..9], &[0, 0, 0, 0, 0, 0, 0, 0, 1]);
        // One buffer emptied: less than half the window owed, nothing to say yet.
        assert_eq!(b.poll_transmit(), None);
        assert_eq!(b.read(&mut out), Read::Data(12));
        let credit = b.poll_transmit().expect("a credit message");
        assert_eq!((credit.kind, credit.returned), (Kind::Credit, 3));
    }
}
