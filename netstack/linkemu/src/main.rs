//! `stackroute-linkemu`: forwards Ethernet frames between two interfaces (AF_PACKET) through a
//! [`LinkModel`] per direction. Run it in a namespace between the two endpoints:
//!
//! ```text
//! stackroute-linkemu --left vL --right vR --delay-ms 15 --rate-mbit 100 --loss 0.05
//! ```
//!
//! `--loss`/`--reorder` apply to frames going left → right (the data path when the sender is
//! on the left); `--reverse-loss` applies right → left.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use stackroute_linkemu::{Impairments, LinkModel, complete_checksum};
use stackroute_netstack::{Device, RxMeta};
use stackroute_pktio::{AfPacket, RingConfig};

#[derive(Parser, Debug)]
#[command(name = "stackroute-linkemu", version)]
struct Args {
    /// Left interface.
    #[arg(long)]
    left: String,
    /// Right interface.
    #[arg(long)]
    right: String,
    /// One-way delay in milliseconds (each direction).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Bottleneck rate in Mbit/s (each direction; 0 = unlimited).
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// Bottleneck queue in bytes (default: one BDP at the given rate and RTT, at least 64 KiB).
    #[arg(long)]
    queue_bytes: Option<u64>,
    /// Random loss probability, left → right.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Random loss probability, right → left.
    #[arg(long, default_value_t = 0.0)]
    reverse_loss: f64,
    /// Reordering probability, left → right.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Extra delay of reordered frames, in milliseconds.
    #[arg(long, default_value_t = 1.0)]
    reorder_ms: f64,
    /// PRNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Stop after this many seconds (0: run until killed).
    #[arg(long, default_value_t = 0)]
    duration: u64,
}

fn forward(link: &mut LinkModel, now_us: u64, frame: &[u8], meta: RxMeta) {
    if meta.checksum_trusted {
        let mut fixed = frame.to_vec();
        complete_checksum(&mut fixed);
        link.offer(now_us, &fixed);
    } else {
        link.offer(now_us, frame);
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rate_bps = (args.rate_mbit * 1e6) as u64;
    let delay = Duration::from_secs_f64(args.delay_ms / 1000.0);
    let bdp = (rate_bps as f64 / 8.0 * delay.as_secs_f64() * 2.0) as u64;
    let queue_bytes = args.queue_bytes.unwrap_or(bdp.max(64 * 1024));
    let forward_path = Impairments {
        delay,
        rate_bps,
        queue_bytes,
        loss: args.loss,
        reorder: args.reorder,
        reorder_delay: Duration::from_secs_f64(args.reorder_ms / 1000.0),
    };
    let reverse = Impairments {
        loss: args.reverse_loss,
        reorder: 0.0,
        ..forward_path
    };
    let mut left = AfPacket::open(&args.left, RingConfig::default())
        .with_context(|| format!("opening {}", args.left))?;
    let mut right = AfPacket::open(&args.right, RingConfig::default())
        .with_context(|| format!("opening {}", args.right))?;
    let mut to_right = LinkModel::new(forward_path, args.seed);
    let mut to_left = LinkModel::new(reverse, args.seed.wrapping_add(1));
    let epoch = Instant::now();
    let now_us = || epoch.elapsed().as_micros() as u64;
    let stop = (args.duration > 0).then(|| epoch + Duration::from_secs(args.duration));
    eprintln!(
        "linkemu: {} <-> {} forward {forward_path:?}",
        args.left, args.right
    );
    loop {
        if stop.is_some_and(|s| Instant::now() >= s) {
            break;
        }
        let mut busy = false;
        for _ in 0..256 {
            // Read the clock once a frame is there: a stall between a clock read and the ring
            // read would otherwise shorten the emulated delay of every frame that waited.
            let got = left.receive(|frame, meta| forward(&mut to_right, now_us(), frame, meta));
            let got2 = right.receive(|frame, meta| forward(&mut to_left, now_us(), frame, meta));
            if got.is_none() && got2.is_none() {
                break;
            }
            busy = true;
        }
        let t = now_us();
        while let Some(frame) = to_right.take_due(t) {
            busy = true;
            let _ = right.transmit(frame.len(), |buf| {
                buf[..frame.len()].copy_from_slice(&frame);
                frame.len()
            });
        }
        while let Some(frame) = to_left.take_due(t) {
            busy = true;
            let _ = left.transmit(frame.len(), |buf| {
                buf[..frame.len()].copy_from_slice(&frame);
                frame.len()
            });
        }
        left.flush();
        right.flush();
        if !busy {
            let next = [to_right.next_due(), to_left.next_due()]
                .into_iter()
                .flatten()
                .min();
            let wait = next.map_or(Duration::from_millis(20), |due| {
                Duration::from_micros(due.saturating_sub(now_us()))
            });
            if !wait.is_zero() {
                let fds = [left.raw_fd(), right.raw_fd()];
                let _ = stackroute_pktio::wait_any_readable(
                    &fds,
                    Some(wait.min(Duration::from_millis(20))),
                );
            }
        }
    }
    eprintln!(
        "linkemu: forward {:?} reverse {:?}",
        to_right.counters(),
        to_left.counters()
    );
    Ok(())
}
