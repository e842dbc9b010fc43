//! The verbs provider on a real RDMA device (RoCE NIC, or `rdma link add rxe0 type rxe netdev
//! eth0` on a kernel with `rdma_rxe`): the probe, and two queue pairs carrying a relayed
//! stream. Without a device the trials show as ignored with what the probe said, and fail
//! under `STACKROUTE_REQUIRE_RDMA=1`.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use stackroute_rdma::{Config, Found, Prepared, probe};
use stackroute_rdma_relay::{End, Relay};
use testkit::{Ignored, Trial};

const REQUIRE: &str = "STACKROUTE_REQUIRE_RDMA";

fn device() -> Result<Found, Ignored> {
    match probe() {
        Ok(found) => Ok(found),
        Err(not_usable) if std::env::var(REQUIRE).is_ok_and(|v| v == "1") => {
            panic!(
                "{REQUIRE}=1 but no usable RDMA device: {}",
                not_usable.detail
            )
        }
        Err(not_usable) => Err(Ignored::new(format!(
            "no usable RDMA device ({}: {})",
            not_usable.reason, not_usable.detail
        ))),
    }
}

/// Bytes each direction carries.
const STREAM_BYTES: usize = 4 << 20;

/// Bytes that repeat with no short period and differ per direction.
fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 24) as u8 ^ (i >> 16) as u8)
        .collect()
}

/// Writes `data` into `app` and shuts down writing; reads everything the other way until the
/// end of the stream. What was read, or what failed.
fn drive_application(
    app: UnixStream,
    data: Vec<u8>,
) -> thread::JoinHandle<Result<Vec<u8>, String>> {
    let deadline = Some(Duration::from_secs(60));
    app.set_read_timeout(deadline).unwrap();
    app.set_write_timeout(deadline).unwrap();
    let mut writer = app.try_clone().unwrap();
    let write = thread::spawn(move || {
        writer
            .write_all(&data)
            .and_then(|()| writer.shutdown(Shutdown::Write))
    });
    thread::spawn(move || {
        let mut app = app;
        let mut read = Vec::new();
        let reading = app.read_to_end(&mut read);
        let writing = write.join().unwrap();
        writing.map_err(|error| format!("writing into the relay: {error}"))?;
        reading.map_err(|error| {
            format!("reading from the relay after {} bytes: {error}", read.len())
        })?;
        Ok(read)
    })
}

fn main() -> std::process::ExitCode {
    testkit::run(vec![
        Trial::gated(
            "the_probe_finds_the_port_and_gid_sysfs_shows",
            device,
            |found| {
                // The verbs answer agrees with the kernel's sysfs view (the agent's discovery).
                let discovery = stackroute_rdma_discover::discover(std::path::Path::new("/"));
                let port = discovery
                    .devices
                    .iter()
                    .find(|d| d.name == found.device)
                    .and_then(|d| d.ports.iter().find(|p| p.number == u32::from(found.port)))
                    .unwrap_or_else(|| panic!("{found:?} is not in sysfs: {discovery:?}"));
                // discover lower-cases the state ("4: ACTIVE" reads "active").
                assert_eq!(port.state, "active", "{port:?}");
                // Without preferred addresses the probe takes discover's choice (RoCE v2 first).
                if std::env::var_os(stackroute_rdma_discover::ADDRESSES_VAR).is_none() {
                    let usable = stackroute_rdma_discover::usable(&discovery).unwrap();
                    assert_eq!(
                        (usable.device.as_str(), usable.port, usable.gid_index),
                        (
                            found.device.as_str(),
                            u32::from(found.port),
                            found.gid_index as u32
                        )
                    );
                }
                let gid = port
                    .gids
                    .iter()
                    .find(|g| g.index == found.gid_index as u32)
                    .unwrap_or_else(|| panic!("GID {} of {port:?}", found.gid_index));
                assert_eq!(
                    stackroute_rdma_discover::parse_gid(&gid.gid),
                    Some(found.gid)
                );
                // The provider ABI's probe answers the same GID.
                let (mut raw, mut qpn, mut psn) = ([0u8; 16], 1u32, 1u32);
                // SAFETY: 16 writable bytes and two writable u32s, as the ABI requires.
                let code = unsafe {
                    stackroute_rdma::stackroute_rdma_probe(
                        raw.as_mut_ptr(),
                        &raw mut qpn,
                        &raw mut psn,
                    )
                };
                assert_eq!((code, raw), (0, found.gid));
            },
        ),
        Trial::gated(
            "two_queue_pairs_on_the_device_carry_a_stream_both_ways",
            device,
            |found| {
                let config = Config {
                    window: 16,
                    buffer: 64 * 1024,
                    send_queue: 256 * 1024,
                };
                let a = Prepared::new(&found, config).expect("queue pair a");
                let b = Prepared::new(&found, config).expect("queue pair b");
                let (a_local, b_local) = (a.local(), b.local());
                assert_ne!(a_local.qpn, b_local.qpn);
                let a = a.connect(&b_local).expect("a connects to b");
                let b = b.connect(&a_local).expect("b connects to a");

                let (app_a, relayed_a) = UnixStream::pair().unwrap();
                let (app_b, relayed_b) = UnixStream::pair().unwrap();
                // The relays report their ends here: a stuck one fails the trial, not hangs it.
                let (ends, relay_ended) = mpsc::channel();
                for (name, relayed, qp) in [("a", relayed_a, a), ("b", relayed_b, b)] {
                    let ends = ends.clone();
                    thread::spawn(move || {
                        let _ = ends.send((name, Relay::new(relayed, qp, config).run()));
                    });
                }
                let (a_to_b, b_to_a) = (pattern(1, STREAM_BYTES), pattern(7, STREAM_BYTES));
                let at_a = drive_application(app_a, a_to_b.clone());
                let at_b = drive_application(app_b, b_to_a.clone());
                let (read_at_a, read_at_b) = (at_a.join().unwrap(), at_b.join().unwrap());
                // The relays' ends first: if one failed, that says why the bytes did not arrive.
                for _ in 0..2 {
                    let (name, end) = relay_ended
                        .recv_timeout(Duration::from_secs(30))
                        .expect("a relay did not end");
                    assert_eq!(end, End::Closed, "relay {name}");
                }
                let (read_at_a, read_at_b) = (read_at_a.unwrap(), read_at_b.unwrap());
                assert_eq!(read_at_b.len(), STREAM_BYTES);
                assert!(read_at_b == a_to_b, "a → b: the bytes differ");
                assert_eq!(read_at_a.len(), STREAM_BYTES);
                assert!(read_at_a == b_to_a, "b → a: the bytes differ");
            },
        ),
    ])
}
