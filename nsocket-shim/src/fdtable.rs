//! What the shim knows about each file descriptor, in a fixed table of atomics indexed by fd:
//! one load answers "is there anything to do for this fd", no lock, no allocation. The table
//! is zero-initialised memory (untouched pages cost nothing); `fork` copies it with the
//! process.
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicU32, Ordering};

use stackroute_snapshot::{CongestionControl, Stack};

/// Descriptors at or above this are not tracked: they are decided again at each `connect`
/// (the same decision) and their listeners are withdrawn by the agent at exit, not at close.
pub(crate) const TABLE_LEN: usize = 1 << 20;

static TABLE: [AtomicU32; TABLE_LEN] = [const { AtomicU32::new(0) }; TABLE_LEN];
/// One past the highest fd ever written, so ranges are cleared without touching the rest.
static HIGH: AtomicU32 = AtomicU32::new(0);

/// What kind of socket an fd is, as far as decisions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Not seen created (inherited, or from a call the shim does not hook): ask the kernel.
    Unknown,
    /// An IPv4/IPv6 TCP socket.
    Tcp,
    /// An IPv4/IPv6 UDP socket.
    Udp,
    /// Anything else (AF_UNIX, raw, netlink, …): left alone.
    Other,
}

/// One fd's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry(u32);

const KIND_MASK: u32 = 0b11;
const DECIDED: u32 = 1 << 2;
const LISTENER: u32 = 1 << 3;
const STACK_SHIFT: u32 = 4;
const CC_SHIFT: u32 = 6;
const NODELAY: u32 = 1 << 9;
const CONNECTED: u32 = 1 << 10;
const ERROR_REPORTED: u32 = 1 << 11;
const PASSIVE: u32 = 1 << 12;
const EPOLL_RECORDED: u32 = 1 << 13;
const EPOLL_OVERFLOW: u32 = 1 << 14;
const DUAL_LISTEN: u32 = 1 << 15;
const FROM_INSTANCE: u32 = 1 << 16;
const UPGRADE_LISTENER: u32 = 1 << 17;
const UPGRADE_SHIFT: u32 = 18;
const UPGRADE_MASK: u32 = 0b111 << UPGRADE_SHIFT;

/// Where a connection stands in the RDMA upgrade exchange (`rdma-upgrade`), for the bytes at
/// the front of its stream that the application must never read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Upgrade {
    /// Nothing to strip.
    None,
    /// Server, accepted from an upgrade listener: a proposal may come first; answer it.
    Probe,
    /// Server whose application wrote first: strip a proposal (and the final) unanswered.
    ProbeSilent,
    /// Server that took a proposal: strip the client's final message.
    AwaitFinal,
    /// Client that gave up waiting: strip the server's answer if it still comes first.
    LateAnswer,
}

impl Upgrade {
    fn bits(self) -> u32 {
        (match self {
            Self::None => 0,
            Self::Probe => 1,
            Self::ProbeSilent => 2,
            Self::AwaitFinal => 3,
            Self::LateAnswer => 4,
        }) << UPGRADE_SHIFT
    }

    fn from_bits(bits: u32) -> Self {
        match (bits & UPGRADE_MASK) >> UPGRADE_SHIFT {
            1 => Self::Probe,
            2 => Self::ProbeSilent,
            3 => Self::AwaitFinal,
            4 => Self::LateAnswer,
            _ => Self::None,
        }
    }
}

impl Entry {
    /// Nothing known.
    pub(crate) const EMPTY: Self = Self(0);

    /// A fresh socket of `kind`.
    pub(crate) fn new(kind: Kind) -> Self {
        Self(match kind {
            Kind::Unknown => 0,
            Kind::Tcp => 1,
            Kind::Udp => 2,
            Kind::Other => 3,
        })
    }

    /// Its kind.
    pub(crate) fn kind(self) -> Kind {
        match self.0 & KIND_MASK {
            1 => Kind::Tcp,
            2 => Kind::Udp,
            3 => Kind::Other,
            _ => Kind::Unknown,
        }
    }

    /// With `kind`.
    pub(crate) fn with_kind(self, kind: Kind) -> Self {
        Self(self.0 & !KIND_MASK | Self::new(kind).0)
    }

    /// Whether a transport is pinned.
    pub(crate) fn decided(self) -> bool {
        self.0 & DECIDED != 0
    }

    /// The pinned transport.
    pub(crate) fn transport(self) -> Option<(Stack, CongestionControl)> {
        self.decided().then(|| {
            (
                Stack::from_byte(((self.0 >> STACK_SHIFT) & 0b11) as u8).unwrap_or(Stack::Kernel),
                CongestionControl::from_byte(((self.0 >> CC_SHIFT) & 0b111) as u8)
                    .unwrap_or(CongestionControl::Default),
            )
        })
    }

    /// With `stack`/`cc` pinned.
    pub(crate) fn with_decision(self, stack: Stack, cc: CongestionControl) -> Self {
        Self(
            self.0 & !(0b11 << STACK_SHIFT | 0b111 << CC_SHIFT)
                | DECIDED
                | (stack as u32) << STACK_SHIFT
                | (cc as u32) << CC_SHIFT,
        )
    }

    /// `TCP_NODELAY` of a relayed socket (the instance holds the connection; this is what
    /// `getsockopt` reads back).
    pub(crate) fn nodelay(self) -> bool {
        self.0 & NODELAY != 0
    }

    /// With `TCP_NODELAY` recorded.
    pub(crate) fn with_nodelay(self, on: bool) -> Self {
        if on {
            Self(self.0 | NODELAY)
        } else {
            Self(self.0 & !NODELAY)
        }
    }

    fn flag(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    fn with_flag(self, bit: u32, on: bool) -> Self {
        if on {
            Self(self.0 | bit)
        } else {
            Self(self.0 & !bit)
        }
    }

    /// A relayed socket whose completed connect was reported (a repeated `connect` is then
    /// `EISCONN`, as Linux answers once `connect` returned 0).
    pub(crate) fn connected(self) -> bool {
        self.flag(CONNECTED)
    }

    /// With the completed connect reported.
    pub(crate) fn with_connected(self) -> Self {
        self.with_flag(CONNECTED, true)
    }

    /// A relayed socket whose reset or failed handshake was reported (by a read or
    /// `SO_ERROR`): Linux reports a socket error once, then reads see end of file.
    pub(crate) fn error_reported(self) -> bool {
        self.flag(ERROR_REPORTED)
    }

    /// With the error reported.
    pub(crate) fn with_error_reported(self) -> Self {
        self.with_flag(ERROR_REPORTED, true)
    }

    /// A socket that called `listen`: never relayed, its epoll registrations not recorded.
    pub(crate) fn passive(self) -> bool {
        self.flag(PASSIVE)
    }

    /// A listener whose instance also accepts user-space peers for it (dual listen).
    pub(crate) fn dual_listen(self) -> bool {
        self.flag(DUAL_LISTEN)
    }

    /// With the dual-listen mark.
    pub(crate) fn with_dual_listen(self) -> Self {
        self.with_flag(DUAL_LISTEN, true)
    }

    /// A socket accepted from a dual listener whose peer is the instance (a user-space peer's
    /// connection delivered over loopback): its peer address is the instance's to tell.
    pub(crate) fn delivered_by_instance(self) -> bool {
        self.flag(FROM_INSTANCE)
    }

    /// With the delivered-by-instance mark.
    pub(crate) fn with_delivered_by_instance(self) -> Self {
        self.with_flag(FROM_INSTANCE, true)
    }

    /// With the passive mark.
    pub(crate) fn with_passive(self) -> Self {
        self.with_flag(PASSIVE, true)
    }

    /// The fd (as a socket or as an epoll set) has registrations recorded in `epollreg`.
    pub(crate) fn epoll_recorded(self) -> bool {
        self.flag(EPOLL_RECORDED)
    }

    /// With the recorded mark set or cleared.
    pub(crate) fn with_epoll_recorded(self, on: bool) -> Self {
        self.with_flag(EPOLL_RECORDED, on)
    }

    /// A registration of this socket did not fit the record: it is never relayed (the relay
    /// could not carry that registration over).
    pub(crate) fn epoll_overflow(self) -> bool {
        self.flag(EPOLL_OVERFLOW)
    }

    /// With the overflow mark.
    pub(crate) fn with_epoll_overflow(self) -> Self {
        self.with_flag(EPOLL_OVERFLOW, true)
    }

    /// A listener registered as an RDMA upgrade endpoint: its connections may begin with a
    /// proposal.
    pub(crate) fn upgrade_listener(self) -> bool {
        self.flag(UPGRADE_LISTENER)
    }

    /// With the upgrade-listener mark.
    pub(crate) fn with_upgrade_listener(self) -> Self {
        self.with_flag(UPGRADE_LISTENER, true)
    }

    /// The connection's upgrade state.
    pub(crate) fn upgrade(self) -> Upgrade {
        Upgrade::from_bits(self.0)
    }

    /// With `state`.
    pub(crate) fn with_upgrade(self, state: Upgrade) -> Self {
        Self(self.0 & !UPGRADE_MASK | state.bits())
    }

    /// Whether this process registered it as a listener with the agent.
    pub(crate) fn listener(self) -> bool {
        self.0 & LISTENER != 0
    }

    /// With the listener mark set or cleared.
    pub(crate) fn with_listener(self, listener: bool) -> Self {
        if listener {
            Self(self.0 | LISTENER)
        } else {
            Self(self.0 & !LISTENER)
        }
    }
}

fn slot(fd: i32) -> Option<&'static AtomicU32> {
    usize::try_from(fd).ok().and_then(|i| TABLE.get(i))
}

/// The entry of `fd` (empty for untracked fds).
#[inline]
pub(crate) fn get(fd: i32) -> Entry {
    slot(fd).map_or(Entry::EMPTY, |s| Entry(s.load(Ordering::Acquire)))
}

/// Sets the entry of `fd` (ignored for untracked fds).
pub(crate) fn set(fd: i32, entry: Entry) {
    if let Some(s) = slot(fd) {
        if entry != Entry::EMPTY {
            HIGH.fetch_max(fd as u32 + 1, Ordering::Relaxed);
        }
        s.store(entry.0, Ordering::Release);
    }
}

/// Sets the entry of `fd`, returning what it held.
pub(crate) fn replace(fd: i32, entry: Entry) -> Entry {
    match slot(fd) {
        Some(s) => {
            if entry != Entry::EMPTY {
                HIGH.fetch_max(fd as u32 + 1, Ordering::Relaxed);
            }
            Entry(s.swap(entry.0, Ordering::AcqRel))
        }
        None => Entry::EMPTY,
    }
}

/// Clears the entry of `fd`, returning what it held.
#[inline]
pub(crate) fn take(fd: i32) -> Entry {
    match slot(fd) {
        // A load first: closing an fd the shim never saw writes nothing.
        Some(s) if s.load(Ordering::Relaxed) != 0 => Entry(s.swap(0, Ordering::AcqRel)),
        _ => Entry::EMPTY,
    }
}

/// Calls `each` with every fd in `first..=last` that has an entry, clearing it.
pub(crate) fn take_range(first: u32, last: u32, mut each: impl FnMut(i32, Entry)) {
    let end = (HIGH.load(Ordering::Relaxed) as u64).min(u64::from(last) + 1);
    for fd in u64::from(first)..end {
        let entry = take(fd as i32);
        if entry != Entry::EMPTY {
            each(fd as i32, entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let entry = Entry::new(Kind::Tcp);
        assert_eq!(entry.kind(), Kind::Tcp);
        assert!(!entry.decided());
        let decided = entry.with_decision(Stack::Kernel, CongestionControl::Bbr);
        assert_eq!(
            decided.transport(),
            Some((Stack::Kernel, CongestionControl::Bbr))
        );
        assert_eq!(decided.kind(), Kind::Tcp);
        let listener = decided.with_listener(true);
        assert!(listener.listener());
        assert!(!listener.with_listener(false).listener());
        assert_eq!(listener.with_kind(Kind::Udp).kind(), Kind::Udp);
        for state in [
            Upgrade::Probe,
            Upgrade::ProbeSilent,
            Upgrade::AwaitFinal,
            Upgrade::LateAnswer,
            Upgrade::None,
        ] {
            let marked = decided
                .with_upgrade(Upgrade::AwaitFinal)
                .with_upgrade(state);
            assert_eq!(marked.upgrade(), state);
            assert_eq!(marked.transport(), decided.transport());
        }
        assert!(
            Entry::new(Kind::Tcp)
                .with_upgrade_listener()
                .upgrade_listener()
        );
        assert_eq!(
            Entry::new(Kind::Other)
                .with_decision(Stack::Rdma, CongestionControl::Reno)
                .transport(),
            Some((Stack::Rdma, CongestionControl::Reno))
        );
    }

    #[test]
    fn table_set_take_and_ranges() {
        set(900_000, Entry::new(Kind::Udp));
        set(900_002, Entry::new(Kind::Tcp));
        set(-1, Entry::new(Kind::Tcp));
        set(TABLE_LEN as i32, Entry::new(Kind::Tcp));
        assert_eq!(get(TABLE_LEN as i32), Entry::EMPTY);
        assert_eq!(get(900_000).kind(), Kind::Udp);
        let mut seen = Vec::new();
        take_range(899_999, u32::MAX, |fd, e| seen.push((fd, e.kind())));
        assert_eq!(seen, [(900_000, Kind::Udp), (900_002, Kind::Tcp)]);
        assert_eq!(take(900_000), Entry::EMPTY);
    }
}
