//! Epoll registrations of TCP sockets that are not decided yet. A `Userspace` decision puts
//! a new file (the relay socket) on the application's fd number, and a registration made
//! before `connect` (`socket`, `epoll_ctl(ADD)`, then a non-blocking `connect`) dies with the
//! kernel socket it named. The shim records such registrations here — epoll set, fd, events,
//! data — and adds them again to the relay socket once it is placed.
//!
//! A fixed table of atomics: no allocation, no lock (a slot is claimed with a compare-and-swap
//! while it is written), fork-safe (the child frees slots a vanished thread was writing). A
//! registration that does not fit keeps its socket off the relay (reason `unsupported`).
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// How many registrations of undecided sockets are kept at once (in the whole process).
pub(crate) const CAPACITY: usize = 64;

const FREE: u32 = 0;
const BUSY: u32 = 1;
const USED: u32 = 2;

struct Slot {
    state: AtomicU32,
    epoll: AtomicI32,
    fd: AtomicI32,
    events: AtomicU32,
    data: AtomicU64,
}

static SLOTS: [Slot; CAPACITY] = [const {
    Slot {
        state: AtomicU32::new(FREE),
        epoll: AtomicI32::new(-1),
        fd: AtomicI32::new(-1),
        events: AtomicU32::new(0),
        data: AtomicU64::new(0),
    }
}; CAPACITY];

impl Slot {
    /// Claims a used slot holding (`epoll`, `fd`) for writing (`None`: it holds something else).
    fn claim(&self, epoll: Option<i32>, fd: Option<i32>) -> bool {
        let matches = |slot: &Self| {
            epoll.is_none_or(|e| slot.epoll.load(Ordering::Relaxed) == e)
                && fd.is_none_or(|f| slot.fd.load(Ordering::Relaxed) == f)
        };
        if self.state.load(Ordering::Acquire) != USED || !matches(self) {
            return false;
        }
        if self
            .state
            .compare_exchange(USED, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        if matches(self) {
            true
        } else {
            self.state.store(USED, Ordering::Release);
            false
        }
    }
}

/// Records a successful `EPOLL_CTL_ADD`; `false` when the table is full.
pub(crate) fn add(epoll: i32, fd: i32, events: u32, data: u64) -> bool {
    for slot in &SLOTS {
        if slot
            .state
            .compare_exchange(FREE, BUSY, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            slot.epoll.store(epoll, Ordering::Relaxed);
            slot.fd.store(fd, Ordering::Relaxed);
            slot.events.store(events, Ordering::Relaxed);
            slot.data.store(data, Ordering::Relaxed);
            slot.state.store(USED, Ordering::Release);
            return true;
        }
    }
    false
}

/// Records a successful `EPOLL_CTL_MOD`.
pub(crate) fn modify(epoll: i32, fd: i32, events: u32, data: u64) {
    for slot in &SLOTS {
        if slot.claim(Some(epoll), Some(fd)) {
            slot.events.store(events, Ordering::Relaxed);
            slot.data.store(data, Ordering::Relaxed);
            slot.state.store(USED, Ordering::Release);
        }
    }
}

/// Forgets the registrations matching `epoll` and `fd` (either may be any), calling `each`
/// with (epoll set, fd, events, data) of each.
fn take(epoll: Option<i32>, fd: Option<i32>, mut each: impl FnMut(i32, i32, u32, u64)) {
    for slot in &SLOTS {
        if slot.claim(epoll, fd) {
            let found = (
                slot.epoll.load(Ordering::Relaxed),
                slot.fd.load(Ordering::Relaxed),
                slot.events.load(Ordering::Relaxed),
                slot.data.load(Ordering::Relaxed),
            );
            slot.state.store(FREE, Ordering::Release);
            each(found.0, found.1, found.2, found.3);
        }
    }
}

/// Records a successful `EPOLL_CTL_DEL`.
pub(crate) fn remove(epoll: i32, fd: i32) {
    take(Some(epoll), Some(fd), |_, _, _, _| {});
}

/// `fd` was closed (as a socket, or as an epoll set): its registrations are gone.
pub(crate) fn forget(fd: i32) {
    take(None, Some(fd), |_, _, _, _| {});
    take(Some(fd), None, |_, _, _, _| {});
}

/// `fd` is decided: calls `add(epoll, events, data)` for each of its registrations (to put
/// them on the relay socket now on that number), and forgets them.
pub(crate) fn replay(fd: i32, mut add: impl FnMut(i32, u32, u64)) {
    take(None, Some(fd), |epoll, _, events, data| {
        add(epoll, events, data)
    });
}

/// In the child after `fork`: a slot another thread of the parent was writing is freed.
pub(crate) fn reset_after_fork() {
    for slot in &SLOTS {
        let _ = slot
            .state
            .compare_exchange(BUSY, FREE, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registrations(fd: i32) -> Vec<(i32, u32, u64)> {
        let mut found = Vec::new();
        replay(fd, |epoll, events, data| found.push((epoll, events, data)));
        found.sort_unstable();
        found
    }

    #[test]
    fn add_modify_remove_replay_and_overflow() {
        // Fd numbers of this test only (the table is process-wide).
        let (fd, other) = (900_101, 900_102);
        assert!(add(900_001, fd, 1, 10));
        assert!(add(900_002, fd, 4, 20));
        assert!(add(900_003, fd, 4, 30));
        assert!(add(900_001, other, 1, 40));
        modify(900_002, fd, 5, 21);
        remove(900_003, fd);
        assert_eq!(registrations(fd), [(900_001, 1, 10), (900_002, 5, 21)]);
        assert!(registrations(fd).is_empty(), "replay forgets");
        // Closing the epoll set forgets what it held.
        forget(900_001);
        assert!(registrations(other).is_empty());
        // Full: the rest do not fit; forgetting makes room again.
        let mut added = 0;
        while add(900_010, fd, 1, 0) {
            added += 1;
            assert!(added <= CAPACITY);
        }
        forget(fd);
        assert!(add(900_010, fd, 1, 0));
        forget(900_010);
    }
}
