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

/// Ethernet + the fixed IPv4 header: read in one helper call.
const FIXED_HEADERS: usize = ETH_HLEN + IPV4_MIN_HLEN;

/// Parses the Ethernet + IPv4 (+ TCP/UDP) headers at the start of the
/// packet, in as few helper calls as possible (one for the fixed headers,
/// one for the ports): this runs for every packet on the interface.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Packet {
    let Ok(headers) = ctx.load::<[u8; FIXED_HEADERS]>(0) else {
        return Packet::Other;
    };
    if u16::from_ne_bytes([headers[12], headers[13]]) != ETH_P_IP_BE {
        return Packet::Other;
    }
    let Some(ip) = ipv4_of(&headers[IP_OFF..]) else {
        return Packet::Other;
    };
    // A fragment of any protocol is never translated: later fragments
    // carry no L4 header, and rewriting only the first would break
    // reassembly (the stack reassembles what is addressed to the node).
    let frag = u16::from_be_bytes([headers[IP_OFF + IP_FRAG], headers[IP_OFF + IP_FRAG + 1]]);
    if frag & IP_MF_AND_OFFSET_MASK != 0 {
        return match ip.protocol {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_ICMP => Packet::Unusable,
            _ => Packet::OtherIpv4,
        };
    }
    match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {}
        IPPROTO_ICMP => return Packet::Icmp(ip),
        _ => return Packet::OtherIpv4,
    }
    match parse_ports(ctx, &ip, IP_OFF) {
        Some(flow) => Packet::Ports(ip, flow),
        None => Packet::Unusable,
    }
}

/// The IPv4 header facts from its first 20 bytes, if plausible: version 4,
/// header length 20..=60 within the total length.
#[inline(always)]
fn ipv4_of(header: &[u8]) -> Option<Ipv4> {
    if header.len() < IPV4_MIN_HLEN || header[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if !(IPV4_MIN_HLEN..=IPV4_MAX_HLEN).contains(&header_len) {
        return None;
    }
    let total_len = u16::from_be_bytes([header[IP_TOT_LEN], header[IP_TOT_LEN + 1]]);
    if usize::from(total_len) < header_len {
        return None;
    }
    let word = |at: usize| {
        u32::from_ne_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    Some(Ipv4 {
        src_be: word(IP_SRC),
        dst_be: word(IP_DST),
        protocol: header[IP_PROTO],
        header_len,
        total_len,
    })
}

/// The IPv4 header at `off`, if it is a plausible one (see [`ipv4_of`]).
#[inline(always)]
pub fn parse_ipv4(ctx: &TcContext, off: usize) -> Option<Ipv4> {
    let header = ctx.load::<[u8; IPV4_MIN_HLEN]>(off).ok()?;
    ipv4_of(&header)
}

/// The ports (and TCP flags) after the IPv4 header at `ip_off`. The whole
/// minimal L4 header must be present and inside the IP total length.
#[inline(always)]
pub fn parse_ports(ctx: &TcContext, ip: &Ipv4, ip_off: usize) -> Option<Flow> {
    let l4_off = ip_off + ip.header_len;
    let is_tcp = ip.protocol == IPPROTO_TCP;
    let min_len = if is_tcp { TCP_MIN_HLEN } else { UDP_HLEN };
    if usize::from(ip.total_len) < ip.header_len + min_len {
        return None;
    }
    // One load of the whole minimal header: it also proves the packet
    // really holds it.
    let (ports, tcp_flags) = if is_tcp {
        let head = ctx.load::<[u8; TCP_MIN_HLEN]>(l4_off).ok()?;
        ([head[0], head[1], head[2], head[3]], head[TCP_FLAGS])
    } else {
        let head = ctx.load::<[u8; UDP_HLEN]>(l4_off).ok()?;
        ([head[0], head[1], head[2], head[3]], 0)
    };
    Some(Flow {
        src_be: ip.src_be,
        dst_be: ip.dst_be,
        src_port_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dst_port_be: u16::from_ne_bytes([ports[2], ports[3]]),
        protocol: ip.protocol,
        tcp_flags,
        l4_off,
    })
}
