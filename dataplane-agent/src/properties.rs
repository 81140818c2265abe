//! Property tests over arbitrary cluster states: the model never panics and
//! the map writer always leaves consistent maps, whatever the objects say.
//! Seeded by proptest (failures are persisted and replayed); the number of
//! cases grows with PROPTEST_CASES for long runs.

use std::{collections::BTreeSet, net::Ipv4Addr};

use k8s_openapi::api::{
    core::v1::{Node, NodeAddress, NodeStatus, Service, ServicePort, ServiceSpec},
    discovery::v1::{
        Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForZone,
    },
};
use proptest::prelude::*;

use crate::{
    dataplane::{
        codec::{frontend_of, member_key},
        state::{Limits, PinnedState, fake::FakeMaps},
    },
    model::{
        ClusterState, Model, NodeInfo, NodeRecord, ObjectName, ServiceRecord, SkipReason,
        SliceRecord, Update, desired,
        fixtures::{self, meta},
    },
};

fn ip_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0u8..4, 1u8..6).prop_map(|(a, b)| format!("10.96.{a}.{b}")),
        1 => Just("None".to_owned()),
        1 => Just(String::new()),
        1 => Just("10.96.0.300".to_owned()),
        1 => Just("fd00::1".to_owned()),
    ]
}

fn protocol() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        4 => Just(Some("TCP".to_owned())),
        2 => Just(Some("UDP".to_owned())),
        1 => Just(Some("SCTP".to_owned())),
        1 => Just(None),
        1 => Just(Some("ICMP".to_owned())),
    ]
}

fn port_name() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        Just(Some("http".to_owned())),
        Just(Some("dns".to_owned()))
    ]
}

fn service() -> impl Strategy<Value = Service> {
    (
        0usize..6,
        ip_text(),
        prop::collection::vec((port_name(), -1i32..70_000, protocol()), 0..4),
        any::<bool>(),
        prop_oneof![
            Just(None),
            Just(Some("ClientIP".to_owned())),
            Just(Some("Bogus".to_owned()))
        ],
        prop_oneof![
            3 => Just(None),
            1 => Just(Some("ExternalName".to_owned())),
            2 => Just(Some("NodePort".to_owned())),
            2 => Just(Some("LoadBalancer".to_owned())),
        ],
        // externalTrafficPolicy Local, with a health check port of a few
        // (so that two Services may ask for the same one).
        prop::option::of(32_000i32..32_002),
    )
        .prop_map(
            |(name, ip, ports, local, affinity, type_, external_local)| Service {
                metadata: meta(&format!("svc-{name}"), &[]),
                spec: Some(ServiceSpec {
                    cluster_ip: Some(ip),
                    type_,
                    session_affinity: affinity,
                    internal_traffic_policy: local.then(|| "Local".to_owned()),
                    external_traffic_policy: external_local.map(|_| "Local".to_owned()),
                    health_check_node_port: external_local,
                    ports: Some(
                        ports
                            .into_iter()
                            .map(|(name, port, protocol)| ServicePort {
                                name,
                                port,
                                protocol,
                                // A few node ports, so that Services collide.
                                node_port: Some(30_000 + port.rem_euclid(3)),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
}

/// A Node of the two the endpoints run on: its zone and InternalIP.
fn node_object() -> impl Strategy<Value = Node> {
    (
        prop_oneof![Just("node-a"), Just("node-b")],
        prop::option::of(prop_oneof![Just("zone-a"), Just("zone-b")]),
        prop::option::of((1u8..3).prop_map(|o| format!("192.0.2.{o}"))),
    )
        .prop_map(|(name, zone, ip)| {
            let mut node = fixtures::node_object(name, zone);
            node.status = ip.map(|address| NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address,
                }]),
                ..Default::default()
            });
            node
        })
}

/// One change a source may report.
#[derive(Clone, Debug)]
enum Change {
    Service(Box<Service>),
    DeleteService(usize),
    Slice(Box<EndpointSlice>),
    DeleteSlice(usize),
    Node(Box<Node>),
    DeleteNode(&'static str),
    /// The model recomputes here (a sync).
    Sync,
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => service().prop_map(|s| Change::Service(Box::new(s))),
        1 => (0usize..6).prop_map(Change::DeleteService),
        3 => slice().prop_map(|s| Change::Slice(Box::new(s))),
        1 => (0usize..8).prop_map(Change::DeleteSlice),
        1 => node_object().prop_map(|n| Change::Node(Box::new(n))),
        1 => prop_oneof![Just("node-a"), Just("node-b")].prop_map(Change::DeleteNode),
        2 => Just(Change::Sync),
    ]
}

fn endpoint() -> impl Strategy<Value = Endpoint> {
    (
        prop_oneof![8 => (0u8..8).prop_map(|o| format!("10.0.0.{o}")), 1 => Just("bogus".to_owned())],
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop_oneof![Just("node-a"), Just("node-b")],
        prop::option::of(prop_oneof![Just("zone-a"), Just("zone-b")]),
    )
        .prop_map(|(ip, ready, serving, terminating, node, zone)| Endpoint {
            addresses: vec![ip],
            conditions: Some(EndpointConditions {
                ready,
                serving,
                terminating,
            }),
            node_name: Some(node.to_owned()),
            hints: zone.map(|z| EndpointHints {
                for_zones: Some(vec![ForZone { name: z.to_owned() }]),
                for_nodes: None,
            }),
            ..Default::default()
        })
}

fn slice() -> impl Strategy<Value = EndpointSlice> {
    (
        0usize..8,
        0usize..7,
        prop_oneof![8 => Just("IPv4"), 1 => Just("IPv6"), 1 => Just("FQDN")],
        prop::collection::vec((port_name(), 0i32..70_000, protocol()), 0..3),
        prop::collection::vec(endpoint(), 0..5),
    )
        .prop_map(
            |(name, owner, address_type, ports, endpoints)| EndpointSlice {
                metadata: meta(
                    &format!("slice-{name}"),
                    &[("kubernetes.io/service-name", &format!("svc-{owner}"))],
                ),
                address_type: address_type.to_owned(),
                ports: Some(
                    ports
                        .into_iter()
                        .map(|(name, port, protocol)| EndpointPort {
                            name,
                            port: Some(port),
                            protocol,
                            ..Default::default()
                        })
                        .collect(),
                ),
                endpoints,
            },
        )
}

fn cluster() -> impl Strategy<Value = ClusterState> {
    (
        prop::collection::vec(service(), 0..8),
        prop::collection::vec(slice(), 0..10),
    )
        .prop_map(|(services, slices)| fixtures::cluster(services, slices))
}

/// Every SERVICES entry points at exactly `backend_count` slots of its
/// generation, each with its MEMBERS entry, and ids are unique.
fn assert_consistent(maps: &FakeMaps) {
    let state = &maps.state;
    let mut ids = BTreeSet::new();
    for value in state.services.values() {
        assert!(
            ids.insert(value.service_id),
            "service id {} used twice",
            value.service_id
        );
        let slots = state.current_backends(value);
        assert_eq!(slots.len(), usize::from(value.backend_count));
        for (index, slot_value) in slots.iter().enumerate() {
            let slot = dataplane_common::BackendKey {
                service_id: value.service_id,
                generation: value.generation,
                index: index as u16,
            };
            assert!(maps.members.contains_key(&member_key(&slot, slot_value)));
        }
    }
}

/// Feeds one change to the model; returns the frontends a sync must look
/// at when it is a sync.
fn feed(model: &mut Model, change: &Change) -> Option<BTreeSet<crate::model::Frontend>> {
    let named = |kind: &str, index: &usize| ObjectName::new("default", format!("{kind}-{index}"));
    match change {
        Change::Service(service) => {
            let name = ObjectName::of(&service.metadata);
            let record = ServiceRecord::new(&name, service);
            model.update(Update::Service(name, Some(record)));
        }
        Change::DeleteService(index) => {
            model.update(Update::Service(named("svc", index), None));
        }
        Change::Slice(slice) => {
            model.update(Update::Slice(
                ObjectName::of(&slice.metadata),
                Some(SliceRecord::new(slice)),
            ));
        }
        Change::DeleteSlice(index) => {
            model.update(Update::Slice(named("slice", index), None));
        }
        Change::Node(node) => {
            let name = node.metadata.name.clone().unwrap_or_default();
            model.update(Update::Node(name, Some(NodeRecord::new(node))));
        }
        Change::DeleteNode(name) => {
            model.update(Update::Node((*name).to_owned(), None));
        }
        Change::Sync => return Some(model.recompute().frontends),
    }
    None
}

proptest! {
    /// The incremental model, fed any sequence of changes and synced at
    /// any points, always equals the model computed from scratch, and each
    /// sync names every frontend whose entry changed.
    #[test]
    fn the_incremental_model_always_equals_the_model_from_scratch(
        changes in prop::collection::vec(change(), 1..40),
    ) {
        let mut model = Model::new("node-a");
        let mut programmed = crate::model::DesiredDataplane::default();
        for change in changes.iter().chain([&Change::Sync]) {
            let Some(touched) = feed(&mut model, change) else { continue };
            let want = desired(model.cluster(), model.node());
            let got = model.desired();
            prop_assert_eq!(&got.frontends, &want.frontends);
            prop_assert_eq!(&got.health_checks, &want.health_checks);
            prop_assert_eq!(&got.node_addresses, &want.node_addresses);
            prop_assert_eq!(got.no_local_endpoints, want.no_local_endpoints);
            let mut want_skipped = [0; SkipReason::ALL.len()];
            for skipped in &want.skipped {
                want_skipped[skipped.category as usize] += 1;
            }
            let got_skipped = SkipReason::ALL.map(|reason| model.skipped().get(reason));
            prop_assert_eq!(got_skipped, want_skipped, "{:?}", want.skipped);
            // A sync that writes only the touched frontends reaches the
            // same maps as one that compares everything.
            let before = std::mem::replace(&mut programmed, got.clone());
            for frontend in before.frontends.keys().chain(got.frontends.keys()) {
                if before.frontends.get(frontend) != got.frontends.get(frontend) {
                    prop_assert!(touched.contains(frontend), "{} changed unannounced", frontend);
                }
            }
        }
    }

    #[test]
    fn the_model_accepts_anything_and_its_output_is_well_formed(cluster in cluster()) {
        let node = NodeInfo { name: "node-a".into(), zone: Some("zone-a".into()), being_deleted: false, internal_ip: None };
        let desired = desired(&cluster, &node);
        for (frontend, entry) in &desired.frontends {
            prop_assert!(cluster.services.contains_key(&entry.service));
            let node_port = matches!(frontend.scope, crate::model::Scope::NodePort | crate::model::Scope::NodePortLocal);
            prop_assert_eq!(frontend.ip.is_unspecified(), node_port);
            prop_assert!(frontend.port != 0);
            let mut sorted = entry.backends.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(&sorted, &entry.backends, "backends sorted and unique");
            prop_assert!(entry.backends.iter().all(|b| b.port != 0));
        }
    }

    #[test]
    fn any_sequence_of_cluster_states_leaves_consistent_maps(
        states in prop::collection::vec(cluster(), 1..4),
        poisoned in prop::option::of((0u8..8).prop_map(|o| Ipv4Addr::new(10, 0, 0, o))),
    ) {
        let node = NodeInfo { name: "node-a".into(), zone: None, being_deleted: false, internal_ip: None };
        // Writes of the poisoned backend fail, to drive the error paths too.
        let mut maps = FakeMaps { fail_backend_ip: poisoned, ..FakeMaps::default() };
        let mut mirror = PinnedState::default();
        for cluster in &states {
            let want = desired(cluster, &node);
            let report = mirror.apply(&want, &mut maps, &Limits::default());
            assert_consistent(&maps);
            prop_assert_eq!(&mirror, &maps.state, "the mirror is exact");
            // Everything desired is programmed, except what failed.
            let failed: BTreeSet<_> = report.failed.iter().map(|(f, _)| *f).collect();
            let programmed: BTreeSet<_> = maps.state.services.keys().filter_map(frontend_of).collect();
            for frontend in want.frontends.keys() {
                prop_assert!(programmed.contains(frontend) || failed.contains(frontend));
            }
            for frontend in &programmed {
                prop_assert!(want.frontends.contains_key(frontend) || failed.contains(frontend));
            }
            let retired = mirror.unreachable_backends();
            mirror.free_retired(&retired, &mut maps);
            prop_assert!(mirror.unreachable_backends().is_empty(), "no orphaned slots");
            assert_consistent(&maps);
        }
    }
}

/// Documents a manifest directory may hold that are not ours to serve, with
/// whether the parser must report them (a Service or EndpointSlice that
/// does not match the schema, a document without a kind) or pass over them
/// quietly (other kinds, empty documents).
const FOREIGN_DOCUMENTS: [(&str, bool); 5] = [
    (
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: default}\nspec: {ports: not-a-list}\n",
        true,
    ),
    (
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: broken}\naddressType: [IPv4]\nendpoints: 3\n",
        true,
    ),
    ("metadata: {name: no-kind}\nspec: {}\n", true),
    (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 3}\n",
        false,
    ),
    ("~\n", false),
];

/// How generated objects are laid out in a file.
#[derive(Clone, Copy, Debug)]
enum Layout {
    Documents,
    List,
}

fn manifest_text(objects: &[serde_json::Value], foreign: &[usize], layout: Layout) -> String {
    let mut documents: Vec<String> = match layout {
        Layout::Documents => objects
            .iter()
            .map(|object| serde_yaml::to_string(object).expect("objects serialise"))
            .collect(),
        Layout::List => vec![
            serde_yaml::to_string(&serde_json::json!({
                "apiVersion": "v1", "kind": "List", "items": objects,
            }))
            .expect("lists serialise"),
        ],
    };
    // Foreign documents go between and around ours.
    for (position, which) in foreign.iter().enumerate() {
        let at = position * 7 % (documents.len() + 1);
        documents.insert(at, FOREIGN_DOCUMENTS[*which].0.to_owned());
    }
    documents.join("---\n")
}

/// The objects the parser must keep: the first of each name, as
/// `kubectl apply` would refuse the later ones.
fn first_by_name<T: Clone>(
    objects: &[T],
    metadata: impl Fn(&T) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (std::collections::BTreeMap<ObjectName, T>, usize) {
    let mut kept = std::collections::BTreeMap::new();
    let mut duplicates = 0;
    for object in objects {
        let name = ObjectName::of(metadata(object));
        match kept.entry(name) {
            std::collections::btree_map::Entry::Occupied(_) => duplicates += 1,
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(object.clone());
            }
        }
    }
    (kept, duplicates)
}

proptest! {
    /// Through the real manifest parser (`parse_file`, what `--manifests`
    /// reads): any mix of generated Services and EndpointSlices, as
    /// documents or in a `kind: List`, with foreign and invalid documents
    /// among them, comes back exactly; every invalid document and every
    /// duplicate is reported once, nothing else is.
    #[test]
    fn the_manifest_parser_keeps_every_valid_object_and_reports_every_bad_one(
        services in prop::collection::vec(service(), 0..8),
        slices in prop::collection::vec(slice(), 0..8),
        foreign in prop::collection::vec(0..FOREIGN_DOCUMENTS.len(), 0..6),
        as_list in any::<bool>(),
    ) {
        let objects: Vec<serde_json::Value> = services
            .iter()
            .map(|s| serde_json::to_value(s).expect("a Service serialises"))
            .chain(slices.iter().map(|s| serde_json::to_value(s).expect("a slice serialises")))
            .collect();
        let layout = if as_list { Layout::List } else { Layout::Documents };
        let text = manifest_text(&objects, &foreign, layout);
        let loaded = crate::source::manifests::parse_file(std::path::Path::new("generated.yaml"), &text);

        let (want_services, service_duplicates) = first_by_name(&services, |s| &s.metadata);
        let (want_slices, slice_duplicates) = first_by_name(&slices, |s| &s.metadata);
        prop_assert!(!loaded.fatal, "{:?}", loaded.problems);
        let want_services: std::collections::BTreeMap<_, _> = want_services
            .iter()
            .map(|(name, s)| (name.clone(), ServiceRecord::new(name, s)))
            .collect();
        let want_slices: std::collections::BTreeMap<_, _> = want_slices
            .iter()
            .map(|(name, s)| (name.clone(), SliceRecord::new(s)))
            .collect();
        prop_assert_eq!(&loaded.cluster.services, &want_services);
        prop_assert_eq!(&loaded.cluster.endpoint_slices, &want_slices);
        let reported_foreign = foreign.iter().filter(|f| FOREIGN_DOCUMENTS[**f].1).count();
        prop_assert_eq!(
            loaded.problems.len(),
            reported_foreign + service_duplicates + slice_duplicates,
            "{:?}", loaded.problems
        );
    }

    /// A file cut anywhere (a writer caught mid-write, a truncated copy)
    /// never panics the parser, and every document that ended before the
    /// cut still comes back exactly.
    #[test]
    fn a_manifest_cut_anywhere_keeps_the_documents_before_the_cut(
        services in prop::collection::vec(service(), 1..6),
        cut_fraction in 0.0f64..1.0,
    ) {
        let (want, _) = first_by_name(&services, |s| &s.metadata);
        let documents: Vec<String> = want
            .values()
            .map(|s| serde_yaml::to_string(s).expect("a Service serialises"))
            .collect();
        let text = documents.join("---\n");
        let mut cut = (text.len() as f64 * cut_fraction) as usize;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        let loaded = crate::source::manifests::parse_file(std::path::Path::new("cut.yaml"), &text[..cut]);
        let mut end = 0;
        for (name, service) in &want {
            end += serde_yaml::to_string(service).expect("a Service serialises").len() + "---\n".len();
            if end <= cut {
                prop_assert_eq!(
                    loaded.cluster.services.get(name),
                    Some(&ServiceRecord::new(name, service))
                );
            }
        }
        prop_assert!(loaded.cluster.services.len() <= want.len());
    }
}
