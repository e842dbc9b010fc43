//! The system calls of relayed (user-space stack) sockets: the socketpair placed on the
//! application's fd, the filler that keeps it unwritable until the handshake completes, the
//! instance's abstract `SOCK_SEQPACKET` control socket with `SCM_RIGHTS`, and the abstract name
//! a relay socket carries its addresses in.

use std::ffi::c_int;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::time::Duration;

use super::errno;

/// Longest abstract name (`sun_path` without the leading NUL).
pub(crate) const MAX_NAME: usize = 107;

/// A connected `AF_UNIX` stream pair, both ends close-on-exec: (application end, stack end).
pub(crate) fn stream_pair() -> Result<(OwnedFd, OwnedFd), c_int> {
    let mut fds = [-1 as c_int; 2];
    // SAFETY: `fds` is a live array of two ints, as socketpair(2) requires.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(errno());
    }
    // SAFETY: both fds were just created by socketpair and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Writes zero bytes into `fd` without blocking until its send buffer is full; how many.
pub(crate) fn fill(fd: &OwnedFd) -> u64 {
    static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];
    let mut total = 0u64;
    loop {
        // SAFETY: ZEROES is a live static buffer of the length given.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                ZEROES.as_ptr().cast(),
                ZEROES.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n <= 0 {
            return total;
        }
        total += n as u64;
    }
}

/// Binds `fd` to the abstract name `name` (no leading NUL).
pub(crate) fn bind_abstract(fd: &OwnedFd, name: &[u8]) -> Result<(), c_int> {
    let (address, len) = abstract_address(name).ok_or(libc::ENAMETOOLONG)?;
    // SAFETY: `address` is a live sockaddr_un of `len` meaningful bytes.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), (&raw const address).cast(), len) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

/// The abstract name `fd` is bound to, if it is an `AF_UNIX` socket bound to one.
pub(crate) fn abstract_name(fd: RawFd, out: &mut [u8; MAX_NAME]) -> Option<usize> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: address and len are live locals of the sizes announced.
    let rc = unsafe { libc::getsockname(fd, (&raw mut address).cast(), &raw mut len) };
    let path_len = (len as usize).checked_sub(size_of::<libc::sa_family_t>())?;
    if rc != 0
        || c_int::from(address.sun_family) != libc::AF_UNIX
        || path_len < 2
        || address.sun_path[0] != 0
    {
        return None;
    }
    let name = &address.sun_path[1..path_len.min(address.sun_path.len())];
    for (slot, byte) in out.iter_mut().zip(name) {
        *slot = *byte as u8;
    }
    Some(name.len().min(MAX_NAME))
}

fn abstract_address(name: &[u8]) -> Option<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if name.len() > MAX_NAME {
        return None;
    }
    address.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (slot, byte) in address.sun_path[1..].iter_mut().zip(name) {
        *slot = *byte as libc::c_char;
    }
    let len = size_of::<libc::sa_family_t>() + 1 + name.len();
    Some((address, len as libc::socklen_t))
}

/// A connection to the abstract `SOCK_SEQPACKET` socket `name`, with `timeout` on every send
/// and receive; `Err(errno)` when nobody listens there.
pub(crate) fn seqpacket_connect(name: &[u8], timeout: Duration) -> Result<OwnedFd, c_int> {
    let (address, len) = abstract_address(name).ok_or(libc::ENAMETOOLONG)?;
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let time = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    for option in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: `time` is a live timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&raw const time).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
    // SAFETY: `address` is a live sockaddr_un of `len` meaningful bytes.
    let rc = unsafe { libc::connect(fd.as_raw_fd(), (&raw const address).cast(), len) };
    if rc != 0 {
        return Err(errno());
    }
    Ok(fd)
}

/// The pid of the process at the other end of a Unix socket, as this process's pid namespace
/// sees it (0 when it is not visible here).
pub(crate) fn peer_pid(fd: &OwnedFd) -> Option<i32> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: credentials and len are live locals of the sizes announced.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut credentials).cast(),
            &raw mut len,
        )
    };
    (rc == 0).then_some(credentials.pid)
}

/// Sends one packet, with `passed` attached by `SCM_RIGHTS` when given.
pub(crate) fn send_packet(fd: &OwnedFd, bytes: &[u8], passed: &[&OwnedFd]) -> Result<(), c_int> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr().cast_mut().cast(),
        iov_len: bytes.len(),
    };
    // Room for one control message carrying up to two fds, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &raw mut iov;
    message.msg_iovlen = 1;
    if !passed.is_empty() {
        assert!(passed.len() <= 2, "at most two descriptors per packet");
        let data = (passed.len() * size_of::<c_int>()) as u32;
        // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
        let (space, len) = unsafe {
            (
                libc::CMSG_SPACE(data) as usize,
                libc::CMSG_LEN(data) as usize,
            )
        };
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = space;
        // SAFETY: the control buffer is `space` (≤ 32) bytes, aligned for cmsghdr, so the first
        // header and its (at most two) fds fit.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&raw const message);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = len;
            let first = libc::CMSG_DATA(header).cast::<c_int>();
            for (index, fd) in passed.iter().enumerate() {
                std::ptr::write_unaligned(first.add(index), fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `message` points at live locals (iov, control) for the duration of the call.
    let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &raw const message, libc::MSG_NOSIGNAL) };
    if n < 0 { Err(errno()) } else { Ok(()) }
}

/// A new descriptor (close-on-exec) for `fd`'s open file.
pub(crate) fn duplicate(fd: RawFd) -> Result<OwnedFd, c_int> {
    // SAFETY: F_DUPFD_CLOEXEC takes no pointer; a failure is reported by errno.
    let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(errno());
    }
    // SAFETY: `copy` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// Removes `fd`'s registration from `epoll` (errors ignored: it may have none).
pub(crate) fn epoll_delete(epoll: RawFd, fd: RawFd) {
    // SAFETY: EPOLL_CTL_DEL ignores the event pointer (null is allowed since Linux 2.6.9).
    unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
}

/// Receives one packet into `buffer`; its length.
pub(crate) fn receive_packet(fd: &OwnedFd, buffer: &mut [u8]) -> Result<usize, c_int> {
    // SAFETY: `buffer` is a live, writable slice of the length given.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_CMSG_CLOEXEC,
        )
    };
    if n < 0 { Err(errno()) } else { Ok(n as usize) }
}

/// The file status and descriptor flags the relay must keep: (`O_NONBLOCK`, `FD_CLOEXEC`).
pub(crate) fn fd_flags(fd: RawFd) -> Option<(bool, bool)> {
    // SAFETY: fcntl(F_GETFL/F_GETFD) on a caller's fd reads flags only.
    let (status, descriptor) = unsafe {
        (
            libc::fcntl(fd, libc::F_GETFL),
            libc::fcntl(fd, libc::F_GETFD),
        )
    };
    (status >= 0 && descriptor >= 0).then_some((
        status & libc::O_NONBLOCK != 0,
        descriptor & libc::FD_CLOEXEC != 0,
    ))
}

/// Sets `O_NONBLOCK` on `fd`'s open file.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> Result<(), c_int> {
    // SAFETY: fcntl on an fd we own.
    let status = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if status < 0 {
        return Err(errno());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, status | libc::O_NONBLOCK) };
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// Puts `source` on the number `target` (closing what was there), keeping `FD_CLOEXEC` as
/// asked; `source` itself is closed when dropped.
pub(crate) fn place(source: OwnedFd, target: RawFd, cloexec: bool) -> Result<(), c_int> {
    let flags = if cloexec { libc::O_CLOEXEC } else { 0 };
    // SAFETY: dup3 of an fd we own onto the caller's fd number, which the caller handed to
    // connect(2) and so expects to be replaced by the connected socket.
    let rc = unsafe { libc::dup3(source.as_raw_fd(), target, flags) };
    if rc < 0 { Err(errno()) } else { Ok(()) }
}

/// What `poll` says of a connecting relay socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Readiness {
    /// Writable: the filler was taken, the connection is established.
    Writable,
    /// Hung up or in error: the instance gave up on it.
    HungUp,
    /// Interrupted by a signal.
    Interrupted,
}

/// Blocks until `fd` is writable or hung up.
pub(crate) fn wait_writable(fd: RawFd) -> Readiness {
    let mut entry = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let rc = unsafe { libc::poll(&raw mut entry, 1, -1) };
    if rc < 0 {
        return if errno() == libc::EINTR {
            Readiness::Interrupted
        } else {
            Readiness::HungUp
        };
    }
    if entry.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
        Readiness::HungUp
    } else {
        Readiness::Writable
    }
}

/// An integer option of `level` (`TCP_NODELAY` of a kernel TCP socket, …).
pub(crate) fn int_option(fd: RawFd, level: c_int, option: c_int) -> Option<c_int> {
    let mut value: c_int = 0;
    let mut len = size_of::<c_int>() as libc::socklen_t;
    // SAFETY: value and len are live locals of the sizes announced.
    let rc = unsafe { libc::getsockopt(fd, level, option, (&raw mut value).cast(), &raw mut len) };
    (rc == 0).then_some(value)
}

/// `epoll_ctl(epoll, EPOLL_CTL_ADD, fd, {events, data})`.
pub(crate) fn epoll_add(epoll: RawFd, fd: RawFd, events: u32, data: u64) -> Result<(), c_int> {
    let mut event = libc::epoll_event { events, u64: data };
    // SAFETY: `event` is a live epoll_event; epoll_ctl only reads it.
    let rc = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &raw mut event) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}
