//! The socket-LB programs on their own: maps written directly (no agent),
//! real sockets from a namespace inside the test's cgroup. Each test states
//! one rule of the datapath.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;

use dataplane_agent::dataplane::{
    codec::{backend_value, service_key},
    loader::LoadedObject,
    maps::{self, KernelMaps},
    pins::{self, PinLayout},
    state::MapStore,
};
use dataplane_agent::model::{Backend, Frontend, Protocol};
use dataplane_common::{BackendKey, ServiceValue, Stat};
use dataplane_testbed::{Host, Testbed, probe::tally};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

struct Programs {
    tb: Testbed,
    client: Host,
    pod1: Host,
    pod2: Host,
    maps: KernelMaps,
}

fn attached() -> Programs {
    let mut tb = Testbed::new().unwrap();
    let client = tb.host("client").unwrap();
    let pod1 = tb.host("pod1").unwrap();
    let pod2 = tb.host("pod2").unwrap();
    tb.serve(&pod1, 8080).unwrap();
    tb.serve(&pod2, 8080).unwrap();
    let layout = PinLayout::new(&tb.pin_dir);
    pins::ensure_bpffs_dir(&layout).unwrap();
    let mut loaded = LoadedObject::load(layout).unwrap();
    let maps = loaded.take_maps().unwrap();
    loaded.attach_socket_lb(&tb.cgroup).unwrap();
    Programs {
        tb,
        client,
        pod1,
        pod2,
        maps,
    }
}

fn put_slot(maps: &mut KernelMaps, generation: u16, index: u16, host: &Host) {
    let key = BackendKey {
        service_id: 7,
        generation,
        index,
    };
    maps.put_backend(&key, &backend_value(&Backend::routed(host.ip, 8080)))
        .unwrap();
}

/// Service 7 on VIP:80 over `protocol`, at `generation` with
/// `backend_count` slots.
fn put_frontend(maps: &mut KernelMaps, protocol: Protocol, generation: u16, backend_count: u16) {
    let value = ServiceValue {
        service_id: 7,
        backend_count,
        generation,
        flags: 0,
        affinity_timeout_s: 0,
    };
    let frontend = Frontend::cluster(VIP, 80, protocol);
    maps.put_service(&service_key(&frontend), &value).unwrap();
}

fn put_service(maps: &mut KernelMaps, generation: u16, backend_count: u16) {
    put_frontend(maps, Protocol::Tcp, generation, backend_count);
}

fn stat(tb: &Testbed, wanted: Stat) -> u64 {
    maps::read_stats(&PinLayout::new(&tb.pin_dir))
        .unwrap()
        .into_iter()
        .find_map(|(s, v)| (s == wanted).then_some(v))
        .unwrap()
}

#[test]
fn only_the_current_generation_is_chosen() {
    let Programs {
        tb,
        client,
        pod1,
        pod2,
        mut maps,
    } = attached();
    // Generation 0 holds pod1, generation 1 holds pod2; the Service entry
    // points at generation 1.
    put_slot(&mut maps, 0, 0, &pod1);
    put_slot(&mut maps, 1, 0, &pod2);
    put_service(&mut maps, 1, 1);
    let served = tally(&tb.connect(&client, "10.96.0.10:80", 20).unwrap());
    assert_eq!(served.keys().collect::<Vec<_>>(), ["pod2"]);
    assert_eq!(stat(&tb, Stat::SockTranslated), 20);
}

#[test]
fn addresses_that_are_not_services_are_left_alone() {
    let Programs {
        tb,
        client,
        pod1,
        mut maps,
        ..
    } = attached();
    put_slot(&mut maps, 0, 0, &pod1);
    put_service(&mut maps, 0, 1);
    // The backend's own address, and the VIP on another port.
    let direct = tb
        .connect(&client, &format!("{}:8080", pod1.ip), 3)
        .unwrap();
    assert!(
        direct
            .iter()
            .all(|a| a.ok && a.peer == Some(format!("{}:8080", pod1.ip))),
        "{direct:?}"
    );
    let other_port = tb.connect(&client, "10.96.0.10:81", 1).unwrap();
    assert!(
        !other_port[0].ok && other_port[0].errno != Some(libc::ECONNREFUSED),
        "{other_port:?}"
    );
    assert_eq!(stat(&tb, Stat::SockTranslated), 0);
}

/// A Service entry claiming `backend_count` backends with no slot written.
fn assert_refused_and_counted(backend_count: u16, counted_as: Stat) {
    let Programs {
        tb,
        client,
        mut maps,
        ..
    } = attached();
    put_service(&mut maps, 0, backend_count);
    let attempts = tb.connect(&client, "10.96.0.10:80", 3).unwrap();
    assert!(
        attempts.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)),
        "{attempts:?}"
    );
    assert_eq!(stat(&tb, counted_as), 3);
}

#[test]
fn zero_backends_is_refused_and_counted() {
    assert_refused_and_counted(0, Stat::SockRefusedNoEndpoints);
}

#[test]
fn a_missing_backend_slot_is_refused_and_counted() {
    assert_refused_and_counted(1, Stat::SockBackendMissing);
}

#[test]
fn getpeername_shows_the_service_and_the_backend_sees_the_client() {
    let Programs {
        tb,
        client,
        pod1,
        mut maps,
        ..
    } = attached();
    put_slot(&mut maps, 0, 0, &pod1);
    put_service(&mut maps, 0, 1);
    let attempts = tb.connect(&client, "10.96.0.10:80", 5).unwrap();
    for attempt in attempts {
        assert_eq!(attempt.peer.as_deref(), Some("10.96.0.10:80"));
        assert_eq!(attempt.source_seen, Some(client.ip.to_string()));
    }
}

#[test]
fn udp_replies_come_from_the_service_address_on_connected_and_unconnected_sockets() {
    let Programs {
        tb,
        client,
        pod1,
        mut maps,
        ..
    } = attached();
    put_slot(&mut maps, 0, 0, &pod1);
    put_frontend(&mut maps, Protocol::Udp, 0, 1);
    for mode in ["udp", "udp-unconnected"] {
        let attempts = tb.exchange(&client, "10.96.0.10:80", 5, mode).unwrap();
        for attempt in attempts {
            assert!(attempt.ok, "{mode}: {attempt:?}");
            assert_eq!(attempt.backend.as_deref(), Some("pod1"), "{mode}");
            assert_eq!(attempt.source_seen, Some(client.ip.to_string()), "{mode}");
            assert_eq!(
                attempt.peer.as_deref(),
                Some("10.96.0.10:80"),
                "{mode}: the reply must appear to come from the Service"
            );
        }
    }
}

#[test]
fn a_tcp_service_does_not_capture_udp_on_the_same_port() {
    let Programs {
        tb,
        client,
        pod1,
        mut maps,
        ..
    } = attached();
    put_slot(&mut maps, 0, 0, &pod1);
    put_service(&mut maps, 0, 1);
    let attempts = tb
        .exchange(&client, "10.96.0.10:80", 1, "udp-unconnected")
        .unwrap();
    assert!(
        !attempts[0].ok,
        "UDP to a TCP-only frontend is not translated: {attempts:?}"
    );
    assert_eq!(stat(&tb, Stat::SockTranslated), 0);
}

#[test]
fn udp_to_a_service_without_endpoints_is_refused() {
    let Programs {
        tb,
        client,
        mut maps,
        ..
    } = attached();
    put_frontend(&mut maps, Protocol::Udp, 0, 0);
    for mode in ["udp", "udp-unconnected"] {
        let attempts = tb.exchange(&client, "10.96.0.10:80", 2, mode).unwrap();
        assert!(
            attempts.iter().all(|a| a.errno == Some(libc::ECONNREFUSED)),
            "{mode}: {attempts:?}"
        );
    }
}
