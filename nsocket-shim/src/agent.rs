//! Requests to the node agent from inside an application: listener registrations and counter
//! reports. Off every data path; one short-lived connection each, a short timeout, and any
//! failure is only counted.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use stackroute_local_api::frame;
use stackroute_local_api::message::{FallbackReason, Protocol, Request, Response, Stack};

use crate::config::Config;
use crate::sys;

/// How long one request may take.
pub(crate) const TIMEOUT: Duration = Duration::from_millis(250);

/// Sends one request; `true` if the agent accepted it.
pub(crate) fn call(config: &Config, request: &Request) -> bool {
    let Some(mut stream) = sys::agent_stream(&config.socket_path, TIMEOUT) else {
        return false;
    };
    matches!(
        frame::call::<_, _, Response>(&mut stream, request),
        Ok(Response::Ok { .. })
    )
}

/// The user-space stack instance serving this process's network namespace: (pid, abstract
/// socket name), started by the agent if needed; or the reason to fall back. Asked at the first
/// `Userspace` decision of a process, then only when the instance stops answering; the agent
/// may take a few milliseconds to start one.
pub(crate) fn userspace_instance(
    config: &Config,
    timeout: Duration,
) -> Result<(i32, String), FallbackReason> {
    let Some(mut stream) = sys::agent_stream(&config.socket_path, timeout) else {
        return Err(FallbackReason::NoAgent);
    };
    match frame::call::<_, _, Response>(&mut stream, &Request::UserspaceInstance) {
        Ok(Response::Instance { pid, socket }) => Ok((pid, socket)),
        Ok(Response::Unavailable { reason, .. }) => Err(reason),
        Ok(_) => Err(FallbackReason::StackUnavailable),
        Err(_) => Err(FallbackReason::NoAgent),
    }
}

/// How long the agent may take to start an instance (it waits up to 3 s for it by default).
pub(crate) const INSTANCE_TIMEOUT: Duration = Duration::from_secs(4);

/// `registerListener` for a TCP socket listening on `address`; `rdma`: also as an RDMA
/// upgrade endpoint (its shim answers proposals), reachable at `rdma_endpoint` if it has one.
pub(crate) fn register_listener(
    config: &Config,
    address: SocketAddr,
    rdma: bool,
    rdma_endpoint: Option<String>,
) -> bool {
    let (Some(namespace), Some(workload)) = (&config.namespace, &config.workload) else {
        return false;
    };
    call(
        config,
        &Request::RegisterListener {
            ip: address.ip(),
            port: address.port(),
            protocol: Protocol::Tcp,
            namespace: namespace.clone(),
            workload: workload.clone(),
            stacks: if rdma {
                vec![Stack::Kernel, Stack::Rdma]
            } else {
                vec![Stack::Kernel]
            },
            endpoints: rdma_endpoint
                .map(|endpoint| [(RDMA_ENDPOINT.to_owned(), endpoint)].into())
                .unwrap_or_default(),
        },
    )
}

/// The key of a listener's RDMA endpoint in its registration's `endpoints`.
pub(crate) const RDMA_ENDPOINT: &str = "RDMA";

/// Whether the server at `destination` registered itself as an RDMA upgrade endpoint
/// (`findListener`): only then may a proposal precede the application's bytes.
pub(crate) fn rdma_listener(
    config: &Config,
    destination: SocketAddr,
) -> Result<(), FallbackReason> {
    let Some(mut stream) = sys::agent_stream(&config.socket_path, TIMEOUT) else {
        return Err(FallbackReason::NoAgent);
    };
    let request = Request::FindListener {
        ip: destination.ip(),
        port: destination.port(),
        protocol: Protocol::Tcp,
    };
    match frame::call::<_, _, Response>(&mut stream, &request) {
        Ok(Response::Listener {
            listener: Some(listener),
        }) if listener.stacks.contains(&Stack::Rdma) => Ok(()),
        Ok(_) => Err(FallbackReason::PeerNotRegistered),
        Err(_) => Err(FallbackReason::NoAgent),
    }
}

/// `removeListener` for a TCP listener on `address`.
pub(crate) fn remove_listener(config: &Config, address: SocketAddr) -> bool {
    call(
        config,
        &Request::RemoveListener {
            ip: address.ip(),
            port: address.port(),
            protocol: Protocol::Tcp,
        },
    )
}

/// Sends the counters, putting them back if the agent did not take them.
pub(crate) fn report(config: &Config) {
    if let Some(report) = crate::counters::take()
        && !call(config, &report)
    {
        crate::counters::restore(&report);
    }
}
