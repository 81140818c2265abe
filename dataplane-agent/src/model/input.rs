//! The cluster as the model reads it: each Kubernetes object reduced, as
//! it arrives, to the few fields kube-proxy's rules look at. The objects
//! themselves are not kept: a 50,000-Service cluster's EndpointSlices are
//! over a gigabyte as `k8s_openapi` values and tens of megabytes as these
//! records.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::{Endpoint, EndpointSlice},
};

use super::{
    ObjectName, SourceRange,
    service::{self, Classified, HEADLESS_LABEL, Protocol, Rejection, SERVICE_PROXY_NAME_LABEL},
};

/// The label kube-proxy uses to find the Service an EndpointSlice belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The annotation the EndpointSlice controller sets to when the change that
/// produced a slice happened; kube-proxy measures programming latency from it.
const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// The well-known label kube-proxy reads a node's zone from.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The taint the cluster autoscaler puts on a node it is about to remove.
const AUTOSCALER_DELETION_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// A Service, validated: what kube-proxy would proxy, or why it cannot.
/// Shared, not copied, between a source's bookkeeping and the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRecord(Arc<Result<Classified, Rejection>>);

impl ServiceRecord {
    pub fn new(name: &ObjectName, service: &Service) -> Self {
        Self(Arc::new(service::classify(name, service)))
    }

    pub(super) fn classified(&self) -> &Result<Classified, Rejection> {
        &self.0
    }
}

/// Which Service an EndpointSlice serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum SliceOwner {
    Service(ObjectName),
    /// Not ours (a headless Service's, another proxy's, the IPv6 slice of
    /// a dual-stack Service until the IPv6 datapath exists): no report.
    Ignored,
    /// Cannot belong to any Service; the reason is reported.
    Invalid(String),
}

/// A port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct SlicePort {
    /// Interned, as the Service's port names.
    pub name: Arc<str>,
    /// None for a protocol kube-proxy does not know.
    pub protocol: Option<Protocol>,
    /// None for a missing or out-of-range number.
    pub port: Option<u16>,
}

/// An endpoint of an EndpointSlice with its conditions resolved as the API
/// documents them (a nil ready or serving means true, nil terminating
/// false). Kept small: a large cluster holds millions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct EndpointRecord {
    /// The first address, when it is IPv4.
    pub ip: Option<Ipv4Addr>,
    /// Shared with every other endpoint on that node.
    pub node_name: Option<Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    hints: Option<Box<Hints>>,
}

/// Topology hints of an endpoint (most have none).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Hints {
    zones: Vec<String>,
    nodes: Vec<String>,
}

impl EndpointRecord {
    pub(super) fn zone_hints(&self) -> &[String] {
        self.hints.as_ref().map_or(&[], |h| &h.zones)
    }

    pub(super) fn node_hints(&self) -> &[String] {
        self.hints.as_ref().map_or(&[], |h| &h.nodes)
    }
}

/// An EndpointSlice. Shared, not copied, between a source's bookkeeping
/// and the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord(Arc<SliceData>);

impl std::ops::Deref for SliceRecord {
    type Target = SliceData;

    fn deref(&self) -> &SliceData {
        &self.0
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct SliceData {
    pub(super) owner: SliceOwner,
    /// What is wrong with some of its endpoints (they are left out).
    pub(super) problems: Vec<String>,
    pub(super) ports: Vec<SlicePort>,
    pub(super) endpoints: Vec<EndpointRecord>,
    /// The last-change-trigger-time annotation.
    pub trigger_time: Option<String>,
}

impl SliceRecord {
    pub fn new(slice: &EndpointSlice) -> Self {
        let labels = slice.metadata.labels.as_ref();
        let namespace = slice.metadata.namespace.as_deref().unwrap_or("default");
        let mut problems = Vec::new();
        let owner = if labels.is_some_and(|l| {
            l.contains_key(HEADLESS_LABEL) || l.contains_key(SERVICE_PROXY_NAME_LABEL)
        }) {
            SliceOwner::Ignored
        } else {
            match (
                labels.and_then(|l| l.get(SERVICE_NAME_LABEL)),
                slice.address_type.as_str(),
            ) {
                (None, _) => SliceOwner::Invalid(format!("has no {SERVICE_NAME_LABEL} label")),
                (Some(service), "IPv4") => {
                    for endpoint in &slice.endpoints {
                        match endpoint.addresses.first() {
                            Some(address) if address.parse::<Ipv4Addr>().is_ok() => {}
                            Some(address) => problems.push(format!(
                                "endpoint address {address:?} is not an IPv4 address"
                            )),
                            None => problems.push("an endpoint has no address".into()),
                        }
                    }
                    SliceOwner::Service(ObjectName::new(namespace, service.clone()))
                }
                // Dual-stack clusters carry an IPv6 slice beside every IPv4
                // one; that is normal, not an error, until the IPv6
                // datapath exists. FQDN slices are for controllers of their
                // own, never for a proxy: kube-proxy passes over them
                // without a word too.
                (Some(_), "IPv6" | "FQDN") => SliceOwner::Ignored,
                (Some(_), other) => {
                    SliceOwner::Invalid(format!("addressType {other:?} is not supported"))
                }
            }
        };
        let serves = matches!(owner, SliceOwner::Service(_));
        Self(Arc::new(SliceData {
            owner,
            problems,
            ports: if serves {
                slice
                    .ports
                    .iter()
                    .flatten()
                    .map(|port| SlicePort {
                        name: super::interned::interned(port.name.as_deref().unwrap_or_default()),
                        protocol: Protocol::parse(port.protocol.as_deref()).ok(),
                        port: port
                            .port
                            .and_then(|p| u16::try_from(p).ok())
                            .filter(|p| *p != 0),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            endpoints: if serves {
                slice.endpoints.iter().map(EndpointRecord::new).collect()
            } else {
                Vec::new()
            },
            trigger_time: slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
                .cloned(),
        }))
    }

    /// The Service this slice serves, if any.
    pub fn service(&self) -> Option<&ObjectName> {
        match &self.owner {
            SliceOwner::Service(name) => Some(name),
            SliceOwner::Ignored | SliceOwner::Invalid(_) => None,
        }
    }

    /// Not for this proxy: a headless Service's, another proxy's, an FQDN
    /// or (until the IPv6 datapath) IPv6 slice.
    pub fn is_ignored(&self) -> bool {
        matches!(self.owner, SliceOwner::Ignored)
    }
}

impl EndpointRecord {
    fn new(endpoint: &Endpoint) -> Self {
        let conditions = endpoint.conditions.as_ref();
        let ready = conditions.and_then(|c| c.ready);
        let hints = endpoint.hints.as_ref();
        let zones: Vec<String> = hints
            .and_then(|h| h.for_zones.as_ref())
            .map(|zones| zones.iter().map(|z| z.name.clone()).collect())
            .unwrap_or_default();
        let nodes: Vec<String> = hints
            .and_then(|h| h.for_nodes.as_ref())
            .map(|nodes| nodes.iter().map(|n| n.name.clone()).collect())
            .unwrap_or_default();
        Self {
            ip: endpoint
                .addresses
                .first()
                .and_then(|a| a.parse::<Ipv4Addr>().ok()),
            node_name: endpoint.node_name.as_deref().map(super::interned::interned),
            ready: ready.unwrap_or(true),
            serving: conditions.and_then(|c| c.serving).or(ready).unwrap_or(true),
            terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
            hints: (!zones.is_empty() || !nodes.is_empty())
                .then(|| Box::new(Hints { zones, nodes })),
        }
    }
}

/// A Node: what this node's agent needs of its own Node object (zone,
/// whether it is going away) and of every other (the tunnel's address).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeRecord {
    pub zone: Option<String>,
    /// Being deleted (deletionTimestamp) or drained by the cluster
    /// autoscaler: kube-proxy then fails /healthz (KEP-3836).
    pub being_deleted: bool,
    /// The first IPv4 InternalIP.
    pub internal_ip: Option<Ipv4Addr>,
    /// `spec.podCIDRs` (IPv4): where this node's pods' addresses come from.
    pub pod_cidrs: Vec<SourceRange>,
}

impl NodeRecord {
    pub fn new(node: &Node) -> Self {
        Self {
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|labels| labels.get(ZONE_LABEL))
                .cloned(),
            being_deleted: node.metadata.deletion_timestamp.is_some()
                || node
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.taints.as_ref())
                    .is_some_and(|taints| {
                        taints.iter().any(|t| t.key == AUTOSCALER_DELETION_TAINT)
                    }),
            internal_ip: node
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|addresses| {
                    addresses
                        .iter()
                        .filter(|a| a.type_ == "InternalIP")
                        .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
                }),
            pod_cidrs: pod_cidrs(node),
        }
    }
}

/// A Node's IPv4 `spec.podCIDRs` (or the older single `podCIDR`); ones
/// that do not parse are left out, as the node IPAM never writes them.
fn pod_cidrs(node: &Node) -> Vec<SourceRange> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    let listed = match (&spec.pod_cidrs, &spec.pod_cidr) {
        (Some(cidrs), _) if !cidrs.is_empty() => cidrs.clone(),
        (_, Some(cidr)) => vec![cidr.clone()],
        _ => Vec::new(),
    };
    listed
        .iter()
        .filter_map(|cidr| SourceRange::parse(cidr).ok().flatten())
        .collect()
}

/// Everything the sources know about the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterState {
    pub services: BTreeMap<ObjectName, ServiceRecord>,
    pub endpoint_slices: BTreeMap<ObjectName, SliceRecord>,
    pub nodes: BTreeMap<String, NodeRecord>,
}

impl ClusterState {
    /// Adds (or replaces) the record of a Kubernetes Service.
    pub fn insert_service(&mut self, service: &Service) {
        let name = ObjectName::of(&service.metadata);
        let record = ServiceRecord::new(&name, service);
        self.services.insert(name, record);
    }

    pub fn insert_slice(&mut self, slice: &EndpointSlice) {
        self.endpoint_slices
            .insert(ObjectName::of(&slice.metadata), SliceRecord::new(slice));
    }

    pub fn insert_node(&mut self, node: &Node) {
        self.nodes.insert(
            node.metadata.name.clone().unwrap_or_default(),
            NodeRecord::new(node),
        );
    }
}
