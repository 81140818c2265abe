//! ICMP errors about translated flows. A router on the way to the client
//! reports "fragmentation needed" (or "unreachable") to the address the
//! reply came from, the frontend; the backend that actually sent it must
//! hear of it, or path MTU discovery through a NodePort cannot work. The
//! error is translated like the flow: outer destination to the backend,
//! the quoted header's source to the backend's address and port.

use aya_ebpf::programs::TcContext;
use dataplane_common::{CT_FLAG_REMOTE, CT_FLAG_SNAT, CT_FORWARD, CtKey, CtValue, Stat};

use crate::{
    conntrack,
    maps::count,
    nat::RewriteFailed,
    packet::{self, ICMP_HLEN, IP_CSUM, IP_DST, IP_OFF, IP_SRC, IPV4_MIN_HLEN, Ipv4, L4_SRC_PORT},
};

const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_CSUM: usize = 2;

/// What to do with an inbound ICMP error about one of our flows.
pub enum Translated {
    /// Not about a flow of ours: leave it alone.
    NotOurs,
    /// Rewritten for a backend on this node: let the stack deliver it.
    Local,
    /// Rewritten for a backend on another node: tunnel it to that node.
    Remote(u32),
    /// The rewrite failed half way: drop.
    Failed,
}

/// Translates an ICMP error arriving for a frontend address.
#[inline(always)]
pub fn translate_inbound(ctx: &TcContext, ip: &Ipv4) -> Translated {
    let icmp_off = IP_OFF + ip.header_len;
    let Ok(icmp_type) = ctx.load::<u8>(icmp_off) else {
        return Translated::NotOurs;
    };
    if icmp_type != ICMP_DEST_UNREACHABLE && icmp_type != ICMP_TIME_EXCEEDED {
        return Translated::NotOurs;
    }
    let quoted_off = icmp_off + ICMP_HLEN;
    let Some(quoted) = packet::parse_ipv4(ctx, quoted_off) else {
        return Translated::NotOurs;
    };
    // The quote is the start of the packet we sent (frontend -> client);
    // only a header without options keeps its ports at a fixed place.
    if quoted.header_len != IPV4_MIN_HLEN || quoted.src_be != ip.dst_be {
        return Translated::NotOurs;
    }
    let ports_off = quoted_off + IPV4_MIN_HLEN;
    let (Ok(quoted_src_port), Ok(quoted_dst_port)) =
        (ctx.load::<u16>(ports_off), ctx.load::<u16>(ports_off + 2))
    else {
        return Translated::NotOurs;
    };
    let forward_key = CtKey::new(
        quoted.dst_be,
        quoted_dst_port,
        quoted.src_be,
        quoted_src_port,
        quoted.protocol,
    );
    let Some(entry) = conntrack::lookup(&forward_key) else {
        return Translated::NotOurs;
    };
    // SAFETY: copied out of the map value at once.
    let flow: CtValue = unsafe { *entry };
    if flow.kind != CT_FORWARD || flow.flags & CT_FLAG_SNAT != 0 {
        return Translated::NotOurs;
    }
    let rewritten = rewrite(ctx, ip.dst_be, quoted_src_port, icmp_off, quoted_off, &flow);
    if rewritten.is_err() {
        return Translated::Failed;
    }
    count(Stat::ExtIcmpTranslated);
    if flow.flags & CT_FLAG_REMOTE != 0 {
        Translated::Remote(flow.tunnel_ip_be)
    } else {
        Translated::Local
    }
}

#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    frontend_be: u32,
    frontend_port_be: u16,
    icmp_off: usize,
    quoted_off: usize,
    flow: &CtValue,
) -> Result<(), RewriteFailed> {
    let backend_be = flow.nat_ip_be;
    let icmp_csum = icmp_off + ICMP_CSUM;
    let fail = |_| RewriteFailed;
    // Outer destination: the IPv4 header checksum only (ICMP has no
    // pseudo header).
    ctx.l3_csum_replace(
        IP_OFF + IP_CSUM,
        u64::from(frontend_be),
        u64::from(backend_be),
        4,
    )
    .map_err(fail)?;
    ctx.store(IP_OFF + IP_DST, &backend_be, 0).map_err(fail)?;
    // The quoted source address: the quoted header's checksum changes
    // with it, and the ICMP checksum covers both.
    let quoted_csum = quoted_off + IP_CSUM;
    let old_quoted_csum = ctx.load::<u16>(quoted_csum).map_err(fail)?;
    ctx.l3_csum_replace(
        quoted_csum,
        u64::from(frontend_be),
        u64::from(backend_be),
        4,
    )
    .map_err(fail)?;
    let new_quoted_csum = ctx.load::<u16>(quoted_csum).map_err(fail)?;
    ctx.l4_csum_replace(icmp_csum, u64::from(frontend_be), u64::from(backend_be), 4)
        .map_err(fail)?;
    ctx.l4_csum_replace(
        icmp_csum,
        u64::from(old_quoted_csum),
        u64::from(new_quoted_csum),
        2,
    )
    .map_err(fail)?;
    ctx.store(quoted_off + IP_SRC, &backend_be, 0)
        .map_err(fail)?;
    // The quoted source port.
    let port_off = quoted_off + IPV4_MIN_HLEN + L4_SRC_PORT;
    ctx.l4_csum_replace(
        icmp_csum,
        u64::from(frontend_port_be),
        u64::from(flow.nat_port_be),
        2,
    )
    .map_err(fail)?;
    ctx.store(port_off, &flow.nat_port_be, 0).map_err(fail)
}
