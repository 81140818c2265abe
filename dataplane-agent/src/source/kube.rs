//! The Kubernetes API as the source: watches (list in pages + watch, with
//! kube-rs' relist on 410 Gone) on Services, EndpointSlices and Nodes, with
//! kube-proxy's own selectors, each change sent to the sync loop as it
//! arrives.

use std::{collections::BTreeMap, fmt::Debug, path::Path};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use tokio::sync::oneshot;

use super::{Change, Changes};
use crate::model::{NodeRecord, ObjectName, ServiceRecord, SliceRecord, Update};

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

/// Watches of Services, EndpointSlices and Nodes that send every change,
/// reduced to what the model reads, to the sync loop: the objects are not
/// kept here (one copy of the cluster, in the model).
pub struct KubeSource;

impl KubeSource {
    /// Starts the watches. Returns once each has sent its first complete
    /// list, so the first sync never mistakes "not listed yet" for
    /// "deleted".
    pub async fn start(client: Client, changes: Changes) -> Result<Self> {
        let labels = watcher::Config::default().labels(KUBE_PROXY_LABEL_SELECTOR);
        let services = watch(
            Api::<Service>::all(client.clone()),
            labels.clone(),
            changes.clone(),
            |service: &Service| {
                let name = ObjectName::of(&service.metadata);
                let record = ServiceRecord::new(&name, service);
                (name, record)
            },
            Update::Service,
            Update::AllServices,
        );
        let endpoint_slices = watch(
            Api::<EndpointSlice>::all(client.clone()),
            labels,
            changes.clone(),
            |slice: &EndpointSlice| (ObjectName::of(&slice.metadata), SliceRecord::new(slice)),
            Update::Slice,
            Update::AllSlices,
        );
        // Every Node: the tunnel needs the InternalIP of each node that
        // runs a backend, not only this node's zone.
        let nodes = watch(
            Api::<Node>::all(client),
            watcher::Config::default(),
            changes,
            |node: &Node| {
                (
                    node.metadata.name.clone().unwrap_or_default(),
                    NodeRecord::new(node),
                )
            },
            Update::Node,
            Update::AllNodes,
        );
        info!("waiting for the first complete list of Services, EndpointSlices and Nodes");
        for listed in [services, endpoint_slices, nodes] {
            listed
                .await
                .context("a watch stopped before its first list")?;
        }
        Ok(Self)
    }
}

/// Watches `api` on its own task and sends each change as an [`Update`]:
/// `one` for an added, changed or deleted object, `all` with every object
/// after each (re)list. The returned receiver fires after the first list.
fn watch<K, N, R>(
    api: Api<K>,
    config: watcher::Config,
    changes: Changes,
    record: impl Fn(&K) -> (N, R) + Send + 'static,
    one: impl Fn(N, Option<R>) -> Update + Send + 'static,
    all: impl Fn(BTreeMap<N, R>) -> Update + Send + 'static,
) -> oneshot::Receiver<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    N: Ord + Send + 'static,
    R: Send + 'static,
{
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    let (listed, first_list) = oneshot::channel();
    let stream = watcher(api, config).default_backoff();
    tokio::spawn(async move {
        let mut listed = Some(listed);
        let mut stream = std::pin::pin!(stream);
        let mut relisting = BTreeMap::new();
        while let Some(event) = stream.next().await {
            let update = match event {
                Ok(watcher::Event::Apply(object)) => {
                    let (name, record) = record(&object);
                    one(name, Some(record))
                }
                Ok(watcher::Event::Delete(object)) => one(record(&object).0, None),
                Ok(watcher::Event::Init) => {
                    relisting.clear();
                    continue;
                }
                Ok(watcher::Event::InitApply(object)) => {
                    let (name, record) = record(&object);
                    relisting.insert(name, record);
                    continue;
                }
                Ok(watcher::Event::InitDone) => all(std::mem::take(&mut relisting)),
                // The watcher retries with backoff and relists when its
                // resourceVersion is gone; the model keeps the last good
                // list meanwhile, and so does the dataplane.
                Err(error) => {
                    warn!(kind, %error, "watch failed; retrying, the dataplane keeps its state");
                    continue;
                }
            };
            let is_list = matches!(
                update,
                Update::AllServices(_) | Update::AllSlices(_) | Update::AllNodes(_)
            );
            if !changes.send(Change::Object(update)) {
                return;
            }
            if is_list && let Some(listed) = listed.take() {
                let _ = listed.send(());
            }
        }
    });
    first_list
}
