//! The verbs of the data path: one reliable-connected queue pair with its completion queue,
//! completion channel and registered rings, behind a safe type that releases what it holds and
//! keeps track of which buffers the device owns, so that no safe call touches one of those.
//!
//! `ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq` and `ibv_req_notify_cq` are `static inline`
//! in `verbs.h` (calls through the context's ops table, `qp->context->ops.post_send(…)` and so
//! on); rdma-sys 0.3.0 re-implements exactly those four in Rust the same way, and they are used
//! here. Everything else is an exported libibverbs function.
#![allow(unsafe_code)]

use std::alloc::Layout;
use std::ffi::CStr;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::ptr;

use rdma_sys::{
    ibv_access_flags, ibv_ack_cq_events, ibv_alloc_pd, ibv_comp_channel, ibv_cq,
    ibv_create_comp_channel, ibv_create_cq, ibv_create_qp, ibv_dealloc_pd, ibv_dereg_mr,
    ibv_destroy_comp_channel, ibv_destroy_cq, ibv_destroy_qp, ibv_get_cq_event, ibv_gid,
    ibv_modify_qp, ibv_mr, ibv_pd, ibv_poll_cq, ibv_post_recv, ibv_post_send, ibv_qp, ibv_qp_attr,
    ibv_qp_attr_mask, ibv_qp_cap, ibv_qp_init_attr, ibv_qp_state, ibv_qp_type, ibv_recv_wr,
    ibv_reg_mr, ibv_req_notify_cq, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_flags,
    ibv_wc_opcode, ibv_wc_status, ibv_wc_status_str, ibv_wr_opcode,
};

use super::{Device, Mtu, errno};

/// Marks a SEND's work request id (the rest is its send buffer's index); a receive's id is
/// its receive buffer's index. Error completions are told apart by this alone: their opcode
/// is not valid (`ibv_poll_cq(3)`).
const SEND_TAG: u64 = 1 << 63;

/// Completions taken per `ibv_poll_cq` call.
pub(crate) const POLL_BATCH: usize = 16;

/// The most buffers per ring: beyond what devices allow per queue (`max_qp_wr`, 32768 on
/// mlx5), refused before the per-buffer state is allocated.
const MAX_WINDOW: u32 = 1 << 16;

/// The rings' alignment: a page, as `ibv_rc_pingpong` allocates its buffer.
const RING_ALIGN: usize = 4096;

/// A failed verbs call (or a request the rings cannot take): what, and the errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Failure {
    /// The call, with what it was for.
    pub(crate) call: String,
    /// The errno it left (0 if it set none).
    pub(crate) errno: i32,
}

impl Failure {
    fn new(call: impl Into<String>, errno: i32) -> Self {
        Self {
            call: call.into(),
            errno,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // "Invalid argument (os error 22)": the text and the errno.
        write!(
            f,
            "{}: {}",
            self.call,
            std::io::Error::from_raw_os_error(self.errno)
        )
    }
}

/// The errno of a call that returns 0 or the errno (`ibv_modify_qp`, `ibv_post_send`, …):
/// `rc` itself, or the thread's errno if an older provider returned -1.
fn returned_errno(rc: i32) -> i32 {
    if rc > 0 { rc } else { errno() }
}

fn clear_errno() {
    // SAFETY: the calling thread's errno, a live thread-local int.
    unsafe { *libc::__errno_location() = 0 };
}

/// `ibv_modify_qp` to INIT.
pub(crate) struct Init {
    pub(crate) port_num: u8,
    pub(crate) pkey_index: u16,
    pub(crate) qp_access_flags: u32,
}

/// `ibv_modify_qp` to RTR (ready to receive), with the peer's address.
pub(crate) struct Rtr {
    pub(crate) path_mtu: Mtu,
    pub(crate) dest_qp_num: u32,
    pub(crate) rq_psn: u32,
    pub(crate) max_dest_rd_atomic: u8,
    pub(crate) min_rnr_timer: u8,
    /// The peer's GID (`ah_attr.grh.dgid`, `ah_attr.is_global = 1`).
    pub(crate) dgid: [u8; 16],
    pub(crate) sgid_index: u8,
    pub(crate) hop_limit: u8,
    pub(crate) port_num: u8,
    pub(crate) sl: u8,
}

/// `ibv_modify_qp` to RTS (ready to send).
pub(crate) struct Rts {
    pub(crate) timeout: u8,
    pub(crate) retry_cnt: u8,
    pub(crate) rnr_retry: u8,
    pub(crate) sq_psn: u32,
    pub(crate) max_rd_atomic: u8,
}

/// Which work request a completion is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Work {
    /// A SEND from send buffer `n` (free again).
    Send(u32),
    /// A receive into receive buffer `n` (no longer posted: readable until reposted).
    Receive(u32),
    /// An id this queue pair did not post, or whose buffer it does not count as posted.
    Unknown(u64),
}

impl fmt::Display for Work {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Send(index) => write!(f, "send {index}"),
            Self::Receive(index) => write!(f, "receive {index}"),
            Self::Unknown(wr_id) => write!(f, "unknown {wr_id:#x}"),
        }
    }
}

/// What a successful completion did (its `opcode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Opcode {
    /// `IBV_WC_SEND`.
    Send,
    /// `IBV_WC_RECV`: a SEND (with or without immediate data) arrived.
    Recv,
    /// Anything else (this queue pair posts nothing else).
    Other(u32),
}

/// One work completion, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Completion {
    pub(crate) work: Work,
    /// `None` for `IBV_WC_SUCCESS`; otherwise what `ibv_wc_status_str` says of the status
    /// (the fields below but `status` and `vendor_err` are then not valid, `ibv_poll_cq(3)`).
    pub(crate) error: Option<String>,
    pub(crate) status: u32,
    pub(crate) vendor_err: u32,
    pub(crate) opcode: Opcode,
    pub(crate) byte_len: u32,
    /// The immediate data in host byte order (`ntohl`), when `IBV_WC_WITH_IMM` is set.
    pub(crate) immediate: Option<u32>,
}

/// One RC queue pair on an open device: protection domain, completion channel (non-blocking
/// fd), one completion queue for both queues, `window` receive and `window` send buffers of
/// `buffer` bytes in one registered allocation (receive buffers first).
///
/// Buffer ownership is tracked here: a posted receive buffer and a send buffer with a SEND in
/// flight belong to the device until their completion is polled, and no method reads or
/// writes them until then.
pub(crate) struct RcQp {
    /// Closed when the fields drop, after [`Drop::drop`] released everything else.
    device: Device,
    pd: *mut ibv_pd,
    channel: *mut ibv_comp_channel,
    cq: *mut ibv_cq,
    /// CQ events got and not yet acknowledged (`ibv_destroy_cq` waits for them).
    unacked: u32,
    rings: *mut u8,
    rings_layout: Layout,
    mr: *mut ibv_mr,
    lkey: u32,
    qp: *mut ibv_qp,
    window: u32,
    buffer: usize,
    /// Receive buffer `i` is posted: the device may write it.
    posted: Vec<bool>,
    /// A SEND from send buffer `i` is in flight: the device may read it.
    in_flight: Vec<bool>,
    /// Send buffers with no SEND in flight.
    free_sends: Vec<u32>,
}

// SAFETY: the pointers are this value's own verbs objects and allocation, reachable through
// no other value (fds and slices it lends borrow it); libibverbs objects are not bound to
// the thread that created them (the verbs are thread-safe), so the whole may move to another
// thread. It is not `Sync`: all use goes through one owner.
unsafe impl Send for RcQp {}

impl RcQp {
    /// Creates everything on `device` (the queue pair stays in RESET; the completion queue is
    /// armed at once, "before any completion can be created" as `ibv_get_cq_event(3)` does).
    pub(crate) fn create(device: Device, window: u32, buffer: usize) -> Result<Self, Failure> {
        let count = window as usize;
        let sizes = (|| {
            let length = count.checked_mul(2)?.checked_mul(buffer)?;
            let cqe = i32::try_from(u64::from(window) * 2 + 2).ok()?;
            let layout = Layout::from_size_align(length, RING_ALIGN).ok()?;
            let fits = (1..=MAX_WINDOW).contains(&window) && u32::try_from(buffer).is_ok();
            (fits && buffer > 0).then_some((layout, cqe))
        })();
        let Some((rings_layout, cqe)) = sizes else {
            return Err(Failure::new(
                format!("rings of 2 × {window} buffers of {buffer} bytes"),
                libc::EINVAL,
            ));
        };
        let mut this = Self {
            device,
            pd: ptr::null_mut(),
            channel: ptr::null_mut(),
            cq: ptr::null_mut(),
            unacked: 0,
            rings: ptr::null_mut(),
            rings_layout,
            mr: ptr::null_mut(),
            lkey: 0,
            qp: ptr::null_mut(),
            window,
            buffer,
            posted: vec![false; count],
            in_flight: vec![false; count],
            free_sends: (0..window).rev().collect(),
        };
        // From here on an early return drops `this`, which releases what exists so far.
        let context = this.device.context;

        // SAFETY: an open context.
        this.pd = unsafe { ibv_alloc_pd(context) };
        if this.pd.is_null() {
            return Err(Failure::new("ibv_alloc_pd", errno()));
        }

        // SAFETY: an open context.
        this.channel = unsafe { ibv_create_comp_channel(context) };
        if this.channel.is_null() {
            return Err(Failure::new("ibv_create_comp_channel", errno()));
        }
        // SAFETY: the channel just created; its fd is open while it lives.
        let fd = unsafe { (*this.channel).fd };
        // SAFETY: fcntl on an open fd with integer arguments only.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(Failure::new(
                "fcntl O_NONBLOCK on the completion channel",
                errno(),
            ));
        }

        // SAFETY: an open context and a channel of it; no CQ context pointer, vector 0.
        this.cq = unsafe { ibv_create_cq(context, cqe, ptr::null_mut(), this.channel, 0) };
        if this.cq.is_null() {
            return Err(Failure::new(
                format!("ibv_create_cq ({cqe} entries)"),
                errno(),
            ));
        }
        this.arm()?;

        // SAFETY: a non-zero size (checked above) and a valid alignment (a Layout).
        this.rings = unsafe { std::alloc::alloc_zeroed(rings_layout) };
        if this.rings.is_null() {
            return Err(Failure::new(
                format!("allocating {} bytes of rings", rings_layout.size()),
                libc::ENOMEM,
            ));
        }
        // SAFETY: a live protection domain and a live allocation of `size` bytes, which is
        // freed only after this region is deregistered (Drop).
        this.mr = unsafe {
            ibv_reg_mr(
                this.pd,
                this.rings.cast(),
                rings_layout.size(),
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as i32,
            )
        };
        if this.mr.is_null() {
            return Err(Failure::new(
                format!("ibv_reg_mr ({} bytes)", rings_layout.size()),
                errno(),
            ));
        }
        // SAFETY: the region just registered.
        this.lkey = unsafe { (*this.mr).lkey };

        let mut init_attr = ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: this.cq,
            recv_cq: this.cq,
            srq: ptr::null_mut(),
            cap: ibv_qp_cap {
                max_send_wr: window,
                max_recv_wr: window,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ibv_qp_type::IBV_QPT_RC,
            // Only SENDs posted with IBV_SEND_SIGNALED complete (all of ours are).
            sq_sig_all: 0,
        };
        // SAFETY: a live protection domain, a live attribute struct naming a live CQ.
        this.qp = unsafe { ibv_create_qp(this.pd, &raw mut init_attr) };
        if this.qp.is_null() {
            return Err(Failure::new(
                format!("ibv_create_qp (RC, {window} send and receive requests)"),
                errno(),
            ));
        }
        Ok(this)
    }

    /// The queue pair's number.
    pub(crate) fn qp_num(&self) -> u32 {
        // SAFETY: the live queue pair.
        unsafe { (*self.qp).qp_num }
    }

    /// The active MTU of `port` on this queue pair's device.
    pub(crate) fn active_mtu(&self, port: u8) -> Result<Mtu, Failure> {
        self.device
            .active_mtu(port)
            .map_err(|errno| Failure::new(format!("ibv_query_port {port}"), errno))
    }

    fn modify(
        &mut self,
        mut attr: ibv_qp_attr,
        mask: ibv_qp_attr_mask,
        to: &str,
    ) -> Result<(), Failure> {
        // SAFETY: the live queue pair and a live attribute struct; `mask` names the fields set.
        let rc = unsafe { ibv_modify_qp(self.qp, &raw mut attr, mask.0 as i32) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Failure::new(
                format!("ibv_modify_qp to {to}"),
                returned_errno(rc),
            ))
        }
    }

    fn zeroed_attr() -> ibv_qp_attr {
        // SAFETY: ibv_qp_attr is plain data (integers, a GID union of bytes); all zeroes is a
        // valid value.
        unsafe { std::mem::zeroed() }
    }

    /// RESET → INIT (`ibv_modify_qp(3)`: state, P_Key index, port, access flags).
    pub(crate) fn modify_to_init(&mut self, init: &Init) -> Result<(), Failure> {
        let mut attr = Self::zeroed_attr();
        attr.qp_state = ibv_qp_state::IBV_QPS_INIT;
        attr.pkey_index = init.pkey_index;
        attr.port_num = init.port_num;
        attr.qp_access_flags = init.qp_access_flags;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ibv_qp_attr_mask::IBV_QP_PORT
            | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        self.modify(attr, mask, "INIT")
    }

    /// INIT → RTR (state, address vector, path MTU, destination QPN, receive PSN, responder
    /// resources, minimum RNR NAK timer).
    pub(crate) fn modify_to_rtr(&mut self, rtr: &Rtr) -> Result<(), Failure> {
        let mut attr = Self::zeroed_attr();
        attr.qp_state = ibv_qp_state::IBV_QPS_RTR;
        attr.path_mtu = rtr.path_mtu.0;
        attr.dest_qp_num = rtr.dest_qp_num;
        attr.rq_psn = rtr.rq_psn;
        attr.max_dest_rd_atomic = rtr.max_dest_rd_atomic;
        attr.min_rnr_timer = rtr.min_rnr_timer;
        attr.ah_attr.is_global = 1;
        attr.ah_attr.grh.dgid = ibv_gid { raw: rtr.dgid };
        attr.ah_attr.grh.sgid_index = rtr.sgid_index;
        attr.ah_attr.grh.hop_limit = rtr.hop_limit;
        attr.ah_attr.grh.flow_label = 0;
        attr.ah_attr.grh.traffic_class = 0;
        // RoCE routes by the GRH; the LID is InfiniBand's (0 here).
        attr.ah_attr.dlid = 0;
        attr.ah_attr.sl = rtr.sl;
        attr.ah_attr.src_path_bits = 0;
        attr.ah_attr.static_rate = 0;
        attr.ah_attr.port_num = rtr.port_num;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(attr, mask, "RTR")
    }

    /// RTR → RTS (state, ACK timeout, retry counts, send PSN, initiator depth).
    pub(crate) fn modify_to_rts(&mut self, rts: &Rts) -> Result<(), Failure> {
        let mut attr = Self::zeroed_attr();
        attr.qp_state = ibv_qp_state::IBV_QPS_RTS;
        attr.timeout = rts.timeout;
        attr.retry_cnt = rts.retry_cnt;
        attr.rnr_retry = rts.rnr_retry;
        attr.sq_psn = rts.sq_psn;
        attr.max_rd_atomic = rts.max_rd_atomic;
        let mask = ibv_qp_attr_mask::IBV_QP_STATE
            | ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(attr, mask, "RTS")
    }

    /// Requests one completion event for the next completion (`ibv_req_notify_cq(cq, 0)`).
    pub(crate) fn arm(&mut self) -> Result<(), Failure> {
        // SAFETY: the live CQ (rdma-sys calls the context's ops.req_notify_cq, as verbs.h).
        let rc = unsafe { ibv_req_notify_cq(self.cq, 0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Failure::new("ibv_req_notify_cq", returned_errno(rc)))
        }
    }

    /// Takes every completion event waiting on the channel without blocking and
    /// acknowledges them: how many there were.
    pub(crate) fn take_events(&mut self) -> Result<u32, Failure> {
        let mut taken = 0;
        let result = loop {
            let mut cq: *mut ibv_cq = ptr::null_mut();
            let mut cq_context: *mut libc::c_void = ptr::null_mut();
            clear_errno();
            // SAFETY: the live channel (its fd is non-blocking) and two live out-pointers.
            let rc = unsafe { ibv_get_cq_event(self.channel, &raw mut cq, &raw mut cq_context) };
            if rc != 0 {
                let errno = errno();
                break if errno == libc::EAGAIN || errno == libc::EWOULDBLOCK {
                    Ok(taken)
                } else {
                    Err(Failure::new("ibv_get_cq_event", errno))
                };
            }
            // The channel serves this CQ alone.
            debug_assert_eq!(cq, self.cq);
            self.unacked += 1;
            taken += 1;
        };
        self.acknowledge();
        result
    }

    fn acknowledge(&mut self) {
        if self.unacked > 0 {
            // SAFETY: the live CQ, which got exactly `unacked` events not yet acknowledged.
            unsafe { ibv_ack_cq_events(self.cq, self.unacked) };
            self.unacked = 0;
        }
    }

    /// One `ibv_poll_cq` of up to [`POLL_BATCH`] completions, appended to `out` (buffers
    /// they release are free again at once): how many there were.
    pub(crate) fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize, Failure> {
        // SAFETY: ibv_wc is plain data (integers, a union of integers); all zeroes is valid.
        let mut wcs: [ibv_wc; POLL_BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: the live CQ and room for POLL_BATCH completions (rdma-sys calls the
        // context's ops.poll_cq, as verbs.h).
        let n = unsafe { ibv_poll_cq(self.cq, POLL_BATCH as i32, wcs.as_mut_ptr()) };
        let Ok(n) = usize::try_from(n) else {
            return Err(Failure::new(format!("ibv_poll_cq (returned {n})"), errno()));
        };
        for wc in &wcs[..n.min(POLL_BATCH)] {
            let work = self.release(wc.wr_id);
            let completion = if wc.status == ibv_wc_status::IBV_WC_SUCCESS {
                let with_imm = wc.wc_flags & ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
                // SAFETY: with IBV_WC_WITH_IMM the union holds the immediate data, and either
                // member is a plain u32.
                let imm_data = unsafe { wc.imm_data_invalidated_rkey_union.imm_data };
                Completion {
                    work,
                    error: None,
                    status: wc.status,
                    vendor_err: wc.vendor_err,
                    opcode: match wc.opcode {
                        ibv_wc_opcode::IBV_WC_SEND => Opcode::Send,
                        ibv_wc_opcode::IBV_WC_RECV => Opcode::Recv,
                        other => Opcode::Other(other),
                    },
                    byte_len: wc.byte_len,
                    // Network byte order on the wire and in the completion: ntohl.
                    immediate: with_imm.then(|| u32::from_be(imm_data)),
                }
            } else {
                Completion {
                    work,
                    error: Some(status_str(wc.status)),
                    status: wc.status,
                    vendor_err: wc.vendor_err,
                    opcode: Opcode::Other(wc.opcode),
                    byte_len: 0,
                    immediate: None,
                }
            };
            out.push(completion);
        }
        Ok(n)
    }

    /// The work request `wr_id` completed: its buffer is no longer the device's.
    fn release(&mut self, wr_id: u64) -> Work {
        let send = wr_id & SEND_TAG != 0;
        let index = wr_id & !SEND_TAG;
        let Some(i) = usize::try_from(index)
            .ok()
            .filter(|&i| i < self.window as usize)
        else {
            return Work::Unknown(wr_id);
        };
        let index = i as u32;
        if send && self.in_flight[i] {
            self.in_flight[i] = false;
            self.free_sends.push(index);
            Work::Send(index)
        } else if !send && self.posted[i] {
            self.posted[i] = false;
            Work::Receive(index)
        } else {
            Work::Unknown(wr_id)
        }
    }

    fn buffer_address(&self, slot: usize) -> *mut u8 {
        // In bounds: slot < 2 × window (receive buffers, then send buffers).
        self.rings.wrapping_add(slot * self.buffer)
    }

    /// Posts receive buffer `index` (`wr_id` = `index`, one SGE of the whole buffer).
    pub(crate) fn post_receive(&mut self, index: u32) -> Result<(), Failure> {
        let i = index as usize;
        if i >= self.posted.len() || self.posted[i] {
            return Err(Failure::new(
                format!("ibv_post_recv: receive buffer {index} is not free"),
                libc::EINVAL,
            ));
        }
        let mut sge = ibv_sge {
            addr: self.buffer_address(i) as u64,
            // Checked to fit in create().
            length: self.buffer as u32,
            lkey: self.lkey,
        };
        let mut wr = ibv_recv_wr {
            wr_id: u64::from(index),
            next: ptr::null_mut(),
            sg_list: &raw mut sge,
            num_sge: 1,
        };
        let mut bad: *mut ibv_recv_wr = ptr::null_mut();
        // SAFETY: the live queue pair, a live request whose SGE lies in the registered rings
        // (receive buffer `index`, which no one reads while it is posted: `posted`).
        let rc = unsafe { ibv_post_recv(self.qp, &raw mut wr, &raw mut bad) };
        if rc != 0 {
            return Err(Failure::new(
                format!("ibv_post_recv (buffer {index})"),
                returned_errno(rc),
            ));
        }
        self.posted[i] = true;
        Ok(())
    }

    /// The first `len` bytes of receive buffer `index`, if it is not posted and `len` fits.
    pub(crate) fn received(&self, index: u32, len: usize) -> Option<&[u8]> {
        let i = index as usize;
        if i >= self.posted.len() || self.posted[i] || len > self.buffer {
            return None;
        }
        // SAFETY: inside the allocation (receive buffer `i`, `len` ≤ buffer), initialised
        // (zeroed, then written by the device), and not posted: the device writes it again
        // only once post_receive reposts it, which needs `&mut self`, so not while this
        // borrow lives.
        Some(unsafe { std::slice::from_raw_parts(self.buffer_address(i), len) })
    }

    /// Send buffers free for a SEND.
    pub(crate) fn send_slots(&self) -> usize {
        self.free_sends.len()
    }

    /// Copies `payload` into a free send buffer and posts a signaled SEND with immediate
    /// data `immediate` (host order; sent as `htonl`). An empty payload is a SEND of no bytes
    /// (no SGE: a zero-length SGE means 2 GiB to some devices).
    pub(crate) fn post_send(&mut self, immediate: u32, payload: &[u8]) -> Result<(), Failure> {
        if payload.len() > self.buffer {
            return Err(Failure::new(
                format!(
                    "ibv_post_send: {} bytes for a buffer of {}",
                    payload.len(),
                    self.buffer
                ),
                libc::EMSGSIZE,
            ));
        }
        let Some(index) = self.free_sends.pop() else {
            return Err(Failure::new(
                "ibv_post_send: no free send buffer",
                libc::ENOBUFS,
            ));
        };
        let i = index as usize;
        let address = self.buffer_address(self.window as usize + i);
        // SAFETY: send buffer `index` lies in the allocation and holds `buffer` ≥ len bytes;
        // it has no SEND in flight (it was free), so the device does not read it; `payload`
        // cannot overlap it (the only borrows of the rings, `received`, are of receive
        // buffers and need `&self` while this holds `&mut self`).
        unsafe { ptr::copy_nonoverlapping(payload.as_ptr(), address, payload.len()) };
        let mut sge = ibv_sge {
            addr: address as u64,
            length: payload.len() as u32,
            lkey: self.lkey,
        };
        // SAFETY: ibv_send_wr is plain data (integers, null pointers, unions of those); all
        // zeroes is a valid value.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = SEND_TAG | u64::from(index);
        wr.next = ptr::null_mut();
        if payload.is_empty() {
            wr.sg_list = ptr::null_mut();
            wr.num_sge = 0;
        } else {
            wr.sg_list = &raw mut sge;
            wr.num_sge = 1;
        }
        wr.opcode = ibv_wr_opcode::IBV_WR_SEND_WITH_IMM;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        // Network byte order, as verbs requires: htonl.
        wr.imm_data_invalidated_rkey_union.imm_data = immediate.to_be();
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: the live queue pair and a live request whose SGE (if any) lies in the
        // registered rings; the buffer stays untouched until its completion (`in_flight`).
        let rc = unsafe { ibv_post_send(self.qp, &raw mut wr, &raw mut bad) };
        if rc != 0 {
            self.free_sends.push(index);
            return Err(Failure::new(
                format!("ibv_post_send (buffer {index}, {} bytes)", payload.len()),
                returned_errno(rc),
            ));
        }
        self.in_flight[i] = true;
        Ok(())
    }

    /// The completion channel's fd (non-blocking): readable when an event is waiting.
    pub(crate) fn event_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel lives, and its fd stays open, as long as `self`, which the
        // returned fd borrows.
        unsafe { BorrowedFd::borrow_raw((*self.channel).fd) }
    }
}

fn status_str(status: u32) -> String {
    // SAFETY: a pure lookup; any status value is accepted.
    let text = unsafe { ibv_wc_status_str(status) };
    if text.is_null() {
        return format!("status {status}");
    }
    // SAFETY: non-null, a static NUL-terminated string of libibverbs.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

impl Drop for RcQp {
    /// Releases in the order the verbs require: queue pair, memory region (then the rings it
    /// covered), completion queue (its events acknowledged first, or `ibv_destroy_cq` waits
    /// forever), channel, protection domain; the device context closes last, as the field
    /// drops. If the queue pair or the region cannot be released, the device may still reach
    /// the rings: they are leaked rather than freed.
    fn drop(&mut self) {
        let mut rings_unreachable = true;
        if !self.qp.is_null() {
            // SAFETY: the queue pair created in create(), destroyed once.
            rings_unreachable &= unsafe { ibv_destroy_qp(self.qp) } == 0;
        }
        if !self.mr.is_null() {
            // SAFETY: the region registered in create(), deregistered once.
            rings_unreachable &= unsafe { ibv_dereg_mr(self.mr) } == 0;
        }
        if !self.rings.is_null() && rings_unreachable {
            // SAFETY: allocated in create() with this layout, freed once, and no longer
            // registered nor reachable by a queue pair.
            unsafe { std::alloc::dealloc(self.rings, self.rings_layout) };
        }
        if !self.cq.is_null() {
            self.acknowledge();
            // SAFETY: the CQ created in create(), its queue pair gone, destroyed once.
            unsafe { ibv_destroy_cq(self.cq) };
        }
        if !self.channel.is_null() {
            // SAFETY: the channel created in create(), its CQ gone, destroyed once.
            unsafe { ibv_destroy_comp_channel(self.channel) };
        }
        if !self.pd.is_null() {
            // SAFETY: the protection domain allocated in create(), empty now, freed once.
            unsafe { ibv_dealloc_pd(self.pd) };
        }
    }
}
