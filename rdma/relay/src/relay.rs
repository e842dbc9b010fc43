//! One relayed connection: the application's socket end, the queue pair, and the stream core
//! between them; optionally the TCP connection the upgrade was negotiated on, kept open (as
//! SMC-R keeps its CLC socket) because an RC queue pair learns of a dead peer only when one of
//! its own SENDs exhausts its retries, while the peer's kernel closes that TCP connection the
//! moment its process ends.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags, Shutdown, recv, send, shutdown};
use stackroute_rdma_stream::{Config, Kind, Message, Read, Stream};

use crate::queue_pair::{QueuePair, Received};

/// How long the relay still waits for the queue pair to finish the stream once the peer's
/// control connection has closed: its last completions may trail the TCP FIN by a little.
pub const CONTROL_GRACE: Duration = Duration::from_millis(200);

/// Bytes moved per read or write of the application's socket.
const CHUNK: usize = 64 * 1024;

/// The ring sizes of version 1 of the upgrade exchange, the same on both ends: 16 buffers of
/// 64 KiB each way (2 MiB registered per connection), 256 KiB queued from the application.
pub const PROTOCOL_V1: Config = Config {
    window: 16,
    buffer: 64 * 1024,
    send_queue: 256 * 1024,
};

/// Bytes a relay moved, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Taken from the application and queued on the stream.
    pub sent: AtomicU64,
    /// Delivered to the application.
    pub received: AtomicU64,
}

/// How a relayed connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Both directions finished: every byte and both FINs delivered.
    Closed,
    /// The connection failed; the application should see a reset. Says why.
    Failed(String),
}

/// One relayed connection (see the module docs). [`Relay::run`] drives it to its end.
pub struct Relay<Q> {
    app: UnixStream,
    qp: Q,
    stream: Stream,
    control: Option<TcpStream>,
    /// Send buffers of the queue pair when idle: fewer free means SENDs in flight.
    idle_slots: usize,
    /// Bytes read from the stream, not yet taken by the application (from `to_app_at`).
    to_app: Vec<u8>,
    to_app_at: usize,
    /// The application shut down writing or closed: the stream's FIN is queued.
    app_read_done: bool,
    /// The peer's FIN was passed on: the application's end is shut down for reading.
    app_write_done: bool,
    /// When the peer's control connection closed before the stream ended.
    control_closed_at: Option<Instant>,
    received: Vec<Received>,
    /// CREDIT messages posted after this side's FIN.
    credits_after_fin: usize,
    /// The queue pair failed after the stream had nothing left to send or receive.
    qp_closed: bool,
    counters: Arc<Counters>,
}

impl<Q: QueuePair> Relay<Q> {
    /// A relay of `app` (made non-blocking here) over `qp`, whose rings `config` sized.
    pub fn new(app: UnixStream, qp: Q, config: Config) -> Self {
        Self {
            idle_slots: qp.send_slots(),
            app,
            qp,
            stream: Stream::new(config),
            control: None,
            to_app: Vec::new(),
            to_app_at: 0,
            app_read_done: false,
            app_write_done: false,
            control_closed_at: None,
            received: Vec::new(),
            credits_after_fin: 0,
            qp_closed: false,
            counters: Arc::default(),
        }
    }

    /// Watches `control`, the TCP connection the upgrade was negotiated on, for the peer's
    /// death (see the module docs). No byte is read from it or written to it.
    pub fn with_control(mut self, control: TcpStream) -> Self {
        self.control = Some(control);
        self
    }

    /// Counts the bytes moved into `counters`.
    pub fn with_counters(mut self, counters: Arc<Counters>) -> Self {
        self.counters = counters;
        self
    }

    /// Moves bytes until the connection ends. The application's end and the control
    /// connection are closed when the relay is dropped.
    pub fn run(mut self) -> End {
        if let Err(error) = self.app.set_nonblocking(true) {
            return End::Failed(format!("application socket: {error}"));
        }
        loop {
            if let Some(end) = self.step() {
                return end;
            }
            if let Err(error) = self.wait() {
                return End::Failed(format!("poll: {error}"));
            }
        }
    }

    /// Does everything possible without blocking: the end, if reached.
    fn step(&mut self) -> Option<End> {
        loop {
            let mut progress = false;
            let polled = if self.qp_closed {
                Ok(())
            } else {
                self.qp.poll(&mut self.received)
            };
            // Completions before an error completion still count: take them first.
            for received in self.received.drain(..) {
                progress = true;
                let taken = Message::from_immediate(received.immediate, received.payload)
                    .and_then(|message| self.stream.on_message(message));
                if let Err(error) = taken {
                    return Some(End::Failed(format!("peer broke the protocol: {error:?}")));
                }
            }
            if let Err(error) = polled {
                if let Some(end) = self.queue_pair_failed(error) {
                    return Some(end);
                }
                progress = true;
            }
            match self.deliver_to_application() {
                Ok(moved) => progress |= moved,
                Err(end) => return Some(end),
            }
            match self.take_from_application() {
                Ok(moved) => progress |= moved,
                Err(end) => return Some(end),
            }
            while !self.qp_closed && self.qp.send_slots() > 0 {
                let Some(message) = self.stream.poll_transmit() else {
                    break;
                };
                progress = true;
                if self.stream.fin_sent() && message.kind != Kind::Fin {
                    self.credits_after_fin += 1;
                }
                if let Err(error) = self.qp.post_send(message.immediate(), &message.payload)
                    && let Some(end) = self.queue_pair_failed(error)
                {
                    return Some(end);
                }
            }
            if self.finished() {
                return Some(End::Closed);
            }
            if let Some(end) = self.check_control() {
                return Some(end);
            }
            if !progress {
                return None;
            }
        }
    }

    fn finished(&self) -> bool {
        self.app_read_done
            && self.app_write_done
            && self.stream.flushed()
            && (self.qp_closed || self.qp.send_slots() >= self.idle_slots)
    }

    /// SENDs posted and not completed.
    fn sends_in_flight(&self) -> usize {
        self.idle_slots.saturating_sub(self.qp.send_slots())
    }

    /// An error completion or a failed post: the end, unless the connection had nothing left
    /// to say. A peer that has both FINs tears its queue pair down, and a CREDIT this side
    /// posted after its own FIN (before the peer's FIN arrived) then fails; if every data and
    /// FIN SEND completed (RC completes in order, so only such CREDITs are still in flight)
    /// and the peer's FIN is here, nothing was lost: the queue pair is closed and the
    /// application gets what is left.
    fn queue_pair_failed(&mut self, error: crate::QueuePairError) -> Option<End> {
        let nothing_lost = self.stream.fin_sent()
            && self.stream.flushed()
            && self.stream.fin_received()
            && self.sends_in_flight() <= self.credits_after_fin;
        if nothing_lost {
            self.qp_closed = true;
            return None;
        }
        self.stream.on_error();
        Some(End::Failed(format!("queue pair: {error}")))
    }

    /// Passes received bytes (and the FIN) to the application: whether anything moved.
    fn deliver_to_application(&mut self) -> Result<bool, End> {
        let mut moved = false;
        loop {
            if self.to_app_at == self.to_app.len() {
                self.to_app.clear();
                self.to_app_at = 0;
                self.to_app.resize(CHUNK, 0);
                match self.stream.read(&mut self.to_app) {
                    Read::Data(n) => self.to_app.truncate(n),
                    Read::WouldBlock => {
                        self.to_app.clear();
                        return Ok(moved);
                    }
                    Read::Eof => {
                        self.to_app.clear();
                        if !self.app_write_done {
                            self.app_write_done = true;
                            moved = true;
                            // The application may have closed already; nothing to tell then.
                            let _ = shutdown(&self.app, Shutdown::Write);
                        }
                        return Ok(moved);
                    }
                    Read::Failed => return Err(End::Failed("stream failed".into())),
                }
            }
            match send(
                &self.app,
                &self.to_app[self.to_app_at..],
                SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
            ) {
                Ok(n) => {
                    self.to_app_at += n;
                    self.counters
                        .received
                        .fetch_add(n as u64, Ordering::Relaxed);
                    moved = true;
                }
                Err(Errno::AGAIN) => return Ok(moved),
                Err(Errno::INTR) => {}
                Err(errno) => {
                    return Err(End::Failed(format!(
                        "the application closed its socket with {} bytes not read: {}",
                        self.to_app.len() - self.to_app_at,
                        io::Error::from(errno)
                    )));
                }
            }
        }
    }

    /// Queues the application's bytes (and its shutdown) on the stream: whether anything moved.
    fn take_from_application(&mut self) -> Result<bool, End> {
        let mut moved = false;
        let mut buffer = [0u8; CHUNK];
        while !self.app_read_done {
            let room = self.stream.room().min(CHUNK);
            if room == 0 {
                break;
            }
            match recv(&self.app, &mut buffer[..room], RecvFlags::DONTWAIT) {
                Ok((0, _)) => {
                    self.app_read_done = true;
                    self.stream.shutdown_write();
                    moved = true;
                }
                Ok((n, _)) => {
                    let taken = self.stream.write(&buffer[..n]);
                    debug_assert_eq!(taken, n, "read no more than the stream's room");
                    self.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
                    moved = true;
                }
                Err(Errno::AGAIN) => break,
                Err(Errno::INTR) => {}
                Err(errno) => {
                    return Err(End::Failed(format!(
                        "the application's socket: {}",
                        io::Error::from(errno)
                    )));
                }
            }
        }
        Ok(moved)
    }

    /// Whether the peer's control connection closed more than the grace ago before its FIN
    /// arrived. (A peer whose relay ended cleanly had sent its FIN: what is left is delivering
    /// to the application, at the application's pace.)
    fn check_control(&mut self) -> Option<End> {
        let at = self.control_closed_at?;
        if self.stream.fin_received() {
            return None;
        }
        (at.elapsed() >= CONTROL_GRACE).then(|| {
            End::Failed(
                "the peer closed the connection's TCP socket before the stream ended (its process ended or reset)"
                    .into(),
            )
        })
    }

    /// Blocks until the application, the queue pair or the control connection has something.
    fn wait(&mut self) -> io::Result<()> {
        let mut app_flags = PollFlags::empty();
        if self.to_app_at < self.to_app.len() {
            app_flags |= PollFlags::OUT;
        }
        if !self.app_read_done && self.stream.room() > 0 {
            app_flags |= PollFlags::IN;
        }
        // Only fds with something to wait for: a closed application end or control connection
        // reports a hang-up whatever is asked, and would wake this loop for nothing.
        let mut fds = Vec::with_capacity(3);
        if !self.qp_closed {
            fds.push(PollFd::from_borrowed_fd(self.qp.event_fd(), PollFlags::IN));
        }
        if !app_flags.is_empty() {
            fds.push(PollFd::from_borrowed_fd(self.app.as_fd(), app_flags));
        }
        // The control connection only for its peer's FIN or reset: bytes on it are not ours
        // (the shim reads the upgrade's last message from it) and must not wake the relay.
        let control_at = fds.len();
        if let (Some(control), None) = (&self.control, self.control_closed_at) {
            fds.push(PollFd::from_borrowed_fd(control.as_fd(), PollFlags::RDHUP));
        }
        let timeout = self.control_closed_at.map(|at| {
            let left = CONTROL_GRACE.saturating_sub(at.elapsed());
            Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            }
        });
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(errno) => return Err(errno.into()),
        }
        let control_closed = fds.get(control_at).is_some_and(|fd| {
            fd.revents()
                .intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR)
        });
        drop(fds);
        if control_closed && self.control.is_some() {
            self.control_closed_at.get_or_insert_with(Instant::now);
        }
        Ok(())
    }
}
