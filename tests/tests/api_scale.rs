//! The API path at scale: the real agent lists 50,000 Services and 50,000
//! EndpointSlices through the stand-in (kube-rs pages of 500, one
//! consistent snapshot), then follows 1,000 endpoint changes made in
//! batches; after each batch the pinned maps hold exactly the new
//! backends of every changed Service, and traffic through the one Service
//! whose pods are real follows its changes.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use dataplane_agent::dataplane::{maps::open_pinned, pins::PinLayout};
use dataplane_common::{
    BackendKey, BackendValue, IPPROTO_TCP, SCOPE_CLUSTER, ServiceKey, ServiceValue, map_names,
};
use dataplane_testbed::{Testbed, apiserver::ApiServer, probe::tally, testbed::AgentSource};
use serde_json::{Value, json};

const SERVICES: u32 = 50_000;
const CHANGES: u32 = 1_000;
const BATCH: u32 = 100;
/// The Service whose endpoints are the testbed's real pods.
const HOT: u32 = 0;

/// Service `n`'s ClusterIP: 10.100.0.0/16 and up.
fn cluster_ip(n: u32) -> Ipv4Addr {
    Ipv4Addr::from(0x0a64_0000 + n)
}

/// Endpoint addresses of filler Service `n` in version `version` of its
/// slice: two per Service, never dialled.
fn filler_endpoints(n: u32, version: u32) -> Vec<Ipv4Addr> {
    (0..2)
        .map(|e| Ipv4Addr::from(0x0ac9_0000 + ((n * 2 + e) << 4) + version % 16))
        .collect()
}

fn service(n: u32) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("svc-{n}"), "namespace": format!("ns-{}", n % 100)},
        "spec": {"clusterIP": cluster_ip(n).to_string(),
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    })
}

fn slice(n: u32, endpoints: &[Ipv4Addr]) -> Value {
    let endpoints: Vec<Value> = endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{n}-1"), "namespace": format!("ns-{}", n % 100),
                     "labels": {"kubernetes.io/service-name": format!("svc-{n}")}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

/// What the pinned maps say a ClusterIP balances over.
struct PinnedBackends {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
}

impl PinnedBackends {
    fn open(tb: &Testbed) -> Self {
        let layout = PinLayout::new(&tb.pin_dir);
        Self {
            services: open_pinned(&layout, map_names::SERVICES).unwrap(),
            backends: open_pinned(&layout, map_names::BACKENDS).unwrap(),
        }
    }

    fn of(&self, ip: Ipv4Addr) -> Option<BTreeSet<Ipv4Addr>> {
        let key = ServiceKey {
            vip_be: u32::from_ne_bytes(ip.octets()),
            port_be: 80u16.to_be(),
            protocol: IPPROTO_TCP,
            scope: SCOPE_CLUSTER,
        };
        let value = self.services.get(&key, 0).ok()?;
        (0..value.backend_count)
            .map(|index| {
                let slot = BackendKey {
                    service_id: value.service_id,
                    generation: value.generation,
                    index,
                };
                let backend = self.backends.get(&slot, 0).ok()?;
                Some(Ipv4Addr::from(backend.ip_be.to_ne_bytes()))
            })
            .collect()
    }
}

#[test]
fn fifty_thousand_services_listed_in_pages_then_a_thousand_endpoint_changes() {
    let mut tb = Testbed::new().unwrap();
    let client = tb.host("client").unwrap();
    let pods = [tb.host("pod1").unwrap(), tb.host("pod2").unwrap()];
    for pod in &pods {
        tb.serve(pod, 8080).unwrap();
    }
    let api = ApiServer::start(Some(&tb.node_netns)).unwrap();
    let mut objects = vec![json!({"apiVersion": "v1", "kind": "Node",
                                  "metadata": {"name": tb.node_name.clone()}})];
    for n in 0..SERVICES {
        objects.push(service(n));
        let endpoints = if n == HOT {
            vec![pods[0].ip]
        } else {
            filler_endpoints(n, 0)
        };
        objects.push(slice(n, &endpoints));
    }
    api.apply_all(objects).unwrap();
    let kubeconfig = tb.work_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();

    let started = Instant::now();
    tb.start_agent_within(
        &AgentSource::Kubeconfig(&kubeconfig),
        &[],
        Duration::from_secs(300),
    )
    .unwrap();
    eprintln!(
        "50,000 Services listed and programmed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let lists = api.requests().lists;
    assert!(
        lists.get("Service").copied().unwrap_or(0) >= 100,
        "Services were listed in pages of 500: {lists:?}"
    );
    assert!(lists.get("EndpointSlice").copied().unwrap_or(0) >= 100);

    let pinned = PinnedBackends::open(&tb);
    for n in [1, SERVICES / 2, SERVICES - 1] {
        assert_eq!(
            pinned.of(cluster_ip(n)),
            Some(filler_endpoints(n, 0).into_iter().collect()),
            "svc-{n} programmed from the paginated list"
        );
    }
    let hot = format!("{}:80", cluster_ip(HOT));
    let served = |count| {
        let attempts = tb.connect(&client, &hot, count).unwrap();
        assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
        tally(&attempts).into_keys().collect::<Vec<String>>()
    };
    assert_eq!(served(5), ["pod1"]);

    // 1,000 changes in batches of 100, spread over the whole cluster; each
    // batch also moves the hot Service to the other pod.
    for batch in 0..CHANGES / BATCH {
        let version = batch + 1;
        let changed: Vec<u32> = (0..BATCH - 1)
            .map(|i| 1 + (batch * 7_919 + i * 499) % (SERVICES - 1))
            .collect();
        let hot_pod = &pods[(batch as usize + 1) % 2];
        let mut objects: Vec<Value> = changed
            .iter()
            .map(|n| slice(*n, &filler_endpoints(*n, version)))
            .collect();
        objects.push(slice(HOT, &[hot_pod.ip]));
        api.apply_all(objects).unwrap();
        tb.wait_until(
            &format!("batch {batch} in the maps"),
            Duration::from_secs(60),
            || {
                Ok(changed.iter().all(|n| {
                    pinned.of(cluster_ip(*n))
                        == Some(filler_endpoints(*n, version).into_iter().collect())
                }) && pinned.of(cluster_ip(HOT)) == Some(BTreeSet::from([hot_pod.ip])))
            },
        )
        .unwrap();
        assert_eq!(served(3), [hot_pod.name.as_str()], "batch {batch}");
    }
    // Unchanged Services kept their backends throughout.
    assert_eq!(
        pinned.of(cluster_ip(2)),
        Some(filler_endpoints(2, 0).into_iter().collect())
    );
}
