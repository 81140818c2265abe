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
//! 3. [`retire`]: empty the old SERVICES, so the old programs stop taking
//!    new flows (they pass them, untouched, to the new programs) while
//!    they keep translating the flows they track; carry again (the flows
//!    they created meanwhile); detach them; carry a last time (what they
//!    updated until the detach); remove the old pins.
//!
//! From step 3 on, every new flow is the new programs' own, so by the
//! detach the new maps hold every flow: no flow ever meets a program that
//! does not know it. A carried entry never overwrites a different flow the
//! new programs track; for the same flow, the later `last_seen_ns` and
//! the FIN/RST flags seen by either side are kept.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, MapData, MapError};
use dataplane_common::{
    AffinityKey, AffinityValue, CT_FLAG_FIN_SEEN, CT_FLAG_RST_SEEN, CtKey, CtValue,
    PIN_LAYOUT_VERSION, ServiceKey, ServiceValue, SockRevKey, SockRevValue, map_names,
};

use super::{
    maps::open_pinned,
    pins::{self, PinLayout},
    ports,
};

/// The frontend id of carried flows whose frontend the new layout does not
/// have (a Service deleted while no agent ran): they keep their
/// translation until they end, as after a sync that removes a Service;
/// the sweep treats their UDP flows as stale.
pub const ORPHANED_SERVICE_ID: u32 = u32::MAX;

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

/// The flows to carry over, with their frontend ids translated; flows of
/// frontends the new layout does not have get [`ORPHANED_SERVICE_ID`].
/// Returns how many those are.
pub fn carried_flows(
    flows: impl IntoIterator<Item = (CtKey, CtValue)>,
    ids: &FrontendIds,
) -> (Vec<(CtKey, CtValue)>, usize) {
    let mut orphaned = 0;
    let carried = flows
        .into_iter()
        .map(|(key, value)| {
            let service_id = ids.translate(value.service_id).unwrap_or_else(|| {
                orphaned += 1;
                ORPHANED_SERVICE_ID
            });
            (
                key,
                CtValue {
                    service_id,
                    ..value
                },
            )
        })
        .collect();
    (carried, orphaned)
}

/// What the new map should hold for a flow both layouts track: the same
/// flow (same translation) keeps the later activity and every FIN/RST
/// either side saw; a different flow on the same key is the new programs'
/// and stays. None: nothing to write.
pub fn merged_flow(old: &CtValue, new: &CtValue) -> Option<CtValue> {
    let same_flow = (
        old.kind,
        old.nat_ip_be,
        old.nat_port_be,
        old.snat_ip_be,
        old.snat_port_be,
        old.tunnel_ip_be,
    ) == (
        new.kind,
        new.nat_ip_be,
        new.nat_port_be,
        new.snat_ip_be,
        new.snat_port_be,
        new.tunnel_ip_be,
    );
    if !same_flow {
        return None;
    }
    let closing = (old.flags | new.flags) & (CT_FLAG_FIN_SEEN | CT_FLAG_RST_SEEN);
    let merged = CtValue {
        last_seen_ns: old.last_seen_ns.max(new.last_seen_ns),
        flags: new.flags | closing,
        ..*new
    };
    (merged != *new).then_some(merged)
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

/// What carry passes wrote into the new layout's maps.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CarryReport {
    /// Flow entries inserted.
    pub flows: usize,
    /// Flow entries the new programs already had, brought up to date.
    pub flows_merged: usize,
    pub affinity: usize,
    pub socket_reverse: usize,
    /// Flows of frontends the new layout does not have (carried under
    /// [`ORPHANED_SERVICE_ID`]) and affinity entries of them (dropped).
    pub orphaned: usize,
    /// Entries that could not be written (a full map): their flows are
    /// the new programs' to re-balance.
    pub failed: usize,
    /// Maps the old layout does not have (older releases had fewer).
    pub missing_maps: usize,
}

impl std::ops::AddAssign for CarryReport {
    fn add_assign(&mut self, other: Self) {
        self.flows += other.flows;
        self.flows_merged += other.flows_merged;
        self.affinity += other.affinity;
        self.socket_reverse += other.socket_reverse;
        self.orphaned += other.orphaned;
        self.failed += other.failed;
        self.missing_maps += other.missing_maps;
    }
}

/// One or more carry passes: the report, and the ports the carried flows
/// use (PORTS must have them, or the new programs skip their packets).
#[derive(Debug, Default)]
pub struct Carried {
    pub report: CarryReport,
    pub flow_ports: ports::Bitmap,
}

impl Carried {
    fn add(&mut self, other: Carried) {
        self.report += other.report;
        self.flow_ports = self.flow_ports.union(&other.flow_ports);
    }
}

/// One carry pass from `old` into `new` (both must be readable by this
/// build: [`entries_readable`]).
pub fn carry_state(old: &PinLayout, new: &PinLayout) -> Result<Carried> {
    let mut report = CarryReport::default();
    let old_services = entries_or_none::<ServiceKey, ServiceValue>(old, map_names::SERVICES)?;
    let ids = FrontendIds::between(
        frontend_ids(old_services.unwrap_or_default()),
        frontend_ids(entries(new, map_names::SERVICES)?),
    );

    let old_flows = entries_or_none::<CtKey, CtValue>(old, map_names::CONNTRACK)?;
    report.missing_maps += usize::from(old_flows.is_none());
    let (flows, orphaned_flows) = carried_flows(old_flows.unwrap_or_default(), &ids);
    let flow_ports = ports::of_flows(&flows.iter().copied().collect());
    carry_flows(new, flows, &mut report)?;

    let old_affinity = entries_or_none::<AffinityKey, AffinityValue>(old, map_names::AFFINITY)?;
    report.missing_maps += usize::from(old_affinity.is_none());
    let (affinity, orphaned_affinity) = carried_affinity(old_affinity.unwrap_or_default(), &ids);
    let (inserted, failed) =
        insert_absent::<AffinityKey, AffinityValue>(new, map_names::AFFINITY, affinity)?;
    report.affinity = inserted;
    report.failed += failed;

    let old_socket_reverse = entries_or_none::<SockRevKey, SockRevValue>(old, map_names::SOCK_REV)?;
    report.missing_maps += usize::from(old_socket_reverse.is_none());
    let (inserted, failed) = insert_absent::<SockRevKey, SockRevValue>(
        new,
        map_names::SOCK_REV,
        old_socket_reverse.unwrap_or_default(),
    )?;
    report.socket_reverse = inserted;
    report.failed += failed;
    report.orphaned = orphaned_flows + orphaned_affinity;
    Ok(Carried { report, flow_ports })
}

/// Inserts the flows the new CONNTRACK lacks and brings up to date those
/// it tracks too ([`merged_flow`]).
fn carry_flows(
    layout: &PinLayout,
    flows: Vec<(CtKey, CtValue)>,
    report: &mut CarryReport,
) -> Result<()> {
    let mut map: HashMap<MapData, CtKey, CtValue> = open_pinned(layout, map_names::CONNTRACK)?;
    for (key, old) in flows {
        let (value, flags) = match map.get(&key, 0) {
            Ok(new) => match merged_flow(&old, &new) {
                Some(merged) => (merged, BPF_EXIST),
                None => continue,
            },
            Err(MapError::KeyNotFound) => (old, BPF_NOEXIST),
            Err(error) => {
                return Err(error).context("reading the new CONNTRACK");
            }
        };
        match map.insert(key, value, flags) {
            Ok(()) if flags == BPF_EXIST => report.flows_merged += 1,
            Ok(()) => report.flows += 1,
            // The new programs created or ended the entry meanwhile:
            // theirs stands.
            Err(MapError::SyscallError(error))
                if matches!(
                    error.io_error.raw_os_error(),
                    Some(libc::EEXIST | libc::ENOENT)
                ) => {}
            Err(_) => report.failed += 1,
        }
    }
    Ok(())
}

/// `BPF_NOEXIST`: insert only if the key is absent; `BPF_EXIST`: update
/// only if it is present.
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

/// Makes the old programs stop taking new flows: with no frontend in
/// their SERVICES they pass every new connection on, untouched, to the
/// programs attached after them, and keep translating the flows their
/// CONNTRACK tracks. Returns how many frontends were removed.
pub fn stop_new_flows(old: &PinLayout) -> Result<usize> {
    let Some(services) = entries_or_none::<ServiceKey, ServiceValue>(old, map_names::SERVICES)?
    else {
        return Ok(0);
    };
    let mut map: HashMap<MapData, ServiceKey, ServiceValue> =
        open_pinned(old, map_names::SERVICES)?;
    let mut removed = 0;
    for (key, _) in services {
        match map.remove(&key) {
            Ok(()) => removed += 1,
            Err(MapError::KeyNotFound) => {}
            Err(error) => {
                return Err(error).context("emptying the old SERVICES");
            }
        }
    }
    Ok(removed)
}

/// Hands over from `old` to `new` once the new programs are attached:
/// stops the old programs' new flows and carries state (when `old` is
/// readable), detaches the old programs, carries once more and removes the
/// old pins.
pub fn retire(old: &PinLayout, new: &PinLayout) -> Result<Carried> {
    let readable = entries_readable(old.version);
    let mut carried = Carried::default();
    if readable {
        stop_new_flows(old).context("stopping the old programs' new flows")?;
        carried.add(carry_state(old, new).context("carrying state before the detach")?);
    }
    pins::remove_links(old).with_context(|| {
        format!(
            "detaching the programs of pin layout v{} (in {})",
            old.version,
            old.dir.display()
        )
    })?;
    if readable {
        carried.add(carry_state(old, new).context("carrying state after the detach")?);
    }
    pins::remove_maps(old).with_context(|| {
        format!(
            "removing the maps of pin layout v{} (in {})",
            old.version,
            old.dir.display()
        )
    })?;
    Ok(carried)
}

fn frontend_ids(services: Vec<(ServiceKey, ServiceValue)>) -> Vec<(ServiceKey, u32)> {
    services
        .into_iter()
        .map(|(key, value)| (key, value.service_id))
        .collect()
}

/// Every entry of a pinned hash map (entries that vanish during the walk
/// are skipped: the programs change these maps all the time).
fn entries<K: aya::Pod, V: aya::Pod>(layout: &PinLayout, name: &str) -> Result<Vec<(K, V)>> {
    let map: HashMap<MapData, K, V> = open_pinned(layout, name)?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// [`entries`], or None when the layout has no such map (releases before
/// the map existed).
fn entries_or_none<K: aya::Pod, V: aya::Pod>(
    layout: &PinLayout,
    name: &str,
) -> Result<Option<Vec<(K, V)>>> {
    if !layout.map(name).exists() {
        return Ok(None);
    }
    entries(layout, name).map(Some)
}

/// Inserts the entries `map` does not hold yet; returns how many were
/// inserted and how many could not be (a full map).
fn insert_absent<K: aya::Pod, V: aya::Pod>(
    layout: &PinLayout,
    name: &str,
    entries: Vec<(K, V)>,
) -> Result<(usize, usize)> {
    let mut map: HashMap<MapData, K, V> = open_pinned(layout, name)?;
    let (mut inserted, mut failed) = (0, 0);
    for (key, value) in entries {
        match map.insert(key, value, BPF_NOEXIST) {
            Ok(()) => inserted += 1,
            Err(MapError::SyscallError(error))
                if error.io_error.raw_os_error() == Some(libc::EEXIST) => {}
            Err(_) => failed += 1,
        }
    }
    Ok((inserted, failed))
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
    fn flows_are_carried_with_the_new_ids_and_those_of_gone_frontends_as_orphans() {
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
        assert_eq!(
            carried,
            vec![
                flow(1000, 5, CT_FORWARD),
                flow(1001, 0, CT_TUNNEL_RETURN),
                flow(1002, ORPHANED_SERVICE_ID, CT_FORWARD),
            ]
        );
        assert_eq!(carried[0].1.last_seen_ns, 42, "the flow's age is kept");
    }

    #[test]
    fn the_same_flow_keeps_the_later_activity_and_every_close_and_another_flow_stays() {
        let (_, old) = flow(1000, 1, CT_FORWARD);
        let newer = CtValue {
            last_seen_ns: 50,
            service_id: 5,
            ..old
        };
        assert_eq!(
            merged_flow(&old, &newer),
            None,
            "nothing to bring up to date"
        );
        let older = CtValue {
            last_seen_ns: 10,
            service_id: 5,
            ..old
        };
        let closing_old = CtValue {
            flags: CT_FLAG_FIN_SEEN,
            ..old
        };
        let merged = merged_flow(&closing_old, &older).unwrap();
        assert_eq!(merged.last_seen_ns, 42);
        assert_eq!(merged.flags, CT_FLAG_FIN_SEEN);
        assert_eq!(merged.service_id, 5, "the new layout's id");
        let other_backend = CtValue {
            nat_ip_be: 99,
            last_seen_ns: 1,
            ..old
        };
        assert_eq!(merged_flow(&old, &other_backend), None, "another flow");
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
