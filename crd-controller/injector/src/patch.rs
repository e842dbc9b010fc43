//! The JSONPatch (RFC 6902) that injects the shim.
//!
//! Every part is added only when missing, so the patch is idempotent: a second review of an
//! injected pod yields no operation, and a reinvocation after a later webhook added a
//! container yields only that container's environment and mounts.
//!
//! With [`Rdma`] (the chart enables it and a policy that can pick RDMA selects the pod), every
//! application container also gets the RDMA resource, `IPC_LOCK` and
//! `STACKROUTE_RDMA_PROVIDER`, never replacing what the pod's author set, and the init
//! container also copies the verbs provider when the shim image has it.

use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, Volume, VolumeMount};
use serde_json::{Map, Value, json};

use crate::decide::{Libc, Settings};
use crate::{
    Config, INJECTED, INSTALL_MOUNT, RDMA_PROVIDER_ENV, RDMA_PROVIDER_PATH, RDMA_STATUS, Rdma,
    SHIM_MOUNT, SHIM_NAME, SHIM_PATH, SOCKETS_NAME,
};

/// The capability RDMA memory registration needs to pin pages beyond `RLIMIT_MEMLOCK`.
pub const IPC_LOCK: &str = "IPC_LOCK";

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

/// The value of `stackroute.dev/rdma`: what the webhook asked for in each container.
pub fn rdma_status(rdma: &Rdma) -> String {
    format!(
        "requested resource={} count={} ipcLock={} provider={RDMA_PROVIDER_PATH}",
        rdma.resource_name, rdma.resource_count, rdma.ipc_lock
    )
}

/// The verbs provider's path inside the shim image, next to the shim build of that libc.
/// Only a glibc provider is built: a musl pod's init container finds none and copies nothing,
/// rather than a library its processes cannot load.
pub fn rdma_provider_source(libc: Libc) -> &'static str {
    match libc {
        Libc::Glibc => "/stackroute/lib/libstackroute_rdma.so",
        Libc::Musl => "/stackroute/lib/musl/libstackroute_rdma.so",
    }
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

/// What an application container of an RDMA pod gets besides [`env()`]: the verbs provider the
/// shim loads (a value the container sets itself is kept, like every variable here).
pub fn rdma_env() -> Vec<EnvVar> {
    vec![env_value(RDMA_PROVIDER_ENV, RDMA_PROVIDER_PATH)]
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
    init_container_with_rdma(settings, config, false)
}

/// [`init_container`]; with `rdma` it also copies the verbs provider when the shim image has
/// one (an image without it is not an error: the shim then reports `no-device`).
pub fn init_container_with_rdma(settings: &Settings, config: &Config, rdma: bool) -> Container {
    let source = settings.libc.source();
    let libc = settings.libc.as_str();
    let provider = if rdma {
        let from = rdma_provider_source(settings.libc);
        format!(
            "if [ -f {from} ]; then\n\
             cp {from} {INSTALL_MOUNT}/libstackroute_rdma.so\n\
             msg=\"$msg; copied {from} to {RDMA_PROVIDER_PATH}\"\n\
             else\n\
             msg=\"$msg; no {from} in the image: RDMA upgrades off\"\n\
             fi\n"
        )
    } else {
        String::new()
    };
    let script = format!(
        "set -eu\n\
         cp {source} {INSTALL_MOUNT}/libnsocket.so\n\
         msg=\"stackroute: copied {source} ({libc} build) from {image} to {SHIM_PATH}\"\n\
         {provider}\
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

/// The RDMA resource and `IPC_LOCK` for one application container. A resource the author set
/// (limit or request) keeps its value; the missing half gets the same value, since the API
/// server requires an extended resource's request to equal its limit.
fn rdma_container_ops(base: &str, container: &Container, rdma: &Rdma, injection: &mut Injection) {
    let name = &rdma.resource_name;
    let resources = container.resources.as_ref();
    let limits = resources.and_then(|r| r.limits.as_ref());
    let requests = resources.and_then(|r| r.requests.as_ref());
    let set_by_author = limits
        .and_then(|l| l.get(name))
        .or_else(|| requests.and_then(|r| r.get(name)));
    let value = match set_by_author {
        Some(quantity) => Value::String(quantity.0.clone()),
        None => Value::String(rdma.resource_count.to_string()),
    };
    if resources.is_none() {
        injection.ops.push(add(
            format!("{base}/resources"),
            json!({"limits": {name: value}, "requests": {name: value}}),
        ));
    } else {
        for (field, map) in [("limits", limits), ("requests", requests)] {
            match map {
                None => injection.ops.push(add(
                    format!("{base}/resources/{field}"),
                    json!({name: value}),
                )),
                Some(map) if !map.contains_key(name) => injection.ops.push(add(
                    format!("{base}/resources/{field}/{}", token(name)),
                    value.clone(),
                )),
                Some(_) => {}
            }
        }
    }

    if !rdma.ipc_lock {
        return;
    }
    let context = container.security_context.as_ref();
    let capabilities = context.and_then(|c| c.capabilities.as_ref());
    let is_ipc_lock = |cap: &String| {
        let cap = cap.trim();
        cap == IPC_LOCK || cap.strip_prefix("CAP_") == Some(IPC_LOCK)
    };
    if capabilities
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|drop| drop.iter().any(is_ipc_lock))
    {
        // An explicit drop of IPC_LOCK is the author's decision; adding it back would contradict it.
        injection.warnings.push(format!(
            "container {}: drops {IPC_LOCK}; RDMA memory registration may fail (reported by the shim)",
            container.name
        ));
        return;
    }
    match (
        context,
        capabilities,
        capabilities.and_then(|c| c.add.as_ref()),
    ) {
        (None, _, _) => injection.ops.push(add(
            format!("{base}/securityContext"),
            json!({"capabilities": {"add": [IPC_LOCK]}}),
        )),
        (Some(_), None, _) => injection.ops.push(add(
            format!("{base}/securityContext/capabilities"),
            json!({"add": [IPC_LOCK]}),
        )),
        (Some(_), Some(_), None) => injection.ops.push(add(
            format!("{base}/securityContext/capabilities/add"),
            json!([IPC_LOCK]),
        )),
        (Some(_), Some(_), Some(list)) if !list.iter().any(is_ipc_lock) => injection.ops.push(add(
            format!("{base}/securityContext/capabilities/add/-"),
            json!(IPC_LOCK),
        )),
        (Some(_), Some(_), Some(_)) => {}
    }
}

/// The patch for an opted-in pod (see the module docs). Nothing in it touches resources.
pub fn build(pod: &Pod, settings: &Settings, config: &Config) -> Injection {
    build_with_rdma(pod, settings, config, None)
}

/// [`build`], plus the RDMA resource, `IPC_LOCK` and [`rdma_env`] in every application
/// container, the provider's copy in the init container and the `stackroute.dev/rdma`
/// annotation when `rdma` is given.
pub fn build_with_rdma(
    pod: &Pod,
    settings: &Settings,
    config: &Config,
    rdma: Option<&Rdma>,
) -> Injection {
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

    // Status annotations (kept as first written: a reinvocation does not rewrite them).
    let mut wanted = vec![(INJECTED, status(settings, config))];
    if let Some(rdma) = rdma {
        wanted.push((RDMA_STATUS, rdma_status(rdma)));
    }
    match &pod.metadata.annotations {
        None => {
            let map: Map<String, Value> = wanted
                .into_iter()
                .map(|(key, value)| (key.to_string(), Value::String(value)))
                .collect();
            injection
                .ops
                .push(add("/metadata/annotations".into(), Value::Object(map)));
        }
        Some(annotations) => {
            for (key, value) in wanted {
                if !annotations.contains_key(key) {
                    injection.ops.push(add(
                        format!("/metadata/annotations/{}", token(key)),
                        Value::String(value),
                    ));
                }
            }
        }
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
    // Init containers run before the application: they open no RDMA connections.
    let mut app_env = wanted_env.clone();
    if rdma.is_some() {
        app_env.extend(rdma_env());
    }
    for (i, container) in spec.containers.iter().enumerate() {
        let base = format!("/spec/containers/{i}");
        container_ops(&base, container, &app_env, &wanted_mounts, &mut injection);
        if let Some(rdma) = rdma {
            rdma_container_ops(&base, container, rdma, &mut injection);
        }
    }

    // The copying init container runs first, so later init containers find the shim.
    if !inits.iter().any(|c| c.name == SHIM_NAME) {
        let ours = serde_json::to_value(init_container_with_rdma(settings, config, rdma.is_some()))
            .expect("a Container serializes");
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

    fn mk_rdma() -> Rdma {
        Rdma {
            resource_name: "rdma/hca_shared_devices_a".into(),
            resource_count: 1,
            ipc_lock: true,
        }
    }

    fn quantity(c: &Container, field: &str) -> Option<String> {
        let resources = c.resources.as_ref()?;
        let map = match field {
            "limits" => resources.limits.as_ref(),
            _ => resources.requests.as_ref(),
        }?;
        Some(map.get("rdma/hca_shared_devices_a")?.0.clone())
    }

    fn added_caps(c: &Container) -> Vec<String> {
        c.security_context
            .as_ref()
            .and_then(|s| s.capabilities.as_ref())
            .and_then(|c| c.add.clone())
            .unwrap_or_default()
    }

    /// Every value of `STACKROUTE_RDMA_PROVIDER` in the container (the last one is in force).
    fn provider_env(c: &Container) -> Vec<String> {
        c.env
            .iter()
            .flatten()
            .filter(|e| e.name == RDMA_PROVIDER_ENV)
            .map(|e| e.value.clone().unwrap_or_default())
            .collect()
    }

    fn init_script(pod: &Pod) -> String {
        let inits = pod.spec.as_ref().unwrap().init_containers.as_ref().unwrap();
        let ours = inits.iter().find(|c| c.name == SHIM_NAME).unwrap();
        ours.command.as_ref().unwrap()[2].clone()
    }

    #[test]
    fn rdma_adds_resource_and_ipc_lock_to_app_containers_once() {
        let config = mk_config();
        let rdma = mk_rdma();
        let pod = mk_pod(json!({"metadata": {"name": "p"}, "spec": {
        "initContainers": [{"name": "setup", "image": "i"}],
        "containers": [
            {"name": "a", "image": "i"},
            {"name": "b", "image": "i", "resources": {"limits": {"cpu": "1"}},
             "securityContext": {"runAsUser": 0}},
        ]}}));
        let injection = build_with_rdma(&pod, &Settings::default(), &config, Some(&rdma));
        assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);
        let patched = apply(&pod, &injection.ops);
        let spec = patched.spec.as_ref().unwrap();
        for c in &spec.containers {
            assert_eq!(quantity(c, "limits").as_deref(), Some("1"), "{}", c.name);
            assert_eq!(quantity(c, "requests").as_deref(), Some("1"), "{}", c.name);
            assert_eq!(added_caps(c), [IPC_LOCK], "{}", c.name);
            assert_eq!(provider_env(c), [RDMA_PROVIDER_PATH], "{}", c.name);
        }
        // The author's CPU limit and runAsUser stay.
        let b = &spec.containers[1];
        assert_eq!(
            b.resources.as_ref().unwrap().limits.as_ref().unwrap()["cpu"].0,
            "1"
        );
        assert_eq!(b.security_context.as_ref().unwrap().run_as_user, Some(0));
        // Init containers (ours and the author's) get none of it.
        for c in spec.init_containers.as_ref().unwrap() {
            assert_eq!(quantity(c, "limits"), None, "{}", c.name);
            assert!(added_caps(c).is_empty(), "{}", c.name);
            assert!(provider_env(c).is_empty(), "{}", c.name);
        }
        // Ours copies the provider, without failing when the image has none.
        let script = init_script(&patched);
        assert!(
            script.contains(&format!(
                "if [ -f /stackroute/lib/libstackroute_rdma.so ]; then\n\
                 cp /stackroute/lib/libstackroute_rdma.so {INSTALL_MOUNT}/libstackroute_rdma.so\n"
            )),
            "{script}"
        );
        let annotations = patched.metadata.annotations.as_ref().unwrap();
        assert!(annotations.contains_key(INJECTED));
        assert_eq!(
            annotations[RDMA_STATUS],
            "requested resource=rdma/hca_shared_devices_a count=1 ipcLock=true \
             provider=/stackroute/libstackroute_rdma.so"
        );
        // Idempotent.
        let again = build_with_rdma(&patched, &Settings::default(), &config, Some(&rdma));
        assert!(again.ops.is_empty(), "{:?}", again.ops);
    }

    #[test]
    fn rdma_keeps_the_authors_values_and_merges_capabilities() {
        let config = mk_config();
        let rdma = Rdma {
            resource_count: 3,
            ..mk_rdma()
        };
        let pod = mk_pod(
            json!({"metadata": {"name": "p", "annotations": {"x": "y"}}, "spec": {
            "containers": [
                // Limit only: the request gets the same value, not the chart's count.
                {"name": "limit", "image": "i",
                 "resources": {"limits": {"rdma/hca_shared_devices_a": "2"}},
                 "securityContext": {"capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}},
                // Request only: likewise for the limit.
                {"name": "request", "image": "i",
                 "resources": {"requests": {"rdma/hca_shared_devices_a": "5"}},
                 "securityContext": {"capabilities": {"add": ["CAP_IPC_LOCK"]}}},
                // Both set, IPC_LOCK already there, its own provider: nothing.
                {"name": "both", "image": "i",
                 "resources": {"limits": {"rdma/hca_shared_devices_a": "4"},
                               "requests": {"rdma/hca_shared_devices_a": "4"}},
                 "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
                 "env": [{"name": "STACKROUTE_RDMA_PROVIDER", "value": "/opt/verbs.so"}]},
                // Empty securityContext and capabilities; an environment of its own.
                {"name": "empty", "image": "i", "resources": {},
                 "securityContext": {"capabilities": {}},
                 "env": [{"name": "A", "value": "1"}]},
            ]}}),
        );
        let injection = build_with_rdma(&pod, &Settings::default(), &config, Some(&rdma));
        let patched = apply(&pod, &injection.ops);
        let containers = &patched.spec.as_ref().unwrap().containers;
        let got: Vec<(Option<String>, Option<String>, Vec<String>)> = containers
            .iter()
            .map(|c| {
                (
                    quantity(c, "limits"),
                    quantity(c, "requests"),
                    added_caps(c),
                )
            })
            .collect();
        let some = |v: &str| Some(v.to_string());
        let caps = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            [
                (some("2"), some("2"), caps(&["NET_ADMIN", IPC_LOCK])),
                (some("5"), some("5"), caps(&["CAP_IPC_LOCK"])),
                (some("4"), some("4"), caps(&[IPC_LOCK])),
                (some("3"), some("3"), caps(&[IPC_LOCK])),
            ]
        );
        // `drop: [ALL]` stays; the runtime applies adds after drops.
        let limit_caps = containers[0]
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        assert_eq!(limit_caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
        // The author's provider stays; the others get ours.
        let providers: Vec<Vec<String>> = containers.iter().map(provider_env).collect();
        let ours = || vec![RDMA_PROVIDER_PATH.to_string()];
        assert_eq!(
            providers,
            [ours(), ours(), vec!["/opt/verbs.so".to_string()], ours()]
        );
        let empty_env = containers[3].env.as_ref().unwrap();
        assert_eq!(empty_env[0].name, "A");
        let annotations = patched.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations["x"], "y");
        assert!(annotations[RDMA_STATUS].contains("count=3"));
        assert!(
            build_with_rdma(&patched, &Settings::default(), &config, Some(&rdma))
                .ops
                .is_empty()
        );
    }

    #[test]
    fn rdma_without_ipc_lock_or_when_it_is_dropped() {
        let config = mk_config();
        let pod = mk_pod(json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "i"},
            {"name": "b", "image": "i", "securityContext": {"capabilities": {"drop": ["IPC_LOCK"]}}},
        ]}}));
        let no_lock = Rdma {
            ipc_lock: false,
            ..mk_rdma()
        };
        let patched = apply(
            &pod,
            &build_with_rdma(&pod, &Settings::default(), &config, Some(&no_lock)).ops,
        );
        for c in &patched.spec.as_ref().unwrap().containers {
            assert_eq!(quantity(c, "limits").as_deref(), Some("1"));
            assert!(added_caps(c).is_empty());
        }
        // An explicit drop of IPC_LOCK is not overridden; the author is warned.
        let injection = build_with_rdma(&pod, &Settings::default(), &config, Some(&mk_rdma()));
        assert_eq!(injection.warnings.len(), 1, "{:?}", injection.warnings);
        let patched = apply(&pod, &injection.ops);
        let containers = &patched.spec.as_ref().unwrap().containers;
        assert_eq!(added_caps(&containers[0]), [IPC_LOCK]);
        assert!(added_caps(&containers[1]).is_empty());
        assert_eq!(quantity(&containers[1], "limits").as_deref(), Some("1"));
    }

    #[test]
    fn without_rdma_nothing_rdma_is_added() {
        let config = mk_config();
        let pod = mk_pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "i"}]}}),
        );
        let injection = build_with_rdma(&pod, &Settings::default(), &config, None);
        assert_eq!(injection, build(&pod, &Settings::default(), &config));
        let patched = apply(&pod, &injection.ops);
        let c = &patched.spec.as_ref().unwrap().containers[0];
        assert!(c.resources.is_none());
        assert!(c.security_context.is_none());
        assert!(provider_env(c).is_empty());
        assert!(
            !init_script(&patched).contains("libstackroute_rdma"),
            "{}",
            init_script(&patched)
        );
        assert!(
            !patched
                .metadata
                .annotations
                .unwrap()
                .contains_key(RDMA_STATUS)
        );
    }

    /// The init container's script with its absolute paths moved under `root`: the image's
    /// `/stackroute/lib/` to `root/lib/`, the emptyDir to `root/out`.
    fn sandboxed(init: &Container, root: &str) -> String {
        init.command.as_ref().unwrap()[2]
            .replace("/stackroute/lib/", &format!("{root}/lib/"))
            .replace(INSTALL_MOUNT, &format!("{root}/out"))
            .replace("/dev/termination-log", &format!("{root}/termination-log"))
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
            let script = sandboxed(&init_container(&settings, &config), &root);
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

    /// The RDMA init script under `sh`, as above: it copies the provider of the pod's libc when
    /// the image has one, goes on without it when it has none, and still fails without the
    /// shim; without RDMA it never copies the provider.
    #[test]
    fn init_script_copies_the_provider_only_with_rdma() {
        let config = mk_config();
        for (libc, rdma) in [
            (Libc::Glibc, true),
            (Libc::Glibc, false),
            (Libc::Musl, true),
        ] {
            let case = format!("{} rdma={rdma}", libc.as_str());
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().display().to_string();
            let settings = Settings {
                libc,
                ..Settings::default()
            };
            let script = sandboxed(&init_container_with_rdma(&settings, &config, rdma), &root);
            let out = dir.path().join("out");
            std::fs::create_dir_all(&out).unwrap();
            let run = || {
                std::process::Command::new("/bin/sh")
                    .args(["-c", &script])
                    .output()
                    .unwrap()
            };
            let in_image = |path: &str| dir.path().join(path.trim_start_matches("/stackroute/"));
            let write = |path: &std::path::Path, text: &str| {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(path, text).unwrap();
            };
            let provider = in_image(rdma_provider_source(libc));
            let copied_provider = out.join("libstackroute_rdma.so");

            // The provider alone: the missing shim still fails the container.
            write(&provider, "verbs");
            assert!(!run().status.success(), "{case}");
            std::fs::remove_file(&provider).unwrap();

            // The shim without the provider (an older image): not an error.
            write(&in_image(libc.source()), libc.as_str());
            let output = run();
            assert!(output.status.success(), "{case}: {output:?}");
            assert_eq!(
                std::fs::read_to_string(out.join("libnsocket.so")).unwrap(),
                libc.as_str(),
                "{case}"
            );
            assert!(!copied_provider.exists(), "{case}");
            let record = std::fs::read_to_string(out.join("installed")).unwrap();
            assert_eq!(
                record.contains("in the image: RDMA upgrades off"),
                rdma,
                "{case}: {record}"
            );

            // Both: the provider is copied with RDMA only.
            write(&provider, "verbs");
            let output = run();
            assert!(output.status.success(), "{case}: {output:?}");
            let record = std::fs::read_to_string(out.join("installed")).unwrap();
            if rdma {
                assert_eq!(
                    std::fs::read_to_string(&copied_provider).unwrap(),
                    "verbs",
                    "{case}"
                );
                assert!(
                    record.contains(&format!(
                        "copied {} to {RDMA_PROVIDER_PATH}",
                        provider.display()
                    )),
                    "{case}: {record}"
                );
            } else {
                assert!(!copied_provider.exists(), "{case}");
                assert!(!record.contains("libstackroute_rdma"), "{case}: {record}");
            }
            assert_eq!(String::from_utf8_lossy(&output.stdout), record, "{case}");
        }
        // A musl pod never gets the glibc provider.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        let musl = Settings {
            libc: Libc::Musl,
            ..Settings::default()
        };
        let script = sandboxed(&init_container_with_rdma(&musl, &config, true), &root);
        for (path, text) in [
            (Libc::Musl.source(), "musl"),
            (rdma_provider_source(Libc::Glibc), "glibc verbs"),
        ] {
            let path = dir.path().join(path.trim_start_matches("/stackroute/"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        let output = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        assert!(!dir.path().join("out/libstackroute_rdma.so").exists());
    }
}
