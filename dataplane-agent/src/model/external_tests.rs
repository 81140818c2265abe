//! Frontends for traffic from outside the cluster: nodePorts, load-balancer
//! IPs and externalIPs, with kube-proxy's externalTrafficPolicy,
//! healthCheckNodePort and loadBalancerSourceRanges semantics.

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus, Service,
    ServiceSpec as ApiServiceSpec, ServiceStatus,
};

use super::{fixtures::*, *};

const THIS: &str = "node-a";
const OTHER: &str = "node-b";
const OTHER_IP: &str = "192.0.2.12";

fn this_node() -> NodeInfo {
    NodeInfo {
        name: THIS.into(),
        zone: None,
        being_deleted: false,
        internal_ip: None,
    }
}

fn node_with_ip(name: &str, ip: Option<&str>) -> Node {
    let mut node = node_object(name, None);
    node.status = ip.map(|ip| NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "Hostname".into(),
                address: name.into(),
            },
            NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            },
        ]),
        ..Default::default()
    });
    node
}

/// `web` (80/TCP -> 8080, nodePort 30080) of `service_type` with one
/// endpoint here (10.0.0.1) and one on node-b (10.0.1.1), both nodes known.
fn cluster_with(service: Service) -> ClusterState {
    let mut state = cluster(
        vec![service],
        vec![slice(
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[
                on_node(ready("10.0.0.1"), THIS),
                on_node(ready("10.0.1.1"), OTHER),
            ],
        )],
    );
    state.insert_node(&node_with_ip(THIS, Some("192.0.2.11")));
    state.insert_node(&node_with_ip(OTHER, Some(OTHER_IP)));
    state
}

fn web(
    service_type: &str,
    edit: impl FnOnce(&mut k8s_openapi::api::core::v1::ServiceSpec),
) -> Service {
    let mut web = service("web", "10.96.0.10", &[("http", 80, "TCP")]);
    let spec = web.spec.as_mut().unwrap();
    spec.type_ = Some(service_type.into());
    for port in spec.ports.as_mut().unwrap() {
        port.target_port =
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080));
        port.node_port = Some(30080);
    }
    edit(spec);
    web
}

fn with_lb_ingress(mut service: Service, ingress: Vec<LoadBalancerIngress>) -> Service {
    service.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(ingress),
        }),
        ..Default::default()
    });
    service
}

fn lb_ip(ip: &str) -> LoadBalancerIngress {
    LoadBalancerIngress {
        ip: Some(ip.into()),
        ..Default::default()
    }
}

fn rendered(desired: &DesiredDataplane) -> Vec<String> {
    desired
        .frontends
        .iter()
        .map(|(frontend, entry)| {
            let backends: Vec<String> = entry.backends.iter().map(ToString::to_string).collect();
            let mut line = format!("{frontend} -> [{}]", backends.join(", "));
            if entry.drop_without_backends {
                line += " drop";
            }
            if !entry.source_ranges.is_empty() {
                let ranges: Vec<String> = entry
                    .source_ranges
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                line += &format!(" from {}", ranges.join(","));
            }
            line
        })
        .collect()
}

const BOTH: &str = "[10.0.0.1:8080, 10.0.1.1:8080 via 192.0.2.12]";

#[test]
fn a_node_port_service_listens_on_every_node_address_for_outside_and_inside() {
    let desired = desired(&cluster_with(web("NodePort", |_| {})), &this_node());
    assert_eq!(
        rendered(&desired),
        vec![
            format!("0.0.0.0:30080/TCP nodePort -> {BOTH}"),
            format!("0.0.0.0:30080/TCP nodePort local -> {BOTH}"),
            format!("10.96.0.10:80/TCP -> {BOTH}"),
        ]
    );
    assert!(desired.health_checks.is_empty());
}

#[test]
fn a_cluster_ip_service_has_no_node_port_even_if_one_is_written() {
    let desired = desired(&cluster_with(web("ClusterIP", |_| {})), &this_node());
    assert_eq!(
        rendered(&desired),
        vec![format!("10.96.0.10:80/TCP -> {BOTH}")]
    );
}

#[test]
fn load_balancer_ips_and_external_ips_get_an_inside_and_an_outside_frontend() {
    let service = with_lb_ingress(
        web("LoadBalancer", |spec| {
            spec.external_ips = Some(vec!["203.0.113.20".into(), "2001:db8::1".into()]);
            spec.load_balancer_source_ranges = Some(vec!["198.51.100.7/24".into()]);
        }),
        vec![
            lb_ip("198.51.100.10"),
            // A load balancer that proxies itself (ipMode Proxy) is left
            // alone, as kube-proxy does.
            LoadBalancerIngress {
                ip: Some("198.51.100.11".into()),
                ip_mode: Some("Proxy".into()),
                ..Default::default()
            },
            LoadBalancerIngress {
                hostname: Some("lb.example".into()),
                ..Default::default()
            },
        ],
    );
    let desired = desired(&cluster_with(service), &this_node());
    assert_eq!(
        rendered(&desired),
        vec![
            format!("0.0.0.0:30080/TCP nodePort -> {BOTH}"),
            format!("0.0.0.0:30080/TCP nodePort local -> {BOTH}"),
            format!("10.96.0.10:80/TCP -> {BOTH}"),
            // Source ranges guard the load-balancer IP from outside only
            // (host bits of the CIDR are ignored).
            format!("198.51.100.10:80/TCP -> {BOTH}"),
            format!("198.51.100.10:80/TCP external -> {BOTH} from 198.51.100.0/24"),
            format!("203.0.113.20:80/TCP -> {BOTH}"),
            format!("203.0.113.20:80/TCP external -> {BOTH}"),
        ]
    );
}

#[test]
fn external_traffic_policy_local_keeps_outside_traffic_on_this_node() {
    let service = with_lb_ingress(
        web("LoadBalancer", |spec| {
            spec.external_traffic_policy = Some("Local".into());
            spec.health_check_node_port = Some(32100);
        }),
        vec![lb_ip("198.51.100.10")],
    );
    let desired = desired(&cluster_with(service), &this_node());
    assert_eq!(
        rendered(&desired),
        vec![
            "0.0.0.0:30080/TCP nodePort -> [10.0.0.1:8080]".to_string(),
            // In-cluster clients of external addresses use every endpoint.
            format!("0.0.0.0:30080/TCP nodePort local -> {BOTH}"),
            format!("10.96.0.10:80/TCP -> {BOTH}"),
            format!("198.51.100.10:80/TCP -> {BOTH}"),
            "198.51.100.10:80/TCP external -> [10.0.0.1:8080]".to_string(),
        ]
    );
    assert_eq!(
        desired.health_checks,
        BTreeMap::from([(
            32100,
            HealthCheck {
                service: ObjectName::new("default", "web"),
                local_endpoints: 1,
            }
        )])
    );
}

#[test]
fn without_a_local_endpoint_external_traffic_is_dropped_and_the_health_check_fails() {
    let service = with_lb_ingress(
        web("LoadBalancer", |spec| {
            spec.external_traffic_policy = Some("Local".into());
            spec.health_check_node_port = Some(32100);
        }),
        vec![lb_ip("198.51.100.10")],
    );
    let mut state = cluster_with(service);
    // Seen from a third node without endpoints.
    let elsewhere = NodeInfo {
        name: "node-c".into(),
        ..this_node()
    };
    state.insert_node(&node_with_ip("node-c", Some("192.0.2.13")));
    let both_remote = "[10.0.0.1:8080 via 192.0.2.11, 10.0.1.1:8080 via 192.0.2.12]";
    let desired = desired(&state, &elsewhere);
    assert_eq!(
        rendered(&desired),
        vec![
            "0.0.0.0:30080/TCP nodePort -> [] drop".to_string(),
            format!("0.0.0.0:30080/TCP nodePort local -> {both_remote}"),
            format!("10.96.0.10:80/TCP -> {both_remote}"),
            format!("198.51.100.10:80/TCP -> {both_remote}"),
            "198.51.100.10:80/TCP external -> [] drop".to_string(),
        ]
    );
    assert_eq!(desired.health_checks[&32100].local_endpoints, 0);
}

#[test]
fn a_service_without_any_endpoint_rejects_rather_than_drops() {
    let mut state = cluster_with(web("NodePort", |spec| {
        spec.external_traffic_policy = Some("Local".into());
    }));
    state.endpoint_slices.clear();
    let desired = desired(&state, &this_node());
    assert!(
        desired
            .frontends
            .values()
            .all(|e| !e.drop_without_backends && e.backends.is_empty()),
        "{:?}",
        rendered(&desired)
    );
}

#[test]
fn endpoints_on_unknown_nodes_are_reached_by_routing_not_the_tunnel() {
    let mut state = cluster_with(web("NodePort", |_| {}));
    state.nodes.remove(OTHER);
    let desired = desired(&state, &this_node());
    assert_eq!(
        rendered(&desired)[0],
        "0.0.0.0:30080/TCP nodePort -> [10.0.0.1:8080, 10.0.1.1:8080]"
    );
}

#[test]
fn no_node_ports_when_load_balancer_node_ports_are_not_allocated() {
    let service = with_lb_ingress(
        web("LoadBalancer", |spec| {
            spec.allocate_load_balancer_node_ports = Some(false);
            spec.ports.as_mut().unwrap()[0].node_port = None;
        }),
        vec![lb_ip("198.51.100.10")],
    );
    let desired = desired(&cluster_with(service), &this_node());
    assert!(
        desired.frontends.keys().all(|f| f.port != 30080),
        "{:?}",
        rendered(&desired)
    );
}

#[test]
fn bad_external_fields_skip_only_their_service() {
    let bad_range = web("LoadBalancer", |spec| {
        spec.load_balancer_source_ranges = Some(vec!["10.0.0.0/33".into()]);
    });
    let mut bad_ip = web("NodePort", |spec| {
        spec.external_ips = Some(vec!["not-an-ip".into()]);
    });
    bad_ip.metadata = meta("bad-ip", &[]);
    let mut good = web("NodePort", |_| {});
    good.metadata = meta("good", &[]);
    good.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.99".into());
    good.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].node_port = Some(30099);
    let mut state = cluster_with(bad_range);
    for service in [bad_ip, good] {
        state.insert_service(&service);
    }
    let desired = desired(&state, &this_node());
    let reasons: Vec<String> = desired.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].contains("bad-ip") && reasons[0].contains("not an IP address"));
    assert!(reasons[1].contains("default/web") && reasons[1].contains("not a CIDR"));
    assert!(desired.frontends.keys().any(|f| f.port == 30099));
}

#[test]
fn two_services_on_one_node_port_keep_the_first() {
    let mut other = web("NodePort", |spec| {
        spec.cluster_ip = Some("10.96.0.11".into())
    });
    other.metadata = meta("other", &[]);
    let mut state = cluster_with(web("NodePort", |_| {}));
    state.insert_service(&other);
    let desired = desired(&state, &this_node());
    let node_port = desired
        .frontends
        .iter()
        .find(|(f, _)| f.scope == Scope::NodePort)
        .map(|(_, e)| e.service.name.clone());
    assert_eq!(node_port.as_deref(), Some("other"));
    assert!(
        desired.skipped.iter().any(|s| &*s.object.name == "web"
            && s.reason.contains("already used by Service default/other")),
        "{:?}",
        desired.skipped
    );
}

#[test]
fn ports_with_a_local_policy_and_endpoints_only_elsewhere_are_counted_per_policy() {
    let internal_local = |spec: &mut ApiServiceSpec| {
        spec.internal_traffic_policy = Some("Local".into());
    };
    let external_local = |spec: &mut ApiServiceSpec| {
        spec.external_traffic_policy = Some("Local".into());
    };
    let both_local = |spec: &mut ApiServiceSpec| {
        internal_local(spec);
        external_local(spec);
    };
    let node_c = NodeInfo {
        name: "node-c".into(),
        ..this_node()
    };
    let counts = |internal, external| NoLocalEndpoints { internal, external };
    // (what, Service, seen from, with endpoints, expected)
    let cases: [(&str, Service, &NodeInfo, bool, NoLocalEndpoints); 7] = [
        (
            "iTP Local with a local endpoint",
            web("ClusterIP", internal_local),
            &this_node(),
            true,
            counts(0, 0),
        ),
        (
            "iTP Local with endpoints elsewhere only",
            web("ClusterIP", internal_local),
            &node_c,
            true,
            counts(1, 0),
        ),
        (
            "iTP Local without any endpoint: refused everywhere, not counted",
            web("ClusterIP", internal_local),
            &node_c,
            false,
            counts(0, 0),
        ),
        (
            "eTP Local NodePort with endpoints elsewhere only",
            web("NodePort", external_local),
            &node_c,
            true,
            counts(0, 1),
        ),
        (
            "eTP Local NodePort with a local endpoint",
            web("NodePort", external_local),
            &this_node(),
            true,
            counts(0, 0),
        ),
        (
            "both Local, endpoints elsewhere only",
            web("NodePort", both_local),
            &node_c,
            true,
            counts(1, 1),
        ),
        (
            "eTP Local on a ClusterIP Service: no external frontend, not counted",
            web("ClusterIP", external_local),
            &node_c,
            true,
            counts(0, 0),
        ),
    ];
    for (what, service, seen_from, with_endpoints, expected) in cases {
        let mut state = cluster_with(service);
        if !with_endpoints {
            state.endpoint_slices.clear();
        }
        state.insert_node(&node_with_ip("node-c", Some("192.0.2.13")));
        let desired = desired(&state, seen_from);
        assert_eq!(desired.no_local_endpoints, expected, "{what}");
    }
}
