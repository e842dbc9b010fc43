//! Requests to the node agent from inside an application: listener registrations and counter
//! reports. Off every data path; one short-lived connection each, a short timeout, and any
//! failure is only counted.
#![deny(unsafe_code)]

use std::net::SocketAddr;
use std::time::Duration;

use stackroute_local_api::frame;
use stackroute_local_api::message::{Protocol, Request, Response, Stack};

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

/// `registerListener` for a TCP socket listening on `address`.
pub(crate) fn register_listener(config: &Config, address: SocketAddr) -> bool {
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
            stacks: vec![Stack::Kernel],
            endpoints: Default::default(),
        },
    )
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
