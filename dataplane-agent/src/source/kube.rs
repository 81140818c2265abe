//! The Kubernetes API as the source: reflectors (list + watch, with kube-rs'
//! relist on 410 Gone) on Services, EndpointSlices and this node's Node,
//! with kube-proxy's own selectors. Reads the stores on demand, so the model
//! always sees one consistent snapshot.

use std::{fmt::Debug, path::Path};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::Changes;
use crate::model::{ClusterState, ObjectName};

/// kube-proxy's informer selector (cmd/kube-proxy/app/server.go): Services
/// and EndpointSlices that belong to another proxy, or to a headless
/// Service, are never even listed.
const KUBE_PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// A client from `--kubeconfig`, or else in-cluster config (the service
/// account, and `KUBERNETES_SERVICE_HOST`/`_PORT`, which the DaemonSet sets
/// from a ConfigMap because the `kubernetes` ClusterIP is not reachable
/// before the dataplane is up), or else `~/.kube/config`.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => Config::infer()
            .await
            .context("no --kubeconfig, no in-cluster service account and no ~/.kube/config")?,
    };
    info!(api_server = %config.cluster_url, "connecting to the API server");
    Client::try_from(config).context("building the Kubernetes client")
}

/// The three reflector stores.
pub struct KubeSource {
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
}

impl KubeSource {
    /// Starts the watches. Every event (including a relist) sends a unit
    /// on `changes`. Returns once every store holds a complete list, so the
    /// first sync never mistakes "not listed yet" for "deleted".
    pub async fn start(client: Client, node_name: &str, changes: Changes) -> Result<Self> {
        let labels = watcher::Config::default().labels(KUBE_PROXY_LABEL_SELECTOR);
        let services = reflect(
            Api::<Service>::all(client.clone()),
            labels.clone(),
            changes.clone(),
        );
        let endpoint_slices = reflect(
            Api::<EndpointSlice>::all(client.clone()),
            labels,
            changes.clone(),
        );
        let nodes = reflect(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            changes,
        );
        info!("waiting for the first complete list of Services, EndpointSlices and this Node");
        for ready in [
            services.wait_until_ready().await,
            endpoint_slices.wait_until_ready().await,
            nodes.wait_until_ready().await,
        ] {
            ready.context("a watch stopped before its first list")?;
        }
        Ok(Self {
            services,
            endpoint_slices,
            nodes,
        })
    }

    pub fn snapshot(&self) -> ClusterState {
        ClusterState {
            services: self
                .services
                .state()
                .into_iter()
                .map(|s| (ObjectName::of(&s.metadata), (*s).clone()))
                .collect(),
            endpoint_slices: self
                .endpoint_slices
                .state()
                .into_iter()
                .map(|s| (ObjectName::of(&s.metadata), (*s).clone()))
                .collect(),
            nodes: self
                .nodes
                .state()
                .into_iter()
                .map(|n| (n.metadata.name.clone().unwrap_or_default(), (*n).clone()))
                .collect(),
        }
    }
}

/// A reflector for `api`, driven on its own task.
fn reflect<K>(api: Api<K>, config: watcher::Config, changes: Changes) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let (store, writer) = reflector::store();
    let stream = watcher(api, config).default_backoff().reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if !changes.notify() {
                        return;
                    }
                }
                // The watcher retries with backoff and relists when its
                // resourceVersion is gone; the store keeps the last good
                // list meanwhile, and so does the dataplane.
                Err(error) => {
                    warn!(kind, %error, "watch failed; retrying, the dataplane keeps its state")
                }
            }
        }
    });
    store
}
