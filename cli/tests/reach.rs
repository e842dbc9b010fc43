//! Programs LD_PRELOAD cannot reach are reported as unaccelerated: `explain --program` adds it to
//! the explanation, `stackroute run` warns. Builds its programs with `cc` (and `objcopy` for a
//! program carrying Go's build-info section, as every Go binary does).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn stackroute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stackroute"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run stackroute")
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sr-reach-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn compile(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let source = dir.join("main.c");
    std::fs::write(&source, "int main(void) { return 0; }\n").expect("write source");
    let out = dir.join(name);
    let status = Command::new("cc")
        .args(extra)
        .arg("-o")
        .arg(&out)
        .arg(&source)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc {extra:?} failed");
    out
}

fn explain(program: &Path, output: &str) -> Vec<u8> {
    let out = stackroute(&[
        "explain",
        "--state",
        "examples/cluster",
        "--from",
        "ml/trainer-0",
        "--to",
        "10.244.2.10:29501",
        "--output",
        output,
        "--program",
        program.to_str().expect("utf-8 path"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn explain_json(program: &Path) -> serde_json::Value {
    serde_json::from_slice(&explain(program, "json")).expect("json")
}

#[test]
fn explain_reports_static_and_go_programs_as_unaccelerated() {
    let scratch = Scratch::new("explain");
    let dynamic = compile(&scratch.0, "dynamic", &[]);
    let json = explain_json(&dynamic);
    assert!(json.get("unaccelerated").is_none(), "{json}");
    assert!(
        json.get("transport").is_some(),
        "the decision is still explained: {json}"
    );

    let fully_static = compile(&scratch.0, "static", &["-static"]);
    let reason = explain_json(&fully_static)["unaccelerated"].to_string();
    assert!(reason.contains("statically linked"), "{reason}");

    // A Go binary is recognised by its build-info section, whatever it links against.
    let go = scratch.0.join("go");
    let blob = scratch.0.join("buildinfo");
    std::fs::write(&blob, b"\xff Go buildinf:").expect("write blob");
    let status = Command::new("objcopy")
        .arg("--add-section")
        .arg(format!(".go.buildinfo={}", blob.display()))
        .arg(&dynamic)
        .arg(&go)
        .status()
        .expect("run objcopy");
    assert!(status.success());
    let reason = explain_json(&go)["unaccelerated"].to_string();
    assert!(reason.contains("Go program"), "{reason}");

    let text = explain(&fully_static, "text");
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("unaccelerated: "), "{text}");
}

#[test]
fn run_warns_that_a_static_program_is_not_accelerated() {
    let scratch = Scratch::new("run");
    let fully_static = compile(&scratch.0, "static", &["-static"]);
    // No agent in this socket directory: run still starts the program (fail open).
    let out = stackroute(&[
        "run",
        "--socket-dir",
        scratch.0.to_str().expect("utf-8 path"),
        "--",
        fully_static.to_str().expect("utf-8 path"),
    ]);
    assert!(out.status.success(), "the program ran and exited 0");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not accelerated (statically linked"),
        "{stderr}"
    );
}
