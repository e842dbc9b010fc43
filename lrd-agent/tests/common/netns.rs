//! Root-only pieces of the agent's trials: network namespaces, and this test binary re-run as
//! a helper process (inside a namespace, as another uid) that talks to the agent for the test.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

use stackroute_local_api::frame;
use stackroute_local_api::message::{Request, Response};
use stackroute_local_api::published;
use testkit::Ignored;

/// `1`: a trial that cannot run here fails instead of showing as ignored.
pub const REQUIRE_NETNS: &str = "STACKROUTE_REQUIRE_NETNS";
/// Set in a helper's environment: its role (see [`Helper::start`]).
const HELPER_ROLE: &str = "STACKROUTE_LRD_TEST_HELPER";
/// Set in a helper's environment: the agent's socket directory.
const HELPER_SOCKET_DIR: &str = "STACKROUTE_LRD_TEST_SOCKET_DIR";

/// Runs when root and every one of `programs` starts (`PROGRAM -V`); otherwise the trial is
/// ignored with `missing`, or fails under `STACKROUTE_REQUIRE_NETNS=1`.
pub fn netns_gate(programs: &[&str], missing: &str) -> Result<(), Ignored> {
    // Owner of our /proc entry: the effective uid (no libc call needed).
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let missing = if !root {
        Some("needs root (network namespaces)")
    } else if !programs.iter().all(|program| {
        Command::new(program)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }) {
        Some(missing)
    } else {
        None
    };
    match missing {
        None => Ok(()),
        Some(reason) if std::env::var_os(REQUIRE_NETNS).is_some_and(|v| v == "1") => {
            panic!("{REQUIRE_NETNS}=1 but this trial {reason}")
        }
        Some(reason) => Err(Ignored::new(reason)),
    }
}

/// `program args…`, its output (a program that cannot start panics).
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// A network namespace with its loopback up, named after the test's pid and `tag`, deleted
/// by name when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("srlrd-{}-{tag}", std::process::id());
        let _ = run("ip", &["netns", "del", &name]);
        let output = run("ip", &["netns", "add", &name]);
        assert!(output.status.success(), "ip netns add {name}: {output:?}");
        let netns = Self { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// A namespace holding `address` on its loopback interface (a pod's address, routed
    /// nowhere).
    pub fn with_address(tag: &str, address: &str) -> Self {
        let netns = Self::new(tag);
        netns.ip(&["addr", "add", &format!("{address}/32"), "dev", "lo"]);
        netns
    }

    /// `ip -n NAME args…`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        let output = run("ip", &all);
        assert!(output.status.success(), "ip {all:?}: {output:?}");
    }

    /// `program args…` inside the namespace.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// This test binary in a helper role, talking over its stdin and stdout; killed by pid when
/// dropped.
pub struct Helper {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    /// The helper's own pid (it reports it first: under `ip netns exec` it is its own).
    pub pid: u32,
}

impl Helper {
    /// Starts `role` against the agent whose sockets are in `socket_dir`, in `netns` (else
    /// here), as `uid` (else as the test). The test's `main` hands the role to
    /// [`helper_role`]; `client` is served by [`answer_requests`].
    pub fn start(role: &str, socket_dir: &Path, netns: Option<&Netns>, uid: Option<u32>) -> Self {
        let exe = std::env::current_exe().expect("test executable");
        let mut command = match netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", &netns.name]);
                command
            }
            None => Command::new("env"),
        };
        if let Some(uid) = uid {
            command.arg("setpriv").args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ]);
        }
        command
            .arg(exe)
            .env(HELPER_ROLE, role)
            .env(HELPER_SOCKET_DIR, socket_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("start a helper");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut helper = Self {
            child,
            stdin,
            stdout,
            pid: 0,
        };
        helper.pid = helper.line().trim().parse().expect("the helper's pid");
        helper
    }

    /// The helper's next output line.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .expect("a line from the helper");
        assert!(!line.is_empty(), "the helper exited");
        line
    }

    /// Sends `request` (a `client` helper makes it on a new connection).
    pub fn send(&mut self, request: &Request) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{}", serde_json::to_string(request).unwrap()).unwrap();
        stdin.flush().unwrap();
    }

    /// The reply to the oldest request sent.
    pub fn reply(&mut self) -> Response {
        serde_json::from_str(&self.line()).expect("a reply")
    }

    /// One request and its reply.
    pub fn call(&mut self, request: &Request) -> Response {
        self.send(request);
        self.reply()
    }

    /// `userspaceInstance`, and how long the answer took.
    pub fn instance(&mut self) -> (Response, Duration) {
        let started = Instant::now();
        let reply = self.call(&Request::UserspaceInstance);
        (reply, started.elapsed())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In a helper process: its role and the agent's socket; it has printed its pid. `None` in
/// the test itself.
pub fn helper_role() -> Option<(String, PathBuf)> {
    let role = std::env::var(HELPER_ROLE).ok()?;
    let socket = PathBuf::from(std::env::var_os(HELPER_SOCKET_DIR).unwrap_or_default())
        .join(published::SOCKET_FILE);
    println!("{}", std::process::id());
    Some((role, socket))
}

/// The `client` role: one request per stdin line, each on a new connection to `socket`, one
/// reply per stdout line (a failure to connect or to answer within `timeout` is an `Error`).
pub fn answer_requests(socket: &Path, timeout: Duration) {
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { break };
        let request: Request = serde_json::from_str(&line).expect("a request");
        let reply = std::os::unix::net::UnixStream::connect(socket)
            .map_err(|e| e.to_string())
            .and_then(|mut stream| {
                stream.set_read_timeout(Some(timeout)).unwrap();
                frame::call::<_, _, Response>(&mut stream, &request).map_err(|e| e.to_string())
            })
            .unwrap_or_else(|message| Response::Error {
                message: format!("helper: {message}"),
            });
        println!("{}", serde_json::to_string(&reply).unwrap());
    }
}
