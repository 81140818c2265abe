//! Backend selection, shared by socket LB and the node-interface programs:
//! uniform random over the frontend's current generation, or the client's
//! remembered backend under sessionAffinity.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use dataplane_common::{
    AffinityKey, AffinityValue, BackendKey, BackendValue, MemberKey, SERVICE_FLAG_AFFINITY,
    ServiceKey, ServiceValue, Stat,
};

use crate::maps::{AFFINITY, BACKENDS, MEMBERS, SERVICES, count};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The SERVICES entry of `key`, copied out.
#[inline(always)]
pub fn frontend(key: &ServiceKey) -> Option<ServiceValue> {
    // SAFETY: the value is copied out at once; SERVICES is not preallocated,
    // so a concurrent update swaps in a new element and this one stays
    // valid until the program returns (maps.rs).
    unsafe { SERVICES.get(key) }.copied()
}

/// A backend for a new connection of `client` (see [`AffinityKey`]), or
/// `None` when the frontend has no usable backend.
#[inline(always)]
pub fn select(service: &ServiceValue, client_kind: u32, client: u64) -> Option<BackendValue> {
    if service.flags & SERVICE_FLAG_AFFINITY != 0 {
        select_affine(service, client_kind, client)
    } else {
        select_uniform(service)
    }
}

/// Uniform random choice among the current generation's backends.
#[inline(always)]
fn select_uniform(service: &ServiceValue) -> Option<BackendValue> {
    let backend_count = u32::from(service.backend_count);
    if backend_count == 0 {
        return None;
    }
    // SAFETY: helper without preconditions.
    let index = unsafe { bpf_get_prandom_u32() } % backend_count;
    let key = BackendKey {
        service_id: service.service_id,
        generation: service.generation,
        index: index as u16,
    };
    // SAFETY: the value is copied out at once.
    match unsafe { BACKENDS.get(key) } {
        Some(backend) => Some(*backend),
        None => {
            count(Stat::SockBackendMissing);
            None
        }
    }
}

/// sessionAffinity ClientIP: the client's previous backend if it used it
/// within the timeout and it is still in the current generation; otherwise
/// a fresh uniform choice, remembered. Every new connection refreshes the
/// timestamp, as kube-proxy's `recent --set` on each new connection does.
#[inline(always)]
fn select_affine(service: &ServiceValue, client_kind: u32, client: u64) -> Option<BackendValue> {
    let key = AffinityKey {
        service_id: service.service_id,
        client_kind,
        client,
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout_ns = u64::from(service.affinity_timeout_s) * NANOS_PER_SECOND;
    // SAFETY: the value is copied out at once.
    let remembered = unsafe { AFFINITY.get(key) }.copied();
    let backend = match remembered {
        Some(previous)
            if now.wrapping_sub(previous.last_seen_ns) <= timeout_ns
                && is_current_member(service, &previous) =>
        {
            count(Stat::SockAffinityHit);
            previous.backend
        }
        _ => select_uniform(service)?,
    };
    let refreshed = AffinityValue {
        backend,
        _pad: 0,
        last_seen_ns: now,
    };
    // A full LRU evicts its oldest entry; an error here only costs affinity.
    let _ = AFFINITY.insert(key, refreshed, 0);
    Some(backend)
}

#[inline(always)]
fn is_current_member(service: &ServiceValue, previous: &AffinityValue) -> bool {
    let member = MemberKey {
        service_id: service.service_id,
        generation: service.generation,
        port_be: previous.backend.port_be,
        ip_be: previous.backend.ip_be,
    };
    // SAFETY: presence check only.
    unsafe { MEMBERS.get(member) }.is_some()
}
