//! The system calls of the RDMA upgrade exchange (peek, read away, send, wait on one kernel
//! TCP socket; a monotonic clock; a random nonce), the node facts its local check reads
//! (`RLIMIT_MEMLOCK`, `CAP_IPC_LOCK`), and the verbs provider library loaded with `dlopen`.

use std::ffi::{CStr, c_int, c_void};
use std::os::fd::RawFd;

use super::errno;

/// Copies up to `buffer.len()` bytes from the front of `fd`'s receive queue without taking
/// them: `Ok(0)` is end of file; `Err(EAGAIN)` nothing yet.
pub(crate) fn peek(fd: RawFd, buffer: &mut [u8]) -> Result<usize, c_int> {
    // SAFETY: `buffer` is a live, writable slice of the length passed.
    let n = unsafe {
        libc::recv(
            fd,
            buffer.as_mut_ptr().cast::<c_void>(),
            buffer.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 { Err(errno()) } else { Ok(n as usize) }
}

/// Takes `len` bytes (at most 64, already seen with `peek`) off the front of `fd`'s receive
/// queue.
pub(crate) fn discard(fd: RawFd, len: usize) -> Result<(), c_int> {
    let mut sink = [0u8; 64];
    let len = len.min(sink.len());
    // SAFETY: `sink` is a live, writable buffer of at least `len` bytes.
    let n = unsafe {
        libc::recv(
            fd,
            sink.as_mut_ptr().cast::<c_void>(),
            len,
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        n if n < 0 => Err(errno()),
        n if n as usize == len => Ok(()),
        _ => Err(libc::EIO),
    }
}

/// Sends all of `bytes` (a message, into a send queue the application has not used yet, so it
/// fits) without blocking and without `SIGPIPE`.
pub(crate) fn send_all(fd: RawFd, bytes: &[u8]) -> Result<(), c_int> {
    // SAFETY: `bytes` is a live slice of the length passed.
    let n = unsafe {
        libc::send(
            fd,
            bytes.as_ptr().cast::<c_void>(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    match n {
        n if n < 0 => Err(errno()),
        n if n as usize == bytes.len() => Ok(()),
        _ => Err(libc::EAGAIN),
    }
}

/// Sends a pending ACK at once (`TCP_QUICKACK`); errors are ignored (an optimisation).
pub(crate) fn quick_ack(fd: RawFd) {
    let on: c_int = 1;
    // SAFETY: `on` is a live c_int of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&raw const on).cast(),
            size_of::<c_int>() as libc::socklen_t,
        )
    };
}

/// Waits up to `timeout_ms` (-1: no limit) for `events` on `fd`: the events that came (empty
/// on timeout or on a signal).
pub(crate) fn wait(fd: RawFd, events: i16, timeout_ms: i32) -> i16 {
    let mut entry = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let rc = unsafe { libc::poll(&raw mut entry, 1, timeout_ms) };
    if rc > 0 { entry.revents } else { 0 }
}

/// Microseconds of the monotonic clock.
pub(crate) fn monotonic_us() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000
}

/// Milliseconds of the monotonic clock.
pub(crate) fn monotonic_ms() -> u64 {
    monotonic_us() / 1000
}

/// A random number for an exchange's nonce (the clock and pid if `getrandom` has nothing).
pub(crate) fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: `bytes` is a live, writable buffer of 8 bytes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), 8, libc::GRND_NONBLOCK) };
    if n == 8 {
        u64::from_ne_bytes(bytes)
    } else {
        monotonic_ms().rotate_left(17) ^ u64::from(std::process::id())
    }
}

/// This process's soft `RLIMIT_MEMLOCK` in bytes (`None`: unlimited).
pub(crate) fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a live rlimit.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut limit) };
    if rc != 0 {
        return Some(0);
    }
    (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// A verbs provider: a shared library that does the RDMA side, loaded from
/// `STACKROUTE_RDMA_PROVIDER` so that programs without RDMA never load libibverbs. The shim
/// calls only its capability probe:
///
/// - `uint16_t stackroute_rdma_probe(uint8_t gid[16], uint32_t *qpn, uint32_t *psn)`: 0 and
///   the device's endpoint, or a reason code (`stackroute_rdma_upgrade::Reason::code`).
///
/// Queue pairs are the pod's stack instance's (the data-path ABI of
/// `stackroute-rdma-provider`).
#[derive(Clone, Copy)]
pub(crate) struct Provider {
    probe: unsafe extern "C" fn(*mut u8, *mut u32, *mut u32) -> u16,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Provider")
    }
}

impl Provider {
    /// Loads the library at `path` (kept loaded for the life of the process).
    pub(crate) fn open(path: &CStr) -> Option<Self> {
        // SAFETY: `path` is NUL-terminated; the library's constructors run here, as with any
        // library the program's environment names.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return None;
        }
        // SAFETY: `handle` is a live handle and the name is NUL-terminated.
        let probe = unsafe { libc::dlsym(handle, c"stackroute_rdma_probe".as_ptr()) };
        if probe.is_null() {
            return None;
        }
        // SAFETY: the provider ABI above declares the symbol with this signature.
        unsafe {
            Some(Self {
                probe: std::mem::transmute::<
                    *mut c_void,
                    unsafe extern "C" fn(*mut u8, *mut u32, *mut u32) -> u16,
                >(probe),
            })
        }
    }

    /// This side's endpoint (gid, qpn, psn), or a reason code.
    pub(crate) fn probe(&self) -> Result<([u8; 16], u32, u32), u16> {
        let (mut gid, mut qpn, mut psn) = ([0u8; 16], 0u32, 0u32);
        // SAFETY: three live, writable locals of the sizes the ABI writes.
        let code = unsafe { (self.probe)(gid.as_mut_ptr(), &raw mut qpn, &raw mut psn) };
        if code == 0 {
            Ok((gid, qpn, psn))
        } else {
            Err(code)
        }
    }
}
