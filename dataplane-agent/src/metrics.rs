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
    model::Frontend,
};

/// What one sync did, for [`Metrics::record_sync`].
pub struct SyncOutcome<'a> {
    /// Frontends not programmed now: (reason, Service).
    pub failing: &'a BTreeMap<Frontend, (&'static str, String)>,
    /// What failed in this sync (each failure is counted once).
    pub new_failures: &'a [(Frontend, FrontendError)],
    /// The maps as the sync left them.
    pub programmed: &'a PinnedState,
    /// Objects the source could not read or the model could not use.
    pub invalid_objects: usize,
    pub elapsed: std::time::Duration,
}

/// A count as a gauge value.
pub fn gauge(count: usize) -> i64 {
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
#[derive(Clone, Debug)]
pub struct Metrics {
    pub sync_duration_seconds: Histogram,
    pub network_programming_duration_seconds: Histogram,
    pub last_sync_timestamp_seconds: Gauge<f64, AtomicU64>,
    pub frontends_programmed: Gauge,
    pub backends_programmed: Gauge,
    /// Objects currently skipped as invalid (a gauge: it falls when the
    /// object is fixed).
    pub invalid_objects: Gauge,
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
        evicted: Option<u64>,
    ) {
        let labels = MapLabels {
            map: map_names::CONNTRACK.into(),
        };
        self.map_entries.get_or_create(&labels).set(gauge(entries));
        self.map_capacity
            .get_or_create(&labels)
            .set(i64::from(capacity));
        if let Some(evicted) = evicted {
            self.conntrack_evicted
                .set(i64::try_from(evicted).unwrap_or(i64::MAX));
        }
        self.conntrack_expired_total.inc_by(expired as u64);
        self.conntrack_sweeps_total.inc();
    }

    /// Records one pass of the socket reaper.
    pub fn record_sockets_destroyed(&self, destroyed: usize) {
        self.sockets_destroyed_total.inc_by(destroyed as u64);
    }

    /// Records what one sync did.
    pub fn record_sync(&self, outcome: &SyncOutcome<'_>) {
        let SyncOutcome {
            failing,
            new_failures,
            programmed,
            invalid_objects,
            elapsed,
        } = outcome;
        let m = self;
        m.sync_duration_seconds.observe(elapsed.as_secs_f64());
        m.last_sync_timestamp_seconds.set(unix_now_seconds());
        m.frontends_programmed.set(gauge(programmed.services.len()));
        m.backends_programmed
            .set(gauge(programmed.live_backend_count()));
        m.invalid_objects.set(gauge(*invalid_objects));
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
        let metrics = Self {
            // kube-proxy's buckets: 1ms doubling up to ~16s.
            sync_duration_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            network_programming_duration_seconds: Histogram::new(exponential_buckets(
                0.001, 2.0, 20,
            )),
            last_sync_timestamp_seconds: Gauge::default(),
            frontends_programmed: Gauge::default(),
            backends_programmed: Gauge::default(),
            invalid_objects: Gauge::default(),
            frontend_errors: Family::default(),
            frontend_errors_total: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            conntrack_expired_total: Counter::default(),
            conntrack_sweeps_total: Counter::default(),
            sockets_destroyed_total: Counter::default(),
            conntrack_evicted: Gauge::default(),
        };
        let mut registry = Registry::default();
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            metrics.sync_duration_seconds.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In-cluster network programming latency in seconds",
            metrics.network_programming_duration_seconds.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            metrics.last_sync_timestamp_seconds.clone(),
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
            "Manifests and Kubernetes objects skipped as invalid at the last sync",
            metrics.invalid_objects.clone(),
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
