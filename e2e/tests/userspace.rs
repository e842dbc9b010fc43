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
use stackroute_e2e::tools::netns_gate;
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
            "unmodified_clients_run_on_the_userspace_stack",
            || {
                gate(&[
                    "python3",
                    "iperf3",
                    "nginx",
                    "wrk",
                    "redis-server",
                    "redis-benchmark",
                    "node",
                ])
            },
            |()| unmodified_clients_run_on_the_userspace_stack(),
        ),
        Trial::gated(
            "a_service_cluster_ip_goes_to_its_backend_on_the_userspace_stack",
            || gate(&["python3", "curl"]),
            |()| a_service_cluster_ip_goes_to_its_backend_on_the_userspace_stack(),
        ),
        Trial::gated(
            "dual_listen_serves_user_space_and_kernel_clients_on_one_listener",
            || gate(&["python3", "curl"]),
            |()| dual_listen_serves_user_space_and_kernel_clients_on_one_listener(),
        ),
        Trial::gated(
            "without_a_stack_instance_connections_fall_back_to_the_kernel",
            || gate(&["python3", "curl"]),
            |()| without_a_stack_instance_connections_fall_back_to_the_kernel(),
        ),
    ])
}

/// Root, the network tools, `programs`, and the project's binaries including the shim and
/// the instance.
fn gate(programs: &[&str]) -> Result<(), Ignored> {
    netns_gate(programs, &["libnsocket.so", "stackroute-stackd"])
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
        // A dual-stack socket shows an IPv4 peer as [::ffff:a.b.c.d].
        .replace("[::ffff:", "")
        .replace(']', "")
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
    // Asked until it lists the download: the first samples may come before the instance has
    // started or the connection is up (CI saw an empty list at the fifth sample once).
    let mut ours = None;
    let mut last_listed = serde_json::Value::Null;
    while curl.running() {
        kernel_seen.extend(kernel_sockets_to(&cluster, internet()));
        samples += 1;
        if ours.is_none() {
            last_listed = connections(&cluster);
            ours = last_listed
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["remote"] == internet().to_string())
                .cloned();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = curl.success(LONG).unwrap();
    assert!(output.contains(&format!("200 {bytes}")), "curl: {output}");
    assert!(
        samples >= 5,
        "only {samples} ss samples during the download"
    );
    // `stackroute connections` showed it, from the instance, while it ran.
    let ours = ours.unwrap_or_else(|| {
        panic!("stackroute connections never listed it while curl ran; last: {last_listed:#}")
    });
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

    // The agent's per-workload figures, summed from the instance every 10 s.
    let received = cluster
        .wait_metric(
            "node-a1",
            r#"stackroute_lrd_userspace_bytes{workload="e2e/curl-us",direction="received"}"#,
        )
        .unwrap();
    assert!(received >= bytes as f64, "received {received} of {bytes}");

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

/// Runs `args` under the shim as `pod` on node-a1 to completion, sampling both kernels: node-a1's
/// must hold no TCP socket to `server` (any state), and the internet host's sockets on
/// `server`'s port show the client ports (the router masquerades, keeping ports). Returns (output, client ports the server saw).
fn run_on_userspace(
    cluster: &Cluster,
    pod: &str,
    args: &[&str],
    server: SocketAddr,
) -> (String, Vec<u16>) {
    let mut client_process = cluster.spawn(&client(pod), true, args).unwrap();
    let mut kernel_seen = Vec::new();
    let mut ports = Vec::new();
    while client_process.running() {
        kernel_seen.extend(kernel_sockets_to(cluster, server));
        let server_side = cluster
            .net
            .exec(INTERNET, &["ss", "-tanH"])
            .unwrap_or_default();
        // Dual-stack listeners (iperf3) show IPv4 peers as [::ffff:a.b.c.d].
        let server_side = server_side.replace("[::ffff:", "").replace(']', "");
        for line in server_side.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() >= 5
                && fields[3] == server.to_string()
                && let Some((_, port)) = fields[4].rsplit_once(':')
                && let Ok(port) = port.parse::<u16>()
                && !ports.contains(&port)
            {
                ports.push(port);
            }
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let output = client_process
        .success(LONG)
        .unwrap_or_else(|e| panic!("{pod} {args:?}: {e:#}"));
    assert!(
        kernel_seen.is_empty(),
        "{pod} {args:?}: node-a1's kernel held TCP sockets to {server}: {kernel_seen:?}"
    );
    for port in &ports {
        assert!(
            (61000..=62999).contains(port),
            "{pod} {args:?}: the server saw client port {port}, not the instance's: the kernel made it"
        );
    }
    (output, ports)
}

/// iperf3, wrk against nginx, redis-benchmark against redis-server, a python asyncio client and
/// a Node.js (libuv) client, all unmodified, under the shim on the user-space stack against
/// kernel servers on the internet host.
fn unmodified_clients_run_on_the_userspace_stack() {
    let bytes = 2 << 20;
    let (cluster, _http) = setup(Options::default(), "apps-us", bytes);
    let ip = INTERNET_IP.to_string();
    let at = |port| SocketAddr::new(IpAddr::V4(INTERNET_IP), port);
    cluster
        .wait_decision("node-a1", "apps-us", at(5201), "Userspace/BBR")
        .unwrap();
    let scratch = cluster.dir().join("apps");
    std::fs::create_dir_all(scratch.join("www")).unwrap();
    std::fs::create_dir_all(scratch.join("tmp")).unwrap();
    std::fs::write(scratch.join("www/hello"), "hello from nginx\n").unwrap();
    let scratch_text = scratch.to_string_lossy().into_owned();

    // iperf3: its control and data connections both on the instance; JSON says what arrived.
    let _iperf3 = cluster
        .spawn_plain(INTERNET, "iperf3-server", &["iperf3", "-s", "-p", "5201"])
        .unwrap();
    cluster.wait_listening(INTERNET, 5201).unwrap();
    let (output, ports) = run_on_userspace(
        &cluster,
        "apps-us",
        &["iperf3", "-c", &ip, "-p", "5201", "-t", "2", "-J"],
        at(5201),
    );
    let report: serde_json::Value = serde_json::from_str(&output).expect("iperf3 -J");
    let received = report["end"]["sum_received"]["bytes"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(received > 1e6, "iperf3 moved {received} bytes: {output}");
    assert!(ports.len() >= 2, "control and data connections: {ports:?}");

    // wrk against nginx: many requests on keep-alive connections, edge-triggered epoll.
    let config = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ use epoll; worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
         \n  server {{\n    listen {ip}:8081;\n    root {d}/www;\n  }}\n}}\n",
        d = scratch_text
    );
    std::fs::write(scratch.join("nginx.conf"), config).unwrap();
    let conf = scratch.join("nginx.conf").to_string_lossy().into_owned();
    let _nginx = cluster
        .spawn_plain(
            INTERNET,
            "nginx",
            &["nginx", "-p", &scratch_text, "-c", &conf],
        )
        .unwrap();
    cluster.wait_listening(INTERNET, 8081).unwrap();
    let url = format!("http://{ip}:8081/hello");
    let (output, _) = run_on_userspace(
        &cluster,
        "apps-us",
        &["wrk", "-t1", "-c4", "-d2s", &url],
        at(8081),
    );
    let requests: u64 = output
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(requests > 50, "wrk: {output}");
    assert!(
        !output.contains("Non-2xx") && !output.contains("Socket errors"),
        "wrk saw errors: {output}"
    );

    // redis-benchmark against redis-server.
    let _redis = cluster
        .spawn_plain(
            INTERNET,
            "redis-server",
            &[
                "redis-server",
                "--bind",
                &ip,
                "--port",
                "6380",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &scratch_text,
            ],
        )
        .unwrap();
    cluster.wait_listening(INTERNET, 6380).unwrap();
    let (output, _) = run_on_userspace(
        &cluster,
        "apps-us",
        &[
            "redis-benchmark",
            "-h",
            &ip,
            "-p",
            "6380",
            "-c",
            "4",
            "-n",
            "4000",
            "-t",
            "set,get",
            "-q",
        ],
        at(6380),
    );
    assert!(
        output.contains("SET:") && output.contains("GET:"),
        "{output}"
    );

    // python asyncio: the blob over StreamReader, hashed.
    let expected = {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import hashlib,random,sys; print(hashlib.sha256(random.Random(7).randbytes(int(sys.argv[1]))).hexdigest())",
                &bytes.to_string(),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let asyncio = format!(
        "import asyncio, hashlib\n\
         async def main():\n\
         \x20   r, w = await asyncio.open_connection('{ip}', {PORT})\n\
         \x20   w.write(b'GET /blob HTTP/1.0\\r\\n\\r\\n'); await w.drain()\n\
         \x20   data = await r.read()\n\
         \x20   body = data.split(b'\\r\\n\\r\\n', 1)[1]\n\
         \x20   print(len(body), hashlib.sha256(body).hexdigest())\n\
         asyncio.run(main())\n"
    );
    let (output, _) = run_on_userspace(
        &cluster,
        "apps-us",
        &["python3", "-c", &asyncio],
        internet(),
    );
    assert!(
        output.contains(&format!("{bytes} {expected}")),
        "asyncio client: {output}"
    );

    // Node.js (libuv): the blob over http.get, hashed.
    let node_script = format!(
        "const h = require('crypto').createHash('sha256'); let n = 0;\n\
         require('http').get('http://{ip}:{PORT}/blob', res => {{\n\
         \x20 res.on('data', c => {{ n += c.length; h.update(c); }});\n\
         \x20 res.on('end', () => console.log(n, h.digest('hex')));\n\
         }}).on('error', e => {{ console.error(e); process.exit(1); }});\n"
    );
    let (output, _) = run_on_userspace(
        &cluster,
        "apps-us",
        &["node", "-e", &node_script],
        internet(),
    );
    assert!(
        output.contains(&format!("{bytes} {expected}")),
        "node client: {output}"
    );
}

/// A Service whose only backend is the internet host's server: node-a1 has no kube-proxy and no
/// route to the ClusterIP, so only a connection that the shim resolves to the backend reaches
/// the server — and curl still reports the ClusterIP as the address it connected to.
fn a_service_cluster_ip_goes_to_its_backend_on_the_userspace_stack() {
    let (cluster, server) = setup(Options::default(), "curl-svc", 1 << 20);
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: outside, namespace: e2e}}\n\
         spec: {{clusterIP: 10.96.0.10, ports: [{{name: http, port: 80, protocol: TCP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: outside-1, namespace: e2e, labels: {{kubernetes.io/service-name: outside}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {PORT}, protocol: TCP}}]\n\
         endpoints: [{{addresses: [{INTERNET_IP}], conditions: {{ready: true}}}}]\n"
    );
    cluster.set_policy("service.yaml", &service).unwrap();
    let frontend: SocketAddr = "10.96.0.10:80".parse().unwrap();
    cluster
        .wait_decision("node-a1", "curl-svc", frontend, "Userspace/BBR")
        .unwrap();
    let mut curl = cluster
        .spawn(
            &client("curl-svc"),
            true,
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download} %{remote_ip}:%{remote_port}",
                "http://10.96.0.10/blob",
            ],
        )
        .unwrap();
    let output = curl.success(LONG).unwrap();
    assert!(
        output.contains("200 1048576 10.96.0.10:80"),
        "curl (code, bytes, the address it connected to): {output}"
    );
    let ports = client_ports(&server);
    assert_eq!(ports.len(), 1, "server saw: {}", server.output());
    assert!((61000..=62999).contains(&ports[0]), "{ports:?}");
}

/// Dual listen: a python server under the shim on node-b1 keeps its kernel listener; curl on
/// node-a1 reaches it on the user-space stack (through both nodes' instances), curl on node-a2
/// through the kernel, at the same time, from the same `accept()`. The server's `accept` reports
/// each peer's real address (the shim asks the instance who is behind its loopback
/// connection), and node-b1's kernel never holds a socket whose peer is a user-space port.
fn dual_listen_serves_user_space_and_kernel_clients_on_one_listener() {
    let bytes = 2 << 20;
    let mut cluster = Cluster::start(Options::default()).expect("the e2e cluster starts");
    cluster
        .add_pod("curl-dual", "node-a1", &["app=client"], false)
        .unwrap();
    cluster
        .add_pod("curl-kernel", "node-a2", &["app=other"], false)
        .unwrap();
    cluster
        .add_pod("web-dual", "node-b1", &["app=web"], false)
        .unwrap();
    let b1 = node("node-b1").ip;
    // The client's rule: node-b1 on the user-space stack. The server's own rule only puts the
    // user-space stack in node-b1's snapshot, which makes its listener dual.
    let policy = format!(
        "apiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: dual-client, namespace: e2e}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  rules:\n  - name: b1\n    to: [{{networks: [\"{b1}/32\"]}}]\n    transport: {{stack: Userspace, congestionControl: BBR}}\n\
         ---\napiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: dual-server, namespace: e2e}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  rules:\n  - name: out\n    to: [{{entity: World}}]\n    transport: {{stack: Userspace, congestionControl: BBR}}\n"
    );
    cluster.set_policy("dual.yaml", &policy).unwrap();
    let server_address = SocketAddr::new(IpAddr::V4(b1), PORT);
    cluster
        .wait_decision("node-a1", "curl-dual", server_address, "Userspace/BBR")
        .unwrap();
    cluster
        .wait_decision("node-b1", "web-dual", internet(), "Userspace/BBR")
        .unwrap();
    let script = cluster.dir().join("server.py");
    std::fs::write(&script, SERVER).unwrap();
    let mut server = cluster
        .spawn(
            &Workload {
                node: "node-b1",
                name: "web-dual",
                labels: &["app=web"],
            },
            true,
            &[
                "python3",
                script.to_str().unwrap(),
                &PORT.to_string(),
                &bytes.to_string(),
            ],
        )
        .unwrap();
    cluster.wait_listening(node("node-b1").host, PORT).unwrap();
    let url = format!("http://{server_address}/blob");
    let download = [
        "curl",
        "-sS",
        "--limit-rate",
        "1M",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        url.as_str(),
    ];
    // The server's instance may start only at its listen: give it a moment to be serving.
    std::thread::sleep(Duration::from_millis(500));
    let mut user_space = cluster
        .spawn(&client("curl-dual"), true, &download)
        .unwrap();
    let mut kernel = cluster
        .spawn(
            &Workload {
                node: "node-a2",
                name: "curl-kernel",
                labels: &["app=other"],
            },
            false,
            &download,
        )
        .unwrap();
    let mut b1_sockets = Vec::new();
    while user_space.running() || kernel.running() {
        let text = cluster
            .net
            .exec(node("node-b1").host, &["ss", "-tanH"])
            .unwrap_or_default();
        b1_sockets.extend(
            text.lines()
                .filter(|line| {
                    line.split_whitespace()
                        .nth(4)
                        .and_then(|peer| peer.rsplit_once(':'))
                        .and_then(|(_, port)| port.parse::<u16>().ok())
                        .is_some_and(|port| (61000..=62999).contains(&port))
                })
                .map(str::to_string),
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = user_space.success(LONG).unwrap();
    assert!(
        output.contains(&format!("200 {bytes}")),
        "user-space curl: {output}"
    );
    let output = kernel.success(LONG).unwrap();
    assert!(
        output.contains(&format!("200 {bytes}")),
        "kernel curl: {output}"
    );
    assert!(
        b1_sockets.is_empty(),
        "node-b1's kernel held sockets with a user-space peer port: {b1_sockets:?}"
    );
    // What the server's accept() said of each peer: the user-space client's real address and
    // port (node-a1, from its instance's range), the kernel client's own.
    let clients: Vec<(String, u16)> = server
        .output()
        .lines()
        .filter_map(|line| line.strip_prefix("client "))
        .filter_map(|rest| {
            let mut fields = rest.split_whitespace();
            Some((fields.next()?.to_string(), fields.next()?.parse().ok()?))
        })
        .collect();
    let a1 = node("node-a1").ip.to_string();
    let a2 = node("node-a2").ip.to_string();
    assert!(
        clients
            .iter()
            .any(|(ip, port)| *ip == a1 && (61000..=62999).contains(port)),
        "the server did not see the user-space client as {a1}:61000-62999: {clients:?}"
    );
    assert!(
        clients
            .iter()
            .any(|(ip, port)| *ip == a2 && !(61000..=62999).contains(port)),
        "the server did not see the kernel client: {clients:?}"
    );
    assert!(server.running(), "server exited: {}", server.output());
}
