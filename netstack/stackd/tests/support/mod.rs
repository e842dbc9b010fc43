//! A two-namespace lab for the instance, and a client that acts as the shim does.
//!
//! ```text
//!  ns C: the instance (and its kernel)              ns S: kernel servers (python)
//!  cv…  10.77.0.1/24, default via 10.77.0.2  ── veth ──  sv…  10.77.0.2/24
//!  ports 61000-62999: ip_local_reserved_ports + raw PREROUTING DROP (as the agent sets up)
//! ```
//!
//! Namespaces carry the test's PID; `Drop` kills the children by PID and deletes the
//! namespaces by name.

#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvFlags, SendAncillaryBuffer, SendAncillaryMessage,
    SendFlags, SocketAddrUnix, SocketType,
};
use stackroute_local_api::relay::{MAX_MESSAGE, RelayRequest, RelayResponse, socket_name};
use testkit::Ignored;

pub const CLIENT_IP: &str = "10.77.0.1";
pub const SERVER_IP: &str = "10.77.0.2";
pub const CLIENT_IP6: &str = "fd78::1";
pub const SERVER_IP6: &str = "fd78::2";
pub const PORTS: &str = "61000-62999";
/// The server side of [`Lab::add_dedicated_link`]; the stack takes .2 of its /24.
pub const DEDICATED_GATEWAY: &str = "10.78.0.1";
pub const DEDICATED_STACK: &str = "10.78.0.2";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The gate of every lab trial: root and the tools, or ignored with the reason (a failure
/// under `STACKROUTE_REQUIRE_NETNS=1`).
pub fn netns_gate() -> Result<(), Ignored> {
    let reason = unavailable();
    match reason {
        None => Ok(()),
        Some(reason) if std::env::var("STACKROUTE_REQUIRE_NETNS").as_deref() == Ok("1") => {
            panic!("STACKROUTE_REQUIRE_NETNS=1 but {reason}")
        }
        Some(reason) => Err(Ignored::new(reason)),
    }
}

/// The netns gate, then the DPDK gate (a build with `--features dpdk`).
pub fn dpdk_gate() -> Result<(), Ignored> {
    netns_gate()?;
    testkit::dpdk(
        cfg!(feature = "dpdk"),
        "cargo test -p stackroute-stackd --features dpdk",
    )
}

fn unavailable() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1));
    if uid != Some("0") {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for tool in [
        "ip",
        "iptables",
        "ip6tables",
        "python3",
        "ss",
        "setpriv",
        "sysctl",
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    None
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_quiet(args: &[&str]) {
    let _ = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A child process with its output collected by threads.
pub struct Proc {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {command:?}: {e}"));
        let collect = |pipe: Box<dyn Read + Send>| {
            let sink = Arc::new(Mutex::new(String::new()));
            let writer = Arc::clone(&sink);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(pipe);
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    writer.lock().unwrap().push_str(&line);
                    line.clear();
                }
            });
            sink
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for a stdout line starting with `prefix`; returns it.
    pub fn line(&self, prefix: &str, timeout: Duration) -> String {
        self.try_line(prefix, timeout).unwrap_or_else(|| {
            panic!(
                "no line starting with {prefix:?} within {timeout:?}; stdout: {}; stderr: {}",
                self.stdout(),
                self.stderr()
            )
        })
    }

    pub fn try_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.stdout().lines().find(|l| l.starts_with(prefix)) {
                return Some(line.to_owned());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn lines(&self, prefix: &str) -> Vec<String> {
        self.stdout()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    pub fn signal(&self, signal: &str) {
        run(&["kill", &format!("-{signal}"), &self.pid().to_string()]);
    }

    /// Waits for the process to exit; its exit code (None: killed by a signal).
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "process {} still running after {timeout:?}",
                self.pid()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How the instance gets its AF_PACKET socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketSocket {
    /// Created by a privileged parent (python) and inherited by an instance started without
    /// any capability, as the agent does.
    Inherited,
    /// Opened by the instance itself (`--interface`, CAP_NET_RAW).
    Own,
    /// None: the trial's own arguments name the engine and interface (DPDK).
    Named,
}

/// A veth pair: `a` in its namespace, `b` in its own.
fn veth(a: (&str, &str), b: (&str, &str)) {
    run(&[
        "ip", "link", "add", a.0, "netns", a.1, "type", "veth", "peer", "name", b.0, "netns", b.1,
    ]);
}

/// Creates an AF_PACKET socket in the namespace, then execs `setpriv` (no capabilities, an
/// empty bounding set) and the instance with `--packet-fd`.
const INHERIT_PACKET_SOCKET: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
os.set_inheritable(s.fileno(), True)
args = sys.argv[1:]
os.execvp("setpriv", ["setpriv", "--inh-caps=-all", "--bounding-set=-all", args[0], "--packet-fd", str(s.fileno())] + args[1:])
"#;

pub struct Lab {
    pub client_ns: String,
    pub server_ns: String,
    pub tag: String,
    pub client_if: String,
}

impl Lab {
    pub fn new() -> Self {
        let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}x{n}", std::process::id());
        let lab = Self {
            client_ns: format!("srsdC{tag}"),
            server_ns: format!("srsdS{tag}"),
            client_if: format!("cv{tag}"),
            tag,
        };
        let server_if = format!("sv{}", lab.tag);
        for ns in [&lab.client_ns, &lab.server_ns] {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        veth(
            (&lab.client_if, &lab.client_ns),
            (&server_if, &lab.server_ns),
        );
        let client_cidr = format!("{CLIENT_IP}/24");
        let server_cidr = format!("{SERVER_IP}/24");
        run(&[
            "ip",
            "-n",
            &lab.client_ns,
            "addr",
            "add",
            &client_cidr,
            "dev",
            &lab.client_if,
        ]);
        run(&[
            "ip",
            "-n",
            &lab.server_ns,
            "addr",
            "add",
            &server_cidr,
            "dev",
            &server_if,
        ]);
        // IPv6 beside IPv4, usable at once (no duplicate address detection): the instances
        // serve both.
        for (ns, dev, cidr6) in [
            (&lab.client_ns, &lab.client_if, CLIENT_IP6),
            (&lab.server_ns, &server_if, SERVER_IP6),
        ] {
            let cidr6 = format!("{cidr6}/64");
            run(&["ip", "-n", ns, "addr", "add", &cidr6, "dev", dev, "nodad"]);
        }
        run(&[
            "ip",
            "-n",
            &lab.client_ns,
            "link",
            "set",
            &lab.client_if,
            "up",
        ]);
        run(&["ip", "-n", &lab.server_ns, "link", "set", &server_if, "up"]);
        run(&[
            "ip",
            "-n",
            &lab.client_ns,
            "route",
            "add",
            "default",
            "via",
            SERVER_IP,
        ]);
        // What the agent does for an instance: keep the kernel off the stack's ports.
        lab.prepare(&lab.client_ns.clone());
        lab
    }

    /// A second link from the client namespace to the server namespace for a stack that owns
    /// its device (Dedicated isolation): the server side holds [`DEDICATED_GATEWAY`], the
    /// client side no kernel address. Its name in the client namespace is returned. The server
    /// side sends no TSO/GSO aggregates: a NIC's wire carries MTU-sized frames.
    pub fn add_dedicated_link(&self) -> String {
        let client_if = format!("dc{}", self.tag);
        let server_if = format!("ds{}", self.tag);
        veth((&client_if, &self.client_ns), (&server_if, &self.server_ns));
        let gateway = format!("{DEDICATED_GATEWAY}/24");
        run(&[
            "ip",
            "-n",
            &self.server_ns,
            "addr",
            "add",
            &gateway,
            "dev",
            &server_if,
        ]);
        for (ns, dev) in [(&self.client_ns, &client_if), (&self.server_ns, &server_if)] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&[
                "ip", "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro",
                "off",
            ]);
        }
        client_if
    }

    /// What the agent does in a namespace before starting its instance: the range reserved
    /// from the kernel, and raw-table DROPs of TCP to and from it on all but loopback.
    pub fn prepare(&self, ns: &str) {
        let reserved = format!("net.ipv4.ip_local_reserved_ports={PORTS}");
        run(&["ip", "netns", "exec", ns, "sysctl", "-qw", &reserved]);
        for (tool, direction) in [
            ("iptables", "--dport"),
            ("iptables", "--sport"),
            ("ip6tables", "--dport"),
            ("ip6tables", "--sport"),
        ] {
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                tool,
                "-t",
                "raw",
                "-A",
                "PREROUTING",
                "!",
                "-i",
                "lo",
                "-p",
                "tcp",
                direction,
                &PORTS.replace('-', ":"),
                "-j",
                "DROP",
            ]);
        }
    }

    /// Packets the raw-table DROP of TCP *from* the range counted in `ns` (user-space peers'
    /// segments the kernel never saw).
    pub fn peer_segments_dropped(&self, ns: &str) -> u64 {
        let rules = run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "iptables",
            "-t",
            "raw",
            "-L",
            "PREROUTING",
            "-v",
            "-n",
            "-x",
        ]);
        rules
            .lines()
            .find(|l| l.contains("spts:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Starts an instance in the server namespace too (prepared first), with its own tag.
    pub fn start_server_instance(&self) -> Instance {
        self.prepare(&self.server_ns.clone());
        let binary = env!("CARGO_BIN_EXE_stackroute-stackd");
        let tag = format!("{}s", self.tag);
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.server_ns])
            .args(["python3", "-c", INHERIT_PACKET_SOCKET, binary])
            .args(["--socket-name", &tag, "--ready-fd", "1", "--ports", PORTS])
            .env(
                "RUST_LOG",
                std::env::var("STACKD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let proc = Proc::spawn(command);
        proc.line("ready", Duration::from_secs(20));
        Instance {
            proc,
            netns: self.server_ns.clone(),
            socket: socket_name(&tag),
        }
    }

    /// `OutRsts` of a namespace's kernel TCP.
    pub fn kernel_resets(&self, ns: &str) -> u64 {
        let snmp = run(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"]);
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
        let index = names
            .split_whitespace()
            .position(|n| n == "OutRsts")
            .unwrap();
        values
            .split_whitespace()
            .nth(index)
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Kernel TCP sockets of the server namespace (`ss -tan`, header dropped).
    pub fn server_kernel_sockets(&self) -> Vec<String> {
        self.exec_server(&["ss", "-tanH"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn exec_client(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.client_ns];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn exec_server(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.server_ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Starts the instance in the client namespace; returns once it said `ready`.
    pub fn start_instance(&self, packet: PacketSocket, extra: &[&str]) -> Instance {
        let binary = env!("CARGO_BIN_EXE_stackroute-stackd");
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.client_ns]);
        match packet {
            PacketSocket::Inherited => {
                command.args(["python3", "-c", INHERIT_PACKET_SOCKET, binary]);
            }
            PacketSocket::Own => {
                command.args([binary, "--interface", &self.client_if]);
            }
            PacketSocket::Named => {
                command.arg(binary);
            }
        }
        command
            .args([
                "--socket-name",
                &self.tag,
                "--ready-fd",
                "1",
                "--ports",
                PORTS,
            ])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("STACKD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let proc = Proc::spawn(command);
        proc.line("ready", Duration::from_secs(20));
        Instance {
            proc,
            netns: self.client_ns.clone(),
            socket: socket_name(&self.tag),
        }
    }

    /// Starts the python server in the server namespace: `mode` and its argument (see
    /// [`SERVER`]); returns once it listens.
    pub fn start_server(&self, mode: &str, port: u16, arg: u64) -> Proc {
        let mut command = Command::new("ip");
        command.args([
            "netns",
            "exec",
            &self.server_ns,
            "python3",
            "-u",
            "-c",
            SERVER,
        ]);
        command.args([mode, SERVER_IP, &port.to_string(), &arg.to_string()]);
        let proc = Proc::spawn(command);
        proc.line("READY", Duration::from_secs(20));
        proc
    }

    /// `OutRsts` of the client namespace's kernel TCP (`/proc/net/snmp`).
    pub fn client_kernel_resets(&self) -> u64 {
        let snmp = self.exec_client(&["cat", "/proc/net/snmp"]);
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
        let index = names
            .split_whitespace()
            .position(|n| n == "OutRsts")
            .unwrap();
        values
            .split_whitespace()
            .nth(index)
            .unwrap()
            .parse()
            .unwrap()
    }

    /// Kernel TCP sockets of the client namespace (`ss -tan`, header dropped).
    pub fn client_kernel_sockets(&self) -> Vec<String> {
        self.exec_client(&["ss", "-tanH"])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn server(&self, port: u16) -> SocketAddr {
        format!("{SERVER_IP}:{port}").parse().unwrap()
    }

    pub fn server6(&self, port: u16) -> SocketAddr {
        format!("[{SERVER_IP6}]:{port}").parse().unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client_ns, &self.server_ns] {
            run_quiet(&["ip", "netns", "del", ns]);
        }
    }
}

/// Kernel servers, one thread per connection. Modes (`arg` is a byte count):
/// - `sink`: read to EOF, print `RESULT <bytes> <sha256>` (or `RESET <bytes>`), close;
/// - `source`: send `arg` pseudo-random bytes, shut down, print `SENT <bytes> <sha256>`,
///   read to EOF, close;
/// - `rst`: read `arg` bytes, then close with a RST (`SO_LINGER` 0), print `RST`;
/// - `push`: send `arg` bytes, then wait: print `RESET` (during either), `EOF` or `DATA`;
/// - `fin`: send `hello`, shut down, read to EOF, print `GOT <bytes>`;
/// - `reply`: read `arg` bytes, send them back, close (the server closes first);
/// - `echo`: echo until EOF, close.
pub const SERVER: &str = r#"
import hashlib, random, socket, struct, sys, threading
mode, host, port, arg = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(4096); print("READY", flush=True)
block = random.Random(7).randbytes(1 << 20)
def read_exact(c, n):
    got = bytearray()
    while len(got) < n:
        d = c.recv(min(65536, n - len(got)))
        if not d: break
        got += d
    return bytes(got)
def serve(c):
    try:
        if mode == "sink":
            h = hashlib.sha256(); n = 0
            try:
                while True:
                    d = c.recv(1 << 20)
                    if not d: break
                    h.update(d); n += len(d)
                print("RESULT", n, h.hexdigest(), flush=True)
            except ConnectionResetError:
                print("RESET", n, flush=True)
        elif mode == "source":
            h = hashlib.sha256(); left = arg
            while left > 0:
                chunk = block[: min(left, len(block))]; c.sendall(chunk); h.update(chunk); left -= len(chunk)
            c.shutdown(socket.SHUT_WR); print("SENT", arg, h.hexdigest(), flush=True)
            while c.recv(65536): pass
        elif mode == "rst":
            read_exact(c, arg)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            print("RST", flush=True)
        elif mode == "push":
            # The reset may come while the bytes are still going out (the application closed
            # after the first of them arrived): it is the same outcome.
            try:
                c.sendall(b"p" * arg)
                d = c.recv(1)
                print("DATA" if d else "EOF", flush=True)
            except ConnectionResetError:
                print("RESET", flush=True)
        elif mode == "fin":
            c.sendall(b"hello"); c.shutdown(socket.SHUT_WR); n = 0
            while True:
                d = c.recv(65536)
                if not d: break
                n += len(d)
            print("GOT", n, flush=True)
        elif mode == "reply":
            c.sendall(read_exact(c, arg))
        elif mode == "echo":
            while True:
                d = c.recv(65536)
                if not d: break
                c.sendall(d)
    except OSError as e:
        print("ERROR", e, flush=True)
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The running instance.
pub struct Instance {
    pub proc: Proc,
    pub netns: String,
    pub socket: String,
}

impl Instance {
    /// A control connection, made from inside the instance's namespace (abstract socket
    /// names are per network namespace).
    pub fn control(&self) -> Control {
        let name = self.socket.clone();
        let fd = in_netns(&self.netns, move || {
            let fd = rustix::net::socket(AddressFamily::UNIX, SocketType::SEQPACKET, None)?;
            rustix::net::connect(&fd, &SocketAddrUnix::new_abstract_name(name.as_bytes())?)?;
            Ok::<_, rustix::io::Errno>(fd)
        })
        .expect("connecting to the control socket");
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(20)),
        )
        .unwrap();
        Control(fd)
    }

    /// Descriptors the instance holds.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.pid()))
            .unwrap()
            .count()
    }

    /// Resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The effective capabilities (hex) of the instance.
    pub fn effective_capabilities(&self) -> String {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("CapEff:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("")
            .to_owned()
    }

    /// Opens a relayed connection as the shim does.
    pub fn open(&self, remote: SocketAddr) -> Result<App, (String, i32)> {
        self.control().open(remote)
    }
}

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("network namespace file");
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("setns");
        f()
    })
    .join()
    .expect("thread in the namespace")
}

/// A control connection.
pub struct Control(pub OwnedFd);

impl Control {
    /// Sends `bytes` as one packet with `fds` attached.
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> rustix::io::Result<usize> {
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() {
            assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        }
        rustix::net::sendmsg(
            &self.0,
            &[std::io::IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
    }

    /// One reply packet; `None` when the instance closed the connection.
    pub fn receive_raw(&self) -> Option<Vec<u8>> {
        let mut buffer = vec![0u8; MAX_MESSAGE + 1];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            &self.0,
            &mut [std::io::IoSliceMut::new(&mut buffer)],
            &mut control,
            RecvFlags::empty(),
        )
        .expect("receiving a reply (20 s timeout)");
        (received.bytes > 0).then(|| buffer[..received.bytes].to_vec())
    }

    pub fn request(&self, request: &RelayRequest, fd: Option<BorrowedFd<'_>>) -> RelayResponse {
        let bytes = serde_json::to_vec(request).unwrap();
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.send_raw(&bytes, &fds).expect("sending a request");
        let reply = self.receive_raw().expect("a reply");
        serde_json::from_slice(&reply)
            .unwrap_or_else(|e| panic!("bad reply {}: {e}", String::from_utf8_lossy(&reply)))
    }

    /// What the shim does for `connect`: a socket pair, the application's end filled until it
    /// is not writable, the other end handed over with `Connect`.
    pub fn open(&self, remote: SocketAddr) -> Result<App, (String, i32)> {
        let (app, ours) = UnixStream::pair().unwrap();
        app.set_nonblocking(true).unwrap();
        let filler = fill(&app);
        let request = RelayRequest::Connect {
            remote,
            original: None,
            congestion_control: "Default".into(),
            nodelay: false,
            filler,
        };
        match self.request(&request, Some(ours.as_fd())) {
            RelayResponse::Connecting { id, local } => Ok(App {
                end: app,
                id,
                local,
                filler,
            }),
            RelayResponse::Error { message, errno } => Err((message, errno)),
            other => panic!("unexpected reply to connect: {other:?}"),
        }
    }

    pub fn status(&self, id: u64) -> RelayResponse {
        self.request(&RelayRequest::Status { id }, None)
    }
}

/// Writes into `socket` until it would block; returns how many bytes it took.
pub fn fill(socket: &UnixStream) -> u64 {
    let chunk = [0xf1u8; 65536];
    let mut total = 0u64;
    let mut size = chunk.len();
    loop {
        match (&*socket).write(&chunk[..size]) {
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if size == 1 {
                    return total;
                }
                // Top up with smaller writes so the end is really full.
                size = (size / 8).max(1);
            }
            Err(e) => panic!("filling the application's end: {e}"),
        }
    }
}

/// The application's side of a relayed connection.
pub struct App {
    pub end: UnixStream,
    pub id: u64,
    pub local: SocketAddr,
    pub filler: u64,
}

/// `poll` on one descriptor; the returned events.
pub fn poll_events(
    fd: impl AsFd,
    events: rustix::event::PollFlags,
    timeout: Duration,
) -> rustix::event::PollFlags {
    let mut fds = [rustix::event::PollFd::new(&fd, events)];
    let timeout = rustix::time::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap();
    fds[0].revents()
}

/// Pseudo-random bytes (xorshift), the same for the same seed.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
