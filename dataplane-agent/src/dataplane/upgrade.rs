//! Taking over from an agent whose pins use another layout version (an
//! upgrade across a map layout change, or a rollback).
//!
//! The new agent never opens the other layout's maps as its own: it loads
//! into its own directory, converges there, and then carries over the
//! state only the running programs know (flows, affinity, socket reverse
//! translations), with each frontend id translated through the frontend's
//! key. The sequence in `run.rs`:
//!
//! 1. load and sync the new layout; [`carry_state`] (existing flows);
//! 2. attach the new programs next to the old ones (make-before-break: the
//!    old programs run first and keep serving their flows);
//! 3. [`retire`]: carry again (flows the old programs created meanwhile),
//!    detach the old programs, carry a last time (flows created between
//!    the second pass and the detach), remove the old pins.
//!
//! Entries are inserted only where the new map has none, so a flow the new
//! programs already track is never overwritten with an older view.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData, MapError};
use dataplane_common::{
    AffinityKey, AffinityValue, CtKey, CtValue, PIN_LAYOUT_VERSION, ServiceKey, ServiceValue,
    SockRevKey, SockRevValue, map_names,
};

use super::{
    maps::open_pinned,
    pins::{self, PinLayout},
};

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

/// The oldest layout whose map entries this build reads as its own types.
/// Layouts 0 and 1 differ only in where the pins live. A change to an
/// entry layout raises this to the new version and adds a decoder for the
/// older entries here.
const OLDEST_READABLE_LAYOUT: u32 = 0;

/// Whether this build can read the entries of layout `version`. Newer
/// layouts (a rollback) are not: their state is rebuilt, not carried.
pub fn entries_readable(version: u32) -> bool {
    (OLDEST_READABLE_LAYOUT..=PIN_LAYOUT_VERSION).contains(&version)
}

/// Frontend ids of one layout mapped to the ids the other layout gave the
/// same frontends (each agent allocates its own ids).
#[derive(Debug, Default)]
pub struct FrontendIds {
    old_to_new: BTreeMap<u32, u32>,
}

impl FrontendIds {
    pub fn between(
        old: impl IntoIterator<Item = (ServiceKey, u32)>,
        new: impl IntoIterator<Item = (ServiceKey, u32)>,
    ) -> Self {
        let new: BTreeMap<ServiceKey, u32> = new.into_iter().collect();
        let old_to_new = old
            .into_iter()
            .filter_map(|(key, old_id)| Some((old_id, *new.get(&key)?)))
            .collect();
        Self { old_to_new }
    }

    /// The new id of the frontend that had `old_id`. Id 0 belongs to no
    /// frontend (the backend node's entries of tunnelled flows) and stays.
    pub fn translate(&self, old_id: u32) -> Option<u32> {
        if old_id == 0 {
            return Some(0);
        }
        self.old_to_new.get(&old_id).copied()
    }
}

/// The flows to carry over, with their frontend ids translated, and how
/// many belong to frontends the new layout does not have (left behind:
/// their Service is gone, as after a sync that removed it).
pub fn carried_flows(
    flows: impl IntoIterator<Item = (CtKey, CtValue)>,
    ids: &FrontendIds,
) -> (Vec<(CtKey, CtValue)>, usize) {
    let mut orphaned = 0;
    let carried = flows
        .into_iter()
        .filter_map(|(key, value)| match ids.translate(value.service_id) {
            Some(service_id) => Some((
                key,
                CtValue {
                    service_id,
                    ..value
                },
            )),
            None => {
                orphaned += 1;
                None
            }
        })
        .collect();
    (carried, orphaned)
}

/// The sessionAffinity entries to carry over, as [`carried_flows`].
pub fn carried_affinity(
    entries: impl IntoIterator<Item = (AffinityKey, AffinityValue)>,
    ids: &FrontendIds,
) -> (Vec<(AffinityKey, AffinityValue)>, usize) {
    let mut orphaned = 0;
    let carried = entries
        .into_iter()
        .filter_map(|(key, value)| match ids.translate(key.service_id) {
            Some(service_id) => Some((AffinityKey { service_id, ..key }, value)),
            None => {
                orphaned += 1;
                None
            }
        })
        .collect();
    (carried, orphaned)
}

/// What one carry pass inserted into the new layout's maps.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CarryReport {
    pub flows: usize,
    pub affinity: usize,
    pub socket_reverse: usize,
    /// Entries of frontends the new layout does not have.
    pub orphaned: usize,
}

impl std::ops::AddAssign for CarryReport {
    fn add_assign(&mut self, other: Self) {
        self.flows += other.flows;
        self.affinity += other.affinity;
        self.socket_reverse += other.socket_reverse;
        self.orphaned += other.orphaned;
    }
}

/// One carry pass from `old` into `new` (both must be readable by this
/// build: [`entries_readable`]).
pub fn carry_state(old: &PinLayout, new: &PinLayout) -> Result<CarryReport> {
    let ids = FrontendIds::between(frontend_ids(old)?, frontend_ids(new)?);
    let mut report = CarryReport::default();

    let (flows, orphaned_flows) = carried_flows(entries(old, map_names::CONNTRACK)?, &ids);
    report.flows = insert_absent::<CtKey, CtValue>(new, map_names::CONNTRACK, flows)?;
    let (affinity, orphaned_affinity) = carried_affinity(entries(old, map_names::AFFINITY)?, &ids);
    report.affinity =
        insert_absent::<AffinityKey, AffinityValue>(new, map_names::AFFINITY, affinity)?;
    report.socket_reverse = insert_absent::<SockRevKey, SockRevValue>(
        new,
        map_names::SOCK_REV,
        entries(old, map_names::SOCK_REV)?,
    )?;
    report.orphaned = orphaned_flows + orphaned_affinity;
    Ok(report)
}

/// Hands over from `old` to `new` once the new programs are attached:
/// carries state (when `old` is readable), detaches the old programs,
/// carries once more and removes the old pins.
pub fn retire(old: &PinLayout, new: &PinLayout) -> Result<CarryReport> {
    let readable = entries_readable(old.version);
    let mut report = CarryReport::default();
    if readable {
        report += carry_state(old, new).context("carrying state before the detach")?;
    }
    pins::remove_links(old).with_context(|| {
        format!(
            "detaching the programs of pin layout v{} (in {})",
            old.version,
            old.dir.display()
        )
    })?;
    if readable {
        report += carry_state(old, new).context("carrying state after the detach")?;
    }
    pins::remove_maps(old).with_context(|| {
        format!(
            "removing the maps of pin layout v{} (in {})",
            old.version,
            old.dir.display()
        )
    })?;
    Ok(report)
}

fn frontend_ids(layout: &PinLayout) -> Result<Vec<(ServiceKey, u32)>> {
    let services: Vec<(ServiceKey, ServiceValue)> = entries(layout, map_names::SERVICES)?;
    Ok(services
        .into_iter()
        .map(|(key, value)| (key, value.service_id))
        .collect())
}

/// Every entry of a pinned hash map (entries that vanish during the walk
/// are skipped: the programs change these maps all the time).
fn entries<K: aya::Pod, V: aya::Pod>(layout: &PinLayout, name: &str) -> Result<Vec<(K, V)>> {
    let map: HashMap<MapData, K, V> = open_pinned(layout, name)?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// Inserts the entries `map` does not hold yet; returns how many.
fn insert_absent<K: aya::Pod, V: aya::Pod>(
    layout: &PinLayout,
    name: &str,
    entries: Vec<(K, V)>,
) -> Result<usize> {
    let mut map: HashMap<MapData, K, V> = open_pinned(layout, name)?;
    let mut inserted = 0;
    for (key, value) in entries {
        match map.insert(key, value, BPF_NOEXIST) {
            Ok(()) => inserted += 1,
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(error) => {
                return Err(error).with_context(|| {
                    format!("carrying an entry into {name} of {}", layout.dir.display())
                });
            }
        }
    }
    Ok(inserted)
}

#[cfg(test)]
mod tests {
    use dataplane_common::{CT_FORWARD, CT_TUNNEL_RETURN};

    use super::*;

    fn frontend(port: u16) -> ServiceKey {
        ServiceKey {
            vip_be: u32::from_be_bytes([10, 96, 0, 10]).to_be(),
            port_be: port.to_be(),
            protocol: 6,
            scope: 0,
        }
    }

    fn flow(source_port: u16, service_id: u32, kind: u8) -> (CtKey, CtValue) {
        (
            CtKey::new(1, source_port.to_be(), 2, 80u16.to_be(), 6),
            CtValue {
                nat_ip_be: 3,
                snat_ip_be: 0,
                tunnel_ip_be: 0,
                nat_port_be: 8080u16.to_be(),
                snat_port_be: 0,
                kind,
                flags: 0,
                _pad: 0,
                service_id,
                last_seen_ns: 42,
            },
        )
    }

    #[test]
    fn frontend_ids_follow_the_frontend_key_not_the_number() {
        let ids = FrontendIds::between(
            [(frontend(80), 1), (frontend(443), 2), (frontend(53), 3)],
            [(frontend(443), 1), (frontend(80), 7)],
        );
        assert_eq!(ids.translate(1), Some(7));
        assert_eq!(ids.translate(2), Some(1));
        assert_eq!(ids.translate(3), None, "frontend gone from the new layout");
        assert_eq!(ids.translate(9), None, "id unknown to the old layout");
        assert_eq!(ids.translate(0), Some(0), "no frontend");
    }

    #[test]
    fn flows_are_carried_with_the_new_ids_and_those_of_gone_frontends_stay_behind() {
        let ids = FrontendIds::between([(frontend(80), 1), (frontend(53), 3)], [(frontend(80), 5)]);
        let (carried, orphaned) = carried_flows(
            [
                flow(1000, 1, CT_FORWARD),
                flow(1001, 0, CT_TUNNEL_RETURN),
                flow(1002, 3, CT_FORWARD),
            ],
            &ids,
        );
        assert_eq!(orphaned, 1);
        let expected_first = flow(1000, 5, CT_FORWARD);
        assert_eq!(
            carried,
            vec![expected_first, flow(1001, 0, CT_TUNNEL_RETURN)]
        );
        assert_eq!(carried[0].1.last_seen_ns, 42, "the flow's age is kept");
    }

    #[test]
    fn affinity_is_carried_under_the_new_ids() {
        let ids = FrontendIds::between([(frontend(80), 4)], [(frontend(80), 9)]);
        let entry = |service_id| {
            (
                AffinityKey {
                    service_id,
                    client_kind: 0,
                    client: 7,
                },
                AffinityValue {
                    backend: dataplane_common::BackendValue {
                        ip_be: 3,
                        node_ip_be: 0,
                        port_be: 8080u16.to_be(),
                        flags: 0,
                    },
                    _pad: 0,
                    last_seen_ns: 1,
                },
            )
        };
        let (carried, orphaned) = carried_affinity([entry(4), entry(8)], &ids);
        assert_eq!(orphaned, 1);
        assert_eq!(carried.len(), 1);
        assert_eq!(carried[0].0.service_id, 9);
        assert_eq!(carried[0].0.client, 7);
    }

    #[test]
    fn this_build_reads_older_layouts_and_not_newer_ones() {
        assert!(entries_readable(0));
        assert!(entries_readable(PIN_LAYOUT_VERSION));
        assert!(!entries_readable(PIN_LAYOUT_VERSION + 1));
    }
}
