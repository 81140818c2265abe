//! The agent's main loop: source -> model -> dataplane, coalesced.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use dataplane_common::BackendKey;
use tokio::time::Instant;
use tracing::{error, info, info_span, warn};

use crate::{
    dataplane::{
        kernel::{KernelMaps, Loaded},
        pins::{self, PinLayout},
        state::{Limits, PinnedState},
    },
    model::{self, NodeInfo},
    source::manifests::{self, ManifestDir},
};

/// Everything `dataplane-agent run` needs, resolved from flags.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: PathBuf,
    pub cgroup: PathBuf,
    pub bpffs_dir: PathBuf,
    pub node_name: String,
    pub min_sync_period: Duration,
    /// How long a retired backend slot stays readable after the flip that
    /// retired it, for connect() calls that read the old Service entry.
    pub sweep_grace: Duration,
    pub limits: Limits,
}

/// The dataplane as the agent holds it while running.
struct Agent {
    config: RunConfig,
    source: ManifestDir,
    maps: KernelMaps,
    mirror: PinnedState,
    /// Unreachable backend slots and when they became unreachable.
    retired: BTreeMap<BackendKey, Instant>,
}

impl Agent {
    fn sync(&mut self) -> Result<()> {
        let span = info_span!("sync");
        let _entered = span.enter();
        let started = std::time::Instant::now();
        let loaded = self.source.load()?;
        for problem in &loaded.problems {
            warn!(%problem, "skipping manifest");
        }
        let node = NodeInfo::from_cluster(&loaded.cluster, &self.config.node_name);
        let desired = model::desired(&loaded.cluster, &node);
        for skipped in &desired.skipped {
            warn!(kind = skipped.kind, object = %skipped.object, reason = %skipped.reason, "skipping invalid object");
        }

        let report = self
            .mirror
            .apply(&desired, &mut self.maps, &self.config.limits);
        for (frontend, error) in &report.failed {
            let service = desired
                .frontends
                .get(frontend)
                .map(|e| e.service.to_string());
            error!(%frontend, service = service.as_deref().unwrap_or("-"), %error, "frontend not programmed; it keeps its previous state");
        }
        self.retire_unreachable();
        info!(
            services = model::services_of(&desired).len(),
            frontends = desired.frontends.len(),
            updated = report.updated,
            removed = report.removed,
            failed = report.failed.len(),
            invalid_objects = loaded.problems.len() + desired.skipped.len(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "synced"
        );
        Ok(())
    }

    /// Starts the grace period of slots that just became unreachable.
    fn retire_unreachable(&mut self) {
        let now = Instant::now();
        let unreachable = self.mirror.unreachable_backends();
        self.retired.retain(|key, _| unreachable.contains(key));
        for key in unreachable {
            self.retired.entry(key).or_insert(now);
        }
    }

    /// When the next retired slot's grace period ends.
    fn next_sweep(&self) -> Option<Instant> {
        self.retired
            .values()
            .min()
            .map(|retired_at| *retired_at + self.config.sweep_grace)
    }

    /// Deletes the slots whose grace period has passed.
    fn sweep(&mut self) {
        let now = Instant::now();
        let due: std::collections::BTreeSet<BackendKey> = self
            .retired
            .iter()
            .filter(|(_, retired_at)| **retired_at + self.config.sweep_grace <= now)
            .map(|(key, _)| *key)
            .collect();
        let (deleted, error) = self.mirror.sweep(&due, &mut self.maps);
        if let Some(error) = error {
            warn!(%error, deleted, "could not delete every retired backend slot; retrying after another grace period");
        }
        let unreachable = self.mirror.unreachable_backends();
        self.retired.retain(|key, _| unreachable.contains(key));
        // What failed to delete waits a whole grace period again rather than
        // being retried in a tight loop.
        for key in due.intersection(&unreachable) {
            self.retired.insert(*key, now);
        }
    }
}

pub async fn run(config: RunConfig) -> Result<()> {
    let layout = PinLayout::new(&config.bpffs_dir);
    pins::ensure_bpffs_dir(&layout.dir)?;
    pins::ensure_cgroup2(&config.cgroup)?;
    let mut watch = manifests::watch_dir(&config.manifests)?;

    let mut loaded = Loaded::load(layout)?;
    let maps = loaded.take_maps()?;
    let mirror = maps
        .read()
        .context("reading the pinned maps left by a previous agent")?;
    info!(
        services = mirror.services.len(),
        backends = mirror.backends.len(),
        bpffs_dir = %config.bpffs_dir.display(),
        "adopted pinned maps"
    );
    let mut agent = Agent {
        source: ManifestDir::new(&config.manifests),
        config,
        maps,
        mirror,
        retired: BTreeMap::new(),
    };
    // Slots a previous agent retired but did not sweep get a fresh grace.
    agent.retire_unreachable();
    // Converge before attaching, so the first connect() through the new
    // programs already sees every Service.
    agent.sync()?;
    loaded.attach_socket_lb(&agent.config.cgroup)?;
    info!(cgroup = %agent.config.cgroup.display(), "socket load balancing attached; ready");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    loop {
        tokio::select! {
            change = watch.changes.recv() => {
                if change.is_none() {
                    anyhow::bail!("the manifest directory watcher stopped");
                }
                // Coalesce a burst of file events into one sync, as
                // kube-proxy's BoundedFrequencyRunner does.
                tokio::time::sleep(agent.config.min_sync_period).await;
                while watch.changes.try_recv().is_ok() {}
                if let Err(error) = agent.sync() {
                    error!(error = format!("{error:#}"), "sync failed; the dataplane keeps its last state");
                }
            }
            () = sleep_until_or_forever(agent.next_sweep()) => agent.sweep(),
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    info!("stopping; programs and maps stay pinned and keep serving");
    Ok(())
}

async fn sleep_until_or_forever(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
