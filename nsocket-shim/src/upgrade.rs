//! The RDMA upgrade behind the shim, SMC-R's shape in user space: a connection that policy
//! puts on RDMA starts as kernel TCP; right after the TCP handshake the client's shim proposes
//! on that connection (only to a server registered as an RDMA upgrade endpoint), the server's
//! shim accepts or declines with its reason, the client confirms or declines; on anything but
//! a confirmed upgrade the same socket carries on as TCP and the reason is counted. The wire
//! format and each side's next step are `stackroute-rdma-upgrade`; here are the I/O around it
//! and the stripping of its bytes, so that neither application ever reads them.
//!
//! - Client (`client`): inside `connect`, bounded by `STACKROUTE_RDMA_DEADLINE_MS` in all (the
//!   TCP handshake of a non-blocking connect, the answer, the RDMA connect). A server answer
//!   that arrives after the deadline is stripped at the first read (`LateAnswer`).
//! - Server (`front`): a connection accepted from an upgrade listener may begin with a
//!   proposal; it is looked for at `accept` (it usually has arrived), else before the first
//!   read or write. Answered unless the application wrote first; the client's final message is
//!   stripped too.
//!
//! The data path is the pod's stack instance's (`stackroute-stackd --rdma-provider`): each side
//! asks it for a queue pair (`RdmaOpen`, whose endpoint the Proposal or Accept carries), then
//! to connect it to the peer's and relay the connection (`RdmaRelay`, handing it the
//! application's end of a socketpair and a duplicate of the TCP socket, which it watches for the
//! peer's death). The application's fd then becomes that socketpair end, as for the user-space
//! stack (`relay`). The server switches only on the client's Confirm: the client sends one only
//! once its own relay runs and within the deadline of its proposal; the server waits for it
//! twice as long, so the two never disagree unless one network delay exceeds the deadline.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use stackroute_local_api::message::{FallbackReason, UpgradeAttempt, UpgradeRole};
use stackroute_rdma_upgrade::{
    ClientNext, DecodeError, Endpoint, Kind, MESSAGE_LEN, Message, Outcome, Prefix, Reason,
    classify, client_next, server_answer,
};

use stackroute_snapshot::Stack;

use crate::config::Config;
use crate::counters;
use crate::fdtable::{self, Entry, Upgrade};
use crate::logic::Pre;
use crate::sys::{self, upgrade as io};

/// Connections whose stream may begin with upgrade bytes: the read and write hooks look at
/// the fd table only while this is non-zero.
static PENDING: AtomicUsize = AtomicUsize::new(0);

/// Whether any connection of this process has upgrade bytes to strip.
#[inline]
pub(crate) fn pending() -> bool {
    PENDING.load(Ordering::Relaxed) != 0
}

/// Sets `fd`'s upgrade state, keeping [`PENDING`] right.
fn set_state(fd: i32, state: Upgrade) {
    let before = fdtable::get(fd);
    match (before.upgrade() == Upgrade::None, state == Upgrade::None) {
        (true, false) => {
            PENDING.fetch_add(1, Ordering::Relaxed);
        }
        (false, true) => forgotten(before),
        _ => {}
    }
    fdtable::set(fd, before.with_upgrade(state));
    if state == Upgrade::None
        && fdtable::get(fd)
            .transport()
            .is_none_or(|(stack, _)| stack != Stack::Rdma)
    {
        keep_registrations(fd);
    }
}

/// The exchange on `fd` is over and its kernel socket stays: epoll registrations recorded in
/// case a relay socket took its fd number are forgotten (they remain valid as they are).
pub(crate) fn keep_registrations(fd: i32) {
    let entry = fdtable::get(fd);
    if entry.epoll_recorded() {
        crate::epollreg::replay(fd, |_, _, _| {});
        fdtable::set(fd, entry.with_epoll_recorded(false));
    }
}

/// `fd` was accepted from an upgrade listener: its stream may begin with a proposal.
pub(crate) fn watch(fd: i32) {
    set_state(fd, Upgrade::Probe);
}

/// Before a read of `fd` with `flags` (`recv` flags; 0 for `read`/`readv`).
#[inline]
pub(crate) fn before_read(fd: i32, flags: i32) -> Pre {
    if !pending() || fdtable::get(fd).upgrade() == Upgrade::None {
        return Pre::Forward;
    }
    let nonblocking = flags & libc::MSG_DONTWAIT != 0
        || sys::relay::fd_flags(fd).is_none_or(|(nonblocking, _)| nonblocking);
    front(crate::config::get(), fd, At::Read { nonblocking })
}

/// Before a write to `fd`.
#[inline]
pub(crate) fn before_write(fd: i32) -> Pre {
    if !pending() || fdtable::get(fd).upgrade() == Upgrade::None {
        return Pre::Forward;
    }
    front(crate::config::get(), fd, At::Write)
}

/// An entry with an upgrade state was cleared (close).
pub(crate) fn forgotten(entry: Entry) {
    if entry.upgrade() != Upgrade::None {
        let _ = PENDING.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}

/// An entry with an upgrade state was copied to another fd (dup).
pub(crate) fn copied(entry: Entry) {
    if entry.upgrade() != Upgrade::None {
        PENDING.fetch_add(1, Ordering::Relaxed);
    }
}

/// The least `RLIMIT_MEMLOCK` with which the connection buffers can be registered.
pub(crate) const MIN_MEMLOCK: u64 = 64 << 20;

/// This process's RDMA endpoint, or why it has none; found once per process.
pub(crate) fn capability(config: &Config) -> Result<Endpoint, Reason> {
    static FOUND: OnceLock<Result<Endpoint, Reason>> = OnceLock::new();
    *FOUND.get_or_init(|| match provider(config) {
        Some(provider) => provider
            .probe()
            .map(|(gid, qpn, psn)| Endpoint { gid, qpn, psn })
            .map_err(Reason::from_code),
        None => builtin_check(config),
    })
}

/// How long a server that declined for a lasting reason (no device, no GID, memlock, no data
/// path, another version) gets no proposal from this process: its connections fall back at
/// once (`peer-declined`) instead of paying the exchange's round trips again.
pub(crate) const DECLINED_TTL_MS: u64 = 10_000;

/// Servers that declined lately, with when to propose again.
const DECLINED_SLOTS: usize = 32;
static DECLINED: Mutex<[Option<(SocketAddr, u64)>; DECLINED_SLOTS]> =
    Mutex::new([None; DECLINED_SLOTS]);

/// This process's stack instance refused a queue pair for a lasting reason lately (no verbs
/// provider, no device, no GID, memlock): (reason code, until when in ms). No proposal until
/// then, and no request to the instance on every connection.
static REFUSED_LOCALLY: Mutex<Option<(Reason, u64)>> = Mutex::new(None);

/// The instance's lasting refusal, if it is recent.
pub(crate) fn refused_locally() -> Option<Reason> {
    let now = io::monotonic_ms();
    let refused = *REFUSED_LOCALLY.try_lock().ok()?;
    refused.and_then(|(reason, until)| (now < until).then_some(reason))
}

/// The instance refused a queue pair for `reason`: remembered when it lasts.
pub(crate) fn remember_local_refusal(reason: Reason) {
    if matches!(
        reason,
        Reason::StackUnavailable | Reason::NoDevice | Reason::NoGid | Reason::Memlock
    ) && let Ok(mut refused) = REFUSED_LOCALLY.try_lock()
    {
        *refused = Some((reason, io::monotonic_ms() + DECLINED_TTL_MS));
    }
}

/// Whether `server` declined lately for a lasting reason (then no proposal is sent).
pub(crate) fn declined_lately(server: SocketAddr) -> bool {
    let now = io::monotonic_ms();
    // `try_lock`: a connect never waits on another thread's bookkeeping.
    DECLINED.try_lock().is_ok_and(|slots| {
        slots
            .iter()
            .flatten()
            .any(|(address, until)| *address == server && now < *until)
    })
}

/// Remembers `server`'s decline when its reason lasts.
pub(crate) fn remember_decline(server: SocketAddr, outcome: Outcome) {
    let lasting = matches!(
        outcome.peer,
        Some(
            Reason::NoDevice
                | Reason::NoGid
                | Reason::Memlock
                | Reason::StackUnavailable
                | Reason::VersionMismatch
        )
    );
    if outcome.reason != Reason::PeerDeclined || !lasting {
        return;
    }
    let now = io::monotonic_ms();
    if let Ok(mut slots) = DECLINED.try_lock() {
        // The same server's slot, else a free or expired one, else the one expiring first.
        let index = slots
            .iter()
            .position(|slot| slot.is_some_and(|(address, _)| address == server))
            .or_else(|| {
                slots
                    .iter()
                    .position(|slot| slot.is_none_or(|(_, until)| until <= now))
            })
            .or_else(|| (0..DECLINED_SLOTS).min_by_key(|&i| slots[i].map_or(0, |(_, until)| until)))
            .unwrap_or(0);
        slots[index] = Some((server, now + DECLINED_TTL_MS));
    }
}

/// Whether this process's listeners are RDMA upgrade endpoints: a verbs provider is
/// configured and loads.
pub(crate) fn endpoint_configured(config: &Config) -> bool {
    provider(config).is_some()
}

/// The verbs provider named by `STACKROUTE_RDMA_PROVIDER`, loaded once.
fn provider(config: &Config) -> Option<io::Provider> {
    static LOADED: OnceLock<Option<io::Provider>> = OnceLock::new();
    *LOADED.get_or_init(|| io::Provider::open(config.rdma_provider.as_deref()?))
}

/// Without a provider: what the node and this process have (a device with an active port and
/// a GID, its device nodes in this container, the locked-memory limit), and then that this
/// build has no verbs data path of its own.
fn builtin_check(_config: &Config) -> Result<Endpoint, Reason> {
    let discovery = stackroute_rdma_discover::discover(Path::new("/"));
    let usable =
        stackroute_rdma_discover::usable(&discovery).map_err(|unavailable| match unavailable {
            stackroute_rdma_discover::Unavailable::NoDevice => Reason::NoDevice,
            stackroute_rdma_discover::Unavailable::NoActivePort
            | stackroute_rdma_discover::Unavailable::NoGid => Reason::NoGid,
        })?;
    memlock_check(io::memlock_limit(), has_ipc_lock())?;
    let _ = usable;
    Err(Reason::StackUnavailable)
}

/// Whether the locked-memory limit lets the buffers be registered (`None`: unlimited).
pub(crate) fn memlock_check(limit: Option<u64>, ipc_lock: bool) -> Result<(), Reason> {
    match limit {
        Some(bytes) if bytes < MIN_MEMLOCK && !ipc_lock => Err(Reason::Memlock),
        _ => Ok(()),
    }
}

/// `CAP_IPC_LOCK` (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

/// Whether this process holds `CAP_IPC_LOCK` in its effective set (then the limit does not
/// bind registrations).
fn has_ipc_lock() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
    })
}

/// The counted fallback of an upgrade that did not happen.
pub(crate) fn fallback_reason(reason: Reason) -> FallbackReason {
    match reason {
        Reason::NoDevice => FallbackReason::NoDevice,
        Reason::NoGid => FallbackReason::NoGid,
        Reason::Memlock => FallbackReason::Memlock,
        Reason::ConnectTimeout => FallbackReason::ConnectTimeout,
        Reason::RdmaError => FallbackReason::RdmaError,
        Reason::PeerDeclined | Reason::SpokeFirst => FallbackReason::PeerDeclined,
        Reason::VersionMismatch => FallbackReason::Unsupported,
        Reason::StackUnavailable => FallbackReason::StackUnavailable,
        Reason::Policy | Reason::Other => FallbackReason::Other,
    }
}

/// The client's exchange on `fd` right after the real `connect` returned `connect_errno` (0
/// when it completed): `None` when there was no exchange (the connect failed). Never changes
/// what `connect` returns; never takes longer than the deadline.
pub(crate) fn client(config: &Config, fd: i32, connect_errno: i32) -> Option<Result<(), Outcome>> {
    client_exchange(config, fd, connect_errno).map(|outcome| match outcome {
        Some(outcome) => Err(outcome),
        None => Ok(()),
    })
}

/// The client's exchange: `None` when there was none, `Some(None)` when the connection now
/// runs on RDMA, else why not.
fn client_exchange(config: &Config, fd: i32, connect_errno: i32) -> Option<Option<Outcome>> {
    let deadline = io::monotonic_ms() + u64::from(config.rdma_deadline_ms);
    let left = || {
        deadline
            .saturating_sub(io::monotonic_ms())
            .min(i32::MAX as u64) as i32
    };
    match connect_errno {
        0 => {}
        libc::EINPROGRESS | libc::EINTR => {
            let events = io::wait(fd, libc::POLLOUT, left());
            if events & (libc::POLLERR | libc::POLLHUP) != 0 {
                // Refused or unreachable: the application learns it from the socket.
                return None;
            }
            if events & libc::POLLOUT == 0 {
                // Still connecting: nothing was sent, the connection goes on as TCP.
                return Some(Some(Outcome::local(Reason::ConnectTimeout)));
            }
        }
        _ => return None,
    }
    let failed = |outcome| Some(Some(outcome));
    let opened = match crate::relay::rdma_open(config, millis(left())) {
        Ok(opened) => opened,
        // Nothing was sent: the server takes the application's first bytes as they are.
        Err(reason) => return failed(Outcome::local(reason)),
    };
    let proposed_at = io::monotonic_ms();
    if config.proposal_delay_ms > 0 {
        // The test hook: the peer's application gets to speak first.
        io::wait(fd, 0, (config.proposal_delay_ms as i32).min(left()));
    }
    let nonce = io::random_u64();
    let proposal = Message::new(Kind::Proposal, nonce).with_endpoint(opened.endpoint);
    if io::send_all(fd, &proposal.encode()).is_err() {
        return failed(Outcome::local(Reason::Other));
    }
    let mut opened = Some(opened);
    let finish = |outcome: Outcome| {
        // A final message unless the server declined (then it strips one if one comes, and
        // takes anything else for the application's bytes).
        let _ = io::send_all(fd, &Message::decline(nonce, outcome.reason).encode());
        Some(Some(outcome))
    };
    loop {
        let mut front = [0u8; MESSAGE_LEN];
        let seen = match io::peek(fd, &mut front) {
            Ok(0) => return failed(Outcome::local(Reason::Other)),
            Ok(n) => n,
            Err(libc::EAGAIN | libc::EINTR) => 0,
            Err(_) => return failed(Outcome::local(Reason::Other)),
        };
        match client_next(nonce, &front[..seen]) {
            ClientNext::Wait => {
                let remaining = left();
                if remaining <= 0 {
                    set_state(fd, Upgrade::LateAnswer);
                    return finish(Outcome::local(Reason::ConnectTimeout));
                }
                io::wait(fd, libc::POLLIN, remaining);
            }
            ClientNext::Connect(peer) => {
                let _ = io::discard(fd, MESSAGE_LEN);
                let Some(opened) = opened.take() else {
                    return finish(Outcome::local(Reason::Other));
                };
                let started = match crate::relay::rdma_start(opened, fd, peer, millis(left())) {
                    Ok(started) => started,
                    Err(reason) => return finish(Outcome::local(reason)),
                };
                // The server waits for this answer twice the deadline after its Accept: past
                // the deadline of the proposal, it may have given up, so this side must too.
                if io::monotonic_ms().saturating_sub(proposed_at)
                    > u64::from(config.rdma_deadline_ms)
                {
                    return finish(Outcome::local(Reason::ConnectTimeout));
                }
                if io::send_all(fd, &Message::new(Kind::Confirm, nonce).encode()).is_err() {
                    return failed(Outcome::local(Reason::Other));
                }
                return match crate::relay::rdma_adopt(started, fd) {
                    Ok(()) => Some(None),
                    // The server switched; this side cannot: the connection is lost either way.
                    Err(_) => failed(Outcome::local(Reason::Other)),
                };
            }
            ClientNext::Fallback { outcome, consume } => {
                if consume {
                    let _ = io::discard(fd, MESSAGE_LEN);
                }
                if outcome.reason == Reason::PeerDeclined
                    && outcome.peer != Some(Reason::SpokeFirst)
                {
                    // The server declined: the exchange is over for both. A final message
                    // here would sit unacknowledged (the server has nothing to send, so it
                    // delays its ACK) and hold the application's first small write behind
                    // Nagle for ~40 ms.
                    return failed(outcome);
                }
                return finish(outcome);
            }
        }
    }
}

/// Where a hook meets a connection's upgrade bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum At {
    /// Right after `accept` returned it.
    Accept,
    /// Before a read (`nonblocking`: the socket's or the call's `MSG_DONTWAIT`).
    Read { nonblocking: bool },
    /// Before a write.
    Write,
}

/// Before a read or write on `fd`, or right after accepting it: takes the upgrade bytes off
/// the front of its stream (answering a proposal) so the application never sees them.
/// `Pre::Fail(EAGAIN)` when a non-blocking read must wait for them.
pub(crate) fn front(config: &Config, fd: i32, at: At) -> Pre {
    // Half a message waits this long in all before it is taken as the application's bytes.
    let partial_until = io::monotonic_ms() + 2 * u64::from(config.rdma_deadline_ms);
    loop {
        let state = fdtable::get(fd).upgrade();
        if state == Upgrade::None {
            return Pre::Forward;
        }
        let mut bytes = [0u8; MESSAGE_LEN];
        let seen = match io::peek(fd, &mut bytes) {
            Ok(0) => {
                set_state(fd, Upgrade::None);
                return Pre::Forward;
            }
            Ok(n) => n,
            Err(libc::EAGAIN | libc::EINTR) => 0,
            Err(_) => {
                set_state(fd, Upgrade::None);
                return Pre::Forward;
            }
        };
        match classify(&bytes[..seen]) {
            Prefix::NotOurs => {
                set_state(fd, Upgrade::None);
                return Pre::Forward;
            }
            Prefix::Empty => match at {
                At::Write if state == Upgrade::Probe => {
                    // The application speaks first: a proposal arriving later goes unanswered.
                    set_state(fd, Upgrade::ProbeSilent);
                    return Pre::Forward;
                }
                At::Write | At::Accept => return Pre::Forward,
                At::Read { nonblocking: true } => return Pre::Fail(libc::EAGAIN),
                At::Read { nonblocking: false } => {
                    if io::wait(fd, libc::POLLIN, -1) == 0 {
                        // A signal: what the blocking read would have said.
                        return Pre::Fail(libc::EINTR);
                    }
                }
            },
            Prefix::Partial => match at {
                At::Write if state == Upgrade::Probe => {
                    set_state(fd, Upgrade::ProbeSilent);
                    return Pre::Forward;
                }
                At::Write | At::Accept => return Pre::Forward,
                At::Read { .. } => {
                    let remaining = partial_until.saturating_sub(io::monotonic_ms());
                    if remaining == 0 {
                        // Never completed: the peer's own bytes that happen to start alike.
                        set_state(fd, Upgrade::None);
                        return Pre::Forward;
                    }
                    io::wait(fd, libc::POLLIN, remaining.min(1000) as i32);
                }
            },
            Prefix::Complete => take_message(config, fd, state, &bytes),
        }
    }
}

/// A whole message is at the front of `fd`'s stream in `state`: take it and move on.
fn take_message(config: &Config, fd: i32, state: Upgrade, bytes: &[u8; MESSAGE_LEN]) {
    let started_us = io::monotonic_us();
    let server_ended = |outcome| {
        let peer = sys::peer_address(fd);
        ended(config, fd, UpgradeRole::Server, peer, outcome, started_us);
    };
    let message = Message::decode(bytes);
    match (state, message) {
        (Upgrade::Probe | Upgrade::ProbeSilent, Ok(proposal))
            if proposal.kind == Kind::Proposal =>
        {
            let _ = io::discard(fd, MESSAGE_LEN);
            if state == Upgrade::ProbeSilent {
                set_state(fd, Upgrade::AwaitFinal);
                return;
            }
            match server_upgrade(config, fd, &proposal) {
                ServerStep::Upgraded => {
                    set_state(fd, Upgrade::None);
                    upgraded(
                        config,
                        fd,
                        UpgradeRole::Server,
                        sys::peer_address(fd),
                        started_us,
                    );
                }
                ServerStep::Declined(reason) => {
                    server_ended(Outcome::local(reason));
                    set_state(fd, Upgrade::AwaitFinal);
                }
                ServerStep::ClientDeclined(reason) => {
                    server_ended(Outcome {
                        reason: Reason::PeerDeclined,
                        peer: Some(reason),
                    });
                    set_state(fd, Upgrade::None);
                }
                ServerStep::NoFinal => {
                    // A late final is stripped when it comes.
                    server_ended(Outcome::local(Reason::ConnectTimeout));
                    set_state(fd, Upgrade::AwaitFinal);
                }
            }
        }
        (Upgrade::Probe, Err(DecodeError::Version(_))) => {
            let _ = io::discard(fd, MESSAGE_LEN);
            let _ = io::send_all(fd, &Message::decline(0, Reason::VersionMismatch).encode());
            server_ended(Outcome::local(Reason::VersionMismatch));
            set_state(fd, Upgrade::AwaitFinal);
        }
        (Upgrade::AwaitFinal, Ok(last)) if matches!(last.kind, Kind::Confirm | Kind::Decline) => {
            let _ = io::discard(fd, MESSAGE_LEN);
            // The client's next write may be a small one held by Nagle until this message is
            // acknowledged: acknowledge it now rather than after the delayed-ACK timer.
            io::quick_ack(fd);
            if last.kind == Kind::Decline && last.reason.is_some_and(|r| r != Reason::PeerDeclined)
            {
                // The client gave up after this side accepted (or timed out waiting).
                server_ended(Outcome {
                    reason: Reason::PeerDeclined,
                    peer: last.reason,
                });
            }
            set_state(fd, Upgrade::None);
        }
        (Upgrade::LateAnswer, Ok(answer))
            if matches!(answer.kind, Kind::Accept | Kind::Decline) =>
        {
            let _ = io::discard(fd, MESSAGE_LEN);
            set_state(fd, Upgrade::None);
        }
        // Anything else is not the message this state expects: leave the bytes alone.
        _ => set_state(fd, Upgrade::None),
    }
}

/// How the server's side of an exchange went.
enum ServerStep {
    /// The connection runs on RDMA.
    Upgraded,
    /// Declined (the decline was sent) for this reason; the client's final may follow.
    Declined(Reason),
    /// Accepted, then the client declined for this reason (its final was taken).
    ClientDeclined(Reason),
    /// Accepted, and no final came in time.
    NoFinal,
}

fn millis(ms: i32) -> std::time::Duration {
    std::time::Duration::from_millis(ms.max(0) as u64)
}

/// Answers `proposal` (already taken off `fd`): when this side can, has its instance relay the
/// connection over a queue pair connected to the client's, accepts, waits for the client's
/// Confirm, and only then puts the relay on the application's fd.
fn server_upgrade(config: &Config, fd: i32, proposal: &Message) -> ServerStep {
    let deadline_ms = u64::from(config.rdma_deadline_ms);
    let started = io::monotonic_ms();
    let left = |within: u64| {
        (started + within)
            .saturating_sub(io::monotonic_ms())
            .min(i32::MAX as u64) as i32
    };
    let decline = |reason: Reason| {
        let _ = io::send_all(fd, &Message::decline(proposal.nonce, reason).encode());
        ServerStep::Declined(reason)
    };
    if let Err(reason) = capability(config) {
        return decline(reason);
    }
    if fdtable::get(fd).epoll_overflow() {
        // Registrations the record could not hold would stay on the TCP socket.
        return decline(Reason::Other);
    }
    let opened = match crate::relay::rdma_open(config, millis(left(deadline_ms))) {
        Ok(opened) => opened,
        Err(reason) => return decline(reason),
    };
    let endpoint = opened.endpoint;
    let relayed =
        match crate::relay::rdma_start(opened, fd, proposal.endpoint, millis(left(deadline_ms))) {
            Ok(relayed) => relayed,
            Err(reason) => return decline(reason),
        };
    let answer = server_answer(proposal, Ok(endpoint));
    if io::send_all(fd, &answer.encode()).is_err() {
        return ServerStep::Declined(Reason::Other);
    }
    // The client's final: twice the deadline (see the module docs).
    loop {
        let mut bytes = [0u8; MESSAGE_LEN];
        let seen = match io::peek(fd, &mut bytes) {
            Ok(0) => return ServerStep::ClientDeclined(Reason::Other),
            Ok(n) => n,
            Err(libc::EAGAIN | libc::EINTR) => 0,
            Err(_) => return ServerStep::ClientDeclined(Reason::Other),
        };
        if seen < MESSAGE_LEN {
            let remaining = left(2 * deadline_ms);
            if remaining <= 0 {
                return ServerStep::NoFinal;
            }
            io::wait(fd, libc::POLLIN, remaining);
            continue;
        }
        return match Message::decode(&bytes) {
            Ok(last) if last.kind == Kind::Confirm && last.nonce == proposal.nonce => {
                let _ = io::discard(fd, MESSAGE_LEN);
                match crate::relay::rdma_adopt(relayed, fd) {
                    Ok(()) => ServerStep::Upgraded,
                    Err(_) => ServerStep::ClientDeclined(Reason::Other),
                }
            }
            Ok(last) if last.kind == Kind::Decline => {
                let _ = io::discard(fd, MESSAGE_LEN);
                io::quick_ack(fd);
                ServerStep::ClientDeclined(last.reason.unwrap_or(Reason::Other))
            }
            // Not the final: the client's application bytes, left alone.
            _ => ServerStep::ClientDeclined(Reason::Other),
        };
    }
}

/// A connection now runs on RDMA: counted, kept for the agent's list of attempts (reason
/// `upgraded`), logged.
pub(crate) fn upgraded(
    config: &Config,
    fd: i32,
    role: UpgradeRole,
    remote: Option<SocketAddr>,
    started_us: u64,
) {
    let elapsed_us = io::monotonic_us().saturating_sub(started_us);
    counters::decided(Stack::Rdma, stackroute_snapshot::CongestionControl::Default);
    let address = |a: Option<SocketAddr>| a.map_or_else(|| "?".to_string(), |a| a.to_string());
    counters::upgrade_attempt(UpgradeAttempt {
        role,
        local: address(sys::local_address(fd)),
        remote: address(remote),
        reason: stackroute_rdma_upgrade::UPGRADED.into(),
        peer_reason: None,
        elapsed_us,
    });
    if config.debug {
        crate::logic::debug_line(format_args!(
            "fd={fd} rdma upgrade with {}: upgraded after {}.{:03} ms; the connection runs on RDMA",
            address(remote),
            elapsed_us / 1000,
            elapsed_us % 1000,
        ));
    }
    if counters::report_due(sys::coarse_seconds()) {
        crate::agent::report(config);
    }
}

/// An attempt ended without an upgrade: counted by reason, kept for the agent's list of
/// attempts (`stackroute connections`), logged (`STACKROUTE_LOG=debug`), and reported if a
/// report is due.
pub(crate) fn ended(
    config: &Config,
    fd: i32,
    role: UpgradeRole,
    remote: Option<SocketAddr>,
    outcome: Outcome,
    started_us: u64,
) {
    let elapsed_us = io::monotonic_us().saturating_sub(started_us);
    counters::fell_back(fallback_reason(outcome.reason));
    let address = |a: Option<SocketAddr>| a.map_or_else(|| "?".to_string(), |a| a.to_string());
    counters::upgrade_attempt(UpgradeAttempt {
        role,
        local: address(sys::local_address(fd)),
        remote: address(remote),
        reason: outcome.reason.as_str().into(),
        peer_reason: outcome.peer.map(|r| r.as_str().into()),
        elapsed_us,
    });
    if config.debug {
        let what = match role {
            UpgradeRole::Client => "not upgraded",
            UpgradeRole::Server => "declined",
        };
        crate::logic::debug_line(format_args!(
            "fd={fd} rdma upgrade with {}: {what} after {}.{:03} ms: reason={} peer-reason={}; the connection stays TCP",
            address(remote),
            elapsed_us / 1000,
            elapsed_us % 1000,
            outcome.reason,
            outcome.peer.map_or("-", Reason::as_str),
        ));
    }
    if counters::report_due(sys::coarse_seconds()) {
        crate::agent::report(config);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lasting_declines_are_remembered_per_server() {
        let server: SocketAddr = "10.9.9.9:9000".parse().unwrap();
        let other: SocketAddr = "10.9.9.9:9001".parse().unwrap();
        let declined = |peer| Outcome {
            reason: Reason::PeerDeclined,
            peer: Some(peer),
        };
        remember_decline(server, declined(Reason::SpokeFirst));
        remember_decline(server, Outcome::local(Reason::ConnectTimeout));
        assert!(
            !declined_lately(server),
            "passing reasons are not remembered"
        );
        remember_decline(server, declined(Reason::NoDevice));
        assert!(declined_lately(server));
        assert!(!declined_lately(other));
        // More servers than slots: the newest are kept.
        for port in 0..DECLINED_SLOTS as u16 {
            remember_decline(
                SocketAddr::from(([10, 8, 0, 1], port)),
                declined(Reason::Memlock),
            );
        }
        assert!(declined_lately(SocketAddr::from(([10, 8, 0, 1], 5))));
    }

    #[test]
    fn memlock_binds_unless_unlimited_or_ipc_lock() {
        assert_eq!(memlock_check(Some(8 << 20), false), Err(Reason::Memlock));
        assert_eq!(memlock_check(Some(8 << 20), true), Ok(()));
        assert_eq!(memlock_check(Some(MIN_MEMLOCK), false), Ok(()));
        assert_eq!(memlock_check(None, false), Ok(()));
    }

    #[test]
    fn every_reason_is_counted_under_a_name() {
        for reason in Reason::ALL {
            let counted = fallback_reason(reason);
            assert!(FallbackReason::ALL.contains(&counted), "{reason:?}");
        }
        assert_eq!(
            fallback_reason(Reason::NoDevice).as_str(),
            Reason::NoDevice.as_str()
        );
        assert_eq!(
            fallback_reason(Reason::ConnectTimeout).as_str(),
            Reason::ConnectTimeout.as_str()
        );
    }
}
