//! `dataplane-agent`: run, inspect and remove the eBPF Service dataplane.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{
    ArgMatches, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum,
    parser::ValueSource,
};
use dataplane_agent::{
    config::{
        ExternalConfig, ExternalMode, NodePortAddresses, RunConfig, SourceConfig,
        parse_tunnel_mss_clamp,
    },
    dataplane::{conntrack, interfaces, maps, names, pins, state::Limits},
    dump, kube_proxy_config, run,
};

#[derive(Parser)]
#[command(
    name = "dataplane-agent",
    version,
    about = "eBPF kube-proxy replacement: the node agent"
)]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum DumpWhat {
    Services,
    Backends,
    Affinity,
    /// Flows translated on the node interfaces.
    Conntrack,
    Stats,
}

#[derive(Subcommand)]
enum Command {
    /// Program the dataplane and keep it in sync with the cluster state.
    Run(Box<RunArgs>),
    /// Print the pinned maps.
    Dump {
        what: DumpWhat,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
        bpffs_dir: PathBuf,
    },
    /// Detach every program and remove every pin.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
        bpffs_dir: PathBuf,
    },
    /// Mount bpffs at PATH unless it is already there (the DaemonSet's
    /// init step, so pins outlive the pod).
    MountBpffs {
        #[arg(long, default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
    /// Wait for SIGTERM and exit (the uninstall DaemonSet's resting state).
    Idle,
    /// Print the version.
    Version,
}

#[derive(clap::Args)]
struct RunArgs {
    /// kube-proxy's own configuration file (a KubeProxyConfiguration,
    /// kubeproxy.config.k8s.io/v1alpha1, as in the kube-proxy ConfigMap's
    /// config.conf): the settings that mean something here are taken from
    /// it, flags given on the command line (or by their environment
    /// variable) win, and settings this agent cannot honour are refused
    /// (docs/install.md, "Coming from kube-proxy").
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory of Service/EndpointSlice/Node YAML to serve, watched for
    /// changes, instead of the API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// Kubeconfig for the API server. Without it (and without --manifests)
    /// the in-cluster config is used: the service account and
    /// KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Node interfaces that external traffic (NodePort, load-balancer IPs,
    /// externalIPs) arrives on; the interface programs attach to their
    /// TC ingress and egress. `auto`: the interfaces of the default routes
    /// (none: no interface programs, with a warning). Empty: no
    /// interface programs (socket load balancing needs none).
    #[arg(
        long,
        value_delimiter = ',',
        env = "DATAPLANE_INTERFACES",
        default_value = "auto"
    )]
    interfaces: Vec<String>,
    /// How external traffic reaches a backend on another node: `tunnel`
    /// keeps the client's address (VXLAN to the backend's node, which must
    /// run this agent too), `snat` masquerades to this node's address.
    #[arg(long, value_enum, default_value = "tunnel")]
    external_mode: ExternalModeArg,
    /// This node's address for the tunnel and SNAT; default: the first
    /// IPv4 address of the first --interfaces entry.
    #[arg(long)]
    node_ip: Option<std::net::Ipv4Addr>,
    /// Which node addresses serve nodePorts (kube-proxy's flag): CIDRs,
    /// comma-separated, or `primary` (the Node object's InternalIP).
    /// Default: every address of --interfaces. Addresses that come or go
    /// at run time are followed at once.
    #[arg(long, value_delimiter = ',', value_parser = parse_nodeport_address)]
    nodeport_addresses: Vec<String>,
    /// MSS clamping of tunnelled TCP flows: their SYN and SYN-ACK announce
    /// at most this, so segments fit the tunnel even where a firewall
    /// drops ICMP "fragmentation needed". `auto`: the node interface's MTU
    /// minus the VXLAN encapsulation (50) and the IPv4 and TCP headers
    /// (40); `off`; or an MSS in bytes, for a smaller MTU further on the
    /// path.
    #[arg(long, default_value = "auto", value_parser = parse_tunnel_mss_clamp)]
    tunnel_mss_clamp: u16,
    /// UDP port of the VXLAN tunnel between nodes (must be the same on all
    /// nodes and differ from any other VXLAN device's port).
    #[arg(long, default_value_t = 4789)]
    tunnel_port: u16,
    /// VXLAN network identifier of the tunnel.
    #[arg(long, default_value_t = 0x00ce11, value_parser = clap::value_parser!(u32).range(0..1 << 24))]
    tunnel_vni: u32,
    /// Source ports for SNAT mode, `min-max`; outside the node's
    /// ip_local_port_range, so they never collide with its own sockets.
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    snat_port_range: (u16, u16),
    /// Idle time after which an established TCP flow on the node
    /// interfaces is forgotten (kube-proxy's conntrack default).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_established: Duration,
    /// Idle time after a FIN or RST.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    conntrack_tcp_timeout_closing: Duration,
    /// Idle time of a UDP flow.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    conntrack_udp_timeout: Duration,
    /// Size of the conntrack map (flows x 2), applied when the maps are
    /// created (after `cleanup`); a full map evicts the least recently used
    /// flows.
    #[arg(long, default_value_t = dataplane_common::CONNTRACK_MAX_ENTRIES)]
    conntrack_max_entries: u32,
    /// How often idle flows are swept from the conntrack map.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    conntrack_sweep_period: Duration,
    /// Address the healthCheckNodePorts of externalTrafficPolicy Local
    /// load balancers are served on.
    #[arg(long, default_value = "0.0.0.0")]
    health_check_bind_ip: std::net::IpAddr,
    /// cgroup v2 directory whose processes get socket load balancing;
    /// default: the first cgroup v2 mount (mounted if there is none). In a
    /// container, always pass the host's cgroup root mounted in: the
    /// container's own cgroup2 mount covers only the container.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for the pinned maps and program links.
    #[arg(long, default_value = "/sys/fs/bpf/dataplane")]
    bpffs_dir: PathBuf,
    /// This node's name, as in its Node object.
    #[arg(long, env = "NODE_NAME")]
    hostname_override: Option<String>,
    /// Minimum time between two syncs; bursts of changes coalesce.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    min_sync_period: Duration,
    /// Most backends one Service port may have; a frontend over it is not
    /// programmed (error log, metric) and keeps its previous state.
    #[arg(long, default_value_t = Limits::default().max_backends_per_service)]
    max_backends_per_service: usize,
    /// Most Service frontends (ip, port, protocol) on this node.
    #[arg(long, default_value_t = Limits::default().max_services)]
    max_services: u32,
    /// Most backends over all frontends on this node.
    #[arg(long, default_value_t = Limits::default().max_backends)]
    max_backends: usize,
    /// Prometheus metrics address (kube-proxy's default); "" disables.
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_bind_address: String,
    /// /healthz and /livez address (kube-proxy's default); "" disables.
    #[arg(long, default_value = "0.0.0.0:10256")]
    healthz_bind_address: String,
    /// At start, remove a parked kube-proxy's iptables chains (KUBE-*, nft
    /// and legacy backends) and nftables tables (kube-proxy); needs
    /// iptables/nft on PATH, and CAP_NET_RAW for the legacy backend.
    #[arg(long)]
    cleanup_kube_proxy_rules: bool,
    /// Resync period: compare the pinned SERVICES map with what this agent
    /// wrote (a full resync if they differ), even without a change.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    sync_period: Duration,
    /// Full resync period: re-read every pinned map, recompute every
    /// Service and converge (costs seconds of CPU at 100,000 Services).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    full_resync_period: Duration,
}

fn bind_address(flag: &str, value: &str) -> Result<Option<std::net::SocketAddr>> {
    if value.is_empty() {
        return Ok(None);
    }
    value
        .parse()
        .map(Some)
        .with_context(|| format!("{flag} {value:?} is not ip:port"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn node_name(flag: Option<String>) -> Result<String> {
    if let Some(name) = flag.filter(|n| !n.is_empty()) {
        return Ok(name.to_lowercase());
    }
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the hostname; pass --hostname-override or set NODE_NAME")?;
    Ok(hostname.trim().to_lowercase())
}

fn parse_port_range(value: &str) -> Result<(u16, u16), String> {
    let (min, max) = value
        .split_once('-')
        .ok_or_else(|| format!("{value:?} is not min-max"))?;
    let parse = |p: &str| p.trim().parse::<u16>().map_err(|e| format!("{p:?}: {e}"));
    let (min, max) = (parse(min)?, parse(max)?);
    if min == 0 || min > max {
        return Err(format!("{value:?} is not a range of ports"));
    }
    Ok((min, max))
}

/// One `--nodeport-addresses` entry, checked alone (the list is checked
/// whole when the flags are resolved).
fn parse_nodeport_address(value: &str) -> Result<String, String> {
    NodePortAddresses::parse(&[value.to_owned()]).map(|_| value.to_owned())
}

/// `--external-mode`, as the command line spells it.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum ExternalModeArg {
    /// VXLAN to the backend's node; the backend sees the client's address.
    Tunnel,
    /// Masquerade to this node's address (kube-proxy's behaviour).
    Snat,
}

impl From<ExternalModeArg> for ExternalMode {
    fn from(mode: ExternalModeArg) -> Self {
        match mode {
            ExternalModeArg::Tunnel => Self::Tunnel,
            ExternalModeArg::Snat => Self::Snat,
        }
    }
}

async fn run_agent(args: RunArgs) -> Result<()> {
    let source = match args.manifests {
        Some(dir) => SourceConfig::Manifests(dir),
        None => SourceConfig::Kube {
            kubeconfig: args.kubeconfig,
        },
    };
    let nodeport_addresses =
        NodePortAddresses::parse(&args.nodeport_addresses).map_err(|error| {
            anyhow::anyhow!(
                "--nodeport-addresses (or the --config file's nodePortAddresses): {error}"
            )
        })?;
    let interfaces = interfaces::resolve(&args.interfaces)?;
    interfaces::check_exist(&interfaces)?;
    if args.sync_period.is_zero() {
        bail!("--sync-period must be longer than zero");
    }
    let cgroup = match args.cgroup {
        Some(cgroup) => cgroup,
        None => pins::default_cgroup2_root()?,
    };
    let config = RunConfig {
        source,
        cgroup,
        bpffs_dir: args.bpffs_dir,
        node_name: node_name(args.hostname_override)?,
        min_sync_period: args.min_sync_period,
        sync_period: args.sync_period,
        full_resync_period: args.full_resync_period,
        retired_slot_grace: Duration::from_secs(1),
        limits: Limits {
            max_backends_per_service: args.max_backends_per_service,
            max_services: args
                .max_services
                .min(dataplane_common::SERVICES_MAX_ENTRIES),
            max_backends: args
                .max_backends
                .min(dataplane_common::BACKENDS_MAX_ENTRIES as usize / 2),
        },
        metrics_bind_address: bind_address("--metrics-bind-address", &args.metrics_bind_address)?,
        healthz_bind_address: bind_address("--healthz-bind-address", &args.healthz_bind_address)?,
        cleanup_kube_proxy_rules: args.cleanup_kube_proxy_rules,
        external: (!interfaces.is_empty()).then_some(ExternalConfig {
            interfaces,
            mode: args.external_mode.into(),
            node_ip: args.node_ip,
            tunnel_port: args.tunnel_port,
            vni: args.tunnel_vni,
            snat_ports: args.snat_port_range,
            conntrack: conntrack::Timeouts {
                tcp_established: args.conntrack_tcp_timeout_established,
                tcp_closing: args.conntrack_tcp_timeout_closing,
                udp: args.conntrack_udp_timeout,
            },
            conntrack_sweep_period: args.conntrack_sweep_period,
            conntrack_max_entries: args.conntrack_max_entries,
            nodeport_addresses,
            tunnel_mss_clamp: args.tunnel_mss_clamp,
        }),
        health_check_bind_ip: args.health_check_bind_ip,
    };
    run::run(config).await
}

fn print_dump(what: DumpWhat, output: Output, bpffs_dir: PathBuf) -> Result<()> {
    let layout = pins::PinLayout::new(bpffs_dir);
    match what {
        DumpWhat::Stats => {
            let stats = maps::read_stats(&layout)?;
            match output {
                Output::Json => {
                    let map: serde_json::Map<String, serde_json::Value> = stats
                        .iter()
                        .map(|(s, v)| (s.name().to_owned(), (*v).into()))
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&map)?);
                }
                Output::Table => {
                    for (stat, value) in stats {
                        println!("{:<28} {value}", stat.name());
                    }
                }
            }
        }
        DumpWhat::Conntrack => {
            let rows = dump::conntrack_rows(&layout)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print!("{}", dump::conntrack_table(&rows)),
            }
        }
        DumpWhat::Affinity => {
            let rows = dump::affinity_rows(&layout)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print!("{}", dump::affinity_table(&rows)),
            }
        }
        DumpWhat::Services => {
            let rows = dump::service_rows(
                &maps::read_pinned_state(&layout)?,
                &names::read_names(&layout.base),
            );
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print!("{}", dump::services_table(&rows)),
            }
        }
        DumpWhat::Backends => {
            let rows = dump::backend_rows(&maps::read_pinned_state(&layout)?);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                Output::Table => print!("{}", dump::backends_table(&rows)),
            }
        }
    }
    Ok(())
}

/// Whether the user set `id` (a flag, or its environment variable): then it
/// wins over --config, as kube-proxy's flags win over its file.
fn given_explicitly(matches: &ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Puts the file's `value` in `slot` unless the user set `id` explicitly.
fn from_file<T>(matches: &ArgMatches, id: &str, slot: &mut T, value: Option<T>) {
    if let Some(value) = value
        && !given_explicitly(matches, id)
    {
        *slot = value;
    }
}

/// Applies `run --config FILE` to the parsed command line: the file's
/// settings replace the flags the user left at their defaults. Returns the
/// file and its warnings, for the log (which starts only after this, since
/// the file may set its format).
fn apply_kube_proxy_config(
    cli: &mut Cli,
    matches: &ArgMatches,
) -> Result<Option<(PathBuf, Vec<String>)>> {
    let Command::Run(args) = &mut cli.command else {
        return Ok(None);
    };
    let Some(path) = args.config.clone() else {
        return Ok(None);
    };
    let run = matches
        .subcommand_matches("run")
        .context("the run subcommand's arguments")?;
    let file = kube_proxy_config::load(&path)?;
    from_file(
        matches,
        "log_format",
        &mut cli.log_format,
        file.log_format.map(|format| match format {
            kube_proxy_config::LogFormat::Text => LogFormat::Text,
            kube_proxy_config::LogFormat::Json => LogFormat::Json,
        }),
    );
    from_file(
        run,
        "hostname_override",
        &mut args.hostname_override,
        file.hostname_override.map(Some),
    );
    from_file(
        run,
        "kubeconfig",
        &mut args.kubeconfig,
        file.kubeconfig.map(Some),
    );
    from_file(
        run,
        "healthz_bind_address",
        &mut args.healthz_bind_address,
        file.healthz_bind_address.map(|a| a.to_string()),
    );
    from_file(
        run,
        "metrics_bind_address",
        &mut args.metrics_bind_address,
        file.metrics_bind_address.map(|a| a.to_string()),
    );
    from_file(
        run,
        "nodeport_addresses",
        &mut args.nodeport_addresses,
        (!file.node_port_addresses.is_empty()).then_some(file.node_port_addresses),
    );
    from_file(run, "sync_period", &mut args.sync_period, file.sync_period);
    from_file(
        run,
        "min_sync_period",
        &mut args.min_sync_period,
        file.min_sync_period,
    );
    from_file(
        run,
        "conntrack_max_entries",
        &mut args.conntrack_max_entries,
        file.conntrack_max_entries,
    );
    from_file(
        run,
        "conntrack_tcp_timeout_established",
        &mut args.conntrack_tcp_timeout_established,
        file.conntrack_tcp_timeout_established,
    );
    from_file(
        run,
        "conntrack_udp_timeout",
        &mut args.conntrack_udp_timeout,
        file.conntrack_udp_timeout,
    );
    Ok(Some((path, file.warnings)))
}

fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    let kube_proxy_config = apply_kube_proxy_config(&mut cli, &matches)?;
    init_logging(cli.log_format);
    if let Some((path, warnings)) = kube_proxy_config {
        tracing::info!(config = %path.display(), "settings read from kube-proxy's configuration; flags given explicitly win");
        for warning in warnings {
            tracing::warn!(config = %path.display(), "{warning}");
        }
    }
    match cli.command {
        // At least two workers: a sync holds one for its map writes, and the
        // health server and watches must keep answering meanwhile, also on a
        // one-CPU node.
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get().max(2)))
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(run_agent(*args)),
        Command::Dump {
            what,
            output,
            bpffs_dir,
        } => print_dump(what, output, bpffs_dir),
        Command::Cleanup { bpffs_dir } => {
            let report = pins::cleanup(&pins::PinLayout::new(&bpffs_dir))?;
            println!(
                "detached {} program link(s), removed {} map pin(s) and {}",
                report.links.len(),
                report.maps.len(),
                bpffs_dir.display()
            );
            Ok(())
        }
        Command::MountBpffs { path } => {
            let mounted = pins::ensure_bpffs_mount(&path)?;
            let what = if mounted {
                "mounted"
            } else {
                "already mounted"
            };
            println!("bpffs {what} at {}", path.display());
            Ok(())
        }
        Command::Idle => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the tokio runtime")?
            .block_on(async {
                let mut terminate =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .context("installing the SIGTERM handler")?;
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                Ok(())
            }),
        Command::Version => {
            println!("dataplane-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A KubeProxyConfiguration setting every field `run` takes from it.
    const FILE: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: from-file
clientConnection:
  kubeconfig: /from/file/kubeconfig
healthzBindAddress: 127.0.0.2:10256
metricsBindAddress: 127.0.0.2:10249
logging:
  format: json
mode: nftables
nftables:
  syncPeriod: 1m0s
  minSyncPeriod: 2s
conntrack:
  maxPerCore: 0
  tcpEstablishedTimeout: 2h0m0s
  udpStreamTimeout: 3m0s
"#;

    /// `dataplane-agent <args>` with --config pointing at `file`.
    fn cli_with(file: &str, args: &[&str]) -> Result<Cli> {
        let path = std::env::temp_dir().join(format!(
            "dataplane-agent-main-test-{}-{}.conf",
            std::process::id(),
            next_file_number()
        ));
        std::fs::write(&path, file)?;
        let mut argv = vec!["dataplane-agent", "run", "--config", path.to_str().unwrap()];
        argv.extend_from_slice(args);
        let matches = Cli::command().try_get_matches_from(argv)?;
        let mut cli = Cli::from_arg_matches(&matches)?;
        let applied = apply_kube_proxy_config(&mut cli, &matches);
        std::fs::remove_file(&path)?;
        applied?;
        Ok(cli)
    }

    /// Tests run in parallel threads of one process: one file each.
    fn next_file_number() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    fn run_args(cli: &Cli) -> &RunArgs {
        match &cli.command {
            Command::Run(args) => args,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn the_files_settings_replace_the_defaults() {
        let cli = cli_with(FILE, &[]).unwrap();
        assert!(matches!(cli.log_format, LogFormat::Json));
        let args = run_args(&cli);
        assert_eq!(args.hostname_override.as_deref(), Some("from-file"));
        assert_eq!(
            args.kubeconfig.as_deref(),
            Some(Path::new("/from/file/kubeconfig"))
        );
        assert_eq!(args.healthz_bind_address, "127.0.0.2:10256");
        assert_eq!(args.metrics_bind_address, "127.0.0.2:10249");
        assert_eq!(args.sync_period, Duration::from_secs(60));
        assert_eq!(args.min_sync_period, Duration::from_secs(2));
        // maxPerCore 0: kube-proxy leaves the limit alone, so do we.
        assert_eq!(
            args.conntrack_max_entries,
            dataplane_common::CONNTRACK_MAX_ENTRIES
        );
        assert_eq!(
            args.conntrack_tcp_timeout_established,
            Duration::from_secs(7200)
        );
        assert_eq!(args.conntrack_udp_timeout, Duration::from_secs(180));
        // Not in the file: the flag's default.
        assert_eq!(args.conntrack_tcp_timeout_closing, Duration::from_secs(10));
    }

    #[test]
    fn flags_given_explicitly_win_over_the_file() {
        // Each flag given explicitly, even with its default value.
        let cli = cli_with(
            &FILE.replace("maxPerCore: 0", "maxPerCore: 1"),
            &[
                "--log-format=text",
                "--hostname-override=from-flag",
                "--kubeconfig=/from/flag",
                "--healthz-bind-address=0.0.0.0:10256",
                "--metrics-bind-address=",
                "--sync-period=30s",
                "--min-sync-period=100ms",
                "--conntrack-max-entries=1000",
                "--conntrack-tcp-timeout-established=24h",
                "--conntrack-udp-timeout=60s",
            ],
        )
        .unwrap();
        assert!(matches!(cli.log_format, LogFormat::Text));
        let args = run_args(&cli);
        assert_eq!(args.hostname_override.as_deref(), Some("from-flag"));
        assert_eq!(args.kubeconfig.as_deref(), Some(Path::new("/from/flag")));
        assert_eq!(args.healthz_bind_address, "0.0.0.0:10256");
        assert_eq!(args.metrics_bind_address, "");
        assert_eq!(args.sync_period, Duration::from_secs(30));
        assert_eq!(args.min_sync_period, Duration::from_millis(100));
        assert_eq!(args.conntrack_max_entries, 1000);
        assert_eq!(
            args.conntrack_tcp_timeout_established,
            Duration::from_secs(86_400)
        );
        assert_eq!(args.conntrack_udp_timeout, Duration::from_secs(60));
    }

    #[test]
    fn a_global_flag_after_the_subcommand_still_wins() {
        let matches = Cli::command()
            .try_get_matches_from(["dataplane-agent", "run", "--log-format", "text"])
            .unwrap();
        assert!(given_explicitly(&matches, "log_format"));
        let matches = Cli::command()
            .try_get_matches_from(["dataplane-agent", "run"])
            .unwrap();
        assert!(!given_explicitly(&matches, "log_format"));
    }

    #[test]
    fn node_port_addresses_come_from_the_file_unless_the_flag_is_given() {
        let file = format!("{FILE}nodePortAddresses: [primary]\n");
        let cli = cli_with(&file, &[]).unwrap();
        assert_eq!(run_args(&cli).nodeport_addresses, ["primary"]);
        let cli = cli_with(&file, &["--nodeport-addresses=192.0.2.0/24"]).unwrap();
        assert_eq!(run_args(&cli).nodeport_addresses, ["192.0.2.0/24"]);
    }

    #[test]
    fn without_config_nothing_changes() {
        let matches = Cli::command()
            .try_get_matches_from(["dataplane-agent", "run"])
            .unwrap();
        let mut cli = Cli::from_arg_matches(&matches).unwrap();
        assert!(
            apply_kube_proxy_config(&mut cli, &matches)
                .unwrap()
                .is_none()
        );
        assert_eq!(run_args(&cli).metrics_bind_address, "127.0.0.1:10249");
    }
}
