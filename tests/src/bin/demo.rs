//! `dataplane-demo` (run by `cargo xtask demo`, which installs what the
//! build needs and builds it first): the product's main job on an embedded default. A
//! node namespace with a client and three pods, the real agent serving
//! `deploy/examples/`, and TCP connections through the ClusterIP; then two
//! nodes with a pod each and a client outside the cluster, connecting
//! through a NodePort. Prints who answered and which source address each
//! backend saw.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use dataplane_testbed::{
    Testbed,
    cluster::Cluster,
    interrupt::Interrupt,
    manifests::{Ep, Svc, join, node_with_ip, slice},
    probe::tally,
};

const SERVICE: &str = "10.96.0.10:80";
const DRAINING_SERVICE: &str = "10.96.0.11:80";

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// A small namespace cluster, the real agent, traffic through a Service
/// (as root).
#[derive(Parser)]
#[command(name = "dataplane-demo")]
struct Args {
    /// Connections to send through the Service.
    #[arg(long, default_value_t = 30)]
    connections: usize,
}

fn main() -> Result<()> {
    let Args { connections } = Args::parse();
    let interrupt = Interrupt::install()?;
    interrupt.explain(run_demo(connections, &interrupt))
}

fn run_demo(connections: usize, interrupt: &Interrupt) -> Result<()> {
    let check = || interrupt.check();

    println!("demo: building a node namespace with a client and three pods");
    let mut tb = Testbed::new()?;
    let client = tb.host("client")?;
    let mut pods = Vec::new();
    for name in ["pod1", "pod2", "pod3"] {
        let pod = tb.host(name)?;
        tb.serve(&pod, 8080)?;
        pods.push(pod);
    }
    check()?;
    for entry in std::fs::read_dir(examples_dir()).context("reading deploy/examples")? {
        let path = entry.context("listing deploy/examples")?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(
                &path,
                tb.manifests.join(path.file_name().context("file name")?),
            )?;
        }
    }
    println!(
        "demo: starting dataplane-agent on deploy/examples/ (cgroup {})",
        tb.cgroup.display()
    );
    tb.start_agent(&[])?;
    check()?;
    let dump = tb.agent_cli(&["dump", "services"])?;
    println!(
        "\n$ dataplane-agent dump services\n{}",
        String::from_utf8_lossy(&dump.stdout)
    );

    println!(
        "demo: {connections} TCP connections from the client ({}) to {SERVICE}",
        client.ip
    );
    let attempts = tb.connect(&client, SERVICE, connections)?;
    check()?;
    let failed = attempts.iter().filter(|a| !a.ok).count();
    println!(
        "\n{:<8} {:<12} {:>12}   SOURCE IP SEEN BY BACKEND",
        "BACKEND", "POD IP", "CONNECTIONS"
    );
    for (backend, seen) in tally(&attempts) {
        let ip = pods
            .iter()
            .find(|p| p.name == backend)
            .map(|p| p.ip.to_string())
            .unwrap_or_default();
        let sources: Vec<String> = seen.sources.keys().cloned().collect();
        println!(
            "{backend:<8} {ip:<12} {:>12}   {}",
            seen.served,
            sources.join(", ")
        );
    }
    let peer = attempts
        .iter()
        .find_map(|a| a.peer.clone())
        .unwrap_or_default();
    println!("\nclient's getpeername(): {peer} (the Service, not the pod)");

    let datagrams = tb.exchange(&client, SERVICE, 10, "udp-unconnected")?;
    check()?;
    let udp_failed = datagrams.iter().filter(|a| !a.ok).count();
    let answered: Vec<String> = tally(&datagrams)
        .into_iter()
        .map(|(backend, seen)| format!("{backend} x{}", seen.served))
        .collect();
    let udp_peer = datagrams
        .iter()
        .find_map(|a| a.peer.clone())
        .unwrap_or_default();
    println!(
        "UDP sendto({SERVICE}) x10: answered by {}; recvfrom() says the reply came from {udp_peer}",
        answered.join(", ")
    );

    let refused = tb.connect(&client, DRAINING_SERVICE, 1)?;
    if let Some(attempt) = refused.first() {
        println!(
            "{DRAINING_SERVICE} (no ready endpoint): {} after {} µs",
            attempt.error.as_deref().unwrap_or("connected?!"),
            attempt.micros
        );
    }

    let tallies = tally(&attempts);
    let client_ip = client.ip.to_string();
    if failed > 0 {
        bail!("{failed} of {connections} connections failed");
    }
    if udp_failed > 0 || datagrams.iter().any(|a| a.peer.as_deref() != Some(SERVICE)) {
        bail!("UDP through the Service failed or was not reverse-translated: {datagrams:?}");
    }
    if tallies
        .values()
        .any(|t| t.sources.keys().any(|s| *s != client_ip))
    {
        bail!("a backend saw a source other than the client's {client_ip}");
    }
    drop(tb);
    check()?;
    external_traffic(connections, interrupt)?;
    println!("\ndemo: ok; removing the demo cluster");
    Ok(())
}

const NODE_PORT: u16 = 30080;

/// Two nodes, one pod on each, a client outside the cluster: connections to
/// node-1's nodePort reach both pods, the one on node-2 through the tunnel,
/// and both see the client's own address.
fn external_traffic(connections: usize, interrupt: &Interrupt) -> Result<()> {
    println!(
        "\ndemo: external traffic: two nodes (192.0.2.11, 192.0.2.12) with a pod each, a client outside"
    );
    let mut cluster = Cluster::new(2)?;
    let client = cluster.client("client")?;
    let pod1 = cluster.nodes[0].host("pod1")?;
    let pod2 = cluster.nodes[1].host("pod2")?;
    cluster.nodes[0].serve(&pod1, 8080)?;
    cluster.nodes[1].serve(&pod2, 8080)?;
    let service = Svc::new("web", "10.96.0.20")
        .node_port("http", 80, "TCP", 8080, NODE_PORT)
        .spec("type: NodePort");
    let manifests = join(&[
        node_with_ip("node-1", cluster.node_ip(0)),
        node_with_ip("node-2", cluster.node_ip(1)),
        service.yaml(),
        slice(
            "web-1",
            "web",
            &[("http", 8080, "TCP")],
            &[
                Ep::ready(&pod1).on_node("node-1"),
                Ep::ready(&pod2).on_node("node-2"),
            ],
        ),
    ]);
    cluster.write_manifest("web.yaml", &manifests)?;
    println!("demo: starting dataplane-agent on both nodes (--interfaces ext0, tunnel mode)");
    cluster.start_agents(&[])?;
    interrupt.check()?;
    let dialled = format!("{}:{NODE_PORT}", cluster.node_ip(0));
    println!(
        "demo: {connections} TCP connections from the client ({}) to node-1's NodePort {dialled}",
        client.ip
    );
    let attempts = cluster.exchange(&client, &dialled, connections, "tcp")?;
    interrupt.check()?;
    println!(
        "\n{:<8} {:<8} {:<12} {:>12}   SOURCE IP SEEN BY BACKEND",
        "BACKEND", "NODE", "POD IP", "CONNECTIONS"
    );
    for (backend, seen) in tally(&attempts) {
        let (node, ip) = if backend == pod1.name {
            ("node-1", pod1.ip)
        } else {
            ("node-2", pod2.ip)
        };
        let sources: Vec<String> = seen.sources.keys().cloned().collect();
        println!(
            "{backend:<8} {node:<8} {ip:<12} {:>12}   {}",
            seen.served,
            sources.join(", ")
        );
    }
    let peer = attempts
        .iter()
        .find_map(|a| a.peer.clone())
        .unwrap_or_default();
    println!(
        "\nclient's getpeername(): {peer} (node-1's NodePort: node-2's pod answered through the tunnel)"
    );
    let failed = attempts.iter().filter(|a| !a.ok).count();
    if failed > 0 {
        bail!("{failed} of {connections} NodePort connections failed");
    }
    let client_ip = client.ip.to_string();
    if tally(&attempts)
        .values()
        .any(|t| t.sources.keys().any(|s| *s != client_ip))
    {
        bail!("a backend behind the NodePort saw a source other than the client's {client_ip}");
    }
    if tally(&attempts).len() != 2 {
        bail!("not both pods answered through the NodePort");
    }
    Ok(())
}
