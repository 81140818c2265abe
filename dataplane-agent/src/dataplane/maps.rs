//! Handles on the pinned maps: the writer the agent syncs through, the
//! node-interface configuration, and readers for the CLI, the sweep and
//! the metrics.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::{AsFd as _, BorrowedFd},
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    sys::SyscallError,
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
    /// Slot and member writes not made yet. A frontend writes a whole
    /// generation of slots and members before it flips its SERVICES entry,
    /// and nothing reads them before the flip: they go in one syscall per
    /// map instead of one per entry. Any other write sends them first, so
    /// the order of effects is the order of calls.
    pending: PendingWrites,
}

#[derive(Default)]
struct PendingWrites {
    /// Whether the kernel takes batch updates on BACKENDS and MEMBERS.
    /// Off while the crash failpoint is armed, which counts single writes.
    enabled: bool,
    backends: Vec<(BackendKey, BackendValue)>,
    members: Vec<(MemberKey, u32)>,
}

/// Entries per batch syscall.
const WRITE_BATCH: usize = 4096;

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
        self.flush()?;
        self.counted(|maps| maps.services.insert(key, value, 0))
    }
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), MapError> {
        self.flush()?;
        self.counted(|maps| ignore_missing(maps.services.remove(key)))
    }
    fn put_backend(&mut self, key: &BackendKey, value: &BackendValue) -> Result<(), MapError> {
        if self.pending.enabled {
            self.pending.backends.push((*key, *value));
            return Ok(());
        }
        self.counted(|maps| maps.backends.insert(key, value, 0))
    }
    fn delete_backend(&mut self, key: &BackendKey) -> Result<(), MapError> {
        self.flush()?;
        self.counted(|maps| ignore_missing(maps.backends.remove(key)))
    }
    fn put_member(&mut self, key: &MemberKey, index: u32) -> Result<(), MapError> {
        if self.pending.enabled {
            self.pending.members.push((*key, index));
            return Ok(());
        }
        self.counted(|maps| maps.members.insert(key, index, 0))
    }
    fn delete_member(&mut self, key: &MemberKey) -> Result<(), MapError> {
        self.flush()?;
        self.counted(|maps| ignore_missing(maps.members.remove(key)))
    }
    fn flush(&mut self) -> Result<(), MapError> {
        // Slots before members: a member never names a missing slot.
        let backends = std::mem::take(&mut self.pending.backends);
        let members = std::mem::take(&mut self.pending.members);
        write_batch(self.backends.map().fd().as_fd(), &backends)?;
        write_batch(self.members.map().fd().as_fd(), &members)
    }
    fn put_source_range(&mut self, service_id: u32, range: &SourceRange) -> Result<(), MapError> {
        self.flush()?;
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
        self.flush()?;
        self.counted(|maps| {
            ignore_missing(
                maps.source_ranges
                    .remove(&source_range_key(service_id, range)),
            )
        })
    }
}

/// Writes `entries` in batches; an error says which syscall failed, as a
/// single write's would.
fn write_batch<K: Pod, V: Pod>(map_fd: BorrowedFd<'_>, entries: &[(K, V)]) -> Result<(), MapError> {
    if entries.is_empty() {
        return Ok(());
    }
    batch::update_all_checked(map_fd, entries, WRITE_BATCH).map_err(|error| {
        MapError::SyscallError(SyscallError {
            call: "bpf_map_update_batch",
            io_error: std::io::Error::from_raw_os_error(error.errno().unwrap_or(libc::EIO)),
        })
    })
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
            pending: PendingWrites::default(),
        }
        .with_batched_writes())
    }

    /// Turns batching on where the kernel has it.
    fn with_batched_writes(mut self) -> Self {
        self.pending.enabled = !self.failpoint.armed()
            && batch::updates_supported::<BackendKey, BackendValue>(
                self.backends.map().fd().as_fd(),
            )
            && batch::updates_supported::<MemberKey, u32>(self.members.map().fd().as_fd());
        self
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
            read_all(&self.backends, map_names::BACKENDS)?,
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

/// SERVICES opened a second time, so a resync can read it on a thread of
/// its own while the sync loop goes on.
pub struct ServicesReader {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// The test failpoint's delay between reading and returning.
    hold: Option<std::time::Duration>,
}

impl ServicesReader {
    pub fn open(layout: &PinLayout) -> Result<Self> {
        Ok(Self {
            services: open_pinned(layout, map_names::SERVICES)?,
            hold: super::failpoint::services_read_hold(),
        })
    }

    pub fn read(&self) -> Result<BTreeMap<ServiceKey, ServiceValue>> {
        let services = read_all(&self.services, map_names::SERVICES)?
            .into_iter()
            .collect();
        if let Some(hold) = self.hold {
            std::thread::sleep(hold);
        }
        Ok(services)
    }
}

/// CONFIG and NODE_IPS: how the node-interface programs behave, and which
/// addresses are this node's.
pub struct InterfaceMaps {
    config: Array<MapData, ConfigValue>,
    node_ips: HashMap<MapData, u32, u32>,
    tunnel_peers: HashMap<MapData, u32, u32>,
    pod_cidrs: LpmTrie<MapData, u32, u32>,
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
            pod_cidrs: typed_map(ebpf.take_map(map_names::POD_CIDRS), map_names::POD_CIDRS)?,
        })
    }

    pub fn set_config(&mut self, config: &ConfigValue) -> Result<()> {
        self.config.set(0, config, 0).context("writing CONFIG")
    }

    /// Makes NODE_IPS hold exactly this node's addresses, each with what
    /// it is used for (`NODE_IP_*` bits).
    pub fn set_node_ips(&mut self, addresses: &BTreeMap<Ipv4Addr, u32>) -> Result<()> {
        set_addresses(&mut self.node_ips, addresses, map_names::NODE_IPS)
    }

    /// NODE_IPS as the maps hold it (a previous agent's, at start).
    pub fn node_ips(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.node_ips
            .iter()
            .filter_map(Result::ok)
            .map(|(key, uses)| (ipv4_of_be(key), uses))
            .collect()
    }

    /// Makes POD_CIDRS hold exactly the cluster's pod CIDRs, each with its
    /// node's InternalIP: stale entries go first, so a full map makes room,
    /// and one failed insert does not keep the others out (the first error
    /// is returned).
    pub fn set_pod_cidrs(&mut self, cidrs: &BTreeMap<SourceRange, Ipv4Addr>) -> Result<()> {
        let key_of = |cidr: &SourceRange| LpmKey::new(u32::from(cidr.prefix_len), ipv4_be(cidr.ip));
        let wanted: BTreeSet<(u32, u32)> = cidrs
            .keys()
            .map(|cidr| (u32::from(cidr.prefix_len), ipv4_be(cidr.ip)))
            .collect();
        let stale: Vec<LpmKey<u32>> = self
            .pod_cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|key| !wanted.contains(&(key.prefix_len(), key.data())))
            .collect();
        let mut first_error = None;
        for key in stale {
            if let Err(error) = ignore_missing(self.pod_cidrs.remove(&key)) {
                first_error.get_or_insert(anyhow::Error::new(error).context(format!(
                    "removing a stale entry of {}",
                    map_names::POD_CIDRS
                )));
            }
        }
        for (cidr, node) in cidrs {
            if let Err(error) = self.pod_cidrs.insert(&key_of(cidr), ipv4_be(*node), 0) {
                first_error.get_or_insert(
                    anyhow::Error::new(error)
                        .context(format!("adding {cidr} to {}", map_names::POD_CIDRS)),
                );
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Makes TUNNEL_PEERS hold exactly the cluster's node `addresses`.
    pub fn set_tunnel_peers(&mut self, addresses: &BTreeSet<Ipv4Addr>) -> Result<()> {
        let present = addresses.iter().map(|address| (*address, 1)).collect();
        set_addresses(&mut self.tunnel_peers, &present, map_names::TUNNEL_PEERS)
    }
}

/// Makes an address map hold exactly `addresses` (new and changed ones
/// first, then the stale ones removed).
fn set_addresses(
    map: &mut HashMap<MapData, u32, u32>,
    addresses: &BTreeMap<Ipv4Addr, u32>,
    name: &str,
) -> Result<()> {
    for (address, value) in addresses {
        map.insert(ipv4_be(*address), value, 0)
            .with_context(|| format!("adding {address} to {name}"))?;
    }
    let stale: Vec<u32> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|key| !addresses.contains_key(&ipv4_of_be(*key)))
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
        pending: PendingWrites::default(),
    }
    .with_batched_writes())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// LPM tries must be created without preallocation.
    const NO_PREALLOC: u32 = 1;

    fn standalone_maps() -> KernelMaps {
        KernelMaps {
            services: HashMap::create(64, 0).expect("creating a hash map (needs CAP_BPF)"),
            backends: HashMap::create(64, 0).expect("creating a hash map"),
            members: HashMap::create(64, 0).expect("creating a hash map"),
            source_ranges: LpmTrie::create(64, NO_PREALLOC).expect("creating an LPM trie"),
            failpoint: MapWriteFailpoint::default(),
            pending: PendingWrites::default(),
        }
        .with_batched_writes()
    }

    fn slot(index: u16) -> (BackendKey, BackendValue, MemberKey) {
        let key = BackendKey {
            service_id: 7,
            generation: 0,
            index,
        };
        let value = BackendValue {
            ip_be: u32::from(Ipv4Addr::new(10, 0, 0, 1 + index as u8)).to_be(),
            node_ip_be: 0,
            port_be: 8080u16.to_be(),
            flags: 0,
        };
        let member = super::super::codec::member_key(&key, &value);
        (key, value, member)
    }

    #[test]
    fn slots_and_members_wait_for_the_next_write_of_another_kind() {
        let mut maps = standalone_maps();
        assert!(maps.pending.enabled, "this kernel has batch updates");
        let (slot0, value0, member0) = slot(0);
        let (slot1, value1, member1) = slot(1);
        maps.put_backend(&slot0, &value0).unwrap();
        maps.put_member(&member0, 0).unwrap();
        maps.put_backend(&slot1, &value1).unwrap();
        maps.put_member(&member1, 1).unwrap();
        assert!(maps.backends.get(&slot0, 0).is_err(), "held back");

        let service = ServiceKey {
            vip_be: u32::from(Ipv4Addr::new(10, 96, 0, 1)).to_be(),
            port_be: 80u16.to_be(),
            protocol: 6,
            scope: 0,
        };
        let entry = ServiceValue {
            service_id: 7,
            backend_count: 2,
            generation: 0,
            flags: 0,
            affinity_timeout_s: 0,
        };
        maps.put_service(&service, &entry).unwrap();
        // The flip found both slots and both members written.
        assert_eq!(maps.backends.get(&slot0, 0).unwrap(), value0);
        assert_eq!(maps.backends.get(&slot1, 0).unwrap(), value1);
        assert_eq!(maps.members.get(&member0, 0).unwrap(), 0);
        assert_eq!(maps.members.get(&member1, 0).unwrap(), 1);
        assert_eq!(maps.services.get(&service, 0).unwrap(), entry);

        // A delete sends what is held back first; so does flush.
        let (slot2, value2, _) = slot(2);
        maps.put_backend(&slot2, &value2).unwrap();
        maps.delete_member(&member1).unwrap();
        assert_eq!(maps.backends.get(&slot2, 0).unwrap(), value2);
        assert!(maps.members.get(&member1, 0).is_err());
        let (slot3, value3, _) = slot(3);
        maps.put_backend(&slot3, &value3).unwrap();
        maps.flush().unwrap();
        assert_eq!(maps.backends.get(&slot3, 0).unwrap(), value3);
    }

    #[test]
    fn a_failed_batch_is_the_error_of_the_write_that_sent_it() {
        let mut maps = standalone_maps();
        // More slots than BACKENDS holds: the flip is refused.
        for index in 0..65 {
            let (key, value, _) = slot(index);
            maps.put_backend(&key, &value).unwrap();
        }
        let error = maps.flush().unwrap_err();
        assert!(
            error.to_string().contains("bpf_map_update_batch"),
            "{error}"
        );
        assert!(maps.pending.backends.is_empty(), "nothing is sent twice");
    }
}
