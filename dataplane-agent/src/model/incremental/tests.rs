//! What one change costs: which Services it recomputes and which frontends
//! it hands to the map writer. (Equality with the model from scratch is a
//! property test in `properties.rs`.)

use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};

use super::*;
use crate::model::fixtures::{node_object, ready, service, slice};

const WEB: &[(&str, i32, &str)] = &[("http", 80, "TCP")];
const WEB_EP: &[(&str, i32, &str)] = &[("http", 8080, "TCP")];

/// A model of `count` Services `svc-N` (10.96.0.N:80), one endpoint each,
/// synced once.
fn synced_model(count: u8) -> Model {
    let mut model = Model::new("node-a");
    for n in 1..=count {
        let name = format!("svc-{n}");
        let service = service(&name, &format!("10.96.0.{n}"), WEB);
        let object = ObjectName::of(&service.metadata);
        model.update(Update::Service(
            object.clone(),
            Some(ServiceRecord::new(&object, &service)),
        ));
        let slice = slice(
            &format!("{name}-1"),
            &name,
            WEB_EP,
            &[ready(&format!("10.0.0.{n}"))],
        );
        model.update(Update::Slice(
            ObjectName::of(&slice.metadata),
            Some(SliceRecord::new(&slice)),
        ));
    }
    model.recompute();
    model
}

fn names(recomputed: &Recomputed) -> Vec<String> {
    recomputed
        .services
        .iter()
        .map(|s| s.name.to_string())
        .collect()
}

#[test]
fn an_endpoint_change_recomputes_only_its_service() {
    let mut model = synced_model(50);
    let moved = slice("svc-7-1", "svc-7", WEB_EP, &[ready("10.0.1.7")]);
    assert!(model.update(Update::Slice(
        ObjectName::of(&moved.metadata),
        Some(SliceRecord::new(&moved)),
    )));
    let recomputed = model.recompute();
    assert_eq!(names(&recomputed), ["default/svc-7"]);
    let frontend = Frontend::cluster(
        "10.96.0.7".parse().unwrap(),
        80,
        super::super::Protocol::Tcp,
    );
    assert_eq!(recomputed.frontends, BTreeSet::from([frontend]));
    assert_eq!(
        model.entry(&frontend).unwrap().backends[0].ip.to_string(),
        "10.0.1.7"
    );
    assert!(!model.has_changes());
}

#[test]
fn an_unchanged_object_or_relist_recomputes_nothing() {
    let mut model = synced_model(20);
    let cluster = model.cluster().clone();
    assert!(!model.replace(cluster), "a relist of the same objects");
    let same = slice("svc-3-1", "svc-3", WEB_EP, &[ready("10.0.0.3")]);
    assert!(!model.update(Update::Slice(
        ObjectName::of(&same.metadata),
        Some(SliceRecord::new(&same)),
    )));
    let recomputed = model.recompute();
    assert!(recomputed.services.is_empty() && recomputed.frontends.is_empty());
}

#[test]
fn a_node_heartbeat_changes_nothing_and_a_new_address_recomputes_everything() {
    let mut model = synced_model(5);
    let mut node = node_object("node-b", Some("zone-a"));
    model.update(Update::Node("node-b".into(), Some(NodeRecord::new(&node))));
    model.recompute();
    // Conditions and heartbeats are not read: nothing to do.
    node.status = Some(NodeStatus {
        phase: Some("Running".into()),
        ..NodeStatus::default()
    });
    assert!(!model.update(Update::Node("node-b".into(), Some(NodeRecord::new(&node)))));
    assert!(!model.has_changes());
    // An InternalIP can move any Service's remote backends.
    node.status = Some(NodeStatus {
        addresses: Some(vec![NodeAddress {
            type_: "InternalIP".into(),
            address: "192.0.2.2".into(),
        }]),
        ..NodeStatus::default()
    });
    assert!(model.update(Update::Node("node-b".into(), Some(NodeRecord::new(&node)))));
    let recomputed = model.recompute();
    assert!(recomputed.nodes_changed);
    assert_eq!(model.node_addresses().len(), 1);
    // Every Service was looked at; none of their entries changed (no
    // endpoint runs on node-b), so none is reported.
    assert!(recomputed.frontends.is_empty());
}

#[test]
fn pod_cidrs_of_nodes_with_an_internal_ip_are_known_and_their_changes_are_news() {
    let mut model = synced_model(1);
    let node_with = |name: &str, ip: Option<&str>, cidrs: &[&str]| {
        let mut node = node_object(name, None);
        node.spec = Some(NodeSpec {
            pod_cidrs: Some(cidrs.iter().map(|c| (*c).to_owned()).collect()),
            ..NodeSpec::default()
        });
        node.status = ip.map(|ip| NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: ip.into(),
            }]),
            ..NodeStatus::default()
        });
        Update::Node(name.into(), Some(NodeRecord::new(&node)))
    };
    // IPv6 CIDRs wait for the IPv6 datapath; a node without an InternalIP
    // has no tunnel to answer through.
    model.update(node_with(
        "node-b",
        Some("192.0.2.2"),
        &["10.202.0.0/16", "fd00:202::/64"],
    ));
    model.update(node_with("node-c", None, &["10.203.0.0/16"]));
    assert!(model.recompute().nodes_changed);
    let cidr = |text: &str| SourceRange::parse(text).unwrap().unwrap();
    let ip = |text: &str| text.parse::<Ipv4Addr>().unwrap();
    assert_eq!(
        model.pod_cidrs(),
        &BTreeMap::from([(cidr("10.202.0.0/16"), ip("192.0.2.2"))])
    );
    model.update(node_with("node-b", Some("192.0.2.2"), &["10.212.0.0/16"]));
    assert!(model.recompute().nodes_changed, "a new pod CIDR is news");
    assert_eq!(
        model.pod_cidrs(),
        &BTreeMap::from([(cidr("10.212.0.0/16"), ip("192.0.2.2"))])
    );
}

#[test]
fn a_slice_that_moves_to_another_service_recomputes_both() {
    let mut model = synced_model(3);
    let moved = slice("svc-1-1", "svc-2", WEB_EP, &[ready("10.0.0.1")]);
    model.update(Update::Slice(
        ObjectName::of(&moved.metadata),
        Some(SliceRecord::new(&moved)),
    ));
    let recomputed = model.recompute();
    assert_eq!(names(&recomputed), ["default/svc-1", "default/svc-2"]);
    let svc1 = Frontend::cluster(
        "10.96.0.1".parse().unwrap(),
        80,
        super::super::Protocol::Tcp,
    );
    assert!(model.entry(&svc1).unwrap().backends.is_empty());
}

#[test]
fn a_conflict_is_reported_when_the_loser_changes_and_resolved_when_the_owner_goes() {
    let mut model = synced_model(2);
    // svc-9 claims svc-1's address: svc-1 (first by name) keeps it.
    let thief = service("svc-9", "10.96.0.1", WEB);
    let name = ObjectName::of(&thief.metadata);
    model.update(Update::Service(
        name.clone(),
        Some(ServiceRecord::new(&name, &thief)),
    ));
    let recomputed = model.recompute();
    assert!(
        recomputed.services[0].skipped[0]
            .reason
            .contains("already used by Service default/svc-1")
    );
    assert_eq!(model.skipped_count(), 1);
    let frontend = Frontend::cluster(
        "10.96.0.1".parse().unwrap(),
        80,
        super::super::Protocol::Tcp,
    );
    assert_eq!(&*model.entry(&frontend).unwrap().service.name, "svc-1");
    model.update(Update::Service(ObjectName::new("default", "svc-1"), None));
    let recomputed = model.recompute();
    assert!(recomputed.frontends.contains(&frontend));
    assert_eq!(&*model.entry(&frontend).unwrap().service.name, "svc-9");
    // The conflict is gone; svc-1's slice is now the one reported.
    assert_eq!(model.skipped_count(), 1);
}

#[test]
fn change_events_are_counted_as_kube_proxys_trackers_count_them() {
    let mut model = synced_model(3);
    assert_eq!(
        model.changes(),
        ChangeTally {
            service_events: 3,
            slice_events: 3,
            services_pending: 0,
            slice_changes_pending: 0,
        },
        "the first lists, recomputed"
    );
    let svc = |n: u8, ip: &str| {
        let object = service(&format!("svc-{n}"), ip, WEB);
        let name = ObjectName::of(&object.metadata);
        Update::Service(name.clone(), Some(ServiceRecord::new(&name, &object)))
    };
    // svc-1 changes twice, svc-2 is resent unchanged: three events, one
    // Service pending.
    model.update(svc(1, "10.96.1.1"));
    model.update(svc(1, "10.96.2.1"));
    model.update(svc(2, "10.96.0.2"));
    let endpoints = slice("svc-3-1", "svc-3", WEB_EP, &[ready("10.0.9.9")]);
    let slice_name = ObjectName::of(&endpoints.metadata);
    model.update(Update::Slice(
        slice_name.clone(),
        Some(SliceRecord::new(&endpoints)),
    ));
    model.update(Update::Slice(
        slice_name,
        Some(SliceRecord::new(&endpoints)),
    ));
    assert_eq!(
        model.changes(),
        ChangeTally {
            service_events: 6,
            slice_events: 5,
            services_pending: 1,
            slice_changes_pending: 1,
        }
    );
    model.recompute();
    let after = model.changes();
    assert_eq!(
        (after.services_pending, after.slice_changes_pending),
        (0, 0)
    );
    assert_eq!((after.service_events, after.slice_events), (6, 5));
}
