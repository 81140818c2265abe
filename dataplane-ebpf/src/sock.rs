//! Socket-level load balancing on cgroup sock_addr hooks: east-west traffic
//! to a Service is translated once per connect() (or per unconnected UDP
//! sendmsg()), with no per-packet NAT, so the backend sees the client's own
//! address.

use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns,
        bpf_set_retval,
    },
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use dataplane_common::{
    AffinityKey, AffinityValue, BackendKey, BackendValue, IPPROTO_TCP, IPPROTO_UDP, MemberKey,
    SCOPE_ANY, SERVICE_FLAG_AFFINITY, ServiceKey, ServiceValue, SockRevKey, SockRevValue, Stat,
};

use crate::maps::{AFFINITY, BACKENDS, MEMBERS, SERVICES, SOCK_REV, count};

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// sock_addr verdicts: 1 lets the syscall proceed, 0 fails it (with EPERM
/// unless `bpf_set_retval` chose another error).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// connect4 and sendmsg4: rewrites a Service address to a backend's.
pub fn translate_to_backend4(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: the kernel hands sock_addr programs a valid context; these
    // fields are readable for connect4 and sendmsg4.
    let (protocol, vip_be, port_be) =
        unsafe { ((*addr).protocol, (*addr).user_ip4, (*addr).user_port) };
    let Some(protocol) = balanced_protocol(protocol) else {
        return ALLOW;
    };
    let key = service_key(vip_be, port_be, protocol);
    // SAFETY: the value is copied out at once; SERVICES is not preallocated,
    // so a concurrent update swaps in a new element and this one stays
    // valid until the program returns (maps.rs).
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return ALLOW;
    };
    let chosen = if service.flags & SERVICE_FLAG_AFFINITY != 0 {
        select_affine_backend(ctx, &service)
    } else {
        select_backend(&service)
    };
    let Some(backend) = chosen else {
        // Debug level: compiled in, filtered by the agent's log level.
        debug!(
            ctx,
            "refused {:i}:{} proto {}: no usable backend",
            u32::from_be(vip_be),
            u16::from_be(key.port_be),
            protocol
        );
        return refuse();
    };
    remember_frontend(ctx, &key, &backend);
    // SAFETY: user_ip4 and user_port are writable for connect4 and sendmsg4.
    unsafe {
        (*addr).user_ip4 = backend.ip_be;
        (*addr).user_port = u32::from(backend.port_be);
    }
    count(Stat::SockTranslated);
    ALLOW
}

/// recvmsg4 and getpeername4: a backend's address on a translated socket is
/// reported as the Service address it stands for.
pub fn reverse_to_frontend4(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: the context is a valid sock_addr; user_ip4/user_port are
    // readable for recvmsg4 and getpeername4.
    let (peer_ip_be, peer_port_be) = unsafe { ((*addr).user_ip4, (*addr).user_port as u16) };
    let key = SockRevKey {
        // SAFETY: the context is a valid sock_addr for this hook.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend_ip_be: peer_ip_be,
        backend_port_be: peer_port_be,
        _pad: 0,
    };
    // Only a peer this socket was translated to has an entry, so no other
    // peer can ever be disguised as a Service.
    // SAFETY: the value is copied out at once.
    let Some(original) = (unsafe { SOCK_REV.get(key) }).copied() else {
        return ALLOW;
    };
    // SAFETY: user_ip4/user_port are writable for recvmsg4 and getpeername4.
    unsafe {
        (*addr).user_ip4 = original.vip_be;
        (*addr).user_port = u32::from(original.port_be);
    }
    ALLOW
}

/// The protocols socket LB translates. SCTP sockets do not pass through
/// these hooks' translation paths in a way we rely on yet.
#[inline(always)]
fn balanced_protocol(protocol: u32) -> Option<u8> {
    if protocol == u32::from(IPPROTO_TCP) {
        Some(IPPROTO_TCP)
    } else if protocol == u32::from(IPPROTO_UDP) {
        Some(IPPROTO_UDP)
    } else {
        None
    }
}

#[inline(always)]
fn service_key(vip_be: u32, user_port: u32, protocol: u8) -> ServiceKey {
    ServiceKey {
        vip_be,
        // The port sits in the low 16 bits of user_port, in network order.
        port_be: user_port as u16,
        protocol,
        scope: SCOPE_ANY,
    }
}

/// Uniform random choice among the current generation's backends.
#[inline(always)]
fn select_backend(service: &ServiceValue) -> Option<BackendValue> {
    let backend_count = u32::from(service.backend_count);
    if backend_count == 0 {
        count(Stat::SockRefusedNoEndpoints);
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
fn select_affine_backend(ctx: &SockAddrContext, service: &ServiceValue) -> Option<BackendValue> {
    let key = AffinityKey {
        service_id: service.service_id,
        _pad: 0,
        // SAFETY: the context is a valid sock_addr for this hook.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
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
        _ => select_backend(service)?,
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

#[inline(always)]
fn remember_frontend(ctx: &SockAddrContext, key: &ServiceKey, backend: &BackendValue) {
    let reverse_key = SockRevKey {
        // SAFETY: the context is a valid sock_addr for this hook.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        backend_ip_be: backend.ip_be,
        backend_port_be: backend.port_be,
        _pad: 0,
    };
    let original = SockRevValue {
        vip_be: key.vip_be,
        port_be: key.port_be,
        _pad: 0,
    };
    if SOCK_REV.insert(reverse_key, original, 0).is_err() {
        count(Stat::SockRevUpdateFailed);
    }
}

/// Fails the connect() or sendmsg() with ECONNREFUSED, as kube-proxy's
/// REJECT rule makes a Service without endpoints behave.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: bpf_set_retval is allowed in cgroup sock_addr programs
    // (kernel >= 5.18).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}
