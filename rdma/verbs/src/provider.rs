//! The data-path ABI of `stackroute-rdma-provider` on this crate's queue pair: the pod's stack
//! instance loads this library and opens, connects and drives queue pairs through it.
#![allow(unsafe_code)]

use std::sync::OnceLock;
use std::time::Duration;

use stackroute_rdma_provider::{Provider, Refusal};
use stackroute_rdma_relay::Config;
use stackroute_rdma_upgrade::Endpoint;

use crate::{Found, NotUsable, Prepared, VerbsQueuePair, probe};

/// The provider of this library.
pub(crate) struct Verbs;

fn refusal(not_usable: NotUsable) -> Refusal {
    Refusal::new(not_usable.reason, not_usable.detail)
}

/// The device and port of the first successful probe (a probe registers memory: once per
/// process is enough; a failed one is tried again next time).
fn found() -> Result<&'static Found, Refusal> {
    static FOUND: OnceLock<Found> = OnceLock::new();
    if let Some(found) = FOUND.get() {
        return Ok(found);
    }
    let found = probe().map_err(refusal)?;
    Ok(FOUND.get_or_init(|| found))
}

impl Provider for Verbs {
    type Opened = Prepared;
    type QueuePair = VerbsQueuePair;

    fn open(config: &Config) -> Result<(Prepared, Endpoint), Refusal> {
        let prepared = Prepared::new(found()?, *config).map_err(refusal)?;
        let local = prepared.local();
        Ok((prepared, local))
    }

    /// Connecting an RC queue pair only moves its state (RTR, RTS) with the peer's endpoint:
    /// nothing waits on the network, so the timeout is not needed.
    fn connect(
        opened: Prepared,
        peer: &Endpoint,
        _timeout: Duration,
    ) -> Result<VerbsQueuePair, Refusal> {
        opened.connect(peer).map_err(refusal)
    }
}

stackroute_rdma_provider::export!(Verbs);
