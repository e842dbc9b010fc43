//! The Kubernetes scenarios on a real API server (`e2e/kube/suite.sh`), one trial per scenario,
//! run in order: the first installs the charts, the others build on it. The cluster is the one
//! `STACKROUTE_TEST_KUBECONFIG` names — the one-node lane of `e2e/kube/cluster.sh up` (as root:
//! the suite reads connections with `nsenter` and containers with `ctr`). Without it every trial
//! shows as ignored with the reason; `STACKROUTE_REQUIRE_KUBERNETES=1` makes that a failure.

use std::path::Path;
use std::process::{Command, ExitCode};

use testkit::{Options, Trial};

/// The scenarios, in the order they build on each other (`suite.sh` describes each).
const SCENARIOS: &[&str] = &[
    "install",
    "injection",
    "status",
    "transport",
    "userspace",
    "kernelhook",
    "validation",
    "agent-roll",
    "agent-handover",
    "controller-failover",
    "rbac",
    "trust",
    "egress",
    "uninstall",
];

fn scenario(name: &'static str) -> Trial {
    Trial::gated(name, testkit::kubernetes, move |kubeconfig| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/suite.sh");
        // The suite's output goes straight to the terminal: its steps and diagnostics show.
        let status = Command::new("bash")
            .arg(&script)
            .arg(name)
            .env("KUBECONFIG", &kubeconfig)
            .status()
            .map_err(|error| format!("cannot run {}: {error}", script.display()))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("suite.sh {name} failed: {status}"))
        }
    })
}

fn main() -> ExitCode {
    testkit::run_with(
        Options::in_order(),
        SCENARIOS.iter().map(|name| scenario(name)).collect(),
    )
}
