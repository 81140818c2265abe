//! Ethernet/IPv4/TCP/UDP/ICMP/VXLAN packets built byte by byte, with
//! correct checksums, and checks of packets the programs return: for
//! BPF_PROG_TEST_RUN program tests, fuzzing and benchmarks.

use std::net::Ipv4Addr;

pub const ETH_HLEN: usize = 14;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// One end of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl Endpoint {
    pub fn new(ip: [u8; 4], port: u16) -> Self {
        Self {
            ip: Ipv4Addr::from(ip),
            port,
        }
    }
}

/// The RFC 1071 sum of `bytes` (big-endian 16-bit words, odd byte padded).
pub fn sum(bytes: &[u8], mut acc: u32) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for chunk in &mut chunks {
        acc += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

pub fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> u32 {
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, protocol]);
    pseudo.extend_from_slice(&(len as u16).to_be_bytes());
    sum(&pseudo, 0)
}

/// An IPv4 header (20 bytes + `options`) for `payload_len` bytes of
/// `protocol`, checksum filled in.
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    options: &[u8],
) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let header_len = 20 + options.len();
    let mut header = vec![0u8; header_len];
    header[0] = 0x40 | (header_len / 4) as u8;
    header[2..4].copy_from_slice(&((header_len + payload_len) as u16).to_be_bytes());
    header[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    header[6] = 0x40; // DF
    header[8] = 64;
    header[9] = protocol;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    header[20..].copy_from_slice(options);
    let checksum = fold(sum(&header, 0));
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

/// A TCP segment (20-byte header) with `flags` and `payload`, checksummed.
pub fn tcp_segment(from: Endpoint, to: Endpoint, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut segment = vec![0u8; 20];
    segment[0..2].copy_from_slice(&from.port.to_be_bytes());
    segment[2..4].copy_from_slice(&to.port.to_be_bytes());
    segment[4..8].copy_from_slice(&1000u32.to_be_bytes());
    if flags & TCP_ACK != 0 {
        segment[8..12].copy_from_slice(&2000u32.to_be_bytes());
    }
    segment[12] = 5 << 4;
    segment[13] = flags;
    segment[14..16].copy_from_slice(&65535u16.to_be_bytes());
    segment.extend_from_slice(payload);
    let acc = pseudo_header(from.ip, to.ip, IPPROTO_TCP, segment.len());
    let checksum = fold(sum(&segment, acc));
    segment[16..18].copy_from_slice(&checksum.to_be_bytes());
    segment
}

/// A UDP datagram with `payload`, checksummed.
pub fn udp_datagram(from: Endpoint, to: Endpoint, payload: &[u8]) -> Vec<u8> {
    let mut datagram = vec![0u8; 8];
    datagram[0..2].copy_from_slice(&from.port.to_be_bytes());
    datagram[2..4].copy_from_slice(&to.port.to_be_bytes());
    datagram[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(payload);
    let acc = pseudo_header(from.ip, to.ip, IPPROTO_UDP, datagram.len());
    let checksum = match fold(sum(&datagram, acc)) {
        0 => 0xffff,
        c => c,
    };
    datagram[6..8].copy_from_slice(&checksum.to_be_bytes());
    datagram
}

/// An Ethernet frame around an IPv4 packet.
pub fn ethernet(ip_packet: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(ETH_HLEN + ip_packet.len());
    frame.extend_from_slice(&DST_MAC);
    frame.extend_from_slice(&SRC_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(ip_packet);
    frame
}

/// Ethernet + IPv4 + TCP.
pub fn tcp(from: Endpoint, to: Endpoint, flags: u8, payload: &[u8]) -> Vec<u8> {
    let segment = tcp_segment(from, to, flags, payload);
    let mut ip = ipv4_header(from.ip, to.ip, IPPROTO_TCP, segment.len(), &[]);
    ip.extend_from_slice(&segment);
    ethernet(&ip)
}

/// Ethernet + IPv4 + UDP.
pub fn udp(from: Endpoint, to: Endpoint, payload: &[u8]) -> Vec<u8> {
    let datagram = udp_datagram(from, to, payload);
    let mut ip = ipv4_header(from.ip, to.ip, IPPROTO_UDP, datagram.len(), &[]);
    ip.extend_from_slice(&datagram);
    ethernet(&ip)
}

/// An ICMP error (`icmp_type`/`code`, `mtu` for fragmentation needed) from
/// `from` to `to`, quoting the first 28 bytes of the IPv4 packet in `frame`.
pub fn icmp_error(
    from: Ipv4Addr,
    to: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    mtu: u16,
    frame: &[u8],
) -> Vec<u8> {
    let quoted = &frame[ETH_HLEN..(ETH_HLEN + 28).min(frame.len())];
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let checksum = fold(sum(&icmp, 0));
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
    let mut ip = ipv4_header(from, to, IPPROTO_ICMP, icmp.len(), &[]);
    ip.extend_from_slice(&icmp);
    ethernet(&ip)
}

/// `inner` (an Ethernet frame) in VXLAN from node `from` to node `to`.
pub fn vxlan(from: Ipv4Addr, to: Ipv4Addr, port: u16, vni: u32, inner: &[u8]) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    let mut datagram = vec![0u8; 8];
    datagram[0..2].copy_from_slice(&50000u16.to_be_bytes());
    datagram[2..4].copy_from_slice(&port.to_be_bytes());
    datagram[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    datagram.extend_from_slice(&payload);
    let mut ip = ipv4_header(from, to, IPPROTO_UDP, datagram.len(), &[]);
    ip.extend_from_slice(&datagram);
    ethernet(&ip)
}

/// What an Ethernet/IPv4 frame carries, as far as the checks need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub header_len: usize,
    pub total_len: usize,
    /// Source and destination ports of TCP/UDP.
    pub ports: Option<(u16, u16)>,
    pub tcp_flags: Option<u8>,
    pub fragment: bool,
}

/// Parses an Ethernet/IPv4 frame; `None` if it is not one or is truncated.
pub fn parse(frame: &[u8]) -> Option<Parsed> {
    if frame.len() < ETH_HLEN + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[ETH_HLEN..];
    if ip[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if header_len < 20 || total_len < header_len || ip.len() < header_len {
        return None;
    }
    let protocol = ip[9];
    let fragment = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
    let l4 = &ip[header_len..];
    let min_l4 = match protocol {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => usize::MAX,
    };
    let has_ports =
        !fragment && min_l4 != usize::MAX && l4.len() >= min_l4 && total_len >= header_len + min_l4;
    Some(Parsed {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        protocol,
        header_len,
        total_len,
        ports: has_ports.then(|| {
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        }),
        tcp_flags: (has_ports && protocol == IPPROTO_TCP).then(|| l4[13]),
        fragment,
    })
}

/// Whether the IPv4 header checksum of the frame is right.
pub fn ipv4_checksum_ok(frame: &[u8]) -> bool {
    let Some(parsed) = parse(frame) else {
        return false;
    };
    fold(sum(&frame[ETH_HLEN..ETH_HLEN + parsed.header_len], 0)) == 0
}

/// Whether the TCP, UDP (a zero UDP checksum means none) or ICMP checksum
/// over the IP payload is right.
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let Some(parsed) = parse(frame) else {
        return false;
    };
    let start = ETH_HLEN + parsed.header_len;
    let end = ETH_HLEN + parsed.total_len;
    if end > frame.len() || end < start {
        return false;
    }
    let payload = &frame[start..end];
    match parsed.protocol {
        IPPROTO_TCP => {
            let acc = pseudo_header(parsed.src, parsed.dst, IPPROTO_TCP, payload.len());
            fold(sum(payload, acc)) == 0
        }
        IPPROTO_UDP => {
            if payload.len() >= 8 && payload[6..8] == [0, 0] {
                return true;
            }
            let acc = pseudo_header(parsed.src, parsed.dst, IPPROTO_UDP, payload.len());
            fold(sum(payload, acc)) == 0
        }
        IPPROTO_ICMP => fold(sum(payload, 0)) == 0,
        _ => true,
    }
}

/// The inner Ethernet frame of a VXLAN frame (outer IPv4 without options).
pub fn vxlan_inner(frame: &[u8]) -> Option<&[u8]> {
    let offset = ETH_HLEN + 20 + 8 + 8;
    (frame.len() > offset + ETH_HLEN).then(|| &frame[offset..])
}

/// Recomputes the IPv4 header checksum of an Ethernet/IPv4 frame after a
/// field was changed on purpose (the header length is taken from the frame,
/// clamped to 20..=60 bytes and to the frame).
pub fn refresh_ipv4_checksum(frame: &mut [u8]) {
    let header_len = (usize::from(frame[ETH_HLEN] & 0x0f) * 4).clamp(20, 60);
    let end = (ETH_HLEN + header_len).min(frame.len());
    frame[ETH_HLEN + 10..ETH_HLEN + 12].fill(0);
    let checksum = fold(sum(&frame[ETH_HLEN..end], 0));
    frame[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&checksum.to_be_bytes());
}

/// `frame` (Ethernet/IPv4/TCP, both headers of 20 bytes) with `options`
/// (a multiple of 4 bytes, at most 40) after its TCP header: data offset,
/// total length and both checksums follow.
pub fn with_tcp_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    assert_eq!(frame[ETH_HLEN] & 0x0f, 5, "an IPv4 header without options");
    let tcp = ETH_HLEN + 20;
    assert_eq!(frame[tcp + 12] >> 4, 5, "a TCP header without options");
    let mut out = Vec::with_capacity(frame.len() + options.len());
    out.extend_from_slice(&frame[..tcp + 20]);
    out.extend_from_slice(options);
    out.extend_from_slice(&frame[tcp + 20..]);
    out[tcp + 12] = (((20 + options.len()) / 4) as u8) << 4;
    let total_len = u16::from_be_bytes([frame[ETH_HLEN + 2], frame[ETH_HLEN + 3]]);
    let total_len = total_len.wrapping_add(options.len() as u16);
    out[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total_len.to_be_bytes());
    refresh_ipv4_checksum(&mut out);
    let src =
        Ipv4Addr::from(<[u8; 4]>::try_from(&out[ETH_HLEN + 12..ETH_HLEN + 16]).unwrap_or_default());
    let dst =
        Ipv4Addr::from(<[u8; 4]>::try_from(&out[ETH_HLEN + 16..ETH_HLEN + 20]).unwrap_or_default());
    let end = (ETH_HLEN + usize::from(total_len)).clamp(tcp + 18, out.len());
    out[tcp + 16..tcp + 18].fill(0);
    let acc = pseudo_header(src, dst, IPPROTO_TCP, end - tcp);
    let checksum = fold(sum(&out[tcp..end], acc));
    out[tcp + 16..tcp + 18].copy_from_slice(&checksum.to_be_bytes());
    out
}

/// `frame` (Ethernet/IPv4 with a 20-byte header) with `options` (a multiple
/// of 4 bytes, at most 40) inserted after its IPv4 header: header length,
/// total length and header checksum follow; the L4 checksum does not
/// depend on them.
pub fn with_ipv4_options(frame: &[u8], options: &[u8]) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    assert_eq!(frame[ETH_HLEN] & 0x0f, 5, "a frame without options");
    let header_end = ETH_HLEN + 20;
    let mut out = Vec::with_capacity(frame.len() + options.len());
    out.extend_from_slice(&frame[..header_end]);
    out.extend_from_slice(options);
    out.extend_from_slice(&frame[header_end..]);
    out[ETH_HLEN] = 0x40 | ((20 + options.len()) / 4) as u8;
    let total_len = u16::from_be_bytes([frame[ETH_HLEN + 2], frame[ETH_HLEN + 3]]);
    let total_len = total_len.wrapping_add(options.len() as u16);
    out[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total_len.to_be_bytes());
    refresh_ipv4_checksum(&mut out);
    out
}
