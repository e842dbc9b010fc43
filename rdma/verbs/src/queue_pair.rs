//! The data path's queue pair on rdma-core: a reliable-connected queue pair whose messages
//! are SENDs with immediate data into the peer's posted receive buffers, the way
//! `ibv_rc_pingpong` connects one (out-of-band addresses, INIT → RTR → RTS) and completions
//! taken through a non-blocking completion channel. It implements
//! [`stackroute_rdma_relay::QueuePair`], so a `Relay` drives it.
//!
//! [`Prepared::new`] creates everything and posts the receives; the two sides exchange
//! [`Prepared::local`] endpoints (the upgrade negotiation carries them); [`Prepared::connect`]
//! brings the queue pair to RTS against the peer's.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::os::fd::BorrowedFd;

use stackroute_rdma_relay::{Config, QueuePair, QueuePairError, Received};
use stackroute_rdma_upgrade::{Endpoint, Reason};

use crate::{Found, NotUsable, sys};

/// PSNs and QPNs are 24 bits.
const PSN_MASK: u32 = 0x00ff_ffff;

/// The connection's attributes (those of `ibv_rc_pingpong`, with the retry counts of a link
/// that must not give up on a slow reader: RNR retries 7 = forever).
mod attr {
    pub(super) const PKEY_INDEX: u16 = 0;
    /// SEND needs no remote access rights.
    pub(super) const QP_ACCESS_FLAGS: u32 = 0;
    pub(super) const MAX_DEST_RD_ATOMIC: u8 = 1;
    /// 0.64 ms (encoded, see `ibv_modify_qp(3)`).
    pub(super) const MIN_RNR_TIMER: u8 = 12;
    pub(super) const HOP_LIMIT: u8 = 64;
    pub(super) const SL: u8 = 0;
    /// 4.096 µs × 2^14 ≈ 67 ms per try.
    pub(super) const TIMEOUT: u8 = 14;
    pub(super) const RETRY_CNT: u8 = 7;
    pub(super) const RNR_RETRY: u8 = 7;
    pub(super) const MAX_RD_ATOMIC: u8 = 1;
}

fn rdma_error(failure: &sys::Failure) -> NotUsable {
    NotUsable::new(Reason::RdmaError, failure.to_string())
}

/// A queue pair created, in INIT with all its receives posted, waiting for the peer's
/// endpoint. Dropping it releases everything.
pub struct Prepared {
    qp: sys::RcQp,
    found: Found,
    config: Config,
    psn: u32,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("device", &self.found.device)
            .field("port", &self.found.port)
            .field("qpn", &self.qp.qp_num())
            .field("psn", &self.psn)
            .field("config", &self.config)
            .finish()
    }
}

impl Prepared {
    /// Opens `found`'s device and creates the queue pair and its rings for `config`:
    /// protection domain, completion channel (non-blocking), one CQ of `2 × window + 2`
    /// entries, an RC queue pair of `window` send and receive requests, `window` receive and
    /// `window` send buffers of `buffer` bytes in one registered region; moves the queue pair
    /// to INIT on `found`'s port, posts every receive buffer and picks a random PSN.
    pub fn new(found: &Found, config: Config) -> Result<Self, NotUsable> {
        config
            .check()
            .map_err(|why| NotUsable::new(Reason::RdmaError, format!("queue pair sizes: {why}")))?;
        let devices = sys::DeviceList::get().map_err(|errno| {
            NotUsable::new(
                Reason::NoDevice,
                format!(
                    "ibv_get_device_list: {}",
                    std::io::Error::from_raw_os_error(errno)
                ),
            )
        })?;
        let index = (0..devices.len())
            .find(|&i| devices.name(i) == found.device)
            .ok_or_else(|| {
                NotUsable::new(
                    Reason::NoDevice,
                    format!("ibv_get_device_list: no device {}", found.device),
                )
            })?;
        let device = devices.open(index).map_err(|errno| {
            NotUsable::new(
                Reason::NoDevice,
                format!("ibv_open_device {}: errno {errno}", found.device),
            )
        })?;
        // The list may go: an opened device stays usable (ibv_get_device_list(3)).
        drop(devices);

        let mut qp =
            sys::RcQp::create(device, config.window, config.buffer).map_err(|failure| {
                let memlock = failure.call.starts_with("ibv_reg_mr")
                    && (failure.errno == libc::ENOMEM || failure.errno == libc::EPERM);
                if memlock {
                    NotUsable::new(
                        Reason::Memlock,
                        format!(
                            "{failure} on {} (raise RLIMIT_MEMLOCK, or run with IPC_LOCK)",
                            found.device
                        ),
                    )
                } else {
                    rdma_error(&failure)
                }
            })?;
        qp.modify_to_init(&sys::Init {
            port_num: found.port,
            pkey_index: attr::PKEY_INDEX,
            qp_access_flags: attr::QP_ACCESS_FLAGS,
        })
        .map_err(|failure| rdma_error(&failure))?;
        for index in 0..config.window {
            qp.post_receive(index)
                .map_err(|failure| rdma_error(&failure))?;
        }
        Ok(Self {
            psn: random_psn(qp.qp_num()),
            qp,
            found: found.clone(),
            config,
        })
    }

    /// This side's endpoint, for the peer: the GID, the queue pair's number, its first PSN.
    pub fn local(&self) -> Endpoint {
        Endpoint {
            gid: self.found.gid,
            qpn: self.qp.qp_num(),
            psn: self.psn,
        }
    }

    /// Connects to `peer` (its [`local`](Self::local)): RTR with the peer's GID, QPN and PSN
    /// and the port's active MTU, then RTS with this side's PSN, and re-arms the completion
    /// queue. The peer's SENDs may arrive as soon as RTR is reached; they wait in the
    /// completion queue for the first [`QueuePair::poll`].
    pub fn connect(mut self, peer: &Endpoint) -> Result<VerbsQueuePair, NotUsable> {
        if peer.qpn > PSN_MASK || peer.psn > PSN_MASK {
            return Err(NotUsable::new(
                Reason::RdmaError,
                format!(
                    "peer endpoint: QPN {:#x} or PSN {:#x} is wider than 24 bits",
                    peer.qpn, peer.psn
                ),
            ));
        }
        let sgid_index = u8::try_from(self.found.gid_index).map_err(|_| {
            NotUsable::new(
                Reason::RdmaError,
                format!("GID index {} does not fit ah_attr", self.found.gid_index),
            )
        })?;
        let path_mtu = self
            .qp
            .active_mtu(self.found.port)
            .map_err(|failure| rdma_error(&failure))?;
        self.qp
            .modify_to_rtr(&sys::Rtr {
                path_mtu,
                dest_qp_num: peer.qpn,
                rq_psn: peer.psn,
                max_dest_rd_atomic: attr::MAX_DEST_RD_ATOMIC,
                min_rnr_timer: attr::MIN_RNR_TIMER,
                dgid: peer.gid,
                sgid_index,
                hop_limit: attr::HOP_LIMIT,
                port_num: self.found.port,
                sl: attr::SL,
            })
            .map_err(|failure| rdma_error(&failure))?;
        self.qp
            .modify_to_rts(&sys::Rts {
                timeout: attr::TIMEOUT,
                retry_cnt: attr::RETRY_CNT,
                rnr_retry: attr::RNR_RETRY,
                sq_psn: self.psn,
                max_rd_atomic: attr::MAX_RD_ATOMIC,
            })
            .map_err(|failure| rdma_error(&failure))?;
        // Armed since creation (before any completion could exist); arming again while armed
        // changes nothing, and keeps connect correct on its own.
        self.qp.arm().map_err(|failure| rdma_error(&failure))?;
        Ok(VerbsQueuePair {
            qp: self.qp,
            buffer: self.config.buffer,
            mtu: path_mtu.bytes(),
            batch: Vec::with_capacity(sys::POLL_BATCH),
        })
    }
}

/// A random 24-bit PSN: std's `RandomState` keys are seeded from the OS's randomness once per
/// thread and differ for every instance.
fn random_psn(qpn: u32) -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (RandomState::new().hash_one((qpn, nanos, std::process::id())) as u32) & PSN_MASK
}

/// A connected queue pair (RTS): what a `Relay` drives.
pub struct VerbsQueuePair {
    qp: sys::RcQp,
    buffer: usize,
    /// The path MTU in bytes (for Debug).
    mtu: Option<u32>,
    /// Reused by every poll.
    batch: Vec<sys::Completion>,
}

impl fmt::Debug for VerbsQueuePair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerbsQueuePair")
            .field("qpn", &self.qp.qp_num())
            .field("mtu", &self.mtu)
            .field("buffer", &self.buffer)
            .field("send_slots", &self.qp.send_slots())
            .finish()
    }
}

impl VerbsQueuePair {
    /// The queue pair's number.
    pub fn qpn(&self) -> u32 {
        self.qp.qp_num()
    }

    fn complete(
        &mut self,
        completion: sys::Completion,
        received: &mut Vec<Received>,
    ) -> Result<(), QueuePairError> {
        let work = completion.work;
        if let Some(error) = completion.error {
            return Err(QueuePairError(format!(
                "{error} (wr {work}; status {}, vendor error {:#x})",
                completion.status, completion.vendor_err
            )));
        }
        match work {
            sys::Work::Receive(index) => {
                if completion.opcode != sys::Opcode::Recv {
                    return Err(QueuePairError(format!(
                        "completion of opcode {:?} (wr {work})",
                        completion.opcode
                    )));
                }
                let Some(immediate) = completion.immediate else {
                    return Err(QueuePairError(format!(
                        "a SEND without immediate data (wr {work})"
                    )));
                };
                let len = completion.byte_len as usize;
                let Some(payload) = self.qp.received(index, len) else {
                    return Err(QueuePairError(format!(
                        "{len} bytes received into a buffer of {} (wr {work})",
                        self.buffer
                    )));
                };
                let payload = payload.to_vec();
                self.qp
                    .post_receive(index)
                    .map_err(|failure| QueuePairError(failure.to_string()))?;
                received.push(Received { immediate, payload });
                Ok(())
            }
            // The slot is free again already (sys released it).
            sys::Work::Send(_) if completion.opcode == sys::Opcode::Send => Ok(()),
            sys::Work::Send(_) => Err(QueuePairError(format!(
                "completion of opcode {:?} (wr {work})",
                completion.opcode
            ))),
            sys::Work::Unknown(_) => Err(QueuePairError(format!(
                "a completion of no posted work request (wr {work})"
            ))),
        }
    }
}

impl QueuePair for VerbsQueuePair {
    fn send_slots(&self) -> usize {
        self.qp.send_slots()
    }

    fn post_send(&mut self, immediate: u32, payload: &[u8]) -> Result<(), QueuePairError> {
        self.qp
            .post_send(immediate, payload)
            .map_err(|failure| QueuePairError(failure.to_string()))
    }

    /// Drains the channel's events (acknowledging them), re-arms the CQ, then polls it empty:
    /// polling after arming misses nothing (a completion added meanwhile raises an event,
    /// at worst one for an already empty CQ).
    fn poll(&mut self, received: &mut Vec<Received>) -> Result<(), QueuePairError> {
        let error = |failure: sys::Failure| QueuePairError(failure.to_string());
        self.qp.take_events().map_err(error)?;
        self.qp.arm().map_err(error)?;
        let mut batch = std::mem::take(&mut self.batch);
        let result = loop {
            batch.clear();
            let n = match self.qp.poll(&mut batch) {
                Ok(n) => n,
                Err(failure) => break Err(error(failure)),
            };
            if let Err(failure) = batch
                .drain(..)
                .try_for_each(|completion| self.complete(completion, received))
            {
                break Err(failure);
            }
            if n < sys::POLL_BATCH {
                break Ok(());
            }
        };
        batch.clear();
        self.batch = batch;
        result
    }

    fn event_fd(&self) -> BorrowedFd<'_> {
        self.qp.event_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: Config = Config {
        window: 16,
        buffer: 64 * 1024,
        send_queue: 256 * 1024,
    };

    fn nowhere() -> Found {
        Found {
            device: "stackroute-no-such-device".into(),
            port: 1,
            gid_index: 0,
            gid: [0xfe; 16],
        }
    }

    /// Without the RDMA subsystem (this project's CI) the device list fails; with one, the
    /// device is not in it: either way the device is what is missing.
    #[test]
    fn a_missing_device_is_no_device() {
        let not_usable = Prepared::new(&nowhere(), CONFIG).unwrap_err();
        assert_eq!(not_usable.reason, Reason::NoDevice, "{not_usable:?}");
        assert!(
            not_usable.detail.starts_with("ibv_get_device_list: "),
            "{not_usable:?}"
        );
    }

    #[test]
    fn sizes_are_checked_before_any_verbs_call() {
        let config = Config {
            window: 2,
            ..CONFIG
        };
        let not_usable = Prepared::new(&nowhere(), config).unwrap_err();
        assert_eq!(not_usable.reason, Reason::RdmaError);
        assert!(
            not_usable.detail.starts_with("queue pair sizes: "),
            "{not_usable:?}"
        );
    }

    #[test]
    fn psns_are_24_bits_and_vary() {
        let psns: std::collections::HashSet<u32> = (0..64).map(|_| random_psn(7)).collect();
        assert!(psns.iter().all(|&psn| psn <= PSN_MASK));
        assert!(psns.len() > 60, "{psns:?}");
    }
}
