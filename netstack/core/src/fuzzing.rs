//! Entry points shared by the cargo-fuzz targets (`netstack/fuzz`) and the stable smoke test
//! that runs them on pseudo-random inputs in every `cargo test`. Both must never panic on any
//! input; `run_operations` also checks that every byte a receiver reads is the byte the sender
//! wrote at that stream offset.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{Icmpv6Packet, IpAddress, IpProtocol, TcpPacket};

use crate::phy::{Device, DeviceCapabilities, RxMeta};
use crate::sim::{ADDR_A, ADDR_B, LinkConfig, Network, SimDevice};
use crate::stack::{Ipv6Config, SocketHandle, Stack, StackConfig};
use crate::time::Instant;

const OUR_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const OUR_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const PEER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

struct OneShot {
    frames: Vec<Vec<u8>>,
    sent: usize,
}

impl Device for OneShot {
    fn capabilities(&self) -> DeviceCapabilities {
        DeviceCapabilities::default()
    }
    fn receive<R>(&mut self, f: impl FnOnce(&[u8], RxMeta) -> R) -> Option<R> {
        let frame = self.frames.pop()?;
        Some(f(&frame, RxMeta::default()))
    }
    fn transmit(&mut self, max_len: usize, f: impl FnOnce(&mut [u8]) -> usize) -> Option<usize> {
        let mut buf = vec![0u8; max_len];
        self.sent += 1;
        Some(f(&mut buf))
    }
}

/// Wraps `tcp` (an arbitrary TCP header + payload) in valid Ethernet and IPv4 headers and fixes
/// the TCP checksum, so the input reaches the TCP state machine instead of dying in parsing.
fn wrap_tcp(tcp: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(34 + tcp.len());
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00]);
    let total = (20 + tcp.len()).min(65535) as u16;
    let mut ip = [
        0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 1,
    ];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&tcp[..tcp.len().min(65535 - 20)]);
    if tcp.len() >= 20 {
        let mut packet = TcpPacket::new_unchecked(&mut frame[34..]);
        packet.fill_checksum(&IpAddress::Ipv4(PEER_IP), &IpAddress::Ipv4(OUR_IP));
    }
    let _ = ChecksumCapabilities::default();
    frame
}

/// Wraps `payload` in valid Ethernet and IPv6 headers (hop limit 255, so neighbour discovery
/// is considered) as TCP or ICMPv6 with a correct checksum. For ICMPv6 the first byte picks a
/// message type the stack handles, so random input reaches echo, NDP and packet-too-big.
fn wrap_ipv6(next_header: IpProtocol, payload: &[u8]) -> Vec<u8> {
    let payload = &payload[..payload.len().min(65535)];
    let mut frame = Vec::with_capacity(54 + payload.len());
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x86, 0xdd]);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[u8::from(next_header), 255]);
    frame.extend_from_slice(&PEER_IP6.octets());
    frame.extend_from_slice(&OUR_IP6.octets());
    frame.extend_from_slice(payload);
    let (src, dst) = (IpAddress::Ipv6(PEER_IP6), IpAddress::Ipv6(OUR_IP6));
    match next_header {
        IpProtocol::Tcp if payload.len() >= 20 => {
            TcpPacket::new_unchecked(&mut frame[54..]).fill_checksum(&src, &dst);
        }
        IpProtocol::Icmpv6 if payload.len() >= 4 => {
            frame[54] = [128, 133, 134, 135, 136, 137, 2][usize::from(payload[0]) % 7];
            Icmpv6Packet::new_unchecked(&mut frame[54..]).fill_checksum(&PEER_IP6, &OUR_IP6);
        }
        _ => {}
    }
    frame
}

/// Feeds `data` to a dual-stack stack that has a listener and connections in progress: as a
/// raw frame, as a TCP segment over IPv4 and over IPv6, and as an ICMPv6 message (each with
/// valid lower layers).
pub fn feed_frame(data: &[u8]) {
    let mut config = StackConfig::new([2, 0, 0, 0, 0, 1], OUR_IP, 24, [3; 16]);
    config.ipv6 = Some(Ipv6Config::new(OUR_IP6, 64));
    config.tcp.time_wait = Duration::from_millis(10);
    let mut stack = Stack::new(config);
    stack.add_neighbor(PEER_IP, [2, 0, 0, 0, 0, 2]);
    stack.add_neighbor(PEER_IP6, [2, 0, 0, 0, 0, 2]);
    let _ = stack.listen(80, 4);
    let _ = stack.connect(Instant::ZERO, SocketAddrV4::new(PEER_IP, 80));
    let _ = stack.connect(Instant::ZERO, SocketAddr::new(PEER_IP6.into(), 80));
    let mut device = OneShot {
        frames: vec![
            wrap_ipv6(IpProtocol::Icmpv6, data),
            wrap_ipv6(IpProtocol::Tcp, data),
            wrap_tcp(data),
            data.to_vec(),
        ],
        sent: 0,
    };
    let mut now = Instant::from_millis(1);
    for _ in 0..4 {
        stack.poll(now, &mut device);
        now = now + Duration::from_millis(300);
    }
    while stack.poll_event().is_some() {}
}

/// A byte of the test stream at `offset`: lets receivers check position as well as content.
fn stream_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

struct Flow {
    client: SocketHandle,
    server: Option<SocketHandle>,
    written: u64,
    read: u64,
}

/// Interprets `data` as a sequence of socket operations and network changes on a simulated
/// two-stack network and checks stream integrity throughout.
pub fn run_operations(data: &[u8]) {
    let mut net = Network::new(
        u64::from(data.first().copied().unwrap_or(0)),
        LinkConfig::default(),
        LinkConfig::default(),
        |c| {
            c.tcp.time_wait = Duration::from_millis(500);
            c.tcp.recv_buffer = 64 * 1024;
            c.tcp.send_buffer = 64 * 1024;
            c.tcp.max_retransmissions = 4;
        },
    );
    let listener = net.b.listen(80, 8).ok();
    let mut flows: Vec<Flow> = Vec::new();
    let mut bytes = data.iter().copied().skip(1);
    let mut buf = vec![0u8; 8192];
    let mut scratch = vec![0u8; 4096];
    while let Some(op) = bytes.next() {
        let arg = bytes.next().unwrap_or(0);
        let pick = |len: usize| usize::from(arg) % len.max(1);
        match op % 11 {
            0 if flows.len() < 8 => {
                let now = net.now();
                if let Ok(client) = net.a.connect(now, SocketAddrV4::new(ADDR_B, 80)) {
                    flows.push(Flow {
                        client,
                        server: None,
                        written: 0,
                        read: 0,
                    });
                }
            }
            1 if !flows.is_empty() => {
                let i = pick(flows.len());
                let len = usize::from(arg) * 37 % scratch.len();
                let flow = &mut flows[i];
                for (k, b) in scratch[..len].iter_mut().enumerate() {
                    *b = stream_byte(flow.written + k as u64);
                }
                if let Ok(n) = net.a.send(flow.client, &scratch[..len]) {
                    flow.written += n as u64;
                }
            }
            2 => {
                if let Some(listener) = listener {
                    while let Ok(server) = net.b.accept(listener) {
                        if let Some(flow) = flows.iter_mut().find(|f| {
                            f.server.is_none()
                                && net.a.addresses(f.client).map(|(l, _)| l.port())
                                    == net.b.addresses(server).map(|(_, r)| r.port())
                        }) {
                            flow.server = Some(server);
                        } else {
                            let _ = net.b.close(server);
                        }
                    }
                }
                for flow in &mut flows {
                    let Some(server) = flow.server else { continue };
                    while let Ok(n) = net.b.recv(server, &mut buf) {
                        if n == 0 {
                            break;
                        }
                        for (k, b) in buf[..n].iter().enumerate() {
                            assert_eq!(*b, stream_byte(flow.read + k as u64), "stream corrupted");
                        }
                        flow.read += n as u64;
                        assert!(flow.read <= flow.written, "read more than written");
                    }
                }
            }
            3 if !flows.is_empty() => {
                let _ = net.a.shutdown(flows[pick(flows.len())].client);
            }
            4 if !flows.is_empty() => {
                let flow = flows.remove(pick(flows.len()));
                let _ = net.a.close(flow.client);
                if let Some(server) = flow.server {
                    let _ = net.b.close(server);
                }
            }
            5 if !flows.is_empty() => {
                let flow = flows.remove(pick(flows.len()));
                let _ = net.a.abort(flow.client);
            }
            6 | 7 => net.run_for(Duration::from_millis(u64::from(arg) * 4)),
            8 => {
                let link = LinkConfig {
                    loss: f64::from(arg % 8) / 20.0,
                    reorder: f64::from(arg / 8 % 4) / 10.0,
                    duplicate: f64::from(arg / 32 % 2) / 10.0,
                    ..LinkConfig::default()
                };
                net.set_links(link, link);
            }
            9 if !flows.is_empty() => {
                use crate::congestion::CongestionControl;
                use crate::stack::SocketOption;
                let flow = &flows[pick(flows.len())];
                let controllers = [
                    CongestionControl::Bbr,
                    CongestionControl::Cubic,
                    CongestionControl::Reno,
                ];
                // Buffers from 1 KiB to 1 MiB: shrinking below what is queued or offered too.
                let size = 1usize << (10 + arg / 4 % 11);
                match arg % 4 {
                    0 => {
                        let _ = net
                            .a
                            .set_option(flow.client, SocketOption::NoDelay(arg & 4 == 4));
                    }
                    1 => {
                        let cc = controllers[usize::from(arg / 4) % controllers.len()];
                        let _ = net
                            .a
                            .set_option(flow.client, SocketOption::CongestionControl(cc));
                    }
                    2 => {
                        let _ = net
                            .a
                            .set_option(flow.client, SocketOption::SendBuffer(size));
                    }
                    _ => {
                        if let Some(server) = flow.server {
                            let _ = net.b.set_option(server, SocketOption::ReceiveBuffer(size));
                        }
                    }
                }
            }
            10 => {
                // A stray frame from nowhere.
                let frame = wrap_tcp(&scratch[..usize::from(arg) % 64]);
                let _ = frame.len();
                let mut dev = SimDevice::default();
                dev.rx.push_back(frame);
                let now = net.now();
                net.a.poll(now, &mut dev);
            }
            _ => {}
        }
    }
    let _ = ADDR_A;
}
