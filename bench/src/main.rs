//! `dataplane-bench` (run by `cargo xtask bench`, which installs what it
//! needs and builds it first): the same topology and the same traffic through four
//! dataplanes in one run (direct pod-to-pod as the floor, ours, kube-proxy's
//! iptables and nftables rule sets), at several Service counts: short
//! connections, keep-alive requests and bulk throughput through a ClusterIP
//! from a pod, short connections and keep-alive requests through a NodePort
//! from a client outside the cluster; the in-kernel cost of the interface
//! programs per packet (BPF_PROG_TEST_RUN) beside a no-op program; a JSON
//! file, a Markdown table of ratios and PNG charts.
//!
//! The Service under test is one of N (placed last in kube-proxy's
//! KUBE-SERVICES chain, its worst case; no effect on the map-based
//! dataplanes); its 10 endpoints are real pods, the other Services' are
//! addresses nobody dials, there to make the rule sets as large as a real
//! cluster's.

mod charts;
mod control_plane;
mod peers;
mod program_cost;
mod readme;
mod report;
mod tunnel;

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use dataplane_testbed::{Host, Testbed, interrupt::Interrupt, manifests, probe::BenchRun};
use serde::{Deserialize, Serialize};

/// Benchmarks: ours beside kube-proxy's iptables and nftables modes and
/// direct pod-to-pod, at several Service counts, in one run (as root).
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "dataplane-bench")]
pub struct BenchArgs {
    /// The full set: 100, 1,000, 10,000 and 50,000 Services, longer runs.
    #[arg(long)]
    full: bool,
    /// Service counts (overrides the mode's).
    #[arg(long, value_delimiter = ',')]
    scales: Vec<usize>,
    /// Service counts of the control-plane measurements (default: 100 and
    /// 10,000; full: up to 100,000).
    #[arg(long, value_delimiter = ',')]
    control_plane_scales: Vec<usize>,
    /// Measure the control plane only (printed and written to --out; the
    /// README is left alone).
    #[arg(long)]
    control_plane_only: bool,
    /// Seconds per measurement.
    #[arg(long)]
    seconds: Option<f64>,
    /// Rounds: each measures every load of every dataplane once, the
    /// dataplanes interleaved (the median is reported, with min..max).
    #[arg(long)]
    rounds: Option<usize>,
    /// Clients running each short and keep-alive load at once (default:
    /// two per core). One client alone measures the machine's wake-up
    /// latency more than the dataplane: with idle cores, a ping-pong's
    /// rate swings 1.5x with whatever else keeps a core awake.
    #[arg(long)]
    parallel: Option<usize>,
    /// Longest a peer may take to load its rule set before it is reported
    /// as not loaded (kube-proxy's iptables mode takes minutes at 10,000
    /// Services).
    #[arg(long)]
    load_timeout_seconds: Option<u64>,
    /// Where results.json, results.md and the charts go (default
    /// target/bench; the committed full-mode results live in docs/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Measure nothing: render results.md, summary.md, the charts (and
    /// the README's summary, for docs/bench) again from this results.json,
    /// as a change to the report's wording needs.
    #[arg(long, value_name = "RESULTS_JSON")]
    render: Option<PathBuf>,
}

const ENDPOINTS_PER_SERVICE: usize = 10;
const HOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The hot Service's nodePort, dialled on the node's address on the
/// client's link (the interface the agent's TC programs serve).
const HOT_NODE_PORT: u16 = 30080;
/// The node's address on the client's link, and that link's name there.
const NODE_ADDRESS: &str = "10.200.1.1";
const CLIENT_LINK: &str = "h1";
/// How the bench runs our agent: no servers of its own (the bench reads
/// the pinned maps), the interface programs on the client's link.
const OUR_AGENT_ARGS: [&str; 6] = [
    "--metrics-bind-address",
    "",
    "--healthz-bind-address",
    "",
    "--interfaces",
    CLIENT_LINK,
];

#[derive(Clone, Debug)]
pub struct BenchService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// Only the hot Service has one (kube-proxy's NodePort rules are
    /// reached after the whole KUBE-SERVICES scan, its worst case anyway).
    pub node_port: Option<u16>,
    pub endpoints: Vec<Ipv4Addr>,
}

/// N Services, the hot one last.
#[derive(Clone, Debug)]
pub struct ServiceSet {
    pub services: Vec<BenchService>,
}

impl ServiceSet {
    fn new(count: usize, pods: &[Host]) -> Self {
        let mut services: Vec<BenchService> = (1..count)
            .map(|i| BenchService {
                name: format!("bench/filler-{i}"),
                // 10.100.0.0/16 onwards: never dialled.
                cluster_ip: Ipv4Addr::from(0x0a64_0000 + i as u32),
                port: 80,
                node_port: None,
                endpoints: (0..ENDPOINTS_PER_SERVICE)
                    .map(|e| {
                        Ipv4Addr::from(
                            0x0ac8_0000 + (i * ENDPOINTS_PER_SERVICE + e) as u32 + 0x1_0000,
                        )
                    })
                    .collect(),
            })
            .collect();
        services.push(BenchService {
            name: "bench/hot".into(),
            cluster_ip: HOT_VIP,
            port: 80,
            node_port: Some(HOT_NODE_PORT),
            endpoints: pods.iter().map(|p| p.ip).collect(),
        });
        Self { services }
    }

    /// The filler Services in bench.yaml, the hot one in hot.yaml.
    fn write_manifests(&self, tb: &Testbed) -> Result<()> {
        tb.write_manifest("bench.yaml", &self.filler_manifests())?;
        let hot = self.services.last().context("no hot Service")?;
        tb.write_manifest("hot.yaml", &self.hot_manifests(&hot.endpoints)?)
    }

    /// The Services but the hot one, as manifests for the agent.
    fn filler_manifests(&self) -> String {
        let documents: Vec<String> = self.services[..self.services.len() - 1]
            .iter()
            .map(|s| service_yaml(s, &s.endpoints))
            .collect();
        documents.join("---\n")
    }

    /// The hot Service with `endpoints`, in a file of its own, so an
    /// endpoint change rewrites only that file (as an EndpointSlice update
    /// touches one object).
    fn hot_manifests(&self, endpoints: &[Ipv4Addr]) -> Result<String> {
        let hot = self
            .services
            .last()
            .context("a Service set without its hot Service")?;
        Ok(service_yaml(hot, endpoints))
    }
}

fn service_yaml(s: &BenchService, endpoints: &[Ipv4Addr]) -> String {
    let name = s.name.replace("bench/", "");
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|ip| format!("- addresses: [\"{ip}\"]\n  conditions: {{ready: true}}\n"))
        .collect();
    let service = manifests::Svc::new(&name, &s.cluster_ip.to_string());
    let service = match s.node_port {
        Some(node_port) => service
            .node_port("http", s.port, "TCP", 8080, node_port)
            .spec("type: NodePort"),
        None => service.port("http", s.port, "TCP", 8080),
    };
    manifests::join(&[
        service.yaml(),
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n{}",
            endpoints.concat()
        ),
    ])
}

/// Endpoint changes of the hot Service, each timed from the manifest write
/// to the SERVICES entry flipping to the new generation (read from the
/// pinned map); p50 and p99 in milliseconds. Includes the agent's
/// --min-sync-period (100 ms by default; kube-proxy's iptables mode: 1 s).
fn endpoint_change_latency(tb: &Testbed, set: &ServiceSet, changes: usize) -> Result<(f64, f64)> {
    use aya::maps::{HashMap, MapData};
    use dataplane_common::{ServiceKey, ServiceValue, map_names};
    let layout = dataplane_agent::dataplane::pins::PinLayout::new(&tb.pin_dir);
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        dataplane_agent::dataplane::maps::open_pinned(&layout, map_names::SERVICES)?;
    let key = ServiceKey {
        vip_be: u32::from_ne_bytes(HOT_VIP.octets()),
        port_be: 80u16.to_be(),
        protocol: dataplane_common::IPPROTO_TCP,
        scope: dataplane_common::SCOPE_CLUSTER,
    };
    let hot = set.services.last().context("no hot Service")?;
    let mut latencies = Vec::with_capacity(changes);
    for change in 0..changes {
        let before = services
            .get(&key, 0)
            .context("the hot Service is not programmed")?;
        // Every change drops a different pod (and restores the previous).
        let endpoints: Vec<Ipv4Addr> = hot
            .endpoints
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != change % hot.endpoints.len())
            .map(|(_, ip)| *ip)
            .collect();
        let written = Instant::now();
        tb.write_manifest("hot.yaml", &set.hot_manifests(&endpoints)?)?;
        loop {
            let now = services.get(&key, 0).context("the hot Service vanished")?;
            if now.generation != before.generation {
                break;
            }
            if written.elapsed() > Duration::from_secs(10) {
                bail!("an endpoint change was not programmed within 10 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        latencies.push(written.elapsed().as_secs_f64() * 1e3);
    }
    // Back to every pod for the measurements that follow.
    tb.write_manifest("hot.yaml", &set.hot_manifests(&hot.endpoints)?)?;
    std::thread::sleep(Duration::from_millis(500));
    latencies.sort_by(f64::total_cmp);
    Ok((
        latencies[latencies.len() / 2],
        latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)],
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Dataplane {
    Direct,
    Ours,
    Iptables,
    Nftables,
}

impl Dataplane {
    const ALL: [Dataplane; 4] = [Self::Direct, Self::Ours, Self::Iptables, Self::Nftables];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (floor)",
            Self::Ours => "ours (eBPF)",
            Self::Iptables => "kube-proxy iptables",
            Self::Nftables => "kube-proxy nftables",
        }
    }
}

/// One probe run, with the machine's CPU time it took.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct Run {
    #[serde(flatten)]
    probe: BenchRun,
    /// CPU time of the whole machine per 1,000 requests, in milliseconds.
    #[serde(default)]
    cpu_ms_per_1000: f64,
}

/// The median run (by rate) of the rounds, with the spread of the rates.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct Figure {
    median: Run,
    rate_min: f64,
    rate_max: f64,
    /// Verified exchanges and failed ones over all rounds.
    count: u64,
    failures: u64,
    /// How many runs (rounds) the figure is made of.
    runs: usize,
    /// Bulk: a run that lost a byte is no figure at all.
    lossless: bool,
}

impl Figure {
    /// More than 1% of the exchanges failed (any failure for bulk): the
    /// rate says nothing.
    fn invalid(&self) -> bool {
        if self.lossless {
            return self.failures > 0;
        }
        self.failures * 100 > (self.count + self.failures).max(1)
    }

    /// `rate [min..max]`, with the failures beside it.
    fn cell(&self, scale: f64, digits: usize) -> String {
        let mut cell = format!(
            "{:.digits$} [{:.digits$}..{:.digits$}]",
            self.median.probe.rate * scale,
            self.rate_min * scale,
            self.rate_max * scale
        );
        if self.failures > 0 {
            let _ = write!(cell, " ({} failed)", self.failures);
        }
        if self.invalid() {
            cell = format!("invalid: {cell}");
        }
        cell
    }
}

/// The five loads of every round, in the order a round measures them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Load {
    ClusterShort,
    ClusterKeepalive,
    ClusterBulk,
    NodePortShort,
    NodePortKeepalive,
}

impl Load {
    const ALL: [Load; 5] = [
        Self::ClusterShort,
        Self::ClusterKeepalive,
        Self::ClusterBulk,
        Self::NodePortShort,
        Self::NodePortKeepalive,
    ];

    fn probe_load(self) -> &'static str {
        match self {
            Self::ClusterShort | Self::NodePortShort => "short",
            Self::ClusterKeepalive | Self::NodePortKeepalive => "keepalive",
            Self::ClusterBulk => "bulk",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::ClusterShort => "ClusterIP new connections",
            Self::ClusterKeepalive => "ClusterIP keep-alive requests",
            Self::ClusterBulk => "ClusterIP bulk",
            Self::NodePortShort => "NodePort new connections",
            Self::NodePortKeepalive => "NodePort keep-alive requests",
        }
    }

    fn through_node_port(self) -> bool {
        matches!(self, Self::NodePortShort | Self::NodePortKeepalive)
    }
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct Row {
    services: usize,
    dataplane: Option<Dataplane>,
    /// The figures are None when the dataplane did not load within the
    /// timeout. ClusterIP, from a pod:
    short_connections: Option<Figure>,
    keepalive: Option<Figure>,
    /// Bytes per second on one connection.
    bulk: Option<Figure>,
    /// NodePort, from a client outside the cluster (the floor: the same
    /// client to the pods' own addresses).
    node_port_short: Option<Figure>,
    node_port_keepalive: Option<Figure>,
    /// Time to program all Services: the agent from start to ready, the
    /// peers their rule load (the timeout, if it did not load).
    program_seconds: f64,
}

impl Row {
    fn dataplane(&self) -> Dataplane {
        self.dataplane.unwrap_or(Dataplane::Direct)
    }

    fn figure(&self, load: Load) -> Option<&Figure> {
        match load {
            Load::ClusterShort => self.short_connections.as_ref(),
            Load::ClusterKeepalive => self.keepalive.as_ref(),
            Load::ClusterBulk => self.bulk.as_ref(),
            Load::NodePortShort => self.node_port_short.as_ref(),
            Load::NodePortKeepalive => self.node_port_keepalive.as_ref(),
        }
    }
}

#[derive(Deserialize, Serialize)]
struct Results {
    commit: String,
    /// The agent's build: "release" unless the bench was built without
    /// optimisations.
    build: String,
    kernel: String,
    cores: usize,
    seconds_per_run: f64,
    /// Clients per short and keep-alive run.
    parallel: usize,
    rounds: usize,
    rows: Vec<Row>,
    /// A nodePort whose pods are all on another node.
    tunnel: Vec<tunnel::TunnelRow>,
    control_plane: Vec<control_plane::ControlPlaneRow>,
    program_costs: Vec<program_cost::Cost>,
}

fn busy_jiffies() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    Ok(fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum())
}

/// One dataplane's own node: a node namespace with the client and the ten
/// pods, so every dataplane stays loaded while the rounds interleave.
struct Site {
    dataplane: Dataplane,
    tb: Testbed,
    client: Host,
    pods: Vec<Host>,
}

impl Site {
    fn new(dataplane: Dataplane) -> Result<Self> {
        let mut tb = Testbed::new()?;
        let client = tb.host("client")?;
        let mut pods = Vec::new();
        for i in 1..=ENDPOINTS_PER_SERVICE {
            let pod = tb.host(&format!("pod{i}"))?;
            tb.serve(&pod, 8080)?;
            pods.push(pod);
        }
        Ok(Self {
            dataplane,
            tb,
            client,
            pods,
        })
    }

    /// Where `load` dials: the hot Service, or (the floor) the same pods
    /// the Service spreads over, in turn.
    fn target(&self, load: Load) -> String {
        match (self.dataplane, load.through_node_port()) {
            (Dataplane::Direct, _) => self
                .pods
                .iter()
                .map(|pod| format!("{}:8080", pod.ip))
                .collect::<Vec<_>>()
                .join(","),
            (_, false) => format!("{HOT_VIP}:80"),
            (_, true) => format!("{NODE_ADDRESS}:{HOT_NODE_PORT}"),
        }
    }

    fn measure(&self, load: Load, seconds: f64, parallel: usize) -> Result<Run> {
        // ClusterIP traffic comes from a pod (in the cgroup socket LB
        // serves); NodePort traffic from a client outside the cluster.
        let in_cgroup = !load.through_node_port();
        probe_run(
            &self.tb,
            &self.client,
            in_cgroup,
            &self.target(load),
            load.probe_load(),
            seconds,
            parallel,
        )
    }
}

fn probe_run(
    tb: &Testbed,
    client: &Host,
    in_cgroup: bool,
    target: &str,
    load: &str,
    seconds: f64,
    parallel: usize,
) -> Result<Run> {
    let before = busy_jiffies()?;
    let output = tb.probe(
        client,
        in_cgroup,
        &[
            "bench",
            "--to",
            target,
            "--seconds",
            &seconds.to_string(),
            "--load",
            load,
            "--parallel",
            &parallel.to_string(),
        ],
    )?;
    let jiffies = busy_jiffies()?.saturating_sub(before);
    let probe: BenchRun =
        serde_json::from_str(output.trim()).with_context(|| format!("probe said {output:?}"))?;
    // USER_HZ is 100: a jiffy is 10 ms.
    let cpu_ms_per_1000 = if probe.count == 0 {
        0.0
    } else {
        jiffies as f64 * 10.0 / probe.count as f64 * 1000.0
    };
    if probe.failures > 0 {
        println!(
            "bench:   note: {} of {} {load} exchanges with {target} failed",
            probe.failures,
            probe.count + probe.failures
        );
    }
    Ok(Run {
        probe,
        cpu_ms_per_1000,
    })
}

/// The probe must count what is not a verified answer as a failure: runs
/// against a server that closes every connection at once, and keep-alive
/// runs against one that greets and then answers the wrong line, must fail
/// whole.
fn self_check(site: &mut Site) -> Result<()> {
    println!("bench: self-check: runs against servers that answer nothing or the wrong thing");
    let pod = site.pods[0].clone();
    site.tb
        .serve_with(&pod, &["serve-closing", "--listen", "0.0.0.0:8090"])?;
    site.tb
        .serve_with(&pod, &["serve-wrong-echo", "--listen", "0.0.0.0:8091"])?;
    for (port, load) in [(8090, "short"), (8090, "keepalive"), (8091, "keepalive")] {
        let target = format!("{}:{port}", pod.ip);
        let run = probe_run(&site.tb, &site.client, false, &target, load, 0.3, 1)?;
        if run.probe.count != 0 || run.probe.failures == 0 {
            bail!(
                "self-check: a {load} run against {target} reported {} answers and {} failures; the probe does not verify answers",
                run.probe.count,
                run.probe.failures
            );
        }
    }
    println!("bench: self-check passed: every such exchange counted as a failure");
    Ok(())
}

fn figure(runs: Vec<Run>) -> Figure {
    figure_of(runs, false)
}

/// [`figure`] of bulk runs: any failure (bytes lost) invalidates it.
fn bulk_figure(runs: Vec<Run>) -> Figure {
    figure_of(runs, true)
}

fn figure_of(mut runs: Vec<Run>, lossless: bool) -> Figure {
    runs.sort_by(|a, b| a.probe.rate.total_cmp(&b.probe.rate));
    Figure {
        runs: runs.len(),
        lossless,
        count: runs.iter().map(|r| r.probe.count).sum(),
        failures: runs.iter().map(|r| r.probe.failures).sum(),
        rate_min: runs.first().map_or(0.0, |r| r.probe.rate),
        rate_max: runs.last().map_or(0.0, |r| r.probe.rate),
        // The lower middle of an even count: never the maximum of two.
        median: runs[(runs.len() - 1) / 2].clone(),
    }
}

/// Loads a dataplane for `set`; returns how long programming took, or
/// None if a peer's rule load did not finish within `timeout`.
fn load(site: &Site, set: &ServiceSet, timeout: u64) -> Result<Option<f64>> {
    let tb = &site.tb;
    let started = Instant::now();
    let (tool, flag, file, rules) = match site.dataplane {
        Dataplane::Direct => return Ok(Some(0.0)),
        Dataplane::Ours => {
            set.write_manifests(tb)?;
            tb.start_agent(&OUR_AGENT_ARGS)?;
            return Ok(Some(started.elapsed().as_secs_f64()));
        }
        Dataplane::Iptables => (
            "iptables-nft-restore",
            "--noflush",
            "iptables.rules",
            peers::iptables_rules(set),
        ),
        Dataplane::Nftables => ("nft", "-f", "nftables.rules", peers::nftables_rules(set)),
    };
    let path = tb.work_dir.join(file);
    std::fs::write(&path, rules)?;
    let status = tb
        .command_in(&tb.node_netns, false, "timeout")?
        .args([&timeout.to_string(), tool, flag])
        .arg(&path)
        .status()
        .with_context(|| format!("running {tool}"))?;
    match status.code() {
        Some(0) => Ok(Some(started.elapsed().as_secs_f64())),
        // timeout(1)'s status when the command ran out of time.
        Some(124) => Ok(None),
        _ => bail!(
            "{tool} failed to load the {} Services with {status}",
            set.services.len()
        ),
    }
}

fn unload(site: &Site) -> Result<()> {
    let tb = &site.tb;
    match site.dataplane {
        Dataplane::Direct => {}
        Dataplane::Ours => {
            // At 50,000 Services a periodic full resync takes seconds, and
            // the agent handles SIGTERM once it is done.
            tb.stop_agent_within(libc::SIGTERM, Duration::from_secs(120))?;
            tb.agent_cli(&["cleanup"])?;
        }
        Dataplane::Iptables => {
            tb.in_node("iptables-nft", &["-t", "nat", "-F"])?;
            tb.in_node("iptables-nft", &["-t", "nat", "-X"])?;
        }
        Dataplane::Nftables => {
            // `nft -f` is atomic: after a timed-out load there is no table.
            if tb
                .in_node("nft", &["list", "tables"])?
                .contains("kube-proxy")
            {
                tb.in_node("nft", &["delete", "table", "ip", "kube-proxy"])?;
            }
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = BenchArgs::parse();
    let interrupt = Interrupt::install()?;
    interrupt.explain(run_bench(&args, &interrupt))
}

/// What one scale measured of one dataplane before its figures exist.
struct Loaded<'a> {
    site: &'a Site,
    program_seconds: f64,
    runs: [Vec<Run>; 5],
}

fn run_bench(args: &BenchArgs, interrupt: &Interrupt) -> Result<()> {
    if let Some(path) = &args.render {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let results: Results = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a bench's results.json", path.display()))?;
        let out_dir = args
            .out
            .clone()
            .or_else(|| path.parent().map(PathBuf::from))
            .context("no directory to render into")?;
        return write_results(&results, &out_dir);
    }
    if args.control_plane_only {
        let scales = control_plane_scales(args);
        let rows = control_plane::measure(
            &scales,
            changes_per_scale(args),
            idle_window(args),
            interrupt,
        )?;
        let out_dir = out_dir(args);
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        std::fs::write(
            out_dir.join("control_plane.json"),
            serde_json::to_string_pretty(&rows)?,
        )?;
        return Ok(());
    }
    let scales = if !args.scales.is_empty() {
        args.scales.clone()
    } else if args.full {
        vec![100, 1_000, 10_000, 50_000]
    } else {
        vec![100, 1_000, 10_000]
    };
    // Five loads per dataplane, scale and round: quick mode fits in about
    // six minutes, full mode in about forty.
    let seconds = args.seconds.unwrap_or(if args.full { 3.0 } else { 1.0 });
    let rounds = args.rounds.unwrap_or(5).max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parallel = args.parallel.unwrap_or(2 * cores).max(1);
    let load_timeout = args
        .load_timeout_seconds
        .unwrap_or(if args.full { 180 } else { 30 });

    let mut sites = Dataplane::ALL
        .into_iter()
        .map(Site::new)
        .collect::<Result<Vec<_>>>()?;
    self_check(&mut sites[0])?;
    let mut rows = Vec::new();
    for &services in &scales {
        let mut loaded = Vec::new();
        for site in &sites {
            let pods = &site.pods;
            let set = ServiceSet::new(services, pods);
            interrupt.check()?;
            match load(site, &set, load_timeout)? {
                Some(program_seconds) => {
                    loaded.push(Loaded {
                        site,
                        program_seconds,
                        runs: Default::default(),
                    });
                }
                None => {
                    println!(
                        "bench: {services:>6} Services  {:<20} did not load within {load_timeout} s",
                        site.dataplane.label()
                    );
                    unload(site)?;
                    rows.push(Row {
                        services,
                        dataplane: Some(site.dataplane),
                        program_seconds: load_timeout as f64,
                        ..Row::default()
                    });
                }
            }
        }
        // Round by round, load by load, every dataplane in turn (starting
        // with a different one each round), so drift of the machine spreads
        // over all of them instead of favouring whichever ran first.
        for round in 0..rounds {
            for (index, load) in Load::ALL.into_iter().enumerate() {
                let variants = loaded.len();
                for turn in 0..variants {
                    interrupt.check()?;
                    let variant = &mut loaded[(turn + round) % variants];
                    let run = variant.site.measure(load, seconds, parallel)?;
                    variant.runs[index].push(run);
                }
            }
            println!(
                "bench: {services:>6} Services  round {} of {rounds} done",
                round + 1
            );
        }
        for variant in loaded {
            unload(variant.site)?;
            let [short, keepalive, bulk, np_short, np_keepalive] = variant.runs;
            let (short, keepalive, bulk, np_short, np_keepalive) = (
                figure(short),
                figure(keepalive),
                bulk_figure(bulk),
                figure(np_short),
                figure(np_keepalive),
            );
            println!(
                "bench: {services:>6} Services  {:<20} {:>7.0} conn/s  p99 {:>5} µs  {:>7.0} req/s  {:>5.1} Gbit/s  NodePort {:>7.0} conn/s  load {:.3} s",
                variant.site.dataplane.label(),
                short.median.probe.rate,
                short.median.probe.p99_us,
                keepalive.median.probe.rate,
                bulk.median.probe.rate * 8.0 / 1e9,
                np_short.median.probe.rate,
                variant.program_seconds
            );
            rows.push(Row {
                services,
                dataplane: Some(variant.site.dataplane),
                short_connections: Some(short),
                keepalive: Some(keepalive),
                bulk: Some(bulk),
                node_port_short: Some(np_short),
                node_port_keepalive: Some(np_keepalive),
                program_seconds: variant.program_seconds,
            });
        }
    }
    // Per scale, in Dataplane::ALL's order (a peer that did not load was
    // recorded before the others' rounds).
    rows.sort_by_key(|row| {
        (
            row.services,
            Dataplane::ALL.iter().position(|d| *d == row.dataplane()),
        )
    });
    drop(sites);
    interrupt.check()?;
    println!("bench: the tunnel path (nodePort on node-1, every pod on node-2)");
    let tunnel = tunnel::measure(rounds, seconds, parallel, interrupt)?;
    let control_plane_scales = control_plane_scales(args);
    println!("bench: the control plane at {control_plane_scales:?} Services");
    let control_plane = control_plane::measure(
        &control_plane_scales,
        changes_per_scale(args),
        idle_window(args),
        interrupt,
    )?;
    println!("bench: in-kernel cost per packet of the interface programs (BPF_PROG_TEST_RUN)");
    let program_costs = program_cost::measure(if args.full { 2_000_000 } else { 500_000 })?;
    let results = Results {
        commit: current_commit(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .to_owned(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_owned(),
        cores,
        seconds_per_run: seconds,
        parallel,
        rounds,
        rows,
        tunnel,
        control_plane,
        program_costs,
    };
    write_results(&results, &out_dir(args))
}

/// results.json, results.md, summary.md, the charts, and the README's
/// summary for docs/bench.
fn write_results(results: &Results, out_dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    let table = report::markdown(results);
    std::fs::write(out_dir.join("results.md"), &table)?;
    let summary = report::summary(results);
    std::fs::write(out_dir.join("summary.md"), &summary)?;
    if readme::is_committed_results_dir(out_dir) {
        readme::update_readme(&summary)?;
        println!("bench: README.md quotes the new summary");
    }
    charts::draw(results, out_dir)?;
    println!("\n{table}\nbench: wrote {}", out_dir.display());
    Ok(())
}

fn out_dir(args: &BenchArgs) -> PathBuf {
    args.out
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"))
}

fn control_plane_scales(args: &BenchArgs) -> Vec<usize> {
    if !args.control_plane_scales.is_empty() {
        args.control_plane_scales.clone()
    } else if args.full {
        vec![100, 10_000, 50_000, 100_000]
    } else {
        vec![100, 10_000]
    }
}

/// Endpoint changes timed per scale and pacing.
fn changes_per_scale(args: &BenchArgs) -> usize {
    // 200 in full mode, so the p99 is not the single slowest change.
    if args.full { 200 } else { 20 }
}

/// How long the agent's idle CPU is measured: two full resyncs (every
/// 30 s) in full mode.
fn idle_window(args: &BenchArgs) -> Duration {
    Duration::from_secs(if args.full { 60 } else { 10 })
}

/// The commit the results describe ("" outside a git checkout).
fn current_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Resident memory of a process, from /proc.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}
