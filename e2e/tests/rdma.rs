//! The RDMA upgrade between two shims, end to end across network namespaces: a client pod
//! (`trainer`, node-a1) whose policy puts connections to the `ps` pod (node-a2) on
//! `{stack: RDMA, fallback: [{stack: Kernel, congestionControl: BBR}]}`, both ends real socket
//! programs (`programs/upgrade_peer.py`) under `stackroute run`, each pod's stack instance
//! started by its node's agent.
//!
//! This machine has no RDMA device. What is tested is everything around the verbs: who
//! proposes (only to a server registered as an upgrade endpoint), every decline reaching the
//! client with the decliner's reason, the deadline, that the application bytes on both sides
//! are exactly what the other application sent (the exchange is stripped, a late answer too),
//! and the data path's machinery: the instances' queue pairs, the relays, the application's fd
//! becoming the relay's socket. The verbs layer there is `libstackroute_rdma_fault.so`
//! (`rdma/fault-provider`): in the shims it answers the capability probe as told; in the
//! instances (the agents' `--rdma-provider`) its queue pairs are **emulated** over Unix
//! sockets, with injected faults. Nothing here counts as RDMA working.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use stackroute_e2e::cluster::{Cluster, Options, Workload, node as node_named, wait_for};
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
        trial(
            "an_upgraded_connection_carries_both_applications_bytes_over_the_emulated_queue_pairs",
            an_upgraded_connection_carries_both_applications_bytes_over_the_emulated_queue_pairs,
        ),
    ])
}

struct Lab {
    cluster: Cluster,
    ps: Ipv4Addr,
    fault: PathBuf,
    verbs: PathBuf,
    /// The emulated queue pairs' sockets and the instances' `faults` file.
    fault_dir: tempfile::TempDir,
}

fn lab() -> Lab {
    let fault = testkit::library(
        "stackroute-rdma-fault-provider",
        "libstackroute_rdma_fault.so",
    );
    let fault_dir = tempfile::Builder::new()
        .prefix("stackroute-rdma-fault-")
        .tempdir()
        .unwrap();
    let mut cluster = Cluster::start(Options {
        agent_args: vec!["--rdma-provider".into(), fault.display().to_string()],
        agent_env: vec![(
            "STACKROUTE_RDMA_FAULT_DIR".into(),
            fault_dir.path().display().to_string(),
        )],
        ..Options::default()
    })
    .expect("the e2e cluster starts");
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
    let verbs = testkit::library("stackroute-rdma-verbs", "libstackroute_rdma.so");
    Lab {
        cluster,
        ps,
        fault,
        verbs,
        fault_dir,
    }
}

impl Lab {
    fn script() -> &'static str {
        concat!(env!("CARGO_MANIFEST_DIR"), "/programs/upgrade_peer.py")
    }

    /// The faults of the stack instances' queue pairs (both nodes), from their next call on.
    fn instance_faults(&self, faults: &str) {
        std::fs::write(self.fault_dir.path().join("faults"), faults).unwrap();
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
    /// endpoint has reached node-a1's agent, and both pods' stack instances run — the first
    /// connection of a pod starts its instance, which the exchange's deadline does not wait
    /// for): that run's output.
    fn ask_negotiated(&self, port: u16, env: &[(&str, &str)], extra: &[&str]) -> String {
        let mut last = String::new();
        wait_for(
            &format!("the server on port {port} known as an RDMA upgrade endpoint"),
            Duration::from_secs(30),
            || {
                last = self.ask(port, true, env, extra);
                let starting = last.contains("fallback=peer-not-registered")
                    || last.contains("reason=stack-unavailable")
                    || last.contains("peer-reason=stack-unavailable");
                if !starting {
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
    /// Every line of `stackroute connections --output json` for `node`.
    fn connection_lines(&self, node: &str) -> Vec<serde_json::Value> {
        let output = stackroute_e2e::proc::run(
            std::process::Command::new(&self.cluster.bins.cli)
                .arg("connections")
                .arg("--socket-dir")
                .arg(self.cluster.socket_dir(node))
                .args(["--output", "json"]),
            Duration::from_secs(10),
        )
        .unwrap();
        serde_json::from_str(&output).unwrap_or_else(|e| panic!("{e}: {output}"))
    }

    /// The RDMA upgrade attempts `stackroute connections --output json` lists for `node`.
    fn upgrade_attempts(&self, node: &str) -> Vec<serde_json::Value> {
        self.connection_lines(node)
            .into_iter()
            .filter(|line| line["path"] == "rdma-upgrade")
            .collect()
    }
}

impl Lab {
    /// Asks until the connection runs on RDMA (registration known, both instances up and
    /// answering within the deadline): that run's output.
    fn ask_upgraded(&self, port: u16, env: &[(&str, &str)], extra: &[&str]) -> String {
        let mut last = String::new();
        wait_for(
            &format!("a connection to port {port} upgraded"),
            Duration::from_secs(30),
            || {
                last = self.ask(port, true, env, extra);
                if upgraded(&last) {
                    return Some(last.clone());
                }
                std::thread::sleep(Duration::from_millis(200));
                None
            },
        )
        .unwrap_or_else(|e| panic!("{e:#}\nlast client output:\n{last}"))
    }
}

/// Whether a shim's output says its connection was upgraded.
fn upgraded(output: &str) -> bool {
    output
        .lines()
        .any(|line| line.contains("rdma upgrade with") && line.contains(": upgraded after"))
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

/// Both ends can (the fault provider's probe says so), but connecting the queue pairs fails
/// or hangs: the server's instance connects first, so the server declines with that reason;
/// a connect that hangs past the client's deadline ends the client's wait first, and its
/// `connect` returns within the deadline. Each time the connection carries on as TCP.
fn an_accepted_upgrade_that_cannot_connect_falls_back_within_the_deadline() {
    let lab = lab();
    let mut server_env = lab.faulty("probe=ok");
    // The server's side may take a second: the client's deadline is the one measured.
    server_env.push(("STACKROUTE_RDMA_DEADLINE_MS", "1000"));
    let server = lab.server(9110, true, &server_env, &[]);
    let client_env = lab.faulty("probe=ok");
    // Instances started (an upgrade that works), then the faults.
    lab.ask_upgraded(9110, &client_env, &[]);
    lab.instance_faults("connect=error");
    let output = lab.ask(9110, true, &client_env, &[]);
    assert!(output.contains(REPLY), "{output}");
    assert!(
        upgrade_line(&output).contains("reason=peer-declined peer-reason=rdma-error"),
        "{output}"
    );
    // The queue pairs' connect never answers: the client's deadline (300 ms) ends its wait.
    lab.instance_faults("connect=hang");
    let mut env = client_env.clone();
    env.push(("STACKROUTE_RDMA_DEADLINE_MS", "300"));
    let output = lab.ask(9110, true, &env, &[]);
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
    lab.instance_faults("");
    let served = server.output();
    assert!(
        served.contains("reason=rdma-error peer-reason=-;"),
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

/// Both ends can, and the instances' queue pairs connect (emulated): the connection runs on
/// them. 4 MiB from the client reach the server intact and its digest comes back; both shims
/// say `upgraded`; `stackroute connections` lists the client's connection as RDMA and the
/// attempt as upgraded. Then an error completion on the queue pairs (`send-fail-after`)
/// resets the connection under the applications instead of losing bytes silently.
fn an_upgraded_connection_carries_both_applications_bytes_over_the_emulated_queue_pairs() {
    let lab = lab();
    // A secondary "RoCE" network: each node's namespace (its pods' here) holds an address on
    // it, and the emulated device's GID table carries both. Each instance must pick its own
    // (the agent passes the caller's addresses, secondary networks' first; the GID table
    // decides), so the queue pairs' GIDs name the RDMA network, not the pods' cluster IPs.
    let (client_rdma, server_rdma) = ("192.168.100.1", "192.168.100.2");
    for (node, address) in [("node-a1", client_rdma), ("node-a2", server_rdma)] {
        let host = node_named(node).host;
        lab.cluster
            .net
            .addr(host, "lo", &format!("{address}/32"))
            .unwrap();
    }
    lab.instance_faults(&format!("gids={server_rdma} {client_rdma}"));
    let env = lab.faulty("probe=ok");
    let server = lab.server(9401, true, &env, &["--bulk"]);
    let output = lab.ask_upgraded(9401, &env, &["--bulk", "4194304"]);
    assert!(output.contains(REPLY), "{output}");
    let field = |prefix: &str| {
        output
            .lines()
            .find_map(|line| line.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {output}"))
            .to_string()
    };
    let sent = field("sent ");
    assert!(sent.starts_with("4194304 "), "{output}");
    assert_eq!(field("sum "), sent, "the server's digest of what it read");
    let served = server.output();
    assert!(upgraded(&served), "{served}\nclient:\n{output}");
    served_only_pings(&served);
    let connections = lab.connection_lines("node-a1");
    assert!(
        connections.iter().any(|c| c["path"] == "rdma"
            && c["transport"] == "RDMA"
            && c["bytesSent"].as_u64() >= Some(4_194_304)
            && c["rdma"]["local"] == client_rdma
            && c["rdma"]["remote"] == server_rdma),
        "no RDMA connection with the bytes sent between {client_rdma} and {server_rdma}: \
         {connections:#?}"
    );
    assert!(
        lab.upgrade_attempts("node-a1")
            .iter()
            .any(|a| a["role"] == "client" && a["reason"] == "upgraded"),
        "no upgraded attempt listed"
    );

    lab.instance_faults(&format!(
        "gids={server_rdma} {client_rdma},send-fail-after=3"
    ));
    let output = lab.ask(9401, true, &env, &["--bulk", "4194304"]);
    assert!(upgraded(&output), "{output}");
    assert!(
        output.contains("error ECONNRESET") || output.contains("error EPIPE"),
        "the client's connection was not reset: {output}"
    );
    assert!(!output.contains("sum "), "{output}");
    lab.instance_faults("");
}
