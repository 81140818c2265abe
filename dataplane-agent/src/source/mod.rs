//! Where cluster state comes from. Only this module reads it.
pub mod kube;
pub mod manifests;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::model::ClusterState;

/// One read of the cluster, what a sync computes the model from.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub cluster: ClusterState,
    /// What a source could not read and skipped (manifest documents; the
    /// API source decodes through kube-rs and reports nothing here).
    pub problems: Vec<manifests::ParseProblem>,
}

/// How a source says "something changed": wakes the sync loop, and first
/// runs a hook at arrival (health's "an update is queued"), so a stuck sync
/// loop still shows in /healthz, as kube-proxy's informer handlers do.
#[derive(Clone)]
pub struct Changes {
    sender: mpsc::UnboundedSender<()>,
    on_change: Arc<dyn Fn() + Send + Sync>,
}

impl Changes {
    pub fn new(
        sender: mpsc::UnboundedSender<()>,
        on_change: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        Self {
            sender,
            on_change: Arc::new(on_change),
        }
    }

    /// Returns false once the sync loop is gone.
    pub fn notify(&self) -> bool {
        (self.on_change)();
        self.sender.send(()).is_ok()
    }
}
