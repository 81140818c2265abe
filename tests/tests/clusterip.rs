//! The real agent binary on a manifest directory, real TCP from a client
//! namespace inside the test's cgroup, through a ClusterIP.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, time::Duration};

use dataplane_testbed::{
    Host, Testbed,
    manifests::{Ep, Svc, http_service_on, join, slice},
    probe::tally,
    testbed::AgentSource,
};

const VIP: &str = "10.96.0.10";

fn service(name: &str, cluster_ip: &str, port: u16, backends: &[&Host]) -> String {
    http_service_on(name, cluster_ip, port, backends)
}

/// Client and two backend pods serving on 8080.
fn two_backends() -> (Testbed, Host, Host, Host) {
    let mut tb = Testbed::new().expect("testbed");
    let client = tb.host("client").expect("client");
    let pod1 = tb.host("pod1").expect("pod1");
    let pod2 = tb.host("pod2").expect("pod2");
    tb.serve(&pod1, 8080).expect("serve pod1");
    tb.serve(&pod2, 8080).expect("serve pod2");
    (tb, client, pod1, pod2)
}

#[test]
fn clusterip_reaches_both_backends_and_each_sees_the_client_ip() {
    let (tb, client, pod1, pod2) = two_backends();
    tb.write_manifest("web.yaml", &service("web", VIP, 80, &[&pod1, &pod2]))
        .unwrap();
    tb.start_agent(&[]).unwrap();

    let attempts = tb.connect(&client, &format!("{VIP}:80"), 60).unwrap();
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "failed attempts: {failed:?}");
    let by_backend = tally(&attempts);
    assert_eq!(
        by_backend.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["pod1".to_string(), "pod2".to_string()]),
        "both backends must answer: {by_backend:?}"
    );
    for (backend, seen) in &by_backend {
        assert_eq!(
            seen.sources.keys().cloned().collect::<Vec<_>>(),
            vec![client.ip.to_string()],
            "{backend} must see the client's own address"
        );
    }
    for attempt in &attempts {
        assert_eq!(
            attempt.peer.as_deref(),
            Some("10.96.0.10:80"),
            "getpeername() shows the Service"
        );
        assert_eq!(
            attempt.local.as_deref(),
            Some(client.ip.to_string().as_str())
        );
    }
}

#[test]
fn service_without_endpoints_refuses_at_once() {
    let (tb, client, _pod1, _pod2) = two_backends();
    tb.write_manifest("empty.yaml", &service("empty", VIP, 80, &[]))
        .unwrap();
    let mut agent = tb.agent_command(&AgentSource::Manifests, &[]).unwrap();
    agent.env("RUST_LOG", "info,dataplane_ebpf=debug");
    tb.launch_agent(agent).unwrap();
    let attempts = tb.connect(&client, &format!("{VIP}:80"), 5).unwrap();
    for attempt in attempts {
        assert_eq!(attempt.errno, Some(libc::ECONNREFUSED), "{attempt:?}");
        assert!(
            attempt.micros < 1_000_000,
            "refused, not timed out: {attempt:?}"
        );
    }
    // The program's own debug record, forwarded through aya-log.
    tb.wait_until("the refusal is logged", Duration::from_secs(5), || {
        Ok(tb
            .agent_log()
            .contains("refused 10.96.0.10:80 proto 6: no usable backend"))
    })
    .unwrap();
}

#[test]
fn bad_manifests_are_logged_by_name_and_valid_services_keep_working() {
    let (tb, client, pod1, pod2) = two_backends();
    tb.write_manifest("good.yaml", &service("web", VIP, 80, &[&pod1, &pod2]))
        .unwrap();
    tb.write_manifest("broken.yaml", "kind: Service\nmetadata: [unclosed\n")
        .unwrap();
    tb.write_manifest(
        "invalid.yaml",
        &format!(
            "{}---\n{}",
            service("bad-ip", "10.96.0.300", 80, &[&pod1]),
            service("port-zero", "10.96.0.12", 0, &[&pod1])
        ),
    )
    .unwrap();
    tb.start_agent(&[]).unwrap();

    let log = tb.agent_log();
    assert!(
        log.contains("broken.yaml document 1: invalid YAML"),
        "{log}"
    );
    assert!(
        log.contains("default/bad-ip") && log.contains("10.96.0.300"),
        "{log}"
    );
    assert!(
        log.contains("default/port-zero") && log.contains("invalid number 0"),
        "{log}"
    );

    let attempts = tb.connect(&client, &format!("{VIP}:80"), 20).unwrap();
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
    let services = tb.dump_services().unwrap();
    assert_eq!(
        services.len(),
        1,
        "only the valid Service is programmed: {services:?}"
    );
}

#[test]
fn manifest_changes_apply_while_running_without_failing_a_connection() {
    let (tb, client, pod1, pod2) = two_backends();
    tb.write_manifest("web.yaml", &service("web", VIP, 80, &[&pod1]))
        .unwrap();
    tb.start_agent(&["--min-sync-period", "10ms"]).unwrap();
    let only_pod1 = tally(&tb.connect(&client, &format!("{VIP}:80"), 10).unwrap());
    assert_eq!(only_pod1.keys().collect::<Vec<_>>(), ["pod1"]);

    // Endpoints change under a steady stream of connections: none may fail.
    let sets: [&[&Host]; 3] = [&[&pod2], &[&pod1, &pod2], &[&pod1]];
    let during = tb
        .connect_during(&client, &format!("{VIP}:80"), Duration::ZERO, || {
            for round in 0..100 {
                let backends = sets[round % sets.len()];
                tb.write_manifest("web.yaml", &service("web", VIP, 80, backends))
                    .unwrap();
                std::thread::sleep(Duration::from_millis(40));
            }
        })
        .unwrap();
    let updates = tb.agent_log().matches("updated=1").count();
    assert!(
        updates >= 50,
        "the agent applied only {updates} of 100 changes"
    );
    assert!(
        during.len() >= 500,
        "only {} connections during the changes",
        during.len()
    );
    let failed: Vec<_> = during.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "connections failed during endpoint changes: {failed:?}"
    );

    tb.write_manifest("web.yaml", &service("web", VIP, 80, &[&pod2]))
        .unwrap();
    let pod2_only = serde_json::json!([format!("{}:8080", pod2.ip)]);
    tb.wait_until("pod2 replaced pod1", Duration::from_secs(10), || {
        let services = tb.dump_services()?;
        Ok(services.first().is_some_and(|s| s["backends"] == pod2_only))
    })
    .unwrap();
    let only_pod2 = tally(&tb.connect(&client, &format!("{VIP}:80"), 20).unwrap());
    assert_eq!(
        only_pod2.keys().collect::<Vec<_>>(),
        ["pod2"],
        "a removed endpoint is never chosen"
    );

    std::fs::remove_file(tb.manifests.join("web.yaml")).unwrap();
    tb.wait_until("the Service is gone", Duration::from_secs(10), || {
        Ok(tb.dump_services()?.is_empty())
    })
    .unwrap();
    let after = tb.connect(&client, &format!("{VIP}:80"), 1).unwrap();
    assert!(
        !after[0].ok && after[0].backend.is_none(),
        "a deleted Service's address is no longer translated: {after:?}"
    );
}

#[test]
fn a_crashed_agent_leaves_traffic_flowing_and_a_restart_adopts_the_maps() {
    let (tb, client, pod1, pod2) = two_backends();
    tb.write_manifest("web.yaml", &service("web", VIP, 80, &[&pod1, &pod2]))
        .unwrap();
    tb.start_agent(&[]).unwrap();
    let ids_before = tb.dump_services().unwrap();

    tb.stop_agent(libc::SIGKILL).unwrap();
    let attempts = tb.connect(&client, &format!("{VIP}:80"), 20).unwrap();
    assert!(
        attempts.iter().all(|a| a.ok),
        "pinned programs keep serving: {attempts:?}"
    );

    tb.start_agent(&[]).unwrap();
    let restart = tb.agent_startup_log(2);
    assert!(
        restart.contains("adopted pinned maps services=1 backends=2")
            && restart.contains("updated=0"),
        "the restarted agent adopts the maps and rewrites nothing:\n{restart}"
    );
    assert_eq!(
        tb.dump_services().unwrap(),
        ids_before,
        "ids and slots are stable"
    );
    let attempts = tb.connect(&client, &format!("{VIP}:80"), 20).unwrap();
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
}

#[test]
fn cleanup_detaches_every_program_and_removes_every_pin() {
    let (tb, client, pod1, pod2) = two_backends();
    tb.write_manifest("web.yaml", &service("web", VIP, 80, &[&pod1, &pod2]))
        .unwrap();
    tb.start_agent(&[]).unwrap();
    assert!(
        tb.connect(&client, &format!("{VIP}:80"), 3)
            .unwrap()
            .iter()
            .all(|a| a.ok)
    );
    let program_ids = dataplane_testbed::testbed::pinned_program_ids(&tb.pin_dir).unwrap();
    assert_eq!(
        program_ids.len(),
        dataplane_agent::dataplane::loader::SOCKET_PROGRAMS.len(),
        "every socket-LB program is attached"
    );
    tb.stop_agent(libc::SIGTERM).unwrap();

    let output = tb.agent_cli(&["cleanup"]).unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!tb.pin_dir.exists(), "no pin is left behind");
    // The kernel releases a detached link's program from a worker, a moment
    // after its last reference is gone.
    tb.wait_until("the programs are unloaded", Duration::from_secs(5), || {
        let loaded = dataplane_testbed::testbed::loaded_program_ids()?;
        Ok(program_ids.iter().all(|id| !loaded.contains(id)))
    })
    .unwrap();
    // The VIP is just an unrouted address again.
    let attempts = tb.connect(&client, &format!("{VIP}:80"), 1).unwrap();
    assert!(
        !attempts[0].ok && attempts[0].backend.is_none(),
        "{attempts:?}"
    );
}

#[test]
fn tcp_and_udp_on_one_port_number_are_independent_frontends() {
    let (tb, client, pod1, pod2) = two_backends();
    // Named ports: the TCP port's endpoints come from one slice (pod1), the
    // UDP port's from another (pod2).
    let manifest = join(&[
        Svc::new("dns", "10.96.0.53")
            .port("dns-tcp", 53, "TCP", 8080)
            .port("dns", 53, "UDP", 8080)
            .yaml(),
        slice(
            "dns-a",
            "dns",
            &[("dns-tcp", 8080, "TCP")],
            &[Ep::ready(&pod1)],
        ),
        slice("dns-b", "dns", &[("dns", 8080, "UDP")], &[Ep::ready(&pod2)]),
    ]);
    tb.write_manifest("dns.yaml", &manifest).unwrap();
    tb.start_agent(&[]).unwrap();

    let tcp = tb.connect(&client, "10.96.0.53:53", 10).unwrap();
    assert_eq!(tally(&tcp).keys().collect::<Vec<_>>(), ["pod1"], "{tcp:?}");
    for mode in ["udp", "udp-unconnected"] {
        let udp = tb.exchange(&client, "10.96.0.53:53", 10, mode).unwrap();
        assert_eq!(
            tally(&udp).keys().collect::<Vec<_>>(),
            ["pod2"],
            "{mode}: {udp:?}"
        );
        for attempt in &udp {
            assert_eq!(attempt.source_seen, Some(client.ip.to_string()));
            assert_eq!(attempt.peer.as_deref(), Some("10.96.0.53:53"), "{mode}");
        }
    }
}

/// The periodic check reads SERVICES off the sync loop; a read that a sync
/// overlapped is void (never a false alarm), and a frontend another writer
/// deleted comes back.
#[test]
fn the_periodic_check_restores_a_frontend_deleted_behind_the_agents_back() {
    use aya::maps::{HashMap, MapData};
    use dataplane_agent::dataplane::{maps::open_pinned, pins::PinLayout};
    use dataplane_common::{IPPROTO_TCP, SCOPE_CLUSTER, ServiceKey, ServiceValue, map_names};

    let (tb, client, pod1, pod2) = two_backends();
    tb.write_manifest("web.yaml", &service("web", VIP, 80, &[&pod1, &pod2]))
        .unwrap();
    let mut agent = tb
        .agent_command(
            &AgentSource::Manifests,
            &["--sync-period", "200ms", "--min-sync-period", "0s"],
        )
        .unwrap();
    // Every check's read returns 100 ms after it read the map, so the
    // syncs below overlap them: each must drop its read (or make it where
    // no sync runs), never compare a stale one and call for a full resync.
    agent.env(
        dataplane_agent::dataplane::failpoint::HOLD_SERVICES_READ_MS,
        "100",
    );
    tb.launch_agent(agent).unwrap();
    for round in 0..40 {
        let endpoints: &[&Host] = if round % 2 == 0 {
            &[&pod1]
        } else {
            &[&pod1, &pod2]
        };
        tb.write_manifest("web.yaml", &service("web", VIP, 80, endpoints))
            .unwrap();
        std::thread::sleep(Duration::from_millis(25));
    }
    tb.write_manifest("web.yaml", &service("web", VIP, 80, &[&pod1, &pod2]))
        .unwrap();
    let layout = PinLayout::new(&tb.pin_dir);
    let mut services: HashMap<MapData, ServiceKey, ServiceValue> =
        open_pinned(&layout, map_names::SERVICES).unwrap();
    let key = ServiceKey {
        vip_be: u32::from(VIP.parse::<std::net::Ipv4Addr>().unwrap()).to_be(),
        port_be: 80u16.to_be(),
        protocol: IPPROTO_TCP,
        scope: SCOPE_CLUSTER,
    };
    tb.wait_until("both endpoints are back", Duration::from_secs(5), || {
        Ok(services.get(&key, 0).is_ok_and(|v| v.backend_count == 2))
    })
    .unwrap();
    assert!(
        !tb.agent_log().contains("SERVICES differs"),
        "a check that overlapped a sync raised a false alarm:\n{}",
        tb.agent_log()
    );

    // Another writer (an operator's bpftool, a crashed tool) deletes it.
    services.remove(&key).unwrap();
    tb.wait_until(
        "the periodic check restores the frontend",
        Duration::from_secs(10),
        || Ok(services.get(&key, 0).is_ok()),
    )
    .unwrap();
    assert!(
        tb.agent_log()
            .contains("SERVICES differs from what this agent wrote: full resync"),
        "{}",
        tb.agent_log()
    );
    let attempts = tb.connect(&client, &format!("{VIP}:80"), 10).unwrap();
    assert!(attempts.iter().all(|a| a.ok), "{attempts:?}");
}
