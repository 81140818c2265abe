//! The pinned maps shared with the agent (pinned by name, so an agent restart
//! or upgrade finds the same maps and established state survives).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use dataplane_common::{
    AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, BackendKey,
    BackendValue, CONNTRACK_MAX_ENTRIES, ConfigValue, CtKey, CtValue, MemberKey,
    NODE_IPS_MAX_ENTRIES, POD_CIDRS_MAX_ENTRIES, PORTS_WORDS, SERVICES_MAX_ENTRIES,
    SOCK_REV_MAX_ENTRIES, SOURCE_RANGES_MAX_ENTRIES, ServiceKey, ServiceValue, SockRevKey,
    SockRevValue, SourceRangeKey, Stat, TUNNEL_PEERS_MAX_ENTRIES,
};

/// `BPF_F_NO_PREALLOC`: a preallocated hash map recycles the element an
/// update replaces (or a delete frees) at once, without an RCU grace period,
/// so a program that has just looked a key up could read another key's
/// value. Without preallocation, replaced elements are freed after a grace
/// period and a lookup always sees a whole, current value.
const NO_PREALLOC: u32 = 1;

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(SERVICES_MAX_ENTRIES, NO_PREALLOC);

#[map]
pub static BACKENDS: HashMap<BackendKey, BackendValue> =
    HashMap::pinned(BACKENDS_MAX_ENTRIES, NO_PREALLOC);

/// One entry per BACKENDS slot, keyed by the backend's address.
#[map]
pub static MEMBERS: HashMap<MemberKey, u32> = HashMap::pinned(BACKENDS_MAX_ENTRIES, NO_PREALLOC);

/// sessionAffinity: (frontend, client netns) -> backend and last use. LRU,
/// so idle clients age out under pressure as well as by timeout.
#[map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(AFFINITY_MAX_ENTRIES, 0);

/// (socket cookie, backend) -> the frontend the socket addressed. If one
/// unconnected UDP socket reaches two Services that share a backend
/// address, replies are reported as from the one it addressed last; the
/// same limit as any per-socket reverse NAT keyed this way.
#[map]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::pinned(SOCK_REV_MAX_ENTRIES, 0);

/// Flows on the node interfaces, one entry per direction. LRU: under a
/// flood of new flows the least recently used go first, so established
/// flows that keep sending survive; the agent also sweeps idle ones.
#[map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

/// This node's own IPv4 addresses (network order) on its interfaces, each
/// with what it is used for (`NODE_IP_*` bits): where nodePorts are served
/// and where tunnels end.
#[map]
pub static NODE_IPS: HashMap<u32, u32> = HashMap::pinned(NODE_IPS_MAX_ENTRIES, NO_PREALLOC);

/// The cluster's node addresses (network order): tunnel packets are
/// accepted only from them.
#[map]
pub static TUNNEL_PEERS: HashMap<u32, u32> = HashMap::pinned(TUNNEL_PEERS_MAX_ENTRIES, NO_PREALLOC);

#[map]
pub static CONFIG: Array<ConfigValue> = Array::pinned(1, 0);

/// Which ports can concern a Service (`dataplane_common::port_bit`).
#[map]
pub static PORTS: Array<u64> = Array::pinned(PORTS_WORDS, 0);

/// Whether the (kind, protocol, port) bit is set in PORTS.
#[inline(always)]
pub fn port_in_use(kind: u8, protocol: u8, port_be: u16) -> bool {
    let Some((word, mask)) = dataplane_common::port_bit(kind, protocol, u16::from_be(port_be))
    else {
        return false;
    };
    PORTS.get(word).is_some_and(|bits| bits & mask != 0)
}

/// loadBalancerSourceRanges: (frontend id, source prefix) -> 1. (aya adds
/// the BPF_F_NO_PREALLOC an LPM trie requires.)
#[map]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::pinned(SOURCE_RANGES_MAX_ENTRIES, 0);

/// Every node's pod CIDRs (the prefix of the address, network order) ->
/// that node's InternalIP: a pod reaching a nodePort whose backend is on
/// another node is answered through this node (see `tc::new_flow`).
#[map]
pub static POD_CIDRS: LpmTrie<u32, u32> = LpmTrie::pinned(POD_CIDRS_MAX_ENTRIES, 0);

#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(Stat::COUNT, 0);

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(counter) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}
