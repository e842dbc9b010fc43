//! A small cluster on one machine: three nodes in two zones and an internet host, as network
//! namespaces; the standalone controller and one agent per node; workloads under the shim.
//!
//! ```text
//!                    zone-a (bridge br-a, 10.0.1.0/24)        zone-b (br-b, 10.0.2.0/24)
//!   node-a1 10.0.1.1 ──┐                                 ┌── node-b1 10.0.2.1
//!   pods 10.244.1.0/24 ├── br-a ─┐   router (rtr)  ┌─ br-b ┘   pods 10.244.3.0/24
//!   node-a2 10.0.1.2 ──┘  .254   └── forwards ─────┘  .254
//!   pods 10.244.2.0/24               │ inet0: rate limit + loss (tbf, iptables statistic)
//!                                    └── 203.0.113.1 ── internet host 203.0.113.10 (External)
//! ```
//!
//! Pod addresses are `/32`s on the node's `lo` (the same-node path is the node's loopback).
//! Nodes of one zone reach each other's pods directly over the zone bridge; other traffic goes
//! through the router. The controller and the agents run in the host's namespace on loopback
//! (agents identify callers by `SO_PEERCRED` and read the caller's own namespace through
//! `/proc/PID/net`, and Unix sockets are reached by path from every namespace).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::net::{Impairment, Net};
use crate::proc::{Proc, run};
use crate::tools::Bins;

/// The router's host name.
pub const ROUTER: &str = "rtr";
/// The internet host's name.
pub const INTERNET: &str = "inet";
/// The internet host's address (TEST-NET-3: outside the cluster networks, so `External`).
pub const INTERNET_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The router's interface towards the internet host (where its impairment lives).
pub const INTERNET_LINK: &str = "inet0";
/// The Kubernetes namespace of the e2e workloads.
pub const NAMESPACE: &str = "e2e";

/// A node of the cluster.
#[derive(Clone, Debug)]
pub struct Node {
    /// Kubernetes node name.
    pub name: &'static str,
    /// `topology.kubernetes.io/zone`.
    pub zone: &'static str,
    /// Host (network namespace) short name.
    pub host: &'static str,
    /// InternalIP.
    pub ip: Ipv4Addr,
    /// Third octet of its pod network 10.244.N.0/24.
    pub pod_net: u8,
}

/// The nodes: two in zone-a, one in zone-b.
pub const NODES: [Node; 3] = [
    Node {
        name: "node-a1",
        zone: "zone-a",
        host: "a1",
        ip: Ipv4Addr::new(10, 0, 1, 1),
        pod_net: 1,
    },
    Node {
        name: "node-a2",
        zone: "zone-a",
        host: "a2",
        ip: Ipv4Addr::new(10, 0, 1, 2),
        pod_net: 2,
    },
    Node {
        name: "node-b1",
        zone: "zone-b",
        host: "b1",
        ip: Ipv4Addr::new(10, 0, 2, 1),
        pod_net: 3,
    },
];

/// Looks a node up by name.
pub fn node(name: &str) -> &'static Node {
    NODES
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// How to build the cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Every host's default congestion control (what a socket gets without policy).
    pub default_cc: &'static str,
    /// Loss and rate limit on the router's link towards the internet host.
    pub internet: Impairment,
    /// One-way delay added on the path towards the internet host, in milliseconds (a TUN
    /// forwarding process in the router; 0: none).
    pub internet_delay_ms: u32,
    /// Start the controller and the agents.
    pub control_plane: bool,
    /// Extra arguments for every agent (`--stackd-binary /bin/false`, …).
    pub agent_args: Vec<String>,
    /// Extra environment for every agent (and so for the stack instances it starts, where it
    /// passes a variable on).
    pub agent_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            default_cc: "reno",
            internet: Impairment::default(),
            internet_delay_ms: 0,
            control_plane: true,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
        }
    }
}

/// A pod in the generated cluster state.
#[derive(Clone, Debug)]
struct Pod {
    name: String,
    node: &'static str,
    labels: BTreeMap<String, String>,
    ip: Option<Ipv4Addr>,
}

/// A workload's identity for `stackroute run`.
#[derive(Clone, Debug)]
pub struct Workload<'a> {
    /// The node it runs on.
    pub node: &'a str,
    /// Its (pod) name in [`NAMESPACE`].
    pub name: &'a str,
    /// Labels, `k=v`.
    pub labels: &'a [&'a str],
}

/// The running cluster. Dropping it stops the agents and the controller, kills whatever is
/// left in its namespaces and deletes them, then removes its temporary directory.
pub struct Cluster {
    delay: Option<Proc>,
    agents: BTreeMap<&'static str, Proc>,
    controller: Option<Proc>,
    /// The namespaces.
    pub net: Net,
    /// The project's binaries in use.
    pub bins: Bins,
    pods: Vec<Pod>,
    grpc_port: u16,
    agent_ports: BTreeMap<&'static str, u16>,
    /// The CA, the controller's certificate and each node's credentials.
    pki: testkit::pki::Pki,
    agent_args: Vec<String>,
    agent_env: Vec<(String, String)>,
    dir: tempfile::TempDir,
}

pub use testkit::free_port;

/// A plain HTTP GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    testkit::http_get(SocketAddr::from(([127, 0, 0, 1], port)), path)
        .with_context(|| format!("no HTTP answer on 127.0.0.1:{port}{path}"))
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> Result<T> {
    testkit::poll(what, timeout, Duration::from_millis(50), f).map_err(anyhow::Error::msg)
}

impl Cluster {
    /// Builds the hosts and links, writes the cluster state, starts the control plane.
    pub fn start(options: Options) -> Result<Self> {
        let bins = Bins::find()?;
        let dir = tempfile::Builder::new()
            .prefix("stackroute-e2e-")
            .tempdir()?;
        for sub in ["state", "logs"] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        let pki = testkit::pki::Pki::new(&bins.controller, &dir.path().join("pki"), &[]);
        let mut net = Net::new()?;
        build_topology(&mut net, &options)?;
        let mut cluster = Self {
            delay: None,
            agents: BTreeMap::new(),
            controller: None,
            net,
            bins,
            pods: Vec::new(),
            grpc_port: free_port(),
            agent_ports: BTreeMap::new(),
            pki,
            agent_args: options.agent_args.clone(),
            agent_env: options.agent_env.clone(),
            dir,
        };
        cluster.write_state()?;
        if options.internet_delay_ms > 0 {
            cluster.start_delay(options.internet_delay_ms)?;
        }
        if options.control_plane {
            cluster.start_controller()?;
            for node in &NODES {
                cluster.start_agent(node.name)?;
            }
            for node in &NODES {
                cluster.wait_agent_ready(node.name)?;
            }
        }
        Ok(cluster)
    }

    /// The run's temporary directory (state, logs, agent directories).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Where spawned processes write their logs.
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    /// A node's agent socket directory (what `stackroute run --socket-dir` takes).
    pub fn socket_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join(node).join("run")
    }

    /// Declares a pod of [`NAMESPACE`] on `node`; with `address`, gives it the next free
    /// address of the node's pod network (a /32 on the node's `lo`) and returns it.
    pub fn add_pod(
        &mut self,
        name: &str,
        node_name: &str,
        labels: &[&str],
        address: bool,
    ) -> Result<Option<Ipv4Addr>> {
        let node = node(node_name);
        let ip = if address {
            let used = self
                .pods
                .iter()
                .filter(|p| p.node == node.name && p.ip.is_some());
            let ip = Ipv4Addr::new(10, 244, node.pod_net, 10 + used.count() as u8);
            self.net.addr(node.host, "lo", &format!("{ip}/32"))?;
            Some(ip)
        } else {
            None
        };
        let labels = labels
            .iter()
            .map(|l| {
                let (k, v) = l.split_once('=').context("labels are k=v")?;
                Ok((k.to_string(), v.to_string()))
            })
            .collect::<Result<_>>()?;
        self.pods.push(Pod {
            name: name.to_string(),
            node: node.name,
            labels,
            ip,
        });
        self.write_state()?;
        Ok(ip)
    }

    /// Writes `state/cluster.json`: the Namespace, the Nodes (zone label, InternalIP) and the
    /// Pods (podIP, nodeName, labels).
    fn write_state(&self) -> Result<()> {
        let mut items = vec![json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": NAMESPACE, "labels": {"kubernetes.io/metadata.name": NAMESPACE}}
        })];
        for node in &NODES {
            items.push(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": {"topology.kubernetes.io/zone": node.zone}},
                "status": {"addresses": [{"type": "InternalIP", "address": node.ip.to_string()}]}
            }));
        }
        for pod in &self.pods {
            let mut object = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod.name, "namespace": NAMESPACE, "labels": pod.labels},
                "spec": {"nodeName": pod.node, "containers": [{"name": "main", "image": "none"}]},
            });
            if let Some(ip) = pod.ip {
                object["status"] =
                    json!({"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]});
            }
            items.push(object);
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
        self.write_state_file("cluster.json", &serde_json::to_string_pretty(&list)?)
    }

    /// Writes (or replaces) a policy file in the controller's state directory, atomically.
    pub fn set_policy(&self, file: &str, yaml: &str) -> Result<()> {
        self.write_state_file(file, yaml)
    }

    /// Removes a policy file.
    pub fn remove_policy(&self, file: &str) -> Result<()> {
        std::fs::remove_file(self.dir.path().join("state").join(file))?;
        Ok(())
    }

    fn write_state_file(&self, file: &str, content: &str) -> Result<()> {
        let state = self.dir.path().join("state");
        let tmp = state.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, state.join(file))?;
        Ok(())
    }

    /// Routes the router's traffic for the internet host through a TUN device served by
    /// `stackroute-e2e-delay`, which hands every packet back after `ms`; packets coming back out
    /// of the TUN device are routed on to the internet link by a policy rule.
    fn start_delay(&mut self, ms: u32) -> Result<()> {
        let bin = self
            .bins
            .delay
            .clone()
            .context("stackroute-e2e-delay is not built")?;
        let ns = self.net.ns(ROUTER);
        crate::net::ip(&["-n", &ns, "tuntap", "add", "dev", "dly0", "mode", "tun"])?;
        crate::net::ip(&["-n", &ns, "link", "set", "dly0", "up"])?;
        for key in ["all", "default", "dly0"] {
            self.net
                .sysctl(ROUTER, &format!("net.ipv4.conf.{key}.rp_filter"), "0")?;
        }
        let bin = bin.to_string_lossy().into_owned();
        self.delay = Some(self.spawn_plain(
            ROUTER,
            "delay",
            &[&bin, "--dev", "dly0", "--delay-ms", &ms.to_string()],
        )?);
        wait_for("the delay forwarder", Duration::from_secs(10), || {
            crate::net::ip(&["-n", &ns, "link", "show", "dly0"])
                .ok()
                .filter(|s| s.contains("LOWER_UP"))
        })?;
        crate::net::ip(&[
            "-n", &ns, "rule", "add", "iif", "dly0", "lookup", "100", "pref", "100",
        ])?;
        crate::net::ip(&[
            "-n",
            &ns,
            "route",
            "add",
            "203.0.113.0/24",
            "dev",
            INTERNET_LINK,
            "table",
            "100",
        ])?;
        crate::net::ip(&[
            "-n",
            &ns,
            "route",
            "add",
            &format!("{INTERNET_IP}/32"),
            "dev",
            "dly0",
        ])?;
        Ok(())
    }

    fn start_controller(&mut self) -> Result<()> {
        let mut command = Command::new(&self.bins.controller);
        command
            .arg("--state")
            .arg(self.dir.path().join("state"))
            .args(["--grpc-addr", &format!("127.0.0.1:{}", self.grpc_port)])
            .arg("--grpc-tls-dir")
            .arg(self.pki.server())
            .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
            .args([
                "--poll-ms",
                "50",
                "--debounce-ms",
                "20",
                "--debounce-max-ms",
                "200",
            ])
            .env("RUST_LOG", "warn");
        self.controller = Some(Proc::spawn("controller", &mut command, &self.log_dir())?);
        Ok(())
    }

    /// Starts (or restarts) the agent of `node_name`, in the host's namespace.
    pub fn start_agent(&mut self, node_name: &str) -> Result<()> {
        let node = node(node_name);
        let base = self.dir.path().join(node.name);
        std::fs::create_dir_all(base.join("run"))?;
        std::fs::create_dir_all(base.join("state"))?;
        let port = *self.agent_ports.entry(node.name).or_insert_with(free_port);
        let mut command = Command::new(&self.bins.lrd);
        command
            .args(["--controller", &format!("127.0.0.1:{}", self.grpc_port)])
            .arg("--credentials")
            .arg(self.pki.node(node.name))
            .args(["--node", node.name])
            .arg("--socket-dir")
            .arg(base.join("run"))
            .arg("--state-dir")
            .arg(base.join("state"))
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(&self.agent_args)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .env("STACKROUTE_LOG", "warn");
        let agent = Proc::spawn(
            &format!("agent-{}", node.name),
            &mut command,
            &self.log_dir(),
        )?;
        self.agents.insert(node.name, agent);
        Ok(())
    }

    /// Waits until the agent of `node_name` serves a snapshot (`/readyz` 200).
    pub fn wait_agent_ready(&mut self, node_name: &str) -> Result<()> {
        let node = node(node_name);
        let port = self.agent_ports[node.name];
        let result = wait_for(
            &format!("agent {} ready", node.name),
            Duration::from_secs(30),
            || http_get(port, "/readyz").ok().filter(|(s, _)| *s == 200),
        );
        if result.is_err() {
            let log = self
                .agents
                .get(node.name)
                .map(Proc::output)
                .unwrap_or_default();
            let controller = self
                .controller
                .as_ref()
                .map(Proc::output)
                .unwrap_or_default();
            bail!(
                "agent {} never became ready.\nagent log:\n{log}\ncontroller log:\n{controller}",
                node.name
            );
        }
        Ok(())
    }

    /// Waits until the agent of `node_name` reports `series` (a metric with its labels, as
    /// `/metrics` prints it) at 1 or more; its value.
    pub fn wait_metric(&self, node_name: &str, series: &str) -> Result<f64> {
        let port = self.agent_metrics_port(node_name);
        let mut last = String::new();
        wait_for(
            &format!("{node_name}: {series} ≥ 1"),
            Duration::from_secs(20),
            || {
                last = http_get(port, "/metrics")
                    .map(|(_, body)| body)
                    .unwrap_or_default();
                last.lines()
                    .find_map(|line| line.strip_prefix(series)?.trim().parse::<f64>().ok())
                    .filter(|value| *value >= 1.0)
            },
        )
        .with_context(|| format!("last /metrics:\n{last}"))
    }

    /// The port of the agent of `node_name`'s `/metrics`.
    pub fn agent_metrics_port(&self, node_name: &str) -> u16 {
        self.agent_ports[node(node_name).name]
    }

    /// Kills the agent of `node_name` (SIGKILL: its files stay behind, as after a crash).
    pub fn kill_agent(&mut self, node_name: &str) {
        if let Some(mut agent) = self.agents.remove(node(node_name).name) {
            agent.kill();
        }
    }

    /// `stackroute explain --agent` for a pod of [`NAMESPACE`] on `node_name` to `to`:
    /// `Stack/CongestionControl` of the first transport.
    pub fn explain(&self, node_name: &str, pod: &str, to: SocketAddr) -> Result<String> {
        let output = run(
            Command::new(&self.bins.cli)
                .args(["explain", "--agent"])
                .arg(self.socket_dir(node_name))
                .args(["--from", &format!("{NAMESPACE}/{pod}")])
                .args(["--to", &to.to_string(), "--output", "json"]),
            Duration::from_secs(10),
        )?;
        let value: Value = serde_json::from_str(&output).context("explain --output json")?;
        let transport = &value["transport"];
        Ok(format!(
            "{}/{}",
            transport["stack"].as_str().unwrap_or("?"),
            transport["congestionControl"].as_str().unwrap_or("?")
        ))
    }

    /// Waits until the agent of `node_name` decides `expected` (e.g. `Kernel/BBR`) for `pod`
    /// to `to`.
    pub fn wait_decision(
        &self,
        node_name: &str,
        pod: &str,
        to: SocketAddr,
        expected: &str,
    ) -> Result<()> {
        let mut last = String::new();
        let result = wait_for(
            &format!("{node_name}: {pod} → {to} decided {expected}"),
            Duration::from_secs(20),
            || {
                last = self
                    .explain(node_name, pod, to)
                    .unwrap_or_else(|e| format!("{e:#}"));
                (last == expected).then_some(())
            },
        );
        result.with_context(|| format!("last answer: {last}"))
    }

    /// Starts `args` on `workload.node` under `stackroute run` (registered with that node's
    /// agent) — with the shim when `shim` is true and it is built.
    pub fn spawn(&self, workload: &Workload, shim: bool, args: &[&str]) -> Result<Proc> {
        self.spawn_with(workload, shim, &[], args)
    }

    /// [`Cluster::spawn`] with extra environment variables.
    pub fn spawn_with(
        &self,
        workload: &Workload,
        shim: bool,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Result<Proc> {
        let node = node(workload.node);
        let mut command = self.net.command(node.host, &[]);
        command
            .arg(&self.bins.cli)
            .arg("run")
            .arg("--socket-dir")
            .arg(self.socket_dir(node.name))
            .args(["--namespace", NAMESPACE, "--name", workload.name]);
        if !workload.labels.is_empty() {
            command.args(["--labels", &workload.labels.join(",")]);
        }
        command.arg("--").args(args);
        command
            .env_remove("LD_PRELOAD")
            .env_remove("STACKROUTE_SHIM");
        if shim {
            let path = self
                .bins
                .shim
                .as_ref()
                .context("libnsocket.so is not built")?;
            command.env("STACKROUTE_SHIM", path);
        }
        command.envs(env.iter().copied());
        Proc::spawn(workload.name, &mut command, &self.log_dir())
    }

    /// Starts `args` in `host` directly (no registration, no shim).
    pub fn spawn_plain(&self, host: &str, name: &str, args: &[&str]) -> Result<Proc> {
        let mut command = self.net.command(host, args);
        command.env_remove("LD_PRELOAD");
        Proc::spawn(name, &mut command, &self.log_dir())
    }

    /// Waits until something in `host` listens on TCP `port`.
    pub fn wait_listening(&self, host: &str, port: u16) -> Result<()> {
        let filter = format!("sport = :{port}");
        let mut last = String::new();
        wait_for(
            &format!("a listener on {host}:{port}"),
            Duration::from_secs(15),
            || match self.net.exec(host, &["ss", "-ltnH", &filter]) {
                Ok(out) if !out.trim().is_empty() => Some(()),
                Ok(_) => {
                    last = "ss listed no listener".into();
                    None
                }
                Err(error) => {
                    last = format!("{error:#}");
                    None
                }
            },
        )
        .with_context(|| format!("the last look: {last}"))?;
        Ok(())
    }

    /// Waits until no agent has published a new snapshot for `quiet` (at most 10 s): the
    /// control plane has finished reacting to registrations (a listener registered at
    /// `listen()` is compiled and distributed to every node), so a measurement that starts now
    /// does not share the CPUs with it.
    pub fn wait_settled(&self, quiet: Duration) -> Result<()> {
        let generations = || -> Vec<Option<Vec<u8>>> {
            NODES
                .iter()
                .map(|n| std::fs::read(self.socket_dir(n.name).join("generation")).ok())
                .collect()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = generations();
        let mut since = Instant::now();
        while since.elapsed() < quiet {
            if Instant::now() > deadline {
                bail!("the agents kept publishing snapshots for 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
            let now = generations();
            if now != seen {
                seen = now;
                since = Instant::now();
            }
        }
        Ok(())
    }

    /// The user-space stack instances the agent of `node_name` runs, from its
    /// `instances.json`: one per network namespace that made a `Userspace` connection.
    pub fn stack_instances(&self, node_name: &str) -> Result<Vec<StackInstance>> {
        let node = node(node_name);
        let path = self
            .dir
            .path()
            .join(node.name)
            .join("state")
            .join("instances.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(error).with_context(|| format!("{}", path.display())),
        };
        let records: Vec<Value> = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a list of instances", path.display()))?;
        records
            .iter()
            .map(|r| {
                Ok(StackInstance {
                    pid: r["pid"].as_i64().context("instance pid")? as i32,
                    socket: format!(
                        "stackroute-stackd.{}",
                        r["tag"].as_str().context("instance tag")?
                    ),
                    engine: r["engine"].as_str().unwrap_or("unknown").to_owned(),
                })
            })
            .collect()
    }

    /// Every connection the user-space stack instance of `host`'s namespace reports, live and
    /// finished (its `Connections` answer, all pages), read from outside the application: a
    /// `python3` client on the instance's abstract control socket inside that namespace.
    pub fn stack_connections(&self, host: &str, instance: &StackInstance) -> Result<Vec<Value>> {
        let output = self.net.exec(
            host,
            &["python3", "-c", STACKD_CONNECTIONS, &instance.socket],
        )?;
        let value: Value = serde_json::from_str(output.trim())
            .with_context(|| format!("the instance's Connections answer: {output}"))?;
        value
            .as_array()
            .cloned()
            .with_context(|| format!("the instance answered {value}"))
    }

    /// The controller's log so far (for failure messages).
    pub fn controller_log(&self) -> String {
        self.controller
            .as_ref()
            .map(Proc::output)
            .unwrap_or_default()
    }
}

/// A user-space stack instance (`stackroute-stackd`) an agent started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackInstance {
    /// Its pid.
    pub pid: i32,
    /// Its abstract control socket's name (no leading NUL), in the namespace it serves.
    pub socket: String,
    /// Its packet engine as it reported it (`af_xdp`, `af_packet`; `unknown` if it did not).
    pub engine: String,
}

/// Pages through an instance's `Connections` (lrd-agent/local-api/src/relay.rs: one JSON
/// message per `SOCK_SEQPACKET` packet) and prints the connections as one JSON array.
const STACKD_CONNECTIONS: &str = r#"
import json, socket, sys
out, after = [], 0
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    s.connect("\0" + sys.argv[1])
    s.send(json.dumps({"kind": "connections", "after": after, "limit": 100}).encode())
    reply = json.loads(s.recv(1 << 17))
    s.close()
    if reply.get("kind") != "connections":
        sys.exit("instance: %s" % reply)
    out += reply["connections"]
    if not reply.get("more") or not reply["connections"]:
        break
    after = reply["connections"][-1]["id"]
print(json.dumps(out))
"#;

fn build_topology(net: &mut Net, options: &Options) -> Result<()> {
    net.add_host(ROUTER, options.default_cc)?;
    net.sysctl(ROUTER, "net.ipv4.ip_forward", "1")?;
    net.bridge(ROUTER, "br-a")?;
    net.bridge(ROUTER, "br-b")?;
    net.addr(ROUTER, "br-a", "10.0.1.254/24")?;
    net.addr(ROUTER, "br-b", "10.0.2.254/24")?;
    for node in &NODES {
        net.add_host(node.host, options.default_cc)?;
        let port = format!("p-{}", node.host);
        net.veth(node.host, "eth0", ROUTER, &port)?;
        let bridge = if node.zone == "zone-a" {
            "br-a"
        } else {
            "br-b"
        };
        net.attach(ROUTER, &port, bridge)?;
        net.addr(node.host, "eth0", &format!("{}/24", node.ip))?;
        let gateway = if node.zone == "zone-a" {
            "10.0.1.254"
        } else {
            "10.0.2.254"
        };
        net.route(node.host, "default", gateway)?;
        let pods = format!("10.244.{}.0/24", node.pod_net);
        net.route(ROUTER, &pods, &node.ip.to_string())?;
    }
    // Same-zone pod traffic stays on the zone's bridge.
    for node in &NODES {
        let pods = format!("10.244.{}.0/24", node.pod_net);
        for peer in NODES
            .iter()
            .filter(|p| p.zone == node.zone && p.name != node.name)
        {
            net.route(peer.host, &pods, &node.ip.to_string())?;
        }
    }
    net.add_host(INTERNET, options.default_cc)?;
    net.veth(INTERNET, "eth0", ROUTER, INTERNET_LINK)?;
    net.addr(ROUTER, INTERNET_LINK, "203.0.113.1/24")?;
    net.addr(INTERNET, "eth0", &format!("{INTERNET_IP}/24"))?;
    net.route(INTERNET, "default", "203.0.113.1")?;
    net.impair(ROUTER, INTERNET_LINK, options.internet)?;
    Ok(())
}
