//! Raw bindings to DPDK for the stackroute DPDK engine (`stackroute-pktio`'s `dpdk` module, which
//! owns every call and its safety argument). With the `dpdk` feature the crate binds DPDK
//! 22.11 or newer, found by pkg-config: bindgen for the exported functions, and `sr_*` wrappers
//! (`csrc/stackroute_dpdk.c`) for the static inline functions and macros of the per-packet path.
//! Without it the crate is empty but for [`ENABLED`] and [`HOW_TO_ENABLE`], so the rest of the
//! workspace builds and runs everywhere and says how to get DPDK.
//!
//! A hand-written `-sys` crate because the crates.io `dpdk-sys` does not build against Debian's
//! DPDK 22.11 (it expects its own DPDK build tree).

/// Whether this build links DPDK.
pub const ENABLED: bool = cfg!(feature = "dpdk");

/// What to do to get a build with DPDK.
pub const HOW_TO_ENABLE: &str = "built without DPDK: rebuild with `--features dpdk` \
     (cargo build -p stackroute-netperf -p stackroute-stackd --features \
     stackroute-netperf/dpdk,stackroute-stackd/dpdk); needs DPDK >= 22.11 found by pkg-config \
     (libdpdk) and libclang: on Debian 12, apt-get install libdpdk-dev dpdk clang pkg-config";

#[cfg(feature = "dpdk")]
#[allow(
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unreachable_pub,
    unused_qualifications,
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::undocumented_unsafe_blocks
)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}

#[cfg(feature = "dpdk")]
pub use bindings::*;

#[cfg(test)]
mod tests {
    #[cfg(not(feature = "dpdk"))]
    #[test]
    fn without_the_feature_it_says_how_to_enable() {
        const { assert!(!super::ENABLED) };
        assert!(super::HOW_TO_ENABLE.contains("--features dpdk"));
        assert!(super::HOW_TO_ENABLE.contains("libdpdk-dev"));
    }

    #[cfg(feature = "dpdk")]
    #[test]
    fn links_dpdk_22_11_or_newer() {
        // SAFETY: sr_version returns DPDK's static version string; no EAL needed.
        let version = unsafe { std::ffi::CStr::from_ptr(super::sr_version()) };
        let version = version.to_str().expect("DPDK's version is ASCII");
        let numbers: Vec<u32> = version
            .trim_start_matches("DPDK ")
            .split('.')
            .take(2)
            .map(|n| n.parse().expect("DPDK version numbers"))
            .collect();
        assert!(numbers >= vec![22, 11], "{version}");
        // SAFETY: rte_strerror returns a static (or thread-local) string for any errno.
        let message = unsafe { std::ffi::CStr::from_ptr(super::rte_strerror(libc::EINVAL)) };
        assert!(!message.to_bytes().is_empty());
    }
}
