//! The C declarations. Every function returns at once except `connect`, which returns within
//! its timeout; a handle is used by one thread at a time and is freed only by `close`.
//!
//! ```c
//! uint16_t stackroute_rdma_qp_open(const struct qp_config *config, struct endpoint *local,
//!                                  void **qp, char *detail, uint32_t detail_len);
//! uint16_t stackroute_rdma_qp_connect(void *qp, const struct endpoint *peer,
//!                                     uint32_t timeout_ms, char *detail, uint32_t detail_len);
//! int32_t  stackroute_rdma_qp_event_fd(void *qp);
//! uint32_t stackroute_rdma_qp_send_slots(void *qp);
//! int32_t  stackroute_rdma_qp_post_send(void *qp, uint32_t immediate, const uint8_t *payload,
//!                                       uint32_t len, char *detail, uint32_t detail_len);
//! int32_t  stackroute_rdma_qp_poll(void *qp, struct delivery *out, uint32_t max,
//!                                  char *detail, uint32_t detail_len);
//! void     stackroute_rdma_qp_close(void *qp);
//! ```
//!
//! `open` and `connect` answer 0 or a reason code of `stackroute-rdma-upgrade` (with a
//! NUL-terminated detail for people). `post_send` answers 0 or -1 (the queue pair failed,
//! detail says how). `poll` answers how many received messages it wrote to `out` (at most
//! `max`; their payloads stay valid until the next `poll` or `close`), or -1 once every message
//! received before a failure was delivered.

use std::ffi::{c_char, c_void};

/// Sizes of a queue pair's rings (`stackroute_rdma_stream::Config`'s window and buffer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QpConfig {
    /// Receive buffers posted, and send buffers.
    pub window: u32,
    /// Bytes per buffer.
    pub buffer: u32,
}

/// An RDMA endpoint: GID, queue pair number, initial packet sequence number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// The port's GID.
    pub gid: [u8; 16],
    /// Queue pair number.
    pub qpn: u32,
    /// Initial packet sequence number.
    pub psn: u32,
}

impl From<stackroute_rdma_upgrade::Endpoint> for Endpoint {
    fn from(endpoint: stackroute_rdma_upgrade::Endpoint) -> Self {
        Self {
            gid: endpoint.gid,
            qpn: endpoint.qpn,
            psn: endpoint.psn,
        }
    }
}

impl From<Endpoint> for stackroute_rdma_upgrade::Endpoint {
    fn from(endpoint: Endpoint) -> Self {
        Self {
            gid: endpoint.gid,
            qpn: endpoint.qpn,
            psn: endpoint.psn,
        }
    }
}

/// One received message as `poll` reports it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Delivery {
    /// The immediate data.
    pub immediate: u32,
    /// Payload bytes.
    pub len: u32,
    /// The payload (valid until the next `poll` or `close`).
    pub payload: *const u8,
}

/// Bytes of detail text the loader offers.
pub const DETAIL_LEN: usize = 256;

/// Symbol names.
pub const OPEN: &[u8] = b"stackroute_rdma_qp_open\0";
/// Symbol name.
pub const CONNECT: &[u8] = b"stackroute_rdma_qp_connect\0";
/// Symbol name.
pub const EVENT_FD: &[u8] = b"stackroute_rdma_qp_event_fd\0";
/// Symbol name.
pub const SEND_SLOTS: &[u8] = b"stackroute_rdma_qp_send_slots\0";
/// Symbol name.
pub const POST_SEND: &[u8] = b"stackroute_rdma_qp_post_send\0";
/// Symbol name.
pub const POLL: &[u8] = b"stackroute_rdma_qp_poll\0";
/// Symbol name.
pub const CLOSE: &[u8] = b"stackroute_rdma_qp_close\0";

/// `stackroute_rdma_qp_open`.
pub type OpenFn =
    unsafe extern "C" fn(*const QpConfig, *mut Endpoint, *mut *mut c_void, *mut c_char, u32) -> u16;
/// `stackroute_rdma_qp_connect`.
pub type ConnectFn =
    unsafe extern "C" fn(*mut c_void, *const Endpoint, u32, *mut c_char, u32) -> u16;
/// `stackroute_rdma_qp_event_fd`.
pub type EventFdFn = unsafe extern "C" fn(*mut c_void) -> i32;
/// `stackroute_rdma_qp_send_slots`.
pub type SendSlotsFn = unsafe extern "C" fn(*mut c_void) -> u32;
/// `stackroute_rdma_qp_post_send`.
pub type PostSendFn =
    unsafe extern "C" fn(*mut c_void, u32, *const u8, u32, *mut c_char, u32) -> i32;
/// `stackroute_rdma_qp_poll`.
pub type PollFn = unsafe extern "C" fn(*mut c_void, *mut Delivery, u32, *mut c_char, u32) -> i32;
/// `stackroute_rdma_qp_close`.
pub type CloseFn = unsafe extern "C" fn(*mut c_void);
