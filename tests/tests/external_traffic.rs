//! External traffic: a client outside the cluster reaches Services
//! through nodePorts, load-balancer IPs and externalIPs on two nodes that
//! each run the real agent with its TC programs on their node interface.
//! Every test asserts which pod answered, the source address the pod saw,
//! and that the answer came from the address the client dialled.

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use aya::maps::{Array, MapData};
use dataplane_agent::dataplane::{failpoint, maps, pins::PinLayout, ports};
use dataplane_common::{
    IPPROTO_TCP, IPPROTO_UDP, NODE_IP_NO_NODE_PORTS, NODE_IP_PRESENT, PORT_KIND_BACKEND,
    PORT_KIND_FRONTEND, PORTS_WORDS, map_names,
};
use dataplane_testbed::{
    Host,
    cluster::{Cluster, NODE_INTERFACE},
    manifests::{Ep, Svc, join, node_with_ip, node_with_pod_cidr, slice},
    probe::{Attempt, parse_attempts, tally},
    testbed::{
        AgentSource, Hold, loaded_program_ids, pinned_program_ids_of, sibling_binary, unix_ms,
    },
};

const NODE_PORT: u16 = 30080;
const LB_IP: &str = "198.51.100.10";
const EXTERNAL_IP: &str = "203.0.113.20";

/// Two nodes with one pod each (serving on 8080) and a client outside.
struct Setup {
    cluster: Cluster,
    client: Host,
    pod1: Host,
    pod2: Host,
}

fn two_nodes() -> Setup {
    let mut cluster = Cluster::new(2).expect("cluster");
    let client = cluster.client("client").expect("client");
    let pod1 = cluster.nodes[0].host("pod1").expect("pod1");
    let pod2 = cluster.nodes[1].host("pod2").expect("pod2");
    cluster.nodes[0].serve(&pod1, 8080).expect("serve pod1");
    cluster.nodes[1].serve(&pod2, 8080).expect("serve pod2");
    Setup {
        cluster,
        client,
        pod1,
        pod2,
    }
}

/// Node objects (for the tunnel's addresses and the nodes' pod CIDRs), a
/// Service built by `service` with ports 80/TCP and 80/UDP -> 8080 and
/// nodePort 30080, and its endpoints.
fn manifests(setup: &Setup, service: Svc, endpoints: &[Ep]) -> String {
    let mut documents: Vec<String> = (0..setup.cluster.nodes.len())
        .map(|i| {
            node_with_pod_cidr(
                &setup.cluster.nodes[i].node_name,
                setup.cluster.node_ip(i),
                &format!("10.{}.0.0/16", 201 + i),
            )
        })
        .collect();
    documents.push(service.yaml());
    documents.push(slice(
        "web-1",
        "web",
        &[("http", 8080, "TCP"), ("echo", 8080, "UDP")],
        endpoints,
    ));
    join(&documents)
}

fn web(service_type: &str) -> Svc {
    Svc::new("web", "10.96.0.10")
        .node_port("http", 80, "TCP", 8080, NODE_PORT)
        .node_port("echo", 80, "UDP", 8080, NODE_PORT)
        .spec(&format!("type: {service_type}"))
}

/// [`two_nodes`] with `web` (NodePort) on both pods and the agents started
/// with `agent_args`.
fn serving_both_pods(agent_args: &[&str]) -> Setup {
    serving(web("NodePort"), agent_args)
}

/// [`two_nodes`] with `service` on both pods and the agents started with
/// `agent_args`.
fn serving(service: Svc, agent_args: &[&str]) -> Setup {
    let setup = two_nodes();
    start_serving(&setup, service, &both_pods(&setup), agent_args);
    setup
}

/// Writes the manifests of `service` on `endpoints` and starts the agents
/// with `agent_args`.
fn start_serving(setup: &Setup, service: Svc, endpoints: &[Ep], agent_args: &[&str]) {
    let yaml = manifests(setup, service, endpoints);
    setup.cluster.write_manifest("web.yaml", &yaml).unwrap();
    setup.cluster.start_agents(agent_args).unwrap();
}

/// `web` as a LoadBalancer with LB_IP and the externalIP EXTERNAL_IP.
fn web_on_external_addresses() -> Svc {
    web("LoadBalancer")
        .spec(&format!("externalIPs: [\"{EXTERNAL_IP}\"]"))
        .load_balancer_ips(&[LB_IP])
}

fn both_pods(setup: &Setup) -> Vec<Ep> {
    vec![
        Ep::ready(&setup.pod1).on_node("node-1"),
        Ep::ready(&setup.pod2).on_node("node-2"),
    ]
}

fn assert_all_ok(attempts: &[Attempt]) {
    let failed: Vec<_> = attempts.iter().filter(|a| !a.ok).collect();
    assert!(failed.is_empty(), "failed attempts: {failed:?}");
}

/// Every answer came from `dialled`, and each pod in `sources` answered
/// and saw exactly that source.
fn assert_answers(attempts: &[Attempt], dialled: &str, sources: &[(&Host, String)]) {
    assert_all_ok(attempts);
    for attempt in attempts {
        assert_eq!(
            attempt.peer.as_deref(),
            Some(dialled),
            "the answer must come from the dialled address: {attempt:?}"
        );
    }
    let by_backend = tally(attempts);
    let answered: BTreeSet<String> = by_backend.keys().cloned().collect();
    let expected: BTreeSet<String> = sources.iter().map(|(h, _)| h.name.clone()).collect();
    assert_eq!(answered, expected, "backends that answered: {by_backend:?}");
    for (pod, source) in sources {
        let seen: Vec<&String> = by_backend[&pod.name].sources.keys().collect();
        assert_eq!(seen, vec![source], "{} saw these sources", pod.name);
    }
}

#[test]
fn node_port_reaches_local_and_remote_pods_with_the_client_address() {
    let setup = serving_both_pods(&[]);
    let c = &setup.cluster;
    let client_ip = setup.client.ip.to_string();
    let expected = [
        (&setup.pod1, client_ip.clone()),
        (&setup.pod2, client_ip.clone()),
    ];
    for node in 0..2 {
        let dialled = format!("{}:{NODE_PORT}", c.node_ip(node));
        let tcp = c.exchange(&setup.client, &dialled, 40, "tcp").unwrap();
        assert_answers(&tcp, &dialled, &expected);
        let udp = c.exchange(&setup.client, &dialled, 40, "udp").unwrap();
        assert_answers(&udp, &dialled, &expected);
    }
}

#[test]
fn load_balancer_ip_and_external_ip_reach_pods_on_both_nodes_with_the_client_address() {
    let setup = serving(web_on_external_addresses(), &[]);
    let c = &setup.cluster;
    // The load balancer sends its IP to node-2, the externalIP is routed
    // to node-1: each node serves both pods.
    c.route_to_node(&setup.client, &format!("{LB_IP}/32"), 1)
        .unwrap();
    c.route_to_node(&setup.client, &format!("{EXTERNAL_IP}/32"), 0)
        .unwrap();
    let client_ip = setup.client.ip.to_string();
    let expected = [
        (&setup.pod1, client_ip.clone()),
        (&setup.pod2, client_ip.clone()),
    ];
    for address in [LB_IP, EXTERNAL_IP] {
        let dialled = format!("{address}:80");
        for mode in ["tcp", "udp"] {
            let attempts = c.exchange(&setup.client, &dialled, 40, mode).unwrap();
            assert_answers(&attempts, &dialled, &expected);
        }
    }
    // A pod reaches the same addresses through socket LB (hairpin to
    // itself included), without leaving its node.
    let from_pod = c.nodes[0]
        .exchange(&setup.pod1, &format!("{LB_IP}:80"), 30, "tcp")
        .unwrap();
    assert_all_ok(&from_pod);
    assert!(
        tally(&from_pod).contains_key("pod1"),
        "pod1 reaches itself through the LB IP: {:?}",
        tally(&from_pod)
    );
}

#[test]
fn snat_mode_shows_the_node_address_to_remote_pods_only() {
    let setup = serving(web_on_external_addresses(), &["--external-mode", "snat"]);
    let c = &setup.cluster;
    for prefix in [LB_IP, EXTERNAL_IP] {
        c.route_to_node(&setup.client, &format!("{prefix}/32"), 0)
            .unwrap();
    }
    let expected = [
        (&setup.pod1, setup.client.ip.to_string()),
        (&setup.pod2, c.node_ip(0).to_string()),
    ];
    for dialled in [
        format!("{}:{NODE_PORT}", c.node_ip(0)),
        format!("{LB_IP}:80"),
        format!("{EXTERNAL_IP}:80"),
    ] {
        for mode in ["tcp", "udp"] {
            let attempts = c.exchange(&setup.client, &dialled, 40, mode).unwrap();
            assert_answers(&attempts, &dialled, &expected);
        }
    }
}

#[test]
fn external_traffic_policy_local_serves_local_pods_and_health_checks_report_them() {
    const HEALTH_PORT: u16 = 32100;
    let mut setup = two_nodes();
    let pod3 = setup.cluster.nodes[0].host("pod3").expect("pod3");
    setup.cluster.nodes[0]
        .serve(&pod3, 8080)
        .expect("serve pod3");
    let c = &setup.cluster;
    let service = web("LoadBalancer")
        .spec("externalTrafficPolicy: Local")
        .spec(&format!("healthCheckNodePort: {HEALTH_PORT}"))
        .load_balancer_ips(&[LB_IP]);
    // Two pods on node-1, one on node-2 that is not ready: node-2 has no
    // local endpoint.
    let endpoints = [
        Ep::ready(&setup.pod1).on_node("node-1"),
        Ep::ready(&pod3).on_node("node-1"),
        Ep::not_ready(&setup.pod2).on_node("node-2"),
    ];
    c.write_manifest("web.yaml", &manifests(&setup, service, &endpoints))
        .unwrap();
    c.start_agents(&[]).unwrap();

    let client_ip = setup.client.ip.to_string();
    // The load balancer sends to node-1 (its health check passes there).
    c.route_to_node(&setup.client, &format!("{LB_IP}/32"), 0)
        .unwrap();
    for dialled in [
        format!("{}:{NODE_PORT}", c.node_ip(0)),
        format!("{LB_IP}:80"),
    ] {
        for mode in ["tcp", "udp"] {
            let attempts = c.exchange(&setup.client, &dialled, 40, mode).unwrap();
            assert_answers(
                &attempts,
                &dialled,
                &[(&setup.pod1, client_ip.clone()), (&pod3, client_ip.clone())],
            );
        }
    }

    // Without a local endpoint, node-2 drops (no reset, no ICMP, no
    // answer): the load balancer's health check takes it out of rotation.
    let on_node2 = format!("{}:{NODE_PORT}", c.node_ip(1));
    for mode in ["tcp", "udp"] {
        let dropped = c.exchange(&setup.client, &on_node2, 2, mode).unwrap();
        assert!(
            dropped
                .iter()
                .all(|a| !a.ok && a.errno != Some(libc::ECONNREFUSED)),
            "node-2 must drop {mode}, not reject: {dropped:?}"
        );
    }

    let health = |node: usize| {
        c.nodes[node]
            .http_get_in_node(&format!("{}:{HEALTH_PORT}", c.node_ip(node)), "/")
            .unwrap()
    };
    let node1 = health(0);
    assert!(node1.starts_with("HTTP/1.1 200"), "node-1 health: {node1}");
    assert!(
        node1.contains(r#""service":{"namespace":"default","name":"web"},"localEndpoints":2"#),
        "node-1 health body: {node1}"
    );
    let node2 = health(1);
    assert!(node2.starts_with("HTTP/1.1 503"), "node-2 health: {node2}");
    assert!(node2.contains(r#""localEndpoints":0"#), "{node2}");
}

#[test]
fn load_balancer_source_ranges_admit_only_the_listed_clients() {
    let mut setup = two_nodes();
    let stranger = setup.cluster.client("stranger").expect("stranger");
    let c = &setup.cluster;
    let service = web("LoadBalancer")
        .spec(&format!(
            "loadBalancerSourceRanges: [\"{}/32\"]",
            setup.client.ip
        ))
        .load_balancer_ips(&[LB_IP]);
    c.write_manifest("web.yaml", &manifests(&setup, service, &both_pods(&setup)))
        .unwrap();
    c.start_agents(&[]).unwrap();
    for client in [&setup.client, &stranger] {
        c.route_to_node(client, &format!("{LB_IP}/32"), 0).unwrap();
    }
    let dialled = format!("{LB_IP}:80");
    let allowed = c.exchange(&setup.client, &dialled, 20, "tcp").unwrap();
    assert_all_ok(&allowed);
    let blocked = c.exchange(&stranger, &dialled, 3, "tcp").unwrap();
    assert!(
        blocked.iter().all(|a| !a.ok),
        "a source outside the ranges must not connect: {blocked:?}"
    );
    // The nodePort is not an LB address: source ranges do not apply.
    let node_port = format!("{}:{NODE_PORT}", c.node_ip(0));
    assert_all_ok(&c.exchange(&stranger, &node_port, 5, "tcp").unwrap());
    let dropped = stat(c, 0, "ext_drop_source_range");
    assert!(dropped >= 3, "drops are counted: {dropped}");
}

#[test]
fn a_service_without_endpoints_rejects_external_tcp_and_udp_at_once() {
    let setup = two_nodes();
    let c = &setup.cluster;
    c.write_manifest("web.yaml", &manifests(&setup, web("NodePort"), &[]))
        .unwrap();
    c.start_agents(&[]).unwrap();
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(1));
    for mode in ["tcp", "udp"] {
        let attempts = c.exchange(&setup.client, &dialled, 5, mode).unwrap();
        for attempt in &attempts {
            assert_eq!(
                attempt.errno,
                Some(libc::ECONNREFUSED),
                "{mode} must be refused: {attempt:?}"
            );
            assert!(
                attempt.micros < 1_000_000,
                "{mode} must be refused at once, not time out: {attempt:?}"
            );
        }
    }
}

/// `hold` ended with all `open` connections open, none failed, and both
/// pods served some.
fn assert_held_on_both_pods(hold: Hold, open: usize) {
    let summary = hold.summary().unwrap();
    assert_eq!(summary.open, open, "{summary:?}");
    assert!(summary.failures.is_empty(), "{summary:?}");
    assert_eq!(
        summary.backends.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["pod1".to_string(), "pod2".to_string()]),
        "{summary:?}"
    );
}

/// A datapath counter of node `index` (`dataplane-agent dump stats`).
fn stat(cluster: &Cluster, index: usize, name: &str) -> u64 {
    let output = cluster.nodes[index]
        .agent_cli(&["dump", "stats"])
        .expect("dump stats");
    let stats = String::from_utf8_lossy(&output.stdout);
    stats
        .lines()
        .find_map(|line| {
            let (stat, value) = line.split_once(char::is_whitespace)?;
            (stat == name).then(|| value.trim().parse().ok())?
        })
        .unwrap_or_else(|| panic!("no stat {name} in {stats}"))
}

#[test]
fn large_transfers_work_through_a_smaller_mtu_hop_to_local_and_tunnelled_pods() {
    let mut setup = two_nodes();
    let far_client = setup
        .cluster
        .client_behind_routers("far", 1400)
        .expect("client behind routers");
    let c = &setup.cluster;
    // web: only pod2 on node-2, always through the tunnel from node-1;
    // local: only pod1 on node-1.
    let local = Svc::new("local", "10.96.0.11")
        .node_port("http", 80, "TCP", 8080, NODE_PORT + 1)
        .spec("type: NodePort");
    let yaml = join(&[
        manifests(
            &setup,
            web("NodePort"),
            &[Ep::ready(&setup.pod2).on_node("node-2")],
        ),
        local.yaml(),
        slice(
            "local-1",
            "local",
            &[("http", 8080, "TCP")],
            &[Ep::ready(&setup.pod1).on_node("node-1")],
        ),
    ]);
    c.write_manifest("web.yaml", &yaml).unwrap();
    // Path MTU discovery itself, so no MSS clamping (tested below).
    c.start_agents(&["--tunnel-mss-clamp", "off"]).unwrap();

    for (client, port) in [
        (&setup.client, NODE_PORT),
        (&far_client, NODE_PORT),
        (&far_client, NODE_PORT + 1),
    ] {
        let dialled = format!("{}:{port}", c.node_ip(0));
        let report = c.transfer(client, &dialled, 4 << 20).unwrap();
        assert_eq!(
            report["ok"], true,
            "4 MiB echoed between {} and {dialled}: {report}",
            client.name
        );
    }
    // Full-size packets did not fit the tunnel in either direction and were
    // answered with "fragmentation needed"; the routers' own answers about
    // replies from the node's address were translated for the pods.
    assert!(stat(c, 0, "ext_too_big_for_tunnel") > 0, "client -> tunnel");
    assert!(stat(c, 1, "ext_too_big_for_tunnel") > 0, "pod2 -> tunnel");
    assert!(stat(c, 0, "ext_icmp_translated") > 0, "router -> pods");
}

#[test]
fn ten_agent_restarts_keep_established_external_connections_and_take_new_ones() {
    let setup = serving_both_pods(&[]);
    let c = &setup.cluster;
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    // Connections to both pods (local and tunnelled), each with its
    // conntrack entries on node-1 (and the tunnel's on node-2), stay open
    // and keep exchanging while both agents crash or stop and come back,
    // ten times.
    let mut hold = c.hold(&setup.client, &dialled, 20, 300).unwrap();
    assert_eq!(hold.opened().unwrap(), 20);
    for round in 0..10 {
        let signal = if round % 2 == 0 {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        for node in &c.nodes {
            node.stop_agent(signal).unwrap();
        }
        // With no agent at all, the pinned programs carry the established
        // flows and take new ones.
        let carried = stat(c, 0, "ext_established");
        c.nodes[0]
            .wait_until(
                "flows carried with no agent",
                Duration::from_secs(10),
                || Ok(stat(c, 0, "ext_established") > carried + 40),
            )
            .unwrap();
        assert_all_ok(&c.exchange(&setup.client, &dialled, 4, "tcp").unwrap());
        c.start_agents(&[]).unwrap();
    }
    assert_held_on_both_pods(hold, 20);
    // New connections work after the restart too.
    assert_all_ok(&c.exchange(&setup.client, &dialled, 10, "tcp").unwrap());
}

/// The rolling update of a release that changed the pinned maps' layout:
/// the previous agents (pins straight in the bpffs directory, layout 0, as
/// the first releases pin) serve held connections, stop, and agents of
/// this build take over.
#[test]
fn an_upgrade_to_a_new_pin_layout_keeps_established_connections_and_removes_the_old_pins() {
    let mut setup = two_nodes();
    let app = setup.cluster.nodes[0].host("app").unwrap();
    let c = &setup.cluster;
    c.write_manifest(
        "web.yaml",
        &manifests(&setup, web("NodePort"), &both_pods(&setup)),
    )
    .unwrap();
    let legacy: Vec<PinLayout> = c
        .nodes
        .iter()
        .map(|node| PinLayout::of_version(&node.pin_dir, 0))
        .collect();
    for node in &c.nodes {
        let mut command = node
            .agent_command(&AgentSource::Manifests, &["--interfaces", NODE_INTERFACE])
            .unwrap();
        command.env(failpoint::PIN_LAYOUT_VERSION, "0");
        node.launch_agent(command).unwrap();
    }
    for layout in &legacy {
        assert!(layout.map("CONNTRACK").exists(), "{layout:?}");
        assert!(!PinLayout::new(&layout.base).dir.exists(), "{layout:?}");
    }
    let legacy_programs: Vec<u32> = legacy
        .iter()
        .flat_map(|layout| pinned_program_ids_of(layout).unwrap())
        .collect();

    // External flows to both pods (node-1 translates, node-2 carries the
    // tunnel's return path) and east-west ones from a pod through socket LB.
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    let mut external = c.hold(&setup.client, &dialled, 20, 300).unwrap();
    assert_eq!(external.opened().unwrap(), 20);
    let mut internal = c.nodes[0].hold(&app, "10.96.0.10:80", 20, 300).unwrap();
    assert_eq!(internal.opened().unwrap(), 20);

    // New connections, external and in-cluster, all through the switch.
    let switching = std::sync::atomic::AtomicBool::new(true);
    let new_connections = std::thread::scope(|scope| {
        let dialling = scope.spawn(|| {
            let mut attempts = Vec::new();
            while switching.load(std::sync::atomic::Ordering::Relaxed) {
                attempts.extend(c.exchange(&setup.client, &dialled, 5, "tcp").unwrap());
                attempts.extend(
                    c.nodes[0]
                        .exchange(&app, "10.96.0.10:80", 5, "tcp")
                        .unwrap(),
                );
            }
            attempts
        });
        for node in &c.nodes {
            node.stop_agent(libc::SIGTERM).unwrap();
        }
        c.start_agents(&[]).unwrap();
        switching.store(false, std::sync::atomic::Ordering::Relaxed);
        dialling.join().unwrap()
    });
    assert_all_ok(&new_connections);
    assert!(new_connections.len() >= 10, "{}", new_connections.len());

    // Node-1 carried both entries of each of the 20 flows (and its own
    // flows' tunnel entries are node-2's).
    let carried = carried_flows(&c.nodes[0].agent_log());
    assert!(carried >= 40, "node-1 carried {carried} flow entries");
    assert!(
        carried_flows(&c.nodes[1].agent_log()) > 0,
        "node-2 carried none"
    );
    // Only this build's pins are left, and the old programs are unloaded.
    for node in &c.nodes {
        let left: BTreeSet<String> = std::fs::read_dir(&node.pin_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let current = PinLayout::new(&node.pin_dir);
        let current_name = current.dir.file_name().unwrap().to_string_lossy();
        assert_eq!(left, BTreeSet::from([current_name.into_owned()]));
    }
    // The kernel releases a detached link's program from a worker, a moment
    // after its last reference is gone.
    c.nodes[0]
        .wait_until(
            "the old programs are unloaded",
            Duration::from_secs(5),
            || {
                let loaded = loaded_program_ids()?;
                Ok(legacy_programs.iter().all(|id| !loaded.contains(id)))
            },
        )
        .unwrap();
    // The held flows now run through the new programs and their carried
    // conntrack entries (the new layout's counters start at zero).
    c.nodes[0]
        .wait_until(
            "held flows through the new programs",
            Duration::from_secs(10),
            || Ok(stat(c, 0, "ext_established") > 80),
        )
        .unwrap();

    assert_held_on_both_pods(external, 20);
    let summary = internal.summary().unwrap();
    assert_eq!(summary.open, 20, "{summary:?}");
    assert!(summary.failures.is_empty(), "{summary:?}");
    assert_all_ok(&c.exchange(&setup.client, &dialled, 10, "tcp").unwrap());
    assert_all_ok(
        &c.nodes[0]
            .exchange(&app, "10.96.0.10:80", 10, "tcp")
            .unwrap(),
    );
}

/// The flow entries an agent's log says it carried over from another pin
/// layout, over both passes and the retirement.
fn carried_flows(log: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("pin layout"))
        .filter_map(|line| {
            let after = line.split_once("flows: ")?.1;
            after
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

#[test]
fn session_affinity_pins_an_external_client_to_one_pod() {
    let mut setup = two_nodes();
    let other_client = setup.cluster.client("other").expect("other client");
    let c = &setup.cluster;
    let service = web("NodePort").spec("sessionAffinity: ClientIP");
    c.write_manifest("web.yaml", &manifests(&setup, service, &both_pods(&setup)))
        .unwrap();
    c.start_agents(&[]).unwrap();
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    for client in [&setup.client, &other_client] {
        let attempts = c.exchange(client, &dialled, 20, "tcp").unwrap();
        assert_all_ok(&attempts);
        assert_eq!(
            tally(&attempts).len(),
            1,
            "{} must stick to one pod: {:?}",
            client.name,
            tally(&attempts)
        );
    }
}

#[test]
fn pods_reach_node_ports_on_their_own_node_and_on_others() {
    let setup = serving_both_pods(&[]);
    let c = &setup.cluster;
    for node in 0..2 {
        let dialled = format!("{}:{NODE_PORT}", c.node_ip(node));
        let attempts = c.nodes[0]
            .exchange(&setup.pod1, &dialled, 30, "tcp")
            .unwrap();
        assert_all_ok(&attempts);
        assert_eq!(
            tally(&attempts).keys().cloned().collect::<BTreeSet<_>>(),
            BTreeSet::from(["pod1".to_string(), "pod2".to_string()]),
            "pod1 via {dialled} (its own node's address included: hairpin)"
        );
    }
    // A host process of node-2 (or a pod masqueraded to node-2's address)
    // through node-1's nodePort, to pods on both nodes: the one on its own
    // node included.
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    let attempts = c.nodes[1]
        .exchange_in(&c.nodes[1].node_netns, false, &dialled, 30, "tcp")
        .unwrap();
    assert_all_ok(&attempts);
    assert_eq!(
        tally(&attempts).keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["pod1".to_string(), "pod2".to_string()]),
        "node-2 itself via {dialled}"
    );
}

/// PORTS of node `index`, as the interface programs read it.
fn ports_bitmap(cluster: &Cluster, index: usize) -> ports::Bitmap {
    let layout = PinLayout::new(&cluster.nodes[index].pin_dir);
    let map: Array<MapData, u64> = maps::open_pinned(&layout, map_names::PORTS).unwrap();
    ports::Bitmap(
        (0..PORTS_WORDS)
            .map(|word| map.get(&word, 0).unwrap())
            .collect(),
    )
}

#[test]
fn ports_of_a_removed_service_stay_while_its_flows_live_and_are_cleared_after() {
    let setup = serving_both_pods(&[
        "--conntrack-udp-timeout",
        "2s",
        "--conntrack-tcp-timeout-closing",
        "1s",
        "--conntrack-sweep-period",
        "300ms",
    ]);
    let c = &setup.cluster;
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    let mut held = c.hold(&setup.client, &dialled, 4, 60).unwrap();
    assert_eq!(held.opened().unwrap(), 4);
    assert_all_ok(&c.exchange(&setup.client, &dialled, 5, "udp").unwrap());
    let tcp = [
        (PORT_KIND_FRONTEND, IPPROTO_TCP, NODE_PORT),
        (PORT_KIND_BACKEND, IPPROTO_TCP, 8080),
    ];
    let udp = [
        (PORT_KIND_FRONTEND, IPPROTO_UDP, NODE_PORT),
        (PORT_KIND_BACKEND, IPPROTO_UDP, 8080),
    ];
    let set = |bits: &[(u8, u8, u16)]| {
        let bitmap = ports_bitmap(c, 0);
        bits.iter()
            .filter(|(kind, protocol, port)| bitmap.contains(*kind, *protocol, *port))
            .count()
    };
    assert_eq!(set(&tcp) + set(&udp), 4, "every bit of the Service");

    // Only the Node objects are left. The held TCP flows go on (their
    // conntrack entries translate them, as kube-proxy's do), so their bits
    // stay through several sweeps; the UDP flows are stale at once (their
    // frontend is gone), and so are their bits.
    let nodes_only = join(
        &(0..c.nodes.len())
            .map(|i| node_with_ip(&c.nodes[i].node_name, c.node_ip(i)))
            .collect::<Vec<_>>(),
    );
    let sweeps_before = sweeps(c, 0);
    c.write_manifest("web.yaml", &nodes_only).unwrap();
    c.nodes[0]
        .wait_until(
            "three sweeps after the removal",
            Duration::from_secs(15),
            || Ok(sweeps(c, 0) >= sweeps_before + 3),
        )
        .unwrap();
    c.nodes[0]
        .wait_until("the UDP bits cleared", Duration::from_secs(15), || {
            Ok(set(&udp) == 0)
        })
        .unwrap();
    assert_eq!(set(&tcp), 2, "the held flows' bits stay");
    let summary = held.summary().unwrap();
    assert!(summary.failures.is_empty(), "{summary:?}");
    assert!(summary.rounds >= 3, "{summary:?}");

    // Closed, the flows expire, and the last bits go.
    c.nodes[0]
        .wait_until("the TCP bits cleared", Duration::from_secs(15), || {
            Ok(set(&tcp) == 0)
        })
        .unwrap();
}

/// Completed conntrack sweeps of node `index`'s agent.
fn sweeps(cluster: &Cluster, index: usize) -> u64 {
    let metrics = cluster.nodes[index].metrics().expect("metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("dataplane_conntrack_sweeps_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn idle_and_stale_udp_flows_leave_the_conntrack_table() {
    let setup = serving_both_pods(&[
        "--conntrack-udp-timeout",
        "2s",
        "--conntrack-sweep-period",
        "500ms",
    ]);
    let c = &setup.cluster;
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    let flows = |node: usize| {
        let output = c.nodes[node]
            .agent_cli(&["dump", "conntrack", "-o", "json"])
            .unwrap();
        serde_json::from_slice::<Vec<serde_json::Value>>(&output.stdout).unwrap()
    };
    assert_all_ok(&c.exchange(&setup.client, &dialled, 10, "udp").unwrap());
    assert!(
        flows(0).len() >= 20,
        "10 flows, both directions: {:?}",
        flows(0)
    );
    c.nodes[0]
        .wait_until("idle UDP flows expire", Duration::from_secs(10), || {
            Ok(flows(0).is_empty())
        })
        .unwrap();

    // A UDP flow to a pod that leaves the Service is cut at once (within a
    // sweep), even while the client keeps sending.
    let only_pod1 = [Ep::ready(&setup.pod1).on_node("node-1")];
    assert_all_ok(&c.exchange(&setup.client, &dialled, 10, "udp").unwrap());
    let to_pod2 = |rows: &[serde_json::Value]| {
        rows.iter()
            .filter(|r| {
                r["translation"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&setup.pod2.ip.to_string())
            })
            .count()
    };
    assert!(to_pod2(&flows(0)) > 0, "{:?}", flows(0));
    c.write_manifest("web.yaml", &manifests(&setup, web("NodePort"), &only_pod1))
        .unwrap();
    c.nodes[0]
        .wait_until(
            "flows to the removed pod go",
            Duration::from_secs(5),
            || Ok(to_pod2(&flows(0)) == 0),
        )
        .unwrap();
}

#[test]
fn a_connected_udp_client_outside_follows_an_endpoint_that_moves_to_another_node() {
    let setup = two_nodes();
    let c = &setup.cluster;
    let on = |pod: &Host, node: &str| {
        manifests(&setup, web("NodePort"), &[Ep::ready(pod).on_node(node)])
    };
    c.write_manifest("web.yaml", &on(&setup.pod1, "node-1"))
        .unwrap();
    // The default sweep period (10 s): the flow must be cut at sync time.
    c.start_agents(&[]).unwrap();
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    let stream = c.nodes[0]
        .udp_stream_in(&setup.client.netns, false, &dialled)
        .unwrap();
    stream
        .wait_for_answer_from("pod1", Duration::from_secs(10))
        .unwrap();

    // pod1 keeps serving: only the agent can move the flow.
    let moved_at_ms = unix_ms();
    c.write_manifest("web.yaml", &on(&setup.pod2, "node-2"))
        .unwrap();
    stream
        .wait_for_answer_from("pod2", Duration::from_secs(10))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let exchanges = stream.stop().unwrap();
    let first = exchanges
        .iter()
        .position(|e| e.backend.as_deref() == Some("pod2"))
        .unwrap();
    let took = exchanges[first].at_ms.saturating_sub(moved_at_ms);
    assert!(
        took <= 1_000,
        "reached pod2 {took} ms after the change: {exchanges:?}"
    );
    let strays: Vec<_> = exchanges[first..]
        .iter()
        .filter(|e| e.backend.as_deref() != Some("pod2"))
        .collect();
    assert!(
        strays.is_empty(),
        "after the move only pod2 answers: {strays:?}"
    );
    assert!(
        exchanges.iter().all(|e| e.socket == 1),
        "the client's socket stays connected to the nodePort: {exchanges:?}"
    );
}

#[test]
fn a_client_that_turns_from_a_node_port_to_the_pod_itself_gets_the_pods_own_answers() {
    let setup = serving_both_pods(&[]);
    let c = &setup.cluster;
    // Pod addresses routed to their nodes, as on a flat network.
    c.route_to_node(&setup.client, &format!("{}/32", setup.pod1.ip), 0)
        .unwrap();
    c.route_to_node(&setup.client, &format!("{}/32", setup.pod2.ip), 1)
        .unwrap();
    let probe = sibling_binary("dataplane-probe").unwrap();
    let probe = probe.to_str().unwrap();
    let connected_udp_from = |port: u16, to: &str| -> Attempt {
        let port = port.to_string();
        let args = [
            "connect",
            "--to",
            to,
            "--mode",
            "udp",
            "--udp-source-port",
            &port,
        ];
        parse_attempts(&c.run_in(&setup.client.netns, probe, &args).unwrap())
            .unwrap()
            .remove(0)
    };
    // A source port whose nodePort flow (on node-1) went to each pod: pod1
    // is local to node-1 (DNAT), pod2 behind the tunnel.
    let node_port = format!("{}:{NODE_PORT}", c.node_ip(0));
    let mut port_of = BTreeMap::new();
    for port in 42_000..42_200 {
        let through_node_port = connected_udp_from(port, &node_port);
        assert!(through_node_port.ok, "{through_node_port:?}");
        port_of
            .entry(through_node_port.backend.unwrap())
            .or_insert(port);
        if port_of.len() == 2 {
            break;
        }
    }
    assert_eq!(port_of.len(), 2, "both pods answer through the nodePort");
    // The same client port, now straight to the pod, within the flows' UDP
    // timeout: the answers must come from the pod itself, not be rewritten
    // (or tunnelled back) as the nodePort flow's.
    for (pod, host) in [("pod1", &setup.pod1), ("pod2", &setup.pod2)] {
        let pod_address = format!("{}:8080", host.ip);
        let direct = connected_udp_from(port_of[pod], &pod_address);
        assert!(direct.ok, "{pod} answers the direct flow: {direct:?}");
        assert_eq!(direct.peer.as_deref(), Some(pod_address.as_str()));
        assert_eq!(direct.backend.as_deref(), Some(pod));
        assert_eq!(
            direct.source_seen.as_deref(),
            Some(setup.client.ip.to_string().as_str())
        );
    }
}

#[test]
fn a_syn_flood_through_a_node_port_evicts_the_flood_and_keeps_active_flows() {
    const TABLE: u32 = 4096;
    const SYNS: u32 = 12_000;
    let mut setup = two_nodes();
    let flooder = setup.cluster.client("flooder").expect("flooder");
    let c = &setup.cluster;
    c.write_manifest(
        "web.yaml",
        &manifests(&setup, web("NodePort"), &both_pods(&setup)),
    )
    .unwrap();
    let table = TABLE.to_string();
    c.start_agents(&[
        "--conntrack-max-entries",
        &table,
        "--conntrack-sweep-period",
        "500ms",
    ])
    .unwrap();
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    // 20 connections to both pods keep talking every 200 ms while 12,000
    // SYNs from 12,000 spoofed sources (three times the table) arrive at
    // 3,000 per second.
    let mut hold = c.hold(&setup.client, &dialled, 20, 7).unwrap();
    assert_eq!(hold.opened().unwrap(), 20);
    let flood = c
        .run_in(
            &flooder.netns,
            sibling_binary("dataplane-probe").unwrap().to_str().unwrap(),
            &[
                "flood",
                "--to",
                &dialled,
                "--sources",
                "10.99.0.1",
                "--count",
                &SYNS.to_string(),
                "--rate",
                "3000",
            ],
        )
        .unwrap();
    let flood: serde_json::Value = serde_json::from_str(flood.trim()).unwrap();
    assert_eq!(flood["sent"], SYNS, "{flood}");
    let summary = hold.summary().unwrap();
    assert_eq!(summary.open, 20, "{summary:?}");
    assert!(
        summary.failures.is_empty(),
        "active flows survive the flood: {summary:?}"
    );
    assert!(
        stat(c, 0, "ext_conntrack_created") >= 2 * u64::from(SYNS),
        "every SYN was a new flow"
    );
    // The agent reports the evictions and a table at its size.
    let metric = |name: &str| -> f64 {
        let metrics = c.nodes[0].metrics().unwrap();
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
    };
    c.nodes[0]
        .wait_until(
            "the sweep reports evictions",
            Duration::from_secs(5),
            || Ok(metric("dataplane_conntrack_evicted ") > 0.0),
        )
        .unwrap();
    let entries = metric("dataplane_map_entries{map=\"CONNTRACK\"}");
    assert!(entries <= f64::from(TABLE), "{entries} entries");
    assert_eq!(
        metric("dataplane_map_capacity{map=\"CONNTRACK\"}"),
        f64::from(TABLE)
    );
    // And new connections still work.
    assert_all_ok(&c.exchange(&setup.client, &dialled, 10, "tcp").unwrap());
}

/// NODE_IPS of node `index`: address -> `NODE_IP_*` bits.
fn node_ips(cluster: &Cluster, index: usize) -> BTreeMap<String, u32> {
    let layout = PinLayout::new(&cluster.nodes[index].pin_dir);
    let map: aya::maps::HashMap<MapData, u32, u32> =
        maps::open_pinned(&layout, map_names::NODE_IPS).unwrap();
    map.iter()
        .map(|entry| {
            let (key, uses) = entry.unwrap();
            (
                std::net::Ipv4Addr::from(key.to_ne_bytes()).to_string(),
                uses,
            )
        })
        .collect()
}

/// Adds (`add`) or removes (`del`) `address`/24 on node `index`'s
/// interface.
fn node_address(cluster: &Cluster, index: usize, verb: &str, address: &str) {
    cluster
        .run_in(
            &cluster.nodes[index].node_netns,
            "ip",
            &[
                "addr",
                verb,
                &format!("{address}/24"),
                "dev",
                NODE_INTERFACE,
            ],
        )
        .unwrap();
}

#[test]
fn nodeport_addresses_select_the_serving_addresses_and_follow_address_changes_at_once() {
    let setup = two_nodes();
    let c = &setup.cluster;
    // node-1 has a second address outside the selected prefix.
    node_address(c, 0, "add", "192.0.2.51");
    // A resync an hour away: only an address event can explain a change
    // taken in during the test.
    start_serving(
        &setup,
        web("NodePort"),
        &both_pods(&setup),
        &[
            "--nodeport-addresses",
            "192.0.2.0/28",
            "--sync-period",
            "1h",
        ],
    );
    let client_ip = setup.client.ip.to_string();
    let expected = [
        (&setup.pod1, client_ip.clone()),
        (&setup.pod2, client_ip.clone()),
    ];
    let selected = format!("{}:{NODE_PORT}", c.node_ip(0));
    assert_answers(
        &c.exchange(&setup.client, &selected, 20, "tcp").unwrap(),
        &selected,
        &expected,
    );
    // Outside the prefix: the node's own stack answers, with nothing
    // listening.
    let outside = format!("192.0.2.51:{NODE_PORT}");
    for attempt in c.exchange(&setup.client, &outside, 5, "tcp").unwrap() {
        assert_eq!(attempt.errno, Some(libc::ECONNREFUSED), "{attempt:?}");
    }
    assert_eq!(
        node_ips(c, 0),
        BTreeMap::from([
            ("192.0.2.11".to_string(), NODE_IP_PRESENT),
            (
                "192.0.2.51".to_string(),
                NODE_IP_PRESENT | NODE_IP_NO_NODE_PORTS
            ),
        ])
    );

    // An address added inside the prefix serves at once; removed, it
    // leaves NODE_IPS at once.
    node_address(c, 0, "add", "192.0.2.14");
    let added = format!("192.0.2.14:{NODE_PORT}");
    c.nodes[0]
        .wait_until(
            "the new address serves the nodePort",
            Duration::from_secs(10),
            || Ok(c.exchange(&setup.client, &added, 1, "tcp")?[0].ok),
        )
        .unwrap();
    assert_answers(
        &c.exchange(&setup.client, &added, 20, "tcp").unwrap(),
        &added,
        &expected,
    );
    node_address(c, 0, "del", "192.0.2.14");
    c.nodes[0]
        .wait_until(
            "the removed address leaves NODE_IPS",
            Duration::from_secs(10),
            || Ok(!node_ips(c, 0).contains_key("192.0.2.14")),
        )
        .unwrap();
}

#[test]
fn nodeport_addresses_primary_serves_the_node_objects_internal_ip_only() {
    let setup = two_nodes();
    let c = &setup.cluster;
    node_address(c, 0, "add", "192.0.2.51");
    start_serving(
        &setup,
        web("NodePort"),
        &both_pods(&setup),
        &["--nodeport-addresses", "primary"],
    );
    let primary = format!("{}:{NODE_PORT}", c.node_ip(0));
    // The Node object arrives with the first sync; the address serves
    // from then on.
    c.nodes[0]
        .wait_until(
            "the InternalIP serves the nodePort",
            Duration::from_secs(10),
            || Ok(c.exchange(&setup.client, &primary, 1, "tcp")?[0].ok),
        )
        .unwrap();
    assert_all_ok(&c.exchange(&setup.client, &primary, 20, "tcp").unwrap());
    let secondary = format!("192.0.2.51:{NODE_PORT}");
    for attempt in c.exchange(&setup.client, &secondary, 5, "tcp").unwrap() {
        assert_eq!(attempt.errno, Some(libc::ECONNREFUSED), "{attempt:?}");
    }
}

/// Every series selector of a PromQL expression that names one of the
/// agent's series: (name, [(label, value)]) for its `label="value"`
/// matchers.
fn selectors(expr: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_') {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let (name, after) = tail.split_at(end);
        rest = after;
        if !(name.starts_with("kubeproxy_") || name.starts_with("dataplane_")) {
            continue;
        }
        let mut matchers = Vec::new();
        if let Some(inside) = after.strip_prefix('{') {
            let close = inside.find('}').expect("a closed selector");
            for matcher in inside[..close].split(',').filter(|m| !m.trim().is_empty()) {
                assert!(
                    !matcher.contains("=~") && !matcher.contains("!="),
                    "only = matchers are checked: {matcher}"
                );
                let (label, value) = matcher.split_once('=').expect("an = matcher");
                matchers.push((label.trim().into(), value.trim().trim_matches('"').into()));
            }
            rest = &inside[close..];
        }
        out.push((name.to_owned(), matchers));
    }
    out
}

/// The labels of every `by (...)` clause of a PromQL expression.
fn grouping_labels(expr: &str) -> Vec<String> {
    expr.split("by (")
        .skip(1)
        .filter_map(|rest| rest.split_once(')'))
        .flat_map(|(labels, _)| labels.split(',').map(|l| l.trim().to_owned()))
        .collect()
}

#[test]
fn every_series_the_grafana_dashboard_queries_exists_on_a_running_agent() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../deploy/grafana/dataplane-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let setup = two_nodes();
    let c = &setup.cluster;
    let yaml = manifests(&setup, web("NodePort"), &both_pods(&setup));
    c.write_manifest("web.yaml", &yaml).unwrap();
    // A Service over the backend limit, so a frontend fails (its
    // endpoints need not exist).
    let unreachable: Vec<Ep> = (50..53)
        .map(|i| {
            Ep::ready(&Host {
                name: format!("ghost{i}"),
                netns: String::new(),
                ip: std::net::Ipv4Addr::new(10, 201, 0, i),
            })
            .on_node("node-1")
        })
        .collect();
    c.write_manifest(
        "big.yaml",
        &join(&[
            Svc::new("big", "10.96.0.20")
                .port("http", 80, "TCP", 8080)
                .yaml(),
            slice("big-1", "big", &[("http", 8080, "TCP")], &unreachable),
        ]),
    )
    .unwrap();
    c.start_agents(&[
        "--conntrack-sweep-period",
        "200ms",
        "--max-backends-per-service",
        "2",
    ])
    .unwrap();
    // Traffic, a failing frontend, a conntrack sweep and health answers,
    // so that every series has had a reason to appear.
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    assert_all_ok(&c.exchange(&setup.client, &dialled, 5, "tcp").unwrap());
    for path in ["/healthz", "/livez"] {
        c.nodes[0]
            .http_get_in_node("127.0.0.1:10256", path)
            .unwrap();
    }
    let before = sweeps(c, 0);
    c.nodes[0]
        .wait_until("a conntrack sweep", Duration::from_secs(10), || {
            Ok(sweeps(c, 0) > before)
        })
        .unwrap();
    let metrics = c.nodes[0].metrics().unwrap();
    let samples: Vec<&str> = metrics.lines().filter(|l| !l.starts_with('#')).collect();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for (name, matchers) in selectors(expr) {
                queried += 1;
                // A family without members now (no frontend failing) is
                // declared all the same.
                let base = ["_total", "_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(&name);
                let declared = matchers.is_empty() && metrics.contains(&format!("# TYPE {base} "));
                let found = declared
                    || samples.iter().any(|sample| {
                        let Some(labels) = sample.strip_prefix(name.as_str()) else {
                            return false;
                        };
                        (labels.starts_with(' ') || labels.starts_with('{'))
                            && matchers.iter().all(|(label, value)| {
                                labels.contains(&format!("{label}=\"{value}\""))
                            })
                    });
                assert!(
                    found,
                    "panel {:?} queries {name}{matchers:?}, which the agent does not export:\n{metrics}",
                    panel["title"]
                );
            }
        }
    }
    assert!(
        queried >= 25,
        "the dashboard's queries were read: {queried}"
    );
    // The labels panels group by are labels of the series they read.
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names: Vec<String> = selectors(expr).into_iter().map(|(name, _)| name).collect();
            for label in grouping_labels(expr)
                .into_iter()
                .filter(|l| *l != "le" && *l != "instance")
            {
                assert!(
                    samples.iter().any(|sample| names.iter().any(|name| {
                        sample.starts_with(&format!("{name}{{"))
                            && sample.contains(&format!("{label}=\""))
                    })),
                    "panel {:?} groups by {label}, which none of {names:?} carries",
                    panel["title"]
                );
            }
        }
    }
}

/// Drops every ICMP "fragmentation needed" that `netns` receives, sends
/// or forwards, as firewalls in front of clusters often do.
fn drop_fragmentation_needed(cluster: &Cluster, netns: &str) {
    let drop = "icmp type destination-unreachable icmp code frag-needed drop";
    let mut script = "add table ip no_pmtud".to_owned();
    for hook in ["input", "output", "forward"] {
        script += &format!(
            "; add chain ip no_pmtud {hook} {{ type filter hook {hook} priority 0; }}; add rule ip no_pmtud {hook} {drop}"
        );
    }
    cluster.run_in(netns, "nft", &[&script]).unwrap();
}

/// `web` on pod2 only: every flow through node-1's nodePort is tunnelled.
fn tunnelled_only(setup: &Setup, agent_args: &[&str]) {
    let pod2 = [Ep::ready(&setup.pod2).on_node("node-2")];
    start_serving(setup, web("NodePort"), &pod2, agent_args);
}

#[test]
fn with_fragmentation_needed_filtered_a_tunnelled_transfer_completes_through_mss_clamping() {
    let setup = two_nodes();
    let c = &setup.cluster;
    // The client never hears "fragmentation needed": without clamping, its
    // full-size segments never fit the tunnel and the transfer hangs.
    drop_fragmentation_needed(c, &setup.client.netns);
    tunnelled_only(&setup, &[]);
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    let report = c.transfer(&setup.client, &dialled, 10 << 20).unwrap();
    assert_eq!(report["ok"], true, "10 MiB through the tunnel: {report}");
    // Clamped from the first segment on: nothing had to be refused as too
    // big for the tunnel, either way.
    assert_eq!(stat(c, 0, "ext_too_big_for_tunnel"), 0, "client -> tunnel");
    assert_eq!(stat(c, 1, "ext_too_big_for_tunnel"), 0, "pod2 -> tunnel");
}

#[test]
fn a_fixed_mss_clamp_carries_a_transfer_over_a_smaller_link_whose_icmp_is_filtered() {
    let mut setup = two_nodes();
    let far_client = setup
        .cluster
        .client_behind_routers("far", 1400)
        .expect("client behind routers");
    let c = &setup.cluster;
    let id = &c.nodes[0].id;
    for router in [format!("{id}-r1"), format!("{id}-r2")] {
        drop_fragmentation_needed(c, &router);
    }
    // 1,400 - 50 (VXLAN) - 40 (IPv4 + TCP): what the narrowest link and
    // the tunnel both carry; `auto` only knows the node's 1,500.
    tunnelled_only(&setup, &["--tunnel-mss-clamp", "1310"]);
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    let report = c.transfer(&far_client, &dialled, 10 << 20).unwrap();
    assert_eq!(
        report["ok"], true,
        "10 MiB over the 1,400-byte link: {report}"
    );
}

#[test]
fn a_pod_reaches_another_nodes_node_port_whose_backend_is_on_its_own_node() {
    let mut setup = two_nodes();
    // A pod of node-2 outside the socket load balancing's cgroup, so its
    // packets to node-1's nodePort really leave node-2.
    let client_pod = setup.cluster.nodes[1].host("pod3").expect("pod3");
    let c = &setup.cluster;
    tunnelled_only(&setup, &[]);
    let dialled = format!("{}:{NODE_PORT}", c.node_ip(0));
    let attempts = c.nodes[1]
        .exchange_in(&client_pod.netns, false, &dialled, 20, "tcp")
        .unwrap();
    // Answered through node-1 (SNAT to its address), since pod2 would
    // answer pod3 directly on node-2, from an address pod3 never dialled.
    assert_answers(
        &attempts,
        &dialled,
        &[(&setup.pod2, c.node_ip(0).to_string())],
    );
    let udp = c.nodes[1]
        .exchange_in(&client_pod.netns, false, &dialled, 20, "udp")
        .unwrap();
    assert_answers(&udp, &dialled, &[(&setup.pod2, c.node_ip(0).to_string())]);
}
