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
mod peers;
mod program_cost;

use std::{fmt::Write as _, net::Ipv4Addr, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser as _;
use dataplane_testbed::{Host, Testbed, interrupt::Interrupt, manifests};
use serde::Serialize;

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
    /// Seconds per measurement.
    #[arg(long)]
    seconds: Option<f64>,
    /// Repeats per measurement (the median is reported, with the spread).
    #[arg(long)]
    repeats: Option<usize>,
    /// Longest a peer may take to load its rule set before it is reported
    /// as not loaded (kube-proxy's iptables mode takes minutes at 10,000
    /// Services).
    #[arg(long)]
    load_timeout_seconds: Option<u64>,
    /// Where results.json, results.md and the charts go (default
    /// target/bench; the committed full-mode results live in docs/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

const ENDPOINTS_PER_SERVICE: usize = 10;
const HOT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The hot Service's nodePort, dialled on the node's address on the
/// client's link (the interface the agent's TC programs serve).
const HOT_NODE_PORT: u16 = 30080;
/// The node's address on the client's link, and that link's name there.
const NODE_ADDRESS: &str = "10.200.1.1";
const CLIENT_LINK: &str = "h1";

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
            if written.elapsed() > std::time::Duration::from_secs(10) {
                bail!("an endpoint change was not programmed within 10 s");
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        latencies.push(written.elapsed().as_secs_f64() * 1e3);
    }
    // Back to every pod for the measurements that follow.
    tb.write_manifest("hot.yaml", &set.hot_manifests(&hot.endpoints)?)?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    latencies.sort_by(f64::total_cmp);
    Ok((
        latencies[latencies.len() / 2],
        latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)],
    ))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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

/// One probe run.
#[derive(Clone, Debug, Default, serde::Deserialize, Serialize)]
struct Run {
    count: u64,
    failures: u64,
    rate: f64,
    p50_us: u64,
    p99_us: u64,
    /// CPU time of the whole machine per 1,000 requests, in milliseconds.
    #[serde(default)]
    cpu_ms_per_1000: f64,
}

/// The median run (by rate) of several, with the spread of the rates.
#[derive(Clone, Debug, Serialize)]
struct Figure {
    median: Run,
    rate_min: f64,
    rate_max: f64,
    /// Failed requests over all runs.
    failures: u64,
}

#[derive(Debug, Default, Serialize)]
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
    /// client to a pod's own address).
    node_port_short: Option<Figure>,
    node_port_keepalive: Option<Figure>,
    /// Time to program all Services: the agent from start to ready, the
    /// peers their rule load (the timeout, if it did not load).
    program_seconds: f64,
    /// The agent's resident memory once all Services are programmed.
    agent_rss_mib: Option<f64>,
    /// From an endpoint change written to the map updated (ours only), ms.
    endpoint_change_p50_ms: Option<f64>,
    endpoint_change_p99_ms: Option<f64>,
}

impl Row {
    fn dataplane(&self) -> Dataplane {
        self.dataplane.unwrap_or(Dataplane::Direct)
    }
}

#[derive(Serialize)]
struct Results {
    commit: String,
    kernel: String,
    cores: usize,
    seconds_per_run: f64,
    repeats: usize,
    rows: Vec<Row>,
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

fn measure(
    tb: &Testbed,
    client: &Host,
    in_cgroup: bool,
    target: &str,
    load: &str,
    seconds: f64,
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
        ],
    )?;
    let jiffies = busy_jiffies()?.saturating_sub(before);
    let mut run: Run =
        serde_json::from_str(output.trim()).with_context(|| format!("probe said {output:?}"))?;
    // USER_HZ is 100: a jiffy is 10 ms.
    run.cpu_ms_per_1000 = if run.count == 0 {
        0.0
    } else {
        jiffies as f64 * 10.0 / run.count as f64 * 1000.0
    };
    // A few failures in tens of thousands (a SYN lost past the timeout) are
    // reported with the figure; a run where more than 1% fail is no figure.
    if run.failures * 100 > run.count.max(1) {
        bail!(
            "{} of the {} {load} requests to {target} failed",
            run.failures,
            run.count + run.failures
        );
    }
    if run.failures > 0 {
        println!(
            "bench:   note: {} of {} {load} requests to {target} failed",
            run.failures,
            run.count + run.failures
        );
    }
    Ok(run)
}

fn figure(mut runs: Vec<Run>) -> Figure {
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    Figure {
        failures: runs.iter().map(|r| r.failures).sum(),
        rate_min: runs.first().map_or(0.0, |r| r.rate),
        rate_max: runs.last().map_or(0.0, |r| r.rate),
        median: runs[runs.len() / 2].clone(),
    }
}

/// Loads a dataplane for `set`; returns how long programming took, or
/// None if a peer's rule load did not finish within `timeout`.
fn load(tb: &Testbed, dataplane: Dataplane, set: &ServiceSet, timeout: u64) -> Result<Option<f64>> {
    let started = Instant::now();
    let (tool, flag, file, rules) = match dataplane {
        Dataplane::Direct => return Ok(Some(0.0)),
        Dataplane::Ours => {
            tb.write_manifest("bench.yaml", &set.filler_manifests())?;
            let hot = set.services.last().context("no hot Service")?;
            tb.write_manifest("hot.yaml", &set.hot_manifests(&hot.endpoints)?)?;
            tb.start_agent(&[
                "--metrics-bind-address",
                "",
                "--healthz-bind-address",
                "",
                "--interfaces",
                CLIENT_LINK,
            ])?;
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

fn unload(tb: &Testbed, dataplane: Dataplane) -> Result<()> {
    match dataplane {
        Dataplane::Direct => {}
        Dataplane::Ours => {
            tb.stop_agent(libc::SIGTERM)?;
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

fn run_bench(args: &BenchArgs, interrupt: &Interrupt) -> Result<()> {
    let scales = if !args.scales.is_empty() {
        args.scales.clone()
    } else if args.full {
        vec![100, 1_000, 10_000, 50_000]
    } else {
        vec![100, 1_000, 10_000]
    };
    // Five figures per dataplane and scale, three runs each: quick mode fits
    // in five minutes, full mode in thirty.
    let seconds = args.seconds.unwrap_or(if args.full { 3.0 } else { 1.0 });
    let repeats = args.repeats.unwrap_or(3).max(1);
    let load_timeout = args
        .load_timeout_seconds
        .unwrap_or(if args.full { 180 } else { 30 });

    let mut tb = Testbed::new()?;
    let client = tb.host("client")?;
    let mut pods = Vec::new();
    for i in 1..=ENDPOINTS_PER_SERVICE {
        let pod = tb.host(&format!("pod{i}"))?;
        tb.serve(&pod, 8080)?;
        pods.push(pod);
    }
    let mut rows = Vec::new();
    for &services in &scales {
        let set = ServiceSet::new(services, &pods);
        for dataplane in Dataplane::ALL {
            let Some(program_seconds) = load(&tb, dataplane, &set, load_timeout)? else {
                println!(
                    "bench: {services:>6} Services  {:<20} did not load within {load_timeout} s",
                    dataplane.label()
                );
                unload(&tb, dataplane)?;
                rows.push(Row {
                    services,
                    dataplane: Some(dataplane),
                    program_seconds: load_timeout as f64,
                    ..Row::default()
                });
                continue;
            };
            let agent_rss_mib = tb.agent_pid().and_then(rss_mib);
            let change_latency = if dataplane == Dataplane::Ours {
                Some(endpoint_change_latency(&tb, &set, 20)?)
            } else {
                None
            };
            let (cluster_target, node_port_target) = match dataplane {
                Dataplane::Direct => (
                    format!("{}:8080", pods[0].ip),
                    format!("{}:8080", pods[0].ip),
                ),
                _ => (
                    format!("{HOT_VIP}:80"),
                    format!("{NODE_ADDRESS}:{HOT_NODE_PORT}"),
                ),
            };
            let in_cgroup = dataplane == Dataplane::Ours;
            let mut runs: [Vec<Run>; 5] = Default::default();
            for _ in 0..repeats {
                interrupt.check()?;
                let m = |target: &str, in_cgroup: bool, load: &str| {
                    measure(&tb, &client, in_cgroup, target, load, seconds)
                };
                runs[0].push(m(&cluster_target, in_cgroup, "short")?);
                runs[1].push(m(&cluster_target, in_cgroup, "keepalive")?);
                runs[2].push(m(&cluster_target, in_cgroup, "bulk")?);
                runs[3].push(m(&node_port_target, false, "short")?);
                runs[4].push(m(&node_port_target, false, "keepalive")?);
            }
            unload(&tb, dataplane)?;
            let [short, keepalive, bulk, np_short, np_keepalive] = runs.map(figure);
            println!(
                "bench: {services:>6} Services  {:<20} {:>7.0} conn/s  p99 {:>5} µs  {:>7.0} req/s  {:>5.1} Gbit/s  NodePort {:>7.0} conn/s  load {:.3} s",
                dataplane.label(),
                short.median.rate,
                short.median.p99_us,
                keepalive.median.rate,
                bulk.median.rate * 8.0 / 1e9,
                np_short.median.rate,
                program_seconds
            );
            rows.push(Row {
                services,
                dataplane: Some(dataplane),
                short_connections: Some(short),
                keepalive: Some(keepalive),
                bulk: Some(bulk),
                node_port_short: Some(np_short),
                node_port_keepalive: Some(np_keepalive),
                program_seconds,
                agent_rss_mib,
                endpoint_change_p50_ms: change_latency.map(|l| l.0),
                endpoint_change_p99_ms: change_latency.map(|l| l.1),
            });
        }
    }
    drop(tb);
    interrupt.check()?;
    println!("bench: in-kernel cost per packet of the interface programs (BPF_PROG_TEST_RUN)");
    let program_costs = program_cost::measure(if args.full { 2_000_000 } else { 500_000 })?;
    let results = Results {
        commit: current_commit(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_owned(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        seconds_per_run: seconds,
        repeats,
        rows,
        program_costs,
    };
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let table = markdown(&results);
    std::fs::write(out_dir.join("results.md"), &table)?;
    charts::draw(&results, &out_dir)?;
    println!("\n{table}\nbench: wrote {}", out_dir.display());
    Ok(())
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

/// The Markdown report: every figure, and ratios to the floor and to each
/// kube-proxy mode.
fn markdown(results: &Results) -> String {
    let mut out = format!(
        "Machine: {} cores, kernel {}; commit {}; {} s per run, median of {} runs (rate min..max in brackets).\n\n",
        results.cores, results.kernel, results.commit, results.seconds_per_run, results.repeats
    );
    out += "### ClusterIP, from a pod\n\n";
    out += "| Services | dataplane | new conn/s | p50 µs | p99 µs | CPU ms/1k | keep-alive req/s | p99 µs | bulk Gbit/s | program s | agent RSS MiB | conn/s vs floor | vs iptables | vs nftables |\n";
    out += "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for row in &results.rows {
        let (Some(s), Some(k), Some(b)) = (&row.short_connections, &row.keepalive, &row.bulk)
        else {
            let _ = writeln!(
                out,
                "| {} | {} | did not load within {:.0} s | | | | | | | {:.0}+ | | | | |",
                row.services,
                row.dataplane().label(),
                row.program_seconds,
                row.program_seconds
            );
            continue;
        };
        let ratio = |dataplane| ratio(results, row, dataplane, |r| r.short_connections.as_ref());
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} [{:.0}..{:.0}] | {} | {} | {:.1} | {:.0} | {} | {:.2} [{:.2}..{:.2}] | {:.3} | {} | {} | {} | {} |",
            row.services,
            row.dataplane().label(),
            s.median.rate,
            s.rate_min,
            s.rate_max,
            s.median.p50_us,
            s.median.p99_us,
            s.median.cpu_ms_per_1000,
            k.median.rate,
            k.median.p99_us,
            b.median.rate * 8.0 / 1e9,
            b.rate_min * 8.0 / 1e9,
            b.rate_max * 8.0 / 1e9,
            row.program_seconds,
            row.agent_rss_mib
                .map_or_else(|| "".to_owned(), |m| format!("{m:.0}")),
            ratio(Dataplane::Direct),
            ratio(Dataplane::Iptables),
            ratio(Dataplane::Nftables),
        );
    }
    let failures: Vec<String> = results
        .rows
        .iter()
        .flat_map(|row| {
            [
                ("ClusterIP short", &row.short_connections),
                ("ClusterIP keep-alive", &row.keepalive),
                ("NodePort short", &row.node_port_short),
                ("NodePort keep-alive", &row.node_port_keepalive),
            ]
            .into_iter()
            .filter_map(move |(what, figure)| {
                let figure = figure.as_ref()?;
                (figure.failures > 0).then(|| {
                    format!(
                        "{} Services, {}, {what}: {} failed",
                        row.services,
                        row.dataplane().label(),
                        figure.failures
                    )
                })
            })
        })
        .collect();
    if !failures.is_empty() {
        out += &format!("\nFailed requests (all runs): {}.\n", failures.join("; "));
    }
    out += "\n### NodePort, from a client outside the cluster (floor: the same client to a pod's address)\n\n";
    out += "| Services | dataplane | new conn/s | p50 µs | p99 µs | CPU ms/1k | keep-alive req/s | p99 µs | conn/s vs floor | vs iptables | vs nftables |\n";
    out += "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for row in &results.rows {
        let (Some(s), Some(k)) = (&row.node_port_short, &row.node_port_keepalive) else {
            let _ = writeln!(
                out,
                "| {} | {} | did not load | | | | | | | | |",
                row.services,
                row.dataplane().label()
            );
            continue;
        };
        let ratio = |dataplane| ratio(results, row, dataplane, |r| r.node_port_short.as_ref());
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} [{:.0}..{:.0}] | {} | {} | {:.1} | {:.0} | {} | {} | {} | {} |",
            row.services,
            row.dataplane().label(),
            s.median.rate,
            s.rate_min,
            s.rate_max,
            s.median.p50_us,
            s.median.p99_us,
            s.median.cpu_ms_per_1000,
            k.median.rate,
            k.median.p99_us,
            ratio(Dataplane::Direct),
            ratio(Dataplane::Iptables),
            ratio(Dataplane::Nftables),
        );
    }
    out += "\n### Control plane (ours)\n\n";
    out += "| Services | all programmed from start, s | endpoint change to map, p50 ms | p99 ms | agent RSS MiB |\n";
    out += "|---:|---:|---:|---:|---:|\n";
    for row in results
        .rows
        .iter()
        .filter(|r| r.dataplane() == Dataplane::Ours)
    {
        let ms = |v: Option<f64>| v.map_or_else(String::new, |v| format!("{v:.0}"));
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {} | {} |",
            row.services,
            row.program_seconds,
            ms(row.endpoint_change_p50_ms),
            ms(row.endpoint_change_p99_ms),
            ms(row.agent_rss_mib),
        );
    }
    out += "\n(Endpoint changes include the agent's 100 ms --min-sync-period; kube-proxy's iptables mode defaults to 1 s.)\n";
    out += "\n### In-kernel cost of the interface programs (BPF_PROG_TEST_RUN, ns per packet)\n\n";
    out += "| packet | program | timed as | ns/packet | no-op TC program ns/packet | above the floor |\n";
    out += "|---|---|---|---:|---:|---:|\n";
    for cost in &results.program_costs {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.1} | {:.1} | {:+.1} |",
            cost.packet,
            cost.program,
            cost.method,
            cost.ns_per_packet,
            cost.floor_ns_per_packet,
            cost.ns_per_packet - cost.floor_ns_per_packet
        );
    }
    out
}

/// This row's rate over `dataplane`'s at the same scale, for one figure.
fn ratio(
    results: &Results,
    row: &Row,
    dataplane: Dataplane,
    figure: impl Fn(&Row) -> Option<&Figure>,
) -> String {
    let ours = figure(row).map(|f| f.median.rate);
    let theirs = results
        .rows
        .iter()
        .find(|r| r.services == row.services && r.dataplane() == dataplane)
        .and_then(&figure)
        .map(|f| f.median.rate);
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if theirs > 0.0 => format!("{:.2}", ours / theirs),
        _ => "n/a".to_owned(),
    }
}
