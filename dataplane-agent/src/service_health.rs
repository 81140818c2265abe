//! Per-Service health checks for `externalTrafficPolicy: Local` Services,
//! with kube-proxy's semantics (pkg/proxy/healthcheck/service_health.go).
//!
//! Cloud load balancers probe `spec.healthCheckNodePort` on every node and
//! only send traffic to nodes that answer 200, so a Local Service never
//! lands on a node without a local endpoint (where it would be dropped, as
//! there is no SNAT hop to another node). Each port gets its own listener;
//! any path and method answers, because load balancers are configured with
//! arbitrary probe paths.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use axum::{
    Json, Router,
    extract::State,
    http::{
        HeaderName, HeaderValue, StatusCode,
        header::{CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS},
    },
};
use serde::Serialize;
use tokio::sync::{oneshot, watch};

/// kube-proxy reports the local endpoint count as a weight, so load
/// balancers that support it spread traffic in proportion to the endpoints
/// on each node.
const ENDPOINT_WEIGHT: HeaderName = HeaderName::from_static("x-load-balancing-endpoint-weight");

/// What one health check node port reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealthTarget {
    pub namespace: String,
    pub name: String,
    /// Ready endpoints of the Service on this node.
    pub local_endpoints: usize,
}

/// The set of running health check listeners, one per node port.
pub struct ServiceHealthServers {
    bind_ip: IpAddr,
    proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    listeners: BTreeMap<u16, Listener>,
}

/// One running listener. Dropping it stops the server.
struct Listener {
    /// Counts change on every endpoint sync; updating them in place keeps
    /// the port bound, so a probe never sees a refused connection just
    /// because a pod became ready.
    target: watch::Sender<ServiceHealthTarget>,
    /// Dropping this sender starts axum's graceful shutdown, which closes
    /// the listening socket right away (so the port can be bound again) and
    /// closes idle connections, as kube-proxy's `http.Server.Close` does.
    _shutdown: oneshot::Sender<()>,
}

/// What a request handler reads.
#[derive(Clone)]
struct Served {
    target: watch::Receiver<ServiceHealthTarget>,
    proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
}

/// kube-proxy's response body.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceHealthBody {
    service: ServiceName,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Debug, Serialize)]
struct ServiceName {
    namespace: String,
    name: String,
}

impl ServiceHealthServers {
    /// `proxy_healthy` is asked on every request (the agent passes a
    /// closure over its `health::Health`): like kube-proxy, a node whose
    /// dataplane is stale fails every Service's check, not just `/healthz`.
    pub fn new(bind_ip: IpAddr, proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>) -> Self {
        Self {
            bind_ip,
            proxy_healthy,
            listeners: BTreeMap::new(),
        }
    }

    /// Makes the listeners match `wanted` (port -> target): starts
    /// listeners for new ports, stops listeners for ports no longer wanted,
    /// and updates counts in place (no rebind) for existing ones. A port
    /// that cannot be bound is returned in the error list (port, error
    /// string) and retried on the next call; the other ports still work,
    /// as in kube-proxy, where one Service's bind failure does not hold back
    /// the others. Must be called from within a tokio runtime.
    ///
    /// A stopped listener's socket closes when its task next runs, so a
    /// port removed and re-added without yielding to the runtime in between
    /// may fail to bind once; the next call retries it.
    pub fn reconcile(&mut self, wanted: &BTreeMap<u16, ServiceHealthTarget>) -> Vec<(u16, String)> {
        self.listeners.retain(|port, listener| {
            let keep = wanted.contains_key(port);
            if !keep {
                let target = listener.target.borrow();
                tracing::info!(
                    service = %format_args!("{}/{}", target.namespace, target.name),
                    port,
                    "closing health check node port"
                );
            }
            keep
        });

        let mut errors = Vec::new();
        for (&port, target) in wanted {
            if let Some(listener) = self.listeners.get(&port) {
                listener.target.send_if_modified(|current| {
                    let changed = current != target;
                    if changed {
                        current.clone_from(target);
                    }
                    changed
                });
                continue;
            }
            match self.start(port, target) {
                Ok(listener) => {
                    tracing::info!(
                        service = %format_args!("{}/{}", target.namespace, target.name),
                        port,
                        "opened health check node port"
                    );
                    self.listeners.insert(port, listener);
                }
                Err(error) => errors.push((port, format!("{error:#}"))),
            }
        }
        errors
    }

    /// Ports currently served.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Binds synchronously (std socket, then handed to tokio) so that
    /// `reconcile` can report a taken port to its caller without being
    /// async itself.
    fn start(&self, port: u16, target: &ServiceHealthTarget) -> Result<Listener> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("service health servers must be reconciled inside a tokio runtime")?;
        let address = SocketAddr::new(self.bind_ip, port);
        let service = format!("{}/{}", target.namespace, target.name);
        let socket = std::net::TcpListener::bind(address).with_context(|| {
            format!("binding health check node port {address} of Service {service}")
        })?;
        socket
            .set_nonblocking(true)
            .with_context(|| format!("making health check node port {address} non-blocking"))?;
        let socket = tokio::net::TcpListener::from_std(socket)
            .with_context(|| format!("registering health check node port {address} with tokio"))?;

        let (target_tx, target_rx) = watch::channel(target.clone());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let app = Router::new().fallback(respond).with_state(Served {
            target: target_rx,
            proxy_healthy: Arc::clone(&self.proxy_healthy),
        });
        let server = axum::serve(socket, app).with_graceful_shutdown(async move {
            // Resolves when the `Listener` is dropped as well as on send.
            let _ = shutdown_rx.await;
        });
        runtime.spawn(async move {
            if let Err(error) = server.await {
                tracing::warn!(%service, port, %error, "health check node port server failed");
            }
        });

        Ok(Listener {
            target: target_tx,
            _shutdown: shutdown_tx,
        })
    }
}

/// kube-proxy's hcHandler: 200 only when the node has a local endpoint and
/// the proxy itself is healthy; the body and weight are sent either way.
async fn respond(
    State(served): State<Served>,
) -> (
    StatusCode,
    [(HeaderName, HeaderValue); 3],
    Json<ServiceHealthBody>,
) {
    let target = served.target.borrow().clone();
    let proxy_healthy = (served.proxy_healthy)();
    let status = if target.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let headers = [
        (CONTENT_TYPE, HeaderValue::from_static("application/json")),
        (X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
        (ENDPOINT_WEIGHT, HeaderValue::from(target.local_endpoints)),
    ];
    let body = ServiceHealthBody {
        service: ServiceName {
            namespace: target.namespace,
            name: target.name,
        },
        local_endpoints: target.local_endpoints,
        service_proxy_healthy: proxy_healthy,
    };
    (status, headers, Json(body))
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        sync::atomic::{AtomicBool, Ordering},
        time::Duration,
    };

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpStream,
        time::timeout,
    };

    use super::*;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const PATIENCE: Duration = Duration::from_secs(5);

    struct Response {
        status: u16,
        /// Lower-cased names.
        headers: BTreeMap<String, String>,
        body: String,
    }

    fn always_healthy() -> Arc<dyn Fn() -> bool + Send + Sync> {
        Arc::new(|| true)
    }

    /// A port nobody listens on right now.
    fn free_port() -> u16 {
        let socket = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
        socket.local_addr().unwrap().port()
    }

    fn target(name: &str, local_endpoints: usize) -> ServiceHealthTarget {
        ServiceHealthTarget {
            namespace: "ns".into(),
            name: name.into(),
            local_endpoints,
        }
    }

    fn wanted(entries: &[(u16, ServiceHealthTarget)]) -> BTreeMap<u16, ServiceHealthTarget> {
        entries.iter().cloned().collect()
    }

    /// Sends one probe on an open connection, the way a load balancer does.
    async fn probe_on(mut stream: TcpStream) -> Response {
        let request = "GET /any/probe/path HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n";
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        timeout(PATIENCE, stream.read_to_string(&mut raw))
            .await
            .expect("the server answers in time")
            .unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap();
        let headers = lines
            .map(|line| {
                let (name, value) = line.split_once(':').unwrap();
                (name.trim().to_lowercase(), value.trim().to_owned())
            })
            .collect();
        Response {
            status: status.parse().unwrap(),
            headers,
            body: body.to_owned(),
        }
    }

    async fn probe(port: u16) -> Response {
        let stream = TcpStream::connect((LOCALHOST, port)).await.unwrap();
        probe_on(stream).await
    }

    async fn wait_until_refused(port: u16) {
        timeout(PATIENCE, async {
            while TcpStream::connect((LOCALHOST, port)).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the port closes");
    }

    #[tokio::test]
    async fn a_service_with_local_endpoints_answers_200_with_its_count() {
        let port = free_port();
        let mut servers = ServiceHealthServers::new(LOCALHOST, always_healthy());
        assert_eq!(servers.reconcile(&wanted(&[(port, target("svc", 3))])), []);
        assert_eq!(servers.ports(), [port]);

        let response = probe(port).await;
        assert_eq!(response.status, 200);
        assert_eq!(
            response.body,
            r#"{"service":{"namespace":"ns","name":"svc"},"localEndpoints":3,"serviceProxyHealthy":true}"#
        );
        assert_eq!(response.headers["content-type"], "application/json");
        assert_eq!(response.headers["x-content-type-options"], "nosniff");
        assert_eq!(response.headers["x-load-balancing-endpoint-weight"], "3");
    }

    #[tokio::test]
    async fn a_service_without_local_endpoints_answers_503() {
        let port = free_port();
        let mut servers = ServiceHealthServers::new(LOCALHOST, always_healthy());
        assert_eq!(servers.reconcile(&wanted(&[(port, target("svc", 0))])), []);

        let response = probe(port).await;
        assert_eq!(response.status, 503);
        assert_eq!(
            response.body,
            r#"{"service":{"namespace":"ns","name":"svc"},"localEndpoints":0,"serviceProxyHealthy":true}"#
        );
        assert_eq!(response.headers["x-load-balancing-endpoint-weight"], "0");
    }

    #[tokio::test]
    async fn an_unhealthy_proxy_answers_503_despite_local_endpoints() {
        let port = free_port();
        let healthy = Arc::new(AtomicBool::new(false));
        let asked = Arc::clone(&healthy);
        let mut servers =
            ServiceHealthServers::new(LOCALHOST, Arc::new(move || asked.load(Ordering::SeqCst)));
        assert_eq!(servers.reconcile(&wanted(&[(port, target("svc", 2))])), []);

        let response = probe(port).await;
        assert_eq!(response.status, 503);
        assert_eq!(
            response.body,
            r#"{"service":{"namespace":"ns","name":"svc"},"localEndpoints":2,"serviceProxyHealthy":false}"#
        );

        healthy.store(true, Ordering::SeqCst);
        assert_eq!(
            probe(port).await.status,
            200,
            "proxy health is asked on every request"
        );
    }

    #[tokio::test]
    async fn a_count_change_is_served_without_rebinding() {
        let port = free_port();
        let mut servers = ServiceHealthServers::new(LOCALHOST, always_healthy());
        assert_eq!(servers.reconcile(&wanted(&[(port, target("svc", 0))])), []);
        // A connection open across the update would be closed by a rebind.
        let open = TcpStream::connect((LOCALHOST, port)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;

        assert_eq!(servers.reconcile(&wanted(&[(port, target("svc", 4))])), []);
        let response = probe_on(open).await;
        assert_eq!(response.status, 200);
        assert_eq!(response.headers["x-load-balancing-endpoint-weight"], "4");
        assert_eq!(servers.ports(), [port]);
    }

    #[tokio::test]
    async fn a_removed_port_is_closed_and_can_be_bound_again() {
        let port = free_port();
        let mut servers = ServiceHealthServers::new(LOCALHOST, always_healthy());
        assert_eq!(servers.reconcile(&wanted(&[(port, target("svc", 1))])), []);
        assert_eq!(probe(port).await.status, 200);

        assert_eq!(servers.reconcile(&BTreeMap::new()), []);
        assert!(servers.ports().is_empty());
        wait_until_refused(port).await;

        assert_eq!(servers.reconcile(&wanted(&[(port, target("svc", 1))])), []);
        assert_eq!(probe(port).await.status, 200);
    }

    #[tokio::test]
    async fn a_taken_port_is_reported_and_retried_while_the_others_are_served() {
        let taken = free_port();
        let free = free_port();
        let squatter = std::net::TcpListener::bind((LOCALHOST, taken)).unwrap();
        let mut servers = ServiceHealthServers::new(LOCALHOST, always_healthy());
        let services = wanted(&[(taken, target("blocked", 1)), (free, target("svc", 1))]);

        let errors = servers.reconcile(&services);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].0, taken);
        assert!(errors[0].1.contains("ns/blocked"), "{}", errors[0].1);
        assert_eq!(servers.ports(), [free]);
        assert_eq!(probe(free).await.status, 200);

        drop(squatter);
        assert_eq!(servers.reconcile(&services), []);
        assert_eq!(servers.ports(), [free.min(taken), free.max(taken)]);
        assert_eq!(probe(taken).await.status, 200);
    }
}
