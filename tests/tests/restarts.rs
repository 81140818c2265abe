//! Agent restarts are invisible to traffic: programs and maps stay pinned,
//! a new agent adopts them and swaps its programs in without a gap.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dataplane_testbed::{
    Testbed,
    apiserver::ApiServer,
    manifests::{http_service_on, objects},
    testbed::AgentSource,
};

#[test]
fn ten_agent_restarts_drop_no_connection_and_fail_no_new_one() {
    let mut tb = Testbed::new().unwrap();
    let client = tb.host("client").unwrap();
    let pods = [tb.host("pod1").unwrap(), tb.host("pod2").unwrap()];
    for pod in &pods {
        tb.serve(pod, 8080).unwrap();
    }
    // Against the API server stand-in: every restarted agent lists the
    // cluster again before it touches the pinned state.
    let api = ApiServer::start(Some(&tb.node_netns)).unwrap();
    let kubeconfig = tb.work_dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    api.apply_all(
        objects(&http_service_on(
            "web",
            "10.96.0.10",
            80,
            &[&pods[0], &pods[1]],
        ))
        .unwrap(),
    )
    .unwrap();
    let source = AgentSource::Kubeconfig(&kubeconfig);
    tb.start_agent_on(&source, &[]).unwrap();
    let first_programs = dataplane_testbed::testbed::pinned_program_ids(&tb.pin_dir).unwrap();

    // Held until the restarts are over (at most 300 s).
    let mut held = tb.hold(&client, "10.96.0.10:80", 100, 300).unwrap();
    assert_eq!(held.opened().unwrap(), 100);
    let new_connections = tb
        .connect_during(&client, "10.96.0.10:80", Duration::ZERO, || {
            // Alternate a crash and a clean stop, ten restarts in all.
            for round in 0..10 {
                let signal = if round % 2 == 0 {
                    libc::SIGKILL
                } else {
                    libc::SIGTERM
                };
                tb.stop_agent(signal).unwrap();
                std::thread::sleep(Duration::from_millis(200));
                tb.start_agent_on(&source, &[]).unwrap();
            }
        })
        .unwrap();

    let failed: Vec<_> = new_connections.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "new connections failed across restarts: {failed:?}"
    );
    assert!(
        new_connections.len() >= 200,
        "only {} new connections",
        new_connections.len()
    );
    let summary = held.summary().unwrap();
    assert_eq!(summary.open, 100, "{summary:?}");
    assert!(
        summary.failures.is_empty(),
        "long-lived connections broke: {summary:?}"
    );
    // Exchanges kept running through the restarts (each restart leaves
    // 200 ms without an agent and a round is one exchange per connection
    // every 200 ms, so ten restarts span well over ten rounds).
    assert!(summary.rounds >= 10, "{summary:?}");
    assert_eq!(summary.backends.len(), 2, "{summary:?}");
    // Each agent loaded its own programs and swapped them in; the first
    // agent's are gone from the kernel.
    let last_programs = dataplane_testbed::testbed::pinned_program_ids(&tb.pin_dir).unwrap();
    assert!(first_programs.iter().all(|id| !last_programs.contains(id)));
    let loaded = dataplane_testbed::testbed::loaded_program_ids().unwrap();
    assert!(
        first_programs.iter().all(|id| !loaded.contains(id)),
        "replaced programs were unloaded"
    );
    assert_eq!(
        api.requests().lists.get("Service"),
        Some(&11),
        "each of the 11 agents listed once"
    );
    let restarts = tb
        .agent_log()
        .matches("adopted pinned maps services=1 backends=2")
        .count();
    assert_eq!(
        restarts, 10,
        "every restarted agent adopted the pinned maps"
    );
}
