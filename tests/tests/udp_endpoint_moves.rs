//! Connected UDP sockets follow their Service's endpoints. Socket LB
//! translates a connected UDP socket once, at connect(); when its backend
//! leaves the Service, the agent destroys the socket (sock_diag
//! SOCK_DESTROY) so the application reconnects to a current backend, as a
//! DNS resolver does after an error. Sockets whose backend stays are never
//! touched. The external (nodePort) side is in external_traffic.rs.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use dataplane_testbed::{
    Host, Testbed,
    manifests::{Ep, Svc, join, slice},
    testbed::{AgentSource, StreamExchange, unix_ms},
};

const VIP: &str = "10.96.0.10";
const OTHER_VIP: &str = "10.96.0.20";
/// How soon after the EndpointSlice change a connected client must reach
/// the new pod (what the issue asks).
const FOLLOWS_WITHIN_MS: u64 = 1_000;

/// A UDP Service on port 53 served by `pods` on 8080.
fn dns_service(name: &str, cluster_ip: &str, pods: &[&Host]) -> String {
    let endpoints: Vec<Ep> = pods.iter().map(|pod| Ep::ready(pod)).collect();
    join(&[
        Svc::new(name, cluster_ip)
            .port("dns", 53, "UDP", 8080)
            .yaml(),
        slice(
            &format!("{name}-1"),
            name,
            &[("dns", 8080, "UDP")],
            &endpoints,
        ),
    ])
}

/// The agent, with the reaper's debug lines in its log.
fn start_agent(tb: &Testbed) {
    let mut agent = tb.agent_command(&AgentSource::Manifests, &[]).unwrap();
    agent.env("RUST_LOG", "info,dataplane_agent::socket_reaper=debug");
    tb.launch_agent(agent).unwrap();
}

fn sockets_destroyed(tb: &Testbed) -> u64 {
    tb.metrics()
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("dataplane_sockets_destroyed_total "))
        .and_then(|value| value.trim().parse().ok())
        .expect("dataplane_sockets_destroyed_total is exported")
}

/// After `moved_at_ms` the stream reached `new_pod` in time, on its second
/// socket, after at most one error (the destroyed socket's), and never
/// heard from another pod again.
fn assert_followed(who: &str, exchanges: &[StreamExchange], moved_at_ms: u64, new_pod: &str) {
    let first = exchanges
        .iter()
        .position(|e| e.backend.as_deref() == Some(new_pod))
        .unwrap_or_else(|| panic!("{who}: {new_pod} never answered: {exchanges:?}"));
    let took = exchanges[first].at_ms.saturating_sub(moved_at_ms);
    assert!(
        took <= FOLLOWS_WITHIN_MS,
        "{who}: reached {new_pod} {took} ms after the change: {exchanges:?}"
    );
    assert_eq!(
        exchanges[first].socket, 2,
        "{who}: the first socket was destroyed and a second one connected: {exchanges:?}"
    );
    let errors: Vec<i32> = exchanges.iter().filter_map(|e| e.errno).collect();
    assert!(
        errors.len() == 1 && matches!(errors[0], libc::ECONNABORTED | libc::EDESTADDRREQ),
        "{who}: one error, from the destroyed socket: {errors:?}"
    );
    let strays: Vec<_> = exchanges[first..]
        .iter()
        .filter(|e| e.backend.as_deref() != Some(new_pod))
        .collect();
    assert!(
        strays.is_empty(),
        "{who}: after the move only {new_pod} answers: {strays:?}"
    );
}

#[test]
fn connected_udp_clients_in_a_pod_and_on_the_host_follow_a_moved_endpoint() {
    let mut tb = Testbed::new().expect("testbed");
    let client = tb.host("client").expect("client");
    let pod1 = tb.host("pod1").expect("pod1");
    let pod2 = tb.host("pod2").expect("pod2");
    tb.serve(&pod1, 8080).unwrap();
    tb.serve(&pod2, 8080).unwrap();
    tb.write_manifest("dns.yaml", &dns_service("dns", VIP, &[&pod1]))
        .unwrap();
    start_agent(&tb);

    let to = format!("{VIP}:53");
    let in_pod = tb.udp_stream_in(&client.netns, true, &to).unwrap();
    // A host-network process: the node's namespace, under the cgroup the
    // agent attaches to.
    let on_host = tb.udp_stream_in(&tb.node_netns, true, &to).unwrap();
    for stream in [&in_pod, &on_host] {
        stream
            .wait_for_answer_from("pod1", Duration::from_secs(10))
            .unwrap();
    }

    // pod1 keeps serving: only the agent can move the sockets.
    let moved_at_ms = unix_ms();
    tb.write_manifest("dns.yaml", &dns_service("dns", VIP, &[&pod2]))
        .unwrap();
    for stream in [&in_pod, &on_host] {
        stream
            .wait_for_answer_from("pod2", Duration::from_secs(10))
            .unwrap();
    }
    // A few more exchanges, to see that nothing goes back to pod1.
    std::thread::sleep(Duration::from_millis(300));
    assert_followed("pod client", &in_pod.stop().unwrap(), moved_at_ms, "pod2");
    assert_followed("host client", &on_host.stop().unwrap(), moved_at_ms, "pod2");

    assert_eq!(sockets_destroyed(&tb), 2);
    let log = tb.agent_log();
    assert!(
        log.lines()
            .filter(|l| l.contains("destroyed a connected UDP socket") && l.contains("default/dns"))
            .count()
            == 2,
        "one debug line per destroyed socket, naming the Service: {log}"
    );
}

#[test]
fn a_connected_udp_socket_whose_backend_stays_is_never_destroyed() {
    let mut tb = Testbed::new().expect("testbed");
    let client = tb.host("client").expect("client");
    let pods: Vec<Host> = (1..=4)
        .map(|n| tb.host(&format!("pod{n}")).expect("pod"))
        .collect();
    for pod in &pods {
        tb.serve(pod, 8080).unwrap();
    }
    let (pod1, pod2, pod3, pod4) = (&pods[0], &pods[1], &pods[2], &pods[3]);
    tb.write_manifest("dns.yaml", &dns_service("dns", VIP, &[pod1]))
        .unwrap();
    tb.write_manifest("other.yaml", &dns_service("other", OTHER_VIP, &[pod4]))
        .unwrap();
    start_agent(&tb);

    let stays = tb
        .udp_stream_in(&client.netns, true, &format!("{VIP}:53"))
        .unwrap();
    let leaves = tb
        .udp_stream_in(&client.netns, true, &format!("{OTHER_VIP}:53"))
        .unwrap();
    stays
        .wait_for_answer_from("pod1", Duration::from_secs(10))
        .unwrap();
    leaves
        .wait_for_answer_from("pod4", Duration::from_secs(10))
        .unwrap();

    // 100 changes, each taking a backend away from the Service (so each
    // makes the reaper look at every connected socket), none of them pod1.
    let dns_backends = |tb: &Testbed| -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(tb
            .dump_services()?
            .into_iter()
            .find(|s| s["frontend"].as_str().is_some_and(|f| f.starts_with(VIP)))
            .and_then(|s| s["backends"].as_array().cloned())
            .unwrap_or_default())
    };
    for change in 0..100 {
        let other = if change % 2 == 0 { pod2 } else { pod3 };
        tb.write_manifest("dns.yaml", &dns_service("dns", VIP, &[pod1, other]))
            .unwrap();
        let wanted = format!("{}:8080", other.ip);
        tb.wait_until("the change is programmed", Duration::from_secs(10), || {
            let backends = dns_backends(&tb)?;
            Ok(backends.len() == 2 && backends.iter().any(|b| b == &wanted))
        })
        .unwrap();
    }

    // The reaper does destroy the socket whose backend leaves.
    tb.write_manifest("other.yaml", &dns_service("other", OTHER_VIP, &[pod2]))
        .unwrap();
    leaves
        .wait_for_answer_from("pod2", Duration::from_secs(10))
        .unwrap();

    let exchanges = stays.stop().unwrap();
    let untouched = |e: &&StreamExchange| {
        e.socket == 1
            && e.errno.is_none_or(|errno| errno == 0)
            && e.backend.as_deref().is_none_or(|b| b == "pod1")
    };
    let disturbed: Vec<_> = exchanges.iter().filter(|e| !untouched(e)).collect();
    assert!(
        disturbed.is_empty(),
        "the socket to pod1 stays connected to pod1 throughout: {disturbed:?}"
    );
    let from_pod1 = exchanges
        .iter()
        .filter(|e| e.backend.as_deref() == Some("pod1"))
        .count();
    assert!(
        from_pod1 * 10 >= exchanges.len() * 9,
        "pod1 answered {from_pod1} of {} exchanges",
        exchanges.len()
    );
    assert_eq!(
        sockets_destroyed(&tb),
        1,
        "only the socket whose backend left"
    );
    let _ = leaves.stop();
}
