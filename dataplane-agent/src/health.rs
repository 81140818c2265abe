//! `/healthz` and `/livez` with kube-proxy's semantics and JSON shape
//! (pkg/proxy/healthcheck/proxier_health.go): healthy once a sync has
//! succeeded and no queued change has waited longer than the health timeout
//! without a sync; 503 otherwise.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde::Serialize;

#[derive(Debug, Default)]
struct Times {
    last_updated: Option<SystemTime>,
    /// The oldest change not synced yet.
    oldest_queued: Option<SystemTime>,
}

/// Shared between the sync loop (which reports) and the server.
#[derive(Clone, Debug)]
pub struct Health {
    times: Arc<Mutex<Times>>,
    timeout: Duration,
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
        }
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

    /// A sync completed: everything queued before it is programmed.
    pub fn updated(&self, at: SystemTime) {
        let mut times = self.times();
        times.last_updated = Some(at);
        times.oldest_queued = None;
    }

    pub fn check(&self, now: SystemTime) -> (bool, HealthBody) {
        let times = self.times();
        let overdue =
            |since: SystemTime| now.duration_since(since).unwrap_or_default() > self.timeout;
        let healthy = times.last_updated.is_some() && !times.oldest_queued.is_some_and(overdue);
        let body = HealthBody {
            last_updated: times.last_updated.map(rfc3339).unwrap_or_default(),
            current_time: rfc3339(now),
            node_eligible: true,
        };
        (healthy, body)
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

pub async fn bind(address: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the health server to {address} (--healthz-bind-address)"))
}

pub async fn serve(listener: tokio::net::TcpListener, health: Health) -> Result<()> {
    let app = Router::new()
        .route("/healthz", get(respond))
        .route("/livez", get(respond))
        .with_state(health);
    axum::serve(listener, app).await.context("serving /healthz")
}

async fn respond(State(health): State<Health>) -> (StatusCode, Json<HealthBody>) {
    let (healthy, body) = health.check(SystemTime::now());
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
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
    fn unhealthy_until_the_first_sync() {
        let health = Health::new(Duration::from_secs(60));
        assert!(!health.check(at(0)).0);
        health.updated(at(1));
        let (healthy, body) = health.check(at(2));
        assert!(healthy);
        assert_eq!(body.last_updated, "2023-11-14T22:13:21.000000000Z");
        assert_eq!(body.current_time, "2023-11-14T22:13:22.000000000Z");
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
