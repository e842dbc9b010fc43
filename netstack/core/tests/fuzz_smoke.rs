//! Runs the fuzz entry points on pseudo-random and mutated inputs under stable `cargo test`
//! (cargo-fuzz itself needs a nightly toolchain; see `netstack/fuzz`).

use stackroute_netstack::fuzzing::{feed_frame, run_operations};
use stackroute_netstack::sim::SimRng;

/// A SYN with options (the same frame as the stack's byte-literal tests), as a mutation seed.
const SEED_TCP: [u8; 40] = [
    0x9c, 0x40, 0x00, 0x50, 0x01, 0x02, 0x03, 0x04, 0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0,
    0x00, 0x00, 0x00, 0x00, 0x02, 0x04, 0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x00, 0x00, 0x64,
    0x00, 0x00, 0x00, 0x00, 0x01, 0x03, 0x03, 0x07,
];

#[test]
fn frames_never_panic() {
    let mut rng = SimRng::new(0xf022);
    for i in 0..3000 {
        let mut input = SEED_TCP.to_vec();
        if i % 3 == 0 {
            let len = (rng.next_u64() % 120) as usize;
            input = (0..len).map(|_| rng.next_u64() as u8).collect();
        } else {
            for _ in 0..1 + rng.next_u64() % 6 {
                let at = (rng.next_u64() as usize) % input.len();
                input[at] = rng.next_u64() as u8;
            }
            if rng.chance(0.3) {
                input.extend((0..rng.next_u64() % 200).map(|_| rng.next_u64() as u8));
            }
        }
        feed_frame(&input);
    }
}

#[test]
fn operation_sequences_keep_streams_intact() {
    let mut rng = SimRng::new(0x0b5);
    for _ in 0..150 {
        let len = 2 + (rng.next_u64() % 120) as usize;
        let ops: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        run_operations(&ops);
    }
}
