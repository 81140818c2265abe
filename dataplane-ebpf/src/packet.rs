//! Reading IPv4 headers of a packet on a node interface, every field
//! through `bpf_skb_load_bytes` (bounds-checked by the kernel against the
//! real packet length, linear or not).

use aya_ebpf::programs::TcContext;
use dataplane_common::{IPPROTO_TCP, IPPROTO_UDP};

pub const ETH_HLEN: usize = 14;
/// The IPv4 header follows the Ethernet header (no VLAN tags on node
/// interfaces; tagged frames are passed untouched).
pub const IP_OFF: usize = ETH_HLEN;
pub const IPV4_MIN_HLEN: usize = 20;
const IPV4_MAX_HLEN: usize = 60;
pub const UDP_HLEN: usize = 8;
pub const TCP_MIN_HLEN: usize = 20;
pub const ICMP_HLEN: usize = 8;
pub const IPPROTO_ICMP: u8 = 1;

pub const ETH_P_IP_BE: u16 = 0x0800u16.to_be();

/// Offsets within the IPv4 header.
pub const IP_TOT_LEN: usize = 2;
pub const IP_FRAG: usize = 6;
pub const IP_PROTO: usize = 9;
pub const IP_CSUM: usize = 10;
pub const IP_SRC: usize = 12;
pub const IP_DST: usize = 16;

/// Offsets within the TCP/UDP header.
pub const L4_SRC_PORT: usize = 0;
pub const L4_DST_PORT: usize = 2;
pub const TCP_DATA_OFFSET: usize = 12;
pub const TCP_FLAGS: usize = 13;
pub const TCP_CSUM: usize = 16;
pub const UDP_CSUM: usize = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// "More fragments" and the fragment offset: either set means a fragment.
const IP_MF_AND_OFFSET_MASK: u16 = 0x3fff;

/// A TCP or UDP packet's addresses, as the packet carries them.
#[derive(Clone, Copy)]
pub struct Flow {
    pub src_be: u32,
    pub dst_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub protocol: u8,
    /// TCP flags; 0 for UDP.
    pub tcp_flags: u8,
    /// Offset of the TCP/UDP header (after IPv4 options, if any).
    pub l4_off: usize,
}

impl Flow {
    /// Where this flow's L4 checksum lives.
    #[inline(always)]
    pub fn csum_off(&self) -> usize {
        if self.protocol == IPPROTO_TCP {
            self.l4_off + TCP_CSUM
        } else {
            self.l4_off + UDP_CSUM
        }
    }

    #[inline(always)]
    pub fn is_tcp(&self) -> bool {
        self.protocol == IPPROTO_TCP
    }
}

/// An IPv4 packet's header facts.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub src_be: u32,
    pub dst_be: u32,
    pub protocol: u8,
    pub header_len: usize,
    pub total_len: u16,
}

/// What a packet is, as far as the node-interface programs care.
pub enum Packet {
    /// Not IPv4 over Ethernet: never ours.
    Other,
    /// IPv4 whose header or L4 header is truncated or inconsistent, or a
    /// fragment (later fragments carry no ports): passed untranslated.
    Unusable,
    /// TCP or UDP with its ports.
    Ports(Ipv4, Flow),
    /// ICMP (errors about translated flows are handled in `icmp`).
    Icmp(Ipv4),
    /// Another IPv4 protocol.
    OtherIpv4,
}

/// Parses the Ethernet + IPv4 (+ TCP/UDP) headers at the start of the
/// packet.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Packet {
    let Ok(ether_type) = ctx.load::<u16>(12) else {
        return Packet::Other;
    };
    if ether_type != ETH_P_IP_BE {
        return Packet::Other;
    }
    let Some(ip) = parse_ipv4(ctx, IP_OFF) else {
        return Packet::Other;
    };
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {}
        IPPROTO_ICMP => return Packet::Icmp(ip),
        _ => return Packet::OtherIpv4,
    }
    let Ok(frag) = ctx.load::<u16>(IP_OFF + IP_FRAG) else {
        return Packet::Unusable;
    };
    if u16::from_be(frag) & IP_MF_AND_OFFSET_MASK != 0 {
        return Packet::Unusable;
    }
    match parse_ports(ctx, &ip, IP_OFF) {
        Some(flow) => Packet::Ports(ip, flow),
        None => Packet::Unusable,
    }
}

/// The IPv4 header at `off`, if it is a plausible one: version 4, header
/// length 20..=60 within the total length.
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext, off: usize) -> Option<Ipv4> {
    let version_ihl = ctx.load::<u8>(off).ok()?;
    if version_ihl >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if !(IPV4_MIN_HLEN..=IPV4_MAX_HLEN).contains(&header_len) {
        return None;
    }
    let total_len = u16::from_be(ctx.load::<u16>(off + IP_TOT_LEN).ok()?);
    if usize::from(total_len) < header_len {
        return None;
    }
    Some(Ipv4 {
        src_be: ctx.load::<u32>(off + IP_SRC).ok()?,
        dst_be: ctx.load::<u32>(off + IP_DST).ok()?,
        protocol: ctx.load::<u8>(off + IP_PROTO).ok()?,
        header_len,
        total_len,
    })
}

/// The ports (and TCP flags) after the IPv4 header at `ip_off`. The whole
/// minimal L4 header must be present and inside the IP total length.
#[inline(always)]
pub fn parse_ports(ctx: &TcContext, ip: &Ipv4, ip_off: usize) -> Option<Flow> {
    let l4_off = ip_off + ip.header_len;
    let min_len = if ip.protocol == IPPROTO_TCP {
        TCP_MIN_HLEN
    } else {
        UDP_HLEN
    };
    if usize::from(ip.total_len) < ip.header_len + min_len {
        return None;
    }
    // Loading the header's last byte proves the packet really holds it.
    ctx.load::<u8>(l4_off + min_len - 1).ok()?;
    let tcp_flags = if ip.protocol == IPPROTO_TCP {
        ctx.load::<u8>(l4_off + TCP_FLAGS).ok()?
    } else {
        0
    };
    Some(Flow {
        src_be: ip.src_be,
        dst_be: ip.dst_be,
        src_port_be: ctx.load::<u16>(l4_off + L4_SRC_PORT).ok()?,
        dst_port_be: ctx.load::<u16>(l4_off + L4_DST_PORT).ok()?,
        protocol: ip.protocol,
        tcp_flags,
        l4_off,
    })
}
