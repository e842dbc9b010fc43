//! The RDMA upgrade between two shims, end to end across network namespaces: a client pod
//! (`trainer`, node-a1) whose policy puts connections to the `ps` pod (node-a2) on
//! `{stack: RDMA, fallback: [{stack: Kernel, congestionControl: BBR}]}`, both ends real socket
//! programs (`programs/upgrade_peer.py`) under `stackroute run`.
//!
//! This machine has no RDMA device, so no connection here ever runs on RDMA. What is tested is
//! everything around it: who proposes (only to a server registered as an upgrade endpoint),
//! every decline reaching the client with the decliner's reason, the deadline, and that the
//! application bytes on both sides are exactly what the other application sent (the exchange
//! is stripped, a late answer too). Where a test needs an end that says "capable" or an RDMA
//! connect that fails, the verbs layer is `libstackroute_rdma_fault.so`
//! (`rdma/fault-provider`): a fault-injecting provider that never moves a byte. Nothing here
//! counts as RDMA working.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use stackroute_e2e::cluster::{Cluster, Options, Workload, wait_for};
use stackroute_e2e::proc::Proc;
use stackroute_e2e::tools::netns_gate;
use testkit::Trial;

const POLICY: &str = r#"apiVersion: stackroute.dev/v1alpha1
kind: StackRoute
metadata: {name: trainers, namespace: e2e}
spec:
  podSelector: {matchLabels: {app: trainer}}
  rules:
  - name: parameter-servers
    to: [{pods: {podSelector: {matchLabels: {app: ps}}}}]
    transport: {stack: RDMA, fallback: [{stack: Kernel, congestionControl: BBR}]}
"#;

/// The reply of an intact exchange, and what the server read first ("ping\n" in hex).
const REPLY: &str = "reply ECHO ping";
const FIRST: &str = "first 70696e670a";

fn main() -> std::process::ExitCode {
    let trial = |name: &str, body: fn()| {
        Trial::gated(
            name,
            || netns_gate(&["python3"], &["libnsocket.so"]),
            move |()| body(),
        )
    };
    testkit::run(vec![
        trial(
            "every_decline_reaches_the_client_and_the_bytes_are_intact",
            every_decline_reaches_the_client_and_the_bytes_are_intact,
        ),
        trial(
            "an_accepted_upgrade_that_cannot_connect_falls_back_within_the_deadline",
            an_accepted_upgrade_that_cannot_connect_falls_back_within_the_deadline,
        ),
        trial(
            "peers_without_the_upgrade_never_see_its_bytes",
            peers_without_the_upgrade_never_see_its_bytes,
        ),
        trial(
            "late_answers_and_servers_that_speak_first_are_stripped",
            late_answers_and_servers_that_speak_first_are_stripped,
        ),
    ])
}

struct Lab {
    cluster: Cluster,
    ps: Ipv4Addr,
    fault: PathBuf,
    verbs: PathBuf,
}

fn lab() -> Lab {
    let mut cluster = Cluster::start(Options::default()).expect("the e2e cluster starts");
    cluster
        .add_pod("trainer", "node-a1", &["app=trainer"], false)
        .unwrap();
    let ps = cluster
        .add_pod("ps", "node-a2", &["app=ps"], true)
        .unwrap()
        .unwrap();
    cluster.set_policy("rdma.yaml", POLICY).unwrap();
    cluster
        .wait_decision(
            "node-a1",
            "trainer",
            SocketAddr::from((ps, 9000)),
            "RDMA/Default",
        )
        .unwrap();
    let fault = testkit::library(
        "stackroute-rdma-fault-provider",
        "libstackroute_rdma_fault.so",
    );
    let verbs = testkit::library("stackroute-rdma-verbs", "libstackroute_rdma.so");
    Lab {
        cluster,
        ps,
        fault,
        verbs,
    }
}

impl Lab {
    fn script() -> &'static str {
        concat!(env!("CARGO_MANIFEST_DIR"), "/programs/upgrade_peer.py")
    }

    /// The fault provider's environment with `faults`.
    fn faulty<'a>(&'a self, faults: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("STACKROUTE_RDMA_PROVIDER", self.fault.to_str().unwrap()),
            ("STACKROUTE_RDMA_FAULTS", faults),
        ]
    }

    /// The real verbs provider's environment (rdma-core: on this machine it finds no device).
    fn verbs(&self) -> Vec<(&str, &str)> {
        vec![("STACKROUTE_RDMA_PROVIDER", self.verbs.to_str().unwrap())]
    }

    /// `upgrade_peer.py serve` on the ps pod's address (under the shim, as workload `ps`, when
    /// `shim`), once it listens.
    fn server(&self, port: u16, shim: bool, env: &[(&str, &str)], extra: &[&str]) -> Proc {
        let (ip, port_text) = (self.ps.to_string(), port.to_string());
        let mut args = vec!["python3", Self::script(), "serve", &ip, &port_text];
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("STACKROUTE_LOG", "debug"));
        let server = if shim {
            let ps = Workload {
                node: "node-a2",
                name: "ps",
                labels: &["app=ps"],
            };
            self.cluster.spawn_with(&ps, true, &env, &args).unwrap()
        } else {
            self.cluster
                .spawn_plain("a2", "plain-server", &args)
                .unwrap()
        };
        self.cluster.wait_listening("a2", port).unwrap();
        server
    }

    /// `upgrade_peer.py ask` from the trainer pod to the ps pod's `port`: its output (stdout and
    /// the shim's debug lines).
    fn ask(&self, port: u16, shim: bool, env: &[(&str, &str)], extra: &[&str]) -> String {
        let (ip, port_text) = (self.ps.to_string(), port.to_string());
        let mut args = vec!["python3", Self::script(), "ask", &ip, &port_text];
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("STACKROUTE_LOG", "debug"));
        let trainer = Workload {
            node: "node-a1",
            name: "trainer",
            labels: &["app=trainer"],
        };
        let mut client = self
            .cluster
            .spawn_with(&trainer, shim, &env, &args)
            .unwrap();
        client
            .success(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e:#}\nclient output:\n{}", client.output()))
    }

    /// Asks until the client's shim ran the exchange (the server's registration as an upgrade
    /// endpoint has reached node-a1's agent): that run's output.
    fn ask_negotiated(&self, port: u16, env: &[(&str, &str)], extra: &[&str]) -> String {
        let mut last = String::new();
        wait_for(
            &format!("the server on port {port} known as an RDMA upgrade endpoint"),
            Duration::from_secs(20),
            || {
                last = self.ask(port, true, env, extra);
                if !last.contains("fallback=peer-not-registered") {
                    return Some(last.clone());
                }
                std::thread::sleep(Duration::from_millis(200));
                None
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\nlast client output:\n{last}"))
    }
}

impl Lab {
    /// The RDMA upgrade attempts `stackroute connections --output json` lists for `node`.
    fn upgrade_attempts(&self, node: &str) -> Vec<serde_json::Value> {
        let output = stackroute_e2e::proc::run(
            std::process::Command::new(&self.cluster.bins.cli)
                .arg("connections")
                .arg("--socket-dir")
                .arg(self.cluster.socket_dir(node))
                .args(["--output", "json"]),
            Duration::from_secs(10),
        )
        .unwrap();
        let lines: Vec<serde_json::Value> =
            serde_json::from_str(&output).unwrap_or_else(|e| panic!("{e}: {output}"));
        lines
            .into_iter()
            .filter(|line| line["path"] == "rdma-upgrade")
            .collect()
    }
}

/// The client's `reason=… peer-reason=…` of its upgrade line.
fn upgrade_line(output: &str) -> &str {
    output
        .lines()
        .find(|line| line.contains("rdma upgrade with"))
        .unwrap_or_else(|| panic!("no upgrade line in:\n{output}"))
}

/// Asserts that the server's application read only what the clients sent ("ping\n" each
/// time, never an upgrade byte); how many connections it read.
fn served_only_pings(served: &str) -> usize {
    let firsts: Vec<&str> = served.lines().filter(|l| l.starts_with("first ")).collect();
    assert!(!firsts.is_empty(), "the server read nothing:\n{served}");
    assert!(
        firsts.iter().all(|l| *l == FIRST),
        "the server read more than the client sent:\n{served}"
    );
    firsts.len()
}

/// The server (an RDMA pod: a verbs provider is configured, so its listeners are upgrade
/// endpoints) declines for its own reason — no device, no GID, too little locked memory; and
/// with the real rdma-core provider, no device as libibverbs says — and the client hears it;
/// both applications read exactly what the other sent.
fn every_decline_reaches_the_client_and_the_bytes_are_intact() {
    let lab = lab();
    let client_env = lab.faulty("probe=ok");
    let no_device = lab.faulty("probe=no-device");
    let no_gid = lab.faulty("probe=no-gid");
    let memlock = lab.faulty("probe=memlock");
    let cases = [
        (9101, no_device, "no-device"),
        (9102, no_gid, "no-gid"),
        (9103, memlock, "memlock"),
        // The real provider: libibverbs finds no device on this machine (ENOSYS).
        (9104, lab.verbs(), "no-device"),
    ];
    let mut servers = Vec::new();
    for (port, server_env, reason) in &cases {
        let (port, reason) = (*port, *reason);
        let server = lab.server(port, true, server_env, &[]);
        let output = lab.ask_negotiated(port, &client_env, &[]);
        assert!(output.contains(REPLY), "port {port}: {output}");
        let line = upgrade_line(&output);
        assert!(
            line.contains(&format!("reason=peer-declined peer-reason={reason}")),
            "{line}"
        );
        assert!(output.contains("transport=Kernel/BBR"), "{output}");
        let served = server.output();
        served_only_pings(&served);
        assert!(
            served.contains(&format!("reason={reason} peer-reason=-;")),
            "{served}"
        );
        servers.push(server);
    }
    lab.cluster
        .wait_metric(
            "node-a1",
            r#"stackroute_lrd_fallback_reports_total{reason="peer-declined"}"#,
        )
        .unwrap();
    // A server that declined for a lasting reason gets no second proposal from the same
    // process for a while: the next connection falls back at once.
    let output = lab.ask(9101, true, &client_env, &["--repeat", "2"]);
    assert_eq!(output.matches(REPLY).count(), 2, "{output}");
    assert_eq!(output.matches("rdma upgrade with").count(), 1, "{output}");
    assert!(output.contains("fallback=peer-declined"), "{output}");
    // Each attempt as `stackroute connections` lists it (the clients reported at exit).
    let attempts = lab.upgrade_attempts("node-a1");
    for reason in ["no-device", "no-gid", "memlock"] {
        assert!(
            attempts.iter().any(|a| a["role"] == "client"
                && a["workload"] == "e2e/trainer"
                && a["reason"] == "peer-declined"
                && a["peerReason"] == reason
                && a["remote"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&lab.ps.to_string()))),
            "no client attempt declined for {reason}: {attempts:#?}"
        );
    }
}

/// The server accepts (the fault provider says it can); the client's RDMA connect fails, hangs
/// past the deadline, or succeeds where this build has no data path: each time the connection
/// carries on as TCP, and `connect` returned within the deadline.
fn an_accepted_upgrade_that_cannot_connect_falls_back_within_the_deadline() {
    let lab = lab();
    let server_env = lab.faulty("probe=ok");
    let server = lab.server(9110, true, &server_env, &[]);
    let cases = [
        ("probe=ok,connect=error", "rdma-error"),
        ("probe=ok,connect=ok", "stack-unavailable"),
    ];
    for (faults, reason) in cases {
        let output = lab.ask_negotiated(9110, &lab.faulty(faults), &[]);
        assert!(output.contains(REPLY), "{faults}: {output}");
        assert!(
            upgrade_line(&output).contains(&format!("reason={reason} ")),
            "{faults}: {output}"
        );
    }
    // The RDMA connect never answers: the deadline (300 ms) ends the attempt.
    let mut env = lab.faulty("probe=ok,connect=hang");
    env.push(("STACKROUTE_RDMA_DEADLINE_MS", "300"));
    let output = lab.ask_negotiated(9110, &env, &[]);
    assert!(output.contains(REPLY), "{output}");
    assert!(
        upgrade_line(&output).contains("reason=connect-timeout "),
        "{output}"
    );
    let connect_ms: f64 = output
        .lines()
        .find_map(|line| line.strip_prefix("connect_ms ")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no connect_ms in {output}"));
    assert!(
        (200.0..1000.0).contains(&connect_ms),
        "connect took {connect_ms} ms with a 300 ms deadline: {output}"
    );
    let served = server.output();
    assert!(
        served.contains("reason=peer-declined peer-reason=rdma-error;"),
        "{served}"
    );
    served_only_pings(&served);
}

/// A server not under the shim gets no proposal (it registered nothing), an upgrade endpoint
/// serves a client without the shim as it is, and a client that cannot upgrade (this machine's
/// own check: no device) proposes nothing.
fn peers_without_the_upgrade_never_see_its_bytes() {
    let lab = lab();
    let capable = lab.faulty("probe=ok");
    let plain = lab.server(9201, false, &[], &[]);
    let output = lab.ask(9201, true, &capable, &[]);
    assert!(output.contains(REPLY), "{output}");
    assert!(output.contains("fallback=peer-not-registered"), "{output}");
    assert!(!output.contains("rdma upgrade with"), "{output}");
    served_only_pings(&plain.output());

    let shimmed = lab.server(9202, true, &lab.faulty("probe=no-device"), &[]);
    let output = lab.ask(9202, false, &[], &[]);
    assert!(output.contains(REPLY), "{output}");
    // The client's own shim says no device (this machine): it proposes nothing.
    let output = lab.ask(9202, true, &[], &[]);
    assert!(output.contains(REPLY), "{output}");
    assert!(output.contains("fallback=no-device"), "{output}");
    assert!(!output.contains("rdma upgrade with"), "{output}");
    let served = shimmed.output();
    assert_eq!(served_only_pings(&served), 2, "{served}");
    assert!(!served.contains("rdma upgrade"), "{served}");
}

/// A server whose application is slow to accept answers after the client gave up (the client
/// strips the late answer); a server whose application speaks first is not answered (the
/// client sees its banner first, and the server strips the proposal and the decline).
fn late_answers_and_servers_that_speak_first_are_stripped() {
    let lab = lab();
    let mut env = lab.faulty("probe=ok");
    env.push(("STACKROUTE_RDMA_DEADLINE_MS", "200"));
    let declining = lab.faulty("probe=no-device");
    let slow = lab.server(9301, true, &declining, &["--accept-delay", "1"]);
    let output = lab.ask_negotiated(9301, &env, &[]);
    assert!(output.contains(REPLY), "{output}");
    assert!(
        upgrade_line(&output).contains("reason=connect-timeout "),
        "{output}"
    );
    served_only_pings(&slow.output());

    let mut env = lab.faulty("probe=ok");
    env.push(("STACKROUTE_RDMA_DEADLINE_MS", "2000"));
    env.push(("STACKROUTE_TEST_PROPOSAL_DELAY_MS", "300"));
    let banner = lab.server(9302, true, &declining, &["--banner"]);
    let output = lab.ask_negotiated(9302, &env, &["--banner"]);
    assert!(output.contains("banner HELLO"), "{output}");
    assert!(output.contains(REPLY), "{output}");
    assert!(
        upgrade_line(&output).contains("reason=peer-declined peer-reason=spoke-first"),
        "{output}"
    );
    let served = banner.output();
    served_only_pings(&served);
    // Unanswered: the server's shim declined nothing and recorded no attempt.
    assert!(!served.contains("rdma upgrade with"), "{served}");
}
