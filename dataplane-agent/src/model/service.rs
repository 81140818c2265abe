//! Which Services kube-proxy would proxy, and their validated frontends.

use std::{fmt, net::IpAddr, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::core::v1::Service;

use super::{ObjectName, SkipReason, SourceRange};

/// Services and EndpointSlices with this label belong to another proxy;
/// kube-proxy without a proxy name of its own skips every one of them (its
/// informers select `!service.kubernetes.io/service-proxy-name`).
pub(super) const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Set by the EndpointSlice controller on the slices of headless Services
/// (and honoured on Services too); kube-proxy's informers skip it.
pub(super) const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Kubernetes' spelling; a missing protocol means TCP.
    pub fn parse(protocol: Option<&str>) -> Result<Self, String> {
        match protocol.unwrap_or("TCP") {
            "TCP" => Ok(Self::Tcp),
            "UDP" => Ok(Self::Udp),
            "SCTP" => Ok(Self::Sctp),
            other => Err(format!("unknown protocol {other:?}")),
        }
    }

    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => dataplane_common::IPPROTO_TCP,
            Self::Udp => dataplane_common::IPPROTO_UDP,
            Self::Sctp => dataplane_common::IPPROTO_SCTP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        [Self::Tcp, Self::Udp, Self::Sctp]
            .into_iter()
            .find(|p| p.number() == number)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// A Service port, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServicePort {
    /// Interned: most ports of a cluster are named alike ("http").
    pub name: Arc<str>,
    pub port: u16,
    pub protocol: Protocol,
    /// Set for NodePort and LoadBalancer Services (unless
    /// allocateLoadBalancerNodePorts is false).
    pub node_port: Option<u16>,
}

/// The parts of a proxied Service the model needs, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct ServiceSpec {
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub internal_traffic_local: bool,
    /// `sessionAffinity: ClientIP`: its timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// spec.externalIPs (IPv4).
    pub external_ips: Vec<Ipv4Addr>,
    /// status.loadBalancer.ingress IPs (IPv4) of a LoadBalancer Service,
    /// except those with ipMode Proxy (the load balancer proxies to the
    /// nodes itself; kube-proxy leaves those alone too).
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub external_traffic_local: bool,
    pub health_check_node_port: Option<u16>,
    /// spec.loadBalancerSourceRanges (IPv4).
    pub source_ranges: Vec<SourceRange>,
}

/// The API server's default and maximum for
/// `sessionAffinityConfig.clientIP.timeoutSeconds`.
const DEFAULT_AFFINITY_TIMEOUT_S: i32 = 10_800;
const MAX_AFFINITY_TIMEOUT_S: i32 = 86_400;

/// Why a Service is not proxied: a category for the metric, the words for
/// the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Rejection {
    pub category: SkipReason,
    pub reason: String,
}

impl Rejection {
    fn invalid(reason: impl Into<String>) -> Self {
        Self {
            category: SkipReason::Invalid,
            reason: reason.into(),
        }
    }
}

/// The validation helpers say what is wrong in words; all of that is
/// invalid input.
impl From<String> for Rejection {
    fn from(reason: String) -> Self {
        Self::invalid(reason)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Classified {
    Proxied(ServiceSpec),
    /// Not ours to proxy (headless, ExternalName, another proxy's); not an
    /// error.
    Ignored,
}

/// Decides whether kube-proxy would proxy this Service, and validates it.
/// An invalid Service is an `Err` with the reason; the caller skips only it.
pub(super) fn classify(name: &ObjectName, service: &Service) -> Result<Classified, Rejection> {
    let labels = service.metadata.labels.as_ref();
    if labels
        .is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME_LABEL) || l.contains_key(HEADLESS_LABEL))
    {
        return Ok(Classified::Ignored);
    }
    if name.name.is_empty() {
        return Err(Rejection::invalid("metadata.name is empty"));
    }
    let Some(spec) = service.spec.as_ref() else {
        return Err(Rejection::invalid("has no spec"));
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Ok(Classified::Ignored);
    }
    let declared_ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => vec![],
    };
    if declared_ips.is_empty() || declared_ips.iter().any(|ip| ip.is_empty() || *ip == "None") {
        return Ok(Classified::Ignored);
    }
    let mut cluster_ips = Vec::new();
    for ip in declared_ips {
        match ip.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) if v4.is_unspecified() || v4.is_broadcast() => {
                return Err(Rejection::invalid(format!(
                    "clusterIP {ip} is not a usable address"
                )));
            }
            Ok(IpAddr::V4(v4)) => cluster_ips.push(v4),
            // The IPv6 family of a dual-stack Service waits for the IPv6
            // datapath; its IPv4 family is still served.
            Ok(IpAddr::V6(_)) => {}
            Err(_) => {
                return Err(Rejection::invalid(format!(
                    "clusterIP {ip:?} is not an IP address"
                )));
            }
        }
    }
    if cluster_ips.is_empty() {
        return Err(Rejection {
            category: SkipReason::UnsupportedIpFamily,
            reason: "has only IPv6 clusterIPs, which are not supported yet".into(),
        });
    }
    let ports = spec.ports.as_deref().unwrap_or(&[]);
    if ports.is_empty() {
        return Err(Rejection::invalid("has no ports"));
    }
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let has_node_ports = matches!(service_type, "NodePort" | "LoadBalancer");
    let mut validated = Vec::with_capacity(ports.len());
    for port in ports {
        let port_name = port.name.clone().unwrap_or_default();
        let number = u16::try_from(port.port)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {:?} has invalid number {}", port_name, port.port))?;
        let protocol = Protocol::parse(port.protocol.as_deref())
            .map_err(|e| format!("port {port_name:?}: {e}"))?;
        if validated
            .iter()
            .any(|p: &ServicePort| p.port == number && p.protocol == protocol)
        {
            return Err(Rejection::invalid(format!(
                "port {number}/{protocol} is declared twice"
            )));
        }
        let node_port = match port.node_port.filter(|_| has_node_ports) {
            None | Some(0) => None,
            Some(n) => Some(
                u16::try_from(n)
                    .map_err(|_| format!("port {port_name:?} has invalid nodePort {n}"))?,
            ),
        };
        validated.push(ServicePort {
            name: super::interned::interned(&port_name),
            port: number,
            protocol,
            node_port,
        });
    }
    let affinity_timeout_s = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let timeout = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S);
            if !(1..=MAX_AFFINITY_TIMEOUT_S).contains(&timeout) {
                return Err(Rejection::invalid(format!(
                    "sessionAffinity timeoutSeconds {timeout} is outside 1..={MAX_AFFINITY_TIMEOUT_S}"
                )));
            }
            u32::try_from(timeout).ok()
        }
        Some(other) => {
            return Err(Rejection::invalid(format!(
                "unknown sessionAffinity {other:?}"
            )));
        }
    };
    let external_ips = ipv4_addresses(spec.external_ips.as_deref().unwrap_or(&[]), "externalIP")?;
    let load_balancer_ips = if service_type == "LoadBalancer" {
        load_balancer_ips(service)?
    } else {
        Vec::new()
    };
    let external_traffic_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = match spec.health_check_node_port {
        Some(port) if external_traffic_local && service_type == "LoadBalancer" => Some(
            u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("healthCheckNodePort {port} is not a port"))?,
        ),
        _ => None,
    };
    let source_ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or(&[])
        .iter()
        .filter_map(|cidr| parse_source_range(cidr).transpose())
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Classified::Proxied(ServiceSpec {
        cluster_ips,
        ports: validated,
        internal_traffic_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_timeout_s,
        external_ips,
        load_balancer_ips,
        external_traffic_local,
        health_check_node_port,
        source_ranges,
    }))
}

/// The IPv4 addresses of a list (IPv6 ones wait for the IPv6 datapath).
fn ipv4_addresses(addresses: &[String], what: &str) -> Result<Vec<Ipv4Addr>, String> {
    let mut out = Vec::new();
    for address in addresses {
        match address.parse::<IpAddr>() {
            Ok(IpAddr::V4(v4)) if v4.is_unspecified() || v4.is_broadcast() => {
                return Err(format!("{what} {address} is not a usable address"));
            }
            Ok(IpAddr::V4(v4)) => out.push(v4),
            Ok(IpAddr::V6(_)) => {}
            Err(_) => return Err(format!("{what} {address:?} is not an IP address")),
        }
    }
    Ok(out)
}

fn load_balancer_ips(service: &Service) -> Result<Vec<Ipv4Addr>, String> {
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or(&[]);
    let addresses: Vec<String> = ingress
        .iter()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.clone())
        .collect();
    ipv4_addresses(&addresses, "load-balancer ingress IP")
}

/// An IPv4 CIDR of loadBalancerSourceRanges; `None` for IPv6 ones.
fn parse_source_range(cidr: &str) -> Result<Option<SourceRange>, String> {
    SourceRange::parse(cidr)
        .map_err(|_| format!("loadBalancerSourceRanges entry {cidr:?} is not a CIDR"))
}
