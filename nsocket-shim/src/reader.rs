//! The reader protocol of the agent's published files (lrd-agent/README.md): the generation
//! counter is mapped once; per lookup one acquire load of it, and only when it moved is
//! `DIR/snapshot` mapped and validated again. No lock: one thread re-maps (a try-lock), the
//! others keep using the snapshot in hand meanwhile.
#![deny(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use crate::config::Config;
use crate::sys::{self, LoadError, Loaded};

static GENERATION: AtomicPtr<AtomicU64> = AtomicPtr::new(std::ptr::null_mut());
/// Coarse second of the last attempt to map `DIR/generation` (retried at most once a second).
static LAST_MAP_ATTEMPT: AtomicU64 = AtomicU64::new(u64::MAX);
/// Held by the thread re-mapping `DIR/snapshot`.
static REMAPPING: AtomicBool = AtomicBool::new(false);
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

fn generation_word(config: &Config) -> Option<&'static AtomicU64> {
    let pointer = GENERATION.load(Ordering::Acquire);
    if !pointer.is_null() {
        return sys::word(pointer);
    }
    let now = sys::coarse_seconds();
    let last = LAST_MAP_ATTEMPT.swap(now, Ordering::Relaxed);
    if last == now {
        return None;
    }
    let word = sys::map_generation(&config.generation_path)?;
    GENERATION.store(sys::word_pointer(word), Ordering::Release);
    Some(word)
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
    if sys::current_generation() != Some(generation) {
        outcome = refresh(config, generation);
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

/// After `fork` in the child: no other thread exists to hold the re-map lock.
pub(crate) fn reset_after_fork() {
    REMAPPING.store(false, Ordering::Release);
    sys::reset_readers_after_fork();
}
