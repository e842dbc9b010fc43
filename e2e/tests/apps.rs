//! Programs nobody here wrote, under the shim, across namespaces: curl and python's
//! http.server, iperf3, nginx with curl and wrk, redis-server with redis-benchmark. Every
//! assertion about a transport is what the kernel reports for the connection (`ss -tin` in the
//! client's namespace), never the shim's own word.
//!
//! The hosts default to **reno**, so `cubic` or `bbr` on a connection can only come from the
//! policy, applied by the shim (`setsockopt(TCP_CONGESTION)`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use stackroute_e2e::cluster::{Cluster, INTERNET, INTERNET_IP, Options, Workload, node, wait_for};
use stackroute_e2e::proc::Proc;
use stackroute_e2e::ss;
use stackroute_e2e::tools::netns_gate;
use testkit::Trial;

const LONG: Duration = Duration::from_secs(60);

/// Per location: same node CUBIC, same zone BBR, other zone CUBIC, internet BBR; and one
/// port-specific rule (TCP 6379, redis) that wins over the location rules: BBR everywhere.
const POLICY: &str = r#"apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: e2e-paths, namespace: e2e}
spec:
  podSelector: {matchLabels: {app: client}}
  rules:
  - name: redis
    ports: [{protocol: TCP, port: 6379}]
    transport: {stack: Kernel, congestionControl: BBR}
  - name: same-node
    to: [{pods: {podSelector: {}}}]
    location: SameNode
    transport: {stack: Kernel, congestionControl: Cubic}
  - name: same-zone
    to: [{pods: {podSelector: {}}}]
    location: SameZone
    transport: {stack: Kernel, congestionControl: BBR}
  - name: cluster
    to: [{entity: Cluster}]
    location: SameCluster
    transport: {stack: Kernel, congestionControl: Cubic}
  - name: internet
    to: [{entity: World}]
    location: External
    transport: {stack: Kernel, congestionControl: BBR}
"#;

fn main() -> std::process::ExitCode {
    let trial = |name: &str, programs: &'static [&'static str], body: fn()| {
        Trial::gated(
            name,
            move || netns_gate(programs, &["libnsocket.so"]),
            move |()| body(),
        )
    };
    testkit::run(vec![
        trial(
            "curl_and_python_http_server_get_the_transport_of_their_path",
            &["python3", "curl"],
            curl_and_python_http_server_get_the_transport_of_their_path,
        ),
        trial(
            "iperf3_client_and_server_under_the_shim",
            &["iperf3"],
            iperf3_client_and_server_under_the_shim,
        ),
        trial(
            "nginx_with_curl_and_wrk",
            &["nginx", "curl", "wrk"],
            nginx_with_curl_and_wrk,
        ),
        trial(
            "redis_with_redis_benchmark",
            &["redis-server", "redis-benchmark"],
            redis_with_redis_benchmark,
        ),
        trial(
            "a_policy_change_applies_to_new_connections_only",
            &["iperf3"],
            a_policy_change_applies_to_new_connections_only,
        ),
        trial(
            "a_static_program_gets_its_policy_through_the_kernel_hook",
            &["python3", "curl", "gcc"],
            a_static_program_gets_its_policy_through_the_kernel_hook,
        ),
        trial(
            "a_policy_change_reaches_a_hooked_program",
            &["python3", "gcc"],
            a_policy_change_reaches_a_hooked_program,
        ),
        trial(
            "without_kernel_hooks_a_static_program_runs_on_the_default",
            &["python3", "gcc"],
            without_kernel_hooks_a_static_program_runs_on_the_default,
        ),
        trial(
            "without_an_agent_applications_fall_back_to_the_kernel_and_keep_working",
            &["python3", "curl"],
            without_an_agent_applications_fall_back_to_the_kernel_and_keep_working,
        ),
    ])
}

/// The cluster (the trial's gate made sure the shim is built).
fn cluster() -> Cluster {
    Cluster::start(Options::default()).expect("the e2e cluster starts")
}

fn client<'a>(node: &'a str, name: &'a str) -> Workload<'a> {
    Workload {
        node,
        name,
        labels: &["app=client"],
    }
}

/// Runs `client` to completion while sampling `ss` in its node for connections to `peer`;
/// returns the congestion control of every connection seen and the client's output.
fn observe(
    cluster: &Cluster,
    mut client: Proc,
    host: &str,
    peer: SocketAddr,
) -> (BTreeSet<String>, String) {
    let mut seen = BTreeSet::new();
    let mut failed_samples = Vec::new();
    while client.running() {
        match ss::connections_to(&cluster.net, host, peer) {
            Ok(conns) => seen.extend(
                conns
                    .into_iter()
                    .map(|c| c.cc.unwrap_or_else(|| "none".into())),
            ),
            Err(error) => failed_samples.push(format!("{error:#}")),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut output = client
        .success(LONG)
        .unwrap_or_else(|e| panic!("{e:#}\ncontroller log:\n{}", cluster.controller_log()));
    if seen.is_empty() && !failed_samples.is_empty() {
        // Say why nothing was seen, should it come to that.
        output.push_str(&format!(
            "\n{} ss samples failed, the last: {}",
            failed_samples.len(),
            failed_samples.last().map_or("", String::as_str)
        ));
    }
    (seen, output)
}

/// [`observe`] for a client `spawn` starts, started again (up to three times in all) while no
/// sample saw its connection: nothing seen says nothing about the connection's congestion
/// control, and a CI run once saw nothing at all for a two-second download on two busy cores.
fn observe_until_seen(
    cluster: &Cluster,
    spawn: impl Fn() -> Proc,
    host: &str,
    peer: SocketAddr,
) -> (BTreeSet<String>, String) {
    let mut attempts = Vec::new();
    loop {
        let (seen, output) = observe(cluster, spawn(), host, peer);
        if !seen.is_empty() || attempts.len() == 2 {
            attempts.push(output);
            return (
                seen,
                attempts.join("\n--- run again: no sample saw the connection ---\n"),
            );
        }
        attempts.push(output);
    }
}

/// curl downloading `url` to nowhere at 1 MB/s (so `ss` can sample the connection: the 2 MiB
/// blobs take two seconds, time for a few samples even when six tests share two busy cores; at
/// 2 MB/s a CI run once saw no sample at all), printing `HTTP-CODE BYTES`.
fn curl_download(url: &str) -> [&str; 9] {
    [
        "curl",
        "-sS",
        "--limit-rate",
        "1M",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_download}",
        url,
    ]
}

/// python's http.server serving `dir` on port 8080 (of `bind`, or every address).
fn python_http_server<'a>(bind: Option<&'a str>, dir: &'a str) -> Vec<&'a str> {
    let mut args = vec!["python3", "-m", "http.server"];
    if let Some(bind) = bind {
        args.extend(["--bind", bind]);
    }
    args.extend(["--directory", dir, "8080"]);
    args
}

/// A directory `name` in the cluster's scratch space holding `blob`: `bytes` bytes of `fill`.
fn files_with_blob(cluster: &Cluster, name: &str, bytes: usize, fill: u8) -> String {
    let dir = cluster.dir().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("blob"), vec![fill; bytes]).unwrap();
    dir.to_string_lossy().into_owned()
}

/// The `web` pod on node-a1 (app=web) serving a directory with a 4 MiB `blob` from python's
/// http.server under the shim on port 8080: its address, the server and the directory.
fn web_server(cluster: &mut Cluster) -> (std::net::Ipv4Addr, Proc, String) {
    let web = cluster
        .add_pod("web", "node-a1", &["app=web"], true)
        .unwrap()
        .unwrap();
    let files = files_with_blob(cluster, "www", 4 << 20, 7);
    let server = cluster
        .spawn(
            &Workload {
                node: "node-a1",
                name: "http-server",
                labels: &["app=web"],
            },
            true,
            &python_http_server(Some(&web.to_string()), &files),
        )
        .unwrap();
    (web, server, files)
}

fn assert_cc(seen: &BTreeSet<String>, expected: &str, what: &str, output: &str) {
    let want: BTreeSet<String> = [expected.to_string()].into();
    assert_eq!(
        seen, &want,
        "{what}: the kernel showed {seen:?} for the client's connections, expected only {expected}. Client output:\n{output}"
    );
}

/// curl (under the shim) fetching a 4 MB file from python's http.server at 2 MB/s, from each
/// kind of path: same node, same zone, other zone, internet.
fn curl_and_python_http_server_get_the_transport_of_their_path() {
    let mut cluster = cluster();
    let (web, _cluster_server, files) = web_server(&mut cluster);
    for (n, host) in [("node-a1", "a1"), ("node-a2", "a2"), ("node-b1", "b1")] {
        cluster
            .add_pod(&format!("curl-{host}"), n, &["app=client"], false)
            .unwrap();
    }
    let _internet_server = cluster
        .spawn_plain(INTERNET, "internet-http", &python_http_server(None, &files))
        .unwrap();
    cluster.wait_listening("a1", 8080).unwrap();
    cluster.wait_listening(INTERNET, 8080).unwrap();
    cluster.set_policy("paths.yaml", POLICY).unwrap();

    let in_cluster = SocketAddr::new(IpAddr::V4(web), 8080);
    let internet = SocketAddr::new(IpAddr::V4(INTERNET_IP), 8080);
    let cases = [
        ("node-a1", "curl-a1", in_cluster, "Kernel/Cubic", "cubic"),
        ("node-a2", "curl-a2", in_cluster, "Kernel/BBR", "bbr"),
        ("node-b1", "curl-b1", in_cluster, "Kernel/Cubic", "cubic"),
        ("node-a1", "curl-a1", internet, "Kernel/BBR", "bbr"),
    ];
    for (node_name, pod, peer, decision, cc) in cases {
        cluster
            .wait_decision(node_name, pod, peer, decision)
            .unwrap();
        let url = format!("http://{peer}/blob");
        let curl = cluster
            .spawn(&client(node_name, pod), true, &curl_download(&url))
            .unwrap();
        let (seen, output) = observe(&cluster, curl, node(node_name).host, peer);
        assert!(output.contains("200 4194304"), "{pod} → {peer}: {output}");
        assert_cc(&seen, cc, &format!("curl {pod} → {peer}"), &output);
    }
}

/// iperf3 client and server both under the shim: zone-b → zone-a (other zone: CUBIC) and
/// zone-a → zone-a (same zone: BBR).
fn iperf3_client_and_server_under_the_shim() {
    let mut cluster = cluster();
    let sink = cluster
        .add_pod("sink", "node-a1", &["app=sink"], true)
        .unwrap()
        .unwrap();
    cluster
        .add_pod("iperf-a2", "node-a2", &["app=client"], false)
        .unwrap();
    cluster
        .add_pod("iperf-b1", "node-b1", &["app=client"], false)
        .unwrap();
    let _server = cluster
        .spawn(
            &Workload {
                node: "node-a1",
                name: "iperf3-server",
                labels: &["app=sink"],
            },
            true,
            &["iperf3", "-s", "-B", &sink.to_string(), "-p", "5201"],
        )
        .unwrap();
    cluster.wait_listening("a1", 5201).unwrap();
    cluster.set_policy("paths.yaml", POLICY).unwrap();
    let peer = SocketAddr::new(IpAddr::V4(sink), 5201);
    for (node_name, pod, decision, cc) in [
        ("node-b1", "iperf-b1", "Kernel/Cubic", "cubic"),
        ("node-a2", "iperf-a2", "Kernel/BBR", "bbr"),
    ] {
        cluster
            .wait_decision(node_name, pod, peer, decision)
            .unwrap();
        let iperf = cluster
            .spawn(
                &client(node_name, pod),
                true,
                &[
                    "iperf3",
                    "-c",
                    &sink.to_string(),
                    "-p",
                    "5201",
                    "-t",
                    "2",
                    "-J",
                ],
            )
            .unwrap();
        let (seen, output) = observe(&cluster, iperf, node(node_name).host, peer);
        let json: serde_json::Value =
            serde_json::from_str(&output[output.find('{').unwrap()..]).unwrap();
        let sent = json["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0);
        assert!(sent > 1_000_000, "{pod}: iperf3 moved {sent} bytes");
        // Both the control and the data connection go through connect(): both are decided.
        assert_cc(&seen, cc, &format!("iperf3 {pod}"), &output);
    }
}

/// nginx (its own config, in its node's namespace, master and workers under the shim) with
/// curl and wrk as clients from the same zone (BBR) and the other zone (CUBIC).
fn nginx_with_curl_and_wrk() {
    let mut cluster = cluster();
    let web = cluster
        .add_pod("nginx", "node-a1", &["app=web"], true)
        .unwrap()
        .unwrap();
    cluster
        .add_pod("wrk-a2", "node-a2", &["app=client"], false)
        .unwrap();
    cluster
        .add_pod("curl-b1", "node-b1", &["app=client"], false)
        .unwrap();
    files_with_blob(&cluster, "nginx/www", 4 << 20, 1);
    let dir = cluster.dir().join("nginx");
    let config = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ use epoll; worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp; fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;\n\
         \n  server {{\n    listen {web}:8081;\n    root {d}/www;\n    location = /hello {{ return 200 \"hello from nginx\\n\"; }}\n  }}\n}}\n",
        d = dir.display()
    );
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    std::fs::write(dir.join("nginx.conf"), config).unwrap();
    let conf = dir.join("nginx.conf").to_string_lossy().into_owned();
    let prefix = dir.to_string_lossy().into_owned();
    let mut nginx = cluster
        .spawn(
            &Workload {
                node: "node-a1",
                name: "nginx-server",
                labels: &["app=web"],
            },
            true,
            &["nginx", "-p", &prefix, "-c", &conf],
        )
        .unwrap();
    cluster
        .wait_listening("a1", 8081)
        .unwrap_or_else(|e| panic!("{e:#}: {}", nginx.output()));
    cluster.set_policy("paths.yaml", POLICY).unwrap();
    let peer = SocketAddr::new(IpAddr::V4(web), 8081);

    cluster
        .wait_decision("node-b1", "curl-b1", peer, "Kernel/Cubic")
        .unwrap();
    let url = format!("http://{peer}/blob");
    let curl = cluster
        .spawn(&client("node-b1", "curl-b1"), true, &curl_download(&url))
        .unwrap();
    let (seen, output) = observe(&cluster, curl, "b1", peer);
    assert!(output.contains("200 4194304"), "{output}");
    assert_cc(&seen, "cubic", "curl → nginx from the other zone", &output);

    cluster
        .wait_decision("node-a2", "wrk-a2", peer, "Kernel/BBR")
        .unwrap();
    let wrk = cluster
        .spawn(
            &client("node-a2", "wrk-a2"),
            true,
            &["wrk", "-t2", "-c8", "-d2s", &format!("http://{peer}/hello")],
        )
        .unwrap();
    let (seen, output) = observe(&cluster, wrk, "a2", peer);
    let requests: u64 = output
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(requests > 100, "wrk: {output}");
    assert!(!output.contains("Non-2xx"), "wrk saw errors: {output}");
    assert_cc(&seen, "bbr", "wrk → nginx from the same zone", &output);
    assert!(nginx.running(), "nginx exited: {}", nginx.output());
}

/// redis-server under the shim and redis-benchmark from the other zone: the port rule (6379 →
/// BBR) wins over the location rule (other zone → CUBIC).
fn redis_with_redis_benchmark() {
    let mut cluster = cluster();
    let db = cluster
        .add_pod("redis", "node-a2", &["app=db"], true)
        .unwrap()
        .unwrap();
    cluster
        .add_pod("bench-b1", "node-b1", &["app=client"], false)
        .unwrap();
    let dir = cluster.dir().join("redis");
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.to_string_lossy().into_owned();
    let mut redis = cluster
        .spawn(
            &Workload {
                node: "node-a2",
                name: "redis-server",
                labels: &["app=db"],
            },
            true,
            &[
                "redis-server",
                "--bind",
                &db.to_string(),
                "--port",
                "6379",
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &dir,
            ],
        )
        .unwrap();
    cluster
        .wait_listening("a2", 6379)
        .unwrap_or_else(|e| panic!("{e:#}: {}", redis.output()));
    cluster.set_policy("paths.yaml", POLICY).unwrap();
    let peer = SocketAddr::new(IpAddr::V4(db), 6379);
    cluster
        .wait_decision("node-b1", "bench-b1", peer, "Kernel/BBR")
        .unwrap();
    let bench = cluster
        .spawn(
            &client("node-b1", "bench-b1"),
            true,
            &[
                "redis-benchmark",
                "-h",
                &db.to_string(),
                "-p",
                "6379",
                "-c",
                "10",
                "-n",
                "60000",
                "-t",
                "set,get",
                "-q",
            ],
        )
        .unwrap();
    let (seen, output) = observe(&cluster, bench, "b1", peer);
    assert!(
        output.contains("SET:") && output.contains("GET:"),
        "{output}"
    );
    assert_cc(&seen, "bbr", "redis-benchmark → redis-server", &output);
    assert!(redis.running(), "redis exited: {}", redis.output());
}

/// A policy change applies to new connections; a connection opened before keeps its
/// transport for its life.
fn a_policy_change_applies_to_new_connections_only() {
    let mut cluster = cluster();
    let sink = cluster
        .add_pod("sink", "node-b1", &["app=sink"], true)
        .unwrap()
        .unwrap();
    cluster
        .add_pod("mover", "node-a1", &["app=client"], false)
        .unwrap();
    let _servers: Vec<Proc> = [5201u16, 5202]
        .iter()
        .map(|port| {
            cluster
                .spawn_plain(
                    "b1",
                    &format!("iperf3-{port}"),
                    &[
                        "iperf3",
                        "-s",
                        "-B",
                        &sink.to_string(),
                        "-p",
                        &port.to_string(),
                    ],
                )
                .unwrap()
        })
        .collect();
    cluster.wait_listening("b1", 5201).unwrap();
    cluster.wait_listening("b1", 5202).unwrap();
    let policy = |cc: &str| {
        format!(
            "apiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {{name: mover, namespace: e2e}}\nspec:\n  podSelector: {{matchLabels: {{app: client}}}}\n  rules:\n  - name: all\n    transport: {{stack: Kernel, congestionControl: {cc}}}\n"
        )
    };
    let first = SocketAddr::new(IpAddr::V4(sink), 5201);
    let second = SocketAddr::new(IpAddr::V4(sink), 5202);
    cluster.set_policy("mover.yaml", &policy("BBR")).unwrap();
    cluster
        .wait_decision("node-a1", "mover", first, "Kernel/BBR")
        .unwrap();
    let mover = client("node-a1", "mover");
    let sink_s = sink.to_string();
    let long = cluster
        .spawn(
            &mover,
            true,
            &[
                "iperf3", "-c", &sink_s, "-p", "5201", "-t", "6", "-b", "20M",
            ],
        )
        .unwrap();
    wait_for("the first connection", Duration::from_secs(10), || {
        let conns = ss::connections_to(&cluster.net, "a1", first).ok()?;
        (conns.len() >= 2).then_some(())
    })
    .unwrap();

    cluster.set_policy("mover.yaml", &policy("Cubic")).unwrap();
    cluster
        .wait_decision("node-a1", "mover", second, "Kernel/Cubic")
        .unwrap();
    let short = cluster
        .spawn(
            &mover,
            true,
            &[
                "iperf3", "-c", &sink_s, "-p", "5202", "-t", "2", "-b", "20M",
            ],
        )
        .unwrap();
    let (new_seen, output) = observe(&cluster, short, "a1", second);
    assert_cc(
        &new_seen,
        "cubic",
        "a connection opened after the change",
        &output,
    );
    let old: BTreeSet<String> = ss::connections_to(&cluster.net, "a1", first)
        .unwrap()
        .into_iter()
        .map(|c| c.cc.unwrap_or_default())
        .collect();
    assert_cc(
        &old,
        "bbr",
        "the connection opened before the change (still open)",
        "",
    );
    let (_, output) = observe(&cluster, long, "a1", first);
    assert!(output.contains("receiver"), "{output}");
}

/// Fail-open: with no agent on the node (never started: `stackroute run` warns and runs the
/// command; the shim finds no snapshot), the application works exactly as without the shim and
/// its connections use the host's default. With the agent killed after the policy reached it,
/// traffic keeps flowing.
fn without_an_agent_applications_fall_back_to_the_kernel_and_keep_working() {
    let mut cluster = cluster();
    let web = cluster
        .add_pod("web", "node-b1", &["app=web"], true)
        .unwrap()
        .unwrap();
    cluster
        .add_pod("curl-a1", "node-a1", &["app=client"], false)
        .unwrap();
    cluster
        .add_pod("curl-a2", "node-a2", &["app=client"], false)
        .unwrap();
    let files = files_with_blob(&cluster, "www", 2 << 20, 9);
    let web_ip = web.to_string();
    let _server = cluster
        .spawn_plain(
            "b1",
            "http-server",
            &python_http_server(Some(&web_ip), &files),
        )
        .unwrap();
    cluster.wait_listening("b1", 8080).unwrap();
    cluster.set_policy("paths.yaml", POLICY).unwrap();
    let peer = SocketAddr::new(IpAddr::V4(web), 8080);
    let url = format!("http://{peer}/blob");
    let curl_args = curl_download(&url);
    cluster
        .wait_decision("node-a1", "curl-a1", peer, "Kernel/Cubic")
        .unwrap();
    cluster
        .wait_decision("node-a2", "curl-a2", peer, "Kernel/Cubic")
        .unwrap();

    // The agent of node-a1 crashes (its published files stay): traffic keeps flowing.
    cluster.kill_agent("node-a1");
    let curl = || {
        cluster
            .spawn(&client("node-a1", "curl-a1"), true, &curl_args)
            .unwrap()
    };
    let (seen, output) = observe_until_seen(&cluster, curl, "a1", peer);
    assert!(output.contains("200 2097152"), "agent killed: {output}");
    assert!(
        seen.iter().all(|cc| cc == "cubic" || cc == "reno") && !seen.is_empty(),
        "agent killed: {seen:?}"
    );

    // node-a2 has no agent at all: an empty socket directory.
    cluster.kill_agent("node-a2");
    let dir = cluster.socket_dir("node-a2");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let curl = || {
        cluster
            .spawn(&client("node-a2", "curl-a2"), true, &curl_args)
            .unwrap()
    };
    let (seen, output) = observe_until_seen(&cluster, curl, "a2", peer);
    assert!(output.contains("200 2097152"), "no agent: {output}");
    assert_cc(&seen, "reno", "no agent: the host's default", &output);
}

/// `programs/static_get.c` built with `gcc -static` into the cluster's scratch space.
fn static_get(cluster: &Cluster) -> String {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/programs/static_get.c");
    let binary = cluster.dir().join("static_get");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(source)
        .status()
        .expect("gcc");
    assert!(built.success(), "gcc -static {source}");
    binary.to_string_lossy().into_owned()
}

/// The web server, pod static-a2 on node-a2 (same zone), the static client built, the paths
/// policy in force (BBR for static-a2 → web): the web pod's address, the server, the binary.
fn static_client_on_a2(cluster: &mut Cluster) -> (std::net::Ipv4Addr, Proc, String) {
    let (web, server, _) = web_server(cluster);
    cluster
        .add_pod("static-a2", "node-a2", &["app=client"], false)
        .unwrap();
    let binary = static_get(cluster);
    cluster.wait_listening("a1", 8080).unwrap();
    cluster.set_policy("paths.yaml", POLICY).unwrap();
    let peer = SocketAddr::new(IpAddr::V4(web), 8080);
    cluster
        .wait_decision("node-a2", "static-a2", peer, "Kernel/BBR")
        .unwrap();
    (web, server, binary)
}

/// A new revision reaches a running program's kernel hook: the static client downloads on the
/// same-zone path (BBR), the policy changes that path to Reno while it pauses, and its second
/// connection runs Reno — set by the hook (counted `applied` twice), not the host's default.
fn a_policy_change_reaches_a_hooked_program() {
    let mut cluster = cluster();
    let (web, _server, binary) = static_client_on_a2(&mut cluster);
    let peer = SocketAddr::new(IpAddr::V4(web), 8080);
    let mut hooked = cluster
        .spawn(
            &client("node-a2", "static-a2"),
            true,
            &[&binary, &web.to_string(), "8080", "/blob", "12"],
        )
        .unwrap();
    // Each connection's congestion control, by its local port.
    let mut seen: BTreeMap<u16, String> = BTreeMap::new();
    let sample = |seen: &mut BTreeMap<u16, String>| {
        if let Ok(conns) = ss::connections_to(&cluster.net, "a2", peer) {
            for c in conns {
                seen.insert(c.local.port(), c.cc.unwrap_or_else(|| "none".into()));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    wait_for("the first download", LONG, || {
        sample(&mut seen);
        hooked.output().contains("bytes ").then_some(())
    })
    .unwrap();
    let first: BTreeSet<String> = seen.values().cloned().collect();
    let first_ports: Vec<u16> = seen.keys().copied().collect();
    let same_zone_bbr =
        "    location: SameZone\n    transport: {stack: Kernel, congestionControl: BBR}";
    assert!(POLICY.contains(same_zone_bbr));
    let reno = POLICY.replace(
        same_zone_bbr,
        "    location: SameZone\n    transport: {stack: Kernel, congestionControl: Reno}",
    );
    cluster.set_policy("paths.yaml", &reno).unwrap();
    cluster
        .wait_decision("node-a2", "static-a2", peer, "Kernel/Reno")
        .unwrap();
    while hooked.running() {
        sample(&mut seen);
    }
    let output = hooked.success(LONG).unwrap();
    let second: BTreeSet<String> = seen
        .iter()
        .filter(|(port, _)| !first_ports.contains(port))
        .map(|(_, cc)| cc.clone())
        .collect();
    assert_cc(
        &first,
        "bbr",
        "the first connection (revision with BBR)",
        &output,
    );
    assert_cc(
        &second,
        "reno",
        "the second connection (revision with Reno)",
        &output,
    );
    assert_eq!(output.matches("bytes 4194").count(), 2, "{output}");
    let port = cluster.agent_metrics_port("node-a2");
    wait_for(
        "both connections counted applied by the hook",
        Duration::from_secs(15),
        || {
            let metrics = stackroute_e2e::cluster::http_get(port, "/metrics").ok()?.1;
            metrics
                .lines()
                .find_map(|l| {
                    l.strip_prefix(
                        "stackroute_lrd_kernel_hook_connections_total{outcome=\"applied\"} ",
                    )?
                    .trim()
                    .parse::<f64>()
                    .ok()
                })
                .filter(|applied| *applied == 2.0)
        },
    )
    .unwrap();
}

/// With kernel hooks off (`--max-kernel-hooks 0`, what a node without BPF or cgroup v2 answers
/// too), `stackroute run` says why and runs the static program anyway, on the host's default;
/// the agent counts it `unaccelerated`.
fn without_kernel_hooks_a_static_program_runs_on_the_default() {
    let mut cluster = Cluster::start(Options {
        agent_args: vec!["--max-kernel-hooks".into(), "0".into()],
        ..Options::default()
    })
    .expect("the e2e cluster starts");
    let (web, _server, binary) = static_client_on_a2(&mut cluster);
    let peer = SocketAddr::new(IpAddr::V4(web), 8080);
    let client = cluster
        .spawn(
            &client("node-a2", "static-a2"),
            true,
            &[&binary, &web.to_string(), "8080", "/blob"],
        )
        .unwrap();
    let (seen, output) = observe(&cluster, client, "a2", peer);
    assert!(
        output.contains("no kernel hook: this agent attaches no kernel hooks"),
        "stackroute run did not say why there is no hook:\n{output}"
    );
    assert!(output.contains("bytes 4194"), "{output}");
    assert_cc(&seen, "reno", "no kernel hook: the host's default", &output);
    cluster
        .wait_metric(
            "node-a2",
            "stackroute_lrd_fallback_reports_total{reason=\"unaccelerated\"} ",
        )
        .unwrap();
}

/// A statically linked client (which LD_PRELOAD never reaches, like a Go program) under
/// `stackroute run`: the agent attaches its kernel hook, and the kernel shows the congestion
/// control the policy picks — the same as curl under the shim on that path (BBR, same zone).
/// On the other-zone path the policy's CUBIC is not in `tcp_allowed_congestion_control` here:
/// the hook, which applies what an unprivileged program could set, counts `no-capability` and
/// leaves the host's default (curl as root under the shim can set CUBIC; a pod's process could
/// not). Once the client exits its hook is detached.
fn a_static_program_gets_its_policy_through_the_kernel_hook() {
    let mut cluster = cluster();
    let (web, _server, _) = web_server(&mut cluster);
    for (n, host) in [("node-a2", "a2"), ("node-b1", "b1")] {
        cluster
            .add_pod(&format!("static-{host}"), n, &["app=client"], false)
            .unwrap();
    }
    let binary = static_get(&cluster);
    let web_ip = web.to_string();
    cluster.wait_listening("a1", 8080).unwrap();
    cluster.set_policy("paths.yaml", POLICY).unwrap();
    let peer = SocketAddr::new(IpAddr::V4(web), 8080);
    let host_port = |node_name: &str| cluster.agent_metrics_port(node_name);
    let metric = |port: u16, series: &str| -> Option<f64> {
        let metrics = stackroute_e2e::cluster::http_get(port, "/metrics").ok()?.1;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse::<f64>().ok())
    };
    for (node_name, pod, decision, hook_cc, shim_cc) in [
        ("node-a2", "static-a2", "Kernel/BBR", "bbr", Some("bbr")),
        ("node-b1", "static-b1", "Kernel/Cubic", "reno", None),
    ] {
        cluster
            .wait_decision(node_name, pod, peer, decision)
            .unwrap();
        let host = node(node_name).host;
        let hooked = cluster
            .spawn(
                &client(node_name, pod),
                true,
                &[&binary, &web_ip, "8080", "/blob"],
            )
            .unwrap();
        // While it runs, the agent names its hook, and explain says the hook decides for it.
        let socket_dir = cluster.socket_dir(node_name);
        let socket_dir = socket_dir.to_str().unwrap();
        let cli = |args: &[&str]| {
            let output = std::process::Command::new(&cluster.bins.cli)
                .args(args)
                .output()
                .expect("stackroute runs");
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        let listed = wait_for(
            &format!("{pod}'s kernel hook in stackroute connections"),
            Duration::from_secs(10),
            || {
                let json = cli(&[
                    "connections",
                    "--output",
                    "json",
                    "--socket-dir",
                    socket_dir,
                ]);
                let lines: serde_json::Value = serde_json::from_str(&json).ok()?;
                lines.as_array()?.iter().find_map(|line| {
                    (line["path"] == "kernel-hook" && line["workload"] == format!("e2e/{pod}"))
                        .then(|| line["cgroup"].as_str().unwrap_or("").to_string())
                })
            },
        )
        .unwrap();
        let explained = cli(&[
            "explain",
            "--agent",
            socket_dir,
            "--from",
            &format!("e2e/{pod}"),
            "--to",
            &peer.to_string(),
        ]);
        assert!(
            explained.contains(&format!("the kernel hook attached to cgroup {listed}")),
            "explain --agent does not name {pod}'s kernel hook ({listed}):\n{explained}"
        );
        let (seen, output) = observe(&cluster, hooked, host, peer);
        assert!(
            output.contains("kernel hook applies"),
            "{pod}: stackroute run did not attach the kernel hook:\n{output}"
        );
        assert!(output.contains("bytes 4194"), "{pod} → {peer}: {output}");
        assert_cc(
            &seen,
            hook_cc,
            &format!("static client (kernel hook) {pod} → {peer}"),
            &output,
        );
        if let Some(shim_cc) = shim_cc {
            let shimmed = cluster
                .spawn(
                    &client(node_name, pod),
                    true,
                    &curl_download(&format!("http://{peer}/blob")),
                )
                .unwrap();
            let (shim_seen, output) = observe(&cluster, shimmed, host, peer);
            assert_cc(
                &shim_seen,
                shim_cc,
                &format!("curl (shim) {pod} → {peer}"),
                &output,
            );
            assert_eq!(seen, shim_seen, "{pod}: the hook and the shim disagree");
        }
        // The client has exited: its hook goes with it, its connections counted.
        let port = host_port(node_name);
        let counted = if shim_cc.is_some() {
            "stackroute_lrd_kernel_hook_connections_total{outcome=\"applied\"} "
        } else {
            "stackroute_lrd_fallback_reports_total{reason=\"no-capability\"} "
        };
        wait_for(
            &format!("{node_name}: the kernel hook detached, {counted}≥ 1"),
            Duration::from_secs(15),
            || {
                (metric(port, "stackroute_lrd_kernel_hooks ")? == 0.0
                    && metric(port, counted)? >= 1.0)
                    .then_some(())
            },
        )
        .unwrap();
    }
}
