//! Sending a rewritten packet on its way ourselves: the stack must not see
//! it (a reply whose source is now this node's own address would be
//! dropped as a martian if it were forwarded through the stack).

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, bpf_fib_lookup,
        bpf_redir_neigh,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh},
    programs::TcContext,
};
use dataplane_common::Stat;

use crate::{maps::count, packet::ETH_P_IP_BE};

const AF_INET: u8 = 2;

/// Routes the IPv4 packet (`src_be` -> `dst_be`) through the FIB, fills in
/// the Ethernet addresses and redirects it out of the chosen interface;
/// without a neighbour entry yet, the kernel resolves it
/// (`bpf_redirect_neigh`). Returns the TC verdict.
#[inline(always)]
pub fn forward(ctx: &TcContext, src_be: u32, dst_be: u32) -> i32 {
    // SAFETY: an all-zero bpf_fib_lookup is a valid request skeleton.
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.__bindgen_anon_3.ipv4_src = src_be;
    params.__bindgen_anon_4.ipv4_dst = dst_be;
    // SAFETY: the context is a valid skb.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: params is a valid, writable bpf_fib_lookup of the size given.
    let result = unsafe {
        fib_lookup(
            ctx.as_ptr(),
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    } as u32;
    if result == BPF_FIB_LKUP_RET_SUCCESS {
        let mut macs = [0u8; 14];
        macs[..6].copy_from_slice(&params.dmac);
        macs[6..12].copy_from_slice(&params.smac);
        macs[12..].copy_from_slice(&ETH_P_IP_BE.to_ne_bytes());
        if ctx.store(0, &macs, 0).is_err() {
            count(Stat::ExtDropDatapathError);
            return TC_ACT_SHOT;
        }
        // SAFETY: helper without preconditions.
        return unsafe { bpf_redirect(params.ifindex, 0) } as i32;
    }
    if result == BPF_FIB_LKUP_RET_NO_NEIGH {
        // SAFETY: an all-zero bpf_redir_neigh is valid; we set the family
        // and the next hop the FIB chose.
        let mut neighbour: bpf_redir_neigh = unsafe { core::mem::zeroed() };
        neighbour.nh_family = u32::from(AF_INET);
        // SAFETY: union field of the family just set.
        neighbour.__bindgen_anon_1.ipv4_nh = unsafe { params.__bindgen_anon_4.ipv4_dst };
        // SAFETY: neighbour is a valid bpf_redir_neigh of the size given.
        return unsafe {
            bpf_redirect_neigh(
                params.ifindex,
                &mut neighbour,
                core::mem::size_of::<bpf_redir_neigh>() as i32,
                0,
            )
        } as i32;
    }
    count(Stat::ExtDropDatapathError);
    TC_ACT_SHOT
}
