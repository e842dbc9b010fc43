//! The exported socket API. One list declares every hook; each is one line: what to do before
//! the real call (`logic`, which may refuse with an errno), and after it. The real function is
//! the next definition of the same symbol (`dlsym(RTLD_NEXT)`, cached in an atomic).
//!
//! `run` is the only path: a thread-local guard makes calls the shim itself causes (its agent
//! socket, its maps) go straight to the real function; a panic in the shim's logic never
//! crosses the C ABI (it is caught, counted as `other`, and the call proceeds as without the
//! shim); `errno` is exactly what the real call left.

// The exported functions are the library's C ABI: public by design, unreachable from Rust.
#![allow(unreachable_pub)]

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};

use libc::{
    epoll_event, fd_set, iovec, mmsghdr, msghdr, nfds_t, off_t, pollfd, sigset_t, size_t, sockaddr,
    socklen_t, ssize_t, timespec, timeval,
};
use stackroute_local_api::message::FallbackReason;

use crate::logic::{self, Pre};
use crate::sys::{self, Real};
use crate::{counters, fdtable, upgrade};

thread_local! {
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

/// A C return type, its failure value and its success value.
trait Ret: Copy {
    const FAIL: Self;
    const DONE: Self;
}
impl Ret for c_int {
    const FAIL: Self = -1;
    const DONE: Self = 0;
}
impl Ret for ssize_t {
    const FAIL: Self = -1;
    const DONE: Self = 0;
}
impl Ret for () {
    const FAIL: Self = ();
    const DONE: Self = ();
}

/// `before`, the real call, `after`, with the guard, panic containment and errno discipline.
fn run<R: Ret, S>(
    before: impl FnOnce() -> (Pre, S),
    real: impl FnOnce() -> R,
    after: impl FnOnce(S, R),
) -> R {
    if INSIDE.get() {
        return real();
    }
    INSIDE.set(true);
    let saved = sys::errno();
    let pre = catch_unwind(AssertUnwindSafe(before));
    INSIDE.set(false);
    sys::set_errno(saved);
    let state = match pre {
        Ok((Pre::Forward, state)) => state,
        Ok((Pre::Fail(errno), _)) => {
            sys::set_errno(errno);
            return R::FAIL;
        }
        Ok((Pre::Done, _)) => return R::DONE,
        Err(_) => {
            counters::fell_back(FallbackReason::Other);
            return real();
        }
    };
    let result = real();
    let errno = sys::errno();
    INSIDE.set(true);
    if catch_unwind(AssertUnwindSafe(|| after(state, result))).is_err() {
        counters::fell_back(FallbackReason::Other);
    }
    INSIDE.set(false);
    sys::set_errno(errno);
    result
}

/// A read returned `result`: end of file on a relayed connection that was reset becomes
/// `ECONNRESET` (see `logic::end_of_file`); anything else is returned as it is.
fn read_result(fd: c_int, result: ssize_t) -> ssize_t {
    if result != 0 || INSIDE.get() {
        return result;
    }
    INSIDE.set(true);
    let saved = sys::errno();
    let reset = catch_unwind(|| logic::end_of_file(fd)).ok().flatten();
    INSIDE.set(false);
    match reset {
        Some(errno) => {
            sys::set_errno(errno);
            -1
        }
        None => {
            sys::set_errno(saved);
            result
        }
    }
}

/// A write returned `result`: `EPIPE` on a relayed connection that was reset becomes
/// `ECONNRESET` once (see `logic::broken_pipe`); anything else is returned as it is (no table
/// access unless the write failed with `EPIPE`).
fn write_result(fd: c_int, result: ssize_t) -> ssize_t {
    if result != -1 || INSIDE.get() || sys::errno() != libc::EPIPE {
        return result;
    }
    INSIDE.set(true);
    let reset = catch_unwind(|| logic::broken_pipe(fd)).ok().flatten();
    INSIDE.set(false);
    sys::set_errno(reset.unwrap_or(libc::EPIPE));
    result
}

/// `getsockname`/`getpeername`: a relayed socket answers its TCP addresses.
fn name_hook(
    fd: c_int,
    side: logic::Side,
    address: *mut sockaddr,
    len: *mut socklen_t,
    real: impl FnOnce() -> c_int,
) -> c_int {
    run(
        || match logic::relay_address(fd, side) {
            Some(found) => {
                // SAFETY: the caller's (address, len) pair, as getsockname(2) requires it.
                unsafe { sys::write_address(found, address, len) };
                (Pre::Done, ())
            }
            None => (Pre::Forward, ()),
        },
        real,
        nothing,
    )
}

/// `accept`/`accept4`: a user-space peer's connection delivered by the instance reports the
/// peer's real address (see `logic::after_accept`).
fn accept_hook(
    listener: c_int,
    address: *mut sockaddr,
    len: *mut socklen_t,
    real: impl FnOnce() -> c_int,
) -> c_int {
    run(forward, real, |(), new| {
        logic::after_accept(listener, new, |remote| {
            // SAFETY: the caller's (address, len) pair, as accept(2) requires it (null: nothing
            // is written).
            unsafe { sys::write_address(remote, address, len) }
        })
    })
}

/// `getsockopt`: a relayed socket answers TCP options from its instance.
fn get_option_hook(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *mut c_void,
    len: *mut socklen_t,
    real: impl FnOnce() -> c_int,
) -> c_int {
    let answer = |bytes: &[u8]| {
        // SAFETY: the caller's (value, len) pair, as getsockopt(2) requires it.
        unsafe { sys::write_option(bytes, value, len) }
    };
    run(
        || (logic::get_option(fd, level, name, answer), ()),
        real,
        nothing,
    )
}

/// `setsockopt`: a relayed socket's TCP options go to its instance.
fn set_option_hook(
    fd: c_int,
    level: c_int,
    name: c_int,
    value: *const c_void,
    len: socklen_t,
    real: impl FnOnce() -> c_int,
) -> c_int {
    run(
        || {
            // SAFETY: the caller's (value, len) pair, as setsockopt(2) requires it, read during
            // this call only.
            let bytes = unsafe { sys::option_bytes(value, len) };
            (logic::set_option(fd, level, name, bytes), ())
        },
        real,
        nothing,
    )
}

fn forward() -> (Pre, ()) {
    (Pre::Forward, ())
}

/// Before a read: RDMA upgrade bytes at the front of the stream are taken away first (one
/// relaxed load when no connection of the process has any).
fn reading(fd: c_int, flags: c_int) -> (Pre, ()) {
    (upgrade::before_read(fd, flags), ())
}

/// Before a write: a server's connection answers a waiting upgrade proposal first.
fn writing(fd: c_int) -> (Pre, ()) {
    (upgrade::before_write(fd), ())
}

/// `connect`: decides before the real call; a connection that may be upgraded to RDMA runs
/// the client's exchange after it (see `logic::after_connect`).
fn connect_hook(fd: c_int, destination: Option<SocketAddr>, real: impl FnOnce() -> c_int) -> c_int {
    run(
        || logic::connect(fd, destination),
        real,
        |pending, rc| logic::after_connect(pending, fd, rc, sys::errno()),
    )
}

fn nothing<R>(_: (), _: R) {}

/// The address argument of a hook. Only called with the caller's own arguments, which the C
/// API requires to be null or readable for `len` bytes.
fn address_arg(address: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    // SAFETY: see above: the caller's (address, len) pair as connect(2)/sendto(2) require it.
    unsafe { sys::socket_address(address, len) }
}

/// The destination of a `sendmsg` message (the caller's msghdr, readable as sendmsg(2)
/// requires).
fn message_arg(message: *const msghdr) -> Option<SocketAddr> {
    // SAFETY: the caller's msghdr, as sendmsg(2) requires it.
    unsafe { sys::message_address(message) }
}

/// The destination of the first message of a `sendmmsg`.
fn messages_arg(messages: *const mmsghdr, count: c_uint) -> Option<SocketAddr> {
    if count == 0 || messages.is_null() {
        return None;
    }
    // SAFETY: the caller's array holds `count` >= 1 messages, as sendmmsg(2) requires; the
    // header is the first field of the first one.
    unsafe { sys::message_address(&raw const (*messages).msg_hdr) }
}

/// Whether a send on `fd` naming a destination must go without it: a relayed socket is an
/// `AF_UNIX` stream end, which fails such a send with `EISCONN`, where a connected TCP socket
/// ignores the address, whatever it holds (sockperf names the peer in every `sendto`, and its
/// server whatever its `recvfrom` buffer held: a TCP socket reports no source).
fn drops_destination(fd: c_int, destination: bool) -> bool {
    destination && logic::relayed(fd)
}

/// Whether a `msghdr` names a destination (any bytes at all).
fn names_destination(message: *const msghdr) -> bool {
    if message.is_null() {
        return false;
    }
    // SAFETY: the caller's msghdr, readable as sendmsg(2) requires.
    let header = unsafe { &*message };
    !header.msg_name.is_null() && header.msg_namelen > 0
}

/// The header of message `index` of a `sendmmsg` array, or null.
fn messages_header(messages: *const mmsghdr, index: usize) -> *const msghdr {
    if messages.is_null() {
        return std::ptr::null();
    }
    // SAFETY: the caller's array holds more than `index` messages, as sendmmsg(2) requires.
    unsafe { &raw const (*messages.add(index)).msg_hdr }
}

/// A copy of the caller's `msghdr` without its destination.
fn without_destination(message: *const msghdr) -> msghdr {
    // SAFETY: the caller's msghdr, readable as sendmsg(2) requires (`message_arg` read it).
    let mut copy = unsafe { *message };
    copy.msg_name = std::ptr::null_mut();
    copy.msg_namelen = 0;
    copy
}

/// `sendmmsg` through `send` on copies of the caller's `count` messages without their
/// destinations; the byte counts the kernel writes are copied back to the caller's array.
fn send_many_without_destinations(
    messages: *mut mmsghdr,
    count: c_uint,
    send: impl FnOnce(*mut mmsghdr) -> c_int,
) -> c_int {
    // SAFETY: the caller's array of `count` messages, as sendmmsg(2) requires (a destination
    // was found in it, so it is not null and `count` >= 1).
    let originals = unsafe { std::slice::from_raw_parts_mut(messages, count as usize) };
    let mut copies: Vec<mmsghdr> = originals
        .iter()
        .map(|m| mmsghdr {
            msg_hdr: without_destination(&raw const m.msg_hdr),
            msg_len: m.msg_len,
        })
        .collect();
    let sent = send(copies.as_mut_ptr());
    let errno = sys::errno();
    for (original, copy) in originals.iter_mut().zip(&copies).take(sent.max(0) as usize) {
        original.msg_len = copy.msg_len;
    }
    sys::set_errno(errno);
    sent
}

/// The (events, data) of a successful `EPOLL_CTL_ADD`/`EPOLL_CTL_MOD` (whose `event` the
/// kernel has just read); `None` for other operations.
fn epoll_event_arg(op: c_int, event: *const epoll_event) -> Option<(u32, u64)> {
    if event.is_null() || !matches!(op, libc::EPOLL_CTL_ADD | libc::EPOLL_CTL_MOD) {
        return None;
    }
    // SAFETY: the caller's epoll_event, readable as epoll_ctl(2) requires for ADD and MOD (the
    // call succeeded, so the kernel read it); read unaligned (it is packed on x86-64).
    let event = unsafe { std::ptr::read_unaligned(event) };
    Some((event.events, event.u64))
}

macro_rules! hooks {
    ($( fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty => |$real:ident| $body:expr; )*) => {$(
        #[unsafe(no_mangle)]
        #[doc = concat!("Interposed `", stringify!($name), "` (see the module documentation).")]
        pub extern "C" fn $name($($arg: $ty),*) -> $ret {
            static REAL: Real = Real::new(match std::ffi::CStr::from_bytes_with_nul(
                concat!(stringify!($name), "\0").as_bytes(),
            ) {
                Ok(name) => name,
                Err(_) => panic!("symbol name"),
            });
            #[allow(unused_variables)]
            let $real = |$($arg: $ty),*| -> $ret {
                let address = REAL.address();
                if address == 0 {
                    sys::set_errno(libc::ENOSYS);
                    return <$ret as Ret>::FAIL;
                }
                // SAFETY: `address` is the next definition of this very C symbol, whose
                // signature is the one declared here (glibc's), called with the caller's own
                // arguments.
                unsafe {
                    std::mem::transmute::<usize, unsafe extern "C" fn($($ty),*) -> $ret>(address)(
                        $($arg),*
                    )
                }
            };
            $body
        }
    )*};
}

hooks! {
    fn socket(domain: c_int, kind: c_int, protocol: c_int) -> c_int => |real| run(forward, || real(domain, kind, protocol), |(), fd| logic::after_socket(domain, kind, protocol, fd));
    fn connect(fd: c_int, address: *const sockaddr, len: socklen_t) -> c_int => |real| connect_hook(fd, address_arg(address, len), || real(fd, address, len));
    fn listen(fd: c_int, backlog: c_int) -> c_int => |real| run(forward, || real(fd, backlog), |(), rc| logic::after_listen(fd, rc));
    fn accept(fd: c_int, address: *mut sockaddr, len: *mut socklen_t) -> c_int => |real| accept_hook(fd, address, len, || real(fd, address, len));
    fn accept4(fd: c_int, address: *mut sockaddr, len: *mut socklen_t, flags: c_int) -> c_int => |real| accept_hook(fd, address, len, || real(fd, address, len, flags));
    // A destination given to a relayed socket is dropped (see `drops_destination`).
    fn sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, address: *const sockaddr, len: socklen_t) -> ssize_t => |real| { let drop = Cell::new(false); write_result(fd, run(|| { drop.set(drops_destination(fd, !address.is_null() && len > 0)); let destination = address_arg(address, len); (logic::send_to(fd, destination, flags).or(upgrade::before_write(fd)), ()) }, || if drop.get() { real(fd, buf, n, flags, std::ptr::null(), 0) } else { real(fd, buf, n, flags, address, len) }, nothing)) };
    fn sendmsg(fd: c_int, message: *const msghdr, flags: c_int) -> ssize_t => |real| { let drop = Cell::new(false); write_result(fd, run(|| { drop.set(drops_destination(fd, names_destination(message))); let destination = message_arg(message); (logic::send_to(fd, destination, flags).or(upgrade::before_write(fd)), ()) }, || if drop.get() { real(fd, &without_destination(message), flags) } else { real(fd, message, flags) }, nothing)) };
    fn sendmmsg(fd: c_int, messages: *mut mmsghdr, count: c_uint, flags: c_int) -> c_int => |real| { let drop = Cell::new(false); run(|| { drop.set(drops_destination(fd, (0..count as usize).any(|i| names_destination(messages_header(messages, i))))); let destination = messages_arg(messages, count); (logic::send_to(fd, destination, flags).or(upgrade::before_write(fd)), ()) }, || if drop.get() { send_many_without_destinations(messages, count, |copies| real(fd, copies, count, flags)) } else { real(fd, messages, count, flags) }, nothing) };
    fn close(fd: c_int) -> c_int => |real| run(|| (Pre::Forward, logic::before_close(fd)), || real(fd), logic::after_close);
    fn close_range(first: c_uint, last: c_uint, flags: c_int) -> c_int => |real| run(|| (Pre::Forward, logic::before_close_range(first, last, flags)), || real(first, last, flags), logic::after_close_range);
    fn closefrom(first: c_int) -> () => |real| run(|| (Pre::Forward, logic::before_close_range(first.max(0) as u32, u32::MAX, 0)), || real(first), |found, ()| logic::after_close_range(found, 0));
    fn dup(old: c_int) -> c_int => |real| run(forward, || real(old), |(), new| logic::after_dup(old, new));
    fn dup2(old: c_int, new: c_int) -> c_int => |real| run(|| (Pre::Forward, logic::before_dup_onto(old, new)), || real(old, new), |closed, rc| { logic::after_close(closed, rc.min(0)); logic::after_dup(old, rc) });
    fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int => |real| run(|| (Pre::Forward, logic::before_dup_onto(old, new)), || real(old, new, flags), |closed, rc| { logic::after_close(closed, rc.min(0)); logic::after_dup(old, rc) });
    // The rest of the socket surface. A relayed socket is a real kernel object (an AF_UNIX
    // stream end), so most calls act on it natively and forward; they are declared here so that
    // the one list is the whole surface.
    fn bind(fd: c_int, address: *const sockaddr, len: socklen_t) -> c_int => |real| run(forward, || real(fd, address, len), nothing);
    fn socketpair(domain: c_int, kind: c_int, protocol: c_int, fds: *mut c_int) -> c_int => |real| run(forward, || real(domain, kind, protocol, fds), nothing);
    fn shutdown(fd: c_int, how: c_int) -> c_int => |real| run(forward, || real(fd, how), nothing);
    // Relayed (user-space stack) sockets answer these as TCP sockets would; see `logic`.
    fn getsockopt(fd: c_int, level: c_int, name: c_int, value: *mut c_void, len: *mut socklen_t) -> c_int => |real| get_option_hook(fd, level, name, value, len, || real(fd, level, name, value, len));
    fn setsockopt(fd: c_int, level: c_int, name: c_int, value: *const c_void, len: socklen_t) -> c_int => |real| set_option_hook(fd, level, name, value, len, || real(fd, level, name, value, len));
    fn getsockname(fd: c_int, address: *mut sockaddr, len: *mut socklen_t) -> c_int => |real| name_hook(fd, logic::Side::Local, address, len, || real(fd, address, len));
    fn getpeername(fd: c_int, address: *mut sockaddr, len: *mut socklen_t) -> c_int => |real| name_hook(fd, logic::Side::Peer, address, len, || real(fd, address, len));
    // Reads: end of file of a reset relayed connection is `ECONNRESET` (zero-length reads are
    // left alone).
    fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t => |real| { let r = run(|| reading(fd, 0), || real(fd, buf, n), nothing); if n == 0 { r } else { read_result(fd, r) } };
    // Writes: `EPIPE` on a relayed connection the peer reset is `ECONNRESET` first, as on TCP.
    fn write(fd: c_int, buf: *const c_void, n: size_t) -> ssize_t => |real| write_result(fd, run(|| writing(fd), || real(fd, buf, n), nothing));
    fn readv(fd: c_int, iov: *const iovec, count: c_int) -> ssize_t => |real| { let r = run(|| reading(fd, 0), || real(fd, iov, count), nothing); if count == 0 { r } else { read_result(fd, r) } };
    fn writev(fd: c_int, iov: *const iovec, count: c_int) -> ssize_t => |real| write_result(fd, run(|| writing(fd), || real(fd, iov, count), nothing));
    fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t => |real| { let r = run(|| reading(fd, flags), || real(fd, buf, n, flags), nothing); if n == 0 { r } else { read_result(fd, r) } };
    fn recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, address: *mut sockaddr, len: *mut socklen_t) -> ssize_t => |real| { let r = run(|| reading(fd, flags), || real(fd, buf, n, flags, address, len), nothing); if n == 0 { r } else { read_result(fd, r) } };
    fn recvmsg(fd: c_int, message: *mut msghdr, flags: c_int) -> ssize_t => |real| { let r = run(|| reading(fd, flags), || real(fd, message, flags), nothing); read_result(fd, r) };
    fn recvmmsg(fd: c_int, messages: *mut mmsghdr, count: c_uint, flags: c_int, timeout: *mut timespec) -> c_int => |real| run(|| reading(fd, flags), || real(fd, messages, count, flags, timeout), nothing);
    fn send(fd: c_int, buf: *const c_void, n: size_t, flags: c_int) -> ssize_t => |real| write_result(fd, run(|| writing(fd), || real(fd, buf, n, flags), nothing));
    fn sendfile(out: c_int, input: c_int, offset: *mut off_t, count: size_t) -> ssize_t => |real| run(|| writing(out), || real(out, input, offset, count), nothing);
    fn poll(fds: *mut pollfd, count: nfds_t, timeout: c_int) -> c_int => |real| run(forward, || real(fds, count, timeout), nothing);
    fn ppoll(fds: *mut pollfd, count: nfds_t, timeout: *const timespec, mask: *const sigset_t) -> c_int => |real| run(forward, || real(fds, count, timeout, mask), nothing);
    fn select(count: c_int, reads: *mut fd_set, writes: *mut fd_set, errors: *mut fd_set, timeout: *mut timeval) -> c_int => |real| run(forward, || real(count, reads, writes, errors, timeout), nothing);
    fn pselect(count: c_int, reads: *mut fd_set, writes: *mut fd_set, errors: *mut fd_set, timeout: *const timespec, mask: *const sigset_t) -> c_int => |real| run(forward, || real(count, reads, writes, errors, timeout, mask), nothing);
    fn epoll_create(size: c_int) -> c_int => |real| run(forward, || real(size), nothing);
    fn epoll_create1(flags: c_int) -> c_int => |real| run(forward, || real(flags), nothing);
    // Registrations of undecided TCP sockets are recorded (one table load for any other fd).
    fn epoll_ctl(epoll: c_int, op: c_int, fd: c_int, event: *mut epoll_event) -> c_int => |real| run(forward, || real(epoll, op, fd, event), |(), rc| logic::after_epoll_ctl(epoll, op, fd, rc, || epoll_event_arg(op, event)));
    fn epoll_wait(epoll: c_int, events: *mut epoll_event, max: c_int, timeout: c_int) -> c_int => |real| run(forward, || real(epoll, events, max, timeout), nothing);
    fn epoll_pwait(epoll: c_int, events: *mut epoll_event, max: c_int, timeout: c_int, mask: *const sigset_t) -> c_int => |real| run(forward, || real(epoll, events, max, timeout, mask), nothing);
    fn fork() -> c_int => |real| run(forward, real, nothing);
    // exec: what this process counted is reported first (the new image starts from zero).
    fn execve(path: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int => |real| run(logic::before_exec, || real(path, argv, envp), nothing);
    fn execv(path: *const c_char, argv: *const *const c_char) -> c_int => |real| run(logic::before_exec, || real(path, argv), nothing);
    fn execvp(file: *const c_char, argv: *const *const c_char) -> c_int => |real| run(logic::before_exec, || real(file, argv), nothing);
    fn execvpe(file: *const c_char, argv: *const *const c_char, envp: *const *const c_char) -> c_int => |real| run(logic::before_exec, || real(file, argv, envp), nothing);
}

static REAL_FCNTL: Real = Real::new(c"fcntl");
static REAL_FCNTL64: Real = Real::new(c"fcntl64");

/// `fcntl`/`fcntl64` (defined in C, variadic, forwarding here with the one argument every
/// command takes as an `unsigned long`): `F_DUPFD`/`F_DUPFD_CLOEXEC` copy the decision.
#[unsafe(no_mangle)]
pub extern "C" fn nsocket_fcntl(fd: c_int, cmd: c_int, arg: c_ulong, variant: c_int) -> c_int {
    let real = || {
        let address = if variant == 0 {
            &REAL_FCNTL
        } else {
            &REAL_FCNTL64
        }
        .address();
        if address == 0 {
            sys::set_errno(libc::ENOSYS);
            return -1;
        }
        // SAFETY: the next `fcntl`/`fcntl64`, a C-variadic function of this prefix, called with
        // the caller's arguments (the one optional argument passed as a word, as the kernel
        // reads it).
        unsafe {
            std::mem::transmute::<usize, unsafe extern "C" fn(c_int, c_int, ...) -> c_int>(address)(
                fd, cmd, arg,
            )
        }
    };
    let dups = matches!(cmd, libc::F_DUPFD | libc::F_DUPFD_CLOEXEC);
    run(forward, real, |(), new| {
        if dups {
            logic::after_dup(fd, new);
        }
    })
}

static REAL_IOCTL: Real = Real::new(c"ioctl");

/// `ioctl` (defined in C, variadic, forwarding here with its one optional argument as a
/// word): every socket is a kernel socket in this build, so it forwards.
#[unsafe(no_mangle)]
pub extern "C" fn nsocket_ioctl(fd: c_int, request: c_ulong, arg: c_ulong) -> c_int {
    let real = || {
        let address = REAL_IOCTL.address();
        if address == 0 {
            sys::set_errno(libc::ENOSYS);
            return -1;
        }
        // SAFETY: the next `ioctl`, a C-variadic function of this prefix, called with the
        // caller's arguments (the one optional argument passed as a word, as the kernel reads
        // it).
        unsafe {
            std::mem::transmute::<usize, unsafe extern "C" fn(c_int, c_ulong, ...) -> c_int>(
                address,
            )(fd, request, arg)
        }
    };
    run(forward, real, nothing)
}

unsafe extern "C" {
    // In src/entry.c: C-variadic `fcntl`/`fcntl64`/`ioctl` bodies that forward to
    // `nsocket_fcntl`/`nsocket_ioctl`.
    fn nsocket_fcntl_entry(fd: c_int, cmd: c_int, ...) -> c_int;
    fn nsocket_fcntl64_entry(fd: c_int, cmd: c_int, ...) -> c_int;
    fn nsocket_ioctl_entry(fd: c_int, request: c_ulong, ...) -> c_int;
}

/// Exports a C-variadic function implemented in C under `$name`: a single jump, so the C body
/// sees the caller's exact registers and stack (stable Rust cannot define a variadic function,
/// and rustc's version script would hide a symbol defined in C).
macro_rules! variadic_trampoline {
    ($name:ident => $target:ident) => {
        #[unsafe(naked)]
        #[unsafe(no_mangle)]
        #[doc = concat!("Interposed `", stringify!($name), "`: jumps to the C-variadic body.")]
        pub extern "C" fn $name(fd: c_int, cmd: c_int) -> c_int {
            #[cfg(target_arch = "x86_64")]
            std::arch::naked_asm!("jmp {}", sym $target);
            #[cfg(target_arch = "aarch64")]
            std::arch::naked_asm!("b {}", sym $target);
        }
    };
}

variadic_trampoline!(fcntl => nsocket_fcntl_entry);
variadic_trampoline!(fcntl64 => nsocket_fcntl64_entry);
variadic_trampoline!(ioctl => nsocket_ioctl_entry);

/// Called by the C constructor when the library is loaded.
#[unsafe(no_mangle)]
pub extern "C" fn nsocket_load() {
    // A panic inside the shim is contained and counted; it prints nothing into the
    // application's stderr.
    std::panic::set_hook(Box::new(|_| {}));
    run(forward, || (), |(), ()| logic::load());
}

/// Called by the C destructor at `exit()`.
#[unsafe(no_mangle)]
pub extern "C" fn nsocket_unload() {
    run(forward, || (), |(), ()| logic::unload());
}

/// One decision's lookup without a socket, for the benchmark (see `logic::probe`); the address
/// is a caller's `sockaddr_in`/`sockaddr_in6`. Not part of the socket API.
#[unsafe(no_mangle)]
pub extern "C" fn nsocket_probe(address: *const sockaddr, len: socklen_t, tcp: c_int) -> c_int {
    match address_arg(address, len) {
        Some(destination) => logic::probe(destination, tcp != 0),
        None => i32::MIN,
    }
}

/// Whether `fd` has a pinned decision, for tests: `stack * 8 + congestion control`, or -1.
#[unsafe(no_mangle)]
pub extern "C" fn nsocket_pinned(fd: c_int) -> c_int {
    fdtable::get(fd)
        .transport()
        .map_or(-1, |(stack, cc)| stack as c_int * 8 + cc as c_int)
}
