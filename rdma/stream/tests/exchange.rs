//! Two ends of the stream against each other over an in-order fabric (RC queue pairs deliver
//! in order and never lose a message), on random schedules of writes, reads, posts and
//! deliveries: every byte arrives once and in order, no end ever receives a message without a
//! posted buffer, the FINs arrive after the data, and once the applications keep reading the
//! exchange always finishes (no credit deadlock), for windows of 4 to 16 buffers.

use std::collections::VecDeque;

use proptest::prelude::*;
use stackroute_rdma_stream::{Config, Message, Read, Stream};

/// One end: the stream, what its application still has to write, what it read.
struct End {
    stream: Stream,
    to_write: VecDeque<u8>,
    read: Vec<u8>,
    eof: bool,
    shut: bool,
}

impl End {
    fn new(config: Config, data: Vec<u8>) -> Self {
        Self {
            stream: Stream::new(config),
            to_write: data.into(),
            read: Vec::new(),
            eof: false,
            shut: false,
        }
    }

    fn write(&mut self, at_most: usize) {
        let n = at_most.min(self.to_write.len());
        let chunk: Vec<u8> = self.to_write.iter().take(n).copied().collect();
        let taken = self.stream.write(&chunk);
        self.to_write.drain(..taken);
        if self.to_write.is_empty() && !self.shut {
            self.stream.shutdown_write();
            self.shut = true;
        }
    }

    fn read(&mut self, at_most: usize) {
        let mut buffer = vec![0u8; at_most.max(1)];
        match self.stream.read(&mut buffer) {
            Read::Data(n) => self.read.extend_from_slice(&buffer[..n]),
            Read::Eof => self.eof = true,
            Read::WouldBlock => {}
            Read::Failed => panic!("the stream failed"),
        }
    }

    fn post(&mut self, wire: &mut VecDeque<Message>) {
        if let Some(message) = self.stream.poll_transmit() {
            // The fabric carries the immediate data and the payload, nothing else.
            let immediate = message.immediate();
            wire.push_back(Message::from_immediate(immediate, message.payload).unwrap());
        }
    }
}

fn deliver(wire: &mut VecDeque<Message>, to: &mut End) {
    if let Some(message) = wire.pop_front() {
        to.stream
            .on_message(message)
            .unwrap_or_else(|e| panic!("protocol error: {e:?}"));
    }
}

#[derive(Clone, Debug)]
enum Step {
    Write(bool, usize),
    Read(bool, usize),
    Post(bool),
    Deliver(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (any::<bool>(), 1usize..64).prop_map(|(a, n)| Step::Write(a, n)),
        (any::<bool>(), 1usize..64).prop_map(|(a, n)| Step::Read(a, n)),
        any::<bool>().prop_map(Step::Post),
        any::<bool>().prop_map(Step::Deliver),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn every_byte_arrives_in_order_without_deadlock(
        window in 4u32..=16,
        buffer in 1usize..=32,
        send_queue in 1usize..=96,
        a_data in proptest::collection::vec(any::<u8>(), 0..600),
        b_data in proptest::collection::vec(any::<u8>(), 0..600),
        steps in proptest::collection::vec(step(), 0..400),
    ) {
        let config = Config { window, buffer, send_queue };
        prop_assert!(config.check().is_ok());
        let mut a = End::new(config, a_data.clone());
        let mut b = End::new(config, b_data.clone());
        let (mut a_to_b, mut b_to_a) = (VecDeque::new(), VecDeque::new());
        // A random schedule: the applications may stall, the fabric may lag.
        for step in steps {
            match step {
                Step::Write(true, n) => a.write(n),
                Step::Write(false, n) => b.write(n),
                Step::Read(true, n) => a.read(n),
                Step::Read(false, n) => b.read(n),
                Step::Post(true) => a.post(&mut a_to_b),
                Step::Post(false) => b.post(&mut b_to_a),
                Step::Deliver(true) => deliver(&mut a_to_b, &mut b),
                Step::Deliver(false) => deliver(&mut b_to_a, &mut a),
            }
        }
        // Then both applications write and read until done: it must finish.
        let mut rounds = 0;
        while !(a.eof && b.eof) {
            rounds += 1;
            prop_assert!(rounds < 100_000, "no progress: a credits {}, b credits {}, in flight {} / {}",
                a.stream.credits(), b.stream.credits(), a_to_b.len(), b_to_a.len());
            a.write(64);
            b.write(64);
            a.post(&mut a_to_b);
            b.post(&mut b_to_a);
            deliver(&mut a_to_b, &mut b);
            deliver(&mut b_to_a, &mut a);
            a.read(64);
            b.read(64);
        }
        prop_assert_eq!(&b.read, &a_data);
        prop_assert_eq!(&a.read, &b_data);
        prop_assert!(a.stream.flushed() && b.stream.flushed());
        prop_assert!(a_to_b.is_empty() || a_to_b.iter().all(|m| m.payload.is_empty()));
    }
}

/// A reader that stops reading stops the writer: credits run out, nothing is lost, and
/// reading again lets everything through.
#[test]
fn a_stalled_reader_holds_the_writer_back() {
    let config = Config {
        window: 4,
        buffer: 4,
        send_queue: 1024,
    };
    let mut a = End::new(config, vec![9; 100]);
    let mut b = End::new(config, Vec::new());
    let mut wire = VecDeque::new();
    a.write(100);
    for _ in 0..50 {
        a.post(&mut wire);
        deliver(&mut wire, &mut b);
    }
    // Three data messages (the fourth credit is kept for a CREDIT message) and no more.
    assert!(b.stream.readable());
    assert_eq!(a.stream.credits(), 1);
    let mut back = VecDeque::new();
    while !b.eof {
        b.read(64);
        b.post(&mut back);
        deliver(&mut back, &mut a);
        a.post(&mut wire);
        deliver(&mut wire, &mut b);
    }
    assert_eq!(b.read, vec![9; 100]);
}
