//! The path most external flows of a real cluster take: a client outside
//! dials node-1's nodePort and every pod of the Service is on node-2. Ours
//! tunnels (VXLAN, the client's address kept) or SNATs; kube-proxy's rules
//! DNAT and masquerade on node-1 and route to node-2; the floor is the
//! client straight to the pods on node-2. Each variant has its own
//! two-node cluster, and the variants interleave round by round as in the
//! single-node bench.

use anyhow::{Context as _, Result, bail};
use dataplane_testbed::{
    Host,
    cluster::Cluster,
    manifests::{Ep, Svc, join, node_with_ip, slice},
    testbed::ip,
};
use serde::{Deserialize, Serialize};

use super::{Figure, Run, ServiceSet, figure, peers, probe_run};

const NODE_PORT: u16 = 30080;
const PODS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum TunnelVariant {
    Direct,
    OursTunnel,
    OursSnat,
    Iptables,
    Nftables,
}

impl TunnelVariant {
    pub(crate) const ALL: [TunnelVariant; 5] = [
        Self::Direct,
        Self::OursTunnel,
        Self::OursSnat,
        Self::Iptables,
        Self::Nftables,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct to node-2's pods (floor)",
            Self::OursTunnel => "ours, tunnel (client IP kept)",
            Self::OursSnat => "ours, snat",
            Self::Iptables => "kube-proxy iptables (masquerade)",
            Self::Nftables => "kube-proxy nftables (masquerade)",
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct TunnelRow {
    pub(crate) variant: TunnelVariant,
    pub(crate) short_connections: Figure,
    pub(crate) keepalive: Figure,
}

struct TunnelSite {
    variant: TunnelVariant,
    cluster: Cluster,
    client: Host,
    pods: Vec<Host>,
}

impl TunnelSite {
    fn new(variant: TunnelVariant) -> Result<Self> {
        let mut cluster = Cluster::new(2)?;
        let client = cluster.client("client")?;
        let mut pods = Vec::new();
        for i in 1..=PODS {
            let pod = cluster.nodes[1].host(&format!("pod{i}"))?;
            cluster.nodes[1].serve(&pod, 8080)?;
            pods.push(pod);
        }
        let site = Self {
            variant,
            cluster,
            client,
            pods,
        };
        site.load()?;
        Ok(site)
    }

    fn load(&self) -> Result<()> {
        let node_1 = &self.cluster.nodes[0];
        match self.variant {
            TunnelVariant::Direct => ip(&[
                "-n",
                &self.client.netns,
                "route",
                "add",
                "10.202.0.0/16",
                "via",
                &self.cluster.node_ip(1).to_string(),
            ]),
            TunnelVariant::OursTunnel | TunnelVariant::OursSnat => {
                self.cluster.write_manifest("web.yaml", &self.manifests())?;
                let mode = if self.variant == TunnelVariant::OursTunnel {
                    "tunnel"
                } else {
                    "snat"
                };
                self.cluster.start_agents(&[
                    "--external-mode",
                    mode,
                    "--metrics-bind-address",
                    "",
                    "--healthz-bind-address",
                    "",
                ])
            }
            TunnelVariant::Iptables | TunnelVariant::Nftables => {
                let set = ServiceSet::new(1, &self.pods);
                let (tool, flag, file, rules) = if self.variant == TunnelVariant::Iptables {
                    (
                        "iptables-nft-restore",
                        "--noflush",
                        "iptables.rules",
                        peers::iptables_rules(&set),
                    )
                } else {
                    ("nft", "-f", "nftables.rules", peers::nftables_rules(&set))
                };
                let path = node_1.work_dir.join(file);
                std::fs::write(&path, rules)?;
                let status = node_1
                    .command_in(&node_1.node_netns, false, tool)?
                    .arg(flag)
                    .arg(&path)
                    .status()
                    .with_context(|| format!("running {tool}"))?;
                if !status.success() {
                    bail!("{tool} failed to load the tunnel case's rules: {status}");
                }
                Ok(())
            }
        }
    }

    /// Both Node objects (the tunnel's addresses) and the Service with
    /// every pod on node-2.
    fn manifests(&self) -> String {
        let mut documents: Vec<String> = (0..2)
            .map(|i| node_with_ip(&self.cluster.nodes[i].node_name, self.cluster.node_ip(i)))
            .collect();
        documents.push(
            Svc::new("hot", &super::HOT_VIP.to_string())
                .node_port("http", 80, "TCP", 8080, NODE_PORT)
                .spec("type: NodePort")
                .yaml(),
        );
        let endpoints: Vec<Ep> = self
            .pods
            .iter()
            .map(|pod| Ep::ready(pod).on_node(&self.cluster.nodes[1].node_name))
            .collect();
        documents.push(slice("hot-1", "hot", &[("http", 8080, "TCP")], &endpoints));
        join(&documents)
    }

    fn target(&self) -> String {
        match self.variant {
            TunnelVariant::Direct => self
                .pods
                .iter()
                .map(|pod| format!("{}:8080", pod.ip))
                .collect::<Vec<_>>()
                .join(","),
            _ => format!("{}:{NODE_PORT}", self.cluster.node_ip(0)),
        }
    }

    fn measure(&self, load: &str, seconds: f64, parallel: usize) -> Result<Run> {
        probe_run(
            &self.cluster.nodes[0],
            &self.client,
            false,
            &self.target(),
            load,
            seconds,
            parallel,
        )
    }
}

/// Every variant, `rounds` rounds of new connections and keep-alive
/// requests, interleaved.
pub(crate) fn measure(
    rounds: usize,
    seconds: f64,
    parallel: usize,
    interrupt: &dataplane_testbed::interrupt::Interrupt,
) -> Result<Vec<TunnelRow>> {
    let sites = TunnelVariant::ALL
        .into_iter()
        .map(TunnelSite::new)
        .collect::<Result<Vec<_>>>()?;
    let mut runs: Vec<[Vec<Run>; 2]> = sites.iter().map(|_| Default::default()).collect();
    for round in 0..rounds {
        for (index, load) in ["short", "keepalive"].into_iter().enumerate() {
            for turn in 0..sites.len() {
                interrupt.check()?;
                let site = (turn + round) % sites.len();
                runs[site][index].push(sites[site].measure(load, seconds, parallel)?);
            }
        }
        println!("bench: tunnel path round {} of {rounds} done", round + 1);
    }
    Ok(sites
        .iter()
        .zip(runs)
        .map(|(site, [short, keepalive])| TunnelRow {
            variant: site.variant,
            short_connections: figure(short),
            keepalive: figure(keepalive),
        })
        .collect())
}
