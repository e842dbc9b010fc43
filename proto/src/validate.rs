//! The rules for registration messages, in one place for both sides: the controller checks
//! every request at its edge, and the agent checks a registration before it holds (and
//! persists, and re-sends) it, so nothing the agent accepts can be refused later — a refused
//! registration in the agent's resend queue would fail every later session of that node.

use std::net::IpAddr;

use crate::v1alpha1::{Listener, ListenerKey, Protocol, RdmaDevice, Stack, Workload, WorkloadKey};

/// Longest node, namespace, workload or label key accepted.
pub const MAX_NAME: usize = 253;
/// Longest label value (Kubernetes' limit).
pub const MAX_LABEL_VALUE: usize = 63;
/// Most labels, IPs, stacks or endpoints in one registration.
pub const MAX_ITEMS: usize = 64;
/// Longest endpoint text of one stack.
pub const MAX_ENDPOINT: usize = 1024;
/// Bound on the RDMA part of a capability report, as [`rdma_entries`] counts it plus the uverbs
/// devices: the controller refuses more, the agent leaves devices out to stay within it (a big
/// node is cut, not rejected).
pub const MAX_RDMA_ENTRIES: usize = 16 * MAX_ITEMS;
/// Longest `rdma_unavailable_reason` of a capability report (status output shows it as is).
pub const MAX_RDMA_REASON: usize = 1024;
/// Most PMD names, and most bound devices, in a capability report's DPDK detail: the controller
/// refuses more, the agent cuts its lists to it (a node with more is cut, not rejected).
pub const MAX_DPDK_LIST: usize = 4 * MAX_ITEMS;
/// Longest `DpdkCapability.unavailable_reason`.
pub const MAX_DPDK_REASON: usize = 1024;

/// Entries `device` adds to a capability report: itself, its ports, their GIDs and the flat
/// GID list, its RoCE versions.
pub fn rdma_entries(device: &RdmaDevice) -> usize {
    1 + device.gids.len()
        + device.roce_versions.len()
        + device
            .ports
            .iter()
            .map(|port| 1 + port.gids.len())
            .sum::<usize>()
}

/// Checks a name-like field: non-empty, bounded, printable, no `/` (keys use it).
pub fn check_name(field: &str, value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if value.len() > MAX_NAME {
        return Err(format!("{field} is longer than {MAX_NAME} bytes"));
    }
    if let Some(c) = value
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '/')
    {
        return Err(format!("{field} {value:?} contains {c:?}"));
    }
    Ok(())
}

pub fn check_ip(field: &str, value: &str) -> Result<IpAddr, String> {
    value
        .parse::<IpAddr>()
        .map_err(|_| format!("{field} {value:?} is not an IPv4 or IPv6 address"))
}

pub fn check_protocol(value: i32) -> Result<Protocol, String> {
    match Protocol::try_from(value) {
        Ok(p @ (Protocol::Tcp | Protocol::Udp)) => Ok(p),
        _ => Err(format!(
            "key.protocol must be PROTOCOL_TCP or PROTOCOL_UDP, got {value}"
        )),
    }
}

/// Validates a listener key.
pub fn check_listener_key(key: Option<&ListenerKey>) -> Result<&ListenerKey, String> {
    let key = key.ok_or("key is required")?;
    check_name("key.node", &key.node)?;
    check_ip("key.ip", &key.ip)?;
    if !(1..=65535).contains(&key.port) {
        return Err(format!("key.port must be 1..=65535, got {}", key.port));
    }
    check_protocol(key.protocol)?;
    Ok(key)
}

/// Validates a listener and normalises it: the kernel is always among the stacks.
pub fn check_listener(mut listener: Listener) -> Result<Listener, String> {
    check_listener_key(listener.key.as_ref())?;
    if !listener.namespace.is_empty() {
        check_name("namespace", &listener.namespace)?;
    }
    if !listener.workload.is_empty() {
        check_name("workload", &listener.workload)?;
    }
    if listener.stacks.len() > MAX_ITEMS || listener.endpoints.len() > MAX_ITEMS {
        return Err(format!("at most {MAX_ITEMS} stacks and endpoints"));
    }
    for (position, stack) in listener.stacks.iter().enumerate() {
        match Stack::try_from(*stack) {
            Ok(Stack::Kernel | Stack::Userspace | Stack::Rdma) => {}
            _ => return Err(format!("stacks[{position}]: unknown stack {stack}")),
        }
    }
    for (stack, endpoint) in &listener.endpoints {
        let known = Stack::from_str_name(stack).is_some()
            || ["Kernel", "Userspace", "RDMA"]
                .iter()
                .any(|name| name.eq_ignore_ascii_case(stack));
        if !known {
            return Err(format!(
                "endpoints: key {stack:?} is not a stack name (Kernel, Userspace, RDMA)"
            ));
        }
        if endpoint.len() > MAX_ENDPOINT {
            return Err(format!(
                "endpoints[{stack}] is longer than {MAX_ENDPOINT} bytes"
            ));
        }
    }
    if let Some(key) = listener.key.as_mut() {
        // Canonical address text, so equal registrations compare equal.
        key.ip = check_ip("key.ip", &key.ip)?.to_string();
    }
    if !listener.stacks.contains(&(Stack::Kernel as i32)) {
        listener.stacks.insert(0, Stack::Kernel as i32);
    }
    Ok(listener)
}

/// Validates a workload key.
pub fn check_workload_key(key: Option<&WorkloadKey>) -> Result<&WorkloadKey, String> {
    let key = key.ok_or("key is required")?;
    check_name("key.node", &key.node)?;
    check_name("key.namespace", &key.namespace)?;
    check_name("key.name", &key.name)?;
    Ok(key)
}

/// Validates a workload and normalises its addresses.
pub fn check_workload(mut workload: Workload) -> Result<Workload, String> {
    check_workload_key(workload.key.as_ref())?;
    if workload.labels.len() > MAX_ITEMS || workload.ips.len() > MAX_ITEMS {
        return Err(format!("at most {MAX_ITEMS} labels and ips"));
    }
    for (key, value) in &workload.labels {
        if key.is_empty() || key.len() > MAX_NAME || value.len() > MAX_LABEL_VALUE {
            return Err(format!(
                "label {key:?}={value:?}: keys must be 1..={MAX_NAME} bytes, values at most {MAX_LABEL_VALUE}"
            ));
        }
    }
    let mut ips = Vec::with_capacity(workload.ips.len());
    for (position, ip) in workload.ips.iter().enumerate() {
        ips.push(check_ip(&format!("ips[{position}]"), ip)?.to_string());
    }
    workload.ips = ips;
    Ok(workload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ip: &str, port: u32, protocol: Protocol) -> ListenerKey {
        ListenerKey {
            node: "n1".into(),
            ip: ip.into(),
            port,
            protocol: protocol as i32,
        }
    }

    #[test]
    fn listener_keys_are_checked() {
        assert!(check_listener_key(Some(&key("10.0.0.1", 80, Protocol::Tcp))).is_ok());
        let bad = [
            (key("10.0.0.1", 0, Protocol::Tcp), "key.port"),
            (key("10.0.0.1", 70000, Protocol::Tcp), "key.port"),
            (key("10.0.0.300", 80, Protocol::Tcp), "key.ip"),
            (key("10.0.0.1", 80, Protocol::Unspecified), "key.protocol"),
        ];
        for (k, field) in bad {
            let error = check_listener_key(Some(&k)).expect_err("invalid");
            assert!(error.starts_with(field), "{error}");
        }
        let mut k = key("::1", 80, Protocol::Udp);
        k.node = String::new();
        assert_eq!(
            check_listener_key(Some(&k)).expect_err("invalid"),
            "key.node must not be empty"
        );
        assert_eq!(
            check_listener_key(None).expect_err("invalid"),
            "key is required"
        );
    }

    #[test]
    fn listeners_always_accept_the_kernel_and_use_canonical_addresses() {
        let listener = check_listener(Listener {
            key: Some(key("fd00:0:0::1", 80, Protocol::Tcp)),
            stacks: vec![Stack::Rdma as i32],
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(
            listener.stacks,
            vec![Stack::Kernel as i32, Stack::Rdma as i32]
        );
        assert_eq!(listener.key.expect("key").ip, "fd00::1");
        let error = check_listener(Listener {
            key: Some(key("10.0.0.1", 80, Protocol::Tcp)),
            stacks: vec![42],
            ..Default::default()
        })
        .expect_err("invalid");
        assert_eq!(error, "stacks[0]: unknown stack 42");
    }

    #[test]
    fn workloads_are_checked() {
        let workload = |namespace: &str, ips: Vec<&str>| Workload {
            key: Some(WorkloadKey {
                node: "n1".into(),
                namespace: namespace.into(),
                name: "w".into(),
            }),
            labels: [("app".to_string(), "x".to_string())].into(),
            ips: ips.into_iter().map(String::from).collect(),
        };
        assert!(check_workload(workload("ns", vec!["10.0.0.1", "fd00::1"])).is_ok());
        assert_eq!(
            check_workload(workload("", vec![])).expect_err("invalid"),
            "key.namespace must not be empty"
        );
        assert_eq!(
            check_workload(workload("a/b", vec![])).expect_err("invalid"),
            "key.namespace \"a/b\" contains '/'"
        );
        assert_eq!(
            check_workload(workload("ns", vec!["nope"])).expect_err("invalid"),
            "ips[0] \"nope\" is not an IPv4 or IPv6 address"
        );
    }
}
