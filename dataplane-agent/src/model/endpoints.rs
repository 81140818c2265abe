//! Which endpoints may serve a Service port on this node, as kube-proxy's
//! `CategorizeEndpoints` decides (pkg/proxy/topology.go).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::{
    Backend, NodeInfo,
    input::{EndpointRecord, SliceRecord},
    service::{ServicePort, ServiceSpec},
};

/// An endpoint address with the port that serves one Service port.
#[derive(Debug)]
struct Candidate<'a> {
    backend: Backend,
    endpoint: &'a EndpointRecord,
}

/// This node, and the addresses of the cluster's nodes (to reach backends
/// on other nodes).
pub(super) struct Nodes<'a> {
    pub this: &'a NodeInfo,
    pub addresses: &'a BTreeMap<String, Ipv4Addr>,
}

/// The backends of one Service port, for each kind of traffic.
#[derive(Debug, Default)]
pub(super) struct Views {
    /// ClusterIP traffic: by internalTrafficPolicy.
    pub internal: Vec<Backend>,
    /// All endpoints that may serve (topology applies): in-cluster traffic
    /// to external addresses, and the "does the Service have endpoints at
    /// all" question.
    pub cluster: Vec<Backend>,
    /// Traffic from outside: by externalTrafficPolicy.
    pub external: Vec<Backend>,
}

pub(super) fn views_for_port(
    port: &ServicePort,
    spec: &ServiceSpec,
    slices: &[&SliceRecord],
    nodes: &Nodes,
) -> Views {
    let cluster = backends_for_port(port, slices, nodes, false);
    let local = || backends_for_port(port, slices, nodes, true);
    Views {
        internal: if spec.internal_traffic_local {
            local()
        } else {
            cluster.clone()
        },
        external: if spec.external_traffic_local {
            local()
        } else {
            cluster.clone()
        },
        cluster,
    }
}

/// The backends for one Service port: ready endpoints, or if there are none,
/// serving-and-terminating ones (kube-proxy's terminating fallback, KEP-1669);
/// never endpoints that are not serving. With `local_only` (a Local traffic
/// policy) only endpoints on this node count, and none means none (no
/// fallback to other nodes). Otherwise topology hints may narrow the ready
/// endpoints to this node's zone (or this node), see [`topology_filter`].
fn backends_for_port(
    port: &ServicePort,
    slices: &[&SliceRecord],
    nodes: &Nodes,
    local_only: bool,
) -> Vec<Backend> {
    let node = nodes.this;
    let candidates: Vec<Candidate> = slices
        .iter()
        .filter_map(|slice| Some((slice, endpoint_port_for(slice, port)?)))
        .flat_map(|(slice, target_port)| {
            slice.endpoints.iter().filter_map(move |endpoint| {
                let ip = endpoint.ip?;
                let endpoint_node = endpoint.node_name.as_deref();
                let remote_node = endpoint_node
                    .filter(|name| *name != node.name)
                    .and_then(|name| nodes.addresses.get(name).copied());
                Some(Candidate {
                    backend: Backend {
                        ip,
                        port: target_port,
                        remote_node,
                    },
                    endpoint,
                })
            })
        })
        .filter(|c| !local_only || c.endpoint.node_name.as_deref() == Some(node.name.as_str()))
        .collect();

    let topology = if local_only {
        TopologyFilter::None
    } else {
        topology_filter(&candidates, node)
    };
    let ready: BTreeSet<Backend> = candidates
        .iter()
        .filter(|c| is_ready(c.endpoint) && topology.admits(c.endpoint))
        .map(|c| c.backend)
        .collect();
    let chosen = if ready.is_empty() {
        candidates
            .iter()
            .filter(|c| is_serving(c.endpoint) && is_terminating(c.endpoint))
            .map(|c| c.backend)
            .collect()
    } else {
        ready
    };
    chosen.into_iter().collect()
}

/// How topology hints narrow the ready endpoints on this node.
#[derive(Debug, PartialEq, Eq)]
enum TopologyFilter<'a> {
    None,
    Zone(&'a str),
    Node(&'a str),
}

impl TopologyFilter<'_> {
    /// Whether the endpoint carries hints of this filter's kind at all.
    fn is_hinted(&self, endpoint: &EndpointRecord) -> bool {
        match self {
            Self::None => true,
            Self::Zone(_) => !endpoint.zone_hints().is_empty(),
            Self::Node(_) => !endpoint.node_hints().is_empty(),
        }
    }

    /// kube-proxy's rule for using hints: every ready endpoint has them
    /// and at least one names this node (or zone).
    fn applies_to(&self, ready: &[&EndpointRecord]) -> bool {
        ready.iter().all(|e| self.is_hinted(e)) && ready.iter().any(|e| self.admits(e))
    }

    fn admits(&self, endpoint: &EndpointRecord) -> bool {
        match self {
            Self::None => true,
            Self::Zone(zone) => endpoint.zone_hints().iter().any(|z| z == zone),
            Self::Node(node) => endpoint.node_hints().iter().any(|n| n == node),
        }
    }
}

/// kube-proxy's decision (pkg/proxy/topology.go, topologyModeFromHints):
/// hints are used only when every ready endpoint carries them, and only if
/// at least one names this node (forNodes, trafficDistribution
/// PreferSameNode) or this node's zone (forZones, PreferClose or the
/// topology-mode annotation); otherwise all endpoints serve. The
/// EndpointSlice controller writes the hints; the Service's
/// trafficDistribution itself is not consulted here, as in kube-proxy.
fn topology_filter<'a>(candidates: &[Candidate], node: &'a NodeInfo) -> TopologyFilter<'a> {
    let ready: Vec<&EndpointRecord> = candidates
        .iter()
        .filter(|c| is_ready(c.endpoint))
        .map(|c| c.endpoint)
        .collect();
    if ready.is_empty() {
        return TopologyFilter::None;
    }
    let node_filter = TopologyFilter::Node(&node.name);
    if node_filter.applies_to(&ready) {
        return node_filter;
    }
    match node.zone.as_deref().filter(|z| !z.is_empty()) {
        Some(zone) if TopologyFilter::Zone(zone).applies_to(&ready) => TopologyFilter::Zone(zone),
        _ => TopologyFilter::None,
    }
}

/// The port number an EndpointSlice gives for a Service port: the slice port
/// with the same name and protocol. This is how a named `targetPort` is
/// resolved: the EndpointSlice controller already did it per pod.
fn endpoint_port_for(slice: &SliceRecord, port: &ServicePort) -> Option<u16> {
    slice.ports.iter().find_map(|slice_port| {
        let same = slice_port.name == port.name && slice_port.protocol == Some(port.protocol);
        slice_port.port.filter(|_| same)
    })
}

fn is_ready(endpoint: &EndpointRecord) -> bool {
    endpoint.ready
}

fn is_serving(endpoint: &EndpointRecord) -> bool {
    endpoint.serving
}

fn is_terminating(endpoint: &EndpointRecord) -> bool {
    endpoint.terminating
}
