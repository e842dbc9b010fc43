//! The loader's side: `dlopen` a provider, open and connect queue pairs through it, and drive
//! them as [`QueuePair`]s.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_void};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use stackroute_rdma_relay::{Config, QueuePair, QueuePairError, Received};
use stackroute_rdma_upgrade::{Endpoint, Reason};

use crate::Refusal;
use crate::abi::{self, DETAIL_LEN, Delivery, QpConfig};

/// Deliveries taken per `poll` call.
const BATCH: usize = 32;

/// A loaded provider. Never unloaded: queue pairs and their threads may outlive any owner.
#[derive(Debug)]
pub struct Library {
    path: String,
    open: abi::OpenFn,
    connect: abi::ConnectFn,
    event_fd: abi::EventFdFn,
    send_slots: abi::SendSlotsFn,
    post_send: abi::PostSendFn,
    poll: abi::PollFn,
    close: abi::CloseFn,
}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl call
    // of this thread, copied at once.
    let text = unsafe { libc::dlerror() };
    if text.is_null() {
        return "unknown dlopen error".into();
    }
    // SAFETY: non-null and NUL-terminated (above).
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

fn detail_of(buffer: &[u8]) -> String {
    let end = buffer.iter().position(|b| *b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

impl Library {
    /// Loads the provider at `path` and finds every function of the ABI.
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let name = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{}: a path with a NUL byte", path.display()))?;
        // SAFETY: a NUL-terminated path; the library's initialisers run (our providers have
        // none beyond Rust's and libibverbs').
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(format!("dlopen {}: {}", path.display(), dlerror()));
        }
        let symbol = |name: &[u8]| -> Result<*mut c_void, String> {
            // SAFETY: a live handle and a NUL-terminated name.
            let address = unsafe { libc::dlsym(handle, name.as_ptr().cast::<c_char>()) };
            if address.is_null() {
                Err(format!(
                    "{}: no {} (a provider of an older ABI?)",
                    path.display(),
                    String::from_utf8_lossy(&name[..name.len() - 1])
                ))
            } else {
                Ok(address)
            }
        };
        // SAFETY (each transmute below): the symbol is the function of the ABI with that name,
        // whose C signature the type declares (`abi` module).
        Ok(Arc::new(Self {
            path: path.display().to_string(),
            // SAFETY: see above.
            open: unsafe { std::mem::transmute::<*mut c_void, abi::OpenFn>(symbol(abi::OPEN)?) },
            // SAFETY: see above.
            connect: unsafe {
                std::mem::transmute::<*mut c_void, abi::ConnectFn>(symbol(abi::CONNECT)?)
            },
            // SAFETY: see above.
            event_fd: unsafe {
                std::mem::transmute::<*mut c_void, abi::EventFdFn>(symbol(abi::EVENT_FD)?)
            },
            // SAFETY: see above.
            send_slots: unsafe {
                std::mem::transmute::<*mut c_void, abi::SendSlotsFn>(symbol(abi::SEND_SLOTS)?)
            },
            // SAFETY: see above.
            post_send: unsafe {
                std::mem::transmute::<*mut c_void, abi::PostSendFn>(symbol(abi::POST_SEND)?)
            },
            // SAFETY: see above.
            poll: unsafe { std::mem::transmute::<*mut c_void, abi::PollFn>(symbol(abi::POLL)?) },
            // SAFETY: see above.
            close: unsafe { std::mem::transmute::<*mut c_void, abi::CloseFn>(symbol(abi::CLOSE)?) },
        }))
    }

    /// Where it was loaded from.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Opens a queue pair with rings sized by `config`: it and the endpoint to send the peer.
    pub fn open(self: &Arc<Self>, config: &Config) -> Result<(OpenedQueuePair, Endpoint), Refusal> {
        let qp_config = QpConfig {
            window: config.window,
            buffer: u32::try_from(config.buffer)
                .map_err(|_| Refusal::new(Reason::Other, "buffer size over 4 GiB"))?,
        };
        let mut local = abi::Endpoint::default();
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut detail = [0u8; DETAIL_LEN];
        // SAFETY: live config, endpoint, handle slot and detail buffer of the length passed.
        let code = unsafe {
            (self.open)(
                &raw const qp_config,
                &raw mut local,
                &raw mut handle,
                detail.as_mut_ptr().cast(),
                DETAIL_LEN as u32,
            )
        };
        if code != 0 || handle.is_null() {
            return Err(Refusal::new(Reason::from_code(code), detail_of(&detail)));
        }
        let handle = Handle {
            library: Arc::clone(self),
            raw: handle,
        };
        Ok((OpenedQueuePair { handle }, local.into()))
    }
}

/// A provider's handle, closed on drop.
#[derive(Debug)]
struct Handle {
    library: Arc<Library>,
    raw: *mut c_void,
}

// SAFETY: the ABI lets a handle move between threads as long as one uses it at a time, which
// `&mut` access (and no `Sync`) ensures.
unsafe impl Send for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: a handle `open` returned, closed once, here.
        unsafe { (self.library.close)(self.raw) };
    }
}

/// A queue pair opened and not yet connected.
#[derive(Debug)]
pub struct OpenedQueuePair {
    handle: Handle,
}

impl OpenedQueuePair {
    /// Connects it to `peer` within `timeout`.
    pub fn connect(self, peer: &Endpoint, timeout: Duration) -> Result<LoadedQueuePair, Refusal> {
        let peer = abi::Endpoint::from(*peer);
        let mut detail = [0u8; DETAIL_LEN];
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        // SAFETY: a live opened handle, a live endpoint and detail buffer of the length passed.
        let code = unsafe {
            (self.handle.library.connect)(
                self.handle.raw,
                &raw const peer,
                timeout_ms,
                detail.as_mut_ptr().cast(),
                DETAIL_LEN as u32,
            )
        };
        if code != 0 {
            return Err(Refusal::new(Reason::from_code(code), detail_of(&detail)));
        }
        // SAFETY: a connected handle.
        let fd = unsafe { (self.handle.library.event_fd)(self.handle.raw) };
        if fd < 0 {
            return Err(Refusal::new(
                Reason::RdmaError,
                "the provider has no event fd",
            ));
        }
        Ok(LoadedQueuePair {
            handle: self.handle,
            event_fd: fd,
            deliveries: vec![
                Delivery {
                    immediate: 0,
                    len: 0,
                    payload: std::ptr::null(),
                };
                BATCH
            ],
        })
    }
}

/// A connected queue pair of a loaded provider.
#[derive(Debug)]
pub struct LoadedQueuePair {
    handle: Handle,
    event_fd: i32,
    deliveries: Vec<Delivery>,
}

// SAFETY: the deliveries' pointers are only read between the `poll` that wrote them and the
// next call on the same handle, on the thread that owns the queue pair (see `Handle`).
unsafe impl Send for LoadedQueuePair {}

impl QueuePair for LoadedQueuePair {
    fn send_slots(&self) -> usize {
        // SAFETY: a connected handle.
        unsafe { (self.handle.library.send_slots)(self.handle.raw) as usize }
    }

    fn post_send(&mut self, immediate: u32, payload: &[u8]) -> Result<(), QueuePairError> {
        let mut detail = [0u8; DETAIL_LEN];
        // SAFETY: a connected handle, a live payload and detail buffer of the lengths passed.
        let result = unsafe {
            (self.handle.library.post_send)(
                self.handle.raw,
                immediate,
                payload.as_ptr(),
                payload.len() as u32,
                detail.as_mut_ptr().cast(),
                DETAIL_LEN as u32,
            )
        };
        if result == 0 {
            Ok(())
        } else {
            Err(QueuePairError(detail_of(&detail)))
        }
    }

    fn poll(&mut self, received: &mut Vec<Received>) -> Result<(), QueuePairError> {
        loop {
            let mut detail = [0u8; DETAIL_LEN];
            // SAFETY: a connected handle, room for BATCH deliveries and a detail buffer.
            let n = unsafe {
                (self.handle.library.poll)(
                    self.handle.raw,
                    self.deliveries.as_mut_ptr(),
                    BATCH as u32,
                    detail.as_mut_ptr().cast(),
                    DETAIL_LEN as u32,
                )
            };
            if n < 0 {
                return Err(QueuePairError(detail_of(&detail)));
            }
            for delivery in &self.deliveries[..n as usize] {
                let payload = if delivery.len == 0 {
                    Vec::new()
                } else {
                    // SAFETY: the provider wrote this delivery just now; its payload holds
                    // `len` bytes until the next call on the handle.
                    unsafe { std::slice::from_raw_parts(delivery.payload, delivery.len as usize) }
                        .to_vec()
                };
                received.push(Received {
                    immediate: delivery.immediate,
                    payload,
                });
            }
            if (n as usize) < BATCH {
                return Ok(());
            }
        }
    }

    fn event_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the provider keeps the fd open until `close`, which runs when `self` drops.
        unsafe { BorrowedFd::borrow_raw(self.event_fd) }
    }
}
