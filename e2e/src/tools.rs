//! Preconditions (root, programs, the project's binaries) and visible skips.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// `STACKROUTE_REQUIRE_NETNS=1`: a missing precondition fails instead of skipping (CI sets it).
pub const REQUIRE_NETNS: &str = "STACKROUTE_REQUIRE_NETNS";

/// Whether `var` is set to `1`.
pub fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The first `name` on `PATH`.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Root and the network tools the harness needs; `Err(reason)` otherwise.
pub fn netns_preconditions() -> Result<(), String> {
    if !is_root() {
        return Err("needs root (network namespaces, veth, iptables, tc)".into());
    }
    for tool in ["ip", "iptables", "tc", "ethtool", "ss", "sysctl"] {
        if which(tool).is_none() {
            return Err(format!("{tool} is not installed"));
        }
    }
    Ok(())
}

/// The project's binaries the harness runs.
#[derive(Clone, Debug)]
pub struct Bins {
    /// `stackroute-controller`.
    pub controller: PathBuf,
    /// `stackroute-lrd`.
    pub lrd: PathBuf,
    /// `stackroute` (the CLI; `stackroute run`).
    pub cli: PathBuf,
    /// `libnsocket.so`, if built.
    pub shim: Option<PathBuf>,
    /// `stackroute-e2e-delay` (this crate), if built.
    pub delay: Option<PathBuf>,
}

/// Builds `libnsocket.so` into `profile_dir` (`target/<profile>`), once per process: `cargo
/// test` builds the shim crate's `rlib` for tests but never its `cdylib`, so a fresh `cargo test
/// --workspace` lacks it and a kept target directory holds a stale one. Cargo's freshness check
/// makes the build a no-op when nothing changed.
fn build_shim_into(profile_dir: &Path) -> Result<()> {
    static BUILT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *BUILT.get_or_init(|| build_shim_now(profile_dir).is_ok()) {
        Ok(())
    } else {
        bail!("cargo build -p nsocket-shim failed")
    }
}

fn build_shim_now(profile_dir: &Path) -> Result<()> {
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let target_dir = profile_dir.parent().context("target directory")?;
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--lib", "-p", "nsocket-shim", "--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()?;
    if !status.success() {
        bail!("cargo build -p nsocket-shim failed");
    }
    Ok(())
}

impl Bins {
    /// Looks in `$STACKROUTE_BIN_DIR`, else in the target directory of the running executable
    /// (`target/<profile>/` for binaries, its parent for tests in `deps/`). The shim is
    /// `$STACKROUTE_SHIM` if set, else `libnsocket.so` in the same directory.
    pub fn find() -> Result<Self> {
        let dir = match std::env::var_os("STACKROUTE_BIN_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let exe = std::env::current_exe()?;
                let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
                if dir.ends_with("deps") {
                    dir.pop();
                }
                dir
            }
        };
        let bin = |name: &str| -> Result<PathBuf> {
            let path = dir.join(name);
            if !path.is_file() {
                bail!(
                    "{} is missing: run `cargo build -p stackroute-controller -p stackroute-lrd -p stackroute-cli -p nsocket-shim` with the same profile and target directory (or `cargo test --workspace`), or set STACKROUTE_BIN_DIR",
                    path.display()
                );
            }
            Ok(path)
        };
        let shim = match std::env::var_os("STACKROUTE_SHIM") {
            Some(path) => Some(PathBuf::from(path)),
            None => Some(dir.join("libnsocket.so")),
        }
        .filter(|p| {
            // In our own target directory the library is brought up to date; an explicit
            // $STACKROUTE_SHIM or $STACKROUTE_BIN_DIR is used as it is (built only if missing).
            let own_target_dir = std::env::var_os("STACKROUTE_SHIM").is_none()
                && std::env::var_os("STACKROUTE_BIN_DIR").is_none();
            if (own_target_dir || !p.is_file())
                && let Err(error) = build_shim_into(&dir)
                && p.is_file()
            {
                eprintln!(
                    "note: could not rebuild libnsocket.so ({error:#}); using {} as it is",
                    p.display()
                );
            }
            p.is_file()
        });
        Ok(Self {
            controller: bin("stackroute-controller")?,
            lrd: bin("stackroute-lrd")?,
            cli: bin("stackroute")?,
            shim,
            delay: Some(dir.join("stackroute-e2e-delay")).filter(|p| p.is_file()),
        })
    }
}

/// Gate of a network-namespace trial: root, the network tools, `programs`, the control-plane
/// binaries and the built `artifacts` next to them (`libnsocket.so`, `stackroute-stackd`).
/// Otherwise the trial shows as ignored with the reason — or fails under
/// `STACKROUTE_REQUIRE_NETNS=1` (CI installs and builds everything).
pub fn netns_gate(programs: &[&str], artifacts: &[&str]) -> Result<(), testkit::Ignored> {
    let missing = netns_preconditions().err().or_else(|| {
        programs
            .iter()
            .find(|p| which(p).is_none())
            .map(|p| format!("{p} is not installed"))
    });
    let missing = missing.or_else(|| match Bins::find() {
        Err(error) => Some(format!("{error:#}")),
        Ok(bins) => artifacts
            .iter()
            .find(|artifact| match **artifact {
                "libnsocket.so" => bins.shim.is_none(),
                other => !bins.controller.with_file_name(other).is_file(),
            })
            .map(|absent| {
                let package = if *absent == "libnsocket.so" {
                    "nsocket-shim"
                } else {
                    absent
                };
                format!("{absent} is not built (cargo build -p {package}, same target directory)")
            }),
    });
    match missing {
        None => Ok(()),
        Some(reason) if required(REQUIRE_NETNS) => {
            panic!("{reason}, and {REQUIRE_NETNS}=1 forbids skipping")
        }
        Some(reason) => Err(testkit::Ignored::new(reason)),
    }
}
