//! The kind e2e suite (`e2e/kind/run.sh`) from `cargo test`. The script runs the suite when
//! docker (with a reachable daemon), kind, kubectl and helm are installed, and otherwise prints
//! `SKIP: kind e2e: <reason>` and succeeds — or fails when `STACKROUTE_REQUIRE_KUBERNETES=1`.
//! `STACKROUTE_SKIP_KIND=1` leaves it out on a host that has the tools (it creates a cluster
//! and builds images, which takes minutes).

use std::path::Path;
use std::process::Command;

#[test]
fn kind_suite() {
    let require = std::env::var("STACKROUTE_REQUIRE_KUBERNETES").is_ok_and(|v| v == "1");
    if !require && std::env::var("STACKROUTE_SKIP_KIND").is_ok_and(|v| v == "1") {
        println!("SKIP: kind e2e: STACKROUTE_SKIP_KIND=1");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("kind/run.sh");
    // The script's output goes straight to the terminal (not captured), so its SKIP line shows.
    let status = Command::new("bash")
        .arg(&script)
        .status()
        .unwrap_or_else(|error| panic!("cannot run {}: {error}", script.display()));
    assert!(status.success(), "{} failed: {status}", script.display());
}
