//! kube-proxy's Service semantics as a table: each row is a cluster, the
//! node it is seen from, and the frontends and backends that must result.

use k8s_openapi::api::core::v1::Service;

use super::{fixtures::*, *};

const NODE: &str = "node-a";

fn node() -> NodeInfo {
    NodeInfo {
        name: NODE.into(),
        zone: None,
        being_deleted: false,
        internal_ip: None,
    }
}

/// The cluster with this node's Node object in zone `zone`.
fn in_zone(mut cluster: ClusterState, zone: Option<&str>) -> ClusterState {
    cluster.insert_node(&node_object(NODE, zone));
    cluster
}

/// Frontends as `"ip:port/PROTO" -> ["ip:port", ..]`, easy to read in a table.
fn rendered(desired: &DesiredDataplane) -> Vec<(String, Vec<String>)> {
    desired
        .frontends
        .iter()
        .map(|(frontend, entry)| {
            (
                frontend.to_string(),
                entry.backends.iter().map(ToString::to_string).collect(),
            )
        })
        .collect()
}

fn expect(rows: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    rows.iter()
        .map(|(f, b)| (f.to_string(), b.iter().map(|s| s.to_string()).collect()))
        .collect()
}

struct Case {
    name: &'static str,
    cluster: ClusterState,
    frontends: &'static [(&'static str, &'static [&'static str])],
    /// The category and a substring of the reason of each skipped object,
    /// in order.
    skipped: &'static [(SkipReason, &'static str)],
}

const WEB: &[(&str, i32, &str)] = &[("http", 80, "TCP")];
const WEB_EP: &[(&str, i32, &str)] = &[("http", 8080, "TCP")];

fn with_labels(mut s: Service, labels: &[(&str, &str)]) -> Service {
    s.metadata = meta(s.metadata.name.as_deref().unwrap_or(""), labels);
    s
}

fn topology_cases() -> Vec<Case> {
    let zoned = |zone: Option<&str>, endpoints: &[Ep]| {
        in_zone(
            cluster(
                vec![service("web", "10.96.0.10", WEB)],
                vec![slice("web-1", "web", WEB_EP, endpoints)],
            ),
            zone,
        )
    };
    vec![
        Case {
            name: "zone hints keep the endpoints hinted for this node's zone",
            cluster: zoned(
                Some("zone-a"),
                &[
                    hinted(ready("10.0.0.1"), &["zone-a"]),
                    hinted(ready("10.0.0.2"), &["zone-b"]),
                    hinted(ready("10.0.0.3"), &["zone-a", "zone-b"]),
                ],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080", "10.0.0.3:8080"])],
            skipped: &[],
        },
        Case {
            name: "one ready endpoint without hints disables topology",
            cluster: zoned(
                Some("zone-a"),
                &[hinted(ready("10.0.0.1"), &["zone-a"]), ready("10.0.0.2")],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080", "10.0.0.2:8080"])],
            skipped: &[],
        },
        Case {
            name: "an unhinted endpoint that is not ready does not disable topology",
            cluster: zoned(
                Some("zone-a"),
                &[
                    hinted(ready("10.0.0.1"), &["zone-a"]),
                    hinted(ready("10.0.0.2"), &["zone-b"]),
                    not_ready("10.0.0.3"),
                ],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
        Case {
            name: "no endpoint hinted for this zone: all endpoints serve",
            cluster: zoned(
                Some("zone-c"),
                &[
                    hinted(ready("10.0.0.1"), &["zone-a"]),
                    hinted(ready("10.0.0.2"), &["zone-b"]),
                ],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080", "10.0.0.2:8080"])],
            skipped: &[],
        },
        Case {
            name: "a node without a zone label ignores zone hints",
            cluster: zoned(
                None,
                &[
                    hinted(ready("10.0.0.1"), &["zone-a"]),
                    hinted(ready("10.0.0.2"), &["zone-b"]),
                ],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080", "10.0.0.2:8080"])],
            skipped: &[],
        },
        Case {
            name: "node hints (PreferSameNode) win over zone hints when one names this node",
            cluster: zoned(
                Some("zone-a"),
                &[
                    node_hinted(hinted(ready("10.0.0.1"), &["zone-a"]), &["node-b"]),
                    node_hinted(hinted(ready("10.0.0.2"), &["zone-a"]), &[NODE]),
                    node_hinted(hinted(ready("10.0.0.3"), &["zone-b"]), &["node-c"]),
                ],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.2:8080"])],
            skipped: &[],
        },
        Case {
            name: "node hints naming other nodes fall back to zone hints",
            cluster: zoned(
                Some("zone-a"),
                &[
                    node_hinted(hinted(ready("10.0.0.1"), &["zone-a"]), &["node-b"]),
                    node_hinted(hinted(ready("10.0.0.3"), &["zone-b"]), &["node-c"]),
                ],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
        Case {
            name: "the terminating fallback ignores topology",
            cluster: zoned(
                Some("zone-a"),
                &[hinted(terminating_serving("10.0.0.2"), &["zone-b"])],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.2:8080"])],
            skipped: &[],
        },
        Case {
            name: "internalTrafficPolicy Local ignores topology",
            cluster: {
                let mut web = service("web", "10.96.0.10", WEB);
                web.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
                in_zone(
                    cluster(
                        vec![web],
                        vec![slice(
                            "web-1",
                            "web",
                            WEB_EP,
                            &[
                                hinted(ready("10.0.0.1"), &["zone-b"]),
                                on_node(hinted(ready("10.0.0.2"), &["zone-a"]), "node-b"),
                            ],
                        )],
                    ),
                    Some("zone-a"),
                )
            },
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
    ]
}

fn cases() -> Vec<Case> {
    let mut cases = topology_cases();
    cases.extend(base_cases());
    cases
}

fn base_cases() -> Vec<Case> {
    vec![
        Case {
            name: "ready endpoints serve, not-ready ones do not",
            cluster: cluster(
                vec![service("web", "10.96.0.10", WEB)],
                vec![slice(
                    "web-1",
                    "web",
                    WEB_EP,
                    &[ready("10.0.0.1"), not_ready("10.0.0.2"), ready("10.0.0.3")],
                )],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080", "10.0.0.3:8080"])],
            skipped: &[],
        },
        Case {
            name: "without ready endpoints, serving terminating ones are the fallback",
            cluster: cluster(
                vec![service("web", "10.96.0.10", WEB)],
                vec![slice(
                    "web-1",
                    "web",
                    WEB_EP,
                    &[
                        terminating_serving("10.0.0.1"),
                        terminating_not_serving("10.0.0.2"),
                        not_ready("10.0.0.3"),
                    ],
                )],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
        Case {
            name: "a ready endpoint wins over terminating ones",
            cluster: cluster(
                vec![service("web", "10.96.0.10", WEB)],
                vec![slice(
                    "web-1",
                    "web",
                    WEB_EP,
                    &[terminating_serving("10.0.0.1"), ready("10.0.0.2")],
                )],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.2:8080"])],
            skipped: &[],
        },
        Case {
            name: "no endpoints at all: the frontend exists with no backend (reject)",
            cluster: cluster(vec![service("web", "10.96.0.10", WEB)], vec![]),
            frontends: &[("10.96.0.10:80/TCP", &[])],
            skipped: &[],
        },
        Case {
            name: "nil conditions mean ready",
            cluster: cluster(
                vec![service("web", "10.96.0.10", WEB)],
                vec![slice(
                    "web-1",
                    "web",
                    WEB_EP,
                    &[Ep {
                        ready: None,
                        serving: None,
                        terminating: None,
                        ..ready("10.0.0.1")
                    }],
                )],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
        Case {
            name: "internalTrafficPolicy Local keeps only this node's endpoints",
            cluster: {
                let mut svc = service("web", "10.96.0.10", WEB);
                svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
                cluster(
                    vec![svc],
                    vec![slice(
                        "web-1",
                        "web",
                        WEB_EP,
                        &[ready("10.0.0.1"), on_node(ready("10.0.0.2"), "node-b")],
                    )],
                )
            },
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
        Case {
            name: "internalTrafficPolicy Local without a local endpoint rejects, no fallback",
            cluster: {
                let mut svc = service("web", "10.96.0.10", WEB);
                svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
                cluster(
                    vec![svc],
                    vec![slice(
                        "web-1",
                        "web",
                        WEB_EP,
                        &[on_node(ready("10.0.0.2"), "node-b")],
                    )],
                )
            },
            frontends: &[("10.96.0.10:80/TCP", &[])],
            skipped: &[],
        },
        Case {
            name: "named ports map to each slice port by name; TCP and UDP on one number are two frontends",
            cluster: cluster(
                vec![service(
                    "dns",
                    "10.96.0.10",
                    &[
                        ("dns-tcp", 53, "TCP"),
                        ("dns", 53, "UDP"),
                        ("metrics", 9153, "TCP"),
                    ],
                )],
                vec![slice(
                    "dns-1",
                    "dns",
                    &[
                        ("dns", 5353, "UDP"),
                        ("dns-tcp", 5354, "TCP"),
                        ("metrics", 9154, "TCP"),
                    ],
                    &[ready("10.0.0.1")],
                )],
            ),
            frontends: &[
                ("10.96.0.10:53/TCP", &["10.0.0.1:5354"]),
                ("10.96.0.10:53/UDP", &["10.0.0.1:5353"]),
                ("10.96.0.10:9153/TCP", &["10.0.0.1:9154"]),
            ],
            skipped: &[],
        },
        Case {
            name: "slices of one Service merge and duplicate endpoints collapse",
            cluster: cluster(
                vec![service("web", "10.96.0.10", WEB)],
                vec![
                    slice(
                        "web-1",
                        "web",
                        WEB_EP,
                        &[ready("10.0.0.2"), ready("10.0.0.1")],
                    ),
                    slice(
                        "web-2",
                        "web",
                        WEB_EP,
                        &[ready("10.0.0.1"), ready("10.0.0.3")],
                    ),
                ],
            ),
            frontends: &[(
                "10.96.0.10:80/TCP",
                &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"],
            )],
            skipped: &[],
        },
        Case {
            name: "ExternalName and headless-labelled Services are ignored even with a clusterIP",
            cluster: {
                let mut external = service("ext", "10.96.0.20", WEB);
                external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
                let headless = with_labels(
                    service("hl", "10.96.0.21", WEB),
                    &[("service.kubernetes.io/headless", "")],
                );
                let mut other_proxy_slice = slice("web-2", "web", WEB_EP, &[ready("10.0.0.9")]);
                other_proxy_slice.metadata.labels.as_mut().unwrap().insert(
                    "service.kubernetes.io/service-proxy-name".into(),
                    "x".into(),
                );
                cluster(
                    vec![external, headless, service("web", "10.96.0.10", WEB)],
                    vec![
                        other_proxy_slice,
                        slice("web-1", "web", WEB_EP, &[ready("10.0.0.1")]),
                    ],
                )
            },
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
        Case {
            name: "internalTrafficPolicy Local falls back to local terminating endpoints only",
            cluster: {
                let mut svc = service("web", "10.96.0.10", WEB);
                svc.spec.as_mut().unwrap().internal_traffic_policy = Some("Local".into());
                cluster(
                    vec![svc],
                    vec![slice(
                        "web-1",
                        "web",
                        WEB_EP,
                        &[
                            terminating_serving("10.0.0.1"),
                            on_node(ready("10.0.0.2"), "node-b"),
                        ],
                    )],
                )
            },
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
        Case {
            name: "a terminating endpoint without a serving condition is serving if it says ready",
            cluster: cluster(
                vec![service("web", "10.96.0.10", WEB)],
                vec![slice(
                    "web-1",
                    "web",
                    WEB_EP,
                    &[
                        Ep {
                            ready: Some(false),
                            serving: None,
                            terminating: Some(true),
                            ..ready("10.0.0.1")
                        },
                        Ep {
                            ready: Some(false),
                            serving: Some(true),
                            terminating: None,
                            ..ready("10.0.0.2")
                        },
                    ],
                )],
            ),
            // 10.0.0.1: serving falls back to ready (false). 10.0.0.2: serving
            // but not terminating, so not part of the terminating fallback.
            frontends: &[("10.96.0.10:80/TCP", &[])],
            skipped: &[],
        },
        Case {
            name: "endpoints without conditions are ready; bad addresses are reported",
            cluster: {
                let mut s = slice(
                    "web-1",
                    "web",
                    WEB_EP,
                    &[ready("10.0.0.1"), ready("10.0.0.999")],
                );
                s.endpoints[0].conditions = None;
                cluster(vec![service("web", "10.96.0.10", WEB)], vec![s])
            },
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[(
                SkipReason::Invalid,
                "endpoint address \"10.0.0.999\" is not an IPv4 address",
            )],
        },
        Case {
            name: "SCTP ports are reported and skipped; the Service's other ports work",
            cluster: cluster(
                vec![service(
                    "mixed",
                    "10.96.0.10",
                    &[("http", 80, "TCP"), ("sig", 3868, "SCTP")],
                )],
                vec![slice(
                    "mixed-1",
                    "mixed",
                    &[("http", 8080, "TCP"), ("sig", 3868, "SCTP")],
                    &[ready("10.0.0.1")],
                )],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[(
                SkipReason::UnsupportedProtocol,
                "port 3868/SCTP is not load-balanced yet",
            )],
        },
        Case {
            name: "headless, ExternalName and other proxies' Services are ignored silently",
            cluster: {
                let mut external = service("ext", "", WEB);
                external.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
                let mut headless_slice = slice("hl-1", "hl", WEB_EP, &[ready("10.0.0.9")]);
                headless_slice
                    .metadata
                    .labels
                    .as_mut()
                    .unwrap()
                    .insert("service.kubernetes.io/headless".into(), "".into());
                cluster(
                    vec![
                        service("hl", "None", WEB),
                        external,
                        with_labels(
                            service("other", "10.96.0.11", WEB),
                            &[("service.kubernetes.io/service-proxy-name", "someone-else")],
                        ),
                        service("web", "10.96.0.10", WEB),
                    ],
                    vec![
                        headless_slice,
                        slice("web-1", "web", WEB_EP, &[ready("10.0.0.1")]),
                    ],
                )
            },
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[],
        },
        Case {
            name: "invalid objects are skipped with a reason and the valid Service still works",
            cluster: {
                let mut fqdn = slice("fqdn-1", "web", WEB_EP, &[]);
                fqdn.address_type = "FQDN".into();
                let mut unlabelled = slice("nolabel", "web", WEB_EP, &[]);
                unlabelled.metadata.labels = None;
                cluster(
                    vec![
                        service("bad-ip", "10.96.0.300", WEB),
                        service("port-zero", "10.96.0.12", &[("http", 0, "TCP")]),
                        service("bad-proto", "10.96.0.13", &[("http", 80, "ICMP")]),
                        service("web", "10.96.0.10", WEB),
                    ],
                    vec![
                        fqdn,
                        unlabelled,
                        slice("orphan-1", "missing", WEB_EP, &[ready("10.0.0.5")]),
                        slice("web-1", "web", WEB_EP, &[ready("10.0.0.1")]),
                    ],
                )
            },
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            // The FQDN slice is passed over without a word, as kube-proxy
            // does: such slices are for controllers of their own.
            skipped: &[
                (SkipReason::Invalid, "no kubernetes.io/service-name label"),
                (
                    SkipReason::UnknownService,
                    "Service default/missing is unknown",
                ),
                (
                    SkipReason::Invalid,
                    "clusterIP \"10.96.0.300\" is not an IP address",
                ),
                (SkipReason::Invalid, "unknown protocol \"ICMP\""),
                (SkipReason::Invalid, "invalid number 0"),
            ],
        },
        Case {
            name: "two Services claiming one frontend: the first by name keeps it",
            cluster: cluster(
                vec![
                    service("a", "10.96.0.10", WEB),
                    service("b", "10.96.0.10", WEB),
                ],
                vec![
                    slice("a-1", "a", WEB_EP, &[ready("10.0.0.1")]),
                    slice("b-1", "b", WEB_EP, &[ready("10.0.0.2")]),
                ],
            ),
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[(
                SkipReason::FrontendConflict,
                "already used by Service default/a",
            )],
        },
        Case {
            name: "dual-stack Services serve their IPv4 family; IPv6-only ones are skipped",
            cluster: {
                let mut dual = service("dual", "10.96.0.10", WEB);
                dual.spec.as_mut().unwrap().cluster_ips =
                    Some(vec!["fd00::10".into(), "10.96.0.10".into()]);
                cluster(
                    vec![dual, service("v6", "fd00::11", WEB)],
                    vec![slice("dual-1", "dual", WEB_EP, &[ready("10.0.0.1")])],
                )
            },
            frontends: &[("10.96.0.10:80/TCP", &["10.0.0.1:8080"])],
            skipped: &[(SkipReason::UnsupportedIpFamily, "only IPv6 clusterIPs")],
        },
        Case {
            name: "a slice port that matches no Service port contributes nothing",
            cluster: cluster(
                vec![service("web", "10.96.0.10", WEB)],
                vec![slice(
                    "web-1",
                    "web",
                    &[("other", 8080, "TCP")],
                    &[ready("10.0.0.1")],
                )],
            ),
            frontends: &[("10.96.0.10:80/TCP", &[])],
            skipped: &[],
        },
    ]
}

#[test]
fn kube_proxy_semantics_table() {
    for case in cases() {
        let desired = desired(&case.cluster, &NodeInfo::from_cluster(&case.cluster, NODE));
        assert_eq!(
            rendered(&desired),
            expect(case.frontends),
            "case: {}",
            case.name
        );
        let reasons: Vec<(SkipReason, String)> = desired
            .skipped
            .iter()
            .map(|s| (s.category, s.to_string()))
            .collect();
        assert_eq!(
            reasons.len(),
            case.skipped.len(),
            "case: {}: skipped {reasons:#?}",
            case.name
        );
        for ((category, reason), (wanted_category, wanted)) in reasons.iter().zip(case.skipped) {
            assert!(
                reason.contains(wanted) && category == wanted_category,
                "case: {}: {category:?} {reason:?} should be {wanted_category:?} {wanted:?}",
                case.name
            );
        }
    }
}

#[test]
fn frontends_remember_their_service_and_port_name() {
    let desired = desired(
        &cluster(vec![service("web", "10.96.0.10", WEB)], vec![]),
        &node(),
    );
    let entry = desired.frontends.values().next().expect("one frontend");
    assert_eq!(entry.service, ObjectName::new("default", "web"));
    assert_eq!(&*entry.port_name, "http");
}

#[test]
fn session_affinity_client_ip_carries_its_timeout() {
    let with_affinity = |affinity: Option<&str>, timeout: Option<i32>| {
        let mut svc = service("web", "10.96.0.10", WEB);
        let spec = svc.spec.as_mut().unwrap();
        spec.session_affinity = affinity.map(Into::into);
        spec.session_affinity_config =
            timeout.map(|t| k8s_openapi::api::core::v1::SessionAffinityConfig {
                client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig {
                    timeout_seconds: Some(t),
                }),
            });
        let desired = desired(&cluster(vec![svc], vec![]), &node());
        (
            desired
                .frontends
                .values()
                .next()
                .map(|e| e.affinity_timeout_s),
            desired
                .skipped
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(with_affinity(None, None), (Some(None), vec![]));
    assert_eq!(with_affinity(Some("None"), Some(5)), (Some(None), vec![]));
    assert_eq!(
        with_affinity(Some("ClientIP"), None),
        (Some(Some(10_800)), vec![])
    );
    assert_eq!(
        with_affinity(Some("ClientIP"), Some(30)),
        (Some(Some(30)), vec![])
    );
    let (frontend, skipped) = with_affinity(Some("ClientIP"), Some(0));
    assert_eq!(frontend, None);
    assert!(skipped[0].contains("timeoutSeconds 0"), "{skipped:?}");
    let (frontend, skipped) = with_affinity(Some("Sticky"), None);
    assert_eq!(frontend, None);
    assert!(
        skipped[0].contains("unknown sessionAffinity"),
        "{skipped:?}"
    );
}

#[test]
fn a_node_being_deleted_or_drained_by_the_autoscaler_is_reported() {
    let mut cluster = in_zone(cluster(vec![], vec![]), Some("zone-a"));
    assert!(!NodeInfo::from_cluster(&cluster, NODE).being_deleted);
    let mut node = node_object(NODE, Some("zone-a"));
    node.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
        taints: Some(vec![k8s_openapi::api::core::v1::Taint {
            key: "ToBeDeletedByClusterAutoscaler".into(),
            effect: "NoSchedule".into(),
            ..Default::default()
        }]),
        ..Default::default()
    });
    cluster.insert_node(&node);
    assert!(NodeInfo::from_cluster(&cluster, NODE).being_deleted);
    node.spec = None;
    node.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    cluster.insert_node(&node);
    assert!(NodeInfo::from_cluster(&cluster, NODE).being_deleted);
}

#[test]
fn desired_is_deterministic() {
    let cluster = cluster(
        vec![service("web", "10.96.0.10", WEB)],
        vec![slice(
            "web-1",
            "web",
            WEB_EP,
            &[ready("10.0.0.3"), ready("10.0.0.1"), ready("10.0.0.2")],
        )],
    );
    assert_eq!(desired(&cluster, &node()), desired(&cluster, &node()));
}
