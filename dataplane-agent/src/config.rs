//! What `dataplane-agent run` is told to do, resolved from its flags (the
//! CLI in `main.rs` builds it; the agent only reads it).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::dataplane::{conntrack, state::Limits};

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
}
