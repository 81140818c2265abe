//! VXLAN between nodes for external traffic whose backend runs on another
//! node: the receiving node sends the already translated packet (client
//! source kept) to the backend's node, which delivers it and sends the
//! replies back the same way, so the receiving node can translate them.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    helpers::{bpf_check_mtu, bpf_get_hash_recalc},
    programs::TcContext,
};
use dataplane_common::{ConfigValue, IPPROTO_UDP, TUNNEL_MSS_CLAMP_AUTO, TUNNEL_MSS_CLAMP_OFF};

use crate::{
    csum,
    maps::{NODE_IPS, TUNNEL_PEERS},
    packet::{ETH_HLEN, ETH_P_IP_BE, Flow, IP_OFF, IPV4_MIN_HLEN, Ipv4, TCP_MIN_HLEN, UDP_HLEN},
};

const VXLAN_HLEN: usize = 8;
/// Outer IPv4 + UDP + VXLAN + the inner Ethernet header.
pub const OVERHEAD: usize = IPV4_MIN_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;
const VXLAN_FLAG_VNI: u8 = 0x08;
/// Outer UDP source ports spread flows over 49152..=65535 (RFC 7348), so
/// ECMP and RSS on the node network see them as different flows.
const SOURCE_PORT_BASE: u32 = 49_152;
const SOURCE_PORT_SPAN: u32 = 16_384;

/// `bpf_adj_room` flag carrying the inner L2 header length.
const fn encap_l2_len(len: usize) -> u64 {
    ((len as u64) & 0xff) << 56
}

pub enum TunnelError {
    /// The kernel refused to grow or shrink the packet.
    Resize,
    /// A header could not be written.
    Write,
}

/// Whether `flow` is a VXLAN packet of ours: UDP to the tunnel port on one
/// of this node's addresses, from another node of the cluster, with our
/// VNI. Anything else (another overlay's VXLAN on the same port, or a
/// stranger's packet) is left to the stack.
#[inline(always)]
pub fn is_ours(ctx: &TcContext, ip: &Ipv4, flow: &Flow, config: &ConfigValue) -> bool {
    // Our tunnel never sends IPv4 options, and decapsulation removes a
    // fixed-size outer header.
    if flow.protocol != IPPROTO_UDP
        || flow.dst_port_be != config.tunnel_port_be
        || ip.header_len != IPV4_MIN_HLEN
    {
        return false;
    }
    // SAFETY: presence checks only.
    if unsafe { NODE_IPS.get(flow.dst_be) }.is_none()
        || unsafe { TUNNEL_PEERS.get(flow.src_be) }.is_none()
    {
        return false;
    }
    let vxlan_off = flow.l4_off + UDP_HLEN;
    let (Ok(flags), Ok(vni_word)) = (ctx.load::<u8>(vxlan_off), ctx.load::<u32>(vxlan_off + 4))
    else {
        return false;
    };
    flags & VXLAN_FLAG_VNI != 0 && u32::from_be(vni_word) >> 8 == config.vni
}

/// The MSS tunnelled TCP flows are clamped to, per CONFIG: None when off.
/// `auto` reads the MTU of the skb's device, which the tunnel leaves from.
#[inline(always)]
pub fn mss_clamp(ctx: &TcContext, config: &ConfigValue) -> Option<u16> {
    match config.tunnel_mss_clamp {
        TUNNEL_MSS_CLAMP_OFF => None,
        TUNNEL_MSS_CLAMP_AUTO => {
            let mut mtu: u32 = 0;
            // SAFETY: `mtu` is a valid in/out parameter; ifindex 0 is the
            // skb's device. Only the MTU reported back is used.
            unsafe { bpf_check_mtu(ctx.as_ptr(), 0, &mut mtu, 0, 0) };
            let headers = (OVERHEAD + IPV4_MIN_HLEN + TCP_MIN_HLEN) as u32;
            u16::try_from(mtu.checked_sub(headers)?).ok()
        }
        fixed => Some(fixed),
    }
}

/// Whether the packet still fits the outgoing interface once encapsulated.
/// A GSO packet (a TSO burst from a local sender, or GRO-merged segments
/// from a NIC) is judged by its segments, `headers_len` (IPv4 + L4) plus
/// `gso_size` each: the kernel's own check passes any GSO packet, but the
/// segments it becomes must fit once wrapped. Returns the MTU to announce
/// to the sender when the packet does not fit.
#[inline(always)]
pub fn fits(ctx: &TcContext, headers_len: u32) -> Result<(), u16> {
    let mut mtu: u32 = 0;
    // SAFETY: `mtu` is a valid in/out parameter (0 in: judge the skb's own
    // length); ifindex 0 means the skb's current device, where the tunnel
    // leaves from. The helper always reports the device MTU back.
    let result = unsafe { bpf_check_mtu(ctx.as_ptr(), 0, &mut mtu, OVERHEAD as i32, 0) };
    let inner_mtu = mtu.saturating_sub(OVERHEAD as u32);
    let announced = inner_mtu.min(u32::from(u16::MAX)) as u16;
    if result != 0 {
        return Err(announced);
    }
    // SAFETY: the context is a valid skb.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size != 0 && headers_len + gso_size > inner_mtu {
        return Err(announced);
    }
    Ok(())
}

/// Wraps the whole IPv4 packet in Ethernet/IPv4/UDP/VXLAN from this node
/// to `remote_be`. The caller routes the result (`route::forward`).
#[inline(always)]
pub fn encapsulate(
    ctx: &TcContext,
    config: &ConfigValue,
    remote_be: u32,
) -> Result<(), TunnelError> {
    let inner_len = ctx.len().saturating_sub(ETH_HLEN as u32);
    // SAFETY: the context is a valid skb.
    let hash = unsafe { bpf_get_hash_recalc(ctx.as_ptr() as *mut _) };
    let flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
        | encap_l2_len(ETH_HLEN);
    ctx.adjust_room(OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| TunnelError::Resize)?;

    let outer_len = inner_len + OVERHEAD as u32;
    let udp_len = outer_len - IPV4_MIN_HLEN as u32;
    // Don't Fragment on the outer header: a fragmented VXLAN packet could
    // not be decapsulated before reassembly. Packets too big for the tunnel
    // get ICMP "fragmentation needed" instead (see [`fits`]).
    let ip = csum::ipv4_header(
        config.node_ip_be,
        remote_be,
        IPPROTO_UDP,
        outer_len as u16,
        true,
    );

    let mut udp_and_vxlan = [0u8; UDP_HLEN + VXLAN_HLEN + ETH_HLEN];
    let source_port = (SOURCE_PORT_BASE + hash % SOURCE_PORT_SPAN) as u16;
    udp_and_vxlan[0..2].copy_from_slice(&source_port.to_be_bytes());
    udp_and_vxlan[2..4].copy_from_slice(&config.tunnel_port_be.to_ne_bytes());
    udp_and_vxlan[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    // UDP checksum 0: allowed for VXLAN over IPv4 (RFC 7348).
    udp_and_vxlan[8] = VXLAN_FLAG_VNI;
    udp_and_vxlan[12..16].copy_from_slice(&(config.vni << 8).to_be_bytes());
    // The inner Ethernet header's addresses are not used by the receiver,
    // which strips it; only its type matters.
    udp_and_vxlan[28..30].copy_from_slice(&ETH_P_IP_BE.to_ne_bytes());

    ctx.store(IP_OFF, &ip, 0).map_err(|_| TunnelError::Write)?;
    ctx.store(IP_OFF + IPV4_MIN_HLEN, &udp_and_vxlan, 0)
        .map_err(|_| TunnelError::Write)?;
    ctx.store(12, &ETH_P_IP_BE, 0)
        .map_err(|_| TunnelError::Write)?;
    Ok(())
}

/// Strips the outer IPv4/UDP/VXLAN and the inner Ethernet header, keeping
/// the outer Ethernet header (addressed to this node) in front of the
/// inner IPv4 packet.
#[inline(always)]
pub fn decapsulate(ctx: &TcContext) -> Result<(), TunnelError> {
    ctx.adjust_room(-(OVERHEAD as i32), BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| TunnelError::Resize)?;
    ctx.store(12, &ETH_P_IP_BE, 0)
        .map_err(|_| TunnelError::Write)
}
