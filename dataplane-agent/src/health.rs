//! `/healthz` and `/livez` with kube-proxy's semantics and JSON shape
//! (pkg/proxy/healthcheck/proxier_health.go): unhealthy (503) only when a
//! change has waited longer than the health timeout without a sync; a
//! starting agent with nothing queued is healthy. `/healthz` is also 503
//! when the node is being deleted (deletionTimestamp, or the cluster
//! autoscaler's ToBeDeletedByClusterAutoscaler taint), so load balancers
//! drain it first (KEP-3836); `/livez` ignores that.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde::Serialize;

#[derive(Debug)]
struct Times {
    last_updated: Option<SystemTime>,
    /// The oldest change not synced yet.
    oldest_queued: Option<SystemTime>,
    node_eligible: bool,
}

impl Default for Times {
    fn default() -> Self {
        Self {
            last_updated: None,
            oldest_queued: None,
            node_eligible: true,
        }
    }
}

/// The two endpoints of the health server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    Healthz,
    Livez,
}

/// Called with the endpoint and the status code of every answer.
type AnswerCounter = Arc<dyn Fn(Probe, u16) + Send + Sync>;

/// Shared between the sync loop (which reports) and the server.
#[derive(Clone)]
pub struct Health {
    times: Arc<Mutex<Times>>,
    timeout: Duration,
    count_answer: Option<AnswerCounter>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("times", &self.times)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// kube-proxy's response body.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthBody {
    pub last_updated: String,
    pub current_time: String,
    pub node_eligible: bool,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            times: Arc::new(Mutex::new(Times::default())),
            timeout,
            count_answer: None,
        }
    }

    /// Counts every answer of the server (kube-proxy's
    /// `kubeproxy_proxy_healthz_total` and `..._livez_total`).
    pub fn with_answer_counter(
        mut self,
        count: impl Fn(Probe, u16) + Send + Sync + 'static,
    ) -> Self {
        self.count_answer = Some(Arc::new(count));
        self
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        // A poisoned lock only means a panic elsewhere; the times are
        // still plain values.
        self.times.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change arrived that the dataplane does not reflect yet.
    pub fn queued(&self, at: SystemTime) {
        self.times().oldest_queued.get_or_insert(at);
    }

    /// What was queued turned out to need no sync (a Node heartbeat, an
    /// object resent unchanged): nothing waits any more.
    pub fn settled(&self) {
        self.times().oldest_queued = None;
    }

    /// A sync completed: everything queued before it is programmed.
    pub fn updated(&self, at: SystemTime) {
        let mut times = self.times();
        times.last_updated = Some(at);
        times.oldest_queued = None;
    }

    /// Whether this node should keep receiving external traffic.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.times().node_eligible = eligible;
    }

    /// `/livez`: the dataplane keeps up with changes.
    pub fn live(&self, now: SystemTime) -> (bool, HealthBody) {
        let times = self.times();
        let overdue =
            |since: SystemTime| now.duration_since(since).unwrap_or_default() > self.timeout;
        let healthy = !times.oldest_queued.is_some_and(overdue);
        let body = HealthBody {
            last_updated: times.last_updated.map(rfc3339).unwrap_or_default(),
            current_time: rfc3339(now),
            node_eligible: times.node_eligible,
        };
        (healthy, body)
    }

    /// `/healthz`: live, and the node is not being deleted.
    pub fn check(&self, now: SystemTime) -> (bool, HealthBody) {
        let (live, body) = self.live(now);
        (live && body.node_eligible, body)
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

pub async fn serve(listener: tokio::net::TcpListener, health: Health) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(respond_healthz))
        .route("/livez", get(respond_livez))
        .with_state(health);
    axum::serve(listener, app).await.context("serving /healthz")
}

async fn respond_healthz(State(health): State<Health>) -> (StatusCode, Json<HealthBody>) {
    respond(&health, Probe::Healthz, health.check(SystemTime::now()))
}

async fn respond_livez(State(health): State<Health>) -> (StatusCode, Json<HealthBody>) {
    respond(&health, Probe::Livez, health.live(SystemTime::now()))
}

fn respond(
    health: &Health,
    probe: Probe,
    (healthy, body): (bool, HealthBody),
) -> (StatusCode, Json<HealthBody>) {
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    if let Some(count) = &health.count_answer {
        count(probe, status.as_u16());
    }
    (status, Json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_700_000_000);

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(seconds)
    }

    #[test]
    fn a_starting_agent_is_healthy_until_a_queued_change_is_overdue() {
        let health = Health::new(Duration::from_secs(60));
        assert!(health.check(at(0)).0, "nothing queued yet");
        health.queued(at(0));
        assert!(!health.check(at(61)).0, "the first sync never came");
        health.updated(at(62));
        let (healthy, body) = health.check(at(63));
        assert!(healthy);
        assert_eq!(body.last_updated, "2023-11-14T22:14:22.000000000Z");
        assert_eq!(body.current_time, "2023-11-14T22:14:23.000000000Z");
    }

    #[test]
    fn a_change_waiting_longer_than_the_timeout_is_unhealthy_until_synced() {
        let health = Health::new(Duration::from_secs(60));
        health.updated(at(0));
        health.queued(at(10));
        health.queued(at(50)); // the oldest queued change counts
        assert!(health.check(at(70)).0);
        assert!(!health.check(at(71)).0);
        health.updated(at(72));
        assert!(
            health.check(at(500)).0,
            "idle is healthy: nothing is queued"
        );
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_but_not_livez() {
        let health = Health::new(Duration::from_secs(60));
        health.updated(at(0));
        health.set_node_eligible(false);
        assert!(!health.check(at(1)).0);
        assert!(health.live(at(1)).0);
        assert!(!health.check(at(1)).1.node_eligible);
    }

    #[test]
    fn the_body_uses_kube_proxys_field_names() {
        let health = Health::new(Duration::from_secs(60));
        health.updated(at(0));
        let json = serde_json::to_value(health.check(at(0)).1).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(keys, ["currentTime", "lastUpdated", "nodeEligible"]);
    }
}
