//! With the `dpdk` feature: finds DPDK with pkg-config, compiles `csrc/stackroute_dpdk.c` and
//! generates bindings for the exported API the engine uses. Without it: nothing (the crate then
//! only says how to enable DPDK).

fn main() {
    #[cfg(feature = "dpdk")]
    with_dpdk::build();
}

#[cfg(feature = "dpdk")]
mod with_dpdk {
    use std::env;
    use std::path::PathBuf;
    use std::process::Command;

    const HINT: &str = "the `dpdk` feature needs DPDK >= 22.11 found by pkg-config (libdpdk) and \
                        libclang; on Debian 12: apt-get install libdpdk-dev dpdk clang pkg-config";

    pub(super) fn build() {
        for var in ["PKG_CONFIG", "PKG_CONFIG_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        println!("cargo:rerun-if-changed=csrc");
        // Emits the link flags for the shared librte_* libraries.
        if let Err(e) = pkg_config::Config::new()
            .atleast_version("22.11")
            .probe("libdpdk")
        {
            panic!("{e}\n{HINT}");
        }
        // The pkg-config crate keeps only -I/-D from --cflags; DPDK's headers also need
        // `-include rte_config.h` and its `-march`, so the raw flags go to both compilers.
        let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into());
        let output = Command::new(&pkg_config)
            .args(["--cflags", "libdpdk"])
            .output()
            .unwrap_or_else(|e| panic!("running {pkg_config} --cflags libdpdk: {e}\n{HINT}"));
        let cflags = String::from_utf8(output.stdout).expect("pkg-config printed non-UTF-8");
        let cflags = shlex::split(cflags.trim()).expect("pkg-config --cflags libdpdk: bad quoting");

        let mut c = cc::Build::new();
        c.file("csrc/stackroute_dpdk.c")
            .include("csrc")
            .warnings(true);
        for flag in &cflags {
            c.flag(flag);
        }
        c.compile("stackroute_dpdk");

        let bindings = bindgen::Builder::default()
            .header("csrc/stackroute_dpdk.h")
            .clang_args(&cflags)
            .clang_arg("-Icsrc")
            .allowlist_function("sr_.*")
            .allowlist_function(
                "rte_eal_(init|cleanup)|rte_strerror|rte_socket_id|rte_eth_dev_count_avail|\
                 rte_eth_dev_is_valid_port|rte_eth_dev_(start|stop|close|socket_id)|\
                 rte_eth_promiscuous_enable|rte_eth_stats_get|rte_pktmbuf_pool_create|\
                 rte_mempool_(free|avail_count|in_use_count)",
            )
            .allowlist_type("sr_port_info|rte_eth_stats")
            .allowlist_var("SR_.*|RTE_MAX_ETHPORTS|RTE_PKTMBUF_HEADROOM")
            // Only pointers to these cross: their bitfields and unions stay in C.
            .opaque_type("rte_mbuf|rte_mempool")
            // DPDK's doc comments are not Rust doctests.
            .generate_comments(false)
            .layout_tests(false)
            .derive_default(true)
            .generate()
            .unwrap_or_else(|e| panic!("bindgen on csrc/stackroute_dpdk.h: {e}\n{HINT}"));
        let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
        bindings
            .write_to_file(out.join("bindings.rs"))
            .expect("writing bindings.rs");
    }
}
