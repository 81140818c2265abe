//! The real agent against the API server stand-in (real list/watch over
//! HTTP, kube-rs in the agent): traffic follows the API, survives watch
//! expiry, API outages and agent restarts during them.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dataplane_testbed::{
    Host, Testbed,
    apiserver::{ApiServer, Mode},
    manifests::{Ep, Svc, http_service, http_service_on, join, node, objects, slice},
    probe::{Attempt, tally},
    testbed::AgentSource,
};

const TARGET: &str = "10.96.0.10:80";

struct Cluster {
    tb: Testbed,
    api: ApiServer,
    kubeconfig: std::path::PathBuf,
    client: Host,
    pods: Vec<Host>,
}

/// A client, two pods and the stand-in API server in the node namespace,
/// where the agent runs.
fn cluster() -> Cluster {
    let mut tb = Testbed::new().unwrap();
    let client = tb.host("client").unwrap();
    let pods = vec![tb.host("pod1").unwrap(), tb.host("pod2").unwrap()];
    for pod in &pods {
        tb.serve(pod, 8080).unwrap();
    }
    let api = ApiServer::start(Some(&tb.node_netns)).unwrap();
    let kubeconfig = tb.work_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    Cluster {
        tb,
        api,
        kubeconfig,
        client,
        pods,
    }
}

impl Cluster {
    fn apply(&self, yaml: &str) {
        self.api.apply_all(objects(yaml).unwrap()).unwrap();
    }

    fn start_agent(&self) {
        self.tb
            .start_agent_on(
                &AgentSource::Kubeconfig(&self.kubeconfig),
                &["--min-sync-period", "20ms"],
            )
            .unwrap();
    }

    fn served_by(&self, count: usize) -> Vec<String> {
        let attempts = self.tb.connect(&self.client, TARGET, count).unwrap();
        let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
        assert!(failed.is_empty(), "{failed:?}");
        tally(&attempts).into_keys().collect()
    }

    /// Waits for the programmed backend count. The bound is generous: after
    /// an outage the agent's watches retry with client-go's reflector
    /// backoff (up to 30 s, as kube-proxy's do), to spare a struggling API
    /// server.
    fn wait_for_backends(&self, what: &str, count: usize) {
        self.tb
            .wait_until(what, Duration::from_secs(90), || {
                let services = self.tb.dump_services()?;
                Ok(services
                    .first()
                    .and_then(|s| s["backends"].as_array())
                    .is_some_and(|b| b.len() == count))
            })
            .unwrap();
    }

    /// Runs `during` while a loop of connections goes through the Service;
    /// returns every attempt of the loop.
    fn under_load(&self, during: impl FnOnce()) -> Vec<Attempt> {
        self.tb
            .connect_during(&self.client, TARGET, Duration::from_millis(50), during)
            .unwrap()
    }
}

fn assert_all_ok(attempts: &[Attempt]) {
    let failed: Vec<&Attempt> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        attempts.len()
    );
    assert!(!attempts.is_empty());
}

#[test]
fn traffic_follows_creates_updates_and_deletes_in_the_api() {
    let c = cluster();
    c.apply(&http_service_on("web", "10.96.0.10", 80, &[&c.pods[0]]));
    c.start_agent();
    assert_eq!(c.served_by(10), ["pod1"]);
    let log = c.tb.agent_log();
    assert!(log.contains("connecting to the API server"), "{log}");

    // Update: the EndpointSlice gains pod2.
    c.apply(&http_service_on(
        "web",
        "10.96.0.10",
        80,
        &[&c.pods[0], &c.pods[1]],
    ));
    c.wait_for_backends("pod2 is added", 2);
    assert_eq!(c.served_by(60), ["pod1", "pod2"]);

    // A Service of another proxy is never programmed.
    c.apply(
        &Svc::new("other", "10.96.0.11")
            .port("http", 80, "TCP", 8080)
            .label("service.kubernetes.io/service-proxy-name", "someone-else")
            .yaml(),
    );
    // Delete: the Service goes, its address is no longer translated.
    c.api.delete("Service", Some("default"), "web").unwrap();
    c.tb.wait_until("the Service is gone", Duration::from_secs(30), || {
        Ok(c.tb.dump_services()?.is_empty())
    })
    .unwrap();
    let after = c.tb.connect(&c.client, TARGET, 1).unwrap();
    assert!(!after[0].ok && after[0].backend.is_none(), "{after:?}");
    let requests = c.api.requests();
    assert_eq!(
        requests.lists.get("Service"),
        Some(&1),
        "one list, then watching: {requests:?}"
    );
}

#[test]
fn a_410_gone_relists_without_flushing_the_dataplane() {
    let c = cluster();
    c.apply(&http_service_on(
        "web",
        "10.96.0.10",
        80,
        &[&c.pods[0], &c.pods[1]],
    ));
    c.start_agent();
    let lists_before = c.api.requests().lists.get("EndpointSlice").copied();

    let attempts = c.under_load(|| {
        c.api.compact();
        c.tb.wait_until(
            "the watch expired and the agent relisted",
            Duration::from_secs(30),
            || Ok(c.api.requests().lists.get("EndpointSlice").copied() > lists_before),
        )
        .unwrap();
    });
    assert_all_ok(&attempts);
    assert!(
        !c.tb.agent_log().contains("removed=1"),
        "the relist removed nothing:\n{}",
        c.tb.agent_log()
    );

    // And it keeps following changes after the relist.
    c.apply(&http_service_on("web", "10.96.0.10", 80, &[&c.pods[1]]));
    c.wait_for_backends("pod1 is removed", 1);
    assert_eq!(c.served_by(10), ["pod2"]);
}

#[test]
fn dropped_watches_resume_from_their_resource_version_without_a_relist() {
    let c = cluster();
    c.apply(&http_service_on("web", "10.96.0.10", 80, &[&c.pods[0]]));
    c.start_agent();
    let lists_before = c.api.requests().lists;

    let attempts = c.under_load(|| {
        for _ in 0..3 {
            let watches = c.api.requests().watches.get("EndpointSlice").copied();
            c.api.drop_watches();
            c.tb.wait_until("the agent watches again", Duration::from_secs(30), || {
                Ok(c.api.requests().watches.get("EndpointSlice").copied() > watches)
            })
            .unwrap();
        }
    });
    assert_all_ok(&attempts);
    c.apply(&http_service_on(
        "web",
        "10.96.0.10",
        80,
        &[&c.pods[0], &c.pods[1]],
    ));
    c.wait_for_backends("a change after the disconnects arrives", 2);
    assert_eq!(
        c.api.requests().lists,
        lists_before,
        "resumed, not relisted"
    );
    assert!(c.api.requests().watches.values().all(|n| *n >= 4));
}

#[test]
fn an_api_outage_of_a_minute_keeps_traffic_flowing_and_the_agent_catches_up() {
    let c = cluster();
    c.apply(&http_service_on(
        "web",
        "10.96.0.10",
        80,
        &[&c.pods[0], &c.pods[1]],
    ));
    c.start_agent();

    let attempts = c.under_load(|| {
        // 30 s of 503s, then 30 s of a hung API server; a change made
        // meanwhile must arrive once the API is back.
        c.api.set_mode(Mode::Unavailable);
        std::thread::sleep(Duration::from_secs(30));
        c.api.set_mode(Mode::Stalled);
        c.apply(&http_service(
            "web",
            "10.96.0.10",
            80,
            &[Ep::ready(&c.pods[1]), Ep::not_ready(&c.pods[0])],
        ));
        std::thread::sleep(Duration::from_secs(30));
    });
    assert_all_ok(&attempts);
    assert!(
        attempts.len() >= 400,
        "only {} connections during the outage",
        attempts.len()
    );

    c.api.set_mode(Mode::Healthy);
    c.wait_for_backends("the agent caught up", 1);
    assert_eq!(c.served_by(10), ["pod2"]);
}

#[test]
fn an_agent_restarted_while_the_api_is_down_keeps_serving_and_converges_later() {
    let c = cluster();
    c.apply(&http_service_on("web", "10.96.0.10", 80, &[&c.pods[0]]));
    c.start_agent();
    c.api.set_mode(Mode::Stalled);
    c.tb.stop_agent(libc::SIGKILL).unwrap();

    let attempts = c.under_load(|| {
        std::thread::scope(|scope| {
            // The new agent cannot list; until it can, it must leave the
            // pinned state (and the programs serving it) untouched.
            let stalled_before = c.api.requests().stalled;
            let starting = scope.spawn(|| c.start_agent());
            c.tb.wait_until(
                "the new agent waits on the stalled API",
                Duration::from_secs(30),
                || Ok(c.api.requests().stalled > stalled_before),
            )
            .unwrap();
            let pinned = c.tb.dump_services().unwrap();
            assert_eq!(
                pinned[0]["backends"],
                serde_json::json!([format!("{}:8080", c.pods[0].ip)]),
                "untouched while the API is down"
            );
            c.apply(&http_service_on("web", "10.96.0.10", 80, &[&c.pods[1]]));
            c.api.set_mode(Mode::Healthy);
            starting.join().expect("start thread");
        });
    });
    assert_all_ok(&attempts);
    c.wait_for_backends("the restarted agent converged", 1);
    assert_eq!(c.served_by(10), ["pod2"]);
}

#[test]
fn programming_latency_and_sync_metrics_are_exported() {
    let c = cluster();
    // The EndpointSlice controller stamps when the change that produced a
    // slice happened. A change from before the agent started is not its
    // latency; one made while it runs is.
    let stamped = |seconds_ago: u64| {
        let mut objects =
            objects(&http_service_on("web", "10.96.0.10", 80, &[&c.pods[0]])).unwrap();
        let trigger = std::time::SystemTime::now() - Duration::from_secs(seconds_ago);
        objects[1]["metadata"]["annotations"] = serde_json::json!({
            "endpoints.kubernetes.io/last-change-trigger-time":
                humantime::format_rfc3339_seconds(trigger).to_string(),
        });
        objects
    };
    c.api.apply_all(stamped(3600)).unwrap();
    c.start_agent();
    let metrics = c.tb.metrics().unwrap();
    assert!(
        metrics.contains(
            r#"kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"} 0"#
        ),
        "an hour-old change is not counted:\n{metrics}"
    );
    std::thread::sleep(Duration::from_millis(1100));
    c.api.apply_all(stamped(0)).unwrap();
    c.tb.wait_until("the change is measured", Duration::from_secs(10), || {
        Ok(c.tb.metrics()?.contains(
            r#"kubeproxy_network_programming_duration_seconds_count{ip_family="IPv4"} 1"#,
        ))
    })
    .unwrap();
    assert!(
        c.tb.metrics()
            .unwrap()
            .contains(r#"kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#)
    );
}

/// The value of one series in a scrape (`name{labels}` exactly as
/// written), or None when it is not there.
fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

#[test]
fn kube_proxys_metrics_count_what_happened_and_skipped_objects_are_logged_once() {
    let c = cluster();
    // web: internalTrafficPolicy Local with its only endpoint on another
    // node; sig: an SCTP port beside a TCP one; v6: IPv6 only; an FQDN
    // slice (for a controller of its own, passed over in silence).
    let web_on = |endpoints: &[Ep]| {
        join(&[
            Svc::new("web", "10.96.0.10")
                .port("http", 80, "TCP", 8080)
                .spec("internalTrafficPolicy: Local")
                .yaml(),
            slice("web-1", "web", &[("http", 8080, "TCP")], endpoints),
        ])
    };
    c.apply(&join(&[
        web_on(&[Ep::ready(&c.pods[0]).on_node("node-b")]),
        Svc::new("sig", "10.96.0.11")
            .port("http", 80, "TCP", 8080)
            .port("sig", 3868, "SCTP", 3868)
            .yaml(),
        Svc::new("v6", "fd00::11")
            .port("http", 80, "TCP", 8080)
            .yaml(),
        slice(
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[Ep::ready(&c.pods[0]).on_node("node-b")],
        )
        .replace("name: web-1", "name: names-1")
        .replace("addressType: IPv4", "addressType: FQDN"),
    ]));
    c.start_agent();
    let metrics = c.tb.metrics().unwrap();
    let expect = |metrics: &str, wanted: &[(&str, f64)]| {
        for (name, value) in wanted {
            assert_eq!(series(metrics, name), Some(*value), "{name} in\n{metrics}");
        }
    };
    expect(
        &metrics,
        &[
            (
                r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal",ip_family="IPv4"}"#,
                1.0,
            ),
            (
                r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="external",ip_family="IPv4"}"#,
                0.0,
            ),
            // The first lists: one event per object, the FQDN slice aside
            // (not the proxy's, as in kube-proxy).
            ("kubeproxy_sync_proxy_rules_service_changes_total", 3.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 1.0),
            ("kubeproxy_sync_proxy_rules_service_changes_pending", 0.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_pending", 0.0),
            (
                r#"dataplane_objects_skipped{reason="unsupported_protocol"}"#,
                1.0,
            ),
            (
                r#"dataplane_objects_skipped{reason="unsupported_ip_family"}"#,
                1.0,
            ),
            (r#"dataplane_objects_skipped{reason="invalid"}"#, 0.0),
            ("dataplane_invalid_objects", 2.0),
        ],
    );
    // No local endpoint for internalTrafficPolicy Local: refused at once
    // (kube-proxy drops; see docs/install.md).
    let refused = c.tb.connect(&c.client, TARGET, 1).unwrap();
    assert_eq!(refused[0].errno, Some(libc::ECONNREFUSED), "{refused:?}");

    // A local endpoint arrives: one slice event, and the port is served.
    c.apply(&slice(
        "web-1",
        "web",
        &[("http", 8080, "TCP")],
        &[
            Ep::ready(&c.pods[0]).on_node("node-b"),
            Ep::ready(&c.pods[1]),
        ],
    ));
    c.tb.wait_until("the local endpoint is counted", Duration::from_secs(10), || {
        Ok(series(
            &c.tb.metrics()?,
            r#"kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy="internal",ip_family="IPv4"}"#,
        ) == Some(0.0))
    })
    .unwrap();
    assert_eq!(c.served_by(10), ["pod2"]);
    // This node's zone changes: every Service is recomputed, none of the
    // skipped ones is logged again.
    let node_syncs = || c.tb.agent_log().matches("nodes_changed=true").count();
    let node_syncs_before = node_syncs();
    c.apply(&node("node-a", "zone-x"));
    c.tb.wait_until("the Node change is synced", Duration::from_secs(10), || {
        Ok(node_syncs() > node_syncs_before)
    })
    .unwrap();
    for path in ["/healthz", "/healthz", "/livez"] {
        let answer = c.tb.http_get_in_node("127.0.0.1:10256", path).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let metrics = c.tb.metrics().unwrap();
    expect(
        &metrics,
        &[
            ("kubeproxy_sync_proxy_rules_service_changes_total", 3.0),
            ("kubeproxy_sync_proxy_rules_endpoint_changes_total", 2.0),
            (r#"kubeproxy_proxy_healthz_total{code="200"}"#, 2.0),
            (r#"kubeproxy_proxy_livez_total{code="200"}"#, 1.0),
            (
                r#"dataplane_objects_skipped{reason="unsupported_protocol"}"#,
                1.0,
            ),
        ],
    );
    let queued = series(
        &metrics,
        r#"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"}"#,
    )
    .unwrap();
    let synced = series(
        &metrics,
        r#"kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family="IPv4"}"#,
    )
    .unwrap();
    assert!(
        queued > 0.0 && queued <= synced,
        "queued {queued}, synced {synced}"
    );
    assert!(
        series(
            &metrics,
            r#"kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family="IPv4"}"#
        )
        .is_some_and(|count| count >= 2.0),
        "{metrics}"
    );
    let log = c.tb.agent_log();
    for object in ["default/sig", "default/v6"] {
        let lines = log
            .lines()
            .filter(|line| line.contains("skipping invalid object") && line.contains(object))
            .count();
        assert_eq!(lines, 1, "{object} logged once:\n{log}");
    }
    assert!(
        !log.contains("names-1"),
        "the FQDN slice is not reported:\n{log}"
    );
}
