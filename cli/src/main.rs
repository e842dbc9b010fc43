//! `stackroute`: check, explain and print stackroute policy offline; run workloads under the
//! node agent; show the controller's status.

mod agent;
mod connections;
mod reach;
mod status;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use stackroute_policy::{ClusterState, Compiled, Settings, explain};
use stackroute_snapshot::{Cidr, Protocol};

#[derive(Parser)]
#[command(
    name = "stackroute",
    version,
    about = "Protocol routing for Kubernetes: check and explain StackRoute policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check StackRoute and ClusterStackRoute objects against the CRD's schema and CEL rules.
    /// Exit status: 0 all valid, 1 something invalid, 2 unreadable input.
    Validate {
        /// Files or directories (searched for *.yaml, *.yml, *.json).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Explain which transport a connection gets, and why.
    Explain(ExplainArgs),
    /// Print the CustomResourceDefinitions as YAML.
    Crd(CrdArgs),
    /// Register a workload with the local node agent, then execute the command under the shim
    /// (the command still runs, unmanaged, when no agent answers).
    Run(agent::RunArgs),
    /// Nodes, their acked revisions and stale agents, and per-policy Accepted/Programmed.
    Status(StatusArgs),
    /// The user-space stack's connections on this node (`ss` for the instances the agent
    /// started): pod, addresses, state, congestion control, bytes, retransmits, RTT, delivery
    /// rate. Needs root (it enters each instance's network namespace).
    Connections(connections::ConnectionsArgs),
}

#[derive(clap::Args)]
struct CrdArgs {
    /// The Kubernetes version of the API server the CRDs are for (`1.20`, `v1.20.2`). Rules such
    /// a server cannot compile are left out: every CEL rule (`x-kubernetes-validations`) below
    /// 1.25, the rules calling the IP/CIDR library below 1.31. The controller still checks
    /// every rule and reports a breaking object as `Accepted=False`. Without this option: the
    /// full CRDs, for current servers.
    #[arg(long, value_name = "MAJOR.MINOR", value_parser = parse_kube_version)]
    kube_version: Option<(u32, u32)>,
}

fn parse_kube_version(text: &str) -> Result<(u32, u32), String> {
    stackroute_api::parse_kube_version(text)
        .ok_or_else(|| format!("{text:?} is not a Kubernetes version such as 1.20 or v1.33.1"))
}

fn security(args: &StatusArgs) -> stackroute_proto::client::Security {
    match &args.credentials {
        Some(dir) => stackroute_proto::client::Security::Tls {
            dir: dir.clone(),
            server_name: args.controller_server_name.clone(),
        },
        None => stackroute_proto::client::Security::Plaintext,
    }
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Controller address (HOST:PORT).
    #[arg(long, env = "STACKROUTE_CONTROLLER")]
    controller: String,
    /// Credentials directory: `ca.crt` and a client certificate (`tls.crt`/`tls.key`, from
    /// `stackroute-controller credentials issue --admin`), or a node's.
    #[arg(
        long,
        env = "STACKROUTE_CREDENTIALS",
        required_unless_present = "insecure_plaintext"
    )]
    credentials: Option<PathBuf>,
    /// The name the controller's certificate carries, when the address is not that name.
    #[arg(long, env = "STACKROUTE_CONTROLLER_SERVER_NAME")]
    controller_server_name: Option<String>,
    /// Talk to a controller started with --insecure-plaintext.
    #[arg(
        long,
        env = "STACKROUTE_INSECURE_PLAINTEXT",
        conflicts_with = "credentials"
    )]
    insecure_plaintext: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// Cluster state: a YAML file or a directory of them, as `kubectl get … -o yaml` prints.
    #[arg(long, required_unless_present = "agent", conflicts_with = "agent")]
    state: Option<PathBuf>,
    /// Explain from a live node agent's published snapshot in this socket directory instead.
    #[arg(long, value_name = "SOCKET_DIR")]
    agent: Option<PathBuf>,
    /// Source pod as NAMESPACE/POD.
    #[arg(long)]
    from: String,
    /// Destination as IP:PORT (IPv6 as [ADDR]:PORT).
    #[arg(long)]
    to: SocketAddr,
    /// Transport protocol.
    #[arg(long, value_enum, default_value = "TCP", ignore_case = true)]
    protocol: ProtocolArg,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "text")]
    output: Output,
    /// Networks that count as inside the cluster (comma-separated CIDRs). Offline form only:
    /// with --agent, the controller's setting compiled into the snapshot applies.
    #[arg(long, value_delimiter = ',', env = "STACKROUTE_CLUSTER_NETWORKS")]
    cluster_networks: Option<Vec<String>>,
    /// The program the source pod runs: checked for what LD_PRELOAD cannot reach (static and Go
    /// binaries, set-user-ID programs), whose connections never see the decision.
    #[arg(long, value_name = "PATH")]
    program: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
#[allow(clippy::upper_case_acronyms)]
enum ProtocolArg {
    TCP,
    UDP,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

/// Exit status for input that could not be read or parsed at all.
const UNREADABLE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate { paths } => validate(&paths),
        Command::Explain(args) => run_explain(&args),
        Command::Crd(args) => emit(&match args.kube_version {
            Some((major, minor)) => stackroute_api::crds_yaml_for_server(major, minor),
            None => stackroute_api::crds_yaml(),
        })
        .map(|()| ExitCode::SUCCESS),
        Command::Run(args) => agent::run(args),
        Command::Status(args) => run_status(&args),
        Command::Connections(args) => connections::run(&args).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|error| {
        eprintln!("stackroute: {error:#}");
        ExitCode::from(UNREADABLE)
    })
}

/// Every YAML/JSON file under `paths`, sorted, so output is stable.
fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for path in paths {
        let metadata =
            std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
        if metadata.is_dir() {
            walk(path, &mut files).with_context(|| format!("{}: cannot list", path.display()))?;
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            walk(&entry, files)?;
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(entry);
        }
    }
    Ok(())
}

fn validate(paths: &[PathBuf]) -> Result<ExitCode> {
    let files = collect_files(paths)?;
    let mut invalid = false;
    let mut unreadable = false;
    let mut checked = 0usize;
    for file in &files {
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(error) => {
                eprintln!("{}: cannot read: {error}", file.display());
                unreadable = true;
                continue;
            }
        };
        let source = file.display().to_string();
        let mut state = ClusterState::default();
        for problem in state.load_text(&source, &text) {
            match (&problem.object, problem.invalid_policy) {
                (Some(object), true) => {
                    invalid = true;
                    println!(
                        "{source}: {object}: {}: {}",
                        problem.path.as_deref().unwrap_or("(object)"),
                        problem.message
                    );
                }
                _ => {
                    unreadable = true;
                    eprintln!("{problem}");
                }
            }
        }
        // Checks the schema cannot express (label selector operators and values).
        let compiled = Compiled::new(&state, Settings::default());
        for problem in &compiled.problems {
            invalid = true;
            println!("{source}: {problem}");
        }
        checked +=
            state.stack_routes.len() + state.cluster_stack_routes.len() + compiled.problems.len();
    }
    if unreadable {
        return Ok(ExitCode::from(UNREADABLE));
    }
    if invalid {
        return Ok(ExitCode::from(1));
    }
    eprintln!("{checked} object(s) in {} file(s): valid", files.len());
    Ok(ExitCode::SUCCESS)
}

fn run_status(args: &StatusArgs) -> Result<ExitCode> {
    let response = status::fetch(&args.controller, &security(args))?;
    match args.output {
        Output::Text => print!("{}", status::to_text(&response)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&status::to_json(&response))?
        ),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_explain(args: &ExplainArgs) -> Result<ExitCode> {
    let (namespace, pod) = args
        .from
        .split_once('/')
        .filter(|(ns, pod)| !ns.is_empty() && !pod.is_empty())
        .with_context(|| format!("--from {:?}: expected NAMESPACE/POD", args.from))?;
    let protocol = match args.protocol {
        ProtocolArg::TCP => Protocol::Tcp,
        ProtocolArg::UDP => Protocol::Udp,
    };
    let unreachable = match &args.program {
        Some(program) => {
            let path = reach::resolve(program)
                .with_context(|| format!("--program {}: not found", program.display()))?;
            reach::unreachable_reason(&path)?.map(|reason| format!("{}: {reason}", path.display()))
        }
        None => None,
    };
    let state_path = match (&args.state, &args.agent) {
        (Some(state), None) => state,
        (None, Some(socket_dir)) => {
            let explanation = agent::explain(socket_dir, namespace, pod, args.to, protocol)?;
            let path = (protocol == Protocol::Tcp)
                .then(|| agent::kernel_hook_line(socket_dir, namespace, pod, args.to))
                .flatten();
            return print_explanation(
                &explanation,
                args.output,
                unreachable.as_deref(),
                path.as_deref(),
            );
        }
        _ => bail!("give exactly one of --state and --agent"),
    };
    let mut settings = Settings::default();
    if let Some(networks) = &args.cluster_networks {
        settings.cluster_networks = networks
            .iter()
            .map(|n| n.trim().parse::<Cidr>().map_err(anyhow::Error::msg))
            .collect::<Result<_>>()
            .context("--cluster-networks")?;
    }
    let files = collect_files(std::slice::from_ref(state_path))?;
    let mut state = ClusterState::default();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("{}: cannot read", file.display()))?;
        for problem in state.load_text(&file.display().to_string(), &text) {
            eprintln!("warning: {problem} (ignored)");
        }
    }
    let compiled = Compiled::new(&state, settings);
    for problem in &compiled.problems {
        eprintln!("warning: {problem} (policy ignored)");
    }
    let explanation = match explain(
        &compiled,
        &state,
        namespace,
        pod,
        args.to.ip(),
        args.to.port(),
        protocol,
    ) {
        Ok(explanation) => explanation,
        Err(error) => bail!("{error}"),
    };
    print_explanation(&explanation, args.output, unreachable.as_deref(), None)
}

/// Prints the explanation; `unreachable` (from `--program`) says the decision never applies;
/// `path` (from `--agent`) says what decides: the shim, or the kernel hook.
fn print_explanation(
    explanation: &stackroute_policy::Explanation,
    output: Output,
    unreachable: Option<&str>,
    path: Option<&str>,
) -> Result<ExitCode> {
    match output {
        Output::Text => {
            let mut text = explanation.to_text();
            if let Some(path) = path {
                text.push_str(path);
                text.push('\n');
            }
            if let Some(reason) = unreachable {
                text.push_str(&format!(
                    "unaccelerated: {reason}; its connections use the kernel default, not this decision\n"
                ));
            }
            emit(&text)?
        }
        Output::Json => {
            let mut json = serde_json::to_value(explanation)?;
            if let (Some(object), Some(reason)) = (json.as_object_mut(), unreachable) {
                object.insert("unaccelerated".into(), reason.into());
            }
            if let (Some(object), Some(path)) = (json.as_object_mut(), path) {
                object.insert("path".into(), path.into());
            }
            emit(&format!("{}\n", serde_json::to_string_pretty(&json)?))?
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
