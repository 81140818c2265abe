//! Prometheus metrics: kube-proxy's sync series under their kube-proxy
//! names (so existing dashboards work), plus the dataplane's own.

use std::sync::{Arc, atomic::AtomicU64};

use anyhow::{Context as _, Result};
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use dataplane_common::{BACKENDS_MAX_ENTRIES, SERVICES_MAX_ENTRIES, map_names};

use std::collections::BTreeMap;

use crate::{
    dataplane::{
        maps,
        pins::PinLayout,
        state::{FrontendError, PinnedState},
    },
    health::Probe,
    model::{ChangeTally, Frontend, NoLocalEndpoints, SkipCounts, SkipReason},
};

/// The only family served until the IPv6 datapath exists; kube-proxy
/// labels its per-proxier series with it.
const IPV4: &str = "IPv4";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IpFamilyLabels {
    pub ip_family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficPolicyLabels {
    pub traffic_policy: String,
    pub ip_family: String,
}

impl TrafficPolicyLabels {
    fn ipv4(policy: &str) -> Self {
        Self {
            traffic_policy: policy.into(),
            ip_family: IPV4.into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: String,
}

type Histograms = Family<IpFamilyLabels, Histogram, fn() -> Histogram>;

fn ipv4() -> IpFamilyLabels {
    IpFamilyLabels {
        ip_family: IPV4.into(),
    }
}

/// kube-proxy's sync histograms: 1 ms doubling 15 times (to ~16 s).
fn sync_histograms() -> Histograms {
    Family::new_with_constructor(|| Histogram::new(sync_buckets()))
}

fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's network programming buckets: 0, 0.25 s, 0.5 s, every
/// second to 59 s, every 5 s to 115 s, every 30 s to 300 s.
fn network_programming_buckets() -> impl Iterator<Item = f64> {
    let linear =
        |start: f64, width: f64, count: u32| (0..count).map(move |i| start + width * f64::from(i));
    std::iter::once(0.0)
        .chain(linear(0.25, 0.25, 2))
        .chain(linear(1.0, 1.0, 59))
        .chain(linear(60.0, 5.0, 12))
        .chain(linear(120.0, 30.0, 7))
}

/// The `reason` of manifests that do not parse, beside [`SkipReason`]'s.
const UNREADABLE_MANIFEST: &str = "unreadable_manifest";

/// What one sync did, for [`Metrics::record_sync`].
pub struct SyncOutcome<'a> {
    /// Every Service recomputed and compared (kube-proxy's full sync), or
    /// only what changed (its partial sync).
    pub full: bool,
    pub changes: ChangeTally,
    pub no_local_endpoints: NoLocalEndpoints,
    /// Frontends not programmed now: (reason, Service).
    pub failing: &'a BTreeMap<Frontend, (&'static str, String)>,
    /// What failed in this sync (each failure is counted once).
    pub new_failures: &'a [(Frontend, FrontendError)],
    /// The maps as the sync left them.
    pub programmed: &'a PinnedState,
    /// Objects the model could not use, by reason.
    pub skipped: SkipCounts,
    /// Manifests the source could not read.
    pub unreadable_manifests: usize,
    pub elapsed: std::time::Duration,
}

/// A count as a gauge value.
pub fn gauge(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// A 64-bit count as a gauge value.
fn gauge_of_u64(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FrontendErrorLabels {
    pub service: String,
    pub frontend: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

/// Every series the agent updates. Cloning shares the underlying values.
/// The kube-proxy series carry kube-proxy's names, types, labels and
/// buckets (pkg/proxy/metrics, 1.34); the `ip_family` ones are held here
/// for IPv4, the only family served so far.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub sync_duration_seconds: Histogram,
    pub sync_full_duration_seconds: Histogram,
    pub sync_partial_duration_seconds: Histogram,
    pub network_programming_duration_seconds: Histogram,
    pub last_sync_timestamp_seconds: Gauge<f64, AtomicU64>,
    pub last_queued_timestamp_seconds: Gauge<f64, AtomicU64>,
    pub endpoint_changes_pending: Gauge,
    pub endpoint_changes_total: Counter,
    pub service_changes_pending: Gauge,
    pub service_changes_total: Counter,
    pub no_local_endpoints: Family<TrafficPolicyLabels, Gauge>,
    pub healthz_total: Family<CodeLabels, Counter>,
    pub livez_total: Family<CodeLabels, Counter>,
    pub conntrack_reconciler_duration_seconds: Histogram,
    pub conntrack_reconciler_deleted_total: Counter,
    pub frontends_programmed: Gauge,
    pub backends_programmed: Gauge,
    /// Objects currently skipped as invalid (a gauge: it falls when the
    /// object is fixed).
    pub invalid_objects: Gauge,
    /// The same, by reason.
    pub objects_skipped: Family<ReasonLabels, Gauge>,
    /// Frontends currently not programmed, by Service and reason.
    pub frontend_errors: Family<FrontendErrorLabels, Gauge>,
    pub frontend_errors_total: Family<ReasonLabels, Counter>,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    /// Flows the conntrack sweep expired.
    pub conntrack_expired_total: Counter,
    /// Completed passes of the conntrack sweeper.
    pub conntrack_sweeps_total: Counter,
    pub sockets_destroyed_total: Counter,
    /// Entries the conntrack LRU evicted under pressure since the maps
    /// were created.
    pub conntrack_evicted: Gauge,
}

impl Metrics {
    /// Records one pass of the conntrack sweeper: entries left, the
    /// table's size, flows it expired, and the LRU's evictions so far (None
    /// when they could not be counted).
    pub fn record_conntrack_sweep(
        &self,
        entries: usize,
        capacity: u32,
        expired: usize,
        backend_gone: usize,
        evicted: Option<u64>,
        elapsed: std::time::Duration,
    ) {
        self.conntrack_reconciler_duration_seconds
            .observe(elapsed.as_secs_f64());
        // kube-proxy's reconciler deletes only flows whose endpoint left.
        self.conntrack_reconciler_deleted_total
            .inc_by(backend_gone as u64);
        let labels = MapLabels {
            map: map_names::CONNTRACK.into(),
        };
        self.map_entries.get_or_create(&labels).set(gauge(entries));
        self.map_capacity
            .get_or_create(&labels)
            .set(i64::from(capacity));
        if let Some(evicted) = evicted {
            self.conntrack_evicted.set(gauge_of_u64(evicted));
        }
        self.conntrack_expired_total.inc_by(expired as u64);
        self.conntrack_sweeps_total.inc();
    }

    /// Records one pass of the socket reaper.
    pub fn record_sockets_destroyed(&self, destroyed: usize) {
        self.sockets_destroyed_total.inc_by(destroyed as u64);
    }

    /// A change arrived that the dataplane does not reflect yet.
    pub fn record_queued(&self) {
        self.last_queued_timestamp_seconds.set(unix_now_seconds());
    }

    /// The change events taken in so far.
    pub fn record_changes(&self, changes: &ChangeTally) {
        // kube-proxy's counters only grow: raised to the model's totals.
        let raise = |counter: &Counter, total: u64| {
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        raise(&self.service_changes_total, changes.service_events);
        raise(&self.endpoint_changes_total, changes.slice_events);
        self.service_changes_pending
            .set(gauge(changes.services_pending));
        self.endpoint_changes_pending
            .set(gauge_of_u64(changes.slice_changes_pending));
    }

    /// An answer of the health server.
    pub fn record_health_answer(&self, probe: Probe, code: u16) {
        let family = match probe {
            Probe::Healthz => &self.healthz_total,
            Probe::Livez => &self.livez_total,
        };
        family
            .get_or_create(&CodeLabels {
                code: code.to_string(),
            })
            .inc();
    }

    /// Records what one sync did.
    pub fn record_sync(&self, outcome: &SyncOutcome<'_>) {
        let SyncOutcome {
            full,
            changes,
            no_local_endpoints,
            failing,
            new_failures,
            programmed,
            skipped,
            unreadable_manifests,
            elapsed,
        } = outcome;
        let m = self;
        m.sync_duration_seconds.observe(elapsed.as_secs_f64());
        let by_kind = if *full {
            &m.sync_full_duration_seconds
        } else {
            &m.sync_partial_duration_seconds
        };
        by_kind.observe(elapsed.as_secs_f64());
        m.last_sync_timestamp_seconds.set(unix_now_seconds());
        m.record_changes(changes);
        for (policy, count) in [
            ("internal", no_local_endpoints.internal),
            ("external", no_local_endpoints.external),
        ] {
            m.no_local_endpoints
                .get_or_create(&TrafficPolicyLabels::ipv4(policy))
                .set(gauge(count));
        }
        m.frontends_programmed.set(gauge(programmed.services.len()));
        m.backends_programmed
            .set(gauge(programmed.live_backend_count()));
        m.invalid_objects
            .set(gauge(skipped.total() + unreadable_manifests));
        // Every reason is written, zeros too, so an alert on one has a
        // series to read from the first scrape on.
        let by_reason = SkipReason::ALL
            .into_iter()
            .map(|reason| (reason.label(), skipped.get(reason)))
            .chain([(UNREADABLE_MANIFEST, *unreadable_manifests)]);
        for (reason, count) in by_reason {
            m.objects_skipped
                .get_or_create(&ReasonLabels {
                    reason: reason.into(),
                })
                .set(gauge(count));
        }
        m.frontend_errors.clear();
        for (frontend, (reason, service)) in failing.iter() {
            m.frontend_errors
                .get_or_create(&FrontendErrorLabels {
                    service: service.clone(),
                    frontend: frontend.to_string(),
                    reason: (*reason).into(),
                })
                .set(1);
        }
        for (_, error) in new_failures.iter() {
            m.frontend_errors_total
                .get_or_create(&ReasonLabels {
                    reason: error.reason().into(),
                })
                .inc();
        }
        let maps = [
            (
                map_names::SERVICES,
                programmed.services.len(),
                SERVICES_MAX_ENTRIES,
            ),
            (
                map_names::BACKENDS,
                programmed.backends.len(),
                BACKENDS_MAX_ENTRIES,
            ),
            (
                map_names::MEMBERS,
                programmed.backends.len() + programmed.stray_members.len(),
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

    /// The metrics and a registry holding them, plus the datapath counters
    /// read from the pinned STATS map at each scrape.
    pub fn new(layout: PinLayout) -> (Self, Registry) {
        let sync_duration = sync_histograms();
        let sync_full_duration = sync_histograms();
        let sync_partial_duration = sync_histograms();
        let conntrack_duration = sync_histograms();
        let network_programming: Histograms =
            Family::new_with_constructor(|| Histogram::new(network_programming_buckets()));
        let last_sync = Family::<IpFamilyLabels, Gauge<f64, AtomicU64>>::default();
        let last_queued = Family::<IpFamilyLabels, Gauge<f64, AtomicU64>>::default();
        let conntrack_deleted = Family::<IpFamilyLabels, Counter>::default();
        let metrics = Self {
            sync_duration_seconds: sync_duration.get_or_create(&ipv4()).clone(),
            sync_full_duration_seconds: sync_full_duration.get_or_create(&ipv4()).clone(),
            sync_partial_duration_seconds: sync_partial_duration.get_or_create(&ipv4()).clone(),
            network_programming_duration_seconds: network_programming
                .get_or_create(&ipv4())
                .clone(),
            last_sync_timestamp_seconds: last_sync.get_or_create(&ipv4()).clone(),
            last_queued_timestamp_seconds: last_queued.get_or_create(&ipv4()).clone(),
            endpoint_changes_pending: Gauge::default(),
            endpoint_changes_total: Counter::default(),
            service_changes_pending: Gauge::default(),
            service_changes_total: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz_total: Family::default(),
            livez_total: Family::default(),
            conntrack_reconciler_duration_seconds: conntrack_duration
                .get_or_create(&ipv4())
                .clone(),
            conntrack_reconciler_deleted_total: conntrack_deleted.get_or_create(&ipv4()).clone(),
            frontends_programmed: Gauge::default(),
            backends_programmed: Gauge::default(),
            invalid_objects: Gauge::default(),
            objects_skipped: Family::default(),
            frontend_errors: Family::default(),
            frontend_errors_total: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            conntrack_expired_total: Counter::default(),
            conntrack_sweeps_total: Counter::default(),
            sockets_destroyed_total: Counter::default(),
            conntrack_evicted: Gauge::default(),
        };
        // Present from the first scrape, before the first sync.
        for policy in ["internal", "external"] {
            metrics
                .no_local_endpoints
                .get_or_create(&TrafficPolicyLabels::ipv4(policy))
                .set(0);
        }
        let mut registry = Registry::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            sync_duration,
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            sync_full_duration,
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            sync_partial_duration,
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            network_programming,
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            last_sync,
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            last_queued,
        );
        // Counters are registered without `_total`: the encoder appends it.
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            metrics.endpoint_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            metrics.endpoint_changes_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            metrics.service_changes_pending.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            metrics.service_changes_total.clone(),
        );
        // A gauge despite its name, as in kube-proxy.
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            metrics.no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            metrics.healthz_total.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            metrics.livez_total.clone(),
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
            conntrack_duration,
        );
        registry.register(
            "kubeproxy_conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            conntrack_deleted,
        );
        registry.register(
            "dataplane_frontends_programmed",
            "Service frontends (ip, port, protocol) in the SERVICES map",
            metrics.frontends_programmed.clone(),
        );
        registry.register(
            "dataplane_backends_programmed",
            "Backends the programmed frontends balance over",
            metrics.backends_programmed.clone(),
        );
        registry.register(
            "dataplane_invalid_objects",
            "Manifests and Kubernetes objects (or parts of one) not served at the last sync, for every reason; by reason: dataplane_objects_skipped",
            metrics.invalid_objects.clone(),
        );
        registry.register(
            "dataplane_objects_skipped",
            "Objects (or parts of one) not served now, by reason; each is logged once, when it appears or changes",
            metrics.objects_skipped.clone(),
        );
        registry.register(
            "dataplane_frontends_failing",
            "Frontends that could not be programmed at the last sync (1 per frontend)",
            metrics.frontend_errors.clone(),
        );
        registry.register(
            "dataplane_frontend_errors",
            "Frontend programming failures, counted at every sync that could not program a frontend",
            metrics.frontend_errors_total.clone(),
        );
        registry.register(
            "dataplane_map_entries",
            "Entries in each pinned map, as the agent wrote them",
            metrics.map_entries.clone(),
        );
        registry.register(
            "dataplane_map_capacity",
            "Maximum entries of each pinned map",
            metrics.map_capacity.clone(),
        );
        registry.register(
            "dataplane_conntrack_expired",
            "Conntrack entries of idle or closed flows removed by the agent's sweep",
            metrics.conntrack_expired_total.clone(),
        );
        registry.register(
            "dataplane_conntrack_sweeps",
            "Completed passes of the agent's conntrack sweep",
            metrics.conntrack_sweeps_total.clone(),
        );
        registry.register(
            "dataplane_conntrack_evicted",
            "Conntrack entries evicted by the LRU under pressure since the maps were created (written - expired - present)",
            metrics.conntrack_evicted.clone(),
        );
        registry.register(
            "dataplane_sockets_destroyed",
            "Connected UDP sockets destroyed because their backend left the Service they dialled",
            metrics.sockets_destroyed_total.clone(),
        );
        registry.register_collector(Box::new(DatapathStats { layout }));
        (metrics, registry)
    }
}

/// The per-CPU STATS counters of the programs, summed at scrape time.
#[derive(Debug)]
struct DatapathStats {
    layout: PinLayout,
}

impl Collector for DatapathStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(stats) = maps::read_stats(&self.layout) else {
            // Maps not pinned yet (or removed by cleanup): nothing to report.
            return Ok(());
        };
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "dataplane_datapath_events",
            "Datapath events counted by the BPF programs",
            None,
            counter.metric_type(),
        )?;
        for (stat, value) in stats {
            let labels = [("event", stat.name())];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, registry: Registry) -> Result<()> {
    let address = listener.local_addr().context("metrics listener address")?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(registry));
    tracing::info!(%address, "serving metrics");
    axum::serve(listener, app).await.context("serving metrics")
}

async fn scrape(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(error) => (
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {error}"),
        )
            .into_response(),
    }
}

/// Seconds since the Unix epoch, for the last-sync timestamp.
pub fn unix_now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kube_proxy_series_carry_kube_proxys_types_labels_and_buckets() {
        let (metrics, registry) = Metrics::new(PinLayout::new("/nonexistent"));
        metrics.network_programming_duration_seconds.observe(0.3);
        metrics.record_health_answer(Probe::Healthz, 503);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let buckets = text
            .lines()
            .filter(|l| l.starts_with("kubeproxy_network_programming_duration_seconds_bucket"))
            .count();
        // 0, 0.25, 0.5, 1..59, 60..115 by 5, 120..300 by 30, and +Inf.
        assert_eq!(buckets, 1 + 2 + 59 + 12 + 7 + 1, "{text}");
        assert!(text.contains(
            r#"kubeproxy_network_programming_duration_seconds_bucket{le="0.5",ip_family="IPv4"} 1"#
        ));
        for line in [
            "# TYPE kubeproxy_sync_proxy_rules_no_local_endpoints_total gauge",
            "# TYPE kubeproxy_sync_proxy_rules_endpoint_changes counter",
            r#"kubeproxy_proxy_healthz_total{code="503"} 1"#,
            r#"kubeproxy_sync_proxy_rules_duration_seconds_bucket{le="16.384",ip_family="IPv4"} 0"#,
            r#"kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family="IPv4"} 0"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }
}
