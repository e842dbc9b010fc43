//! What the stackroute injection webhook does to a pod, as pure functions: no I/O, no clock.
//!
//! ```text
//! AdmissionReview bytes ─► review::parse ─► decide (pod, namespace meta) ─► patch::build ─► review::respond
//! ```
//!
//! - [`decide`](mod@decide): opt-in rules (annotation or label `stackroute.dev/inject`, pod
//!   or namespace; `disabled` on the pod wins), exclusions (hostNetwork, the controller's
//!   namespace, kube-system) and the per-pod `config.stackroute.dev/*` settings.
//! - [`patch`]: the RFC 6902 JSONPatch; idempotent, so a reinvocation adds only what a later
//!   webhook made necessary.
//! - [`review`]: AdmissionReview v1 in and out, with an error for every malformed input.
//! - [`Rdma`]: what a pod whose policies can pick RDMA gets besides the shim (a device-plugin
//!   resource, `IPC_LOCK`, the verbs provider and [`RDMA_PROVIDER_ENV`]); whether they can is
//!   the controller's question, not this crate's.
//!
//! The controller crate supplies the I/O: the HTTPS server, the namespace lookup, metrics.
#![forbid(unsafe_code)]

pub mod decide;
pub mod patch;
pub mod review;

pub use decide::{Decision, Libc, NamespaceMeta, Settings, Skip, decide, not_injected, pod_opt_in};
pub use patch::{build as build_patch, build_with_rdma};

/// Opt-in annotation and label (`enabled` / `disabled`), on a pod or its namespace.
pub const INJECT: &str = "stackroute.dev/inject";
/// Status annotation written by the webhook: what it did.
pub const INJECTED: &str = "stackroute.dev/injected";
/// Status annotation written when the pod got RDMA resources: what was added.
pub const RDMA_STATUS: &str = "stackroute.dev/rdma";
/// Per-pod setting: `STACKROUTE_LOG` for the shim (e.g. `debug`).
pub const CONFIG_LOG: &str = "config.stackroute.dev/log";
/// Per-pod setting: `glibc` (default) or `musl`, the shim build copied into the pod.
pub const CONFIG_LIBC: &str = "config.stackroute.dev/libc";
/// Per-pod setting: the workload name (default: the pod name, by the downward API).
pub const CONFIG_WORKLOAD: &str = "config.stackroute.dev/workload";

/// Name of the init container, and of the emptyDir volume holding the shim.
pub const SHIM_NAME: &str = "stackroute-shim";
/// Name of the hostPath volume of the agent's socket directory.
pub const SOCKETS_NAME: &str = "stackroute-sockets";
/// Where the shim emptyDir is mounted in the application's containers.
pub const SHIM_MOUNT: &str = "/stackroute";
/// Where the init container mounts the emptyDir (not `/stackroute`, which would hide the
/// builds inside the shim image).
pub const INSTALL_MOUNT: &str = "/stackroute-install";
/// `LD_PRELOAD` value the webhook adds (prepended to an existing one).
pub const SHIM_PATH: &str = "/stackroute/libnsocket.so";
/// The variable naming the shim's verbs provider, set in the application containers of pods
/// that get RDMA (only those: a process without it never loads libibverbs, and its listeners
/// are not RDMA upgrade endpoints).
pub const RDMA_PROVIDER_ENV: &str = "STACKROUTE_RDMA_PROVIDER";
/// Where RDMA pods find the verbs provider (copied by the init container when the shim image
/// has it; the shim reports `no-device` when it cannot load it).
pub const RDMA_PROVIDER_PATH: &str = "/stackroute/libstackroute_rdma.so";

/// Namespaces never injected besides the controller's own.
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system"];

/// What the webhook is configured with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Image of the init container; holds `/stackroute/lib/libnsocket.so` (glibc build),
    /// `/stackroute/lib/musl/libnsocket.so` and a POSIX `sh` with `cp`, and optionally the
    /// verbs provider `/stackroute/lib/libstackroute_rdma.so` (copied for RDMA pods only).
    pub shim_image: String,
    /// The node agent's socket directory on the host, mounted at the same path in pods.
    pub socket_dir: String,
    /// The controller's own namespace: never injected.
    pub own_namespace: String,
}

impl Config {
    /// Checks what the patch embeds: the image goes into the init container's shell script, so
    /// only image-reference characters are accepted; the socket directory must be absolute.
    pub fn validate(&self) -> Result<(), String> {
        let image_ok = !self.shim_image.is_empty()
            && self
                .shim_image
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
        if !image_ok {
            return Err(format!(
                "shim image {:?} is not an image reference",
                self.shim_image
            ));
        }
        let dir_ok = self.socket_dir.starts_with('/')
            && !self.socket_dir.contains("..")
            && !self
                .socket_dir
                .chars()
                .any(|c| c.is_whitespace() || c == ':');
        if !dir_ok {
            return Err(format!(
                "socket directory {:?} is not an absolute path",
                self.socket_dir
            ));
        }
        Ok(())
    }
}

/// What a pod whose policies can pick RDMA gets in each of its (non-init) containers, besides
/// [`RDMA_PROVIDER_ENV`] (the init container copies the provider when the shim image has it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rdma {
    /// The device plugin's extended resource, e.g. `rdma/hca_shared_devices_a`.
    pub resource_name: String,
    /// How many of it each container requests (and is limited to).
    pub resource_count: u32,
    /// Also add the `IPC_LOCK` capability (memory registration pins pages; it helps root
    /// containers only, see the chart README).
    pub ipc_lock: bool,
}

impl Rdma {
    /// Checks the resource is an extended resource name (`domain/name`) and the count is
    /// positive: the API server would reject pods patched otherwise.
    pub fn validate(&self) -> Result<(), String> {
        let valid_name = self
            .resource_name
            .split_once('/')
            .is_some_and(|(domain, name)| {
                let domain_ok = !domain.is_empty()
                    && domain.len() <= 253
                    && domain.split('.').all(|part| {
                        !part.is_empty()
                            && part
                                .chars()
                                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                            && !part.starts_with('-')
                            && !part.ends_with('-')
                    });
                let name_ok = !name.is_empty()
                    && name.len() <= 63
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && name.ends_with(|c: char| c.is_ascii_alphanumeric());
                // `kubernetes.io` names are native resources, never a device plugin's.
                let not_native = domain != "kubernetes.io" && !domain.ends_with(".kubernetes.io");
                domain_ok && name_ok && not_native
            });
        if !valid_name {
            return Err(format!(
                "RDMA resource {:?} is not an extended resource name (domain/name)",
                self.resource_name
            ));
        }
        if self.resource_count == 0 {
            return Err("RDMA resource count must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdma_validation() {
        let good = Rdma {
            resource_name: "rdma/hca_shared_devices_a".into(),
            resource_count: 1,
            ipc_lock: true,
        };
        assert_eq!(good.validate(), Ok(()));
        let sriov = Rdma {
            resource_name: "mellanox.com/mlnx_rdma".into(),
            ..good.clone()
        };
        assert_eq!(sriov.validate(), Ok(()));
        for name in [
            "",
            "hca",
            "rdma/",
            "/hca",
            "RDMA/hca",
            "rdma/hca/x",
            "rdma/-hca",
            "kubernetes.io/hca",
        ] {
            let bad = Rdma {
                resource_name: name.into(),
                ..good.clone()
            };
            assert!(bad.validate().is_err(), "{name}");
        }
        let zero = Rdma {
            resource_count: 0,
            ..good
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn config_validation() {
        let good = Config {
            shim_image: "ghcr.io/example/stackroute-shim:0.1.0@sha256:abc".into(),
            socket_dir: "/run/stackroute".into(),
            own_namespace: "stackroute-system".into(),
        };
        assert_eq!(good.validate(), Ok(()));
        for image in ["", "x\"; rm -rf /", "img $(id)"] {
            let bad = Config {
                shim_image: image.into(),
                ..good.clone()
            };
            assert!(bad.validate().is_err(), "{image}");
        }
        for dir in ["run/stackroute", "/run/../etc", "/a b"] {
            let bad = Config {
                socket_dir: dir.into(),
                ..good.clone()
            };
            assert!(bad.validate().is_err(), "{dir}");
        }
    }
}
