//! PURE: cluster state -> the dataplane entries this node should have.
//!
//! No I/O, no clocks, no BPF. Everything kube-proxy decides about which
//! endpoint may serve which Service frontend is decided here and tested in
//! tables, so the dataplane only has to copy the result into maps.

mod endpoints;
mod incremental;
mod input;
mod interned;
pub mod maglev;
mod service;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

pub use incremental::{ChangeTally, Model, Recomputed, SyncedService, Update};
pub use input::{ClusterState, NodeRecord, ServiceRecord, SliceRecord};
pub use service::Protocol;

/// `namespace/name` of a Kubernetes object. Cheap to clone: the model
/// keeps each name in several indexes, for every object of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectName {
    pub fn new(namespace: impl AsRef<str>, name: impl Into<String>) -> Self {
        Self {
            // A cluster has few namespaces and many objects in each.
            namespace: interned::interned(namespace.as_ref()),
            name: Arc::from(name.into()),
        }
    }

    /// The object's name from its metadata; `default` namespace when unset,
    /// as the API server would fill it in.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self::new(
            meta.namespace.as_deref().unwrap_or("default"),
            meta.name.as_deref().unwrap_or(""),
        )
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Facts about the node this agent programs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `topology.kubernetes.io/zone` of this node's Node object.
    pub zone: Option<String>,
    /// The Node is being deleted (deletionTimestamp) or drained by the
    /// cluster autoscaler: kube-proxy then fails /healthz (KEP-3836).
    pub being_deleted: bool,
    /// The node's InternalIP: the address other nodes tunnel to.
    pub internal_ip: Option<Ipv4Addr>,
}

impl NodeInfo {
    /// This node as the cluster state describes it (its zone from its Node
    /// object, if there is one).
    pub fn from_cluster(cluster: &ClusterState, name: &str) -> Self {
        let node = cluster.nodes.get(name).cloned().unwrap_or_default();
        Self {
            name: name.to_owned(),
            zone: node.zone,
            being_deleted: node.being_deleted,
            internal_ip: node.internal_ip,
        }
    }
}

/// Which traffic a frontend entry serves (see `dataplane_common::SCOPE_*`):
/// the same address can have different backends for traffic from inside
/// the cluster and from outside (externalTrafficPolicy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Connections made on this node (socket LB): ClusterIPs, and the
    /// in-cluster view of externalIPs and load-balancer IPs.
    Cluster,
    /// Packets from outside to an externalIP or load-balancer IP.
    External,
    /// Packets from outside to a nodePort on any node address (ip 0.0.0.0).
    NodePort,
    /// Connections made on this node to a nodePort on one of its own
    /// addresses (ip 0.0.0.0).
    NodePortLocal,
}

impl Scope {
    pub fn number(self) -> u8 {
        match self {
            Self::Cluster => dataplane_common::SCOPE_CLUSTER,
            Self::External => dataplane_common::SCOPE_EXTERNAL,
            Self::NodePort => dataplane_common::SCOPE_NODEPORT,
            Self::NodePortLocal => dataplane_common::SCOPE_NODEPORT_LOCAL,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        [
            Self::Cluster,
            Self::External,
            Self::NodePort,
            Self::NodePortLocal,
        ]
        .into_iter()
        .find(|s| s.number() == number)
    }
}

/// One (virtual IP, port, protocol) a Service listens on, for one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    /// A frontend for traffic started on this node (a ClusterIP).
    pub fn cluster(ip: Ipv4Addr, port: u16, protocol: Protocol) -> Self {
        Self {
            ip,
            port,
            protocol,
            scope: Scope::Cluster,
        }
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)?;
        match self.scope {
            Scope::Cluster => Ok(()),
            Scope::External => f.write_str(" external"),
            Scope::NodePort => f.write_str(" nodePort"),
            Scope::NodePortLocal => f.write_str(" nodePort local"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// The backend's node address, when the backend runs on another node
    /// with a known InternalIP: external traffic is tunnelled (or SNATed)
    /// there. `None` for local backends and for endpoints of unknown nodes
    /// (reached through this node's routing).
    pub remote_node: Option<Ipv4Addr>,
}

impl Backend {
    /// A backend reached by this node's routing.
    pub fn routed(ip: Ipv4Addr, port: u16) -> Self {
        Self {
            ip,
            port,
            remote_node: None,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)?;
        match self.remote_node {
            Some(node) => write!(f, " via {node}"),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a CIDR")]
pub struct NotACidr;

/// An IPv4 prefix of loadBalancerSourceRanges (or of
/// --nodeport-addresses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
}

impl SourceRange {
    /// A CIDR as Go's net.ParseCIDR reads it (host bits ignored); None for
    /// an IPv6 one, which the IPv4 datapath has no use for yet.
    pub fn parse(cidr: &str) -> Result<Option<Self>, NotACidr> {
        let (ip, prefix_len) = cidr.trim().split_once('/').ok_or(NotACidr)?;
        let prefix_len: u8 = prefix_len.parse().map_err(|_| NotACidr)?;
        match ip.parse::<std::net::IpAddr>().map_err(|_| NotACidr)? {
            std::net::IpAddr::V4(ip) if prefix_len <= 32 => Ok(Some(Self {
                ip: Ipv4Addr::from(u32::from(ip) & Self::mask(prefix_len)),
                prefix_len,
            })),
            std::net::IpAddr::V4(_) => Err(NotACidr),
            std::net::IpAddr::V6(_) if prefix_len <= 128 => Ok(None),
            std::net::IpAddr::V6(_) => Err(NotACidr),
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask(self.prefix_len) == u32::from(self.ip)
    }

    fn mask(prefix_len: u8) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len.min(32)))
            .unwrap_or(0)
    }

    pub const MIN: Self = Self {
        ip: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
    };
    pub const MAX: Self = Self {
        ip: Ipv4Addr::BROADCAST,
        prefix_len: u8::MAX,
    };
}

impl fmt::Display for SourceRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix_len)
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    pub service: ObjectName,
    /// The Service port's name ("" when unnamed), for operators.
    pub port_name: Arc<str>,
    /// Sorted and de-duplicated. Empty means connections are refused (or
    /// dropped, see `drop_without_backends`).
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` with this timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
    /// loadBalancerSourceRanges (load-balancer IPs, external scope only);
    /// empty means every source is allowed.
    pub source_ranges: Vec<SourceRange>,
    /// externalTrafficPolicy Local without a local endpoint while the
    /// Service has endpoints elsewhere: drop, as kube-proxy does, rather
    /// than reject.
    pub drop_without_backends: bool,
}

/// A healthCheckNodePort this node serves: kube-proxy's answer for an
/// externalTrafficPolicy Local load balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ObjectName,
    /// Endpoints of the Service on this node that serve external traffic.
    pub local_endpoints: usize,
}

/// An object the model could not use, with the reason, for one log line and
/// one counter increment in the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub kind: &'static str,
    pub object: ObjectName,
    pub category: SkipReason,
    pub reason: String,
}

/// Why an object (or a part of one) is not served, as the `reason` label
/// of `dataplane_objects_skipped`: a fixed set, so the series stay few
/// whatever the cluster holds; the log line has the details.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SkipReason {
    /// Breaks the API's rules: a bad address or port, a missing label.
    Invalid,
    /// IPv6 only: served once the IPv6 datapath exists.
    UnsupportedIpFamily,
    /// An SCTP port (the Service's other ports are served).
    UnsupportedProtocol,
    /// A frontend another Service owns (the first in name order keeps it).
    FrontendConflict,
    /// An EndpointSlice whose Service does not exist.
    UnknownService,
}

impl SkipReason {
    pub const ALL: [Self; 5] = [
        Self::Invalid,
        Self::UnsupportedIpFamily,
        Self::UnsupportedProtocol,
        Self::FrontendConflict,
        Self::UnknownService,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::UnsupportedIpFamily => "unsupported_ip_family",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::FrontendConflict => "frontend_conflict",
            Self::UnknownService => "unknown_service",
        }
    }
}

/// How many objects are skipped, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkipCounts([usize; SkipReason::ALL.len()]);

impl SkipCounts {
    pub fn get(&self, reason: SkipReason) -> usize {
        self.0[reason as usize]
    }

    pub fn total(&self) -> usize {
        self.0.iter().sum()
    }

    fn add(&mut self, reason: SkipReason, count: usize) {
        self.0[reason as usize] += count;
    }

    fn remove(&mut self, reason: SkipReason, count: usize) {
        let slot = &mut self.0[reason as usize];
        debug_assert!(*slot >= count);
        *slot = slot.saturating_sub(count);
    }
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.reason)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredDataplane {
    pub frontends: BTreeMap<Frontend, FrontendEntry>,
    /// healthCheckNodePort -> what it reports.
    pub health_checks: BTreeMap<u16, HealthCheck>,
    /// The InternalIPs of the cluster's nodes: the tunnel's peers.
    pub node_addresses: BTreeSet<Ipv4Addr>,
    pub skipped: Vec<Skipped>,
    pub no_local_endpoints: NoLocalEndpoints,
}

/// What one Service (with its EndpointSlices) asks of this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ServiceOutput {
    /// In the order they were derived; a frontend appears once.
    frontends: Vec<(Frontend, FrontendEntry)>,
    /// Boxed: few Services have one, and every Service's output is kept.
    health_check: Option<Box<(u16, HealthCheck)>>,
    /// What is wrong with the Service or with its slices' link to it.
    skipped: Vec<Skipped>,
    no_local_endpoints: NoLocalEndpoints,
}

/// Service ports with a Local traffic policy whose endpoints are all on
/// other nodes: kube-proxy's `sync_proxy_rules_no_local_endpoints_total`.
/// Such a port is not broken (other nodes serve it) but this node cannot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoLocalEndpoints {
    /// internalTrafficPolicy Local: in-cluster clients on this node are
    /// refused.
    pub internal: usize,
    /// externalTrafficPolicy Local: external traffic arriving here is
    /// dropped (the load balancer's health check steers it elsewhere).
    pub external: usize,
}

impl NoLocalEndpoints {
    fn add(&mut self, other: Self) {
        self.internal += other.internal;
        self.external += other.external;
    }

    fn remove(&mut self, other: Self) {
        debug_assert!(self.internal >= other.internal && self.external >= other.external);
        self.internal = self.internal.saturating_sub(other.internal);
        self.external = self.external.saturating_sub(other.external);
    }
}

impl ServiceOutput {
    fn is_empty(&self) -> bool {
        self.frontends.is_empty()
            && self.health_check.is_none()
            && self.skipped.is_empty()
            && self.no_local_endpoints == NoLocalEndpoints::default()
    }

    fn entry(&self, frontend: &Frontend) -> Option<&FrontendEntry> {
        self.frontends
            .iter()
            .find(|(f, _)| f == frontend)
            .map(|(_, entry)| entry)
    }
}

/// The problems of an EndpointSlice that do not depend on its Service.
fn slice_problems(name: &ObjectName, slice: &SliceRecord) -> Vec<Skipped> {
    let skip = |reason: &String| Skipped {
        kind: "EndpointSlice",
        object: name.clone(),
        category: SkipReason::Invalid,
        reason: reason.clone(),
    };
    match &slice.owner {
        input::SliceOwner::Invalid(reason) => vec![skip(reason)],
        input::SliceOwner::Service(_) => slice.problems.iter().map(skip).collect(),
        input::SliceOwner::Ignored => Vec::new(),
    }
}

/// Computes this node's desired dataplane from the cluster state, all at
/// once: what [`Model`] keeps up to date change by change.
pub fn desired(cluster: &ClusterState, node: &NodeInfo) -> DesiredDataplane {
    let mut out = DesiredDataplane::default();
    let mut slices_by_service: BTreeMap<&ObjectName, Vec<(&ObjectName, &SliceRecord)>> =
        BTreeMap::new();
    for (name, slice) in &cluster.endpoint_slices {
        out.skipped.extend(slice_problems(name, slice));
        match slice.service() {
            Some(service) if cluster.services.contains_key(service) => slices_by_service
                .entry(service)
                .or_default()
                .push((name, slice)),
            Some(service) => out.skipped.push(unknown_service(name, service)),
            None => {}
        }
    }
    let addresses = node_addresses(cluster);
    let nodes = endpoints::Nodes {
        this: node,
        addresses: &addresses,
    };
    out.node_addresses = addresses.values().copied().collect();
    for (name, service) in &cluster.services {
        let slices = slices_by_service
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let output = service_output(name, Some(service), slices, &nodes);
        out.skipped.extend(output.skipped);
        out.no_local_endpoints.add(output.no_local_endpoints);
        for (frontend, entry) in output.frontends {
            insert_frontend(&mut out, name, frontend, entry);
        }
        if let Some((port, check)) = output.health_check.map(|boxed| *boxed) {
            out.health_checks.insert(port, check);
        }
    }
    out
}

fn unknown_service(slice: &ObjectName, service: &ObjectName) -> Skipped {
    Skipped {
        kind: "EndpointSlice",
        object: slice.clone(),
        category: SkipReason::UnknownService,
        reason: format!("its Service {service} is unknown"),
    }
}

/// What one Service asks of this node. `service` is None when only its
/// slices are known (they are reported then).
fn service_output(
    name: &ObjectName,
    service: Option<&ServiceRecord>,
    slices: &[(&ObjectName, &SliceRecord)],
    nodes: &endpoints::Nodes,
) -> ServiceOutput {
    let mut out = ServiceOutput::default();
    let Some(service) = service else {
        for (slice_name, _) in slices {
            out.skipped.push(unknown_service(slice_name, name));
        }
        return out;
    };
    let spec = match service.classified() {
        Ok(service::Classified::Proxied(spec)) => spec,
        Ok(service::Classified::Ignored) => return out,
        Err(rejection) => {
            out.skipped.push(Skipped {
                kind: "Service",
                object: name.clone(),
                category: rejection.category,
                reason: rejection.reason.clone(),
            });
            return out;
        }
    };
    let slices: Vec<&SliceRecord> = slices.iter().map(|(_, slice)| *slice).collect();
    let mut local_endpoint_ips = BTreeSet::new();
    for port in &spec.ports {
        if port.protocol == Protocol::Sctp {
            out.skipped.push(Skipped {
                kind: "Service",
                object: name.clone(),
                category: SkipReason::UnsupportedProtocol,
                reason: format!(
                    "port {}/SCTP is not load-balanced yet (its other ports are)",
                    port.port
                ),
            });
            continue;
        }
        let views = endpoints::views_for_port(port, spec, &slices, nodes);
        local_endpoint_ips.extend(views.external.iter().map(|b| b.ip));
        let frontends = frontends_of_port(spec, port, &views);
        let elsewhere_only = |local: &[Backend]| local.is_empty() && !views.cluster.is_empty();
        if spec.internal_traffic_local && elsewhere_only(&views.internal) {
            out.no_local_endpoints.internal += 1;
        }
        if spec.external_traffic_local
            && elsewhere_only(&views.external)
            && frontends.iter().any(|(f, _, _)| f.scope != Scope::Cluster)
        {
            out.no_local_endpoints.external += 1;
        }
        for (frontend, backends, view_of) in frontends {
            if out.frontends.iter().any(|(f, _)| *f == frontend) {
                continue;
            }
            let entry = FrontendEntry {
                service: name.clone(),
                port_name: port.name.clone(),
                backends: backends.to_vec(),
                affinity_timeout_s: spec.affinity_timeout_s,
                // Socket LB does not check them: in-cluster clients of
                // a load-balancer IP are not filtered, as the ranges are
                // about the load balancer's clients.
                source_ranges: if view_of == View::LoadBalancer && frontend.scope == Scope::External
                {
                    spec.source_ranges.clone()
                } else {
                    Vec::new()
                },
                drop_without_backends: frontend.scope != Scope::Cluster
                    && frontend.scope != Scope::NodePortLocal
                    && spec.external_traffic_local
                    && views.external.is_empty()
                    && !views.cluster.is_empty(),
            };
            out.frontends.push((frontend, entry));
        }
    }
    if spec.external_traffic_local
        && let Some(port) = spec.health_check_node_port
    {
        out.health_check = Some(Box::new((
            port,
            HealthCheck {
                service: name.clone(),
                local_endpoints: local_endpoint_ips.len(),
            },
        )));
    }
    // Kept for as long as the Service lives, for every Service: no spare
    // capacity (a first push reserves room for four).
    out.frontends.shrink_to_fit();
    out.skipped.shrink_to_fit();
    out
}

/// Which address family of a Service a frontend comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    ClusterIp,
    ExternalIp,
    LoadBalancer,
    NodePort,
}

/// Every frontend of one Service port, with the backends it balances over:
/// ClusterIPs by internalTrafficPolicy; externalIPs, load-balancer IPs and
/// nodePorts by externalTrafficPolicy for traffic from outside and over
/// all endpoints for traffic from this node (kube-proxy short-circuits
/// in-cluster clients of external addresses to the cluster endpoints).
fn frontends_of_port<'a>(
    spec: &service::ServiceSpec,
    port: &service::ServicePort,
    views: &'a endpoints::Views,
) -> Vec<(Frontend, &'a [Backend], View)> {
    let at = |ip: Ipv4Addr, scope: Scope| Frontend {
        ip,
        port: port.port,
        protocol: port.protocol,
        scope,
    };
    let mut out = Vec::new();
    for ip in &spec.cluster_ips {
        out.push((
            at(*ip, Scope::Cluster),
            views.internal.as_slice(),
            View::ClusterIp,
        ));
    }
    for (ips, view) in [
        (&spec.external_ips, View::ExternalIp),
        (&spec.load_balancer_ips, View::LoadBalancer),
    ] {
        for ip in ips {
            out.push((at(*ip, Scope::Cluster), views.cluster.as_slice(), view));
            out.push((at(*ip, Scope::External), views.external.as_slice(), view));
        }
    }
    if let Some(node_port) = port.node_port {
        let at_node_port = |scope| Frontend {
            ip: Ipv4Addr::UNSPECIFIED,
            port: node_port,
            protocol: port.protocol,
            scope,
        };
        out.push((
            at_node_port(Scope::NodePort),
            views.external.as_slice(),
            View::NodePort,
        ));
        out.push((
            at_node_port(Scope::NodePortLocal),
            views.cluster.as_slice(),
            View::NodePort,
        ));
    }
    out
}

/// Adds a frontend unless another Service already has it (the first one,
/// in name order, keeps it; the conflict is reported).
fn insert_frontend(
    out: &mut DesiredDataplane,
    name: &ObjectName,
    frontend: Frontend,
    entry: FrontendEntry,
) {
    if let Some(existing) = out.frontends.get(&frontend) {
        if existing.service != *name {
            out.skipped.push(Skipped {
                kind: "Service",
                object: name.clone(),
                category: SkipReason::FrontendConflict,
                reason: format!(
                    "frontend {frontend} is already used by Service {}",
                    existing.service
                ),
            });
        }
        return;
    }
    out.frontends.insert(frontend, entry);
}

/// The InternalIP (IPv4) of every Node that has one.
fn node_addresses(cluster: &ClusterState) -> BTreeMap<String, Ipv4Addr> {
    cluster
        .nodes
        .iter()
        .filter_map(|(name, node)| Some((name.clone(), node.internal_ip?)))
        .collect()
}

/// Every node's IPv4 pod CIDRs with the node's InternalIP: the interface
/// programs tell from it that a client is a pod of a backend's node.
pub fn pod_cidrs(cluster: &ClusterState) -> BTreeMap<SourceRange, Ipv4Addr> {
    cluster
        .nodes
        .values()
        .filter_map(|node| Some((node.internal_ip?, &node.pod_cidrs)))
        .flat_map(|(ip, cidrs)| cidrs.iter().map(move |cidr| (*cidr, ip)))
        .collect()
}

/// A distinct set of the Services the desired state programs, for logs.
pub fn services_of(desired: &DesiredDataplane) -> BTreeSet<&ObjectName> {
    desired
        .frontends
        .values()
        .map(|entry| &entry.service)
        .collect()
}

#[cfg(test)]
pub(crate) mod fixtures;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod external_tests;
