//! Every system call and raw pointer of the shim, behind safe functions: the real functions
//! (resolved once with `dlsym(RTLD_NEXT)` and cached in atomics), `errno`, socket options and
//! addresses, the memory maps of the agent's published files, and the agent's Unix socket.

use std::ffi::{CStr, c_int, c_void};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::FromRawFd as _;
use std::os::unix::net::UnixStream;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use stackroute_snapshot::Snapshot;

pub(crate) mod relay;
pub(crate) mod upgrade;

/// A libc function found with `dlsym(RTLD_NEXT)` on first use; 0 until then. A race resolves
/// it twice to the same address; after `fork` the child keeps the cached value.
pub(crate) struct Real {
    name: &'static CStr,
    address: AtomicUsize,
}

impl Real {
    pub(crate) const fn new(name: &'static CStr) -> Self {
        Self {
            name,
            address: AtomicUsize::new(0),
        }
    }

    /// The function's address, or 0 if no later object defines it.
    pub(crate) fn address(&self) -> usize {
        let cached = self.address.load(Ordering::Relaxed);
        if cached != 0 {
            return cached;
        }
        // SAFETY: `name` is a NUL-terminated string; dlsym has no other precondition.
        let found = unsafe { libc::dlsym(libc::RTLD_NEXT, self.name.as_ptr()) } as usize;
        self.address.store(found, Ordering::Relaxed);
        found
    }
}

/// The calling thread's `errno`.
pub(crate) fn errno() -> c_int {
    // SAFETY: __errno_location returns a valid pointer to this thread's errno.
    unsafe { *libc::__errno_location() }
}

/// Sets the calling thread's `errno`.
pub(crate) fn set_errno(value: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = value }
}

/// `setsockopt(fd, IPPROTO_TCP, TCP_CONGESTION, name)`: `Err(errno)` when the kernel refuses.
pub(crate) fn set_congestion_control(fd: c_int, name: &[u8]) -> Result<(), c_int> {
    // SAFETY: `name` is a live slice of `name.len()` bytes.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// An integer `SOL_SOCKET` option (`SO_PROTOCOL`, `SO_DOMAIN`, `SO_TYPE`).
pub(crate) fn socket_option(fd: c_int, option: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals of the sizes announced.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&raw mut value).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// The socket's bound address (`getsockname`), for IPv4 and IPv6 sockets.
pub(crate) fn local_address(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are live locals of the sizes announced.
    let rc = unsafe { libc::getsockname(fd, (&raw mut storage).cast(), &raw mut len) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel wrote `len` bytes of a socket address into `storage`.
    unsafe { socket_address((&raw const storage).cast(), len) }
}

/// The socket's peer address (`getpeername`), for IPv4 and IPv6 sockets.
pub(crate) fn peer_address(fd: c_int) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage and len are live locals of the sizes announced.
    let rc = unsafe { libc::getpeername(fd, (&raw mut storage).cast(), &raw mut len) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the kernel wrote `len` bytes of a socket address into `storage`.
    unsafe { socket_address((&raw const storage).cast(), len) }
}

/// Reads an IPv4 or IPv6 socket address a caller handed to a hook; `None` for other families,
/// a null pointer or a length too short for the family.
///
/// # Safety
/// `address` is null or points to at least `len` readable bytes.
pub(crate) unsafe fn socket_address(
    address: *const libc::sockaddr,
    len: libc::socklen_t,
) -> Option<SocketAddr> {
    if address.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable (checked above); read unaligned, as callers
    // may pass any buffer.
    let family = unsafe { ptr::read_unaligned(address.cast::<libc::sa_family_t>()) };
    match c_int::from(family) {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: `len` covers a sockaddr_in.
            let v4 = unsafe { ptr::read_unaligned(address.cast::<libc::sockaddr_in>()) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: `len` covers a sockaddr_in6.
            let v6 = unsafe { ptr::read_unaligned(address.cast::<libc::sockaddr_in6>()) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(v6.sin6_addr.s6_addr),
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The destination of a `sendmsg` (its `msg_name`), if any.
///
/// # Safety
/// `message` is null or points to a readable `msghdr` whose `msg_name` is null or readable for
/// `msg_namelen` bytes.
pub(crate) unsafe fn message_address(message: *const libc::msghdr) -> Option<SocketAddr> {
    if message.is_null() {
        return None;
    }
    // SAFETY: the caller's msghdr is readable (the contract above).
    let header = unsafe { ptr::read_unaligned(message) };
    // SAFETY: msg_name is null or readable for msg_namelen bytes.
    unsafe { socket_address(header.msg_name.cast(), header.msg_namelen) }
}

/// Seconds on the coarse monotonic clock (a vDSO read, no system call).
pub(crate) fn coarse_seconds() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut now) };
    now.tv_sec as u64
}

/// Writes `bytes` to standard error with one `write(2)` (no buffering, no allocation).
pub(crate) fn write_stderr(bytes: &[u8]) {
    // SAFETY: `bytes` is a live slice; a short or failed write is ignored (debug output).
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

/// Registers `child` to run in the child after every `fork()`.
pub(crate) fn at_fork_child(child: extern "C" fn()) {
    // SAFETY: a plain function pointer with the C ABI; pthread_atfork copies it.
    unsafe { libc::pthread_atfork(None, None, Some(child)) };
}

/// A connection to the agent's socket at `path` (NUL-terminated), with `timeout` on every read
/// and write. A full backlog or a missing agent is `None` at once (the connect is
/// non-blocking).
pub(crate) fn agent_stream(path: &CStr, timeout: Duration) -> Option<UnixStream> {
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is a socket this function just created and owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let bytes = path.to_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= address.sun_path.len() {
        return None;
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: `address` is a live, NUL-terminated sockaddr_un of the size given.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const address).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return None;
    }
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    Some(stream)
}

/// A read-only shared map of a whole file.
struct Map {
    address: *mut c_void,
    len: usize,
}

impl Map {
    fn open(path: &CStr) -> io::Result<Self> {
        // SAFETY: `path` is NUL-terminated.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `stat` is plain data, all zeroes is valid; fstat fills it.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open; stat is a live local.
        let len = if unsafe { libc::fstat(fd, &raw mut stat) } == 0 {
            Ok(stat.st_size as usize)
        } else {
            Err(io::Error::last_os_error())
        };
        let map = len.and_then(|len| {
            if len == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            // SAFETY: a fresh read-only shared mapping of an open file; the kernel picks the
            // address.
            let address = unsafe {
                libc::mmap(
                    ptr::null_mut(),
                    len,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if address == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else {
                Ok(Self { address, len })
            }
        });
        // SAFETY: fd is ours; the mapping outlives it.
        unsafe { libc::close(fd) };
        map
    }
}

/// The agent's generation counter, mapped once and never unmapped.
pub(crate) fn map_generation(path: &CStr) -> Option<&'static AtomicU64> {
    let map = Map::open(path).ok()?;
    // SAFETY: the map is `len` readable bytes, kept for the life of the process (never
    // unmapped), so the slice is 'static.
    let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(map.address.cast(), map.len) };
    stackroute_local_api::published::parse_generation(bytes)?;
    let word = map
        .address
        .wrapping_byte_add(stackroute_local_api::published::GENERATION_OFFSET);
    if !(word as usize).is_multiple_of(align_of::<AtomicU64>()) {
        return None;
    }
    // SAFETY: the word is inside the map (parse_generation checked the length), aligned
    // (checked above), lives forever, and the agent only stores to it atomically.
    Some(unsafe { &*word.cast::<AtomicU64>() })
}

/// A published snapshot, mapped and validated once.
pub(crate) struct Loaded {
    /// The generation in its header.
    pub(crate) generation: u64,
    /// Controller revision.
    pub(crate) revision: u64,
    /// Loaded from disk by the agent and not yet confirmed by a controller.
    pub(crate) stale: bool,
    /// The validated snapshot, borrowing `map` (which outlives every reader, see `CURRENT`).
    pub(crate) snapshot: Snapshot<'static>,
    map: Map,
}

/// Why a published snapshot was not loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LoadError {
    /// `DIR/snapshot` does not exist: the agent withdrew it (or never published one).
    Missing,
    /// It exists but cannot be read, or its header or content does not validate.
    Invalid,
}

/// Maps and validates `DIR/snapshot`.
pub(crate) fn load_snapshot(path: &CStr) -> Result<Box<Loaded>, LoadError> {
    let map = Map::open(path).map_err(|error| match error.raw_os_error() {
        Some(libc::ENOENT) => LoadError::Missing,
        _ => LoadError::Invalid,
    })?;
    // SAFETY: the map is `len` readable bytes; the slice lives as long as the `Loaded` that
    // owns the map, and `Loaded`s are only unmapped when no reader holds one (`retire`).
    let bytes: &'static [u8] = unsafe { std::slice::from_raw_parts(map.address.cast(), map.len) };
    let header = stackroute_local_api::published::parse(bytes).map_err(|_| LoadError::Invalid)?;
    let snapshot = Snapshot::parse(header.snapshot).map_err(|_| LoadError::Invalid)?;
    Ok(Box::new(Loaded {
        generation: header.generation,
        revision: header.revision,
        stale: header.stale,
        snapshot,
        map,
    }))
}

/// The snapshot in use (null: none). Readers announce themselves in `READERS` before loading
/// it; a replaced one is unmapped only when `READERS` was seen at 0 after the swap, so no
/// reader can still hold it (sequentially consistent ordering on both).
static CURRENT: AtomicPtr<Loaded> = AtomicPtr::new(ptr::null_mut());
static READERS: AtomicUsize = AtomicUsize::new(0);
/// Replaced snapshots a reader may still use; beyond this many, one is kept mapped for good.
static RETIRED: [AtomicPtr<Loaded>; 4] = [const { AtomicPtr::new(ptr::null_mut()) }; 4];

/// Runs `f` with the snapshot in use.
pub(crate) fn with_current<R>(f: impl FnOnce(Option<&Loaded>) -> R) -> R {
    READERS.fetch_add(1, Ordering::SeqCst);
    let current = CURRENT.load(Ordering::SeqCst);
    // SAFETY: a non-null CURRENT points to a leaked Box<Loaded> that is not freed while this
    // thread is counted in READERS (see `replace_current`).
    let result = f(unsafe { current.as_ref() });
    READERS.fetch_sub(1, Ordering::SeqCst);
    result
}

/// The generation of the snapshot in use, if any.
pub(crate) fn current_generation() -> Option<u64> {
    with_current(|loaded| loaded.map(|l| l.generation))
}

/// Puts `next` in use. Callers serialise (the reader's remap lock).
pub(crate) fn replace_current(next: Option<Box<Loaded>>) {
    let next = next.map_or(ptr::null_mut(), Box::into_raw);
    let previous = CURRENT.swap(next, Ordering::SeqCst);
    let idle = READERS.load(Ordering::SeqCst) == 0;
    for slot in &RETIRED {
        let retired = if idle {
            slot.swap(ptr::null_mut(), Ordering::SeqCst)
        } else {
            ptr::null_mut()
        };
        free(retired);
    }
    if previous.is_null() {
        return;
    }
    if idle {
        free(previous);
    } else if let Some(slot) = RETIRED
        .iter()
        .find(|slot| slot.load(Ordering::SeqCst).is_null())
    {
        slot.store(previous, Ordering::SeqCst);
    }
    // Otherwise `previous` stays mapped for the life of the process.
}

fn free(loaded: *mut Loaded) {
    if loaded.is_null() {
        return;
    }
    // SAFETY: `loaded` came from Box::into_raw and no reader holds it (READERS was 0 after it
    // left CURRENT).
    let loaded = unsafe { Box::from_raw(loaded) };
    // SAFETY: the map is ours and nothing borrows it any more.
    unsafe { libc::munmap(loaded.map.address, loaded.map.len) };
}

/// After `fork`: the child has one thread, which is in no lookup.
pub(crate) fn reset_readers_after_fork() {
    READERS.store(0, Ordering::SeqCst);
}

/// The generation word behind a pointer stored by `reader` (always one `map_generation` made).
pub(crate) fn word(pointer: *mut AtomicU64) -> Option<&'static AtomicU64> {
    // SAFETY: the only non-null pointers stored come from `word_pointer` of a 'static reference
    // returned by `map_generation`, whose map is never unmapped.
    unsafe { pointer.as_ref() }
}

/// The pointer form of a generation word, for storing in an `AtomicPtr`.
pub(crate) fn word_pointer(word: &'static AtomicU64) -> *mut AtomicU64 {
    ptr::from_ref(word).cast_mut()
}

/// Writes `address` into a caller's `(sockaddr *, socklen_t *)` pair as `getsockname(2)` does:
/// at most `*len` bytes copied, `*len` set to the full size.
///
/// # Safety
/// `out` is writable for `*len` bytes and `len` is a readable and writable `socklen_t`, as the
/// socket calls require of their callers (both may be null: nothing is written).
pub(crate) unsafe fn write_address(
    address: SocketAddr,
    out: *mut libc::sockaddr,
    len: *mut libc::socklen_t,
) {
    if out.is_null() || len.is_null() {
        return;
    }
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let size = match address {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a sockaddr_in fits in a sockaddr_storage.
            unsafe { ptr::write_unaligned((&raw mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: a sockaddr_in6 fits in a sockaddr_storage.
            unsafe { ptr::write_unaligned((&raw mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: the caller's contract: `len` is readable and writable, `out` writable for `*len`.
    unsafe {
        let room = ptr::read_unaligned(len) as usize;
        ptr::copy_nonoverlapping(
            (&raw const storage).cast::<u8>(),
            out.cast::<u8>(),
            room.min(size),
        );
        ptr::write_unaligned(len, size as libc::socklen_t);
    }
}

/// Writes an option's value into a caller's `getsockopt(2)` buffer: at most `*len` bytes,
/// `*len` set to what was written.
///
/// # Safety
/// `out` is writable for `*len` bytes and `len` readable and writable (either null: nothing).
pub(crate) unsafe fn write_option(value: &[u8], out: *mut c_void, len: *mut libc::socklen_t) {
    if out.is_null() || len.is_null() {
        return;
    }
    // SAFETY: the caller's contract.
    unsafe {
        let n = (ptr::read_unaligned(len) as usize).min(value.len());
        ptr::copy_nonoverlapping(value.as_ptr(), out.cast::<u8>(), n);
        ptr::write_unaligned(len, n as libc::socklen_t);
    }
}

/// The bytes of a caller's `setsockopt(2)` value.
///
/// # Safety
/// `value` is null or readable for `len` bytes, and stays so for the returned lifetime (the
/// call's duration).
pub(crate) unsafe fn option_bytes<'a>(value: *const c_void, len: libc::socklen_t) -> &'a [u8] {
    if value.is_null() {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(value.cast::<u8>(), len as usize) }
}
