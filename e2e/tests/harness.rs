//! The harness itself: topology, impairments, cleanup, the control plane per node, and that
//! `ss` reads the congestion control a connection really uses.

use std::net::SocketAddr;
use std::time::Duration;

use stackroute_e2e::cluster::{Cluster, INTERNET, INTERNET_IP, INTERNET_LINK, Options, ROUTER};
use stackroute_e2e::net::Impairment;
use stackroute_e2e::ss;
use stackroute_e2e::tools::netns_gate;
use testkit::Trial;

const SECS: Duration = Duration::from_secs(30);

fn main() -> std::process::ExitCode {
    let trial = |name: &str, programs: &'static [&'static str], body: fn()| {
        Trial::gated(name, move || netns_gate(programs, &[]), move |()| body())
    };
    testkit::run(vec![
        trial(
            "every_host_reaches_every_other_and_drop_removes_everything",
            &["python3", "curl"],
            every_host_reaches_every_other_and_drop_removes_everything,
        ),
        trial(
            "a_panicking_test_still_removes_its_namespaces_and_processes",
            &[],
            a_panicking_test_still_removes_its_namespaces_and_processes,
        ),
        trial(
            "the_internet_link_is_rate_limited_and_lossy",
            &["iperf3"],
            the_internet_link_is_rate_limited_and_lossy,
        ),
        trial(
            "ss_reports_the_congestion_control_the_sender_chose",
            &["iperf3"],
            ss_reports_the_congestion_control_the_sender_chose,
        ),
    ])
}

fn namespaces() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn every_host_reaches_every_other_and_drop_removes_everything() {
    let mut cluster = Cluster::start(Options::default()).unwrap();
    let ip = cluster
        .add_pod("web", "node-a1", &["app=web"], true)
        .unwrap()
        .unwrap();
    let server = cluster
        .spawn_plain(
            "a1",
            "http-server",
            &[
                "python3",
                "-m",
                "http.server",
                "--bind",
                &ip.to_string(),
                "8080",
            ],
        )
        .unwrap();
    cluster.wait_listening("a1", 8080).unwrap();
    for host in ["a1", "a2", "b1", INTERNET] {
        let body = cluster
            .net
            .exec(
                host,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    &format!("http://{ip}:8080/"),
                ],
            )
            .unwrap_or_else(|e| panic!("{host} → {ip}: {e:#}"));
        assert!(body.contains("Directory listing"), "{host}: {body}");
    }
    let ours: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| n.starts_with(&cluster.net.ns("")))
        .collect();
    assert_eq!(ours.len(), 5, "{ours:?}");
    let dir = cluster.dir().to_path_buf();
    let pid = server.pid();
    drop(server);
    drop(cluster);
    assert!(!dir.exists(), "the temporary directory is removed");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    let left: Vec<String> = namespaces()
        .into_iter()
        .filter(|n| ours.contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

fn a_panicking_test_still_removes_its_namespaces_and_processes() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let cluster = Cluster::start(Options {
            control_plane: false,
            ..Options::default()
        })
        .unwrap();
        let sleeper = cluster
            .spawn_plain("a2", "sleeper", &["sleep", "600"])
            .unwrap();
        tx.send((cluster.net.ns(""), sleeper.pid())).unwrap();
        panic!("deliberate");
    })
    .join();
    assert!(result.is_err());
    let (prefix, pid) = rx.recv().unwrap();
    assert!(namespaces().iter().all(|n| !n.starts_with(&prefix)));
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

fn the_internet_link_is_rate_limited_and_lossy() {
    let impairment = Impairment {
        loss: 0.01,
        rate_mbit: Some(20),
    };
    let cluster = Cluster::start(Options {
        internet: impairment,
        control_plane: false,
        ..Options::default()
    })
    .unwrap();
    let _server = cluster
        .spawn_plain(INTERNET, "iperf3-server", &["iperf3", "-s", "-p", "5201"])
        .unwrap();
    cluster.wait_listening(INTERNET, 5201).unwrap();
    let out = cluster
        .net
        .exec(
            "a1",
            &[
                "iperf3",
                "-c",
                &INTERNET_IP.to_string(),
                "-p",
                "5201",
                "-t",
                "2",
                "-C",
                "bbr",
                "-J",
            ],
        )
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mbit = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e6;
    assert!(
        mbit < 21.0 && mbit > 5.0,
        "{mbit} Mbit/s through a 20 Mbit/s bucket"
    );
    let counters = cluster
        .net
        .exec(
            ROUTER,
            &[
                "iptables",
                "-L",
                &format!("sr-loss-{INTERNET_LINK}"),
                "-v",
                "-n",
                "-x",
            ],
        )
        .unwrap();
    let dropped: u64 = counters
        .lines()
        .find(|l| l.contains("DROP"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(dropped > 0, "{counters}");
    // Nothing leaked into the host's own tables.
    let host_rules = std::process::Command::new("iptables")
        .args(["-S"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&host_rules.stdout).contains("sr-loss-"));
}

fn ss_reports_the_congestion_control_the_sender_chose() {
    let mut cluster = Cluster::start(Options {
        control_plane: false,
        ..Options::default()
    })
    .unwrap();
    let ip = cluster
        .add_pod("sink", "node-b1", &[], true)
        .unwrap()
        .unwrap();
    let _server = cluster
        .spawn_plain(
            "b1",
            "iperf3-server",
            &["iperf3", "-s", "-B", &ip.to_string(), "-p", "5201"],
        )
        .unwrap();
    cluster.wait_listening("b1", 5201).unwrap();
    let peer = SocketAddr::from((ip, 5201));
    let ip = ip.to_string();
    for cc in ["bbr", "cubic", "default"] {
        let mut args = vec!["iperf3", "-c", &ip, "-p", "5201", "-t", "2"];
        if cc != "default" {
            args.extend(["-C", cc]);
        }
        let mut client = cluster.spawn_plain("a1", "iperf3-client", &args).unwrap();
        let expected = if cc == "default" { "reno" } else { cc };
        // iperf3 applies -C to its data connection only; the control connection keeps the
        // host's default (reno here). The data connection can be sampled before iperf3 has set
        // its congestion control, so this waits for a sample that shows it.
        let mut last = Vec::new();
        let seen = stackroute_e2e::cluster::wait_for("the iperf3 data connection", SECS, || {
            let conns = ss::connections_to(&cluster.net, "a1", peer).ok()?;
            let shows = conns.len() >= 2 && conns.iter().any(|c| c.cc.as_deref() == Some(expected));
            if shows {
                Some(conns)
            } else {
                last = conns;
                None
            }
        })
        .unwrap_or_else(|e| panic!("{cc}: {e:#}; last sample: {last:?}"));
        client.success(SECS).unwrap();
        assert!(
            seen.iter()
                .all(|c| matches!(c.cc.as_deref(), Some(x) if x == expected || x == "reno")),
            "{cc}: {seen:?}"
        );
    }
}
