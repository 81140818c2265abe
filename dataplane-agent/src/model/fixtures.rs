//! Builders for the model's table tests: one line per object.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::ClusterState;

pub(crate) fn meta(name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some("default".into()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        }),
        ..Default::default()
    }
}

/// A ClusterIP Service with `(name, port, protocol)` ports.
pub(crate) fn service(name: &str, cluster_ip: &str, ports: &[(&str, i32, &str)]) -> Service {
    Service {
        metadata: meta(name, &[]),
        spec: Some(ServiceSpec {
            cluster_ip: Some(cluster_ip.into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(port_name, port, protocol)| ServicePort {
                        name: (!port_name.is_empty()).then(|| port_name.to_string()),
                        port: *port,
                        protocol: Some(protocol.to_string()),
                        target_port: Some(IntOrString::Int(*port)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[derive(Clone, Copy)]
pub(crate) struct Ep<'a> {
    pub ip: &'a str,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node: &'a str,
    pub zone_hints: &'a [&'a str],
    pub node_hints: &'a [&'a str],
}

pub(crate) const fn ready(ip: &str) -> Ep<'_> {
    Ep {
        ip,
        ready: Some(true),
        serving: Some(true),
        terminating: Some(false),
        node: "node-a",
        zone_hints: &[],
        node_hints: &[],
    }
}

pub(crate) const fn hinted<'a>(ep: Ep<'a>, zone_hints: &'a [&'a str]) -> Ep<'a> {
    Ep { zone_hints, ..ep }
}

pub(crate) const fn node_hinted<'a>(ep: Ep<'a>, node_hints: &'a [&'a str]) -> Ep<'a> {
    Ep { node_hints, ..ep }
}

/// A Node object with a zone label (or none).
pub(crate) fn node_object(name: &str, zone: Option<&str>) -> k8s_openapi::api::core::v1::Node {
    let labels: Vec<(&str, &str)> = zone
        .map(|z| vec![("topology.kubernetes.io/zone", z)])
        .unwrap_or_default();
    k8s_openapi::api::core::v1::Node {
        metadata: meta(name, &labels),
        ..Default::default()
    }
}

pub(crate) const fn not_ready(ip: &str) -> Ep<'_> {
    Ep {
        ready: Some(false),
        serving: Some(false),
        terminating: Some(false),
        ..ready(ip)
    }
}

pub(crate) const fn terminating_serving(ip: &str) -> Ep<'_> {
    Ep {
        ready: Some(false),
        serving: Some(true),
        terminating: Some(true),
        ..ready(ip)
    }
}

pub(crate) const fn terminating_not_serving(ip: &str) -> Ep<'_> {
    Ep {
        ready: Some(false),
        serving: Some(false),
        terminating: Some(true),
        ..ready(ip)
    }
}

pub(crate) const fn on_node<'a>(ep: Ep<'a>, node: &'a str) -> Ep<'a> {
    Ep { node, ..ep }
}

/// An IPv4 EndpointSlice of Service `service` with `(name, port, protocol)`
/// ports.
pub(crate) fn slice(
    name: &str,
    service: &str,
    ports: &[(&str, i32, &str)],
    endpoints: &[Ep],
) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(name, &[("kubernetes.io/service-name", service)]),
        address_type: "IPv4".into(),
        ports: Some(
            ports
                .iter()
                .map(|(port_name, port, protocol)| EndpointPort {
                    name: Some(port_name.to_string()),
                    port: Some(*port),
                    protocol: Some(protocol.to_string()),
                    ..Default::default()
                })
                .collect(),
        ),
        endpoints: endpoints
            .iter()
            .map(|ep| Endpoint {
                addresses: vec![ep.ip.into()],
                conditions: Some(EndpointConditions {
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                }),
                node_name: Some(ep.node.into()),
                hints: (!ep.zone_hints.is_empty() || !ep.node_hints.is_empty()).then(|| {
                    k8s_openapi::api::discovery::v1::EndpointHints {
                        for_zones: Some(
                            ep.zone_hints
                                .iter()
                                .map(|z| k8s_openapi::api::discovery::v1::ForZone {
                                    name: z.to_string(),
                                })
                                .collect(),
                        ),
                        for_nodes: Some(
                            ep.node_hints
                                .iter()
                                .map(|n| k8s_openapi::api::discovery::v1::ForNode {
                                    name: n.to_string(),
                                })
                                .collect(),
                        ),
                    }
                }),
                ..Default::default()
            })
            .collect(),
    }
}

pub(crate) fn cluster(services: Vec<Service>, slices: Vec<EndpointSlice>) -> ClusterState {
    let mut cluster = ClusterState::default();
    for service in &services {
        cluster.insert_service(service);
    }
    for slice in &slices {
        cluster.insert_slice(slice);
    }
    cluster
}
