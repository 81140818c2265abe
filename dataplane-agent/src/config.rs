//! What `dataplane-agent run` is told to do, resolved from its flags (the
//! CLI in `main.rs` builds it; the agent only reads it).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    dataplane::{conntrack, state::Limits},
    model::SourceRange,
};

/// Where cluster state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of YAML, watched.
    Manifests(PathBuf),
    /// The API server: `--kubeconfig`, or in-cluster config.
    Kube { kubeconfig: Option<PathBuf> },
}

/// Everything `dataplane-agent run` needs, resolved from flags.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    pub node_name: String,
    pub min_sync_period: Duration,
    /// Resync: SERVICES compared with the mirror, even without a change
    /// (kube-proxy's --sync-period).
    pub sync_period: Duration,
    /// Full resync: every map re-read, every Service recomputed.
    pub full_resync_period: Duration,
    /// How long a retired backend slot stays readable after the flip that
    /// retired it, for connect() calls that read the old Service entry.
    pub retired_slot_grace: Duration,
    pub limits: Limits,
    /// Where to serve Prometheus metrics; None disables the server.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Where to serve /healthz; None disables the server.
    pub healthz_bind_address: Option<SocketAddr>,
    /// Remove a parked kube-proxy's iptables chains and nftables tables at
    /// start.
    pub cleanup_kube_proxy_rules: bool,
    /// The interface programs' settings; None when no interface is configured.
    pub external: Option<ExternalConfig>,
    /// Where healthCheckNodePorts are served (kube-proxy: every address).
    pub health_check_bind_ip: IpAddr,
}

/// How external traffic reaches a backend on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExternalMode {
    /// VXLAN to the backend's node; the backend sees the client's address.
    Tunnel,
    /// Masquerade to this node's address (kube-proxy's behaviour).
    Snat,
}

/// The interface programs' settings (external traffic).
#[derive(Clone, Debug)]
pub struct ExternalConfig {
    pub interfaces: Vec<String>,
    pub mode: ExternalMode,
    /// The tunnel's and SNAT's source address; default: the first IPv4
    /// address of the first interface.
    pub node_ip: Option<Ipv4Addr>,
    pub tunnel_port: u16,
    pub vni: u32,
    pub snat_ports: (u16, u16),
    pub conntrack: conntrack::Timeouts,
    pub conntrack_sweep_period: Duration,
    pub conntrack_max_entries: u32,
    pub nodeport_addresses: NodePortAddresses,
    /// CONFIG's `tunnel_mss_clamp`, from [`parse_tunnel_mss_clamp`].
    pub tunnel_mss_clamp: u16,
}

/// `--tunnel-mss-clamp`: `auto` (the interface MTU minus the VXLAN
/// encapsulation and the IPv4 and TCP headers), `off`, or an MSS in
/// bytes (Linux's own floor, 88, to 65,534).
pub fn parse_tunnel_mss_clamp(value: &str) -> Result<u16, String> {
    match value.trim() {
        "auto" => Ok(dataplane_common::TUNNEL_MSS_CLAMP_AUTO),
        "off" => Ok(dataplane_common::TUNNEL_MSS_CLAMP_OFF),
        number => number
            .parse::<u16>()
            .ok()
            .filter(|mss| (88..dataplane_common::TUNNEL_MSS_CLAMP_AUTO).contains(mss))
            .ok_or_else(|| format!("{value:?} is not auto, off, nor an MSS from 88 to 65534")),
    }
}

/// Which of this node's addresses serve nodePorts: kube-proxy's
/// `--nodeport-addresses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address of the node interfaces (kube-proxy's iptables mode
    /// default).
    All,
    /// The node's primary address: its Node object's InternalIP.
    Primary,
    /// The addresses in these IPv4 prefixes.
    Cidrs(Vec<SourceRange>),
}

impl NodePortAddresses {
    /// kube-proxy's syntax: a list of CIDRs, or `primary` alone; empty
    /// means all. As in kube-proxy, the IPv4 datapath reads the IPv4 CIDRs
    /// of the list, and a list of IPv6 CIDRs only leaves IPv4 unfiltered.
    pub fn parse(values: &[String]) -> Result<Self, String> {
        let values: Vec<&str> = values
            .iter()
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .collect();
        if values.contains(&"primary") {
            return match values.as_slice() {
                ["primary"] => Ok(Self::Primary),
                _ => Err("\"primary\" cannot be combined with CIDRs".into()),
            };
        }
        let mut cidrs = Vec::new();
        for value in values {
            match SourceRange::parse(value) {
                Ok(Some(cidr)) => cidrs.push(cidr),
                Ok(None) => {}
                Err(_) => return Err(format!("{value:?} is not a CIDR (nor \"primary\")")),
            }
        }
        Ok(if cidrs.is_empty() {
            Self::All
        } else {
            Self::Cidrs(cidrs)
        })
    }

    /// Whether `address` serves nodePorts; `primary` is the node's
    /// InternalIP when known.
    pub fn selects(&self, address: Ipv4Addr, primary: Option<Ipv4Addr>) -> bool {
        match self {
            Self::All => true,
            Self::Primary => primary == Some(address),
            Self::Cidrs(cidrs) => cidrs.iter().any(|cidr| cidr.contains(address)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(values: &[&str]) -> Result<NodePortAddresses, String> {
        let values: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        NodePortAddresses::parse(&values)
    }

    #[test]
    fn tunnel_mss_clamp_reads_auto_off_and_a_size() {
        assert_eq!(
            parse_tunnel_mss_clamp("auto"),
            Ok(dataplane_common::TUNNEL_MSS_CLAMP_AUTO)
        );
        assert_eq!(
            parse_tunnel_mss_clamp("off"),
            Ok(dataplane_common::TUNNEL_MSS_CLAMP_OFF)
        );
        assert_eq!(parse_tunnel_mss_clamp("1310"), Ok(1310));
        for bad in ["0", "87", "65535", "big", ""] {
            assert!(parse_tunnel_mss_clamp(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nodeport_addresses_read_as_kube_proxy_reads_them() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(parse(&[]), Ok(NodePortAddresses::All));
        assert_eq!(parse(&["primary"]), Ok(NodePortAddresses::Primary));
        assert!(parse(&["primary", "10.0.0.0/8"]).is_err());
        assert!(parse(&["10.0.0.1"]).is_err(), "an address is not a CIDR");
        assert!(parse(&["10.0.0.0/33"]).is_err());
        // IPv6 CIDRs filter the IPv6 family only.
        assert_eq!(parse(&["fd00::/64"]), Ok(NodePortAddresses::All));
        let cidrs = parse(&["fd00::/64", "192.0.2.0/24", "10.1.2.3/32"]).unwrap();
        for (address, selected) in [
            ("192.0.2.77", true),
            ("10.1.2.3", true),
            ("10.1.2.4", false),
            ("198.51.100.1", false),
        ] {
            assert_eq!(cidrs.selects(ip(address), None), selected, "{address}");
        }
        let primary = NodePortAddresses::Primary;
        assert!(primary.selects(ip("192.0.2.1"), Some(ip("192.0.2.1"))));
        assert!(!primary.selects(ip("192.0.2.2"), Some(ip("192.0.2.1"))));
        assert!(!primary.selects(ip("192.0.2.1"), None), "unknown: none");
        assert!(NodePortAddresses::All.selects(ip("203.0.113.9"), None));
    }
}
