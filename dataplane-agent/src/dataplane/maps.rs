//! Handles on the pinned maps: the writer the agent syncs through, the
//! node-interface configuration, and readers for the CLI, the sweep and
//! the metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::AsFd as _,
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use dataplane_common::{
    AffinityKey, AffinityValue, BackendKey, BackendValue, ConfigValue, CtKey, CtValue, MemberKey,
    ServiceKey, ServiceValue, SourceRangeKey, Stat, map_names,
};

use super::{
    batch,
    codec::{ipv4_be, ipv4_of_be},
    failpoint::MapWriteFailpoint,
    pins::PinLayout,
    state::{MapStore, PinnedState},
};
use crate::model::SourceRange;

pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, BackendKey, BackendValue>,
    members: HashMap<MapData, MemberKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    failpoint: MapWriteFailpoint,
}

/// The SOURCE_RANGES key: all 32 bits of the id, then the prefix.
fn source_range_key(service_id: u32, range: &SourceRange) -> LpmKey<SourceRangeKey> {
    LpmKey::new(
        32 + u32::from(range.prefix_len),
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            source_be: ipv4_be(range.ip),
        },
    )
}

impl MapStore for KernelMaps {
    type Error = MapError;
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue) -> Result<(), MapError> {
        self.counted(|maps| maps.services.insert(key, value, 0))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.counted(|maps| ignore_missing(maps.services.remove(key)))
    }
    fn put_backend(&mut self, key: &BackendKey, value: &BackendValue) -> Result<(), MapError> {
        self.counted(|maps| maps.backends.insert(key, value, 0))
    }
    fn delete_backend(&mut self, key: &BackendKey) -> Result<(), MapError> {
        self.counted(|maps| ignore_missing(maps.backends.remove(key)))
    }
    fn put_member(&mut self, key: &MemberKey, index: u32) -> Result<(), MapError> {
        self.counted(|maps| maps.members.insert(key, index, 0))
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), MapError> {
        self.counted(|maps| ignore_missing(maps.members.remove(key)))
    }
    fn put_source_range(&mut self, service_id: u32, range: &SourceRange) -> Result<(), MapError> {
        self.counted(|maps| {
            maps.source_ranges
                .insert(&source_range_key(service_id, range), 1, 0)
        })
    }
    fn delete_source_range(
        &mut self,
        service_id: u32,
        range: &SourceRange,
    ) -> Result<(), MapError> {
        self.counted(|maps| {
            ignore_missing(
                maps.source_ranges
                    .remove(&source_range_key(service_id, range)),
            )
        })
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

impl KernelMaps {
    /// The maps of a freshly loaded object (the agent's own writer).
    pub(super) fn take_from(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            services: typed_map(ebpf.take_map(map_names::SERVICES), map_names::SERVICES)?,
            backends: typed_map(ebpf.take_map(map_names::BACKENDS), map_names::BACKENDS)?,
            members: typed_map(ebpf.take_map(map_names::MEMBERS), map_names::MEMBERS)?,
            source_ranges: typed_map(
                ebpf.take_map(map_names::SOURCE_RANGES),
                map_names::SOURCE_RANGES,
            )?,
            failpoint: MapWriteFailpoint::from_env(),
        })
    }

    /// One map write, seen by the (test-only) failpoint.
    fn counted<T>(&mut self, write: impl FnOnce(&mut Self) -> T) -> T {
        let result = write(self);
        self.failpoint.wrote();
        result
    }

    /// Reads both maps completely: what a previous agent left is the
    /// starting point, so ids stay stable and unchanged Services are not
    /// rewritten.
    /// SERVICES alone: what a resync compares with the mirror.
    pub fn read_services(&self) -> Result<BTreeMap<ServiceKey, ServiceValue>> {
        Ok(read_all(&self.services, map_names::SERVICES)?
            .into_iter()
            .collect())
    }

    pub fn read(&self) -> Result<PinnedState> {
        let mut source_ranges = BTreeSet::new();
        for key in self.source_ranges.keys() {
            let key = key.context("reading SOURCE_RANGES")?;
            let data = key.data();
            source_ranges.insert((
                u32::from_be(data.service_id_be),
                SourceRange {
                    ip: ipv4_of_be(data.source_be),
                    prefix_len: key.prefix_len().saturating_sub(32) as u8,
                },
            ));
        }
        Ok(PinnedState::from_maps(
            read_all(&self.services, map_names::SERVICES)?,
            read_all(&self.backends, map_names::BACKENDS)?
                .into_iter()
                .collect(),
            read_all(&self.members, map_names::MEMBERS)?,
            source_ranges,
        ))
    }
}

/// Every entry of a hash map: a few thousand per syscall where the kernel
/// has batch lookups (a resync at 100,000 Services reads two million
/// entries), one by one where it has not.
fn read_all<K: Pod, V: Pod>(map: &HashMap<MapData, K, V>, name: &str) -> Result<Vec<(K, V)>> {
    match batch::lookup_all::<K, V>(map.map().fd().as_fd(), 4096) {
        Ok(entries) => Ok(entries),
        Err(error) if error.needs_fallback() => map
            .iter()
            .map(|entry| entry.with_context(|| format!("reading {name}")))
            .collect(),
        Err(error) => Err(error).with_context(|| format!("reading {name}")),
    }
}

/// CONFIG and NODE_IPS: how the node-interface programs behave, and which
/// addresses are this node's.
pub struct InterfaceMaps {
    config: Array<MapData, ConfigValue>,
    node_ips: HashMap<MapData, u32, u32>,
    tunnel_peers: HashMap<MapData, u32, u32>,
}

impl InterfaceMaps {
    pub(super) fn take_from(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            config: typed_map(ebpf.take_map(map_names::CONFIG), map_names::CONFIG)?,
            node_ips: typed_map(ebpf.take_map(map_names::NODE_IPS), map_names::NODE_IPS)?,
            tunnel_peers: typed_map(
                ebpf.take_map(map_names::TUNNEL_PEERS),
                map_names::TUNNEL_PEERS,
            )?,
        })
    }

    pub fn set_config(&mut self, config: &ConfigValue) -> Result<()> {
        self.config.set(0, config, 0).context("writing CONFIG")
    }

    /// Makes NODE_IPS hold exactly this node's `addresses`.
    pub fn set_node_ips(&mut self, addresses: &BTreeSet<Ipv4Addr>) -> Result<()> {
        set_addresses(&mut self.node_ips, addresses, map_names::NODE_IPS)
    }

    /// Makes TUNNEL_PEERS hold exactly the cluster's node `addresses`.
    pub fn set_tunnel_peers(&mut self, addresses: &BTreeSet<Ipv4Addr>) -> Result<()> {
        set_addresses(&mut self.tunnel_peers, addresses, map_names::TUNNEL_PEERS)
    }
}

/// Makes an address set map hold exactly `addresses` (new ones first, then
/// the stale ones removed).
fn set_addresses(
    map: &mut HashMap<MapData, u32, u32>,
    addresses: &BTreeSet<Ipv4Addr>,
    name: &str,
) -> Result<()> {
    for address in addresses {
        map.insert(ipv4_be(*address), 1, 0)
            .with_context(|| format!("adding {address} to {name}"))?;
    }
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !addresses.contains(&ipv4_of_be(*key)))
        .collect();
    for key in stale {
        ignore_missing(map.remove(&key))
            .with_context(|| format!("removing {} from {name}", ipv4_of_be(key)))?;
    }
    Ok(())
}

fn typed_map<M>(map: Option<Map>, name: &str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    map.with_context(|| format!("map {name} missing from the object"))?
        .try_into()
        .with_context(|| format!("map {name} has an unexpected type"))
}

/// Opens a pinned map by name, for readers such as `dump`.
pub fn open_pinned<M>(layout: &PinLayout, name: &str) -> Result<M>
where
    M: TryFrom<Map, Error = MapError>,
{
    let path = layout.map(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {}: is the agent running with this --bpffs-dir?",
            path.display()
        )
    })?;
    let map = Map::from_map_data(data)
        .with_context(|| format!("{} is not a map this agent can read", path.display()))?;
    typed_map(Some(map), name)
}

pub fn open_pinned_maps(layout: &PinLayout) -> Result<KernelMaps> {
    Ok(KernelMaps {
        services: open_pinned(layout, map_names::SERVICES)?,
        backends: open_pinned(layout, map_names::BACKENDS)?,
        members: open_pinned(layout, map_names::MEMBERS)?,
        source_ranges: open_pinned(layout, map_names::SOURCE_RANGES)?,
        failpoint: MapWriteFailpoint::default(),
    })
}

/// Sums the per-CPU STATS counters.
pub fn read_stats(layout: &PinLayout) -> Result<Vec<(Stat, u64)>> {
    let stats: PerCpuArray<MapData, u64> = open_pinned(layout, map_names::STATS)?;
    Stat::ALL
        .iter()
        .map(|stat| {
            let values = stats
                .get(&(*stat as u32), 0)
                .with_context(|| format!("reading stat {}", stat.name()))?;
            Ok((*stat, values.iter().sum()))
        })
        .collect()
}

/// Adds `expired` to the agent-written ConntrackExpired counter (on the
/// first CPU's slot: the programs never write that slot, so there is no
/// race with them).
pub fn add_conntrack_expired(layout: &PinLayout, expired: u64) -> Result<()> {
    if expired == 0 {
        return Ok(());
    }
    let mut stats: PerCpuArray<MapData, u64> = open_pinned(layout, map_names::STATS)?;
    let index = Stat::ConntrackExpired as u32;
    let mut values: Vec<u64> = stats
        .get(&index, 0)
        .context("reading the ConntrackExpired counter")?
        .iter()
        .copied()
        .collect();
    if let Some(first) = values.first_mut() {
        *first += expired;
    }
    let values = aya::maps::PerCpuValues::try_from(values)
        .context("building the ConntrackExpired values")?;
    stats
        .set(index, values, 0)
        .context("writing the ConntrackExpired counter")
}

/// The whole of SERVICES, BACKENDS, MEMBERS and SOURCE_RANGES.
pub fn read_pinned_state(layout: &PinLayout) -> Result<PinnedState> {
    open_pinned_maps(layout)?.read()
}

/// The sessionAffinity entries.
pub fn read_affinity(layout: &PinLayout) -> Result<Vec<(AffinityKey, AffinityValue)>> {
    let map: HashMap<MapData, AffinityKey, AffinityValue> =
        open_pinned(layout, map_names::AFFINITY)?;
    map.iter()
        .map(|entry| entry.context("reading AFFINITY"))
        .collect()
}

/// The conntrack entries (entries that vanish while the walk runs are
/// skipped: the programs and the sweep change the map all the time).
pub fn read_conntrack(layout: &PinLayout) -> Result<Vec<(CtKey, CtValue)>> {
    let map: HashMap<MapData, CtKey, CtValue> = open_pinned(layout, map_names::CONNTRACK)?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}
