//! A harness for integration tests that need something the machine may not have — a
//! Kubernetes API server, RDMA hardware, root — built on [`libtest_mimic`].
//!
//! A test binary with `harness = false` lists its trials and hands them to [`run`]. A trial
//! behind a gate (such as [`kubernetes`]) that finds its environment missing shows as
//! **ignored**, with the reason on its line of the output, so `cargo test` says
//! `0 passed; 0 failed; 2 ignored` instead of counting a test that never ran as passed. When
//! the gate's `STACKROUTE_REQUIRE_*` variable is `1`, a missing environment fails the trial
//! instead (CI sets it where the environment must be there).
//!
//! ```toml
//! [dev-dependencies]
//! testkit = { package = "stackroute-testkit", path = "../testkit" }
//!
//! [[test]]
//! name = "kubernetes"
//! harness = false
//! ```
//!
//! ```no_run
//! use stackroute_testkit as testkit;
//! use testkit::Trial;
//!
//! fn main() -> std::process::ExitCode {
//!     testkit::run(vec![
//!         Trial::gated("objects_reach_agents", testkit::kubernetes, |kubeconfig| {
//!             // a trial that needs tokio makes its own runtime
//!             testkit::block_on(async move { assert!(kubeconfig.exists()) })
//!         }),
//!         Trial::test("plain", || Ok::<(), String>(())),
//!     ])
//! }
//! ```
//!
//! A suite whose steps build on each other (a shell suite run as several trials, say) uses
//! [`run_with`] and [`Options::in_order`]: one trial at a time in list order, and after a
//! failure the remaining trials are reported ignored ("not run: … failed") rather than run
//! against a broken setup.
//!
//! Trials run on the harness's threads: stdout and stderr are not captured (`--nocapture` is
//! the only mode), and a panic fails the trial with its message.

pub mod pki;
pub mod support;

pub use support::{bin, free_port, http_get, library, poll, wait_for, wait_for_async, web_policy};

use std::ffi::OsString;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

pub use libtest_mimic::{Arguments, Conclusion, Failed};
use libtest_mimic::{Completion, FormatSetting};

/// Names the kubeconfig of the Kubernetes API server the tests use.
pub const KUBECONFIG_VAR: &str = "STACKROUTE_TEST_KUBECONFIG";
/// `1`: a missing [`KUBECONFIG_VAR`] fails the Kubernetes trials instead of ignoring them.
pub const REQUIRE_KUBERNETES_VAR: &str = "STACKROUTE_REQUIRE_KUBERNETES";
/// What the Kubernetes trials lack without [`KUBECONFIG_VAR`], and how to get it.
pub const KUBERNETES_MISSING: &str = "no Kubernetes API server (e2e/kube/cluster.sh up)";

// === gates ===

/// Why a trial did not run; it is printed on the trial's line (`ignored (REASON)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ignored(String);

impl Ignored {
    /// An ignore with this reason.
    pub fn new(reason: impl Into<String>) -> Self {
        Self(reason.into())
    }

    /// The reason.
    pub fn reason(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ignored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `1`: a build without DPDK fails the DPDK trials instead of ignoring them.
pub const REQUIRE_DPDK_VAR: &str = "STACKROUTE_REQUIRE_DPDK";

/// The gate of the DPDK trials: open when the test was built with DPDK (`built`: the calling
/// crate's `cfg!(feature = "dpdk")`); otherwise ignored with "built without DPDK (`how`)", or a
/// panic (a failed trial) when `STACKROUTE_REQUIRE_DPDK=1`.
pub fn dpdk(built: bool, how: &str) -> Result<(), Ignored> {
    if built {
        return Ok(());
    }
    if std::env::var_os(REQUIRE_DPDK_VAR).is_some_and(|r| r == "1") {
        panic!("{REQUIRE_DPDK_VAR}=1 but this test was built without DPDK ({how})");
    }
    Err(Ignored::new(format!("built without DPDK ({how})")))
}

/// The gate of the Kubernetes trials: the kubeconfig named by `STACKROUTE_TEST_KUBECONFIG`, or
/// "ignored: STACKROUTE_TEST_KUBECONFIG not set: no Kubernetes API server (e2e/kube/cluster.sh
/// up)". Panics — failing the trial that calls it — when it is unset and
/// `STACKROUTE_REQUIRE_KUBERNETES=1`.
pub fn kubernetes() -> Result<PathBuf, Ignored> {
    env_gate(KUBECONFIG_VAR, REQUIRE_KUBERNETES_VAR, KUBERNETES_MISSING).map(PathBuf::from)
}

/// A gate on a program the trial runs (`etcd`, say): its path when it is on `PATH`; otherwise
/// ignored with "`name` not installed (`hint`)", or a panic (a failed trial) when `require_var`
/// is `1`.
pub fn program(name: &str, require_var: &str, hint: &str) -> Result<PathBuf, Ignored> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    });
    match found {
        Some(path) => Ok(path),
        None if std::env::var_os(require_var).is_some_and(|r| r == "1") => {
            panic!("{require_var}=1 but {name} is not installed ({hint})")
        }
        None => Err(Ignored::new(format!("{name} not installed ({hint})"))),
    }
}

/// A gate on an environment variable: its value when set (and not empty); otherwise ignored
/// with "`var` not set: `missing`", or a panic (a failed trial) when `require_var` is `1`.
pub fn env_gate(var: &str, require_var: &str, missing: &str) -> Result<String, Ignored> {
    match decide_gate(
        std::env::var_os(var),
        std::env::var_os(require_var),
        var,
        require_var,
        missing,
    ) {
        GateDecision::Open(value) => Ok(value),
        GateDecision::Ignore(ignored) => Err(ignored),
        GateDecision::Fail(message) => panic!("{message}"),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum GateDecision {
    Open(String),
    Ignore(Ignored),
    Fail(String),
}

fn decide_gate(
    value: Option<OsString>,
    required: Option<OsString>,
    var: &str,
    require_var: &str,
    missing: &str,
) -> GateDecision {
    match value.filter(|v| !v.is_empty()) {
        Some(value) => match value.into_string() {
            Ok(value) => GateDecision::Open(value),
            Err(value) => GateDecision::Fail(format!("{var} is not UTF-8: {value:?}")),
        },
        None if required.is_some_and(|r| r == "1") => {
            GateDecision::Fail(format!("{require_var}=1 but {var} is not set: {missing}"))
        }
        None => GateDecision::Ignore(Ignored::new(format!("{var} not set: {missing}"))),
    }
}

// === trials ===

/// What a trial's body may return: `()` (fail by panicking, as with `assert!`) or
/// `Result<(), E>` with any `E` that converts into [`Failed`] (`String`, `&str`, any
/// `Display` type, or `Failed` itself).
pub trait IntoOutcome {
    /// `Ok` for a pass, `Err` for a failure.
    fn into_outcome(self) -> Result<(), Failed>;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Result<(), Failed> {
        Ok(())
    }
}

impl<E: Into<Failed>> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Result<(), Failed> {
        self.map_err(Into::into)
    }
}

type Body = Box<dyn FnOnce() -> Result<Option<Ignored>, Failed> + Send>;

/// One named test: a body, maybe behind a gate.
pub struct Trial {
    name: String,
    body: Body,
}

impl fmt::Debug for Trial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trial")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Trial {
    /// A trial that always runs.
    pub fn test<R: IntoOutcome>(
        name: impl Into<String>,
        body: impl FnOnce() -> R + Send + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            body: Box::new(move || body().into_outcome().map(|()| None)),
        }
    }

    /// A trial that runs `body` with what `gate` returns, or shows as ignored with the gate's
    /// reason. The gate runs when the trial would run (not for `--list`), inside the trial: a
    /// gate that panics fails this trial only.
    pub fn gated<T, R: IntoOutcome>(
        name: impl Into<String>,
        gate: impl FnOnce() -> Result<T, Ignored> + Send + 'static,
        body: impl FnOnce(T) -> R + Send + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            body: Box::new(move || match gate() {
                Ok(value) => body(value).into_outcome().map(|()| None),
                Err(ignored) => Ok(Some(ignored)),
            }),
        }
    }

    /// The trial's name, as printed and matched by filters.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Runs `future` to completion on a fresh tokio runtime (current thread, I/O and time
/// enabled) — what `#[tokio::test]` gives a test.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime for the trial")
        .block_on(future)
}

// === running ===

/// How [`run_with`] runs the trials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    sequential: bool,
    stop_after_failure: bool,
}

impl Options {
    /// The default: trials run in parallel (`--test-threads` applies), each on its own.
    pub fn parallel() -> Self {
        Self::default()
    }

    /// For suites whose steps build on each other: one trial at a time in list order, and
    /// after a failure every later trial is reported ignored (`not run: … failed`).
    pub fn in_order() -> Self {
        Self {
            sequential: true,
            stop_after_failure: true,
        }
    }

    /// One trial at a time, in list order (as `--test-threads 1`).
    pub fn sequential(mut self, sequential: bool) -> Self {
        self.sequential = sequential;
        self
    }

    /// After a failed trial, report the later ones ignored instead of running them. Implies
    /// [`Options::sequential`].
    pub fn stop_after_failure(mut self, stop: bool) -> Self {
        self.stop_after_failure = stop;
        self.sequential |= stop;
        self
    }
}

/// Runs `trials` with the command line's arguments (filters, `--list`, `--ignored`, …) and the
/// default [`Options`]; returns the exit code for `main`.
pub fn run(trials: Vec<Trial>) -> ExitCode {
    run_with(Options::default(), trials)
}

/// [`run`] with [`Options`].
pub fn run_with(options: Options, trials: Vec<Trial>) -> ExitCode {
    run_with_args(Arguments::from_args(), options, trials).exit_code()
}

/// Runs `trials` with explicit arguments (`Arguments::from_iter(["name", "--flag", …])`) and
/// returns the counts.
pub fn run_with_args(mut args: Arguments, options: Options, trials: Vec<Trial>) -> Conclusion {
    let mut names = std::collections::BTreeSet::new();
    for trial in &trials {
        assert!(
            names.insert(trial.name.clone()),
            "two trials are named {:?}",
            trial.name
        );
    }
    if options.sequential {
        args.test_threads = Some(1);
    }
    let ignored: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let trials = trials
        .into_iter()
        .map(|trial| {
            let Trial { name, body } = trial;
            let ignored = ignored.clone();
            let failed = failed.clone();
            let stop_after_failure = options.stop_after_failure;
            let trial_name = name.clone();
            libtest_mimic::Trial::ignorable_test(name, move || {
                let earlier = lock(&failed).clone();
                let outcome = match earlier.filter(|_| stop_after_failure) {
                    Some(earlier) => Ok(Some(Ignored::new(format!(
                        "not run: {earlier} failed earlier in this ordered suite"
                    )))),
                    None => match catch_unwind(AssertUnwindSafe(body)) {
                        Ok(outcome) => outcome,
                        Err(panic) => {
                            lock(&failed).get_or_insert_with(|| trial_name.clone());
                            resume_unwind(panic);
                        }
                    },
                };
                match outcome {
                    Ok(None) => Ok(Completion::Completed),
                    Ok(Some(reason)) => {
                        lock(&ignored).push((trial_name, reason.0.clone()));
                        Ok(Completion::ignored_with(reason))
                    }
                    Err(failure) => {
                        lock(&failed).get_or_insert(trial_name);
                        Err(failure)
                    }
                }
            })
        })
        .collect();
    let terse = args.quiet
        || matches!(
            args.format,
            Some(FormatSetting::Terse | FormatSetting::Json)
        );
    let conclusion = libtest_mimic::run(&args, trials);
    // The pretty format prints each reason on the trial's line; the others have no room for
    // it, so it goes to stderr (never captured here).
    if terse {
        for (name, reason) in lock(&ignored).iter() {
            eprintln!("ignored {name}: {reason}");
        }
    }
    conclusion
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn a_program_gate_finds_programs_on_path_and_names_missing_ones() {
        assert!(program("sh", "STACKROUTE_TESTKIT_UNSET_REQUIRE", "").is_ok());
        let missing = program(
            "stackroute-no-such-program",
            "STACKROUTE_TESTKIT_UNSET_REQUIRE",
            "install it",
        )
        .unwrap_err();
        assert_eq!(
            missing.reason(),
            "stackroute-no-such-program not installed (install it)"
        );
    }

    /// Arguments for a nested run; its report goes nowhere, so that no `test result:` line of
    /// it lands in this test binary's own output.
    fn args(extra: &[&str]) -> Arguments {
        Arguments::from_iter(["testkit", "--logfile", "/dev/null"].iter().chain(extra))
    }

    fn ignore_always() -> Result<(), Ignored> {
        Err(Ignored::new("no such thing here"))
    }

    #[test]
    fn gates_open_ignore_or_fail() {
        let decide = |value: Option<&str>, required: Option<&str>| {
            decide_gate(
                value.map(OsString::from),
                required.map(OsString::from),
                "X_CONFIG",
                "X_REQUIRE",
                "no X (x up)",
            )
        };
        assert_eq!(
            decide(Some("/k"), None),
            GateDecision::Open("/k".to_string())
        );
        assert_eq!(
            decide(Some("/k"), Some("1")),
            GateDecision::Open("/k".to_string())
        );
        assert_eq!(
            decide(None, None),
            GateDecision::Ignore(Ignored::new("X_CONFIG not set: no X (x up)"))
        );
        assert_eq!(
            decide(Some(""), Some("0")),
            GateDecision::Ignore(Ignored::new("X_CONFIG not set: no X (x up)"))
        );
        assert_eq!(
            decide(None, Some("1")),
            GateDecision::Fail("X_REQUIRE=1 but X_CONFIG is not set: no X (x up)".to_string())
        );
        assert_eq!(
            decide(Some(""), Some("1")),
            GateDecision::Fail("X_REQUIRE=1 but X_CONFIG is not set: no X (x up)".to_string())
        );
    }

    #[test]
    fn the_kubernetes_gate_names_its_variable_and_the_way_out() {
        let GateDecision::Ignore(ignored) = decide_gate(
            None,
            None,
            KUBECONFIG_VAR,
            REQUIRE_KUBERNETES_VAR,
            KUBERNETES_MISSING,
        ) else {
            panic!("ignored without the variable");
        };
        assert_eq!(
            ignored.reason(),
            "STACKROUTE_TEST_KUBECONFIG not set: no Kubernetes API server (e2e/kube/cluster.sh up)"
        );
    }

    #[test]
    fn gated_trials_count_as_ignored_not_passed() {
        let conclusion = run_with_args(
            args(&[]),
            Options::default(),
            vec![
                Trial::gated("needs_x", ignore_always, |()| ()),
                Trial::gated("needs_x_too", ignore_always, |()| ()),
                Trial::test("plain", || ()),
                Trial::gated("open", || Ok(3), |n: i32| assert_eq!(n, 3)),
            ],
        );
        assert_eq!(
            (
                conclusion.num_passed,
                conclusion.num_failed,
                conclusion.num_ignored
            ),
            (2, 0, 2)
        );
    }

    #[test]
    fn failures_are_panics_errors_and_panicking_gates() {
        let conclusion = run_with_args(
            args(&["--quiet"]),
            Options::default(),
            vec![
                Trial::test("panics", || -> () { panic!("boom") }),
                Trial::test("errs", || Err::<(), _>("bad")),
                Trial::gated(
                    "required",
                    || -> Result<(), Ignored> { panic!("X_REQUIRE=1 but X is not set") },
                    |()| (),
                ),
                Trial::test("fine", || Ok::<(), Failed>(())),
            ],
        );
        assert_eq!((conclusion.num_passed, conclusion.num_failed), (1, 3));
    }

    #[test]
    fn an_ordered_suite_runs_in_order_and_stops_after_a_failure() {
        let order = Arc::new(Mutex::new(Vec::new()));
        let step = |name: &'static str, ok: bool| {
            let order = order.clone();
            Trial::test(name, move || {
                lock(&order).push(name);
                if ok {
                    Ok(())
                } else {
                    Err(format!("{name} failed"))
                }
            })
        };
        let conclusion = run_with_args(
            args(&["--test-threads", "4"]),
            Options::in_order(),
            vec![
                step("1_up", true),
                step("2_deploy", true),
                step("3_check", false),
                step("4_more", true),
                step("5_down", true),
            ],
        );
        assert_eq!(*lock(&order), vec!["1_up", "2_deploy", "3_check"]);
        assert_eq!(
            (
                conclusion.num_passed,
                conclusion.num_failed,
                conclusion.num_ignored
            ),
            (2, 1, 2)
        );

        // Without stop_after_failure every step runs, still in order.
        lock(&order).clear();
        let conclusion = run_with_args(
            args(&[]),
            Options::parallel().sequential(true),
            vec![
                step("1_up", true),
                step("2_check", false),
                step("3_down", true),
            ],
        );
        assert_eq!(*lock(&order), vec!["1_up", "2_check", "3_down"]);
        assert_eq!((conclusion.num_passed, conclusion.num_failed), (2, 1));
    }

    #[test]
    fn filters_work_as_with_libtest() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counting = |name: &str| {
            let runs = runs.clone();
            Trial::test(name, move || {
                runs.fetch_add(1, Ordering::SeqCst);
            })
        };
        let conclusion = run_with_args(
            args(&["alpha"]),
            Options::default(),
            vec![
                counting("alpha_one"),
                counting("beta"),
                counting("alpha_two"),
            ],
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(
            (
                conclusion.num_passed,
                conclusion.num_ignored,
                conclusion.num_filtered_out
            ),
            (2, 0, 1)
        );
        // --list runs nothing, gates included.
        let conclusion = run_with_args(
            args(&["--list"]),
            Options::default(),
            vec![Trial::gated(
                "gated",
                || -> Result<(), Ignored> { panic!("a gate ran for --list") },
                |()| (),
            )],
        );
        assert_eq!(conclusion.num_failed, 0);
    }

    #[test]
    #[should_panic(expected = "two trials are named \"same\"")]
    fn trial_names_are_unique() {
        let _ = run_with_args(
            args(&[]),
            Options::default(),
            vec![Trial::test("same", || ()), Trial::test("same", || ())],
        );
    }

    #[test]
    fn block_on_gives_a_runtime_with_time() {
        let value = block_on(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            7
        });
        assert_eq!(value, 7);
    }
}
