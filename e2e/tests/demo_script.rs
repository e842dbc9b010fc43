//! `scripts/demo.sh`'s privilege check (issue 18): as root it needs no sudo (a fresh
//! container's root shell has none); as another user it re-runs itself with sudo, or says to
//! use a root shell when there is no sudo. `DEMO_STOP_AFTER_ROOT_CHECK` stops the script right
//! after the check, before it installs or builds anything. PATH holds only what the check runs
//! (bash, id, realpath) and, in one case, a stand-in sudo: never the machine's sudo.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo.sh");

/// A PATH directory with the real `bash` and `realpath`, and `id` real or a stand-in.
struct Tools(tempfile::TempDir);

impl Tools {
    fn new(real_id: bool) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let programs: &[&str] = if real_id {
            &["bash", "realpath", "id"]
        } else {
            &["bash", "realpath"]
        };
        for program in programs {
            symlink(which(program), dir.path().join(program)).expect("symlink");
        }
        Self(dir)
    }

    /// `name`, a shell script with `body`.
    fn script(&self, name: &str, body: &str) {
        let path = self.0.path().join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// An `id` that says the caller is user 1000.
    fn not_root(self) -> Self {
        self.script("id", "echo 1000");
        self
    }

    fn run(&self, args: &[&str]) -> Output {
        let output = Command::new(SCRIPT)
            .args(args)
            .env_clear()
            .env("PATH", self.0.path())
            .env("HOME", self.0.path())
            .env("DEMO_STOP_AFTER_ROOT_CHECK", "1")
            .output()
            .expect("run scripts/demo.sh");
        eprintln!(
            "demo.sh {args:?}: {}\nstdout: {}stderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

/// `program` on this process's PATH.
fn which(program: &str) -> PathBuf {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("{program} not on PATH"))
}

#[test]
fn as_root_without_sudo_the_demo_passes_its_privilege_check() {
    let root = rustix::process::geteuid().is_root();
    let tools = Tools::new(root);
    if !root {
        // Not root here: an `id` that says 0 stands in for a root shell.
        eprintln!("not root: `id -u` answers 0 by a stand-in");
        tools.script("id", "echo 0");
    }
    assert!(!tools.0.path().join("sudo").exists());
    let output = tools.run(&["--output", "json"]);
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "demo.sh: running as root\n"
    );
    assert!(output.stderr.is_empty());
}

#[test]
fn a_user_without_sudo_is_told_to_use_a_root_shell() {
    let tools = Tools::new(false).not_root();
    let output = tools.run(&[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs root"), "{stderr}");
    assert!(stderr.contains("run it in a root shell"), "{stderr}");
    assert!(!stderr.contains("not found"), "{stderr}");
}

#[test]
fn a_user_with_sudo_reruns_the_script_with_sudo_and_their_toolchain() {
    let tools = Tools::new(false).not_root();
    // The stand-in prints what sudo would run, one argument a line.
    tools.script("sudo", r#"printf '%s\n' "$@""#);
    std::fs::create_dir(tools.0.path().join(".rustup")).expect("mkdir");
    let output = tools.run(&["--output", "json"]);
    assert!(output.status.success());
    let dir = tools.0.path().display();
    let script = Path::new(SCRIPT).canonicalize().expect("the script");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!(
            "env\nPATH={dir}\nRUSTUP_HOME={dir}/.rustup\n{}\n--output\njson\n",
            script.display()
        )
    );
    assert!(String::from_utf8_lossy(&output.stderr).contains("running it with sudo"));
}
