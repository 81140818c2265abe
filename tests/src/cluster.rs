//! Several nodes on one "network" with clients outside the cluster: the
//! topology for external traffic.
//!
//! ```text
//!   client 192.0.2.100 --+
//!                        +-- bridge br0 (netns "lan") -- ext0 192.0.2.11 node-1 -- pods 10.201.n.2
//!   (router) ------------+                            -- ext0 192.0.2.12 node-2 -- pods 10.202.n.2
//! ```
//!
//! Each node is a [`Testbed`] (its own pods, cgroup, pins, manifests and
//! agent); nodes route each other's pod subnets over the network, as a
//! bare-metal cluster with host routes does. Everything is removed on drop.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};

use crate::{
    Host, Testbed,
    probe::Attempt,
    testbed::{ip, sibling_binary},
};

/// The node network.
pub const LAN_PREFIX: &str = "192.0.2";
/// Name of every node's interface on the node network.
pub const NODE_INTERFACE: &str = "ext0";

pub struct Cluster {
    /// Declared first, dropped first: the nodes' namespaces and agents go
    /// before the network they hang off.
    pub nodes: Vec<Testbed>,
    pub lan_netns: String,
    clients: Vec<Host>,
    next_port: u32,
}

impl Cluster {
    /// `count` nodes named node-1.. with InternalIPs 192.0.2.11..
    pub fn new(count: usize) -> Result<Self> {
        let mut nodes = Vec::new();
        for index in 1..=count {
            nodes.push(Testbed::node(&format!("node-{index}"), 200 + index as u8)?);
        }
        let lan_netns = format!("{}-lan", nodes[0].id);
        let mut cluster = Self {
            nodes,
            lan_netns,
            clients: Vec::new(),
            next_port: 0,
        };
        cluster.nodes[0].add_netns(&cluster.lan_netns)?;
        let lan = cluster.lan_netns.clone();
        ip(&["-n", &lan, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &lan, "link", "set", "br0", "up"])?;
        for index in 0..count {
            let netns = cluster.nodes[index].node_netns.clone();
            let address = cluster.node_ip(index);
            cluster.plug(&netns, NODE_INTERFACE, address)?;
        }
        // Each node reaches the other nodes' pods through them.
        for index in 0..count {
            for other in (0..count).filter(|o| *o != index) {
                ip(&[
                    "-n",
                    &cluster.nodes[index].node_netns,
                    "route",
                    "add",
                    &format!("10.{}.0.0/16", 201 + other),
                    "via",
                    &cluster.node_ip(other).to_string(),
                ])?;
            }
        }
        Ok(cluster)
    }

    /// The node network address of node `index` (0-based).
    pub fn node_ip(&self, index: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 11 + index as u8)
    }

    /// A client outside the cluster, on the node network at 192.0.2.100+.
    pub fn client(&mut self, name: &str) -> Result<Host> {
        let netns = format!("{}-{name}", self.nodes[0].id);
        self.nodes[0].add_netns(&netns)?;
        let address = Ipv4Addr::new(192, 0, 2, 100 + self.clients.len() as u8);
        let host = Host {
            name: name.into(),
            netns: netns.clone(),
            ip: address,
        };
        self.clients.push(host.clone());
        self.plug(&netns, "eth0", address)?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// A client two routers away from the node network, with a link of
    /// `mtu` bytes between the routers and 1,500 everywhere else, so that
    /// large packets either way need path MTU discovery (the routers answer
    /// "fragmentation needed"):
    ///
    /// ```text
    /// client 198.18.2.2 -1500- r1 -mtu- r2 192.0.2.254 -1500- node network
    /// ```
    pub fn client_behind_routers(&mut self, name: &str, mtu: u32) -> Result<Host> {
        let id = self.nodes[0].id.clone();
        let (r1, r2, netns) = (
            format!("{id}-r1"),
            format!("{id}-r2"),
            format!("{id}-{name}"),
        );
        for ns in [&r1, &r2, &netns] {
            self.nodes[0].add_netns(ns)?;
            self.clients.push(Host {
                name: ns.clone(),
                netns: ns.clone(),
                ip: Ipv4Addr::UNSPECIFIED,
            });
        }
        self.plug(&r2, "lan", Ipv4Addr::new(192, 0, 2, 254))?;
        link(
            &r2,
            "to-r1",
            "198.18.1.1/30",
            &r1,
            "to-r2",
            "198.18.1.2/30",
            mtu,
        )?;
        link(
            &r1,
            "to-client",
            "198.18.2.1/24",
            &netns,
            "eth0",
            "198.18.2.2/24",
            1500,
        )?;
        for router in [&r1, &r2] {
            ip(&["-n", router, "link", "set", "lo", "up"])?;
            self.run_in(router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        }
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "route", "add", "default", "via", "198.18.2.1"])?;
        ip(&["-n", &r1, "route", "add", "default", "via", "198.18.1.1"])?;
        ip(&[
            "-n",
            &r2,
            "route",
            "add",
            "198.18.2.0/24",
            "via",
            "198.18.1.2",
        ])?;
        for node in &self.nodes {
            ip(&[
                "-n",
                &node.node_netns,
                "route",
                "add",
                "198.18.0.0/16",
                "via",
                "192.0.2.254",
            ])?;
        }
        let host = Host {
            name: name.into(),
            netns,
            ip: Ipv4Addr::new(198, 18, 2, 2),
        };
        Ok(host)
    }

    /// Routes `prefix` (a load-balancer or external IP) from `client` to
    /// node `index`, as an upstream router or an L2 announcement would.
    pub fn route_to_node(&self, client: &Host, prefix: &str, index: usize) -> Result<()> {
        ip(&[
            "-n",
            &client.netns,
            "route",
            "add",
            prefix,
            "via",
            &self.node_ip(index).to_string(),
        ])
    }

    /// Connects `netns` to the bridge with `interface` at `address`/24.
    fn plug(&mut self, netns: &str, interface: &str, address: Ipv4Addr) -> Result<()> {
        self.next_port += 1;
        let bridge_port = format!("p{}", self.next_port);
        let lan = self.lan_netns.clone();
        ip(&[
            "-n",
            &lan,
            "link",
            "add",
            &bridge_port,
            "type",
            "veth",
            "peer",
            "name",
            interface,
            "netns",
            netns,
        ])?;
        ip(&["-n", &lan, "link", "set", &bridge_port, "master", "br0"])?;
        ip(&["-n", &lan, "link", "set", &bridge_port, "up"])?;
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            interface,
        ])?;
        ip(&["-n", netns, "link", "set", interface, "up"])
    }

    /// Sets the MTU of `interface` in `netns`.
    pub fn set_mtu(&self, netns: &str, interface: &str, mtu: u32) -> Result<()> {
        ip(&[
            "-n",
            netns,
            "link",
            "set",
            interface,
            "mtu",
            &mtu.to_string(),
        ])
    }

    /// Writes the same manifest to every node's agent.
    pub fn write_manifest(&self, file: &str, yaml: &str) -> Result<()> {
        for node in &self.nodes {
            node.write_manifest(file, yaml)?;
        }
        Ok(())
    }

    /// Starts every node's agent on the node network interface.
    pub fn start_agents(&self, extra_args: &[&str]) -> Result<()> {
        for node in &self.nodes {
            let mut args = vec!["--interfaces", NODE_INTERFACE];
            args.extend_from_slice(extra_args);
            node.start_agent(&args)
                .with_context(|| format!("starting the agent of {}", node.node_name))?;
        }
        Ok(())
    }

    /// `count` exchanges from a client outside the cluster (no socket LB).
    pub fn exchange(
        &self,
        client: &Host,
        to: &str,
        count: usize,
        mode: &str,
    ) -> Result<Vec<Attempt>> {
        self.nodes[0].exchange_in(&client.netns, false, to, count, mode)
    }

    /// Sends `bytes` over one TCP connection from `client` to `to` and reads
    /// them echoed back; returns the probe's JSON report.
    pub fn transfer(&self, client: &Host, to: &str, bytes: usize) -> Result<serde_json::Value> {
        let output = self.nodes[0]
            .command_in(&client.netns, false, sibling_binary("dataplane-probe")?)?
            .args(["transfer", "--to", to, "--bytes", &bytes.to_string()])
            .output()
            .context("running the probe's transfer")?;
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "transfer printed {:?} {:?}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    /// Starts `connections` long-lived TCP connections from `client` (see
    /// [`Testbed::hold`]).
    pub fn hold(
        &self,
        client: &Host,
        to: &str,
        connections: usize,
        seconds: u64,
    ) -> Result<crate::testbed::Hold> {
        self.nodes[0].hold_in(&client.netns, false, to, connections, seconds)
    }

    /// Runs `program args` in `netns` and returns its stdout.
    pub fn run_in(&self, netns: &str, program: &str, args: &[&str]) -> Result<String> {
        let output = self.nodes[0]
            .command_in(netns, false, program)?
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }
}

/// A veth pair between two namespaces, both ends with `mtu`.
fn link(
    a: &str,
    a_name: &str,
    a_address: &str,
    b: &str,
    b_name: &str,
    b_address: &str,
    mtu: u32,
) -> Result<()> {
    let mtu = mtu.to_string();
    ip(&[
        "-n", a, "link", "add", a_name, "mtu", &mtu, "type", "veth", "peer", "name", b_name, "mtu",
        &mtu, "netns", b,
    ])?;
    for (ns, name, address) in [(a, a_name, a_address), (b, b_name, b_address)] {
        ip(&["-n", ns, "addr", "add", address, "dev", name])?;
        ip(&["-n", ns, "link", "set", name, "up"])?;
    }
    Ok(())
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for client in &self.clients {
            let _ = ip(&["netns", "del", &client.netns]);
        }
        // The nodes (and their agents) go first, with the Vec.
        self.nodes.clear();
        let _ = ip(&["netns", "del", &self.lan_netns]);
    }
}
