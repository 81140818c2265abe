//! The reference the checks hold outcomes against: what the standard
//! configuration means for a packet, worked out apart from the programs.

use std::{net::Ipv4Addr, ops::Range};

use dataplane_agent::model::{Backend, Frontend, FrontendEntry, Protocol, Scope};
use dataplane_common::CtKey;
use dataplane_testbed::{
    packets::{self, ETH_HLEN, Endpoint, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP},
    tc_harness::{
        TcHarness,
        standard::{NODE, PEER, TUNNEL_MSS_CLAMP, TUNNEL_PORT, VNI},
    },
};

use crate::{
    ICMP_DEST_UNREACHABLE, ICMP_HLEN, ICMP_TIME_EXCEEDED, IP_DST, IP_FRAG, IP_SRC, IP_TOT_LEN,
    MIN_FRAME, VXLAN_FLAG_VNI,
};

/// A TCP/UDP packet's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct Tuple {
    pub(super) src: Endpoint,
    pub(super) dst: Endpoint,
    pub(super) protocol: u8,
}

impl Tuple {
    pub(super) fn new(src: Endpoint, dst: Endpoint, protocol: u8) -> Self {
        Self { src, dst, protocol }
    }

    pub(super) fn reversed(self) -> Self {
        Self::new(self.dst, self.src, self.protocol)
    }

    pub(super) fn of_key(key: &CtKey) -> Self {
        Self::new(
            endpoint_of_map(key.src_be, key.src_port_be),
            endpoint_of_map(key.dst_be, key.dst_port_be),
            key.protocol,
        )
    }
}

pub(super) fn endpoint(ip: Ipv4Addr, port: u16) -> Endpoint {
    Endpoint { ip, port }
}

/// An address and port as the maps hold them (network byte order).
pub(super) fn endpoint_of_map(ip_be: u32, port_be: u16) -> Endpoint {
    endpoint(
        Ipv4Addr::from(ip_be.to_ne_bytes()),
        u16::from_be_bytes(port_be.to_ne_bytes()),
    )
}

pub(super) fn be16(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

pub(super) fn ip_at(frame: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(frame[off], frame[off + 1], frame[off + 2], frame[off + 3])
}

/// What the programs make of a frame (packet.rs `parse`, mirrored).
#[derive(Clone, Copy, Debug)]
pub(super) enum View {
    /// Not IPv4, or an IPv4 header the programs refuse: version, header
    /// length below 20 or total length below the header.
    NotIpv4,
    /// A TCP/UDP fragment, or a TCP/UDP header cut short.
    Unusable,
    Ports {
        tuple: Tuple,
        l4_off: usize,
    },
    Icmp {
        icmp_off: usize,
        fragment: bool,
    },
    OtherIpv4,
}

pub(super) fn view_of(frame: &[u8]) -> View {
    if frame.len() < MIN_FRAME || frame[12..14] != [0x08, 0x00] {
        return View::NotIpv4;
    }
    let version_ihl = frame[ETH_HLEN];
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    let total_len = usize::from(be16(frame, IP_TOT_LEN.start));
    if version_ihl >> 4 != 4 || header_len < 20 || total_len < header_len {
        return View::NotIpv4;
    }
    let fragment = is_fragment(frame);
    let l4_off = ETH_HLEN + header_len;
    let protocol = frame[ETH_HLEN + 9];
    let min_l4 = match protocol {
        IPPROTO_ICMP => {
            return View::Icmp {
                icmp_off: l4_off,
                fragment,
            };
        }
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return View::OtherIpv4,
    };
    if fragment || total_len < header_len + min_l4 || frame.len() < l4_off + min_l4 {
        return View::Unusable;
    }
    View::Ports {
        tuple: Tuple::new(
            endpoint(ip_at(frame, IP_SRC.start), be16(frame, l4_off)),
            endpoint(ip_at(frame, IP_DST.start), be16(frame, l4_off + 2)),
            protocol,
        ),
        l4_off,
    }
}

/// Whether an IPv4 frame is a fragment: more fragments, or an offset.
pub(super) fn is_fragment(frame: &[u8]) -> bool {
    be16(frame, IP_FRAG.start) & 0x3fff != 0
}

/// Where a TCP/UDP packet's checksum lives.
pub(super) fn l4_csum(protocol: u8, l4_off: usize) -> Range<usize> {
    let at = l4_off + if protocol == IPPROTO_TCP { 16 } else { 6 };
    at..at + 2
}

/// Where mss.rs `clamp` lowers the MSS of a tunnelled TCP packet, and the
/// bytes it writes there: its walk over the options, on the bytes the
/// frame has. None when the packet is to be left alone (no SYN, no MSS
/// option, one at an odd offset or malformed, or not above the clamp).
pub(super) fn mss_rewrite(frame: &[u8], l4_off: usize) -> Option<(Range<usize>, [u8; 2])> {
    const END: u8 = 0;
    const NOP: u8 = 1;
    const MSS: u8 = 2;
    let flags = *frame.get(l4_off + 13)?;
    let data_offset = *frame.get(l4_off + 12)?;
    if flags & packets::TCP_SYN == 0 {
        return None;
    }
    let options_end = l4_off + (usize::from(data_offset >> 4) * 4).min(60);
    let mut offset = l4_off + 20;
    for _ in 0..40 {
        if offset >= options_end {
            return None;
        }
        match *frame.get(offset)? {
            END => return None,
            NOP => {
                offset += 1;
                continue;
            }
            _ => {}
        }
        if offset + 1 >= options_end {
            return None;
        }
        let len = *frame.get(offset + 1)?;
        if len < 2 {
            return None;
        }
        if frame[offset] == MSS {
            let value = offset + 2;
            if len != 4 || offset + 4 > options_end || !(value - l4_off).is_multiple_of(2) {
                return None;
            }
            let mss = u16::from_be_bytes([*frame.get(value)?, *frame.get(value + 1)?]);
            return (mss > TUNNEL_MSS_CLAMP)
                .then(|| (value..value + 2, TUNNEL_MSS_CLAMP.to_be_bytes()));
        }
        offset += usize::from(len);
    }
    None
}

/// IPv4 header and TCP/UDP/ICMP checksums both right (the L4 one needs the
/// whole IPv4 payload in the frame).
pub(super) fn checksums_ok(frame: &[u8]) -> bool {
    packets::ipv4_checksum_ok(frame) && packets::l4_checksum_ok(frame)
}

/// The first offset where `a` and `b` (of equal length) differ outside
/// `allowed`.
pub(super) fn changed_outside(a: &[u8], b: &[u8], allowed: &[Range<usize>]) -> Option<usize> {
    (0..a.len()).find(|&i| a[i] != b[i] && !allowed.iter().any(|r| r.contains(&i)))
}

/// The flow (client -> frontend) an ICMP error at `icmp_off` is about, as
/// icmp.rs `translate_inbound` reads it: type 3 or 11, quoting a 20-byte
/// IPv4 header sent from the address the error goes to, with its ports.
pub(super) fn quoted_flow(frame: &[u8], icmp_off: usize) -> Option<Tuple> {
    let icmp_type = *frame.get(icmp_off)?;
    if icmp_type != ICMP_DEST_UNREACHABLE && icmp_type != ICMP_TIME_EXCEEDED {
        return None;
    }
    let quoted = icmp_off + ICMP_HLEN;
    if frame.len() < quoted + 24 {
        return None;
    }
    let header_len = usize::from(frame[quoted] & 0x0f) * 4;
    if frame[quoted] >> 4 != 4 || header_len != 20 || usize::from(be16(frame, quoted + 2)) < 20 {
        return None;
    }
    let sent_from = ip_at(frame, quoted + 12);
    if sent_from != ip_at(frame, IP_DST.start) {
        return None;
    }
    Some(Tuple::new(
        endpoint(ip_at(frame, quoted + 16), be16(frame, quoted + 22)),
        endpoint(sent_from, be16(frame, quoted + 20)),
        frame[quoted + 9],
    ))
}

/// The standard configuration: the frontends read from the harness, the
/// node addresses and tunnel peers as [`TcHarness::standard`] sets them.
pub(super) struct Model {
    frontends: Vec<(Frontend, FrontendEntry)>,
    node_ips: Vec<Ipv4Addr>,
    /// TUNNEL_PEERS: every node of the cluster, this one included.
    peers: Vec<Ipv4Addr>,
}

impl Model {
    pub(super) fn new(harness: &TcHarness) -> Self {
        Self {
            frontends: harness
                .desired()
                .frontends
                .iter()
                .map(|(frontend, entry)| (*frontend, entry.clone()))
                .collect(),
            node_ips: vec![NODE],
            peers: vec![NODE, PEER],
        }
    }

    /// The frontend a packet from outside addresses, in tc.rs
    /// `find_frontend`'s order: externalIP/LB IP, nodePort on a node
    /// address, ClusterIP.
    pub(super) fn frontend(&self, tuple: &Tuple) -> Option<&FrontendEntry> {
        let protocol = Protocol::from_number(tuple.protocol)?;
        let find = |scope: Scope, ip: Ipv4Addr| {
            self.frontends
                .iter()
                .find(|(f, _)| {
                    f.scope == scope
                        && f.ip == ip
                        && f.port == tuple.dst.port
                        && f.protocol == protocol
                })
                .map(|(_, entry)| entry)
        };
        find(Scope::External, tuple.dst.ip)
            .or_else(|| {
                self.node_ips
                    .contains(&tuple.dst.ip)
                    .then(|| find(Scope::NodePort, Ipv4Addr::UNSPECIFIED))
                    .flatten()
            })
            .or_else(|| find(Scope::Cluster, tuple.dst.ip))
    }

    fn admits(entry: &FrontendEntry, source: Ipv4Addr) -> bool {
        entry.source_ranges.is_empty()
            || entry.source_ranges.iter().any(|range| {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(range.prefix_len))
                    .unwrap_or(0);
                u32::from(source) & mask == u32::from(range.ip) & mask
            })
    }

    /// The backend at `at` of the frontend `tuple` addresses, if the
    /// frontend admits the source.
    pub(super) fn backend(&self, tuple: &Tuple, at: Endpoint) -> Option<Backend> {
        let entry = self.frontend(tuple)?;
        if !Self::admits(entry, tuple.src.ip) {
            return None;
        }
        entry
            .backends
            .iter()
            .find(|b| b.ip == at.ip && b.port == at.port)
            .copied()
    }

    /// Whether `tuple` addresses a frontend that refuses it (no endpoints,
    /// kube-proxy's REJECT).
    pub(super) fn rejects(&self, tuple: &Tuple) -> bool {
        self.frontend(tuple).is_some_and(|entry| {
            entry.backends.is_empty()
                && !entry.drop_without_backends
                && Self::admits(entry, tuple.src.ip)
        })
    }

    /// VXLAN the ingress program unwraps (tunnel.rs `is_ours`).
    pub(super) fn is_our_vxlan(&self, frame: &[u8], view: &View) -> bool {
        let View::Ports { tuple, l4_off } = *view else {
            return false;
        };
        let vxlan = l4_off + 8;
        tuple.protocol == IPPROTO_UDP
            && tuple.dst.port == TUNNEL_PORT
            && self.node_ips.contains(&tuple.dst.ip)
            && self.peers.contains(&tuple.src.ip)
            && frame.len() >= vxlan + 8
            && frame[vxlan] & VXLAN_FLAG_VNI != 0
            && u32::from_be_bytes(frame[vxlan + 4..vxlan + 8].try_into().unwrap()) >> 8 == VNI
    }
}
