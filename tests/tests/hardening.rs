//! The agent at its worst moments: killed in the middle of applying a large
//! diff, it must come back to exactly the desired state, with no orphaned
//! slot, while unchanged Services keep serving.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeMap, fmt::Write as _, os::unix::process::ExitStatusExt as _, time::Duration,
};

use dataplane_agent::dataplane::failpoint::KILL_AFTER_MAP_WRITES;
use dataplane_testbed::{Host, Testbed, probe::Attempt, testbed::AgentSource};

const SERVICES: usize = 10_000;
const ENDPOINTS: usize = 10;

/// 9,999 filler Services whose endpoints depend on `generation`, and the
/// hot Service (never changed) on the real pods.
fn cluster_yaml(generation: usize, pods: &[Host]) -> String {
    let mut out = String::new();
    let mut service = |name: &str, ip: String, endpoints: Vec<String>| {
        let endpoints: String = endpoints
            .iter()
            .map(|e| format!("- addresses: [\"{e}\"]\n"))
            .collect();
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {ip}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{endpoints}"
        );
    };
    for i in 1..SERVICES {
        let endpoints = (0..ENDPOINTS)
            .map(|e| {
                let n = i * ENDPOINTS + e;
                format!("10.{}.{}.{}", 100 + generation, n / 256 % 256, n % 256)
            })
            .collect();
        service(
            &format!("filler-{i}"),
            format!("10.97.{}.{}", i / 256, i % 256),
            endpoints,
        );
    }
    service(
        "hot",
        "10.96.0.10".into(),
        pods.iter().map(|p| p.ip.to_string()).collect(),
    );
    out
}

/// Frontend -> backends, from `dump services`.
fn programmed(tb: &Testbed) -> BTreeMap<String, Vec<String>> {
    tb.dump_services()
        .unwrap()
        .into_iter()
        .map(|s| {
            let backends = s["backends"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_str().unwrap().to_owned())
                .collect();
            (s["frontend"].as_str().unwrap().to_owned(), backends)
        })
        .collect()
}

/// How many filler Services are programmed with `generation`'s endpoints.
fn at_generation(state: &BTreeMap<String, Vec<String>>, generation: usize) -> usize {
    let prefix = format!("10.{}.", 100 + generation);
    state
        .iter()
        .filter(|(frontend, backends)| {
            frontend.starts_with("10.97.") && backends.iter().all(|b| b.starts_with(&prefix))
        })
        .count()
}

/// Map writes of one generation change: per filler Service, 10 backend
/// slots and their 10 members, then the entry that flips to them.
const DIFF_WRITES: usize = (SERVICES - 1) * (2 * ENDPOINTS + 1);

#[test]
fn killed_in_the_middle_of_a_10000_service_diff_the_agent_converges_exactly() {
    let mut tb = Testbed::new().unwrap();
    let client = tb.host("client").unwrap();
    let pods = vec![tb.host("pod1").unwrap(), tb.host("pod2").unwrap()];
    for pod in &pods {
        tb.serve(pod, 8080).unwrap();
    }
    tb.write_manifest("cluster.yaml", &cluster_yaml(0, &pods))
        .unwrap();
    tb.start_agent(&["--min-sync-period", "10ms"]).unwrap();

    let hot_traffic = tb
        .connect_during(&client, "10.96.0.10:80", Duration::from_millis(20), || {
            for generation in 1..=3 {
                // The cluster changes while no agent runs; the next agent
                // adopts the pinned maps and dies (a failpoint, SIGKILL)
                // halfway through writing the difference: the crash lands
                // mid-diff every time, whatever the machine's speed.
                tb.stop_agent(libc::SIGKILL).unwrap();
                tb.write_manifest("cluster.yaml", &cluster_yaml(generation, &pods))
                    .unwrap();
                let mut doomed = tb
                    .agent_command(&AgentSource::Manifests, &["--min-sync-period", "10ms"])
                    .unwrap();
                doomed.env(KILL_AFTER_MAP_WRITES, (DIFF_WRITES / 2).to_string());
                let ended = tb
                    .run_agent_to_exit(doomed, Duration::from_secs(120))
                    .unwrap();
                assert_eq!(
                    ended.signal(),
                    Some(libc::SIGKILL),
                    "the failpoint kills the agent mid-diff ({ended}):\n{}",
                    tb.agent_log()
                );

                let state = programmed(&tb);
                assert_eq!(
                    state.len(),
                    SERVICES,
                    "never a Service missing, even mid-diff"
                );
                let new = at_generation(&state, generation);
                let old = at_generation(&state, generation - 1);
                assert!(
                    new > 0 && old > 0 && new + old == SERVICES - 1,
                    "a crash mid-diff leaves each Service whole, on the old or the new \
                     generation: {new} new, {old} old"
                );

                tb.start_agent(&["--min-sync-period", "10ms"]).unwrap();
                let state = programmed(&tb);
                assert_eq!(
                    at_generation(&state, generation),
                    SERVICES - 1,
                    "converged exactly"
                );
            }
        })
        .unwrap();

    let failed: Vec<&Attempt> = hot_traffic.iter().filter(|a| !a.ok).collect();
    assert!(
        failed.is_empty(),
        "the unchanged Service lost traffic: {failed:?}"
    );
    assert!(hot_traffic.len() >= 100);
    // After the grace period every slot left is a live one.
    tb.wait_until("retired slots are freed", Duration::from_secs(20), || {
        let output = tb.agent_cli(&["dump", "backends", "-o", "json"])?;
        let slots: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
        Ok(
            slots.len() == SERVICES * ENDPOINTS - (ENDPOINTS - pods.len())
                && slots.iter().all(|s| s["live"] == true),
        )
    })
    .unwrap();
}
