//! The reader protocol of the agent's published files (lrd-agent/README.md): the generation
//! counter is mapped once; per lookup one acquire load of it, and only when it moved is
//! `DIR/snapshot` mapped and validated again. No lock: one thread re-maps (a try-lock), the
//! others keep using the snapshot in hand meanwhile. Only when there is none in hand yet (the
//! process's first lookups, often from many threads at once) do they wait, bounded, for the
//! thread that is mapping: otherwise every connection made during the first load fell back to
//! the kernel as if there were no agent (seen in CI: 139 of 160 concurrent connects).
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::sys::{self, LoadError, Loaded};

static GENERATION: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
/// Coarse second of the last attempt to map `DIR/generation` (retried at most once a second).
static LAST_MAP_ATTEMPT: AtomicU64 = AtomicU64::new(u64::MAX);
/// Held by the thread mapping `DIR/generation`.
static GENERATION_MAPPING: AtomicBool = AtomicBool::new(false);
/// Held by the thread re-mapping `DIR/snapshot`.
static REMAPPING: AtomicBool = AtomicBool::new(false);
/// How long a lookup with nothing in hand waits for another thread's first mapping; a mapping
/// takes microseconds to a few milliseconds, so this only bounds a stuck file system.
const FIRST_LOAD_WAIT: Duration = Duration::from_millis(200);
/// A generation whose `DIR/snapshot` did not validate: not retried until the generation moves.
static FAILED: AtomicU64 = AtomicU64::new(0);

/// Why no snapshot could be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Unavailable {
    /// No agent: no generation file, no snapshot published, or it was withdrawn.
    NoAgent,
    /// The published snapshot could not be read or did not validate.
    Corrupt,
}

/// Spins (yielding) while `busy` holds, at most `FIRST_LOAD_WAIT`.
fn wait_while(busy: &AtomicBool) {
    let deadline = Instant::now() + FIRST_LOAD_WAIT;
    while busy.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::yield_now();
    }
}

fn mapped_generation() -> Option<&'static AtomicU64> {
    let pointer = GENERATION.load(Ordering::Acquire);
    if pointer.is_null() {
        None
    } else {
        sys::word(pointer)
    }
}

fn generation_word(config: &Config) -> Option<&'static AtomicU64> {
    if let Some(word) = mapped_generation() {
        return Some(word);
    }
    if GENERATION_MAPPING
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        // Another thread is mapping it right now: use its result.
        wait_while(&GENERATION_MAPPING);
        return mapped_generation();
    }
    // Re-check under the flag: the previous holder may have just stored it.
    let mut word = mapped_generation();
    if word.is_none() {
        let now = sys::coarse_seconds();
        let last = LAST_MAP_ATTEMPT.swap(now, Ordering::Relaxed);
        if last != now {
            word = sys::map_generation(&config.generation_path);
            if let Some(word) = word {
                GENERATION.store(sys::word_pointer(word), Ordering::Release);
            }
        }
    }
    GENERATION_MAPPING.store(false, Ordering::Release);
    word
}

/// Runs `f` on the current published snapshot, re-mapping it first if its generation moved.
pub(crate) fn with_snapshot<R>(
    config: &Config,
    f: impl FnOnce(Result<&Loaded, Unavailable>) -> R,
) -> R {
    let Some(word) = generation_word(config) else {
        return f(Err(Unavailable::NoAgent));
    };
    let generation = word.load(Ordering::Acquire);
    let mut outcome = Ok(());
    let in_hand = sys::current_generation();
    if in_hand != Some(generation) {
        outcome = refresh(config, generation);
        if in_hand.is_none() && sys::current_generation().is_none() {
            // Nothing in hand and another thread holds the re-map lock: its load is the first
            // snapshot this process will have, so wait for it rather than fall back.
            wait_while(&REMAPPING);
        }
    }
    sys::with_current(|loaded| match loaded {
        // A snapshot in hand is used even when a newer one failed to load or is being mapped
        // by another thread.
        Some(loaded) => f(Ok(loaded)),
        None => f(Err(match outcome {
            Err(LoadError::Invalid) => Unavailable::Corrupt,
            _ if FAILED.load(Ordering::Relaxed) == generation && generation != 0 => {
                Unavailable::Corrupt
            }
            _ => Unavailable::NoAgent,
        })),
    })
}

fn refresh(config: &Config, generation: u64) -> Result<(), LoadError> {
    if FAILED.load(Ordering::Relaxed) == generation {
        return Err(LoadError::Invalid);
    }
    if REMAPPING
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return Ok(());
    }
    if !config.load_delay.is_zero() {
        std::thread::sleep(config.load_delay);
    }
    let result = match sys::load_snapshot(&config.snapshot_path) {
        Ok(loaded) => {
            // A smaller generation means a rename raced the open: keep what is in hand and
            // retry on a later lookup.
            if sys::current_generation().is_none_or(|held| loaded.generation >= held) {
                sys::replace_current(Some(loaded));
            }
            Ok(())
        }
        Err(LoadError::Missing) => {
            sys::replace_current(None);
            Err(LoadError::Missing)
        }
        Err(LoadError::Invalid) => {
            FAILED.store(generation, Ordering::Relaxed);
            Err(LoadError::Invalid)
        }
    };
    REMAPPING.store(false, Ordering::Release);
    result
}

/// After `fork` in the child: no other thread exists to hold the mapping locks.
pub(crate) fn reset_after_fork() {
    GENERATION_MAPPING.store(false, Ordering::Release);
    REMAPPING.store(false, Ordering::Release);
    sys::reset_readers_after_fork();
}
