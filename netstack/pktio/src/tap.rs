//! TAP engine: Ethernet frames through `/dev/net/tun`, one read or write per frame.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use stackroute_netstack::{Device, DeviceCapabilities, RxMeta};

use crate::sys;

/// A TAP interface opened (or created) by name.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    mtu: usize,
}

impl Tap {
    /// Opens the TAP device `name`, creating it if it does not exist (needs CAP_NET_ADMIN).
    pub fn open(name: &str) -> io::Result<Self> {
        let fd = sys::open_tap(name)?;
        let mtu = sys::if_mtu(name).unwrap_or(1500);
        Ok(Self {
            fd,
            rx_buf: vec![0; 65536],
            tx_buf: vec![0; 65536],
            mtu,
        })
    }

    /// The descriptor to wait on for received frames.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Device for Tap {
    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities {
            mtu: self.mtu,
            ..DeviceCapabilities::default()
        }
    }

    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        let n = sys::read(&self.fd, &mut self.rx_buf).ok()?;
        Some(f(&self.rx_buf[..n], RxMeta::default()))
    }

    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        let max_len = max_len.min(self.tx_buf.len());
        let len = f(&mut self.tx_buf[..max_len]).min(max_len);
        if len > 0 && sys::write(&self.fd, &self.tx_buf[..len]).is_err() {
            // The TAP queue is full or the interface is down: the frame is lost, as on a wire.
            return Some(len);
        }
        Some(len)
    }
}
