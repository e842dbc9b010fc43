//! The kind e2e suite (`e2e/kind/run.sh`) from `cargo test`: it builds images with Docker and
//! creates a kind cluster, which takes minutes, so it runs only when asked:
//! `STACKROUTE_KIND=1` (on a host with docker, kind, kubectl and helm). Otherwise the trial
//! shows as ignored with the reason; `STACKROUTE_REQUIRE_KIND=1` makes that a failure. The
//! script itself prints `SKIP: kind e2e: <reason>` when a tool is missing, and fails instead
//! with `STACKROUTE_REQUIRE_KUBERNETES=1`, which this trial sets when kind is required.
//!
//! The one-node Kubernetes lane that runs everywhere is `tests/kube.rs`.

use std::path::Path;
use std::process::{Command, ExitCode};

use testkit::Trial;

fn main() -> ExitCode {
    testkit::run(vec![Trial::gated(
        "kind_suite",
        || {
            testkit::env_gate(
                "STACKROUTE_KIND",
                "STACKROUTE_REQUIRE_KIND",
                "the kind suite needs Docker and kind (set STACKROUTE_KIND=1 to run it)",
            )
        },
        |_| {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kind/run.sh");
            let mut command = Command::new("bash");
            command.arg(&script);
            if std::env::var("STACKROUTE_REQUIRE_KIND").is_ok_and(|v| v == "1") {
                command.env("STACKROUTE_REQUIRE_KUBERNETES", "1");
            }
            let status = command
                .status()
                .map_err(|error| format!("cannot run {}: {error}", script.display()))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{} failed: {status}", script.display()))
            }
        },
    )])
}
