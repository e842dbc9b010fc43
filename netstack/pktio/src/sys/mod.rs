//! The only place in this crate that talks to the kernel. Every `unsafe` block is a single
//! system call or raw-memory access with its precondition stated.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Runs a libc call that returns -1 on error and turns it into `io::Result`.
macro_rules! syscall {
    ($fn:ident ( $($arg:expr),* $(,)? )) => {{
        // SAFETY: the caller of `syscall!` upholds the documented contract of `$fn`.
        let result = unsafe { libc::$fn($($arg),*) };
        if result == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(result)
        }
    }};
}

// Linux uapi constants (include/uapi/linux/if_packet.h, if_tun.h).
pub(crate) const ETH_P_ALL: u16 = 0x0003;
pub(crate) const SOL_PACKET: libc::c_int = 263;
pub(crate) const PACKET_RX_RING: libc::c_int = 5;
pub(crate) const PACKET_VERSION: libc::c_int = 10;
pub(crate) const PACKET_TX_RING: libc::c_int = 13;
pub(crate) const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
pub(crate) const TPACKET_V2: libc::c_int = 1;
pub(crate) const TP_STATUS_KERNEL: u32 = 0;
pub(crate) const TP_STATUS_USER: u32 = 1;
pub(crate) const TP_STATUS_CSUMNOTREADY: u32 = 1 << 3;
pub(crate) const TP_STATUS_CSUM_VALID: u32 = 1 << 7;
pub(crate) const TP_STATUS_AVAILABLE: u32 = 0;
pub(crate) const TP_STATUS_SEND_REQUEST: u32 = 1;
pub(crate) const TP_STATUS_WRONG_FORMAT: u32 = 1 << 2;
pub(crate) const PACKET_OUTGOING: u8 = 4;

/// `struct tpacket_req`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct TpacketReq {
    pub(crate) block_size: u32,
    pub(crate) block_nr: u32,
    pub(crate) frame_size: u32,
    pub(crate) frame_nr: u32,
}

fn interface_name(name: &str) -> io::Result<[libc::c_char; libc::IFNAMSIZ]> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid interface name {name:?}"),
        ));
    }
    let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
    for (slot, byte) in out.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(out)
}

/// Interface index by name.
pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let c_name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has NUL"))?;
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: `ifreq` is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name = interface_name(name)?;
    Ok(req)
}

fn control_socket() -> io::Result<OwnedFd> {
    let fd = syscall!(socket(
        libc::AF_INET,
        libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
        0
    ))?;
    // SAFETY: `socket` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The interface's Ethernet address.
pub(crate) fn if_mac(name: &str) -> io::Result<[u8; 6]> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name)?;
    syscall!(ioctl(
        sock.as_raw_fd(),
        libc::SIOCGIFHWADDR as _,
        &mut req as *mut libc::ifreq
    ))?;
    // SAFETY: SIOCGIFHWADDR filled the `ifru_hwaddr` member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (out, byte) in mac.iter_mut().zip(data.iter()) {
        *out = *byte as u8;
    }
    Ok(mac)
}

/// The interface's MTU.
pub(crate) fn if_mtu(name: &str) -> io::Result<usize> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name)?;
    syscall!(ioctl(
        sock.as_raw_fd(),
        libc::SIOCGIFMTU as _,
        &mut req as *mut libc::ifreq
    ))?;
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(usize::try_from(mtu).unwrap_or(1500))
}

/// A non-blocking AF_PACKET socket bound to all protocols on `ifindex`.
pub(crate) fn packet_socket() -> io::Result<OwnedFd> {
    let fd = syscall!(socket(
        libc::AF_PACKET,
        libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        i32::from(ETH_P_ALL.to_be())
    ))?;
    // SAFETY: `socket` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn set_option<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    syscall!(setsockopt(
        fd.as_raw_fd(),
        level,
        name,
        (value as *const T).cast(),
        size_of::<T>() as libc::socklen_t
    ))?;
    Ok(())
}

pub(crate) fn bind_packet(fd: &OwnedFd, ifindex: u32) -> io::Result<()> {
    // SAFETY: `sockaddr_ll` is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = ifindex as i32;
    syscall!(bind(
        fd.as_raw_fd(),
        (&addr as *const libc::sockaddr_ll).cast(),
        size_of::<libc::sockaddr_ll>() as libc::socklen_t
    ))?;
    Ok(())
}

/// Asks the kernel to transmit frames queued in the TX ring.
pub(crate) fn kick_tx(fd: &OwnedFd) -> io::Result<()> {
    match syscall!(send(
        fd.as_raw_fd(),
        std::ptr::null(),
        0,
        libc::MSG_DONTWAIT
    )) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
        // ENOBUFS: the device queue is full; frames stay in the ring and go out on the next kick.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EBUSY)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A memory mapping: a socket's rings (AF_PACKET, AF_XDP) or a shared-memory file (AF_XDP UMEM).
#[derive(Debug)]
pub(crate) struct RingMap {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through `&mut self` methods,
// atomics or bounds-checked views; moving it to another thread is sound.
unsafe impl Send for RingMap {}

impl RingMap {
    /// Maps `len` bytes of `fd` at `offset` (shared, read-write).
    pub(crate) fn new(fd: &OwnedFd, len: usize) -> io::Result<Self> {
        Self::socket_at(fd, len, 0)
    }

    pub(crate) fn socket_at(fd: &OwnedFd, len: usize, offset: u64) -> io::Result<Self> {
        // SAFETY: mapping `len` bytes of a socket whose rings were configured for that size;
        // the kernel validates the length and offset.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            base: base.cast(),
            len,
        })
    }

    pub(crate) fn address(&self) -> u64 {
        self.base as u64
    }

    fn atomic_u32(&self, offset: usize) -> &std::sync::atomic::AtomicU32 {
        assert!(offset + 4 <= self.len && offset.is_multiple_of(4));
        // SAFETY: in bounds and 4-aligned (checked above, and mappings are page-aligned); the
        // kernel writes this word concurrently, so it is only ever accessed atomically.
        unsafe { std::sync::atomic::AtomicU32::from_ptr(self.base.add(offset).cast()) }
    }

    /// Reads a shared 32-bit word (ring index or frame status) with acquire ordering.
    pub(crate) fn status(&self, offset: usize) -> u32 {
        self.atomic_u32(offset)
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Writes a shared 32-bit word with release ordering, publishing earlier writes.
    pub(crate) fn set_status(&mut self, offset: usize, value: u32) {
        self.atomic_u32(offset)
            .store(value, std::sync::atomic::Ordering::Release);
    }

    /// A view of `len` bytes at `offset`. Only call for memory the kernel has handed to us.
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: in bounds (checked above); the region is owned by user space while the ring
        // protocol says so, so the kernel does not write it concurrently.
        unsafe { std::slice::from_raw_parts(self.base.add(offset), len) }
    }

    /// A mutable view of `len` bytes at `offset`. Only for memory user space owns.
    pub(crate) fn bytes_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.len));
        // SAFETY: as in `bytes`, and `&mut self` guarantees no other view exists.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(offset), len) }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` came from a successful mmap and are unmapped exactly once.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

// --- AF_XDP and eBPF ---

pub(crate) fn xdp_socket() -> io::Result<OwnedFd> {
    let fd = syscall!(socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0))?;
    // SAFETY: `socket` just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn xdp_mmap_offsets(fd: &OwnedFd) -> io::Result<libc::xdp_mmap_offsets> {
    // SAFETY: plain old data; all-zero is valid.
    let mut offsets: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_XDP,
        libc::XDP_MMAP_OFFSETS,
        (&mut offsets as *mut libc::xdp_mmap_offsets).cast(),
        &mut len
    ))?;
    Ok(offsets)
}

pub(crate) fn bind_xdp(fd: &OwnedFd, ifindex: u32, queue: u32, flags: u16) -> io::Result<()> {
    let addr = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: flags,
        sxdp_ifindex: ifindex,
        sxdp_queue_id: queue,
        sxdp_shared_umem_fd: 0,
    };
    syscall!(bind(
        fd.as_raw_fd(),
        (&addr as *const libc::sockaddr_xdp).cast(),
        size_of::<libc::sockaddr_xdp>() as libc::socklen_t
    ))?;
    Ok(())
}

/// An anonymous shared-memory file of `len` bytes, for a UMEM that a privileged process
/// registers and an unprivileged one maps.
pub(crate) fn memfd(name: &std::ffi::CStr, len: usize) -> io::Result<OwnedFd> {
    let fd = syscall!(memfd_create(name.as_ptr(), libc::MFD_CLOEXEC))?;
    // SAFETY: `memfd_create` just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    syscall!(ftruncate(fd.as_raw_fd(), len as libc::off_t))?;
    Ok(fd)
}

/// The size of the file behind `fd`.
pub(crate) fn file_len(fd: &OwnedFd) -> io::Result<usize> {
    // SAFETY: plain old data; all-zero is valid.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    syscall!(fstat(fd.as_raw_fd(), &mut stat))?;
    Ok(usize::try_from(stat.st_size).unwrap_or(0))
}

/// `BPF_LINK_CREATE` for an XDP program on `ifindex` (of the calling thread's network
/// namespace). Written here because aya 0.13 keeps the descriptors of the links it creates
/// private, and this link must be handed to another process: the program stays attached
/// exactly as long as a descriptor of the link is open.
pub(crate) fn xdp_link_create(program: RawFd, ifindex: u32, flags: u32) -> io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_XDP: u32 = 37;
    // `union bpf_attr`'s link_create member: prog_fd, target_ifindex, attach_type, flags; the
    // rest must be zero. The union is 160 bytes in 6.x uapi headers; a smaller size is accepted
    // (the kernel zero-extends).
    let mut attr = [0u32; 16];
    attr[0] = program as u32;
    attr[1] = ifindex;
    attr[2] = BPF_XDP;
    attr[3] = flags;
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of an initialised array that outlives
    // the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_ptr(),
            size_of_val(&attr) as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: bpf(BPF_LINK_CREATE) just returned this descriptor and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Attaches the eBPF socket filter `program` to `socket` (`SO_ATTACH_BPF`); the socket keeps
/// the program.
pub(crate) fn attach_socket_filter(socket: &OwnedFd, program: RawFd) -> io::Result<()> {
    set_option(socket, libc::SOL_SOCKET, libc::SO_ATTACH_BPF, &program)
}

/// Removes the socket filter of `socket` (`SO_DETACH_BPF`).
pub(crate) fn detach_socket_filter(socket: &OwnedFd) -> io::Result<()> {
    set_option(socket, libc::SOL_SOCKET, libc::SO_DETACH_BPF, &0i32)
}

/// The names of the interfaces of the calling thread's network namespace.
pub(crate) fn if_names() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex(3) returns an array terminated by a zero entry, or NULL on error.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut names = Vec::new();
    let mut entry = list;
    loop {
        // SAFETY: `entry` points into the array, at or before its terminating entry.
        let current = unsafe { &*entry };
        if current.if_index == 0 || current.if_name.is_null() {
            break;
        }
        // SAFETY: each name is a NUL-terminated string owned by the array.
        let name = unsafe { std::ffi::CStr::from_ptr(current.if_name) };
        names.push(name.to_string_lossy().into_owned());
        // SAFETY: not past the terminating entry, which ends the loop above.
        entry = unsafe { entry.add(1) };
    }
    // SAFETY: `list` came from if_nameindex and is freed once.
    unsafe { libc::if_freenameindex(list) };
    Ok(names)
}

/// An epoll instance watching `fds` for input (level-triggered): readable when any of them is.
pub(crate) fn epoll_of(fds: &[RawFd]) -> io::Result<OwnedFd> {
    let epoll = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))?;
    // SAFETY: `epoll_create1` just returned this descriptor and nothing else owns it.
    let epoll = unsafe { OwnedFd::from_raw_fd(epoll) };
    for &fd in fds {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: fd as u64,
        };
        syscall!(epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd,
            &mut event
        ))?;
    }
    Ok(epoll)
}

/// Waits until any of `fds` is readable or `timeout` passes (`None` waits forever).
pub(crate) fn wait_readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: libc::c_long::from(t.subsec_nanos() as i32),
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    match syscall!(ppoll(
        pfds.as_mut_ptr(),
        pfds.len() as libc::nfds_t,
        ts_ptr,
        std::ptr::null()
    )) {
        Ok(n) => Ok(n > 0),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens a TAP device (creating it if needed) in non-blocking mode, without packet info.
pub(crate) fn open_tap(name: &str) -> io::Result<OwnedFd> {
    let path = c"/dev/net/tun";
    let fd = syscall!(open(
        path.as_ptr(),
        libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC
    ))?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    syscall!(ioctl(
        fd.as_raw_fd(),
        libc::TUNSETIFF as _,
        &mut req as *mut libc::ifreq
    ))?;
    Ok(fd)
}

pub(crate) fn read(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    let n = syscall!(read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()))?;
    Ok(n as usize)
}

pub(crate) fn write(fd: &OwnedFd, buf: &[u8]) -> io::Result<usize> {
    let n = syscall!(write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()))?;
    Ok(n as usize)
}

/// Puts `fd` in non-blocking mode (a descriptor handed over by another process may be blocking).
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = syscall!(fcntl(fd.as_raw_fd(), libc::F_GETFL))?;
    syscall!(fcntl(
        fd.as_raw_fd(),
        libc::F_SETFL,
        flags | libc::O_NONBLOCK
    ))?;
    Ok(())
}

/// The address family a socket was created with (`SO_DOMAIN`).
pub(crate) fn socket_domain(fd: &OwnedFd) -> io::Result<libc::c_int> {
    let mut domain: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    syscall!(getsockopt(
        fd.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_DOMAIN,
        (&mut domain as *mut libc::c_int).cast(),
        &mut len as *mut libc::socklen_t
    ))?;
    Ok(domain)
}

/// Discards frames queued on the socket's plain receive queue before its RX ring existed: poll
/// reports such a queue as readable forever, since ring readers never `recv` it.
pub(crate) fn drain_receive_queue(fd: &OwnedFd) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    let mut drained = 0;
    loop {
        match syscall!(recv(
            fd.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            byte.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC
        )) {
            Ok(_) => drained += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(drained),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// The interface's flags (`IFF_UP`, `IFF_LOOPBACK`, …).
pub(crate) fn if_flags(name: &str) -> io::Result<libc::c_int> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name)?;
    syscall!(ioctl(
        sock.as_raw_fd(),
        libc::SIOCGIFFLAGS as _,
        &mut req as *mut libc::ifreq
    ))?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(libc::c_int::from(flags))
}

/// One IPv4 `sockaddr` the interface ioctls return (`SIOCGIFADDR`, `SIOCGIFNETMASK`).
fn if_ipv4_field(name: &str, request: libc::c_ulong) -> io::Result<std::net::Ipv4Addr> {
    let sock = control_socket()?;
    let mut req = ifreq_for(name)?;
    syscall!(ioctl(
        sock.as_raw_fd(),
        request as _,
        &mut req as *mut libc::ifreq
    ))?;
    // SAFETY: both requests fill the `ifru_addr` member of the union.
    let addr = unsafe { req.ifr_ifru.ifru_addr };
    if i32::from(addr.sa_family) != libc::AF_INET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an IPv4 address",
        ));
    }
    // sockaddr_in: family (2), port (2), address (4).
    let d = addr.sa_data;
    Ok(std::net::Ipv4Addr::new(
        d[2] as u8, d[3] as u8, d[4] as u8, d[5] as u8,
    ))
}

/// The interface's primary IPv4 address and prefix length.
pub(crate) fn if_ipv4(name: &str) -> io::Result<(std::net::Ipv4Addr, u8)> {
    let address = if_ipv4_field(name, libc::SIOCGIFADDR)?;
    let netmask = if_ipv4_field(name, libc::SIOCGIFNETMASK)?;
    Ok((address, u32::from(netmask).leading_ones() as u8))
}

#[cfg(feature = "dpdk")]
pub(crate) mod dpdk;
