//! The provider's side of the ABI, for providers written in Rust: implement [`Provider`] and
//! call [`export!`](crate::export!) once; the generated functions keep the ABI's rules
//! (handles, detail text, deliveries that stay valid until the next poll) in one place.
#![allow(unsafe_code)]

use std::collections::VecDeque;
use std::ffi::{c_char, c_void};
use std::time::Duration;

use stackroute_rdma_relay::{Config, QueuePair, Received};
use stackroute_rdma_upgrade::{Endpoint, Reason};

/// Why a queue pair could not be opened or connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The reason code sent in a decline.
    pub reason: Reason,
    /// For people: which call said what.
    pub detail: String,
}

impl Refusal {
    /// A refusal for `reason`, saying `detail`.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// A verbs provider: opens queue pairs and connects them to a peer's endpoint.
pub trait Provider {
    /// A queue pair opened (its receives posted) and not yet connected.
    type Opened: Send + 'static;
    /// A connected queue pair.
    type QueuePair: QueuePair + Send + 'static;

    /// Opens a queue pair with rings of `config`'s window and buffer: it and its endpoint.
    fn open(config: &Config) -> Result<(Self::Opened, Endpoint), Refusal>;

    /// Connects `opened` to `peer`, within `timeout`.
    fn connect(
        opened: Self::Opened,
        peer: &Endpoint,
        timeout: Duration,
    ) -> Result<Self::QueuePair, Refusal>;
}

/// Declares the ABI's functions for `$provider`, a type implementing [`Provider`].
#[macro_export]
macro_rules! export {
    ($provider:ty) => {
        /// `stackroute_rdma_qp_open` (see `stackroute_rdma_provider::abi`).
        ///
        /// # Safety
        ///
        /// The caller keeps the ABI's contract.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn stackroute_rdma_qp_open(
            config: *const $crate::abi::QpConfig,
            local: *mut $crate::abi::Endpoint,
            qp: *mut *mut ::std::ffi::c_void,
            detail: *mut ::std::ffi::c_char,
            detail_len: u32,
        ) -> u16 {
            // SAFETY: the caller keeps the ABI's contract, which `open` relies on.
            unsafe { $crate::__export::open::<$provider>(config, local, qp, detail, detail_len) }
        }

        /// `stackroute_rdma_qp_connect`.
        ///
        /// # Safety
        ///
        /// The caller keeps the ABI's contract.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn stackroute_rdma_qp_connect(
            qp: *mut ::std::ffi::c_void,
            peer: *const $crate::abi::Endpoint,
            timeout_ms: u32,
            detail: *mut ::std::ffi::c_char,
            detail_len: u32,
        ) -> u16 {
            // SAFETY: the caller keeps the ABI's contract, which `connect` relies on.
            unsafe {
                $crate::__export::connect::<$provider>(qp, peer, timeout_ms, detail, detail_len)
            }
        }

        /// `stackroute_rdma_qp_event_fd`.
        ///
        /// # Safety
        ///
        /// The caller keeps the ABI's contract.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn stackroute_rdma_qp_event_fd(qp: *mut ::std::ffi::c_void) -> i32 {
            // SAFETY: the caller keeps the ABI's contract, which `event_fd` relies on.
            unsafe { $crate::__export::event_fd::<$provider>(qp) }
        }

        /// `stackroute_rdma_qp_send_slots`.
        ///
        /// # Safety
        ///
        /// The caller keeps the ABI's contract.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn stackroute_rdma_qp_send_slots(qp: *mut ::std::ffi::c_void) -> u32 {
            // SAFETY: the caller keeps the ABI's contract, which `send_slots` relies on.
            unsafe { $crate::__export::send_slots::<$provider>(qp) }
        }

        /// `stackroute_rdma_qp_post_send`.
        ///
        /// # Safety
        ///
        /// The caller keeps the ABI's contract.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn stackroute_rdma_qp_post_send(
            qp: *mut ::std::ffi::c_void,
            immediate: u32,
            payload: *const u8,
            len: u32,
            detail: *mut ::std::ffi::c_char,
            detail_len: u32,
        ) -> i32 {
            // SAFETY: the caller keeps the ABI's contract, which `post_send` relies on.
            unsafe {
                $crate::__export::post_send::<$provider>(
                    qp, immediate, payload, len, detail, detail_len,
                )
            }
        }

        /// `stackroute_rdma_qp_poll`.
        ///
        /// # Safety
        ///
        /// The caller keeps the ABI's contract.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn stackroute_rdma_qp_poll(
            qp: *mut ::std::ffi::c_void,
            out: *mut $crate::abi::Delivery,
            max: u32,
            detail: *mut ::std::ffi::c_char,
            detail_len: u32,
        ) -> i32 {
            // SAFETY: the caller keeps the ABI's contract, which `poll` relies on.
            unsafe { $crate::__export::poll::<$provider>(qp, out, max, detail, detail_len) }
        }

        /// `stackroute_rdma_qp_close`.
        ///
        /// # Safety
        ///
        /// The caller keeps the ABI's contract.
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn stackroute_rdma_qp_close(qp: *mut ::std::ffi::c_void) {
            // SAFETY: the caller keeps the ABI's contract, which `close` relies on.
            unsafe { $crate::__export::close::<$provider>(qp) }
        }
    };
}

/// What a handle points to.
enum Handle<P: Provider> {
    Opened(P::Opened),
    Connected(Connected<P::QueuePair>),
    /// A connect failed: only `close` is left.
    Spent,
}

struct Connected<Q> {
    qp: Q,
    /// Received, not yet delivered.
    waiting: VecDeque<Received>,
    /// Delivered by the last poll: their payloads must stay put until the next.
    delivered: Vec<Received>,
    /// The failure to report once `waiting` is empty.
    error: Option<String>,
}

/// The generic bodies of the exported functions.
pub mod raw {
    use super::*;
    use crate::abi::{Delivery, QpConfig};

    /// Writes `text` as a NUL-terminated string into `detail` (`len` bytes, may be null).
    ///
    /// # Safety
    ///
    /// `detail` is null or points to `len` writable bytes.
    unsafe fn write_detail(detail: *mut c_char, len: u32, text: &str) {
        if detail.is_null() || len == 0 {
            return;
        }
        let n = text.len().min(len as usize - 1);
        // SAFETY: `detail` holds `len` > n bytes (the caller's promise).
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), detail.cast::<u8>(), n);
            *detail.add(n) = 0;
        }
    }

    fn guarded<T>(fallback: T, body: impl FnOnce() -> T) -> T {
        // A panic must not unwind into C (and would abort the instance): it is a failure.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(fallback)
    }

    /// See `abi`.
    ///
    /// # Safety
    ///
    /// `config` readable, `local` and `qp` writable, `detail` as in `write_detail`.
    pub unsafe fn open<P: Provider>(
        config: *const QpConfig,
        local: *mut crate::abi::Endpoint,
        qp: *mut *mut c_void,
        detail: *mut c_char,
        detail_len: u32,
    ) -> u16 {
        // SAFETY: the caller passes a readable config.
        let config = unsafe { *config };
        let config = Config {
            window: config.window,
            buffer: config.buffer as usize,
            send_queue: config.buffer as usize,
        };
        let result = guarded(
            Err(Refusal::new(Reason::RdmaError, "the provider panicked")),
            || P::open(&config),
        );
        match result {
            Ok((opened, endpoint)) => {
                let handle = Box::new(Handle::<P>::Opened(opened));
                // SAFETY: the caller passes writable `local` and `qp`.
                unsafe {
                    *local = endpoint.into();
                    *qp = Box::into_raw(handle).cast();
                }
                0
            }
            Err(refusal) => {
                // SAFETY: as the caller promised for `detail`.
                unsafe { write_detail(detail, detail_len, &refusal.detail) };
                refusal.reason.code()
            }
        }
    }

    /// # Safety
    ///
    /// `qp` from `open::<P>` and not closed; one thread at a time.
    unsafe fn handle<'a, P: Provider>(qp: *mut c_void) -> &'a mut Handle<P> {
        // SAFETY: `qp` is a live `Box<Handle<P>>` used by this thread only (the caller's
        // promise).
        unsafe { &mut *qp.cast::<Handle<P>>() }
    }

    /// See `abi`.
    ///
    /// # Safety
    ///
    /// `qp` from `open`, `peer` readable, `detail` as in `write_detail`.
    pub unsafe fn connect<P: Provider>(
        qp: *mut c_void,
        peer: *const crate::abi::Endpoint,
        timeout_ms: u32,
        detail: *mut c_char,
        detail_len: u32,
    ) -> u16 {
        // SAFETY: the caller's promises.
        let (handle, peer) = unsafe { (handle::<P>(qp), *peer) };
        let Handle::Opened(opened) = std::mem::replace(handle, Handle::Spent) else {
            // SAFETY: as the caller promised for `detail`.
            unsafe { write_detail(detail, detail_len, "connect of a queue pair not opened") };
            return Reason::RdmaError.code();
        };
        let timeout = Duration::from_millis(u64::from(timeout_ms));
        let result = guarded(
            Err(Refusal::new(Reason::RdmaError, "the provider panicked")),
            || P::connect(opened, &peer.into(), timeout),
        );
        match result {
            Ok(qp) => {
                *handle = Handle::Connected(Connected {
                    qp,
                    waiting: VecDeque::new(),
                    delivered: Vec::new(),
                    error: None,
                });
                0
            }
            Err(refusal) => {
                // SAFETY: as the caller promised for `detail`.
                unsafe { write_detail(detail, detail_len, &refusal.detail) };
                refusal.reason.code()
            }
        }
    }

    /// # Safety
    ///
    /// `qp` from `open` and connected.
    pub unsafe fn event_fd<P: Provider>(qp: *mut c_void) -> i32 {
        use std::os::fd::AsRawFd;
        // SAFETY: the caller's promise.
        match unsafe { handle::<P>(qp) } {
            Handle::Connected(connected) => connected.qp.event_fd().as_raw_fd(),
            _ => -1,
        }
    }

    /// # Safety
    ///
    /// `qp` from `open`.
    pub unsafe fn send_slots<P: Provider>(qp: *mut c_void) -> u32 {
        // SAFETY: the caller's promise.
        match unsafe { handle::<P>(qp) } {
            // Also after an error: the relay counts SENDs in flight with it.
            Handle::Connected(connected) => connected.qp.send_slots() as u32,
            _ => 0,
        }
    }

    /// # Safety
    ///
    /// `qp` from `open` and connected, `payload` `len` readable bytes, `detail` as in
    /// `write_detail`.
    pub unsafe fn post_send<P: Provider>(
        qp: *mut c_void,
        immediate: u32,
        payload: *const u8,
        len: u32,
        detail: *mut c_char,
        detail_len: u32,
    ) -> i32 {
        // SAFETY: the caller's promises.
        let (handle, payload) = unsafe {
            (
                handle::<P>(qp),
                std::slice::from_raw_parts(payload, len as usize),
            )
        };
        let Handle::Connected(connected) = handle else {
            // SAFETY: as the caller promised for `detail`.
            unsafe {
                write_detail(
                    detail,
                    detail_len,
                    "post_send on a queue pair not connected",
                )
            };
            return -1;
        };
        let result = guarded(
            Err(stackroute_rdma_relay::QueuePairError(
                "the provider panicked".into(),
            )),
            || connected.qp.post_send(immediate, payload),
        );
        match result {
            Ok(()) => 0,
            Err(error) => {
                // SAFETY: as the caller promised for `detail`.
                unsafe { write_detail(detail, detail_len, &error.0) };
                -1
            }
        }
    }

    /// # Safety
    ///
    /// `qp` from `open` and connected, `out` `max` writable deliveries, `detail` as in
    /// `write_detail`.
    pub unsafe fn poll<P: Provider>(
        qp: *mut c_void,
        out: *mut Delivery,
        max: u32,
        detail: *mut c_char,
        detail_len: u32,
    ) -> i32 {
        // SAFETY: the caller's promise.
        let Handle::Connected(connected) = (unsafe { handle::<P>(qp) }) else {
            // SAFETY: as the caller promised for `detail`.
            unsafe { write_detail(detail, detail_len, "poll on a queue pair not connected") };
            return -1;
        };
        connected.delivered.clear();
        if connected.error.is_none() {
            let mut fresh = Vec::new();
            let result = guarded(
                Err(stackroute_rdma_relay::QueuePairError(
                    "the provider panicked".into(),
                )),
                || connected.qp.poll(&mut fresh),
            );
            connected.waiting.extend(fresh);
            if let Err(error) = result {
                connected.error = Some(error.0);
            }
        }
        let n = connected.waiting.len().min(max as usize);
        connected.delivered.extend(connected.waiting.drain(..n));
        for (index, received) in connected.delivered.iter().enumerate() {
            // SAFETY: `out` holds `max` >= n deliveries (the caller's promise); the payloads
            // live in `delivered` until the next poll or close.
            unsafe {
                *out.add(index) = Delivery {
                    immediate: received.immediate,
                    len: received.payload.len() as u32,
                    payload: received.payload.as_ptr(),
                }
            };
        }
        match &connected.error {
            Some(error) if n == 0 => {
                // SAFETY: as the caller promised for `detail`.
                unsafe { write_detail(detail, detail_len, error) };
                -1
            }
            _ => n as i32,
        }
    }

    /// # Safety
    ///
    /// `qp` from `open`, not used again.
    pub unsafe fn close<P: Provider>(qp: *mut c_void) {
        if qp.is_null() {
            return;
        }
        // SAFETY: `qp` is the `Box` `open` leaked, closed once (the caller's promise).
        let handle = unsafe { Box::from_raw(qp.cast::<Handle<P>>()) };
        guarded((), move || drop(handle));
    }
}
