//! The pinned maps shared with the agent (pinned by name, so an agent restart
//! or upgrade finds the same maps and established state survives).

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use dataplane_common::{
    BACKENDS_MAX_ENTRIES, BackendKey, BackendValue, SERVICES_MAX_ENTRIES, SOCK_REV_MAX_ENTRIES,
    ServiceKey, ServiceValue, SockRevKey, SockRevValue, Stat,
};

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(SERVICES_MAX_ENTRIES, 0);

#[map]
pub static BACKENDS: HashMap<BackendKey, BackendValue> = HashMap::pinned(BACKENDS_MAX_ENTRIES, 0);

/// (socket cookie, backend) -> the frontend the socket addressed.
#[map]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(SOCK_REV_MAX_ENTRIES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}
