//! Socket-level load balancing on cgroup sock_addr hooks: east-west traffic
//! to a Service is translated once per connect(), with no per-packet NAT, so
//! the backend sees the client's own address.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use dataplane_common::{
    BackendKey, BackendValue, IPPROTO_TCP, SCOPE_ANY, ServiceKey, ServiceValue, SockRevValue, Stat,
};

use crate::maps::{BACKENDS, SERVICES, SOCK_REV, count};

/// sock_addr verdicts: 1 lets the syscall proceed, 0 fails it (with EPERM
/// unless `bpf_set_retval` chose another error).
const ALLOW: i32 = 1;
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;

pub fn translate_connect4(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: the kernel hands sock_addr programs a valid context; these
    // fields are readable for connect4.
    let (protocol, vip_be, port_be) =
        unsafe { ((*addr).protocol, (*addr).user_ip4, (*addr).user_port) };
    if protocol != u32::from(IPPROTO_TCP) {
        return ALLOW;
    }
    let key = service_key(vip_be, port_be, IPPROTO_TCP);
    // SAFETY: the value is copied out at once; a concurrent update replaces it
    // atomically.
    let Some(service) = (unsafe { SERVICES.get(key) }).copied() else {
        return ALLOW;
    };
    let Some(backend) = select_backend(&service) else {
        return refuse();
    };
    remember_frontend(ctx, &key, &backend);
    // SAFETY: user_ip4 and user_port are writable for connect4.
    unsafe {
        (*addr).user_ip4 = backend.ip_be;
        (*addr).user_port = u32::from(backend.port_be);
    }
    count(Stat::SockTranslated);
    ALLOW
}

pub fn reverse_getpeername4(ctx: &SockAddrContext) -> i32 {
    let addr = ctx.sock_addr;
    // SAFETY: the context is a valid sock_addr for this hook.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once.
    let Some(original) = (unsafe { SOCK_REV.get(cookie) }).copied() else {
        return ALLOW;
    };
    // SAFETY: user_ip4/user_port are readable and writable for getpeername4.
    unsafe {
        // Only a peer that is still the backend we chose is reversed: an
        // entry must never disguise some other peer as the Service.
        if (*addr).user_ip4 != original.backend_ip_be
            || (*addr).user_port as u16 != original.backend_port_be
        {
            return ALLOW;
        }
        (*addr).user_ip4 = original.vip_be;
        (*addr).user_port = u32::from(original.port_be);
    }
    ALLOW
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

#[inline(always)]
fn remember_frontend(ctx: &SockAddrContext, key: &ServiceKey, backend: &BackendValue) {
    // SAFETY: the context is a valid sock_addr for this hook.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = SockRevValue {
        vip_be: key.vip_be,
        backend_ip_be: backend.ip_be,
        port_be: key.port_be,
        backend_port_be: backend.port_be,
        _pad: 0,
    };
    if SOCK_REV.insert(cookie, original, 0).is_err() {
        count(Stat::SockRevUpdateFailed);
    }
}

/// Fails the connect() with ECONNREFUSED, as kube-proxy's REJECT rule makes
/// a Service without endpoints behave.
#[inline(always)]
fn refuse() -> i32 {
    // SAFETY: bpf_set_retval is allowed in cgroup sock_addr programs
    // (kernel >= 5.18).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    DENY
}
