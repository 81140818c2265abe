//! Which endpoints may serve a Service port on this node, as kube-proxy's
//! `CategorizeEndpoints` decides (pkg/proxy/topology.go).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{
    Backend, NodeInfo,
    service::{Protocol, ServicePort, ServiceSpec},
};

/// An endpoint address with the port that serves one Service port.
#[derive(Debug)]
struct Candidate<'a> {
    backend: Backend,
    endpoint: &'a Endpoint,
}

/// This node, and the addresses of the cluster's nodes (to reach backends
/// on other nodes).
pub(super) struct Nodes<'a> {
    pub this: &'a NodeInfo,
    pub addresses: BTreeMap<&'a str, Ipv4Addr>,
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
    slices: &[&EndpointSlice],
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
    slices: &[&EndpointSlice],
    nodes: &Nodes,
    local_only: bool,
) -> Vec<Backend> {
    let node = nodes.this;
    let candidates: Vec<Candidate> = slices
        .iter()
        .filter_map(|slice| Some((slice, endpoint_port_for(slice, port)?)))
        .flat_map(|(slice, target_port)| {
            slice.endpoints.iter().filter_map(move |endpoint| {
                let ip = endpoint.addresses.first()?.parse::<Ipv4Addr>().ok()?;
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
    fn is_hinted(&self, endpoint: &Endpoint) -> bool {
        let hints = endpoint.hints.as_ref();
        match self {
            Self::None => true,
            Self::Zone(_) => hints
                .and_then(|h| h.for_zones.as_ref())
                .is_some_and(|zones| !zones.is_empty()),
            Self::Node(_) => hints
                .and_then(|h| h.for_nodes.as_ref())
                .is_some_and(|nodes| !nodes.is_empty()),
        }
    }

    /// kube-proxy's rule for using hints: every ready endpoint has them
    /// and at least one names this node (or zone).
    fn applies_to(&self, ready: &[&Endpoint]) -> bool {
        ready.iter().all(|e| self.is_hinted(e)) && ready.iter().any(|e| self.admits(e))
    }

    fn admits(&self, endpoint: &Endpoint) -> bool {
        let hints = endpoint.hints.as_ref();
        match self {
            Self::None => true,
            Self::Zone(zone) => hints
                .and_then(|h| h.for_zones.as_ref())
                .is_some_and(|zones| zones.iter().any(|z| z.name == *zone)),
            Self::Node(node) => hints
                .and_then(|h| h.for_nodes.as_ref())
                .is_some_and(|nodes| nodes.iter().any(|n| n.name == *node)),
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
    let ready: Vec<&Endpoint> = candidates
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
fn endpoint_port_for(slice: &EndpointSlice, port: &ServicePort) -> Option<u16> {
    slice.ports.as_deref()?.iter().find_map(|slice_port| {
        let same_name = slice_port.name.as_deref().unwrap_or("") == port.name;
        let same_protocol =
            Protocol::parse(slice_port.protocol.as_deref()).ok() == Some(port.protocol);
        let number = u16::try_from(slice_port.port?).ok().filter(|p| *p != 0)?;
        (same_name && same_protocol).then_some(number)
    })
}

// The API documents a nil condition as "unknown" and consumers treat nil
// ready and serving as true, nil terminating as false.
fn is_ready(endpoint: &Endpoint) -> bool {
    endpoint
        .conditions
        .as_ref()
        .and_then(|c| c.ready)
        .unwrap_or(true)
}

fn is_serving(endpoint: &Endpoint) -> bool {
    let conditions = endpoint.conditions.as_ref();
    conditions
        .and_then(|c| c.serving)
        .or_else(|| conditions.and_then(|c| c.ready))
        .unwrap_or(true)
}

fn is_terminating(endpoint: &Endpoint) -> bool {
    endpoint
        .conditions
        .as_ref()
        .and_then(|c| c.terminating)
        .unwrap_or(false)
}
