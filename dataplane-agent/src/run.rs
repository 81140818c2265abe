//! The agent's main loop: source -> model -> dataplane, coalesced.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use dataplane_common::{
    BACKENDS_MAX_ENTRIES, BackendKey, CONNTRACK_MAX_ENTRIES, ConfigValue, EXTERNAL_MODE_SNAT,
    EXTERNAL_MODE_TUNNEL, SERVICES_MAX_ENTRIES, Stat, map_names,
};
use tokio::{sync::mpsc, time::Instant};
use tracing::{error, info, info_span, warn};

use crate::{
    dataplane::{
        conntrack, interfaces,
        loader::LoadedObject,
        maps::{self, InterfaceMaps, KernelMaps},
        names,
        pins::{self, PinLayout},
        ports::{self, PortFilter},
        state::{ApplyReport, Limits, PinnedState, ipv4_be},
    },
    health::{self, Health},
    metrics::{self, FrontendErrorLabels, MapLabels, Metrics, ReasonLabels},
    model::{self, ClusterState, NodeInfo, ObjectName},
    service_health::{ServiceHealthServers, ServiceHealthTarget},
    source::{
        Changes,
        kube::{self, KubeSource},
        manifests::{self, ManifestDir},
    },
};

/// Where cluster state comes from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of YAML, watched.
    Manifests(PathBuf),
    /// The API server: `--kubeconfig`, or in-cluster config.
    Kube { kubeconfig: Option<PathBuf> },
}

/// Everything `dataplane-agent run` needs, resolved from flags.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    pub node_name: String,
    pub min_sync_period: Duration,
    /// Full resync: re-read the pinned maps and converge, even without a
    /// change (kube-proxy's --sync-period).
    pub sync_period: Duration,
    /// How long a retired backend slot stays readable after the flip that
    /// retired it, for connect() calls that read the old Service entry.
    pub retired_slot_grace: Duration,
    pub limits: Limits,
    /// Where to serve Prometheus metrics; None disables the server.
    pub metrics_bind_address: Option<SocketAddr>,
    /// Where to serve /healthz; None disables the server.
    pub healthz_bind_address: Option<SocketAddr>,
    /// Remove a parked kube-proxy's iptables chains and nftables tables at
    /// start.
    pub cleanup_kube_proxy_rules: bool,
    /// The north-south datapath; None when no interface is configured.
    pub external: Option<ExternalConfig>,
    /// Where healthCheckNodePorts are served (kube-proxy: every address).
    pub health_check_bind_ip: IpAddr,
}

/// How external traffic reaches a backend on another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalMode {
    /// VXLAN to the backend's node; the backend sees the client's address.
    Tunnel,
    /// Masquerade to this node's address (kube-proxy's behaviour).
    Snat,
}

/// The node-interface (north-south) datapath's settings.
#[derive(Clone, Debug)]
pub struct ExternalConfig {
    pub interfaces: Vec<String>,
    pub mode: ExternalMode,
    /// The tunnel's and SNAT's source address; default: the first IPv4
    /// address of the first interface.
    pub node_ip: Option<Ipv4Addr>,
    pub tunnel_port: u16,
    pub vni: u32,
    pub snat_ports: (u16, u16),
    pub conntrack: conntrack::Timeouts,
    pub conntrack_sweep_period: Duration,
    pub conntrack_max_entries: u32,
}

/// A started source.
enum Source {
    Manifests {
        dir: ManifestDir,
        _watcher: notify::RecommendedWatcher,
    },
    Kube(KubeSource),
}

impl Source {
    async fn start(config: &RunConfig, changes: Changes) -> Result<Self> {
        Ok(match &config.source {
            SourceConfig::Manifests(dir) => Self::Manifests {
                _watcher: manifests::watch_dir(dir, changes)?,
                dir: ManifestDir::new(dir),
            },
            SourceConfig::Kube { kubeconfig } => {
                let client = kube::client(kubeconfig.as_deref()).await?;
                Self::Kube(KubeSource::start(client, &config.node_name, changes).await?)
            }
        })
    }

    fn load(&mut self) -> Result<manifests::Loaded> {
        match self {
            Self::Manifests { dir, .. } => dir.load(),
            Self::Kube(kube) => Ok(manifests::Loaded {
                cluster: kube.snapshot(),
                ..manifests::Loaded::default()
            }),
        }
    }
}

/// The dataplane as the agent holds it while running.
struct Agent {
    config: RunConfig,
    source: Source,
    maps: KernelMaps,
    mirror: PinnedState,
    /// Unreachable backend slots and when they became unreachable.
    retired: BTreeMap<BackendKey, Instant>,
    metrics: Metrics,
    health: Health,
    /// EndpointSlice change-trigger times already measured.
    seen_triggers: BTreeMap<ObjectName, String>,
    /// Changes older than this agent are not its programming latency.
    started_at: SystemTime,
    health_check_servers: ServiceHealthServers,
    interface_maps: Option<InterfaceMaps>,
    /// The backends each frontend id uses after the last sync, for the
    /// conntrack sweep's stale-UDP check; None until the first sync.
    live_backends: LiveBackends,
    /// PORTS, when the interface programs run.
    port_filter: Option<SharedPortFilter>,
    /// The address tunnel packets leave from, when the programs run.
    tunnel_source: Option<Ipv4Addr>,
    warned_tunnel_source: Option<Ipv4Addr>,
}

type SharedPortFilter = Arc<std::sync::Mutex<PortFilter>>;

type LiveBackends = Arc<std::sync::Mutex<Option<BTreeSet<conntrack::LiveBackend>>>>;

/// The annotation the EndpointSlice controller sets to when the change that
/// produced a slice happened; kube-proxy measures programming latency from it.
const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

impl Agent {
    fn sync(&mut self) -> Result<()> {
        let span = info_span!("sync");
        let _entered = span.enter();
        let started = std::time::Instant::now();
        let loaded = self.source.load()?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        for problem in &loaded.problems {
            warn!(%problem, "skipping manifest");
        }
        let node = NodeInfo::from_cluster(&loaded.cluster, &self.config.node_name);
        self.health.set_node_eligible(!node.being_deleted);
        self.check_tunnel_source(&node);
        let desired = model::desired(&loaded.cluster, &node);
        for skipped in &desired.skipped {
            warn!(kind = skipped.kind, object = %skipped.object, reason = %skipped.reason, "skipping invalid object");
        }

        let apply_started = std::time::Instant::now();
        // While the maps change, which backends are live is unknown to the
        // conntrack sweep: it cuts no UDP flow until the sync publishes.
        *lock(&self.live_backends) = None;
        if let Some(filter) = &self.port_filter {
            // Ports first, so the first packet of a new frontend is looked at.
            let wanted = ports::of_desired(&desired);
            if let Err(error) = lock(filter).want(wanted) {
                error!(
                    error = format!("{error:#}"),
                    "PORTS not updated: new frontends may not see external traffic yet"
                );
            }
        }
        let report = self
            .mirror
            .apply(&desired, &mut self.maps, &self.config.limits);
        let apply_ms = apply_started.elapsed().as_secs_f64() * 1e3;
        for (frontend, error) in &report.failed {
            let service = desired
                .frontends
                .get(frontend)
                .map(|e| e.service.to_string());
            error!(%frontend, service = service.as_deref().unwrap_or("-"), %error, "frontend not programmed; it keeps its previous state");
        }
        self.retire_unreachable();
        self.publish_live_backends();
        if let Some(maps) = &mut self.interface_maps
            && let Err(error) = maps.set_tunnel_peers(&desired.node_addresses)
        {
            error!(error = format!("{error:#}"), "tunnel peers not updated");
        }
        self.serve_health_checks(&desired);
        self.health.updated(SystemTime::now());
        self.record_metrics(&desired, &report, loaded.problems.len(), started.elapsed());
        self.observe_programming_latency(&loaded.cluster);
        if let Err(error) = names::write_names(&self.config.bpffs_dir, &desired) {
            warn!(
                error = format!("{error:#}"),
                "could not record Service names for dump"
            );
        }
        info!(
            services = model::services_of(&desired).len(),
            frontends = desired.frontends.len(),
            updated = report.updated,
            removed = report.removed,
            failed = report.failed.len(),
            invalid_objects = loaded.problems.len() + desired.skipped.len(),
            load_ms,
            apply_ms,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
        Ok(())
    }

    /// Other nodes accept tunnel packets from this node's InternalIP only:
    /// a different tunnel source (the first address of the first interface
    /// by default) would make every tunnelled flow vanish on the way.
    fn check_tunnel_source(&mut self, node: &NodeInfo) {
        let (Some(source), Some(internal)) = (self.tunnel_source, node.internal_ip) else {
            return;
        };
        if source != internal && self.warned_tunnel_source != Some(internal) {
            warn!(
                tunnel_source = %source,
                internal_ip = %internal,
                "the tunnel's source address is not this node's InternalIP, which other nodes expect: pass --node-ip={internal} and make sure its interface is in --interfaces"
            );
            self.warned_tunnel_source = Some(internal);
        }
    }

    fn publish_live_backends(&self) {
        let live = self
            .mirror
            .services
            .values()
            .flat_map(|value| {
                self.mirror
                    .current_backends(value)
                    .into_iter()
                    .map(move |b| (value.service_id, b.ip_be, b.port_be))
            })
            .collect();
        *lock(&self.live_backends) = Some(live);
    }

    /// kube-proxy's per-Service health checks for externalTrafficPolicy
    /// Local load balancers.
    fn serve_health_checks(&mut self, desired: &model::DesiredDataplane) {
        let wanted: BTreeMap<u16, ServiceHealthTarget> = desired
            .health_checks
            .iter()
            .map(|(port, check)| {
                (
                    *port,
                    ServiceHealthTarget {
                        namespace: check.service.namespace.clone(),
                        name: check.service.name.clone(),
                        local_endpoints: check.local_endpoints,
                    },
                )
            })
            .collect();
        for (port, error) in self.health_check_servers.reconcile(&wanted) {
            error!(port, %error, "healthCheckNodePort not served; retried at the next sync");
        }
    }

    /// A full resync: what the kernel maps hold (in case anything but this
    /// agent touched them) becomes the starting point again, then converge.
    fn resync(&mut self) -> Result<()> {
        self.mirror = self
            .maps
            .read()
            .context("re-reading the pinned maps for a full resync")?;
        if let (Some(maps), Some(external)) = (&mut self.interface_maps, &self.config.external) {
            // Node addresses can change (DHCP, a new LB address on the node).
            let addresses = interfaces::ipv4_addresses(&external.interfaces)?;
            maps.set_node_ips(&addresses)?;
        }
        self.sync()
    }

    fn record_metrics(
        &self,
        desired: &model::DesiredDataplane,
        report: &ApplyReport,
        parse_problems: usize,
        elapsed: Duration,
    ) {
        let m = &self.metrics;
        m.sync_duration_seconds.observe(elapsed.as_secs_f64());
        m.last_sync_timestamp_seconds
            .set(metrics::unix_now_seconds());
        m.frontends_programmed
            .set(gauge(self.mirror.services.len()));
        m.backends_programmed
            .set(gauge(self.mirror.live_backend_count()));
        m.invalid_objects
            .set(gauge(parse_problems + desired.skipped.len()));
        m.frontend_errors.clear();
        for (frontend, error) in &report.failed {
            let service = desired
                .frontends
                .get(frontend)
                .map(|e| e.service.to_string());
            m.frontend_errors
                .get_or_create(&FrontendErrorLabels {
                    service: service.unwrap_or_default(),
                    frontend: frontend.to_string(),
                    reason: error.reason().into(),
                })
                .set(1);
            m.frontend_errors_total
                .get_or_create(&ReasonLabels {
                    reason: error.reason().into(),
                })
                .inc();
        }
        let maps = [
            (
                map_names::SERVICES,
                self.mirror.services.len(),
                SERVICES_MAX_ENTRIES,
            ),
            (
                map_names::BACKENDS,
                self.mirror.backends.len(),
                BACKENDS_MAX_ENTRIES,
            ),
            (
                map_names::MEMBERS,
                self.mirror.members.len(),
                BACKENDS_MAX_ENTRIES,
            ),
        ];
        for (name, entries, capacity) in maps {
            let labels = MapLabels { map: name.into() };
            m.map_entries.get_or_create(&labels).set(gauge(entries));
            m.map_capacity
                .get_or_create(&labels)
                .set(i64::from(capacity));
        }
    }

    /// kube-proxy's network programming latency: from each EndpointSlice's
    /// last-change-trigger-time to now, once per new trigger time.
    fn observe_programming_latency(&mut self, cluster: &ClusterState) {
        let now = SystemTime::now();
        let mut seen = BTreeMap::new();
        for (name, slice) in &cluster.endpoint_slices {
            let Some(trigger) = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
            else {
                continue;
            };
            if self.seen_triggers.get(name) != Some(trigger)
                && let Ok(at) = humantime::parse_rfc3339_weak(trigger)
                && at >= self.started_at
                && let Ok(latency) = now.duration_since(at)
            {
                self.metrics
                    .network_programming_duration_seconds
                    .observe(latency.as_secs_f64());
            }
            seen.insert(name.clone(), trigger.clone());
        }
        self.seen_triggers = seen;
    }

    /// Starts the grace period of slots that just became unreachable.
    fn retire_unreachable(&mut self) {
        let now = Instant::now();
        let unreachable = self.mirror.unreachable_backends();
        self.retired.retain(|key, _| unreachable.contains(key));
        for key in unreachable {
            self.retired.entry(key).or_insert(now);
        }
    }

    /// When the next retired slot's grace period ends.
    fn next_slot_release(&self) -> Option<Instant> {
        self.retired
            .values()
            .min()
            .map(|retired_at| *retired_at + self.config.retired_slot_grace)
    }

    /// Deletes the slots whose grace period has passed.
    fn free_retired_slots(&mut self) {
        let now = Instant::now();
        let due: BTreeSet<BackendKey> = self
            .retired
            .iter()
            .filter(|(_, retired_at)| **retired_at + self.config.retired_slot_grace <= now)
            .map(|(key, _)| *key)
            .collect();
        let (deleted, error) = self.mirror.free_retired(&due, &mut self.maps);
        if let Some(error) = error {
            warn!(%error, deleted, "could not delete every retired backend slot; retrying after another grace period");
        }
        let unreachable = self.mirror.unreachable_backends();
        self.retired.retain(|key, _| unreachable.contains(key));
        // What failed to delete waits a whole grace period again rather than
        // being retried in a tight loop.
        for key in due.intersection(&unreachable) {
            self.retired.insert(*key, now);
        }
    }
}

/// Starts the metrics and health servers that are configured. A port that
/// is taken (kube-proxy still holds 10249 and 10256 until it is parked) is
/// retried every few seconds instead of failing the start: the dataplane
/// matters more than its telemetry.
fn start_servers(
    config: &RunConfig,
    registry: prometheus_client::registry::Registry,
    health: &Health,
) {
    if let Some(address) = config.metrics_bind_address {
        tokio::spawn(async move {
            let listener = bind_retrying(address, "metrics").await;
            if let Err(error) = metrics::serve(listener, registry).await {
                error!(error = format!("{error:#}"), "the metrics server stopped");
            }
        });
    }
    if let Some(address) = config.healthz_bind_address {
        let health = health.clone();
        tokio::spawn(async move {
            let listener = bind_retrying(address, "health").await;
            if let Err(error) = health::serve(listener, health).await {
                error!(error = format!("{error:#}"), "the health server stopped");
            }
        });
    }
}

async fn bind_retrying(address: SocketAddr, what: &str) -> tokio::net::TcpListener {
    const RETRY: Duration = Duration::from_secs(5);
    loop {
        match tokio::net::TcpListener::bind(address).await {
            Ok(listener) => return listener,
            Err(error) => {
                warn!(%address, %error, server = what, "cannot bind yet (kube-proxy still running?); retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

pub async fn run(config: RunConfig) -> Result<()> {
    crate::dataplane::capabilities::check(config.external.is_some())?;
    let layout = PinLayout::new(&config.bpffs_dir);
    pins::ensure_bpffs_dir(&layout.dir)?;
    pins::ensure_cgroup2(&config.cgroup)?;

    let conntrack_entries = config
        .external
        .as_ref()
        .map_or(CONNTRACK_MAX_ENTRIES, |e| e.conntrack_max_entries);
    let mut loaded = LoadedObject::load_with(layout, conntrack_entries)?;
    loaded.forward_program_logs();
    let maps = loaded.take_maps()?;
    let (interface_maps, port_filter, tunnel_source) = match &config.external {
        Some(external) => {
            let mut interface_maps = loaded.take_interface_maps()?;
            let tunnel_source = configure_interfaces(&mut interface_maps, external)?;
            let filter = PortFilter::open(&loaded.layout)?;
            (
                Some(interface_maps),
                Some(Arc::new(std::sync::Mutex::new(filter))),
                Some(tunnel_source),
            )
        }
        None => (None, None, None),
    };
    let mirror = maps
        .read()
        .context("reading the pinned maps left by a previous agent")?;
    info!(
        services = mirror.services.len(),
        backends = mirror.backends.len(),
        bpffs_dir = %config.bpffs_dir.display(),
        "adopted pinned maps"
    );
    let (metrics, registry) = Metrics::new(PinLayout::new(&config.bpffs_dir));
    let health = Health::new(2 * config.sync_period);
    start_servers(&config, registry, &health);

    // Until the source has its first complete view, the programs a
    // previous agent left keep serving the pinned state untouched.
    let (changes_sender, mut changes) = mpsc::unbounded_channel();
    let queued = health.clone();
    let notifier = Changes::new(changes_sender, move || queued.queued(SystemTime::now()));
    let source = Source::start(&config, notifier).await?;
    let config_health_ip = config.health_check_bind_ip;
    let health_for_checks = health.clone();
    let mut agent = Agent {
        source,
        config,
        maps,
        mirror,
        retired: BTreeMap::new(),
        metrics,
        health,
        seen_triggers: BTreeMap::new(),
        started_at: SystemTime::now(),
        health_check_servers: ServiceHealthServers::new(config_health_ip, {
            let health = health_for_checks;
            Arc::new(move || health.check(SystemTime::now()).0)
        }),
        interface_maps,
        live_backends: Arc::default(),
        port_filter,
        tunnel_source,
        warned_tunnel_source: None,
    };
    // Slots a previous agent retired but did not free get a fresh grace.
    agent.retire_unreachable();
    // Converge before attaching, so the first connect() through the new
    // programs already sees every Service.
    agent.sync()?;
    loaded.attach_socket_lb(&agent.config.cgroup)?;
    if let Some(external) = &agent.config.external {
        loaded.attach_interfaces(&external.interfaces)?;
        info!(interfaces = ?external.interfaces, mode = ?external.mode, "node interfaces attached");
        spawn_conntrack_sweep(
            PinLayout::new(&agent.config.bpffs_dir),
            external.clone(),
            agent.metrics.clone(),
            agent.live_backends.clone(),
            agent.port_filter.clone(),
        );
    }
    info!(cgroup = %agent.config.cgroup.display(), "socket load balancing attached; ready");
    if agent.config.cleanup_kube_proxy_rules {
        match crate::kube_proxy_rules::remove_all() {
            Ok(removed) => info!(
                chains = removed.chains,
                jumps = removed.jumps,
                nft_tables = removed.nft_tables,
                "removed kube-proxy's leftover rules"
            ),
            // Done only now that the programs serve every ClusterIP, so no
            // connection is ever without a handler. Leftover rules do not
            // stop socket load balancing (it acts before they see a
            // packet); report and go on.
            Err(error) => error!(
                error = format!("{error:#}"),
                "could not remove kube-proxy's rules"
            ),
        }
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut full_resync = tokio::time::interval(agent.config.sync_period);
    // After a stall, one resync, not a burst of them.
    full_resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    full_resync.reset();
    loop {
        tokio::select! {
            change = changes.recv() => {
                if change.is_none() {
                    anyhow::bail!("the source stopped sending changes");
                }
                // Coalesce a burst of changes into one sync, as kube-proxy's
                // BoundedFrequencyRunner does.
                tokio::time::sleep(agent.config.min_sync_period).await;
                while changes.try_recv().is_ok() {}
                if let Err(error) = agent.sync() {
                    error!(error = format!("{error:#}"), "sync failed; the dataplane keeps its last state");
                }
            }
            _ = full_resync.tick() => {
                if let Err(error) = agent.resync() {
                    error!(error = format!("{error:#}"), "full resync failed; the dataplane keeps its last state");
                }
            }
            () = sleep_until_or_forever(agent.next_slot_release()) => agent.free_retired_slots(),
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    info!("stopping; programs and maps stay pinned and keep serving");
    Ok(())
}

/// Writes CONFIG and NODE_IPS before the interface programs attach;
/// returns the tunnel's source address.
fn configure_interfaces(maps: &mut InterfaceMaps, external: &ExternalConfig) -> Result<Ipv4Addr> {
    let addresses = interfaces::ipv4_addresses(&external.interfaces)?;
    let node_ip = match external.node_ip {
        Some(ip) => ip,
        None => first_address_of_first_interface(external)?,
    };
    maps.set_node_ips(&addresses)?;
    maps.set_config(&ConfigValue {
        external_mode: match external.mode {
            ExternalMode::Tunnel => EXTERNAL_MODE_TUNNEL,
            ExternalMode::Snat => EXTERNAL_MODE_SNAT,
        },
        node_ip_be: ipv4_be(node_ip),
        vni: external.vni,
        tunnel_port_be: external.tunnel_port.to_be(),
        snat_port_min: external.snat_ports.0,
        snat_port_max: external.snat_ports.1,
        _pad: 0,
    })?;
    info!(%node_ip, node_addresses = ?addresses, "north-south datapath configured");
    Ok(node_ip)
}

fn first_address_of_first_interface(external: &ExternalConfig) -> Result<Ipv4Addr> {
    let first = external
        .interfaces
        .first()
        .context("no node interface configured")?;
    interfaces::ipv4_addresses(std::slice::from_ref(first))?
        .into_iter()
        .next()
        .with_context(|| {
            format!("interface {first} has no IPv4 address; pass --node-ip to choose the tunnel and SNAT address")
        })
}

/// Expires idle flows from CONNTRACK periodically, off the async workers.
fn spawn_conntrack_sweep(
    layout: PinLayout,
    external: ExternalConfig,
    metrics: Metrics,
    live_backends: LiveBackends,
    port_filter: Option<SharedPortFilter>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(external.conntrack_sweep_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let layout_for_stats = layout.clone();
        loop {
            tick.tick().await;
            let layout = layout.clone();
            let timeouts = external.conntrack;
            let live_backends = live_backends.clone();
            let swept = tokio::task::spawn_blocking(move || {
                conntrack::sweep(&layout, &timeouts, maps::monotonic_now_ns(), || {
                    lock(&live_backends).clone()
                })
            })
            .await;
            match swept {
                Ok(Ok(report)) => {
                    let labels = MapLabels {
                        map: map_names::CONNTRACK.into(),
                    };
                    metrics
                        .map_entries
                        .get_or_create(&labels)
                        .set(gauge(report.entries));
                    metrics
                        .map_capacity
                        .get_or_create(&labels)
                        .set(i64::from(external.conntrack_max_entries));
                    match record_evictions(&layout_for_stats, &report) {
                        Ok(evicted) => {
                            metrics.conntrack_evicted.set(gauge(evicted as usize));
                        }
                        Err(error) => warn!(
                            error = format!("{error:#}"),
                            "conntrack eviction count not updated"
                        ),
                    }
                    metrics
                        .conntrack_expired_total
                        .inc_by(report.expired as u64);
                    if let Some(filter) = &port_filter
                        && let Err(error) = lock(filter).retain(&report.ports_in_use)
                    {
                        warn!(error = format!("{error:#}"), "PORTS not trimmed");
                    }
                }
                Ok(Err(error)) => warn!(error = format!("{error:#}"), "conntrack sweep failed"),
                Err(error) => warn!(%error, "conntrack sweep task failed"),
            }
        }
    });
}

/// Adds the sweep's expirations to the pinned counter and returns how many
/// entries the LRU evicted since the maps were created: every entry written
/// is still there, was expired by a sweep, or was evicted.
fn record_evictions(layout: &PinLayout, report: &conntrack::SweepReport) -> Result<u64> {
    maps::add_conntrack_expired(layout, report.expired as u64)?;
    let stats = maps::read_stats(layout)?;
    let stat = |wanted| {
        stats
            .iter()
            .find(|(s, _)| *s == wanted)
            .map_or(0, |(_, v)| *v)
    };
    Ok(stat(Stat::ExtConntrackCreated)
        .saturating_sub(stat(Stat::ConntrackExpired))
        .saturating_sub(report.entries as u64))
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A count as a gauge value (saturating; counts never approach i64::MAX).
fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
