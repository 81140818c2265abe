//! kube-proxy's Service semantics, each with real traffic: the real agent on
//! a manifest directory, a client namespace inside the test's cgroup, pods
//! serving on 8080.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, time::Duration};

use dataplane_testbed::{
    Host, Testbed,
    manifests::{Ep, Svc, http_service, join, node, slice},
    probe::{Attempt, tally},
};

const VIP: &str = "10.96.0.10";
const TARGET: &str = "10.96.0.10:80";

/// A client and `pods` pods, each serving.
fn cluster(pods: usize) -> (Testbed, Host, Vec<Host>) {
    let mut tb = Testbed::new().expect("testbed");
    let client = tb.host("client").expect("client");
    let pods = (1..=pods)
        .map(|i| {
            let pod = tb.host(&format!("pod{i}")).expect("pod");
            tb.serve(&pod, 8080).expect("serve");
            pod
        })
        .collect();
    (tb, client, pods)
}

fn backends_of(attempts: &[Attempt]) -> BTreeSet<String> {
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "failed attempts: {failed:?}");
    tally(attempts).into_keys().collect()
}

fn names(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

fn affinity_service(pods: &[&Host], timeout_s: u32) -> String {
    let endpoints: Vec<Ep> = pods.iter().map(|p| Ep::ready(p)).collect();
    join(&[
        Svc::new("web", VIP)
            .port("http", 80, "TCP", 8080)
            .spec("sessionAffinity: ClientIP")
            .spec(&format!(
                "sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout_s}}}}}"
            ))
            .yaml(),
        slice("web-1", "web", &[("http", 8080, "TCP")], &endpoints),
    ])
}

#[test]
fn backend_choice_is_uniform_over_three_thousand_connections() {
    let (tb, client, pods) = cluster(3);
    let endpoints: Vec<Ep> = pods.iter().map(Ep::ready).collect();
    tb.write_manifest("web.yaml", &http_service("web", VIP, 80, &endpoints))
        .unwrap();
    tb.start_agent(&[]).unwrap();
    let attempts = tb.connect(&client, TARGET, 3000).unwrap();
    let served = tally(&attempts);
    assert_eq!(backends_of(&attempts), names(&["pod1", "pod2", "pod3"]));
    // 1000 expected each, standard deviation ~26: +-150 is about 6 sigma.
    for (backend, seen) in &served {
        assert!(
            (850..=1150).contains(&seen.served),
            "{backend} served {} of 3000: {served:?}",
            seen.served
        );
    }
}

#[test]
fn session_affinity_sticks_per_client_then_expires() {
    let (mut tb, client, pods) = cluster(4);
    let other_client = tb.host("client2").unwrap();
    let all: Vec<&Host> = pods.iter().collect();
    tb.write_manifest("web.yaml", &affinity_service(&all, 1))
        .unwrap();
    tb.start_agent(&[]).unwrap();

    for who in [&client, &other_client] {
        let attempts = tb.connect(who, TARGET, 30).unwrap();
        assert_eq!(
            backends_of(&attempts).len(),
            1,
            "{}: {attempts:?}",
            who.name
        );
        for attempt in &attempts {
            assert_eq!(attempt.source_seen, Some(who.ip.to_string()));
        }
    }
    // Operators can see both clients' affinity and the Service by name.
    let affinity = tb.agent_cli(&["dump", "affinity", "-o", "json"]).unwrap();
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&affinity.stdout).unwrap();
    assert_eq!(entries.len(), 2, "one entry per client: {entries:?}");
    let table = tb.agent_cli(&["dump", "services"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("default/web:http") && table.contains("1s"),
        "{table}"
    );

    // After the 1 s timeout each new connection is a fresh uniform choice:
    // eight of them all landing on one of four backends has p = 4^-7.
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(1300));
        seen.extend(backends_of(&tb.connect(&client, TARGET, 1).unwrap()));
    }
    assert!(seen.len() >= 2, "affinity never expired: {seen:?}");
}

#[test]
fn session_affinity_moves_when_its_backend_goes_and_can_be_switched_off() {
    let (tb, client, pods) = cluster(3);
    let all: Vec<&Host> = pods.iter().collect();
    tb.write_manifest("web.yaml", &affinity_service(&all, 3600))
        .unwrap();
    tb.start_agent(&[]).unwrap();
    let first = backends_of(&tb.connect(&client, TARGET, 20).unwrap());
    assert_eq!(first.len(), 1);
    let chosen = first.iter().next().unwrap().clone();

    // Remove the affine backend: the client moves, and sticks again.
    let remaining: Vec<&Host> = pods.iter().filter(|p| p.name != chosen).collect();
    tb.write_manifest("web.yaml", &affinity_service(&remaining, 3600))
        .unwrap();
    tb.wait_until("the backend is removed", Duration::from_secs(10), || {
        Ok(tb.dump_services()?[0]["backends"].as_array().map(Vec::len) == Some(2))
    })
    .unwrap();
    let moved = backends_of(&tb.connect(&client, TARGET, 20).unwrap());
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(
        !moved.contains(&chosen),
        "still sent to the removed {chosen}"
    );

    // Switch affinity off at run time: new connections spread again.
    let endpoints: Vec<Ep> = remaining.iter().map(|p| Ep::ready(p)).collect();
    tb.write_manifest("web.yaml", &http_service("web", VIP, 80, &endpoints))
        .unwrap();
    tb.wait_until("affinity is off", Duration::from_secs(10), || {
        Ok(tb.dump_services()?[0]["affinity_timeout_s"].is_null())
    })
    .unwrap();
    assert_eq!(
        backends_of(&tb.connect(&client, TARGET, 60).unwrap()).len(),
        2
    );
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let (tb, client, pods) = cluster(3);
    let (pod1, pod2, pod3) = (&pods[0], &pods[1], &pods[2]);
    tb.write_manifest(
        "web.yaml",
        &http_service(
            "web",
            VIP,
            80,
            &[
                Ep::ready(pod1),
                Ep::terminating_serving(pod2),
                Ep::not_ready(pod3),
            ],
        ),
    )
    .unwrap();
    tb.start_agent(&[]).unwrap();
    assert_eq!(
        backends_of(&tb.connect(&client, TARGET, 30).unwrap()),
        names(&["pod1"])
    );

    // pod1 goes: only the serving terminating pod2 remains eligible.
    tb.write_manifest(
        "web.yaml",
        &http_service(
            "web",
            VIP,
            80,
            &[Ep::terminating_serving(pod2), Ep::not_ready(pod3)],
        ),
    )
    .unwrap();
    tb.wait_until("the fallback applies", Duration::from_secs(10), || {
        Ok(tb.dump_services()?[0]["backends"] == serde_json::json!([format!("{}:8080", pod2.ip)]))
    })
    .unwrap();
    assert_eq!(
        backends_of(&tb.connect(&client, TARGET, 30).unwrap()),
        names(&["pod2"])
    );
}

#[test]
fn internal_traffic_policy_local_uses_only_this_nodes_endpoints() {
    let (tb, client, pods) = cluster(2);
    let local_service = |endpoints: &[Ep]| {
        join(&[
            Svc::new("web", VIP)
                .port("http", 80, "TCP", 8080)
                .spec("internalTrafficPolicy: Local")
                .yaml(),
            slice("web-1", "web", &[("http", 8080, "TCP")], endpoints),
        ])
    };
    // The agent runs as node-a; pod2 lives on node-b.
    tb.write_manifest(
        "web.yaml",
        &local_service(&[Ep::ready(&pods[0]), Ep::ready(&pods[1]).on_node("node-b")]),
    )
    .unwrap();
    tb.start_agent(&[]).unwrap();
    assert_eq!(
        backends_of(&tb.connect(&client, TARGET, 30).unwrap()),
        names(&["pod1"])
    );

    // No local endpoint: refused, never sent to the other node.
    tb.write_manifest(
        "web.yaml",
        &local_service(&[Ep::ready(&pods[1]).on_node("node-b")]),
    )
    .unwrap();
    tb.wait_until("no local endpoint is left", Duration::from_secs(10), || {
        Ok(tb.dump_services()?[0]["backends"] == serde_json::json!([]))
    })
    .unwrap();
    for attempt in tb.connect(&client, TARGET, 5).unwrap() {
        assert_eq!(attempt.errno, Some(libc::ECONNREFUSED), "{attempt:?}");
    }
}

#[test]
fn topology_hints_keep_traffic_in_this_nodes_zone() {
    let (tb, client, pods) = cluster(3);
    let hinted = |zone_of_pod3: &str| {
        join(&[
            node("node-a", "zone-a"),
            http_service(
                "web",
                VIP,
                80,
                &[
                    Ep::ready(&pods[0]).for_zones(&["zone-a"]),
                    Ep::ready(&pods[1]).on_node("node-b").for_zones(&["zone-b"]),
                    Ep::ready(&pods[2])
                        .on_node("node-c")
                        .for_zones(&[zone_of_pod3]),
                ],
            ),
        ])
    };
    tb.write_manifest("web.yaml", &hinted("zone-a")).unwrap();
    tb.start_agent(&[]).unwrap();
    assert_eq!(
        backends_of(&tb.connect(&client, TARGET, 60).unwrap()),
        names(&["pod1", "pod3"]),
        "only endpoints hinted for zone-a"
    );

    // A node label change alone moves traffic: node-a is now in zone-b.
    tb.write_manifest(
        "web.yaml",
        &hinted("zone-a").replace("zone: zone-a}", "zone: zone-b}"),
    )
    .unwrap();
    tb.wait_until("the node moved zones", Duration::from_secs(10), || {
        Ok(tb.dump_services()?[0]["backends"].as_array().map(Vec::len) == Some(1))
    })
    .unwrap();
    assert_eq!(
        backends_of(&tb.connect(&client, TARGET, 30).unwrap()),
        names(&["pod2"])
    );
}

#[test]
fn services_kube_proxy_ignores_stay_unanswered() {
    let (tb, client, pods) = cluster(1);
    let endpoints = [Ep::ready(&pods[0])];
    let ignored = join(&[
        Svc::new("other-proxy", "10.96.0.21")
            .port("http", 80, "TCP", 8080)
            .label("service.kubernetes.io/service-proxy-name", "someone-else")
            .yaml(),
        slice(
            "other-proxy-1",
            "other-proxy",
            &[("http", 8080, "TCP")],
            &endpoints,
        ),
        Svc::new("headless", "None")
            .port("http", 80, "TCP", 8080)
            .yaml(),
        slice(
            "headless-1",
            "headless",
            &[("http", 8080, "TCP")],
            &endpoints,
        ),
        Svc::new("external", "10.96.0.22")
            .port("http", 80, "TCP", 8080)
            .spec("type: ExternalName")
            .spec("externalName: example.invalid")
            .yaml(),
        http_service("web", VIP, 80, &endpoints),
    ]);
    tb.write_manifest("all.yaml", &ignored).unwrap();
    tb.start_agent(&[]).unwrap();

    assert_eq!(
        backends_of(&tb.connect(&client, TARGET, 5).unwrap()),
        names(&["pod1"])
    );
    for target in ["10.96.0.21:80", "10.96.0.22:80"] {
        let attempts = tb.connect(&client, target, 1).unwrap();
        assert!(
            !attempts[0].ok && attempts[0].errno != Some(libc::ECONNREFUSED),
            "{target} must be left alone (unrouted), not served or rejected: {attempts:?}"
        );
    }
    assert_eq!(tb.dump_services().unwrap().len(), 1);
}

#[test]
fn a_service_over_a_capacity_limit_is_refused_whole_with_a_metric() {
    let (tb, client, pods) = cluster(3);
    let all: Vec<Ep> = pods.iter().map(Ep::ready).collect();
    tb.write_manifest(
        "all.yaml",
        &join(&[
            http_service("big", "10.96.0.20", 80, &all),
            http_service("web", VIP, 80, &all[..2]),
        ]),
    )
    .unwrap();
    tb.start_agent(&["--max-backends-per-service", "2"])
        .unwrap();

    assert_eq!(
        backends_of(&tb.connect(&client, TARGET, 30).unwrap()),
        names(&["pod1", "pod2"])
    );
    let big = tb.connect(&client, "10.96.0.20:80", 1).unwrap();
    assert!(
        !big[0].ok && big[0].backend.is_none(),
        "never half a Service: {big:?}"
    );
    let log = tb.agent_log();
    assert!(
        log.contains("3 backends exceed the limit of 2 per Service") && log.contains("default/big"),
        "{log}"
    );

    let metrics = tb.metrics().unwrap();
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for series in [
        r#"dataplane_frontends_failing{service="default/big",frontend="10.96.0.20:80/TCP",reason="backends_per_service_limit"} 1"#,
        r#"dataplane_frontend_errors_total{reason="backends_per_service_limit"} 1"#,
        "dataplane_frontends_programmed 1",
        "dataplane_backends_programmed 2",
        r#"dataplane_datapath_events_total{event="sock_translated"} 30"#,
        r#"dataplane_map_entries{map="SERVICES"} 1"#,
        r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"} 1"#,
        r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#,
    ] {
        assert!(metrics.contains(series), "missing {series:?} in\n{metrics}");
    }

    let health = tb.http_get_in_node("127.0.0.1:10256", "/healthz").unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body: serde_json::Value =
        serde_json::from_str(health.lines().nth(1).unwrap_or("")).unwrap();
    assert!(
        body["lastUpdated"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{body}"
    );
    assert!(
        body["currentTime"].is_string() && body["nodeEligible"] == true,
        "{body}"
    );
}
