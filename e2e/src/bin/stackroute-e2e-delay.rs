//! Delays every packet routed through a TUN device by a fixed time, then sends it back into
//! the kernel (which routes it on by policy routing: see `cluster.rs`). This kernel has no
//! `netem`; the e2e topology uses this to give its internet path a wide-area round-trip time.
//! Order is kept (a fixed delay); nothing is dropped or reordered here.

use std::io::{Read as _, Write as _};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// The TUN device (created beforehand with `ip tuntap add DEV mode tun`).
    #[arg(long)]
    dev: String,
    /// One-way delay added to every packet, in milliseconds.
    #[arg(long)]
    delay_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let delay = Duration::from_millis(args.delay_ms);
    let mut reader = stackroute_e2e::tun::open(&args.dev).with_context(|| args.dev.clone())?;
    let mut writer = reader.try_clone()?;
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        for (due, packet) in rx {
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            // A packet the kernel refuses (e.g. no route) is simply lost, as on a real path.
            let _ = writer.write(&packet);
        }
    });
    let mut buf = vec![0u8; 65536];
    loop {
        let n = reader.read(&mut buf).context("read")?;
        if tx
            .send((Instant::now() + delay, buf[..n].to_vec()))
            .is_err()
        {
            return Ok(());
        }
    }
}
