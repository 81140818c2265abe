//! Where cluster state comes from. Only this module reads it.
pub mod kube;
pub mod manifests;

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::model::Update;

/// What a source tells the sync loop.
#[derive(Debug)]
pub enum Change {
    /// An object changed (already reduced to what the model reads).
    Object(Update),
    /// The manifest directory changed: refresh it.
    Directory,
}

/// How a source says "something changed": sends the change to the sync
/// loop, and first runs a hook at arrival (health's "an update is
/// queued"), so a stuck sync loop still shows in /healthz, as kube-proxy's
/// informer handlers do.
#[derive(Clone)]
pub struct Changes {
    sender: mpsc::UnboundedSender<Change>,
    on_change: Arc<dyn Fn() + Send + Sync>,
}

impl Changes {
    pub fn new(
        sender: mpsc::UnboundedSender<Change>,
        on_change: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        Self {
            sender,
            on_change: Arc::new(on_change),
        }
    }

    /// Returns false once the sync loop is gone.
    pub fn send(&self, change: Change) -> bool {
        (self.on_change)();
        self.sender.send(change).is_ok()
    }
}
