//! The conntrack sweeper task: every `--conntrack-sweep-period` it expires
//! idle flows (and UDP flows to backends their frontend no longer uses)
//! from the pinned CONNTRACK map and reports to the metrics. Two one-way
//! channels connect it to the sync loop: the loop tells it which backends
//! are live, it tells the loop which ports the remaining flows use (the
//! loop owns PORTS and trims it).

use std::{collections::BTreeSet, sync::Arc};

use anyhow::Result;
use dataplane_common::Stat;
use tokio::sync::{Notify, watch};
use tracing::warn;

use crate::{
    config::ExternalConfig,
    dataplane::{
        conntrack::{self, LiveBackend},
        maps,
        pins::PinLayout,
        ports,
    },
    metrics::Metrics,
};

/// The backends each frontend id uses after the last sync; None while a
/// sync changes the maps (the sweeper then cuts no UDP flow).
pub type LiveBackendsSender = watch::Sender<Option<BTreeSet<LiveBackend>>>;

/// The ports the flows left after a sweep use, and when its walk began.
#[derive(Clone, Debug)]
pub struct FlowPorts {
    pub walked_at: std::time::Instant,
    pub ports: ports::Bitmap,
}

/// The last sweep's [`FlowPorts`]; None before the first sweep.
pub type FlowPortsSender = watch::Sender<Option<FlowPorts>>;

/// Starts the sweeper; it runs as long as the process, each pass off the
/// async workers: every sweep period, and at once when `sweep_now` is
/// notified (a sync took backends away from UDP frontends: their flows are
/// cut at sync time, as kube-proxy clears their conntrack entries).
pub fn spawn(
    layout: PinLayout,
    external: ExternalConfig,
    metrics: Metrics,
    live_backends: watch::Receiver<Option<BTreeSet<LiveBackend>>>,
    flow_ports: FlowPortsSender,
    sweep_now: Arc<Notify>,
) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(external.conntrack_sweep_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let layout_for_stats = layout.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = sweep_now.notified() => {}
            }
            let layout = layout.clone();
            let timeouts = external.conntrack;
            let live_backends = live_backends.clone();
            let walked_at = std::time::Instant::now();
            let swept = tokio::task::spawn_blocking(move || {
                conntrack::sweep(&layout, &timeouts, maps::monotonic_now_ns(), || {
                    live_backends.borrow().clone()
                })
            })
            .await;
            match swept {
                Ok(Ok(report)) => {
                    let evicted = record_evictions(&layout_for_stats, &report)
                        .inspect_err(|error| {
                            warn!(
                                error = format!("{error:#}"),
                                "conntrack eviction count not updated"
                            );
                        })
                        .ok();
                    metrics.record_conntrack_sweep(
                        report.entries,
                        external.conntrack_max_entries,
                        report.expired,
                        report.backend_gone,
                        evicted,
                        walked_at.elapsed(),
                    );
                    flow_ports.send_replace(Some(FlowPorts {
                        walked_at,
                        ports: report.ports_in_use,
                    }));
                }
                Ok(Err(error)) => warn!(error = format!("{error:#}"), "conntrack sweep failed"),
                Err(error) => warn!(%error, "conntrack sweep task failed"),
            }
        }
    });
}

/// Adds the sweep's expirations to the pinned counter and returns how many
/// entries the LRU evicted since the maps were created: every entry written
/// is still there, was expired by a sweep, or was evicted.
fn record_evictions(layout: &PinLayout, report: &conntrack::SweepReport) -> Result<u64> {
    maps::add_conntrack_expired(layout, report.expired as u64)?;
    let stats = maps::read_stats(layout)?;
    let stat = |wanted| {
        stats
            .iter()
            .find(|(s, _)| *s == wanted)
            .map_or(0, |(_, v)| *v)
    };
    Ok(stat(Stat::ExtConntrackCreated)
        .saturating_sub(stat(Stat::ConntrackExpired))
        .saturating_sub(report.entries as u64))
}
