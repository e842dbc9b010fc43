//! Unmodified programs on the user-space stack: a `Userspace` rule for the internet path, curl
//! under the shim on node-a1, a kernel HTTP server on the internet host. The node's agent
//! starts the stack instance (`stackroute-stackd`) in node-a1's namespace at the first
//! connection; curl's socket becomes a relay to it.
//!
//! What is asserted comes from outside curl: the bytes (SHA-256 on both ends), the kernel of
//! node-a1 holding no TCP socket to the server while the transfer runs (`ss -tan`), and the
//! server seeing the client's port in the instance's reserved range, which the kernel never
//! picks. Without root, tools or the binaries the trials show as ignored with the reason (and
//! fail under `STACKROUTE_REQUIRE_NETNS=1`).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use stackroute_e2e::cluster::{Cluster, INTERNET, INTERNET_IP, Options, Workload, node};
use stackroute_e2e::tools::{REQUIRE_NETNS, netns_preconditions, required, which};
use testkit::{Ignored, Trial};

const LONG: Duration = Duration::from_secs(90);
const PORT: u16 = 8080;

/// The internet path on the user-space stack with BBR, CUBIC in the kernel as its fallback.
const POLICY: &str = r#"apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: userspace-internet, namespace: e2e}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
  - name: internet
    to: [{entity: World}]
    location: External
    transport:
      stack: Userspace
      congestionControl: BBR
      fallback: [{stack: Kernel, congestionControl: Cubic}]
"#;

/// A kernel HTTP server for the internet host: `GET /blob` answers `BYTES` pseudo-random bytes,
/// `PUT` answers the SHA-256 of the body; every request's client address goes to stdout.
const SERVER: &str = r#"
import hashlib, http.server, random, sys
size = int(sys.argv[2])
blob = random.Random(7).randbytes(size)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *a): pass
    def do_GET(self):
        print("client", self.client_address[0], self.client_address[1], flush=True)
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob)
    def do_PUT(self):
        print("client", self.client_address[0], self.client_address[1], flush=True)
        n = int(self.headers["Content-Length"])
        digest = hashlib.sha256()
        while n:
            chunk = self.rfile.read(min(n, 1 << 16))
            if not chunk: break
            digest.update(chunk); n -= len(chunk)
        body = digest.hexdigest().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

fn main() -> ExitCode {
    testkit::run(vec![
        Trial::gated(
            "curl_downloads_and_uploads_over_the_userspace_stack",
            || gate(&["python3", "curl", "sha256sum"]),
            |()| curl_downloads_and_uploads_over_the_userspace_stack(),
        ),
        Trial::gated(
            "without_a_stack_instance_connections_fall_back_to_the_kernel",
            || gate(&["python3", "curl"]),
            |()| without_a_stack_instance_connections_fall_back_to_the_kernel(),
        ),
    ])
}

/// Root, the network tools, `programs`, and the project's binaries including the instance.
fn gate(programs: &[&str]) -> Result<(), Ignored> {
    let missing = netns_preconditions().err().or_else(|| {
        programs
            .iter()
            .find(|p| which(p).is_none())
            .map(|p| format!("{p} is not installed"))
    });
    let missing = missing.or_else(|| {
        let bins = stackroute_e2e::tools::Bins::find().err()?;
        Some(format!("{bins:#}"))
    });
    let missing = missing.or_else(|| {
        let exe = std::env::current_exe().ok()?;
        let dir = exe.parent()?.parent()?;
        (!dir.join("stackroute-stackd").is_file()).then(|| {
            "stackroute-stackd is not built (cargo build -p stackroute-stackd, same target directory)"
                .to_string()
        })
    });
    match missing {
        None => Ok(()),
        Some(reason) if required(REQUIRE_NETNS) => panic!("{reason}, and {REQUIRE_NETNS}=1"),
        Some(reason) => Err(Ignored::new(reason)),
    }
}

fn client(name: &str) -> Workload<'_> {
    Workload {
        node: "node-a1",
        name,
        labels: &["app=client"],
    }
}

fn internet() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(INTERNET_IP), PORT)
}

/// The cluster with a curl pod on node-a1, the policy applied and the server running.
fn setup(options: Options, pod: &str, bytes: usize) -> (Cluster, stackroute_e2e::proc::Proc) {
    let mut cluster = Cluster::start(options).expect("the e2e cluster starts");
    assert!(cluster.bins.shim.is_some(), "libnsocket.so is not built");
    cluster
        .add_pod(pod, "node-a1", &["app=client"], false)
        .unwrap();
    let script = cluster.dir().join("server.py");
    std::fs::write(&script, SERVER).unwrap();
    let server = cluster
        .spawn_plain(
            INTERNET,
            "internet-http",
            &[
                "python3",
                script.to_str().unwrap(),
                &PORT.to_string(),
                &bytes.to_string(),
            ],
        )
        .unwrap();
    cluster.wait_listening(INTERNET, PORT).unwrap();
    cluster.set_policy("userspace.yaml", POLICY).unwrap();
    (cluster, server)
}

/// Every TCP socket node-a1's kernel holds towards `peer`, in any state (`ss -tan`).
fn kernel_sockets_to(cluster: &Cluster, peer: SocketAddr) -> Vec<String> {
    cluster
        .net
        .exec(node("node-a1").host, &["ss", "-tanH"])
        .unwrap_or_default()
        .lines()
        .filter(|line| {
            line.split_whitespace()
                .any(|field| field == peer.to_string())
        })
        .map(str::to_string)
        .collect()
}

/// `stackroute connections --output json` for node-a1's agent.
fn connections(cluster: &Cluster) -> serde_json::Value {
    let output = std::process::Command::new(&cluster.bins.cli)
        .args(["connections", "--output", "json", "--socket-dir"])
        .arg(cluster.socket_dir("node-a1"))
        .output()
        .expect("stackroute connections runs");
    assert!(
        output.status.success(),
        "stackroute connections: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("JSON")
}

/// The client ports the server printed.
fn client_ports(server: &stackroute_e2e::proc::Proc) -> Vec<u16> {
    server
        .output()
        .lines()
        .filter_map(|line| line.strip_prefix("client "))
        .filter_map(|rest| rest.split_whitespace().nth(1)?.parse().ok())
        .collect()
}

fn sha256_of(path: &std::path::Path) -> String {
    let output = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum runs");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn curl_downloads_and_uploads_over_the_userspace_stack() {
    let bytes = 4 << 20;
    let (cluster, server) = setup(Options::default(), "curl-us", bytes);
    cluster
        .wait_decision("node-a1", "curl-us", internet(), "Userspace/BBR")
        .unwrap();
    let downloaded = cluster.dir().join("downloaded");
    let url = format!("http://{}/blob", internet());
    // 1 MB/s: four seconds during which `ss` samples node-a1's kernel.
    let mut curl = cluster
        .spawn(
            &client("curl-us"),
            true,
            &[
                "curl",
                "-sS",
                "--limit-rate",
                "1M",
                "-o",
                downloaded.to_str().unwrap(),
                "-w",
                "%{http_code} %{size_download}",
                &url,
            ],
        )
        .unwrap();
    let mut kernel_seen = Vec::new();
    let mut samples = 0;
    let mut listed = None;
    while curl.running() {
        kernel_seen.extend(kernel_sockets_to(&cluster, internet()));
        samples += 1;
        if listed.is_none() && samples >= 20 {
            listed = Some(connections(&cluster));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = curl.success(LONG).unwrap();
    assert!(output.contains(&format!("200 {bytes}")), "curl: {output}");
    assert!(
        samples >= 20,
        "only {samples} ss samples during the download"
    );
    // `stackroute connections` showed it, from the instance, while it ran.
    let listed = listed.expect("listed while curl ran");
    let ours = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["remote"] == internet().to_string())
        .unwrap_or_else(|| panic!("stackroute connections did not list it: {listed:#}"));
    assert!(
        ours["congestionControl"]
            .as_str()
            .is_some_and(|cc| cc.eq_ignore_ascii_case("bbr")),
        "{ours:#}"
    );
    assert_eq!(ours["workload"], "e2e/curl-us", "{ours:#}");
    assert!(ours["bytesReceived"].as_u64() > Some(0), "{ours:#}");
    assert!(
        kernel_seen.is_empty(),
        "node-a1's kernel held TCP sockets to the server: {kernel_seen:?}"
    );
    // The server's bytes, by the same generator.
    let expected = cluster.dir().join("expected");
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import random,sys; open(sys.argv[1],'wb').write(random.Random(7).randbytes(int(sys.argv[2])))",
            expected.to_str().unwrap(),
            &bytes.to_string(),
        ])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        sha256_of(&downloaded),
        sha256_of(&expected),
        "downloaded bytes differ"
    );

    // Upload: the server answers the SHA-256 of what it received.
    let upload_url = format!("http://{}/upload", internet());
    let mut upload = cluster
        .spawn(
            &client("curl-us"),
            true,
            &["curl", "-sS", "-T", expected.to_str().unwrap(), &upload_url],
        )
        .unwrap();
    let answer = upload.success(LONG).unwrap();
    assert!(
        answer.contains(&sha256_of(&expected)),
        "the server received other bytes: {answer}"
    );

    let ports = client_ports(&server);
    assert_eq!(ports.len(), 2, "server saw: {}", server.output());
    for port in ports {
        assert!(
            (61000..=62999).contains(&port),
            "client port {port} is not the instance's (61000-62999): the kernel made this connection"
        );
    }
}

fn without_a_stack_instance_connections_fall_back_to_the_kernel() {
    let options = Options {
        agent_args: vec!["--stackd-binary".into(), "/bin/false".into()],
        ..Options::default()
    };
    let (cluster, server) = setup(options, "curl-fb", 1 << 20);
    cluster
        .wait_decision("node-a1", "curl-fb", internet(), "Userspace/BBR")
        .unwrap();
    let url = format!("http://{}/blob", internet());
    let mut curl = cluster
        .spawn(
            &client("curl-fb"),
            true,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                &url,
            ],
        )
        .unwrap();
    let output = curl.success(LONG).unwrap();
    assert!(output.contains("200 1048576"), "curl: {output}");
    // The kernel made it, from an ordinary ephemeral port.
    let ports = client_ports(&server);
    assert_eq!(ports.len(), 1, "server saw: {}", server.output());
    assert!(!(61000..=62999).contains(&ports[0]));
    // And the shim said why.
    let reason = cluster.wait_metric(
        "node-a1",
        r#"stackroute_lrd_fallback_reports_total{reason="stack-unavailable"}"#,
    );
    assert!(reason.is_ok(), "{reason:?}");
}
