//! The agent's main loop: source -> model -> dataplane, coalesced.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use dataplane_common::{
    BackendKey, CONNTRACK_MAX_ENTRIES, ConfigValue, EXTERNAL_MODE_SNAT, EXTERNAL_MODE_TUNNEL,
    IPPROTO_UDP, ServiceKey, ServiceValue, node_ip_serves_node_ports,
};
use tokio::{
    sync::{Notify, mpsc, watch},
    time::Instant,
};
use tracing::{error, info, info_span, warn};

use crate::{
    config::{ExternalConfig, ExternalMode, NodePortAddresses, RunConfig, SourceConfig},
    conntrack_sweeper::{self, FlowPorts, LiveBackendsSender},
    dataplane::address_events::AddressEvents,
    dataplane::{
        codec::{self, ipv4_be, ipv4_of_be},
        interfaces,
        loader::LoadedObject,
        maps::{InterfaceMaps, KernelMaps, ServicesReader},
        names,
        pins::{self, PinLayout},
        ports::{self, PortFilter},
        state::{ApplyReport, PinnedState},
        upgrade,
    },
    health::{self, Health},
    metrics::{self, Metrics, SyncOutcome},
    model::{Frontend, Model, NodeInfo, ObjectName, Protocol, Skipped},
    service_health::{ServiceHealthServers, ServiceHealthTarget},
    socket_reaper::{self, Reaper},
    source::{
        Change, Changes,
        kube::{self, KubeSource},
        manifests::{self, ManifestDir},
    },
};

/// A started source.
enum Source {
    Manifests {
        dir: ManifestDir,
        /// The directory changed since its last refresh.
        changed: bool,
        _watcher: notify::RecommendedWatcher,
    },
    Kube(KubeSource),
}

impl Source {
    /// `prefetch`: the manifest directory as read while the programs
    /// loaded.
    async fn start(
        config: &RunConfig,
        changes: Changes,
        prefetch: Option<manifests::Prefetch>,
    ) -> Result<Self> {
        Ok(match &config.source {
            SourceConfig::Manifests(dir) => Self::Manifests {
                _watcher: manifests::watch_dir(dir, changes)?,
                dir: match prefetch {
                    Some(prefetch) => ManifestDir::with_prefetch(dir, prefetch),
                    None => ManifestDir::new(dir),
                },
                changed: true,
            },
            SourceConfig::Kube { kubeconfig } => {
                let client = kube::client(kubeconfig.as_deref()).await?;
                Self::Kube(KubeSource::start(client, changes).await?)
            }
        })
    }

    /// Takes a change from the source in.
    fn take(&mut self, change: Change, model: &mut Model) {
        match (change, self) {
            (Change::Object(update), _) => {
                model.update(update);
            }
            (Change::Directory, Self::Manifests { changed, .. }) => *changed = true,
            (Change::Directory, Self::Kube(_)) => {}
        }
    }

    /// Reads what changed in the manifest directory into the model; logs
    /// each problem once, when its file is read.
    fn refresh(&mut self, model: &mut Model) -> Result<()> {
        let Self::Manifests { dir, changed, .. } = self else {
            return Ok(());
        };
        if !std::mem::take(changed) {
            return Ok(());
        }
        let refreshed = dir.refresh().inspect_err(|_| *changed = true)?;
        for problem in refreshed.problems.iter().chain(&refreshed.duplicates) {
            warn!(%problem, "skipping manifest");
        }
        for update in refreshed.updates {
            model.update(update);
        }
        Ok(())
    }

    /// The manifest directory changed since it was last read.
    fn has_unread_changes(&self) -> bool {
        matches!(self, Self::Manifests { changed: true, .. })
    }

    fn problem_count(&self) -> usize {
        match self {
            Self::Manifests { dir, .. } => dir.problem_count(),
            Self::Kube(_) => 0,
        }
    }
}

/// The dataplane as the agent holds it while running.
struct Agent {
    config: RunConfig,
    source: Source,
    model: Model,
    maps: KernelMaps,
    mirror: PinnedState,
    /// Unreachable backend slots and when they became unreachable.
    retired: BTreeMap<BackendKey, Instant>,
    last_full_resync: Instant,
    /// Frontends whose last write failed, with why: written again at
    /// every sync until they succeed.
    failing: BTreeMap<Frontend, (&'static str, String)>,
    metrics: Metrics,
    health: Health,
    /// EndpointSlice change-trigger times already measured.
    seen_triggers: BTreeMap<ObjectName, String>,
    /// Changes older than this agent are not its programming latency.
    started_at: SystemTime,
    health_check_servers: ServiceHealthServers,
    /// A healthCheckNodePort could not be served: every sync retries.
    health_checks_failing: bool,
    interface_maps: Option<InterfaceMaps>,
    /// The backends each UDP frontend id uses after the last sync, for the
    /// conntrack sweep's stale-UDP check; None until the first sync.
    live_backends: LiveBackendsSender,
    /// Wakes the conntrack sweeper when a sync took backends away from UDP
    /// frontends.
    sweep_now: Arc<Notify>,
    /// Destroys connected UDP sockets to such backends; None until the
    /// programs attach.
    socket_reaper: Option<Reaper>,
    /// SERVICES for the periodic check, read off the sync loop.
    services_reader: Arc<ServicesReader>,
    /// Syncs run so far: a services check read while one ran is void.
    syncs: u64,
    /// PORTS, when the interface programs run: the sync sets the bits of
    /// new frontends, [`Agent::trim_ports`] clears those no frontend and no
    /// flow uses.
    port_filter: Option<PortFilter>,
    /// The address tunnel packets leave from, when the programs run.
    tunnel_source: Option<Ipv4Addr>,
    warned_tunnel_source: Option<Ipv4Addr>,
    /// NODE_IPS as this agent wrote it.
    node_ips: BTreeMap<Ipv4Addr, u32>,
}

/// How much a sync looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SyncScope {
    /// What changed since the last sync.
    Changes,
    /// Every Service recomputed and every frontend compared with the maps:
    /// the periodic safety net.
    Everything,
}

impl Agent {
    fn sync(&mut self, scope: SyncScope) -> Result<()> {
        let span = info_span!("sync");
        let _entered = span.enter();
        self.syncs += 1;
        let started = std::time::Instant::now();
        self.source.refresh(&mut self.model)?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let full = scope == SyncScope::Everything;
        if full {
            self.model.mark_all_dirty();
        }
        let compute_started = std::time::Instant::now();
        let recomputed = self.model.recompute();
        let compute_ms = compute_started.elapsed().as_secs_f64() * 1e3;
        let node = self.model.node().clone();
        self.health.set_node_eligible(!node.being_deleted);
        self.check_tunnel_source(&node);
        for service in &recomputed.services {
            for skipped in &service.skipped {
                log_skipped(skipped);
            }
        }
        for slice in &recomputed.slices {
            for skipped in self.model.slice_problems(slice) {
                log_skipped(&skipped);
            }
        }

        let apply_started = std::time::Instant::now();
        let mut changed = recomputed.frontends.clone();
        changed.extend(self.failing.keys().copied());
        let udp_changed = full || changed.iter().any(|f| f.protocol == Protocol::Udp);
        let udp_before = if udp_changed {
            self.udp_backends(&changed, full)
        } else {
            BTreeMap::new()
        };
        if udp_changed {
            // While the maps change, which backends are live is unknown to
            // the conntrack sweep: it cuts no UDP flow until the sync
            // publishes.
            self.live_backends.send_replace(None);
        }
        self.want_ports(&changed, full);
        let report = if full {
            self.mirror
                .apply(&self.model, &mut self.maps, &self.config.limits)
        } else {
            self.mirror
                .apply_changed(&self.model, &changed, &mut self.maps, &self.config.limits)
        };
        let apply_ms = apply_started.elapsed().as_secs_f64() * 1e3;
        if !full && report.removed > 0 {
            // What a removed frontend alone used may go at the next trim.
            self.want_ports(&changed, true);
        }
        self.record_failures(&changed, full, &report);
        self.retire(&report.unreachable);
        if udp_changed {
            self.publish_live_backends();
            self.cut_lost_udp_backends(udp_before);
        }
        if recomputed.nodes_changed
            && let Err(error) = self.refresh_node_ips()
        {
            error!(error = format!("{error:#}"), "node addresses not updated");
        }
        if (full || recomputed.nodes_changed)
            && let Some(maps) = &mut self.interface_maps
        {
            if let Err(error) = maps.set_tunnel_peers(&self.model.node_addresses()) {
                error!(error = format!("{error:#}"), "tunnel peers not updated");
            }
            if let Err(error) = maps.set_pod_cidrs(self.model.pod_cidrs()) {
                error!(error = format!("{error:#}"), "pod CIDRs not updated");
            }
        }
        if full || recomputed.health_checks_changed || self.health_checks_failing {
            self.serve_health_checks();
        }
        self.health.updated(SystemTime::now());
        let skipped = self.model.skipped();
        let unreadable_manifests = self.source.problem_count();
        let invalid_objects = skipped.total() + unreadable_manifests;
        self.metrics.record_sync(&SyncOutcome {
            full,
            changes: self.model.changes(),
            no_local_endpoints: self.model.no_local_endpoints(),
            failing: &self.failing,
            programmed: &self.mirror,
            skipped,
            unreadable_manifests,
            elapsed: started.elapsed(),
            new_failures: &report.failed,
        });
        self.observe_programming_latency(&recomputed.slices);
        // The whole file is rewritten: only when frontends come or go (a
        // frontend changing hands is caught at the next full sync).
        if (full || report.added > 0 || report.removed > 0)
            && let Err(error) = names::write_names(&self.config.bpffs_dir, &self.model)
        {
            warn!(
                error = format!("{error:#}"),
                "could not record Service names for dump"
            );
        }
        // A change that changed nothing (a resent object) is not news; a
        // full sync always is, as the heartbeat of the logs.
        let quiet = report.updated == 0 && report.removed == 0 && report.failed.is_empty();
        if full || !quiet || recomputed.nodes_changed {
            info!(
                services = recomputed.services.len(),
                frontends = self.model.frontend_count(),
                updated = report.updated,
                removed = report.removed,
                failed = report.failed.len(),
                invalid_objects,
                load_ms,
                compute_ms,
                apply_ms,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                nodes_changed = recomputed.nodes_changed,
                full,
                "synced"
            );
        }
        Ok(())
    }

    /// Ports first, so the first packet of a new frontend is looked at. A
    /// sync of changes only adds bits; with `everything` the whole wanted
    /// set is recorded (a full sync, a removal), so [`Agent::trim_ports`]
    /// can clear what nothing needs.
    fn want_ports(&mut self, changed: &BTreeSet<Frontend>, everything: bool) {
        let Some(filter) = &mut self.port_filter else {
            return;
        };
        let result = if everything {
            filter.want(ports::of_frontends(self.model.frontends()))
        } else {
            filter.add(&ports::of_frontends(
                changed
                    .iter()
                    .filter_map(|f| Some((f, self.model.entry(f)?))),
            ))
        };
        if let Err(error) = result {
            error!(
                error = format!("{error:#}"),
                "PORTS not updated: new frontends may not see external traffic yet"
            );
        }
    }

    /// Keeps the set of failing frontends: those this sync wrote are
    /// failing now only if they failed again.
    fn record_failures(&mut self, changed: &BTreeSet<Frontend>, full: bool, report: &ApplyReport) {
        let failing_before: BTreeMap<Frontend, _> = if full {
            std::mem::take(&mut self.failing)
        } else {
            changed
                .iter()
                .filter_map(|f| Some((*f, self.failing.remove(f)?)))
                .collect()
        };
        for (frontend, error) in &report.failed {
            let service = self.model.entry(frontend).map(|e| e.service.to_string());
            // Logged when it starts failing, not at every retry.
            if !failing_before.contains_key(frontend) {
                error!(%frontend, service = service.as_deref().unwrap_or("-"), %error, "frontend not programmed; it keeps its previous state");
            }
            self.failing
                .insert(*frontend, (error.reason(), service.unwrap_or_default()));
        }
    }

    /// Takes one change from the source in; a change that matters is
    /// queued for the next sync, as kube-proxy's trackers queue one.
    fn take(&mut self, change: Change) {
        self.source.take(change, &mut self.model);
        if self.needs_sync() {
            self.metrics.record_queued();
        }
        self.metrics.record_changes(&self.model.changes());
    }

    /// Whether a sync has work: changes taken in, a manifest directory
    /// to re-read, or frontends that failed and are retried.
    fn needs_sync(&self) -> bool {
        self.model.has_changes() || self.source.has_unread_changes() || !self.failing.is_empty()
    }

    /// Re-reads this node's addresses into NODE_IPS: at an address event,
    /// at each resync, and when the Node object's InternalIP (the
    /// `--nodeport-addresses primary`) may have changed.
    fn refresh_node_ips(&mut self) -> Result<()> {
        let (Some(maps), Some(external)) = (&mut self.interface_maps, &self.config.external) else {
            return Ok(());
        };
        let addresses = interfaces::ipv4_addresses(&external.interfaces)?;
        let uses = interfaces::node_ip_uses(
            &addresses,
            &external.nodeport_addresses,
            self.model.node().internal_ip,
        );
        if uses != self.node_ips {
            maps.set_node_ips(&uses)?;
            info!(node_ports = ?serving_node_ports(&uses), addresses = ?addresses, "node addresses");
            if external.nodeport_addresses == NodePortAddresses::Primary
                && self.model.node().internal_ip.is_none()
            {
                warn!(
                    "--nodeport-addresses primary: this node's Node object has no InternalIP, so no address serves nodePorts"
                );
            }
            self.node_ips = uses;
        }
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

    /// What the UDP frontends a sync may change (all of them for a full
    /// sync) balance over before it writes.
    fn udp_backends(
        &self,
        changed: &BTreeSet<Frontend>,
        full: bool,
    ) -> BTreeMap<ServiceKey, BTreeSet<(u32, u16)>> {
        let of = |key: &ServiceKey, value: &ServiceValue| (*key, self.backend_set(value));
        if full {
            self.mirror
                .services
                .iter()
                .filter(|(key, _)| key.protocol == IPPROTO_UDP)
                .map(|(key, value)| of(key, value))
                .collect()
        } else {
            changed
                .iter()
                .filter(|f| f.protocol == Protocol::Udp)
                .map(codec::service_key)
                .filter_map(|key| Some(of(&key, self.mirror.services.get(&key)?)))
                .collect()
        }
    }

    fn backend_set(&self, value: &ServiceValue) -> BTreeSet<(u32, u16)> {
        self.mirror
            .current_backends(value)
            .iter()
            .map(|b| (b.ip_be, b.port_be))
            .collect()
    }

    /// UDP has no connection to end, so flows and connected sockets to a
    /// backend that left its frontend are cut as soon as the maps say so:
    /// the sweep runs now rather than at its next period, and the socket
    /// reaper destroys the connected sockets socket LB pointed at it.
    fn cut_lost_udp_backends(&self, before: BTreeMap<ServiceKey, BTreeSet<(u32, u16)>>) {
        let mut affected = socket_reaper::Affected::new();
        for (key, backends) in before {
            let now = self
                .mirror
                .services
                .get(&key)
                .map(|value| self.backend_set(value))
                .unwrap_or_default();
            if backends.is_subset(&now) {
                continue;
            }
            let service = codec::frontend_of(&key)
                .and_then(|f| self.model.entry(&f))
                .map_or_else(|| "(removed)".to_owned(), |e| e.service.to_string());
            affected.insert(
                SocketAddrV4::new(ipv4_of_be(key.vip_be), u16::from_be(key.port_be)),
                service,
            );
        }
        if affected.is_empty() {
            return;
        }
        self.sweep_now.notify_one();
        if let Some(reaper) = &self.socket_reaper {
            reaper.reap(affected);
        }
    }

    /// The backends of the UDP frontends, the only ones the sweep checks.
    fn publish_live_backends(&self) {
        let live = self
            .mirror
            .services
            .iter()
            .filter(|(key, _)| key.protocol == IPPROTO_UDP)
            .flat_map(|(_, value)| {
                self.mirror
                    .current_backends(value)
                    .into_iter()
                    .map(move |b| (value.service_id, b.ip_be, b.port_be))
            })
            .collect();
        self.live_backends.send_replace(Some(live));
    }

    /// kube-proxy's per-Service health checks for externalTrafficPolicy
    /// Local load balancers.
    fn serve_health_checks(&mut self) {
        let wanted: BTreeMap<u16, ServiceHealthTarget> = self
            .model
            .health_checks()
            .into_iter()
            .map(|(port, check)| {
                (
                    port,
                    ServiceHealthTarget {
                        namespace: check.service.namespace.to_string(),
                        name: check.service.name.to_string(),
                        local_endpoints: check.local_endpoints,
                    },
                )
            })
            .collect();
        let errors = self.health_check_servers.reconcile(&wanted);
        self.health_checks_failing = !errors.is_empty();
        for (port, error) in errors {
            error!(port, %error, "healthCheckNodePort not served; retried at the next sync");
        }
    }

    /// The periodic resync. Cheap when nothing is amiss: SERVICES (one
    /// entry per frontend, read in batches) is compared with the mirror.
    /// If it differs (anything but this agent wrote to it), or once per
    /// --full-resync-period, a full resync: what the kernel maps hold
    /// becomes the starting point again, every Service is recomputed, and
    /// the maps converge.
    /// The periodic safety net. Unless a full resync is due, it only
    /// starts reading SERVICES on another thread (at 100,000 Services that
    /// takes tens of milliseconds, which a change arriving meanwhile would
    /// otherwise wait for); [`Agent::finish_services_check`] compares.
    fn resync(&mut self) -> Result<Option<ServicesCheck>> {
        // Address events wake the agent too; this catches one that was
        // missed.
        self.refresh_node_ips()?;
        if self.last_full_resync.elapsed() < self.config.full_resync_period {
            return Ok(Some(self.start_services_check(1)));
        }
        self.full_resync()?;
        Ok(None)
    }

    fn start_services_check(&self, attempt: u32) -> ServicesCheck {
        let reader = self.services_reader.clone();
        ServicesCheck {
            syncs_before: self.syncs,
            attempt,
            read: tokio::task::spawn_blocking(move || reader.read()),
        }
    }

    /// Compares what a services check read with the mirror, unless a sync
    /// wrote meanwhile (then the read may hold half of its writes: it is
    /// read again, and after a few tries read here, where no sync runs).
    fn finish_services_check(
        &mut self,
        check: ServicesCheck,
        read: Result<BTreeMap<ServiceKey, ServiceValue>>,
    ) -> Result<Option<ServicesCheck>> {
        const TRIES_ALONGSIDE_SYNCS: u32 = 3;
        let services = if self.syncs == check.syncs_before {
            read.context("reading SERVICES for a resync")?
        } else if check.attempt < TRIES_ALONGSIDE_SYNCS {
            return Ok(Some(self.start_services_check(check.attempt + 1)));
        } else {
            self.maps
                .read_services()
                .context("reading SERVICES for a resync")?
        };
        if self.mirror.services == services {
            self.health.updated(SystemTime::now());
            return Ok(None);
        }
        warn!("SERVICES differs from what this agent wrote: full resync");
        self.full_resync()?;
        Ok(None)
    }

    fn full_resync(&mut self) -> Result<()> {
        self.mirror = self
            .maps
            .read()
            .context("re-reading the pinned maps for a full resync")?;
        if let Some(error) = self.mirror.free_orphan_members(&mut self.maps) {
            warn!(%error, "could not delete every orphaned member entry");
        }
        self.sync(SyncScope::Everything)?;
        self.last_full_resync = Instant::now();
        self.retire_all_unreachable();
        return_freed_memory();
        Ok(())
    }

    /// kube-proxy's network programming latency: from each changed
    /// EndpointSlice's last-change-trigger-time to now, once per new
    /// trigger time.
    fn observe_programming_latency(&mut self, slices: &BTreeSet<ObjectName>) {
        let now = SystemTime::now();
        for name in slices {
            let Some(trigger) = self
                .model
                .cluster()
                .endpoint_slices
                .get(name)
                .and_then(|slice| slice.trigger_time.as_ref())
            else {
                self.seen_triggers.remove(name);
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
            self.seen_triggers.insert(name.clone(), trigger.clone());
        }
    }

    /// Starts the grace period of slots a sync just made unreachable.
    fn retire(&mut self, unreachable: &[BackendKey]) {
        let now = Instant::now();
        for key in unreachable {
            // From now: a later grace is never too short.
            self.retired.insert(*key, now);
        }
    }

    /// Every unreachable slot gets a grace period (at start, slots a
    /// previous agent retired but did not free; at a full resync, any the
    /// incremental bookkeeping missed). A pass over all of BACKENDS.
    fn retire_all_unreachable(&mut self) {
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

    /// Clears the PORTS bits that neither the frontends (since the sweep's
    /// walk) nor the flows the sweeper left use.
    fn trim_ports(&mut self, flows: &FlowPorts) {
        if let Some(filter) = &mut self.port_filter
            && let Err(error) = filter.retain(&flows.ports, flows.walked_at)
        {
            warn!(error = format!("{error:#}"), "PORTS not trimmed");
        }
    }

    /// Flows carried over from another pin layout may use ports no
    /// frontend of this one needs: PORTS keeps them until a sweep has seen
    /// those flows, or the new programs would skip their packets.
    fn keep_ports_of_carried_flows(&mut self, flow_ports: &ports::Bitmap) -> Result<()> {
        if let Some(filter) = &mut self.port_filter {
            filter
                .add(flow_ports)
                .context("adding the carried flows' ports to PORTS")?;
        }
        Ok(())
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
        let unreachable = self.mirror.unreachable_of(self.retired.keys());
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

/// What a panicking thread said, as far as it said a string.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned());
    format!("panicked: {}", text.as_deref().unwrap_or("(no message)"))
}

pub async fn run(config: RunConfig) -> Result<()> {
    crate::dataplane::capabilities::check(config.external.is_some())?;
    let prefetch = match &config.source {
        SourceConfig::Manifests(dir) => Some(manifests::Prefetch::start(dir)),
        SourceConfig::Kube { .. } => None,
    };
    let layout = PinLayout::new(&config.bpffs_dir);
    pins::ensure_bpffs_dir(&layout)?;
    let previous_layouts = layout.others()?;
    pins::ensure_cgroup2(&config.cgroup)?;

    let conntrack_entries = config
        .external
        .as_ref()
        .map_or(CONNTRACK_MAX_ENTRIES, |e| e.conntrack_max_entries);
    let mut loaded = LoadedObject::load_with(layout, conntrack_entries)?;
    loaded.forward_program_logs();
    let maps = loaded.take_maps()?;
    // Subscribed before the addresses are first read, so no change falls
    // between the read and the subscription.
    let mut address_events = match &config.external {
        Some(_) => AddressEvents::subscribe()
            .inspect_err(|error| {
                warn!(
                    error = format!("{error:#}"),
                    "address changes reach nodePorts only at the next resync"
                );
            })
            .ok(),
        None => None,
    };
    let (interface_maps, port_filter, tunnel_source, node_ips) = match &config.external {
        Some(external) => {
            let mut interface_maps = loaded.take_interface_maps()?;
            let (tunnel_source, node_ips) = configure_interfaces(&mut interface_maps, external)?;
            let filter = PortFilter::open(&loaded.layout)?;
            (
                Some(interface_maps),
                Some(filter),
                Some(tunnel_source),
                node_ips,
            )
        }
        None => (None, None, None, BTreeMap::new()),
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
    let health = Health::new(2 * config.sync_period).with_answer_counter({
        let metrics = metrics.clone();
        move |probe, code| metrics.record_health_answer(probe, code)
    });
    start_servers(&config, registry, &health);

    // Until the source has its first complete view, the programs a
    // previous agent left keep serving the pinned state untouched.
    let (changes_sender, mut changes) = mpsc::unbounded_channel();
    let queued = health.clone();
    let notifier = Changes::new(changes_sender, move || queued.queued(SystemTime::now()));
    let mut source = Source::start(&config, notifier, prefetch).await?;
    let config_health_ip = config.health_check_bind_ip;
    let health_for_checks = health.clone();
    let mut model = Model::new(&config.node_name);
    // Everything the source sent up to its first complete lists.
    while let Ok(change) = changes.try_recv() {
        source.take(change, &mut model);
    }
    let mut agent = Agent {
        source,
        model,
        failing: BTreeMap::new(),
        last_full_resync: Instant::now(),
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
        health_checks_failing: false,
        interface_maps,
        live_backends: watch::Sender::new(None),
        sweep_now: Arc::new(Notify::new()),
        socket_reaper: None,
        services_reader: Arc::new(
            ServicesReader::open(&loaded.layout).context("opening SERVICES for resyncs")?,
        ),
        syncs: 0,
        port_filter,
        tunnel_source,
        warned_tunnel_source: None,
        node_ips,
    };
    // Slots a previous agent retired but did not free get a fresh grace.
    agent.retire_all_unreachable();
    if let Some(error) = agent.mirror.free_orphan_members(&mut agent.maps) {
        warn!(%error, "could not delete every orphaned member entry");
    }
    // Converge before attaching, so the first connect() through the new
    // programs already sees every Service. The verifier checks the
    // programs meanwhile, on another core.
    let verify_interfaces = agent.config.external.is_some();
    let (synced, verified) = std::thread::scope(|scope| {
        let verifier = scope.spawn(|| loaded.load_programs(verify_interfaces));
        (agent.sync(SyncScope::Everything), verifier.join())
    });
    let verified = verified.unwrap_or_else(|panic| Err(anyhow::anyhow!("{}", panic_text(&*panic))));
    if let (Err(_), Err(error)) = (&synced, &verified) {
        // Only one error can be returned; the other is not to be lost.
        error!(
            error = format!("{error:#}"),
            "loading the programs failed too"
        );
    }
    synced?;
    verified?;
    return_freed_memory();
    // Flows an agent of another pin layout left: carried over before the
    // new programs attach, so they find them at once.
    for previous in &previous_layouts {
        if upgrade::entries_readable(previous.version) {
            let carried = upgrade::carry_state(previous, &loaded.layout).with_context(|| {
                format!("carrying state over from pin layout v{}", previous.version)
            })?;
            agent.keep_ports_of_carried_flows(&carried.flow_ports)?;
            info!(
                from = previous.version,
                to = loaded.layout.version,
                carried = ?carried.report,
                "carried state over from another pin layout"
            );
        } else {
            warn!(
                from = previous.version,
                to = loaded.layout.version,
                "pins of a newer layout (a rollback?): their flows cannot be read and are not carried over; established external flows may be reset"
            );
        }
    }
    loaded.attach_socket_lb(&agent.config.cgroup)?;
    agent.socket_reaper = Some(socket_reaper::spawn(
        PinLayout::new(&agent.config.bpffs_dir),
        agent.metrics.clone(),
    ));
    // Kept here when no sweeper runs, so the loop's receiver never closes.
    let (flow_ports_sender, mut flow_ports) = watch::channel(None);
    if let Some(external) = &agent.config.external {
        loaded.attach_interfaces(&external.interfaces)?;
        info!(interfaces = ?external.interfaces, mode = ?external.mode, "node interfaces attached");
        conntrack_sweeper::spawn(
            PinLayout::new(&agent.config.bpffs_dir),
            external.clone(),
            agent.metrics.clone(),
            agent.live_backends.subscribe(),
            flow_ports_sender.clone(),
            agent.sweep_now.clone(),
        );
    }
    for previous in &previous_layouts {
        let carried = upgrade::retire(previous, &loaded.layout)
            .with_context(|| format!("retiring pin layout v{}", previous.version))?;
        agent.keep_ports_of_carried_flows(&carried.flow_ports)?;
        info!(
            from = previous.version,
            carried = ?carried.report,
            "programs of the other pin layout detached and its pins removed"
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
    let mut services_check: Option<ServicesCheck> = None;
    loop {
        tokio::select! {
            changed = address_changed(&mut address_events) => {
                if let Err(error) = changed {
                    // Not retried in a loop: the resync re-reads addresses.
                    warn!(error = format!("{error:#}"), "address changes reach nodePorts only at the next resync from now on");
                    address_events = None;
                } else if let Err(error) = agent.refresh_node_ips() {
                    error!(error = format!("{error:#}"), "node addresses not updated");
                }
            }
            change = changes.recv() => {
                let Some(change) = change else {
                    anyhow::bail!("the source stopped sending changes");
                };
                agent.take(change);
                // Coalesce a burst of changes into one sync, as kube-proxy's
                // BoundedFrequencyRunner does.
                tokio::time::sleep(agent.config.min_sync_period).await;
                while let Ok(change) = changes.try_recv() {
                    agent.take(change);
                }
                if !agent.needs_sync() {
                    // Node heartbeats, resent objects: nothing to program,
                    // as kube-proxy's trackers would say.
                    agent.health.settled();
                } else if let Err(error) = agent.sync(SyncScope::Changes) {
                    error!(error = format!("{error:#}"), "sync failed; the dataplane keeps its last state");
                }
            }
            _ = full_resync.tick(), if services_check.is_none() => {
                match agent.resync() {
                    Ok(check) => services_check = check,
                    Err(error) => error!(error = format!("{error:#}"), "full resync failed; the dataplane keeps its last state"),
                }
            }
            read = services_read(&mut services_check) => {
                if let Some(check) = services_check.take() {
                    let read = read.unwrap_or_else(|error| Err(anyhow::anyhow!("the SERVICES reader failed: {error}")));
                    match agent.finish_services_check(check, read) {
                        Ok(again) => services_check = again,
                        Err(error) => error!(error = format!("{error:#}"), "full resync failed; the dataplane keeps its last state"),
                    }
                }
            }
            () = sleep_until_or_forever(agent.next_slot_release()) => agent.free_retired_slots(),
            Ok(()) = flow_ports.changed() => {
                let flows = flow_ports.borrow_and_update().clone();
                if let Some(flows) = flows {
                    agent.trim_ports(&flows);
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    info!("stopping; programs and maps stay pinned and keep serving");
    Ok(())
}

/// One line per skipped object, when it appears or changes.
fn log_skipped(skipped: &Skipped) {
    warn!(kind = skipped.kind, object = %skipped.object, category = skipped.category.label(), reason = %skipped.reason, "skipping invalid object");
}

/// The addresses of a NODE_IPS content that serve nodePorts.
fn serving_node_ports(uses: &BTreeMap<Ipv4Addr, u32>) -> Vec<Ipv4Addr> {
    uses.iter()
        .filter(|(_, uses)| node_ip_serves_node_ports(**uses))
        .map(|(address, _)| *address)
        .collect()
}

/// Writes CONFIG and NODE_IPS before the interface programs attach;
/// returns the tunnel's source address and what NODE_IPS holds.
fn configure_interfaces(
    maps: &mut InterfaceMaps,
    external: &ExternalConfig,
) -> Result<(Ipv4Addr, BTreeMap<Ipv4Addr, u32>)> {
    let addresses = interfaces::ipv4_addresses(&external.interfaces)?;
    let node_ip = match external.node_ip {
        Some(ip) => ip,
        None => first_address_of_first_interface(external)?,
    };
    let uses = interfaces::node_ip_uses_at_start(
        &addresses,
        &external.nodeport_addresses,
        &maps.node_ips(),
    );
    maps.set_node_ips(&uses)?;
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
        tunnel_mss_clamp: external.tunnel_mss_clamp,
    })?;
    info!(%node_ip, node_addresses = ?addresses, node_ports = ?serving_node_ports(&uses), "interface programs configured");
    Ok((node_ip, uses))
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

/// Gives the heap's free pages back to the kernel. A first sync of a large
/// cluster parses hundreds of megabytes of objects into records a tenth of
/// their size; without this the allocator keeps the peak as resident
/// memory for the agent's lifetime.
fn return_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks and trims the allocator's own free
    // lists; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A resync's read of SERVICES, running on a blocking thread.
struct ServicesCheck {
    /// [`Agent::syncs`] when the read started.
    syncs_before: u64,
    attempt: u32,
    read: tokio::task::JoinHandle<Result<BTreeMap<ServiceKey, ServiceValue>>>,
}

/// The result of the running services check; never, when none runs.
async fn services_read(
    check: &mut Option<ServicesCheck>,
) -> Result<Result<BTreeMap<ServiceKey, ServiceValue>>, tokio::task::JoinError> {
    match check {
        Some(check) => (&mut check.read).await,
        None => std::future::pending().await,
    }
}

/// The next address change; never, without a subscription.
async fn address_changed(events: &mut Option<AddressEvents>) -> Result<()> {
    match events {
        Some(events) => events.changed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
