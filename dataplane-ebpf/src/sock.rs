//! Socket-level load balancing on cgroup sock_addr hooks: east-west traffic
//! to a Service is translated once per connect() (or per unconnected UDP
//! sendmsg()), with no per-packet NAT, so the backend sees the client's own
//! address.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use dataplane_common::{
    AFFINITY_CLIENT_NETNS, BackendValue, IPPROTO_TCP, IPPROTO_UDP, SCOPE_CLUSTER,
    SCOPE_NODEPORT_LOCAL, ServiceKey, SockRevKey, SockRevValue, Stat, node_ip_serves_node_ports,
};

use crate::{
    lb,
    maps::{NODE_IPS, SOCK_REV, count},
};

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
    let Some((key, service)) = find_frontend(vip_be, port_be, protocol) else {
        return ALLOW;
    };
    // SAFETY: the context is a valid sock_addr for this hook.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(backend) = lb::select(&service, AFFINITY_CLIENT_NETNS, netns) else {
        count(Stat::SockRefusedNoEndpoints);
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

/// The frontend a socket addresses: a Service IP, or one of this node's
/// own addresses with a nodePort (kube-proxy serves nodePorts to local
/// clients too, so a pod reaching its own Service through a node IP
/// works). Returns the key the client addressed and the entry to use.
#[inline(always)]
fn find_frontend(
    vip_be: u32,
    user_port: u32,
    protocol: u8,
) -> Option<(ServiceKey, dataplane_common::ServiceValue)> {
    let key = ServiceKey {
        vip_be,
        // The port sits in the low 16 bits of user_port, in network order.
        port_be: user_port as u16,
        protocol,
        scope: SCOPE_CLUSTER,
    };
    if let Some(service) = lb::frontend(&key) {
        return Some((key, service));
    }
    // SAFETY: the value is copied out at once.
    let use_of = *unsafe { NODE_IPS.get(vip_be) }?;
    if !node_ip_serves_node_ports(use_of) {
        return None;
    }
    let node_port = ServiceKey {
        vip_be: 0,
        scope: SCOPE_NODEPORT_LOCAL,
        ..key
    };
    Some((key, lb::frontend(&node_port)?))
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
