//! Credentials for tests that run a controller and agents: a development CA made by the
//! controller binary itself (`stackroute-controller credentials`), so tests use exactly what
//! a user runs.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Serialises issuing within the process (the files of one identity are written in place).
static ISSUING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A CA in a directory, with the controller's serving certificate and client credentials
/// issued on demand.
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
    controller: PathBuf,
}

impl Pki {
    /// Creates the CA and the serving certificate (localhost, 127.0.0.1, ::1 and `sans`) in
    /// `dir` with the controller binary `controller`.
    pub fn new(controller: &Path, dir: &Path, sans: &[&str]) -> Self {
        let pki = Self {
            dir: dir.to_path_buf(),
            controller: controller.to_path_buf(),
        };
        let mut args = vec!["init".to_string(), "--dir".into(), path_text(dir)];
        for san in sans {
            args.extend(["--san".to_string(), (*san).to_string()]);
        }
        pki.credentials(&args);
        pki
    }

    /// One PKI for this test process, in `base/pki-PID` (directories of processes that have
    /// exited are removed first, so nothing piles up).
    pub fn for_process(controller: &Path, base: &Path) -> Self {
        if let Ok(entries) = std::fs::read_dir(base) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let stale = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("pki-"))
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
                if stale {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Self::new(
            controller,
            &base.join(format!("pki-{}", std::process::id())),
            &[],
        )
    }

    /// The controller's `--grpc-tls-dir`.
    pub fn server(&self) -> PathBuf {
        self.dir.join("server")
    }

    /// `--credentials` of `node`'s agent (issued the first time).
    pub fn node(&self, node: &str) -> PathBuf {
        let out = self.dir.join("nodes").join(node);
        // Tests of one process ask at once: one issues, the others wait for it.
        let _issuing = ISSUING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !out.join("tls.crt").exists() {
            self.credentials(&[
                "issue".into(),
                "--dir".into(),
                path_text(&self.dir),
                "--node".into(),
                node.into(),
            ]);
        }
        out
    }

    /// `--credentials` of an administrator (`stackroute status`).
    pub fn admin(&self) -> PathBuf {
        let out = self.dir.join("admin");
        let _issuing = ISSUING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !out.join("tls.crt").exists() {
            self.credentials(&[
                "issue".into(),
                "--dir".into(),
                path_text(&self.dir),
                "--admin".into(),
            ]);
        }
        out
    }

    fn credentials(&self, args: &[String]) {
        let output = Command::new(&self.controller)
            .arg("credentials")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", self.controller.display()));
        assert!(
            output.status.success(),
            "stackroute-controller credentials {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn path_text(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_string()
}
