//! Used by the build scripts of the crates that carry BPF programs (`netstack/pktio`'s XDP
//! steering, `lrd-agent/kernel-hook`'s `sock_ops` hook): compiles one C file with clang for the
//! BPF target into `OUT_DIR`, where the crate embeds it (`aya::include_bytes_aligned!`). Needs
//! `clang` and libbpf's headers (Debian: `apt-get install clang libbpf-dev`); `$CLANG` names
//! another clang.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Command;

/// Compiles `source` (relative to the crate) into `OUT_DIR/object`; panics with what to install
/// when clang is missing or the program does not compile.
pub fn compile(source: &str, object: &str) {
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join(object);
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // <linux/types.h> includes <asm/types.h>, which Debian keeps under the host's multiarch
    // directory.
    let multiarch = format!(
        "/usr/include/{}-linux-gnu",
        std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into())
    );
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .args(["-c", source, "-o"])
        .arg(&out)
        .status();
    match status {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("{clang} failed to build {source} ({status})"),
        Err(error) => panic!(
            "cannot run {clang} to build {source}: {error}; install clang and libbpf's headers \
             (Debian: apt-get install clang libbpf-dev), or name a clang in $CLANG"
        ),
    }
}
