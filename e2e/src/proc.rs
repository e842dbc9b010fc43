//! Child processes that are always stopped: by PID, on drop, also when a test panics.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal, kill_process};

/// A running child process. Dropping it sends SIGTERM, waits up to two seconds, then SIGKILL.
/// stdout and stderr go to one log file, read back with [`Proc::output`].
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Starts `command` with stdin closed and its output in `LOG_DIR/NAME.log` (a numbered
    /// name if that exists).
    pub fn spawn(name: &str, command: &mut Command, log_dir: &Path) -> Result<Self> {
        let mut log = log_dir.join(format!("{name}.log"));
        let mut n = 1;
        while log.exists() {
            n += 1;
            log = log_dir.join(format!("{name}.{n}.log"));
        }
        let file = File::create(&log).with_context(|| format!("{}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = command
            .spawn()
            .with_context(|| format!("{name}: cannot start {command:?}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
            status: None,
        })
    }

    /// The process id (with `ip netns exec` and `stackroute run`, which both exec, it is the
    /// program's own).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything the process wrote so far (stdout and stderr interleaved).
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.poll().is_none()
    }

    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the process to exit; kills it and fails after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.poll() {
                return Ok(status);
            }
            if start.elapsed() > timeout {
                self.stop();
                bail!(
                    "{}: still running after {timeout:?}; killed. Output:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a successful exit and returns the output; fails with the output otherwise.
    pub fn success(&mut self, timeout: Duration) -> Result<String> {
        let status = self.wait(timeout)?;
        let output = self.output();
        if !status.success() {
            bail!("{}: {status}. Output:\n{output}", self.name);
        }
        Ok(output)
    }

    /// Sends a signal by PID (nothing if the process has exited and been reaped).
    pub fn signal(&mut self, signal: Signal) {
        if self.poll().is_some() {
            return;
        }
        if let Some(pid) = i32::try_from(self.child.id()).ok().and_then(Pid::from_raw) {
            let _ = kill_process(pid, signal);
        }
    }

    /// SIGTERM, up to two seconds to exit, then SIGKILL; always reaps.
    pub fn stop(&mut self) {
        if self.poll().is_some() {
            return;
        }
        self.signal(Signal::TERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            if self.poll().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }

    /// SIGKILL at once (a crash, as far as the process is concerned); reaps.
    pub fn kill(&mut self) {
        if self.poll().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a command to completion (at most `timeout`), returning stdout; fails with stderr.
pub fn run(command: &mut Command, timeout: Duration) -> Result<String> {
    command.stdin(Stdio::null());
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(timeout) {
        Ok(output) => output?,
        Err(_) => {
            if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
                let _ = kill_process(pid, Signal::KILL);
            }
            bail!("{command:?}: no exit within {timeout:?}; killed");
        }
    };
    if !output.status.success() {
        bail!(
            "{command:?}: {}: {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
