//! Packet-level tests: byte literals in, parsed frames out.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetFrame, IpAddress, Ipv4Packet, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    TcpTimestampRepr,
};

use super::*;
use crate::sim::SimDevice;

const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// SYN from 10.0.0.2:40000 to 10.0.0.1:80, seq 0x01020304, window 64240, options
/// MSS 1460, SACK-permitted, timestamps (100, 0), NOP, window scale 7. Checksums are valid.
const SYN_FRAME: [u8; 74] = [
    0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, //
    0x45, 0x00, 0x00, 0x3c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x14, 0x86, 0x0a, 0x00, //
    0x00, 0x02, 0x0a, 0x00, 0x00, 0x01, 0x9c, 0x40, 0x00, 0x50, 0x01, 0x02, 0x03, 0x04, //
    0x00, 0x00, 0x00, 0x00, 0xa0, 0x02, 0xfa, 0xf0, 0x98, 0x12, 0x00, 0x00, 0x02, 0x04, //
    0x05, 0xb4, 0x04, 0x02, 0x08, 0x0a, 0x00, 0x00, 0x00, 0x64, 0x00, 0x00, 0x00, 0x00, //
    0x01, 0x03, 0x03, 0x07,
];

/// ARP request: who has 10.0.0.1? tell 10.0.0.2.
const ARP_REQUEST: [u8; 42] = [
    0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x06, //
    0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, //
    0x0a, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x01,
];

fn stack() -> (Stack, SimDevice) {
    let mut stack = Stack::new(StackConfig::new(OUR_MAC, OUR_IP, 24, [9; 16]));
    stack.add_neighbor(PEER_IP, PEER_MAC);
    (stack, SimDevice::default())
}

fn feed(stack: &mut Stack, dev: &mut SimDevice, now: Instant, frame: &[u8]) -> Vec<Vec<u8>> {
    dev.rx.push_back(frame.to_vec());
    stack.poll(now, dev);
    std::mem::take(&mut dev.tx)
}

fn parse_tcp(frame: &[u8]) -> TcpRepr<'_> {
    let eth = EthernetFrame::new_checked(frame).unwrap();
    let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
    assert_eq!(eth.dst_addr().0, PEER_MAC);
    assert_eq!(ip.src_addr(), OUR_IP);
    assert_eq!(ip.dst_addr(), PEER_IP);
    assert!(ip.verify_checksum());
    let header_len = usize::from(ip.header_len());
    let total = usize::from(ip.total_len());
    let tcp = TcpPacket::new_checked(&frame[14 + header_len..14 + total]).unwrap();
    TcpRepr::parse(
        &tcp,
        &IpAddress::Ipv4(OUR_IP),
        &IpAddress::Ipv4(PEER_IP),
        &ChecksumCapabilities::default(),
    )
    .unwrap()
}

fn peer_segment(repr: &TcpRepr<'_>) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 20 + repr.buffer_len()];
    let len = emit_tcp_frame(
        &mut frame,
        PEER_MAC,
        OUR_MAC,
        PEER_IP.into(),
        OUR_IP.into(),
        repr,
        TxChecksum::Full,
    );
    frame.truncate(len);
    frame
}

fn bare(seq: u32, ack: Option<u32>, control: TcpControl) -> TcpRepr<'static> {
    TcpRepr {
        src_port: 40000,
        dst_port: 80,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: 1000,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    }
}

#[test]
fn syn_literal_gets_syn_ack_with_negotiated_options() {
    let (mut stack, mut dev) = stack();
    stack.listen(80, 4).unwrap();
    let out = feed(&mut stack, &mut dev, Instant::from_millis(5), &SYN_FRAME);
    assert_eq!(out.len(), 1);
    let frame = &out[0];
    assert_eq!(
        &frame[0..14],
        &[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00]
    );
    assert_eq!(frame[14 + 9], 6, "IP protocol is TCP");
    assert_eq!(frame[14 + 20 + 13], 0x12, "flags SYN|ACK");
    let syn_ack = parse_tcp(frame);
    assert_eq!(syn_ack.control, TcpControl::Syn);
    assert_eq!((syn_ack.src_port, syn_ack.dst_port), (80, 40000));
    assert_eq!(syn_ack.ack_number, Some(TcpSeqNumber(0x0102_0305)));
    assert_eq!(syn_ack.max_seg_size, Some(1460));
    assert_eq!(syn_ack.window_scale, Some(7), "4 MiB buffer needs shift 7");
    assert!(syn_ack.sack_permitted);
    assert_eq!(syn_ack.timestamp.map(|t| t.tsecr), Some(100));
}

/// What a NIC with TCP checksum offload does: sums the segment as it is, the pseudo-header sum
/// the stack left in the checksum field included, and stores the complement.
fn complete_offloaded_tcp_checksum(segment: &mut [u8]) {
    let mut sum: u32 = segment
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    segment[16..18].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

#[test]
fn tx_checksum_offload_leaves_the_pseudo_header_sum() {
    let (mut offloading, mut dev) = stack();
    dev.tx_checksum_offload = true;
    offloading.listen(80, 4).unwrap();
    // A SYN-ACK from a connection and a RST from the stack's control path.
    let mut out = feed(
        &mut offloading,
        &mut dev,
        Instant::from_millis(5),
        &SYN_FRAME,
    );
    let mut closed = SYN_FRAME;
    closed[36..38].copy_from_slice(&81u16.to_be_bytes()); // destination port 81: nobody listens
    let ip = Ipv4Packet::new_unchecked(&closed[14..]);
    let tcp_len = usize::from(ip.total_len()) - 20;
    let mut tcp = TcpPacket::new_unchecked(&mut closed[34..34 + tcp_len]);
    tcp.fill_checksum(&IpAddress::Ipv4(PEER_IP), &IpAddress::Ipv4(OUR_IP));
    out.extend(feed(
        &mut offloading,
        &mut dev,
        Instant::from_millis(6),
        &closed,
    ));
    assert_eq!(out.len(), 2);
    for mut frame in out {
        let tcp_len = frame.len() - 34;
        assert_eq!(
            &frame[24..26],
            &[0, 0],
            "IPv4 header checksum left to the engine"
        );
        let pseudo = pseudo_header_sum(OUR_IP.into(), PEER_IP.into(), tcp_len);
        assert_eq!(
            frame[50..52],
            pseudo.to_be_bytes(),
            "TCP field holds the pseudo sum"
        );
        // Completed as hardware does, both checksums verify.
        Ipv4Packet::new_unchecked(&mut frame[14..]).fill_checksum();
        complete_offloaded_tcp_checksum(&mut frame[34..]);
        parse_tcp(&frame);
        let tcp = TcpPacket::new_checked(&frame[34..]).unwrap();
        assert!(tcp.verify_checksum(&IpAddress::Ipv4(OUR_IP), &IpAddress::Ipv4(PEER_IP)));
    }
    // Without the capability the stack finishes them itself (what `parse_tcp` checks).
    let (mut plain, mut dev) = stack();
    plain.listen(80, 4).unwrap();
    let out = feed(&mut plain, &mut dev, Instant::from_millis(5), &SYN_FRAME);
    parse_tcp(&out[0]);
    let tcp = TcpPacket::new_checked(&out[0][34..]).unwrap();
    assert!(tcp.verify_checksum(&IpAddress::Ipv4(OUR_IP), &IpAddress::Ipv4(PEER_IP)));
}

#[test]
fn corrupted_checksum_is_dropped_silently() {
    let (mut stack, mut dev) = stack();
    stack.listen(80, 4).unwrap();
    let mut frame = SYN_FRAME;
    frame[73] ^= 0x01; // last option byte: TCP checksum no longer matches
    let out = feed(&mut stack, &mut dev, Instant::ZERO, &frame);
    assert!(out.is_empty());
    assert_eq!(stack.stats().rx_dropped, 1);
}

#[test]
fn syn_to_closed_port_gets_rst_ack() {
    let (mut stack, mut dev) = stack();
    let out = feed(&mut stack, &mut dev, Instant::ZERO, &SYN_FRAME);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0][14 + 20 + 13], 0x14, "flags RST|ACK");
    let rst = parse_tcp(&out[0]);
    assert_eq!(rst.control, TcpControl::Rst);
    assert_eq!(rst.seq_number, TcpSeqNumber(0));
    assert_eq!(rst.ack_number, Some(TcpSeqNumber(0x0102_0305)));
    // A RST never answers a RST.
    let reset = peer_segment(&bare(5, None, TcpControl::Rst));
    assert!(feed(&mut stack, &mut dev, Instant::ZERO, &reset).is_empty());
}

#[test]
fn arp_request_literal_gets_reply() {
    let (mut stack, mut dev) = stack();
    let out = feed(&mut stack, &mut dev, Instant::ZERO, &ARP_REQUEST);
    assert_eq!(out.len(), 1);
    let expected: [u8; 42] = [
        0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, //
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x02, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, //
        0x0a, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x0a, 0x00, 0x00, 0x02,
    ];
    assert_eq!(out[0], expected);
}

#[test]
fn every_truncation_of_valid_frames_is_dropped_without_panic() {
    let (mut stack, mut dev) = stack();
    stack.listen(80, 4).unwrap();
    for frame in [&SYN_FRAME[..], &ARP_REQUEST[..]] {
        for len in 0..frame.len() {
            let _ = feed(&mut stack, &mut dev, Instant::ZERO, &frame[..len]);
        }
    }
    assert_eq!(
        stack.stats().rx_frames,
        (SYN_FRAME.len() + ARP_REQUEST.len()) as u64
    );
}

/// Completes a handshake with the listener on port 80; returns (stack, device, server handle,
/// our ISS + 1).
fn established() -> (Stack, SimDevice, SocketHandle, u32) {
    let (mut stack, mut dev) = stack();
    let listener = stack.listen(80, 4).unwrap();
    let mut syn = bare(1000, None, TcpControl::Syn);
    syn.max_seg_size = Some(1460);
    let out = feed(&mut stack, &mut dev, Instant::ZERO, &peer_segment(&syn));
    let syn_ack = parse_tcp(&out[0]);
    let iss = syn_ack.seq_number.0 as u32;
    let ack = bare(1001, Some(iss.wrapping_add(1)), TcpControl::None);
    assert!(
        feed(
            &mut stack,
            &mut dev,
            Instant::from_millis(1),
            &peer_segment(&ack)
        )
        .is_empty()
    );
    let server = stack.accept(listener).unwrap();
    assert_eq!(stack.state(server), Ok(State::Established));
    (stack, dev, server, iss.wrapping_add(1))
}

#[test]
fn in_window_rst_gets_challenge_ack_and_exact_rst_resets() {
    let (mut stack, mut dev, server, our_next) = established();
    // RFC 5961 §3.2: in the window but not at RCV.NXT.
    let blind = peer_segment(&bare(1001 + 500, None, TcpControl::Rst));
    let out = feed(&mut stack, &mut dev, Instant::from_millis(2), &blind);
    assert_eq!(out.len(), 1, "challenge ACK");
    let challenge = parse_tcp(&out[0]);
    assert_eq!(challenge.control, TcpControl::None);
    assert_eq!(challenge.ack_number, Some(TcpSeqNumber(1001)));
    assert_eq!(challenge.seq_number, TcpSeqNumber(our_next as i32));
    assert_eq!(stack.state(server), Ok(State::Established));
    // Exactly at RCV.NXT: the connection is reset.
    let exact = peer_segment(&bare(1001, None, TcpControl::Rst));
    assert!(feed(&mut stack, &mut dev, Instant::from_millis(3), &exact).is_empty());
    assert_eq!(stack.error(server), Ok(Some(TcpError::Reset)));
    let events: Vec<_> = std::iter::from_fn(|| stack.poll_event()).collect();
    assert!(events.contains(&Event {
        handle: server,
        kind: EventKind::Error(TcpError::Reset)
    }));
}

#[test]
fn syn_in_synchronized_state_gets_challenge_ack() {
    let (mut stack, mut dev, server, _) = established();
    let out = feed(
        &mut stack,
        &mut dev,
        Instant::from_millis(2),
        &peer_segment(&bare(77, None, TcpControl::Syn)),
    );
    assert_eq!(out.len(), 1);
    assert_eq!(parse_tcp(&out[0]).control, TcpControl::None);
    assert_eq!(stack.state(server), Ok(State::Established));
}

#[test]
fn out_of_order_data_is_acked_at_once_with_sack_and_reassembled() {
    let (mut stack, mut dev) = stack();
    let listener = stack.listen(80, 4).unwrap();
    let mut syn = bare(1000, None, TcpControl::Syn);
    syn.sack_permitted = true;
    syn.timestamp = Some(TcpTimestampRepr::new(1, 0));
    let out = feed(&mut stack, &mut dev, Instant::ZERO, &peer_segment(&syn));
    let iss1 = (parse_tcp(&out[0]).seq_number.0 as u32).wrapping_add(1);
    let mut ack = bare(1001, Some(iss1), TcpControl::None);
    ack.timestamp = Some(TcpTimestampRepr::new(2, 0));
    feed(
        &mut stack,
        &mut dev,
        Instant::from_millis(1),
        &peer_segment(&ack),
    );
    let server = stack.accept(listener).unwrap();

    let mut later = bare(1011, Some(iss1), TcpControl::None);
    later.payload = b"klmnopqrst";
    later.timestamp = Some(TcpTimestampRepr::new(3, 0));
    let out = feed(
        &mut stack,
        &mut dev,
        Instant::from_millis(2),
        &peer_segment(&later),
    );
    assert_eq!(
        out.len(),
        1,
        "out-of-order data is acknowledged immediately"
    );
    let dup_ack = parse_tcp(&out[0]);
    assert_eq!(dup_ack.ack_number, Some(TcpSeqNumber(1001)));
    assert_eq!(dup_ack.sack_ranges[0], Some((1011, 1021)));
    // The same out-of-order segment again: a DSACK for it, then the block that holds it.
    let out = feed(
        &mut stack,
        &mut dev,
        Instant::from_millis(2),
        &peer_segment(&later),
    );
    let dup_ack = parse_tcp(&out[0]);
    assert_eq!(dup_ack.sack_ranges[0], Some((1011, 1021)), "DSACK block");
    assert_eq!(
        dup_ack.sack_ranges[1],
        Some((1011, 1021)),
        "containing block"
    );
    let mut buf = [0u8; 64];
    assert_eq!(stack.recv(server, &mut buf), Err(SocketError::WouldBlock));

    let mut first = bare(1001, Some(iss1), TcpControl::None);
    first.payload = b"abcdefghij";
    first.timestamp = Some(TcpTimestampRepr::new(4, 0));
    let out = feed(
        &mut stack,
        &mut dev,
        Instant::from_millis(3),
        &peer_segment(&first),
    );
    assert_eq!(parse_tcp(&out[0]).ack_number, Some(TcpSeqNumber(1021)));
    assert_eq!(parse_tcp(&out[0]).sack_ranges[0], None);
    assert_eq!(stack.recv(server, &mut buf), Ok(20));
    assert_eq!(&buf[..20], b"abcdefghijklmnopqrst");

    // PAWS (RFC 7323): a segment with an older timestamp is dropped and re-acknowledged.
    let mut stale = bare(1021, Some(iss1), TcpControl::None);
    stale.payload = b"old";
    stale.timestamp = Some(TcpTimestampRepr::new(1, 0));
    let out = feed(
        &mut stack,
        &mut dev,
        Instant::from_millis(4),
        &peer_segment(&stale),
    );
    assert_eq!(parse_tcp(&out[0]).ack_number, Some(TcpSeqNumber(1021)));
    assert_eq!(stack.recv(server, &mut buf), Err(SocketError::WouldBlock));

    // RFC 2883: a retransmission of data already delivered is reported as a DSACK, the first
    // SACK block, below the cumulative ACK.
    let mut again = bare(1011, Some(iss1), TcpControl::None);
    again.payload = b"klmnopqrst";
    again.timestamp = Some(TcpTimestampRepr::new(5, 0));
    let out = feed(
        &mut stack,
        &mut dev,
        Instant::from_millis(5),
        &peer_segment(&again),
    );
    let ack = parse_tcp(&out[0]);
    assert_eq!(ack.ack_number, Some(TcpSeqNumber(1021)));
    assert_eq!(ack.sack_ranges[0], Some((1011, 1021)), "DSACK block");
    assert_eq!(ack.sack_ranges[1], None);
}

/// A device that hands one frame over with the given metadata.
struct MetaDevice {
    frame: Option<Vec<u8>>,
    meta: RxMeta,
    sent: Vec<Vec<u8>>,
}

impl Device for MetaDevice {
    fn capabilities(&self) -> crate::phy::DeviceCapabilities {
        crate::phy::DeviceCapabilities::default()
    }
    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        let frame = self.frame.take()?;
        Some(f(&frame, self.meta))
    }
    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        let mut buf = vec![0u8; max_len];
        let len = f(&mut buf);
        if len > 0 {
            buf.truncate(len);
            self.sent.push(buf);
        }
        Some(len)
    }
}

#[test]
fn offload_partial_checksum_is_accepted_only_when_the_engine_says_it_can_occur() {
    // SYN_FRAME with its TCP checksum replaced by the folded pseudo-header sum, as a local
    // sender with checksum offload leaves it (10.0.0.2 → 10.0.0.1, TCP, 40 bytes).
    let partial: u32 = 0x0a00 + 0x0002 + 0x0a00 + 0x0001 + 6 + 40;
    let mut frame = SYN_FRAME;
    frame[50..52].copy_from_slice(&(partial as u16).to_be_bytes());
    for possible in [false, true] {
        let (mut stack, _) = stack();
        stack.listen(80, 4).unwrap();
        assert_eq!(answers(&mut stack, &frame, possible), possible);
    }
}

/// Whether `stack` answers `frame` from an engine that may (or may not) deliver frames with
/// an unfinished offloaded checksum.
fn answers(stack: &mut Stack, frame: &[u8], partial_checksum_possible: bool) -> bool {
    let mut dev = MetaDevice {
        frame: Some(frame.to_vec()),
        meta: RxMeta {
            checksum_trusted: false,
            partial_checksum_possible,
            received_at: None,
        },
        sent: Vec::new(),
    };
    stack.poll(Instant::ZERO, &mut dev);
    !dev.sent.is_empty()
}

// --- IPv6 and NDP ---

const OUR_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const PEER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

/// Neighbour solicitation from fd00::2 (02:00:00:00:00:02): who has fd00::1? Sent to the
/// solicited-node group ff02::1:ff00:1 (33:33:ff:00:00:01), hop limit 255, with the sender's
/// link-layer address option. The ICMPv6 checksum is valid.
const NEIGHBOR_SOLICIT: [u8; 86] = [
    0x33, 0x33, 0xff, 0x00, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x02, 0x86, 0xdd, //
    0x60, 0x00, 0x00, 0x00, 0x00, 0x20, 0x3a, 0xff, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0xff, 0x02, 0x00, 0x00, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0xff, 0x00, 0x00, 0x01, 0x87, 0x00, //
    0x7d, 0x97, 0x00, 0x00, 0x00, 0x00, 0xfd, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, //
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x01, 0x01, 0x02, 0x00, 0x00, 0x00, //
    0x00, 0x02,
];

/// A segment from the peer's IPv6 address to ours.
fn peer_segment6(repr: &TcpRepr<'_>) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 40 + repr.buffer_len()];
    let len = emit_tcp_frame(
        &mut frame,
        PEER_MAC,
        OUR_MAC,
        PEER_IP6.into(),
        OUR_IP6.into(),
        repr,
        TxChecksum::Full,
    );
    frame.truncate(len);
    frame
}

fn dual_stack() -> (Stack, SimDevice) {
    let mut config = StackConfig::new(OUR_MAC, OUR_IP, 24, [9; 16]);
    config.ipv6 = Some(Ipv6Config::new(OUR_IP6, 64));
    (Stack::new(config), SimDevice::default())
}

#[test]
fn neighbor_solicitation_literal_gets_a_solicited_advertisement() {
    let (mut stack, mut dev) = dual_stack();
    let out = feed(
        &mut stack,
        &mut dev,
        Instant::from_millis(1),
        &NEIGHBOR_SOLICIT,
    );
    assert_eq!(out.len(), 1, "one neighbour advertisement");
    let frame = &out[0];
    // Unicast back to the solicitor's link-layer address, IPv6, ICMPv6 with hop limit 255.
    assert_eq!(
        &frame[0..14],
        &[2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd]
    );
    let ip = Ipv6Packet::new_checked(&frame[14..]).unwrap();
    let ip_repr = Ipv6Repr::parse(&ip).unwrap();
    assert_eq!(
        (ip_repr.src_addr, ip_repr.dst_addr, ip_repr.hop_limit),
        (OUR_IP6, PEER_IP6, 255)
    );
    let icmp = Icmpv6Packet::new_checked(ip.payload()).unwrap();
    let repr = Icmpv6Repr::parse(&OUR_IP6, &PEER_IP6, &icmp, &ChecksumCapabilities::default())
        .expect("valid ICMPv6 checksum");
    let Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags,
        target_addr,
        lladdr,
    }) = repr
    else {
        panic!("not a neighbour advertisement: {repr:?}");
    };
    assert_eq!(target_addr, OUR_IP6);
    assert_eq!(
        flags,
        NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE
    );
    assert_eq!(ethernet_lladdr(lladdr), Some(EthernetAddress(OUR_MAC)));
    // The solicitor was learned: a connection to it needs no solicitation of its own.
    let now = Instant::from_millis(2);
    stack
        .connect(now, SocketAddr::new(PEER_IP6.into(), 80))
        .unwrap();
    stack.poll(now, &mut dev);
    let syn = std::mem::take(&mut dev.tx);
    assert_eq!(syn.len(), 1);
    assert_eq!(
        &syn[0][0..6],
        &PEER_MAC,
        "SYN sent straight to the learned MAC"
    );
    assert_eq!(&syn[0][12..14], &[0x86, 0xdd]);
}

#[test]
fn neighbor_solicitations_not_for_us_or_from_off_link_are_ignored() {
    let mut off_link = NEIGHBOR_SOLICIT;
    off_link[21] = 64; // hop limit: a router forwarded it (RFC 4861 §7.1.1)
    let mut other_target = NEIGHBOR_SOLICIT;
    other_target[14 + 40 + 8 + 15] = 0x09; // target fd00::9 (checksum now wrong as well)
    let (mut dual, mut dev) = dual_stack();
    for frame in [&off_link[..], &other_target[..], &NEIGHBOR_SOLICIT[..70]] {
        assert!(feed(&mut dual, &mut dev, Instant::from_millis(1), frame).is_empty());
    }
    assert_eq!(dual.stats().rx_dropped, 3);
    // Without IPv6 configured, even the valid one is dropped.
    let (mut v4_only, mut dev) = stack();
    assert!(
        feed(
            &mut v4_only,
            &mut dev,
            Instant::from_millis(1),
            &NEIGHBOR_SOLICIT
        )
        .is_empty()
    );
}

#[test]
fn ipv6_syn_gets_syn_ack_and_connect_solicits_the_neighbor() {
    let (mut dual, mut dev) = dual_stack();
    dual.listen(80, 4).unwrap();
    dual.add_neighbor(PEER_IP6, PEER_MAC);
    let mut syn = bare(7, None, TcpControl::Syn);
    syn.max_seg_size = Some(1440);
    let frame = peer_segment6(&syn);
    let out = feed(&mut dual, &mut dev, Instant::from_millis(1), &frame);
    assert_eq!(out.len(), 1);
    let ip = Ipv6Packet::new_checked(&out[0][14..]).unwrap();
    assert_eq!(ip.next_header(), IpProtocol::Tcp);
    let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
    let syn_ack = TcpRepr::parse(
        &tcp,
        &IpAddress::Ipv6(OUR_IP6),
        &IpAddress::Ipv6(PEER_IP6),
        &ChecksumCapabilities::default(),
    )
    .expect("valid TCP checksum over the IPv6 pseudo-header");
    assert_eq!(syn_ack.control, TcpControl::Syn);
    assert_eq!(syn_ack.ack_number, Some(TcpSeqNumber(8)));
    assert_eq!(
        syn_ack.max_seg_size,
        Some(1440),
        "1500 − 60 bytes of headers"
    );

    // Connecting to an unknown neighbour sends a solicitation to its solicited-node group.
    let (mut dual, mut dev) = dual_stack();
    let stranger = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x12, 0x3456);
    dual.connect(
        Instant::from_millis(1),
        SocketAddr::new(stranger.into(), 80),
    )
    .unwrap();
    dual.poll(Instant::from_millis(1), &mut dev);
    let out = std::mem::take(&mut dev.tx);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0][0..6], &[0x33, 0x33, 0xff, 0x12, 0x34, 0x56]);
    let ip = Ipv6Repr::parse(&Ipv6Packet::new_checked(&out[0][14..]).unwrap()).unwrap();
    assert_eq!(ip.dst_addr, solicited_node(stranger));
    assert_eq!((ip.src_addr, ip.hop_limit), (OUR_IP6, 255));

    // No IPv6 address: an IPv6 destination is refused up front.
    let (mut v4_only, _) = stack();
    assert_eq!(
        v4_only.connect(Instant::ZERO, SocketAddr::new(stranger.into(), 80)),
        Err(SocketError::NoSourceAddress)
    );
}

#[test]
fn link_local_address_is_modified_eui64() {
    assert_eq!(
        link_local_address([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
        "fe80::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
    );
    assert_eq!(
        solicited_node("2001:db8::1:2:3".parse().unwrap()),
        "ff02::1:ff02:3".parse::<Ipv6Addr>().unwrap()
    );
}

#[test]
fn ipv6_offload_partial_checksum_is_accepted_when_the_engine_says_it_can_occur() {
    let syn = bare(7, None, TcpControl::Syn);
    let mut frame = peer_segment6(&syn);
    // fd00::2 → fd00::1, next header TCP, 20 bytes: the folded pseudo-header sum.
    let partial: u32 = 0xfd00 + 0x0002 + 0xfd00 + 0x0001 + 6 + 20;
    let folded = (partial & 0xffff) + (partial >> 16);
    frame[14 + 40 + 16..14 + 40 + 18].copy_from_slice(&(folded as u16).to_be_bytes());
    for possible in [false, true] {
        let (mut dual, _) = dual_stack();
        dual.add_neighbor(PEER_IP6, PEER_MAC);
        dual.listen(80, 4).unwrap();
        assert_eq!(answers(&mut dual, &frame, possible), possible);
    }
}
