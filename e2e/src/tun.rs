//! Attaching to a TUN device (the one ioctl the delay forwarder needs).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd as _;

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `sizeof(struct ifreq)` on Linux.
const IFREQ_LEN: usize = 40;

/// Opens `/dev/net/tun` attached to the (existing or new) TUN device `name`, without packet
/// information headers: every read is one IP packet, every write injects one.
pub fn open(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    let mut request = [0u8; IFREQ_LEN];
    request[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    request[libc::IFNAMSIZ..libc::IFNAMSIZ + 2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `request` is a live, writable
    // buffer of exactly that size, and `file` is an open descriptor of /dev/net/tun.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, request.as_mut_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}
