//! BPF entry points. Each hook is a thin wrapper around the module that owns
//! its concern.
#![no_std]
#![no_main]

mod conntrack;
mod csum;
mod icmp;
mod lb;
mod maps;
mod mss;
mod nat;
mod packet;
mod reject;
mod route;
mod sock;
mod tc;
mod tunnel;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};

/// cgroup `connect4`: a TCP or UDP connect() to a Service frontend is
/// redirected to one of its backends before the first packet exists.
#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::translate_to_backend4(&ctx)
}

/// cgroup `sendmsg4`: the same for each datagram of an unconnected UDP
/// socket (`sendto()` a Service).
#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::translate_to_backend4(&ctx)
}

/// cgroup `recvmsg4`: a UDP reply from a backend appears to come from the
/// Service address, as a DNS client expects.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse_to_frontend4(&ctx)
}

/// cgroup `getpeername4`: a translated socket reports the Service address
/// as its peer, as it would through kube-proxy's DNAT.
#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse_to_frontend4(&ctx)
}

/// TC ingress on a node interface: external traffic to Service frontends,
/// tunnelled flows from other nodes, ICMP errors about translated flows.
#[classifier]
pub fn tc_ingress(ctx: TcContext) -> i32 {
    tc::ingress(&ctx)
}

/// TC egress on a node interface: replies of translated flows.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    tc::egress(&ctx)
}

/// Does nothing: never attached, the floor of the program benchmarks
/// (BPF_PROG_TEST_RUN cost of a TC program that only returns).
#[classifier]
pub fn tc_noop(_ctx: TcContext) -> i32 {
    aya_ebpf::bindings::TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
