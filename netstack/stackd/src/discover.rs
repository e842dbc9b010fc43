//! What the namespace has: the interface, address, prefix and gateway the instance uses unless
//! told otherwise. Read from `/proc/net` (per network namespace) and interface ioctls, so it
//! works in a pod entered with `setns` alone, where `/sys` may still show the host's.

use std::net::{Ipv4Addr, Ipv6Addr};

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

/// The first usable global IPv6 address of `interface` in `/proc/net/if_inet6` text
/// (`ADDRESS IFINDEX PREFIX SCOPE FLAGS NAME`, hexadecimal): scope global (which includes
/// unique-local addresses), neither tentative nor failed duplicate address detection.
pub(crate) fn ipv6_address(if_inet6: &str, interface: &str) -> Option<(Ipv6Addr, u8)> {
    const TENTATIVE: u32 = 0x40;
    const DAD_FAILED: u32 = 0x08;
    if_inet6.lines().find_map(|line| {
        let [address, _, prefix, scope, flags, name] =
            line.split_whitespace().collect::<Vec<_>>()[..]
        else {
            return None;
        };
        let flags = u32::from_str_radix(flags, 16).ok()?;
        if name != interface || scope != "00" || flags & (TENTATIVE | DAD_FAILED) != 0 {
            return None;
        }
        Some((hex_ipv6(address)?, u8::from_str_radix(prefix, 16).ok()?))
    })
}

/// The next hop of `interface`'s IPv6 default route with the lowest metric in
/// `/proc/net/ipv6_route` text (`DEST PLEN SRC SPLEN NEXTHOP METRIC REFCNT USE FLAGS NAME`).
pub(crate) fn ipv6_gateway(ipv6_route: &str, interface: &str) -> Option<Ipv6Addr> {
    ipv6_route
        .lines()
        .filter_map(|line| {
            let [destination, prefix, _, _, next_hop, metric, _, _, _, name] =
                line.split_whitespace().collect::<Vec<_>>()[..]
            else {
                return None;
            };
            if name != interface || prefix != "00" || !hex_ipv6(destination)?.is_unspecified() {
                return None;
            }
            let next_hop = hex_ipv6(next_hop).filter(|hop| !hop.is_unspecified())?;
            Some((u32::from_str_radix(metric, 16).ok()?, next_hop))
        })
        .min_by_key(|(metric, _)| *metric)
        .map(|(_, next_hop)| next_hop)
}

fn hex_ipv6(hex: &str) -> Option<Ipv6Addr> {
    (hex.len() == 32)
        .then(|| u128::from_str_radix(hex, 16).ok())
        .flatten()
        .map(Ipv6Addr::from)
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
    /// The interface's IPv6 address, prefix and default gateway, if it has a global one.
    pub(crate) ipv6: Option<(Ipv6Addr, u8, Option<Ipv6Addr>)>,
}

/// Fills in what the command line left out from this namespace; IPv6 too unless `ipv6` is
/// false.
pub(crate) fn network(
    interface: Option<&str>,
    address: Option<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
    ipv6: bool,
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
    let ipv6 = ipv6
        .then(|| std::fs::read_to_string("/proc/net/if_inet6").ok())
        .flatten()
        .and_then(|table| ipv6_address(&table, &interface))
        .map(|(address, prefix_len)| {
            let routes = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
            (address, prefix_len, ipv6_gateway(&routes, &interface))
        });
    Ok(Network {
        interface,
        address,
        prefix_len,
        gateway,
        ipv6,
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

    #[test]
    fn the_global_ipv6_address_and_default_gateway_of_the_interface() {
        let addresses = "00000000000000000000000000000001 01 80 10 80       lo\n\
            fe8000000000000000fc00fffe000001 04 40 20 80     eth0\n\
            fd000000000000000000000000000009 04 40 00 c0     eth0\n\
            fd000000000000000000000000000002 04 40 00 82     eth0\n\
            fd010000000000000000000000000002 05 40 00 80     eth1\n";
        assert_eq!(
            ipv6_address(addresses, "eth0"),
            Some(("fd00::2".parse().unwrap(), 64)),
            "link-local and tentative addresses are skipped"
        );
        assert_eq!(ipv6_address(addresses, "eth2"), None);
        let routes = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd00000000000000000000000000000a 00000100 00000003 00000000 00000003     eth0\n\
            00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 00200200       lo\n";
        assert_eq!(
            ipv6_gateway(routes, "eth0"),
            Some("fd00::a".parse().unwrap()),
            "the lowest metric"
        );
        assert_eq!(ipv6_gateway(routes, "lo"), None, "no next hop");
    }
}
