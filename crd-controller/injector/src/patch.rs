//! The JSONPatch (RFC 6902) that injects the shim.
//!
//! Every part is added only when missing, so the patch is idempotent: a second review of an
//! injected pod yields no operation, and a reinvocation after a later webhook added a
//! container yields only that container's environment and mounts.

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Volume, VolumeMount};
use serde_json::{Value, json};

use crate::decide::Settings;
use crate::{Config, INJECTED, INSTALL_MOUNT, SHIM_MOUNT, SHIM_NAME, SHIM_PATH, SOCKETS_NAME};

/// The patch and what it does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Injection {
    /// JSONPatch operations (`[{"op": …, "path": …, "value": …}]`); empty: nothing to do.
    pub ops: Vec<Value>,
    /// Problems that did not stop the injection (for AdmissionResponse warnings).
    pub warnings: Vec<String>,
}

/// Escapes one JSON Pointer reference token (RFC 6901).
fn token(raw: &str) -> String {
    raw.replace('~', "~0").replace('/', "~1")
}

fn add(path: String, value: Value) -> Value {
    json!({"op": "add", "path": path, "value": value})
}

/// The value of `stackroute.dev/injected`: what the webhook did.
pub fn status(settings: &Settings, config: &Config) -> String {
    let mut text = format!(
        "libc={} source={} image={} preload={} socketDir={} workload={}",
        settings.libc.as_str(),
        settings.libc.source(),
        config.shim_image,
        SHIM_PATH,
        config.socket_dir,
        settings.workload.as_deref().unwrap_or("metadata.name"),
    );
    if let Some(log) = &settings.log {
        text.push_str(" log=");
        text.push_str(log);
    }
    text
}

fn env_value(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn env_field(name: &str, field: &str) -> EnvVar {
    serde_json::from_value(json!({
        "name": name,
        "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field}}
    }))
    .expect("a valid EnvVar")
}

/// The environment every container gets.
pub fn env(settings: &Settings, config: &Config) -> Vec<EnvVar> {
    let mut env = vec![
        env_value("LD_PRELOAD", SHIM_PATH),
        env_value("STACKROUTE_SOCKET_DIR", &config.socket_dir),
        env_field("STACKROUTE_NAMESPACE", "metadata.namespace"),
        match &settings.workload {
            Some(name) => env_value("STACKROUTE_WORKLOAD", name),
            None => env_field("STACKROUTE_WORKLOAD", "metadata.name"),
        },
    ];
    if let Some(log) = &settings.log {
        env.push(env_value("STACKROUTE_LOG", log));
    }
    env
}

/// The mounts every container gets (both read-only).
pub fn mounts(config: &Config) -> Vec<VolumeMount> {
    vec![
        VolumeMount {
            name: SHIM_NAME.into(),
            mount_path: SHIM_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        },
        VolumeMount {
            name: SOCKETS_NAME.into(),
            mount_path: config.socket_dir.clone(),
            read_only: Some(true),
            ..Default::default()
        },
    ]
}

/// The pod volumes: the shim emptyDir and the socket directory (hostPath of type `Directory`:
/// the pod does not start on a node whose agent has not created it).
pub fn volumes(config: &Config) -> Vec<Volume> {
    serde_json::from_value(json!([
        {"name": SHIM_NAME, "emptyDir": {}},
        {"name": SOCKETS_NAME, "hostPath": {"path": config.socket_dir, "type": "Directory"}},
    ]))
    .expect("valid Volumes")
}

/// The init container that copies the chosen build into the emptyDir and records what it
/// copied (stdout, `/stackroute/installed`, and its termination message).
pub fn init_container(settings: &Settings, config: &Config) -> Container {
    let source = settings.libc.source();
    let libc = settings.libc.as_str();
    let script = format!(
        "set -eu\n\
         cp {source} {INSTALL_MOUNT}/libnsocket.so\n\
         msg=\"stackroute: copied {source} ({libc} build) from {image} to {SHIM_PATH}\"\n\
         echo \"$msg\" > {INSTALL_MOUNT}/installed\n\
         echo \"$msg\" > /dev/termination-log || true\n\
         echo \"$msg\"\n",
        image = config.shim_image,
    );
    serde_json::from_value(json!({
        "name": SHIM_NAME,
        "image": config.shim_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["/bin/sh", "-c", script],
        "volumeMounts": [{"name": SHIM_NAME, "mountPath": INSTALL_MOUNT}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}
        }
    }))
    .expect("a valid Container")
}

/// True when `LD_PRELOAD` (colon- or space-separated) already lists the shim.
fn preloads_shim(value: &str) -> bool {
    value.split([':', ' ']).any(|item| item.trim() == SHIM_PATH)
}

fn container_ops(
    base: &str,
    container: &Container,
    wanted_env: &[EnvVar],
    wanted_mounts: &[VolumeMount],
    injection: &mut Injection,
) {
    // Environment.
    match &container.env {
        None => injection.ops.push(add(
            format!("{base}/env"),
            serde_json::to_value(wanted_env).expect("EnvVars serialize"),
        )),
        Some(env) => {
            for var in wanted_env {
                // The last entry of a name is the one in force.
                match env.iter().rposition(|e| e.name == var.name) {
                    None => injection.ops.push(add(
                        format!("{base}/env/-"),
                        serde_json::to_value(var).expect("an EnvVar serializes"),
                    )),
                    Some(i) if var.name == "LD_PRELOAD" => {
                        let existing = &env[i];
                        if existing.value_from.is_some() {
                            injection.warnings.push(format!(
                                "container {}: LD_PRELOAD comes from valueFrom; the shim is not preloaded",
                                container.name
                            ));
                            continue;
                        }
                        let value = existing.value.as_deref().unwrap_or("").trim();
                        if preloads_shim(value) {
                            continue;
                        }
                        let combined = if value.is_empty() {
                            SHIM_PATH.to_string()
                        } else {
                            format!("{SHIM_PATH}:{value}")
                        };
                        injection.ops.push(json!({
                            "op": "replace",
                            "path": format!("{base}/env/{i}/value"),
                            "value": combined,
                        }));
                    }
                    // The container sets this variable itself: its value stays.
                    Some(_) => {}
                }
            }
        }
    }

    // Mounts.
    let existing = container.volume_mounts.as_deref().unwrap_or_default();
    let mut missing = Vec::new();
    for mount in wanted_mounts {
        if existing.iter().any(|m| m.name == mount.name) {
            continue;
        }
        if let Some(other) = existing.iter().find(|m| m.mount_path == mount.mount_path) {
            injection.warnings.push(format!(
                "container {}: {} is already mounted from volume {}; {} not mounted",
                container.name, mount.mount_path, other.name, mount.name
            ));
            continue;
        }
        missing.push(mount);
    }
    if container.volume_mounts.is_none() {
        if !missing.is_empty() {
            injection.ops.push(add(
                format!("{base}/volumeMounts"),
                serde_json::to_value(&missing).expect("VolumeMounts serialize"),
            ));
        }
    } else {
        for mount in missing {
            injection.ops.push(add(
                format!("{base}/volumeMounts/-"),
                serde_json::to_value(mount).expect("a VolumeMount serializes"),
            ));
        }
    }
}

/// The patch for an opted-in pod (see the module docs). Nothing in it touches resources.
pub fn build(pod: &Pod, settings: &Settings, config: &Config) -> Injection {
    let mut injection = Injection {
        ops: Vec::new(),
        warnings: settings.warnings.clone(),
    };
    let Some(spec) = &pod.spec else {
        injection
            .warnings
            .push("the pod has no spec; nothing injected".into());
        return injection;
    };

    // Status annotation (kept as first written: a reinvocation does not rewrite it).
    match &pod.metadata.annotations {
        None => injection.ops.push(add(
            "/metadata/annotations".into(),
            json!({INJECTED: status(settings, config)}),
        )),
        Some(annotations) if !annotations.contains_key(INJECTED) => injection.ops.push(add(
            format!("/metadata/annotations/{}", token(INJECTED)),
            Value::String(status(settings, config)),
        )),
        Some(_) => {}
    }

    // Volumes.
    let existing = spec.volumes.as_deref().unwrap_or_default();
    let missing: Vec<Volume> = volumes(config)
        .into_iter()
        .filter(|v| !existing.iter().any(|e| e.name == v.name))
        .collect();
    if spec.volumes.is_none() {
        if !missing.is_empty() {
            injection.ops.push(add(
                "/spec/volumes".into(),
                serde_json::to_value(&missing).expect("Volumes serialize"),
            ));
        }
    } else {
        for volume in &missing {
            injection.ops.push(add(
                "/spec/volumes/-".into(),
                serde_json::to_value(volume).expect("a Volume serializes"),
            ));
        }
    }

    // Every container, init containers included (by their current indices: ours is inserted
    // at index 0 last).
    let wanted_env = env(settings, config);
    let wanted_mounts = mounts(config);
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    for (i, container) in inits.iter().enumerate() {
        if container.name != SHIM_NAME {
            container_ops(
                &format!("/spec/initContainers/{i}"),
                container,
                &wanted_env,
                &wanted_mounts,
                &mut injection,
            );
        }
    }
    for (i, container) in spec.containers.iter().enumerate() {
        container_ops(
            &format!("/spec/containers/{i}"),
            container,
            &wanted_env,
            &wanted_mounts,
            &mut injection,
        );
    }

    // The copying init container runs first, so later init containers find the shim.
    if !inits.iter().any(|c| c.name == SHIM_NAME) {
        let ours =
            serde_json::to_value(init_container(settings, config)).expect("a Container serializes");
        if spec.init_containers.is_none() {
            injection
                .ops
                .push(add("/spec/initContainers".into(), json!([ours])));
        } else {
            injection
                .ops
                .push(add("/spec/initContainers/0".into(), ours));
        }
    }
    injection
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Libc;

    fn mk_config() -> Config {
        Config {
            shim_image: "registry.example/stackroute-shim:0.1.0".into(),
            socket_dir: "/run/stackroute".into(),
            own_namespace: "stackroute-system".into(),
        }
    }

    fn apply(pod: &Pod, ops: &[Value]) -> Pod {
        let mut doc = serde_json::to_value(pod).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.to_vec())).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        serde_json::from_value(doc).unwrap()
    }

    fn mk_pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn token_escapes() {
        assert_eq!(token("stackroute.dev/injected"), "stackroute.dev~1injected");
        assert_eq!(token("a~b/c"), "a~0b~1c");
    }

    #[test]
    fn minimal_pod_gets_everything_once() {
        let config = mk_config();
        let settings = Settings::default();
        let pod = mk_pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        );
        let first = build(&pod, &settings, &config);
        let patched = apply(&pod, &first.ops);
        let spec = patched.spec.as_ref().unwrap();
        assert_eq!(spec.init_containers.as_ref().unwrap()[0].name, SHIM_NAME);
        assert_eq!(spec.volumes.as_ref().unwrap().len(), 2);
        let c = &spec.containers[0];
        assert_eq!(c.env.as_ref().unwrap().len(), 4);
        assert_eq!(c.volume_mounts.as_ref().unwrap().len(), 2);
        assert!(
            patched
                .metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(INJECTED)
        );
        // Idempotent.
        let again = build(&patched, &settings, &config);
        assert!(again.ops.is_empty(), "{:?}", again.ops);
    }

    #[test]
    fn existing_ld_preload_is_prepended_once() {
        let config = mk_config();
        let pod = mk_pod(
            json!({"metadata": {"name": "p", "annotations": {"x": "y"}}, "spec": {"containers": [
                {"name": "c", "image": "i", "env": [{"name": "LD_PRELOAD", "value": "/usr/lib/libjemalloc.so"}]}
            ]}}),
        );
        let patched = apply(&pod, &build(&pod, &Settings::default(), &config).ops);
        let env = patched.spec.as_ref().unwrap().containers[0]
            .env
            .clone()
            .unwrap();
        let preload: Vec<_> = env.iter().filter(|e| e.name == "LD_PRELOAD").collect();
        assert_eq!(preload.len(), 1);
        assert_eq!(
            preload[0].value.as_deref(),
            Some("/stackroute/libnsocket.so:/usr/lib/libjemalloc.so")
        );
        assert!(
            build(&patched, &Settings::default(), &config)
                .ops
                .is_empty()
        );
    }

    #[test]
    fn musl_and_settings_reach_init_container_and_env() {
        let config = mk_config();
        let settings = Settings {
            libc: Libc::Musl,
            workload: Some("web".into()),
            log: Some("debug".into()),
            warnings: vec![],
        };
        let init = init_container(&settings, &config);
        let script = &init.command.unwrap()[2];
        assert!(
            script.contains("/stackroute/lib/musl/libnsocket.so"),
            "{script}"
        );
        let env = env(&settings, &config);
        assert!(
            env.iter()
                .any(|e| e.name == "STACKROUTE_WORKLOAD" && e.value.as_deref() == Some("web"))
        );
        assert!(
            env.iter()
                .any(|e| e.name == "STACKROUTE_LOG" && e.value.as_deref() == Some("debug"))
        );
        assert!(status(&settings, &config).contains("libc=musl"));
    }

    #[test]
    fn mount_path_collision_is_a_warning() {
        let config = mk_config();
        let pod = mk_pod(json!({"metadata": {"name": "p"}, "spec": {
            "volumes": [{"name": "mine", "emptyDir": {}}],
            "containers": [{"name": "c", "image": "i", "volumeMounts": [{"name": "mine", "mountPath": "/run/stackroute"}]}]}}));
        let injection = build(&pod, &Settings::default(), &config);
        assert_eq!(injection.warnings.len(), 1, "{:?}", injection.warnings);
        let patched = apply(&pod, &injection.ops);
        let mounts = patched.spec.unwrap().containers[0]
            .volume_mounts
            .clone()
            .unwrap();
        assert_eq!(mounts.len(), 2);
    }

    /// Runs the init container's script under `sh` with its absolute paths moved into a
    /// temporary directory: it copies the chosen build, records what it did, and fails when the
    /// build is missing.
    #[test]
    fn init_script_copies_and_records() {
        let config = mk_config();
        for libc in [Libc::Glibc, Libc::Musl] {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().display().to_string();
            let settings = Settings {
                libc,
                ..Settings::default()
            };
            let script = init_container(&settings, &config).command.unwrap()[2]
                .replace("/stackroute/lib/", &format!("{root}/lib/"))
                .replace(INSTALL_MOUNT, &format!("{root}/out"))
                .replace("/dev/termination-log", &format!("{root}/termination-log"));
            std::fs::create_dir_all(dir.path().join("out")).unwrap();
            let run = || {
                std::process::Command::new("/bin/sh")
                    .args(["-c", &script])
                    .output()
                    .unwrap()
            };
            // The build is missing: the container fails.
            assert!(!run().status.success());

            let build = dir
                .path()
                .join(libc.source().trim_start_matches("/stackroute/"));
            std::fs::create_dir_all(build.parent().unwrap()).unwrap();
            std::fs::write(&build, libc.as_str()).unwrap();
            let output = run();
            assert!(output.status.success(), "{output:?}");
            let copied = std::fs::read_to_string(dir.path().join("out/libnsocket.so")).unwrap();
            assert_eq!(copied, libc.as_str());
            let record = std::fs::read_to_string(dir.path().join("out/installed")).unwrap();
            assert!(record.contains(&build.display().to_string()), "{record}");
            assert!(
                record.contains(&format!("({} build)", libc.as_str())),
                "{record}"
            );
            assert!(record.contains(&config.shim_image), "{record}");
            let message = std::fs::read_to_string(dir.path().join("termination-log")).unwrap();
            assert_eq!(message, record);
            assert_eq!(String::from_utf8_lossy(&output.stdout), record);
        }
    }
}
