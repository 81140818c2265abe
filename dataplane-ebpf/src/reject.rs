//! Answers a packet in place, as kube-proxy's REJECT rule would: a TCP RST
//! or an ICMP destination-unreachable from the address the client dialled
//! (or "fragmentation needed" for a packet too big for the tunnel).
//!
//! The packet is cut (or grown) to the answer's length and every header is
//! written anew, so nothing of the original survives except what the answer
//! quotes.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use dataplane_common::{IPPROTO_TCP, Stat};

use crate::{
    csum,
    maps::count,
    packet::{
        ETH_HLEN, ETH_P_IP_BE, Flow, ICMP_HLEN, IP_OFF, IPPROTO_ICMP, IPV4_MIN_HLEN, Ipv4, TCP_ACK,
        TCP_DATA_OFFSET, TCP_FIN, TCP_MIN_HLEN, TCP_RST, TCP_SYN, UDP_HLEN,
    },
};

const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_PORT_UNREACHABLE: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
/// The original IPv4 header plus the first 8 bytes of its payload
/// (RFC 792), for a header without options.
const QUOTED_LEN: usize = IPV4_MIN_HLEN + UDP_HLEN;

/// The answer could not be built; the caller drops the packet.
pub struct NoAnswer;

/// Turns the packet of `flow` into the TCP RST that answers it.
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, ip: &Ipv4, flow: &Flow) -> Result<(), NoAnswer> {
    if flow.tcp_flags & TCP_RST != 0 || ip.header_len != IPV4_MIN_HLEN {
        // Never answer a reset; and a header with options is too rare to
        // be worth a variable-length answer: drop it.
        return Err(NoAnswer);
    }
    let (Ok(seq), Ok(ack), Ok(data_off)) = (
        ctx.load::<u32>(flow.l4_off + 4),
        ctx.load::<u32>(flow.l4_off + 8),
        ctx.load::<u8>(flow.l4_off + TCP_DATA_OFFSET),
    ) else {
        return Err(NoAnswer);
    };
    let tcp_header_len = u32::from(data_off >> 4) * 4;
    let payload = u32::from(ip.total_len).saturating_sub(IPV4_MIN_HLEN as u32 + tcp_header_len);
    // RFC 793 reset generation: answer an ACK with seq = its ack; anything
    // else with seq 0 and an ACK of everything it occupied.
    let (reply_seq, reply_ack, reply_flags) = if flow.tcp_flags & TCP_ACK != 0 {
        (u32::from_be(ack), 0, TCP_RST)
    } else {
        let occupied = payload
            + u32::from(flow.tcp_flags & TCP_SYN != 0)
            + u32::from(flow.tcp_flags & TCP_FIN != 0);
        (
            0,
            u32::from_be(seq).wrapping_add(occupied),
            TCP_RST | TCP_ACK,
        )
    };
    let mut tcp = [0u8; TCP_MIN_HLEN];
    tcp[0..2].copy_from_slice(&flow.dst_port_be.to_ne_bytes());
    tcp[2..4].copy_from_slice(&flow.src_port_be.to_ne_bytes());
    tcp[4..8].copy_from_slice(&reply_seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&reply_ack.to_be_bytes());
    tcp[12] = (TCP_MIN_HLEN as u8 / 4) << 4;
    tcp[13] = reply_flags;
    let sum = csum::pseudo_header(flow.dst_be, flow.src_be, IPPROTO_TCP, TCP_MIN_HLEN as u16)
        + csum::sum_words(&tcp);
    tcp[16..18].copy_from_slice(&csum::fold(sum).to_be_bytes());
    let ip_header = csum::ipv4_header(
        flow.dst_be,
        flow.src_be,
        IPPROTO_TCP,
        (IPV4_MIN_HLEN + TCP_MIN_HLEN) as u16,
        false,
    );
    rewrite_as(ctx, &ip_header, &tcp)
}

/// Turns the packet into an ICMP destination unreachable (`code`; `mtu`
/// for "fragmentation needed") from `from_be` to its sender, quoting its
/// IPv4 header and first 8 payload bytes.
#[inline(always)]
pub fn icmp_unreachable(
    ctx: &TcContext,
    ip: &Ipv4,
    code: u8,
    mtu: u16,
    from_be: u32,
) -> Result<(), NoAnswer> {
    if ip.header_len != IPV4_MIN_HLEN {
        return Err(NoAnswer);
    }
    let Ok(quoted) = ctx.load::<[u8; QUOTED_LEN]>(IP_OFF) else {
        return Err(NoAnswer);
    };
    let mut icmp = [0u8; ICMP_HLEN + QUOTED_LEN];
    icmp[0] = ICMP_DEST_UNREACHABLE;
    icmp[1] = code;
    icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
    icmp[ICMP_HLEN..].copy_from_slice(&quoted);
    let checksum = csum::fold(csum::sum_words(&icmp));
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    let ip_header = csum::ipv4_header(
        from_be,
        ip.src_be,
        IPPROTO_ICMP,
        (IPV4_MIN_HLEN + icmp.len()) as u16,
        false,
    );
    rewrite_as(ctx, &ip_header, &icmp)
}

/// Sends the answer out of the interface the packet came in on, back to
/// the Ethernet address it came from. Returns the verdict.
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> i32 {
    // SAFETY: the context is a valid skb.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper without preconditions.
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Makes the packet exactly Ethernet + `ip_header` + `payload`, with the
/// Ethernet addresses swapped.
#[inline(always)]
fn rewrite_as<const N: usize>(
    ctx: &TcContext,
    ip_header: &[u8; IPV4_MIN_HLEN],
    payload: &[u8; N],
) -> Result<(), NoAnswer> {
    let eth = ctx.load::<[u8; 12]>(0).map_err(|_| NoAnswer)?;
    let new_len = (ETH_HLEN + IPV4_MIN_HLEN + N) as u32;
    // SAFETY: the context is a valid skb; change_tail also clears GSO.
    if unsafe { bpf_skb_change_tail(ctx.as_ptr() as *mut _, new_len, 0) } != 0 {
        count(Stat::ExtDropDatapathError);
        return Err(NoAnswer);
    }
    let mut swapped = [0u8; ETH_HLEN];
    swapped[..6].copy_from_slice(&eth[6..12]);
    swapped[6..12].copy_from_slice(&eth[..6]);
    swapped[12..].copy_from_slice(&ETH_P_IP_BE.to_ne_bytes());
    if ctx.store(0, &swapped, 0).is_err()
        || ctx.store(IP_OFF, ip_header, 0).is_err()
        || ctx.store(IP_OFF + IPV4_MIN_HLEN, payload, 0).is_err()
    {
        count(Stat::ExtDropDatapathError);
        return Err(NoAnswer);
    }
    Ok(())
}
