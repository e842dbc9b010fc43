//! What the namespace has: the interface, address, prefix and gateway the instance uses unless
//! told otherwise. Read from `/proc/net` (per network namespace) and interface ioctls, so it
//! works in a pod entered with `setns` alone, where `/sys` may still show the host's.

use std::net::Ipv4Addr;

use anyhow::{Context, Result, bail};

/// The IPv4 default route with the lowest metric in `/proc/net/route` text: its interface and
/// gateway.
pub(crate) fn default_route(route_table: &str) -> Option<(String, Ipv4Addr)> {
    route_table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let [iface, destination, gateway, _, _, _, metric, mask, ..] = fields[..] else {
                return None;
            };
            if destination != "00000000" || mask != "00000000" {
                return None;
            }
            // Hexadecimal of the address in network byte order read as a little-endian word.
            let gateway = u32::from_str_radix(gateway, 16).ok()?;
            let metric: u32 = metric.parse().ok()?;
            Some((
                metric,
                iface.to_owned(),
                Ipv4Addr::from(gateway.to_le_bytes()),
            ))
        })
        .min_by_key(|(metric, _, _)| *metric)
        .map(|(_, iface, gateway)| (iface, gateway))
}

/// Interface names in `/proc/net/dev` text.
pub(crate) fn interface_names(dev_table: &str) -> Vec<String> {
    dev_table
        .lines()
        .skip(2)
        .filter_map(|line| line.split_once(':').map(|(name, _)| name.trim().to_owned()))
        .filter(|name| !name.is_empty())
        .collect()
}

/// What the instance serves on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Network {
    pub(crate) interface: String,
    pub(crate) address: Ipv4Addr,
    pub(crate) prefix_len: u8,
    pub(crate) gateway: Option<Ipv4Addr>,
}

/// Fills in what the command line left out from this namespace.
pub(crate) fn network(
    interface: Option<&str>,
    address: Option<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
) -> Result<Network> {
    let route_table =
        std::fs::read_to_string("/proc/net/route").context("reading /proc/net/route")?;
    let default = default_route(&route_table);
    let interface = match (interface, &default) {
        (Some(name), _) => name.to_owned(),
        (None, Some((name, _))) => name.clone(),
        (None, None) => {
            let dev_table =
                std::fs::read_to_string("/proc/net/dev").context("reading /proc/net/dev")?;
            let candidates: Vec<String> = interface_names(&dev_table)
                .into_iter()
                .filter(|name| {
                    !stackroute_pktio::interface::is_loopback(name).unwrap_or(true)
                        && stackroute_pktio::interface::is_up(name).unwrap_or(false)
                })
                .collect();
            match &candidates[..] {
                [only] => only.clone(),
                [] => bail!("no IPv4 default route and no interface up besides loopback"),
                _ => bail!(
                    "no IPv4 default route and several interfaces up ({}): name one with --interface",
                    candidates.join(", ")
                ),
            }
        }
    };
    let (address, prefix_len) = match address {
        Some(given) => given,
        None => stackroute_pktio::interface::ipv4(&interface)
            .with_context(|| format!("reading the IPv4 address of {interface} (give --address)"))?,
    };
    let gateway = gateway.or_else(|| {
        default
            .filter(|(name, gateway)| *name == interface && !gateway.is_unspecified())
            .map(|(_, gateway)| gateway)
    });
    Ok(Network {
        interface,
        address,
        prefix_len,
        gateway,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_route_with_the_lowest_metric_wins() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
            eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        assert_eq!(
            default_route(table),
            Some(("eth0".to_owned(), Ipv4Addr::new(192, 168, 0, 1)))
        );
        assert_eq!(default_route(&table[..table.find("eth1").unwrap()]), None);
        assert_eq!(default_route(""), None);
    }

    #[test]
    fn interface_names_come_from_proc_net_dev() {
        let table = "Inter-|   Receive    |  Transmit\n \
            face |bytes    packets|bytes    packets\n    \
            lo:  1234 5 0 0\n  eth0: 99 1 0 0\nveth-a1:0 0 0 0\n";
        assert_eq!(interface_names(table), ["lo", "eth0", "veth-a1"]);
    }
}
