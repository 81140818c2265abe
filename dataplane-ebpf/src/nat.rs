//! Address and port rewrites with incremental checksum updates (RFC 1624,
//! done by the kernel's csum_replace helpers, which also keep a partial
//! checksum of an offloaded packet correct).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::packet::{Flow, IP_CSUM, IP_DST, IP_OFF, IP_SRC, L4_DST_PORT, L4_SRC_PORT};

/// A rewrite failed (the packet is shorter than its parsed headers, which
/// cannot happen for a parsed packet, or the skb could not be made
/// writable): the caller drops the packet rather than send it half
/// rewritten.
pub struct RewriteFailed;

#[derive(Clone, Copy)]
enum Side {
    Source,
    Destination,
}

/// Rewrites the destination address and port (DNAT).
#[inline(always)]
pub fn set_destination(
    ctx: &TcContext,
    flow: &Flow,
    ip_be: u32,
    port_be: u16,
) -> Result<(), RewriteFailed> {
    rewrite(ctx, flow, Side::Destination, ip_be, port_be)
}

/// Rewrites the source address and port (reverse DNAT, or SNAT).
#[inline(always)]
pub fn set_source(
    ctx: &TcContext,
    flow: &Flow,
    ip_be: u32,
    port_be: u16,
) -> Result<(), RewriteFailed> {
    rewrite(ctx, flow, Side::Source, ip_be, port_be)
}

#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    flow: &Flow,
    side: Side,
    new_ip_be: u32,
    new_port_be: u16,
) -> Result<(), RewriteFailed> {
    let (old_ip_be, old_port_be, ip_field, port_field) = match side {
        Side::Source => (
            flow.src_be,
            flow.src_port_be,
            IP_OFF + IP_SRC,
            flow.l4_off + L4_SRC_PORT,
        ),
        Side::Destination => (
            flow.dst_be,
            flow.dst_port_be,
            IP_OFF + IP_DST,
            flow.l4_off + L4_DST_PORT,
        ),
    };
    if new_ip_be != old_ip_be {
        ctx.l4_csum_replace(
            flow.csum_off(),
            u64::from(old_ip_be),
            u64::from(new_ip_be),
            l4_csum_flags(flow) | u64::from(BPF_F_PSEUDO_HDR) | 4,
        )
        .map_err(|_| RewriteFailed)?;
        ctx.l3_csum_replace(
            IP_OFF + IP_CSUM,
            u64::from(old_ip_be),
            u64::from(new_ip_be),
            4,
        )
        .map_err(|_| RewriteFailed)?;
        ctx.store(ip_field, &new_ip_be, 0)
            .map_err(|_| RewriteFailed)?;
    }
    if new_port_be != old_port_be {
        set_l4_u16(ctx, flow, port_field, old_port_be, new_port_be)?;
    }
    Ok(())
}

/// Rewrites a 16-bit field of the L4 header (a port, a TCP option's value)
/// at an even offset from the header's start, so it is one word of the
/// checksum.
#[inline(always)]
pub fn set_l4_u16(
    ctx: &TcContext,
    flow: &Flow,
    field: usize,
    old_be: u16,
    new_be: u16,
) -> Result<(), RewriteFailed> {
    ctx.l4_csum_replace(
        flow.csum_off(),
        u64::from(old_be),
        u64::from(new_be),
        l4_csum_flags(flow) | 2,
    )
    .map_err(|_| RewriteFailed)?;
    ctx.store(field, &new_be, 0).map_err(|_| RewriteFailed)
}

/// A UDP checksum of 0 means "none" and must stay 0; a computed 0 is sent
/// as 0xffff (MARK_MANGLED_0 does both).
#[inline(always)]
fn l4_csum_flags(flow: &Flow) -> u64 {
    if flow.is_tcp() {
        0
    } else {
        u64::from(BPF_F_MARK_MANGLED_0)
    }
}
