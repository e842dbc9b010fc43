//! The `stackroute` binary against the committed examples: every valid example validates, every
//! invalid example is rejected with its own message, unreadable input exits 2, `explain` gives
//! the documented decisions for the example cluster, and the committed CRD manifest is fresh.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

/// Every file of `examples/invalid/` and the message `stackroute validate` must print for it.
/// A new invalid example without an entry here fails `every_invalid_example_is_rejected`.
const INVALID: &[(&str, &str)] = &[
    (
        "bad-rule-name.yaml",
        r#"StackRoute/ml/trainer-wan: spec.rules[0].name: Invalid value "Cross_Zone": must match"#,
    ),
    (
        "bad-selector-operator.yaml",
        r#"StackRoute/shop/canary-userspace: spec.podSelector: matchExpressions[0]: unknown operator "Equals""#,
    ),
    (
        "dedicated-kernel-transport.yaml",
        "StackRoute/ml/tenant-isolated: spec.rules[0]: isolation Dedicated forbids the Kernel stack in transport and fallback",
    ),
    (
        "duplicate-rule-names.yaml",
        "StackRoute/ml/trainer-fabric: spec: rule names must be unique within the object",
    ),
    (
        "endport-below-port.yaml",
        "StackRoute/ml/nccl-ports: spec.rules[0].ports[0]: endPort requires port and must be greater than or equal to it",
    ),
    (
        "kernel-enforced-userspace-fallback.yaml",
        "ClusterStackRoute/pci-egress: spec.rules[0]: isolation KernelEnforced allows only the Kernel stack in transport and fallback",
    ),
    (
        "malformed-cidr.yaml",
        "StackRoute/shop/analytics-egress: spec.rules[0].to[0].networks: networks must be CIDRs",
    ),
    (
        "pass-in-stack-route.yaml",
        "StackRoute/shop/skip-dns: spec: action: Pass is only allowed in a ClusterStackRoute",
    ),
    (
        "pass-with-transport.yaml",
        "ClusterStackRoute/admin-delegate: spec.rules[0]: transport is required on a Route rule and not allowed on a Pass rule",
    ),
    (
        "peer-empty.yaml",
        "StackRoute/shop/cache-fast: spec.rules[0].to[1]: a peer must set exactly one of pods, networks or entity",
    ),
    (
        "peer-two-kinds.yaml",
        "StackRoute/shop/backup-egress: spec.rules[0].to[0]: a peer must set exactly one of pods, networks or entity",
    ),
    (
        "priority-out-of-range.yaml",
        "StackRoute/shop/late-default: spec.priority: Invalid value 2000: must be at most 1000",
    ),
    (
        "rdma-congestion-control.yaml",
        "StackRoute/ml/allreduce: spec.rules[0].transport: RDMA takes no congestionControl",
    ),
    (
        "rdma-external.yaml",
        "StackRoute/ml/dataset-download: spec.rules[0]: RDMA cannot reach External destinations",
    ),
    (
        "route-without-transport.yaml",
        "ClusterStackRoute/baseline-cluster: spec.rules[0]: transport is required on a Route rule and not allowed on a Pass rule",
    ),
    (
        "same-zone-networks-peer.yaml",
        "StackRoute/ml/storage-local: spec.rules[0]: location SameNode or SameZone requires every peer in 'to' to be a pods peer",
    ),
    (
        "subject-both.yaml",
        "ClusterStackRoute/research-bbr: spec.subject: subject must set exactly one of namespaces or pods",
    ),
    (
        "too-many-rules.yaml",
        "StackRoute/shop/per-service-ports: spec.rules: must have at most 25 items (has 26)",
    ),
    (
        "unknown-field.yaml",
        "StackRoute/shop/audited-egress: spec.rules[0].isolaton: unknown field",
    ),
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the CLI crate lives in the workspace")
        .to_path_buf()
}

fn stackroute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stackroute"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run stackroute")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// Policy files (`*.yaml`, `*.yml`, `*.json`) directly in `dir`, sorted, as repo-relative paths.
fn policy_files(dir: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("list {dir}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| {
            path.is_file()
                && matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .map(|path| {
            format!(
                "{dir}/{}",
                path.file_name().and_then(|n| n.to_str()).expect("UTF-8")
            )
        })
        .collect();
    files.sort();
    files
}

/// The valid example sets: every folder of `examples/` except `invalid/`.
fn valid_sets() -> Vec<String> {
    let mut sets: Vec<String> = std::fs::read_dir(repo().join("examples"))
        .expect("list examples/")
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_dir())
        .filter_map(|path| path.file_name()?.to_str().map(str::to_string))
        .filter(|name| name != "invalid")
        .map(|name| format!("examples/{name}"))
        .collect();
    sets.sort();
    sets
}

/// A scratch directory of this test process, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "stackroute-cli-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    fn path(&self, name: &str) -> String {
        self.0.join(name).display().to_string()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_valid_example_validates() {
    let sets = valid_sets();
    assert!(
        sets.contains(&"examples/cluster".to_string())
            && sets.contains(&"examples/policies".to_string()),
        "expected examples/cluster and examples/policies, found {sets:?}"
    );
    let mut checked = 0;
    for set in &sets {
        let files = policy_files(set);
        assert!(!files.is_empty(), "{set} holds no YAML");
        for file in &files {
            let output = stackroute(&["validate", file]);
            assert_eq!(
                output.status.code(),
                Some(0),
                "{file} should be valid\n{}",
                describe(&output)
            );
            assert!(
                output.stdout.is_empty(),
                "{file}: nothing on stdout when valid\n{}",
                describe(&output)
            );
            assert!(
                text(&output.stderr).contains("valid"),
                "{file}\n{}",
                describe(&output)
            );
            checked += 1;
        }
        // The set as a whole too (directory walk).
        let output = stackroute(&["validate", set]);
        assert_eq!(
            output.status.code(),
            Some(0),
            "{set}\n{}",
            describe(&output)
        );
    }
    assert!(checked >= 7, "only {checked} valid example files found");
}

#[test]
fn every_invalid_example_is_rejected_with_its_message() {
    let files = policy_files("examples/invalid");
    let names: Vec<&str> = files
        .iter()
        .map(|f| f.trim_start_matches("examples/invalid/"))
        .collect();
    let unlisted: Vec<&&str> = names
        .iter()
        .filter(|n| !INVALID.iter().any(|(file, _)| file == *n))
        .collect();
    assert!(
        unlisted.is_empty(),
        "examples/invalid files without an expected message in INVALID: {unlisted:?}"
    );
    let missing: Vec<&str> = INVALID
        .iter()
        .map(|(file, _)| *file)
        .filter(|file| !names.contains(file))
        .collect();
    assert!(
        missing.is_empty(),
        "INVALID lists files that do not exist: {missing:?}"
    );

    let mut failures = Vec::new();
    for (name, expected) in INVALID {
        let file = format!("examples/invalid/{name}");
        let output = stackroute(&["validate", &file]);
        let stdout = text(&output.stdout);
        let expected_line = format!("{file}: {expected}");
        if output.status.code() != Some(1) {
            failures.push(format!("{file}: expected exit 1\n{}", describe(&output)));
        } else if !stdout.contains(&expected_line) {
            failures.push(format!(
                "{file}: expected {expected_line:?} on stdout\n{}",
                describe(&output)
            ));
        } else if stdout.lines().count() != 1 {
            // Each example is wrong in exactly one way.
            failures.push(format!(
                "{file}: expected exactly one problem\n{}",
                describe(&output)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // All at once: exit 1, one line per file, nothing accepted.
    let output = stackroute(&["validate", "examples/invalid"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert_eq!(
        text(&output.stdout).lines().count(),
        INVALID.len(),
        "{}",
        describe(&output)
    );
}

#[test]
fn one_invalid_object_among_valid_ones_fails_the_run() {
    let output = stackroute(&[
        "validate",
        "examples/cluster",
        "examples/invalid/rdma-external.yaml",
        "examples/policies",
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert_eq!(
        text(&output.stdout).lines().count(),
        1,
        "{}",
        describe(&output)
    );
}

#[test]
fn unreadable_input_exits_2() {
    let output = stackroute(&["validate", "examples/no-such-file.yaml"]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(
        text(&output.stderr).contains("no-such-file.yaml"),
        "the error names the path\n{}",
        describe(&output)
    );

    let dir = TempDir::new("syntax");
    let broken = dir.path("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: stackroute.dev/v1alpha1\nkind: StackRoute\nmetadata: {name: x, namespace: ml\nspec:\n  podSelector: {}\n",
    )
    .expect("write broken.yaml");
    let output = stackroute(&["validate", &broken]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("broken.yaml:") && stderr.contains("invalid YAML"),
        "the error names the file and says what is wrong\n{}",
        describe(&output)
    );

    // Unreadable wins over invalid: the run cannot vouch for what it could not read.
    let output = stackroute(&["validate", "examples/invalid/rdma-external.yaml", &broken]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
}

fn explain(state: &str, from: &str, to: &str) -> Value {
    let output = stackroute(&[
        "explain", "--state", state, "--from", from, "--to", to, "--output", "json",
    ]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "explain {from} -> {to}\n{}",
        describe(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "explain {from} -> {to}: not JSON ({e})\n{}",
            describe(&output)
        )
    })
}

fn transport(stack: &str, congestion_control: &str) -> Value {
    json!({"stack": stack, "congestionControl": congestion_control})
}

/// The fields of an explanation the tests pin down.
fn decision(explanation: &Value) -> Value {
    json!({
        "location": explanation["location"],
        "transport": explanation["transport"],
        "fallback": explanation["fallback"],
        "matched": explanation["matched"],
    })
}

#[test]
fn explain_json_gives_the_documented_decisions() {
    let cases = [
        (
            "ml/trainer-0",
            "10.244.2.10:29500",
            "same zone, other node: RDMA, then user-space BBR, then the kernel",
            json!({
                "location": "SameZone",
                "transport": transport("RDMA", "Default"),
                "fallback": [transport("Userspace", "BBR"), transport("Kernel", "Default")],
                "matched": {"kind": "StackRoute", "namespace": "ml", "name": "trainer-fabric", "rule": "zone-rdma"},
            }),
        ),
        (
            "ml/trainer-0",
            "10.244.1.11:29550",
            "same node is inside SameZone",
            json!({
                "location": "SameNode",
                "transport": transport("RDMA", "Default"),
                "fallback": [transport("Userspace", "BBR"), transport("Kernel", "Default")],
                "matched": {"kind": "StackRoute", "namespace": "ml", "name": "trainer-fabric", "rule": "zone-rdma"},
            }),
        ),
        (
            "ml/trainer-0",
            "10.244.3.10:29500",
            "other zone: user-space TCP with BBR",
            json!({
                "location": "SameCluster",
                "transport": transport("Userspace", "BBR"),
                "fallback": [transport("Kernel", "Default")],
                "matched": {"kind": "StackRoute", "namespace": "ml", "name": "trainer-fabric", "rule": "cross-zone-bbr"},
            }),
        ),
        (
            "ml/trainer-0",
            "10.244.2.10:8080",
            "same zone but outside the RDMA port range: the next rule",
            json!({
                "location": "SameZone",
                "transport": transport("Userspace", "BBR"),
                "fallback": [transport("Kernel", "Default")],
                "matched": {"kind": "StackRoute", "namespace": "ml", "name": "trainer-fabric", "rule": "cross-zone-bbr"},
            }),
        ),
        (
            "shop/frontend-0",
            "8.8.8.8:443",
            "internet egress: the Baseline ClusterStackRoute, kernel BBR",
            json!({
                "location": "External",
                "transport": transport("Kernel", "BBR"),
                "fallback": [transport("Kernel", "Default")],
                "matched": {"kind": "ClusterStackRoute", "namespace": "", "name": "egress-bbr", "rule": "world"},
            }),
        ),
        (
            "shop/frontend-0",
            "192.168.50.7:443",
            "the Admin tier pins payments to the kernel",
            json!({
                "location": "SameCluster",
                "transport": transport("Kernel", "Default"),
                "fallback": [],
                "matched": {"kind": "ClusterStackRoute", "namespace": "", "name": "audited-payments", "rule": "payments-kernel"},
            }),
        ),
        (
            "shop/frontend-0",
            "10.244.2.20:8080",
            "no rule for shop pods inside the cluster: the installation default",
            json!({
                "location": "SameZone",
                "transport": transport("Kernel", "Default"),
                "fallback": [],
                "matched": null,
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (from, to, what, expected) in cases {
        let explanation = explain("examples/cluster", from, to);
        let found = decision(&explanation);
        if found != expected {
            failures.push(format!(
                "{from} -> {to} ({what}):\n  expected {expected}\n  found    {found}\n  full: {explanation}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    let egress = explain("examples/cluster", "shop/frontend-0", "8.8.8.8:443");
    assert_eq!(egress["isolation"], "KernelEnforced", "{egress}");
    assert_eq!(egress["via"], "direct", "{egress}");
    assert_eq!(egress["node"], "node-a1", "{egress}");
}

/// `examples/network-policy`: RDMA toward the parameter servers only where Kubernetes
/// NetworkPolicy allows the connection; elsewhere it is removed with reason `network-policy`
/// and the fallbacks decide. Foreign policy objects (here a CiliumNetworkPolicy) make every
/// such decision undecidable: RDMA goes everywhere.
#[test]
fn explain_shows_rdma_removed_where_network_policy_does_not_allow_it() {
    let matched = json!({"kind": "StackRoute", "namespace": "ml", "name": "trainer-fabric", "rule": "parameter-servers"});
    let allowed = explain(
        "examples/network-policy",
        "ml/trainer-0",
        "10.244.2.20:29500",
    );
    assert_eq!(
        decision(&allowed),
        json!({
            "location": "SameZone",
            "transport": transport("RDMA", "Default"),
            "fallback": [transport("Userspace", "BBR"), transport("Kernel", "Default")],
            "matched": matched,
        }),
        "{allowed}"
    );
    assert!(allowed.get("removed").is_none(), "{allowed}");

    let denied = explain(
        "examples/network-policy",
        "ml/trainer-0",
        "10.244.2.21:29500",
    );
    assert_eq!(
        decision(&denied),
        json!({
            "location": "SameZone",
            "transport": transport("Userspace", "BBR"),
            "fallback": [transport("Kernel", "Default")],
            "matched": matched,
        }),
        "{denied}"
    );
    assert_eq!(denied["removed"][0]["stack"], "RDMA", "{denied}");
    assert_eq!(denied["removed"][0]["reason"], "network-policy", "{denied}");
    let detail = denied["removed"][0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with(
            "denied: ingress to pod storage/ps-restricted-0 is isolated by NetworkPolicy \
             storage/default-deny-ingress"
        ),
        "{denied}"
    );
    let output = stackroute(&[
        "explain",
        "--state",
        "examples/network-policy",
        "--from",
        "ml/trainer-0",
        "--to",
        "10.244.2.21:29500",
    ]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let text_output = text(&output.stdout);
    assert!(
        text_output
            .contains("decision: Userspace/BBR → Kernel/Default by StackRoute/ml/trainer-fabric")
            && text_output.contains(
                "removed: RDMA (network-policy: denied: ingress to pod storage/ps-restricted-0"
            ),
        "{}",
        describe(&output)
    );

    let dir = TempDir::new("foreign");
    for file in policy_files("examples/network-policy") {
        let name = Path::new(&file).file_name().expect("file name");
        std::fs::copy(repo().join(&file), dir.0.join(name)).expect("copy example");
    }
    std::fs::write(
        dir.path("cilium.yaml"),
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: l7-visibility, namespace: storage}\nspec: {endpointSelector: {}}\n",
    )
    .expect("write cilium.yaml");
    let state = dir.0.display().to_string();
    let foreign = explain(&state, "ml/trainer-0", "10.244.2.20:29500");
    assert_eq!(
        foreign["transport"],
        transport("Userspace", "BBR"),
        "{foreign}"
    );
    let detail = foreign["removed"][0]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("undecidable: policy objects the controller cannot evaluate are present (CiliumNetworkPolicy/storage/l7-visibility)"),
        "{foreign}"
    );
}

/// A Pass rule in the Admin tier ends the Admin tier only: the namespace's StackRoutes and then
/// the Baseline tier still decide.
#[test]
fn admin_pass_skips_only_the_admin_tier() {
    let dir = TempDir::new("pass");
    for file in policy_files("examples/cluster") {
        let name = Path::new(&file).file_name().expect("file name");
        std::fs::copy(repo().join(&file), dir.0.join(name)).expect("copy cluster state");
    }
    std::fs::write(
        dir.path("admin-pass.yaml"),
        r#"apiVersion: stackroute.dev/v1alpha1
kind: ClusterStackRoute
metadata: {name: delegate-egress}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {}}
  rules:
  - name: world-decided-later
    action: Pass
    to: [{entity: World}]
  - name: never-reached
    to: [{entity: World}]
    transport: {stack: Userspace, congestionControl: Reno}
"#,
    )
    .expect("write admin-pass.yaml");
    let state = dir.0.display().to_string();
    let explanation = explain(&state, "shop/frontend-0", "8.8.8.8:443");
    let considered: Vec<(String, String)> = explanation["considered"]
        .as_array()
        .expect("considered is an array")
        .iter()
        .map(|c| {
            (
                format!(
                    "{}/{}",
                    c["name"].as_str().unwrap_or("?"),
                    c["rule"].as_str().unwrap_or("?")
                ),
                c["result"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    // The rest of the Admin object is skipped by the Pass: that part must hold whatever happens.
    assert!(
        considered.contains(&(
            "delegate-egress/world-decided-later".to_string(),
            "passed".to_string()
        )) && considered.contains(&(
            "delegate-egress/never-reached".to_string(),
            "skipped".to_string()
        )),
        "{explanation}"
    );
    let expected = json!({
        "location": "External",
        "transport": transport("Kernel", "BBR"),
        "fallback": [transport("Kernel", "Default")],
        "matched": {"kind": "ClusterStackRoute", "namespace": "", "name": "egress-bbr", "rule": "world"},
    });
    assert_eq!(decision(&explanation), expected, "{explanation}");
}

/// YAML text without its `x-kubernetes-validations:` blocks (the key line, and the list below it
/// at the same or a deeper indentation).
fn without_cel_blocks(yaml: &str) -> String {
    let mut out = String::new();
    let mut skipping: Option<usize> = None;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(key_indent) = skipping {
            let inside = indent > key_indent
                || (indent == key_indent && line.trim_start().starts_with("- "));
            if inside {
                continue;
            }
            skipping = None;
        }
        if line.trim_start() == "x-kubernetes-validations:" {
            skipping = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn crd_for_an_older_server_leaves_out_only_the_cel_rules_it_cannot_compile() {
    let full = stackroute(&["crd"]);
    let current = stackroute(&["crd", "--kube-version", "1.31"]);
    assert_eq!(current.status.code(), Some(0), "{}", describe(&current));
    assert!(current.stdout == full.stdout, "1.31 takes every CEL rule");
    // 1.25-1.30 evaluate CEL but lack the IP/CIDR library: the rules calling it stay out.
    let middle = text(&stackroute(&["crd", "--kube-version", "1.28"]).stdout);
    assert!(middle.contains("x-kubernetes-validations") && !middle.contains("isCIDR"));
    for version in ["1.20", "v1.20.2", "1.24"] {
        let old = stackroute(&["crd", "--kube-version", version]);
        assert_eq!(old.status.code(), Some(0), "{}", describe(&old));
        let old = text(&old.stdout);
        assert!(!old.contains("x-kubernetes-validations"), "{version}");
        assert!(
            old.contains("name: stackroutes.stackroute.dev"),
            "{version}"
        );
        assert!(
            old.contains("name: clusterstackroutes.stackroute.dev"),
            "{version}"
        );
        // Byte for byte the full CRDs without their x-kubernetes-validations blocks.
        assert_eq!(old, without_cel_blocks(&text(&full.stdout)), "{version}");
    }
    let bad = stackroute(&["crd", "--kube-version", "twenty"]);
    assert_eq!(bad.status.code(), Some(2), "{}", describe(&bad));
    assert!(
        text(&bad.stderr).contains("not a Kubernetes version"),
        "{}",
        describe(&bad)
    );
}

#[test]
fn committed_crd_manifest_is_fresh() {
    let output = stackroute(&["crd"]);
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    let committed = std::fs::read(repo().join("manifests/crds/stackroute.dev.yaml"))
        .expect("read manifests/crds/stackroute.dev.yaml");
    assert!(
        output.stdout == committed,
        "manifests/crds/stackroute.dev.yaml is stale: run \
         `cargo run -p stackroute-cli -- crd > manifests/crds/stackroute.dev.yaml`"
    );
}
