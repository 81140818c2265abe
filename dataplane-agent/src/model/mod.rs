//! PURE: cluster state -> the dataplane entries this node should have.
//!
//! No I/O, no clocks, no BPF. Everything kube-proxy decides about which
//! endpoint may serve which Service frontend is decided here and tested in
//! tables, so the dataplane only has to copy the result into maps.

mod endpoints;
mod service;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

pub use service::Protocol;

/// `namespace/name` of a Kubernetes object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl ObjectName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
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

/// Everything the sources know about the cluster, as Kubernetes objects.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectName, Service>,
    pub endpoint_slices: BTreeMap<ObjectName, EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
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
}

/// The taint the cluster autoscaler puts on a node it is about to remove.
const AUTOSCALER_DELETION_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The well-known label kube-proxy reads the node's zone from.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

impl NodeInfo {
    /// This node as the cluster state describes it (its zone from its Node
    /// object, if there is one).
    pub fn from_cluster(cluster: &ClusterState, name: &str) -> Self {
        let node = cluster.nodes.get(name);
        let zone = node
            .and_then(|node| node.metadata.labels.as_ref())
            .and_then(|labels| labels.get(ZONE_LABEL))
            .cloned();
        let being_deleted = node.is_some_and(|node| {
            node.metadata.deletion_timestamp.is_some()
                || node
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.taints.as_ref())
                    .is_some_and(|taints| taints.iter().any(|t| t.key == AUTOSCALER_DELETION_TAINT))
        });
        Self {
            name: name.to_owned(),
            zone,
            being_deleted,
        }
    }
}

/// One (virtual IP, port, protocol) a Service listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    pub service: ObjectName,
    /// The Service port's name ("" when unnamed), for operators.
    pub port_name: String,
    /// Sorted and de-duplicated. Empty means connections are refused.
    pub backends: Vec<Backend>,
    /// `sessionAffinity: ClientIP` with this timeout in seconds.
    pub affinity_timeout_s: Option<u32>,
}

/// An object the model could not use, with the reason, for one log line and
/// one counter increment in the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub kind: &'static str,
    pub object: ObjectName,
    pub reason: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.kind, self.object, self.reason)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredDataplane {
    pub frontends: BTreeMap<Frontend, FrontendEntry>,
    pub skipped: Vec<Skipped>,
}

/// The label kube-proxy uses to find the Service an EndpointSlice belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Computes this node's desired dataplane from the cluster state.
pub fn desired(cluster: &ClusterState, node: &NodeInfo) -> DesiredDataplane {
    let mut out = DesiredDataplane::default();
    let slices_by_service = group_slices(cluster, &mut out.skipped);

    for (name, service) in &cluster.services {
        let spec = match service::classify(name, service) {
            Ok(service::Classified::Proxied(spec)) => spec,
            Ok(service::Classified::Ignored) => continue,
            Err(reason) => {
                out.skipped.push(Skipped {
                    kind: "Service",
                    object: name.clone(),
                    reason,
                });
                continue;
            }
        };
        let slices = slices_by_service
            .get(name)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        for port in &spec.ports {
            if port.protocol == Protocol::Sctp {
                out.skipped.push(Skipped {
                    kind: "Service",
                    object: name.clone(),
                    reason: format!(
                        "port {}/SCTP is not load-balanced yet (its other ports are)",
                        port.port
                    ),
                });
                continue;
            }
            let backends = endpoints::backends_for_port(port, &spec, slices, node);
            for ip in &spec.cluster_ips {
                let frontend = Frontend {
                    ip: *ip,
                    port: port.port,
                    protocol: port.protocol,
                };
                if let Some(existing) = out.frontends.get(&frontend) {
                    out.skipped.push(Skipped {
                        kind: "Service",
                        object: name.clone(),
                        reason: format!(
                            "frontend {frontend} is already used by Service {}",
                            existing.service
                        ),
                    });
                    continue;
                }
                out.frontends.insert(
                    frontend,
                    FrontendEntry {
                        service: name.clone(),
                        port_name: port.name.clone(),
                        backends: backends.clone(),
                        affinity_timeout_s: spec.affinity_timeout_s,
                    },
                );
            }
        }
    }
    out
}

/// EndpointSlices grouped by the Service they belong to. Slices that cannot
/// belong to any proxied Service are reported, except those kube-proxy
/// ignores silently.
fn group_slices<'a>(
    cluster: &'a ClusterState,
    skipped: &mut Vec<Skipped>,
) -> BTreeMap<ObjectName, Vec<&'a EndpointSlice>> {
    let mut by_service: BTreeMap<ObjectName, Vec<&EndpointSlice>> = BTreeMap::new();
    let mut skip = |object: &ObjectName, reason: String| {
        skipped.push(Skipped {
            kind: "EndpointSlice",
            object: object.clone(),
            reason,
        })
    };
    for (name, slice) in &cluster.endpoint_slices {
        let labels = slice.metadata.labels.as_ref();
        if labels.is_some_and(|l| {
            l.contains_key(service::HEADLESS_LABEL)
                || l.contains_key(service::SERVICE_PROXY_NAME_LABEL)
        }) {
            continue;
        }
        let Some(service_name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            skip(name, format!("has no {SERVICE_NAME_LABEL} label"));
            continue;
        };
        let owner = ObjectName::new(name.namespace.clone(), service_name.clone());
        if !cluster.services.contains_key(&owner) {
            skip(name, format!("its Service {owner} is unknown"));
            continue;
        }
        match slice.address_type.as_str() {
            "IPv4" => {
                for endpoint in &slice.endpoints {
                    match endpoint.addresses.first() {
                        Some(address) if address.parse::<Ipv4Addr>().is_ok() => {}
                        Some(address) => skip(
                            name,
                            format!("endpoint address {address:?} is not an IPv4 address"),
                        ),
                        None => skip(name, "an endpoint has no address".into()),
                    }
                }
                by_service.entry(owner).or_default().push(slice)
            }
            // Dual-stack clusters carry an IPv6 slice beside every IPv4 one;
            // that is normal, not an error, until the IPv6 datapath exists.
            "IPv6" => {}
            other => skip(name, format!("addressType {other:?} is not supported")),
        }
    }
    by_service
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
