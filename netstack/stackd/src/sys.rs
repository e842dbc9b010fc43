//! Taking ownership of descriptors inherited from the process that started the instance (the
//! AF_PACKET socket and the readiness pipe named on the command line): the only `unsafe`.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Takes the inherited descriptor `fd` (named on the command line), after checking it is open.
/// Call once per number, at start, before anything else in the process opens or owns
/// descriptors by number: `main` does, and refuses the same number twice.
pub(crate) fn take_inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("descriptor {fd} is negative"),
        ));
    }
    // An open descriptor has an entry in /proc/self/fd (checked without touching the number).
    std::fs::symlink_metadata(format!("/proc/self/fd/{fd}"))
        .map_err(|e| io::Error::new(e.kind(), format!("descriptor {fd} is not open: {e}")))?;
    // SAFETY: `fd` is open (checked above) and was inherited across exec: nothing in this
    // process owns it yet, and the caller takes each number once, before any other owner could
    // appear, so the returned `OwnedFd` is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
