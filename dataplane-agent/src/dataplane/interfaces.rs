//! This node's IPv4 addresses on the interfaces the node-interface
//! programs serve: where nodePorts answer and tunnels end.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CStr,
    net::Ipv4Addr,
};

use anyhow::{Context as _, Result, bail};
use dataplane_common::{NODE_IP_NO_NODE_PORTS, NODE_IP_PRESENT, node_ip_serves_node_ports};

use crate::config::NodePortAddresses;

/// NODE_IPS as it should be: every address ends tunnels; those
/// `--nodeport-addresses` leaves out are marked as serving no nodePort.
/// `primary` is the Node object's InternalIP, when known.
pub fn node_ip_uses(
    addresses: &BTreeSet<Ipv4Addr>,
    nodeport_addresses: &NodePortAddresses,
    primary: Option<Ipv4Addr>,
) -> BTreeMap<Ipv4Addr, u32> {
    addresses
        .iter()
        .map(|address| {
            let no_node_ports = if nodeport_addresses.selects(*address, primary) {
                0
            } else {
                NODE_IP_NO_NODE_PORTS
            };
            (*address, NODE_IP_PRESENT | no_node_ports)
        })
        .collect()
}

/// NODE_IPS as an agent writes it at start, before it has read the Node
/// object: with `primary`, the addresses the previous agent's NODE_IPS
/// (`previous`) served keep serving until the first sync names the
/// primary address, so a restart interrupts no nodePort.
pub fn node_ip_uses_at_start(
    addresses: &BTreeSet<Ipv4Addr>,
    nodeport_addresses: &NodePortAddresses,
    previous: &BTreeMap<Ipv4Addr, u32>,
) -> BTreeMap<Ipv4Addr, u32> {
    let mut uses = node_ip_uses(addresses, nodeport_addresses, None);
    if *nodeport_addresses == NodePortAddresses::Primary {
        for (address, uses) in &mut uses {
            if previous
                .get(address)
                .is_some_and(|p| node_ip_serves_node_ports(*p))
            {
                *uses &= !NODE_IP_NO_NODE_PORTS;
            }
        }
    }
    uses
}

/// The IPv4 addresses of `interfaces`, per `getifaddrs(3)`.
pub fn ipv4_addresses(interfaces: &[String]) -> Result<BTreeSet<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        bail!(
            "listing interface addresses: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut out = BTreeSet::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }.to_string_lossy();
        // SAFETY: ifa_addr is non-null and points to a sockaddr.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        if family != libc::AF_INET || !interfaces.iter().any(|i| *i == name) {
            continue;
        }
        // SAFETY: an AF_INET sockaddr is a sockaddr_in.
        let address = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
        out.insert(Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)));
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

/// The interfaces of this network namespace's IPv4 default routes, from
/// /proc/self/net/route (which, unlike /sys/class/net, always shows the
/// namespace of the reading process).
pub fn default_route_interfaces() -> Result<Vec<String>> {
    let table =
        std::fs::read_to_string("/proc/self/net/route").context("reading /proc/self/net/route")?;
    Ok(default_routes_in(&table))
}

fn default_routes_in(table: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        let is_default = fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000";
        if is_default && !out.iter().any(|i| i == fields[0]) {
            out.push(fields[0].to_owned());
        }
    }
    out
}

/// The --interfaces list with `auto` replaced by the default routes'
/// interfaces.
pub fn resolve(flag: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for interface in flag.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        if interface == "auto" {
            let found = default_route_interfaces()?;
            if found.is_empty() {
                tracing::warn!(
                    "--interfaces auto: no IPv4 default route in this network namespace, so no interface for NodePort and load-balancer traffic; name the interfaces to serve them"
                );
            }
            out.extend(found);
        } else {
            out.push(interface.to_owned());
        }
    }
    let mut seen = BTreeSet::new();
    out.retain(|i| seen.insert(i.clone()));
    Ok(out)
}

/// Fails unless every interface exists in this network namespace.
pub fn check_exist(interfaces: &[String]) -> Result<()> {
    for interface in interfaces {
        // if_nametoindex asks the kernel about this network namespace;
        // /sys/class/net shows whichever namespace sysfs was mounted in.
        let name = std::ffi::CString::new(interface.as_str())
            .with_context(|| format!("--interfaces: {interface:?} is not a name"))?;
        // SAFETY: a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } == 0 {
            bail!("--interfaces: no interface {interface:?} in this network namespace");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_address_ends_tunnels_and_the_selected_ones_serve_node_ports() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let addresses: BTreeSet<Ipv4Addr> = [ip("192.0.2.10"), ip("198.51.100.10")].into();
        let both = NODE_IP_PRESENT;
        let tunnel_only = NODE_IP_PRESENT | NODE_IP_NO_NODE_PORTS;
        let selection = NodePortAddresses::parse(&["192.0.2.0/24".into()]).unwrap();
        assert_eq!(
            node_ip_uses(&addresses, &selection, None),
            BTreeMap::from([(ip("192.0.2.10"), both), (ip("198.51.100.10"), tunnel_only),])
        );
        assert_eq!(
            node_ip_uses(
                &addresses,
                &NodePortAddresses::Primary,
                Some(ip("198.51.100.10"))
            ),
            BTreeMap::from([(ip("192.0.2.10"), tunnel_only), (ip("198.51.100.10"), both),])
        );
        assert!(
            node_ip_uses(&addresses, &NodePortAddresses::All, None)
                .values()
                .all(|uses| *uses == both)
        );
    }

    #[test]
    fn at_start_primary_keeps_what_the_previous_agent_served_until_the_node_is_read() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let addresses: BTreeSet<Ipv4Addr> = [ip("192.0.2.10"), ip("198.51.100.10")].into();
        let tunnel_only = NODE_IP_PRESENT | NODE_IP_NO_NODE_PORTS;
        // An agent from before --nodeport-addresses wrote 1 everywhere, a
        // newer one marked what it left out; an address it did not know
        // serves nothing yet.
        let previous = BTreeMap::from([
            (ip("192.0.2.10"), NODE_IP_PRESENT),
            (ip("198.51.100.10"), tunnel_only),
        ]);
        let expected = BTreeMap::from([
            (ip("192.0.2.10"), NODE_IP_PRESENT),
            (ip("198.51.100.10"), tunnel_only),
        ]);
        assert_eq!(
            node_ip_uses_at_start(&addresses, &NodePortAddresses::Primary, &previous),
            expected
        );
        assert!(
            node_ip_uses_at_start(&addresses, &NodePortAddresses::Primary, &BTreeMap::new())
                .values()
                .all(|uses| *uses == tunnel_only),
            "a first start serves nodePorts once the Node is read"
        );
        // CIDRs never depend on the previous agent.
        let cidrs = NodePortAddresses::parse(&["198.51.100.0/24".into()]).unwrap();
        assert_eq!(
            node_ip_uses_at_start(&addresses, &cidrs, &previous),
            BTreeMap::from([
                (ip("192.0.2.10"), tunnel_only),
                (ip("198.51.100.10"), NODE_IP_PRESENT),
            ])
        );
    }

    #[test]
    fn default_routes_are_read_from_the_route_table() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t00000000\t0102000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
            eth0\t0002000A\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
            eth1\t00000000\t0103000A\t0003\t0\t0\t200\t00000000\t0\t0\t0\n";
        assert_eq!(default_routes_in(table), vec!["eth0", "eth1"]);
        assert!(default_routes_in("Iface\tDestination\n").is_empty());
    }
}
