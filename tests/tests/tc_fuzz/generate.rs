//! The packets of a random run: weighted categories, built from what earlier
//! outcomes left to continue, reply to or quote, and mutated from there.

use std::net::Ipv4Addr;

use dataplane_testbed::{
    packets::{
        self, ETH_HLEN, Endpoint, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN,
        TCP_RST, TCP_SYN,
    },
    tc_harness::{Hook, standard::*},
};

use crate::{
    ICMP_DEST_UNREACHABLE, ICMP_HLEN, ICMP_TIME_EXCEEDED, IP_DST, IP_FRAG, IP_TOT_LEN, MAX_FRAME,
    MIN_FRAME,
    checker::{Flow, Path},
    model::{Tuple, endpoint, l4_csum},
    rng::Rng,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Category {
    TcpToFrontend,
    UdpToFrontend,
    WrongProtocol,
    NotAFrontend,
    FlowPacket,
    Hairpin,
    PodReply,
    TunnelledReply,
    HairpinReply,
    ReplyIntoTunnel,
    IcmpAboutFlow,
    IcmpUnrelated,
    VxlanFromPeer,
    VxlanGarbage,
    VxlanStranger,
    IpOptions,
    TcpOptions,
    Fragment,
    BadIhl,
    BadVersion,
    BadTotalLength,
    Truncated,
    ByteFlips,
    Padded,
    NotIpv4,
    RandomBytes,
    EgressStray,
}

/// Categories and their weights in a run.
const MIX: [(Category, usize); 27] = [
    (Category::TcpToFrontend, 10),
    (Category::UdpToFrontend, 6),
    (Category::WrongProtocol, 3),
    (Category::NotAFrontend, 6),
    (Category::FlowPacket, 6),
    (Category::Hairpin, 3),
    (Category::PodReply, 8),
    (Category::TunnelledReply, 4),
    (Category::HairpinReply, 2),
    (Category::ReplyIntoTunnel, 4),
    (Category::IcmpAboutFlow, 5),
    (Category::IcmpUnrelated, 3),
    (Category::VxlanFromPeer, 5),
    (Category::VxlanGarbage, 3),
    (Category::VxlanStranger, 3),
    (Category::IpOptions, 4),
    (Category::TcpOptions, 5),
    (Category::Fragment, 3),
    (Category::BadIhl, 2),
    (Category::BadVersion, 2),
    (Category::BadTotalLength, 3),
    (Category::Truncated, 3),
    (Category::ByteFlips, 5),
    (Category::Padded, 2),
    (Category::NotIpv4, 1),
    (Category::RandomBytes, 2),
    (Category::EgressStray, 3),
];

/// Categories a mutation starts from: packets as a sender would build them.
const BASES: [Category; 15] = [
    Category::TcpToFrontend,
    Category::UdpToFrontend,
    Category::WrongProtocol,
    Category::NotAFrontend,
    Category::FlowPacket,
    Category::Hairpin,
    Category::PodReply,
    Category::TunnelledReply,
    Category::HairpinReply,
    Category::ReplyIntoTunnel,
    Category::IcmpAboutFlow,
    Category::IcmpUnrelated,
    Category::VxlanFromPeer,
    Category::VxlanGarbage,
    Category::VxlanStranger,
];

const TCP_FRONTENDS: [(Ipv4Addr, u16); 7] = [
    (NODE, NODE_PORT),
    (NODE, LOCAL_NODE_PORT),
    (NODE, REMOTE_NODE_PORT),
    (NODE, EMPTY_NODE_PORT),
    (NODE, DROP_NODE_PORT),
    (LB_IP, 80),
    (CLUSTER_IP, 80),
];
const UDP_FRONTENDS: [(Ipv4Addr, u16); 3] = [
    (NODE, NODE_PORT),
    (NODE, EMPTY_NODE_PORT),
    (EXTERNAL_IP, 80),
];
pub(super) const OTHER_CLIENTS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(192, 0, 2, 101),
    Ipv4Addr::new(203, 0, 113, 7),
    Ipv4Addr::new(100, 64, 0, 1),
    Ipv4Addr::new(10, 201, 1, 3),
];
const TCP_FLAGS: [u8; 10] = [
    TCP_SYN,
    TCP_SYN | TCP_ACK,
    TCP_ACK,
    TCP_FIN | TCP_ACK,
    TCP_RST,
    TCP_RST | TCP_ACK,
    0,
    0x3f,
    0xff,
    TCP_FIN,
];

/// Builds packet `index` of a run from its generator and what the checker
/// remembers of earlier outcomes.
pub(super) struct Generator<'a> {
    pub(super) rng: Rng,
    pub(super) flows: &'a [Flow],
    pub(super) tunnelled_in: &'a [Tuple],
}

impl Generator<'_> {
    pub(super) fn generate(&mut self) -> (Category, Hook, Vec<u8>) {
        let total: usize = MIX.iter().map(|(_, weight)| weight).sum();
        let mut ticket = self.rng.below(total);
        let category = MIX
            .iter()
            .find(|(_, weight)| {
                let hit = ticket < *weight;
                ticket = ticket.saturating_sub(*weight);
                hit
            })
            .map(|(category, _)| *category)
            .unwrap();
        let (category, hook, mut frame) = self.build(category);
        if frame.len() < MIN_FRAME {
            frame.resize(MIN_FRAME, 0);
        }
        frame.truncate(MAX_FRAME);
        (category, hook, frame)
    }

    /// A packet of `category`; the category actually built (a packet that
    /// needs a remembered flow falls back when there is none yet).
    fn build(&mut self, category: Category) -> (Category, Hook, Vec<u8>) {
        let ingress = |frame| (category, Hook::Ingress, frame);
        match category {
            Category::TcpToFrontend => {
                let (ip, port) = self.rng.pick(&TCP_FRONTENDS);
                let from = if ip == LB_IP && self.rng.chance(50) {
                    endpoint(CLIENT, self.client_port())
                } else {
                    self.client()
                };
                ingress(self.tcp(from, endpoint(ip, port)))
            }
            Category::UdpToFrontend => {
                let (ip, port) = self.rng.pick(&UDP_FRONTENDS);
                let from = self.client();
                ingress(self.udp(from, endpoint(ip, port)))
            }
            Category::WrongProtocol => {
                let from = self.client();
                if self.rng.chance(20) {
                    ingress(self.tcp(from, endpoint(EXTERNAL_IP, 80)))
                } else {
                    let (ip, port) = self.rng.pick(&[
                        (LB_IP, 80),
                        (CLUSTER_IP, 80),
                        (NODE, LOCAL_NODE_PORT),
                        (NODE, REMOTE_NODE_PORT),
                        (NODE, DROP_NODE_PORT),
                    ]);
                    ingress(self.udp(from, endpoint(ip, port)))
                }
            }
            Category::NotAFrontend => ingress(self.not_a_frontend()),
            Category::FlowPacket => match self.flow() {
                Some(flow) => ingress(self.packet_of(flow.tuple)),
                None => self.build(Category::TcpToFrontend),
            },
            Category::Hairpin => {
                let pod = self.rng.pick(&[LOCAL_POD, REMOTE_POD]);
                let from = endpoint(pod, self.client_port());
                let frame = if self.rng.chance(25) {
                    self.udp(from, endpoint(NODE, NODE_PORT))
                } else {
                    let (ip, port) = self.rng.pick(&[
                        (NODE, NODE_PORT),
                        (NODE, LOCAL_NODE_PORT),
                        (NODE, REMOTE_NODE_PORT),
                        (CLUSTER_IP, 80),
                    ]);
                    self.tcp(from, endpoint(ip, port))
                };
                ingress(frame)
            }
            Category::PodReply => match self.flow_on(|path| path == Path::Local) {
                Some(flow) if self.rng.chance(85) => (
                    category,
                    Hook::Egress,
                    self.packet_of(Tuple::new(
                        flow.backend,
                        flow.tuple.src,
                        flow.tuple.protocol,
                    )),
                ),
                _ => {
                    let from = endpoint(LOCAL_POD, POD_PORT);
                    let to = self.client();
                    (category, Hook::Egress, self.tcp(from, to))
                }
            },
            Category::TunnelledReply => match self.flow_on(|path| path == Path::Tunnel) {
                Some(flow) => {
                    let reply = Tuple::new(flow.backend, flow.tuple.src, flow.tuple.protocol);
                    let inner = self.packet_of(reply);
                    ingress(packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &inner))
                }
                None => self.build(Category::VxlanFromPeer),
            },
            Category::HairpinReply => match self.flow_on(|path| matches!(path, Path::Snat(_))) {
                Some(Flow {
                    backend,
                    path: Path::Snat(node),
                    tuple,
                }) => ingress(self.packet_of(Tuple::new(backend, node, tuple.protocol))),
                _ => self.build(Category::Hairpin),
            },
            Category::ReplyIntoTunnel => {
                if self.tunnelled_in.is_empty() {
                    return self.build(Category::VxlanFromPeer);
                }
                let flow = self.rng.pick(self.tunnelled_in);
                (category, Hook::Egress, self.packet_of(flow.reversed()))
            }
            Category::IcmpAboutFlow => match self.flow() {
                Some(flow) => ingress(self.icmp_about(flow.tuple.reversed())),
                None => self.build(Category::IcmpUnrelated),
            },
            Category::IcmpUnrelated => ingress(self.icmp_unrelated()),
            Category::VxlanFromPeer => ingress(self.vxlan_from_peer()),
            Category::VxlanGarbage => ingress(self.vxlan_garbage()),
            Category::VxlanStranger => ingress(self.vxlan_stranger()),
            Category::IpOptions => {
                let (_, hook, base) = self.base();
                let words = self.rng.range(1..=10);
                let options = match self.rng.below(3) {
                    0 => vec![1; words * 4],
                    1 => {
                        let mut rr = vec![7, (words * 4 - 1) as u8, 4];
                        rr.resize(words * 4, 0);
                        rr
                    }
                    _ => self.rng.bytes(words * 4),
                };
                (category, hook, packets::with_ipv4_options(&base, &options))
            }
            Category::TcpOptions => {
                // A SYN to a frontend (tunnelled when its backend is
                // remote), or a backend's reply into the tunnel, with
                // options as stacks send them, and broken ones.
                let (hook, mut base) = match self.build(Category::ReplyIntoTunnel) {
                    (_, Hook::Egress, frame) if self.rng.chance(40) => (Hook::Egress, frame),
                    _ => (Hook::Ingress, self.build(Category::TcpToFrontend).2),
                };
                let tcp = ETH_HLEN + 20;
                if base.len() < tcp + 20 || base[ETH_HLEN + 9] != IPPROTO_TCP {
                    return (category, hook, base);
                }
                if self.rng.chance(80) {
                    base[tcp + 13] = if hook == Hook::Egress {
                        TCP_SYN | TCP_ACK
                    } else {
                        TCP_SYN
                    };
                }
                let mss = |value: u16| {
                    let [high, low] = value.to_be_bytes();
                    [2, 4, high, low]
                };
                let options: Vec<u8> = match self.rng.below(8) {
                    0 => mss(1460).to_vec(),
                    1 => mss(536).to_vec(),
                    // Linux: MSS, SACK permitted, timestamps, window scale.
                    2 => [
                        &mss(1460)[..],
                        &[4, 2, 8, 10],
                        &[0, 0, 1, 0, 0, 0, 0, 0],
                        &[1, 3, 3, 7],
                    ]
                    .concat(),
                    // After two NOPs: still an even offset.
                    3 => [&[1, 1][..], &mss(9000), &[1, 1]].concat(),
                    // After one NOP: an odd offset, left alone.
                    4 => [&[1][..], &mss(9000), &[0, 0, 0]].concat(),
                    // A wrong length, a length past the end, a zero length.
                    5 => vec![2, 3, 0x23, 0x28, 2, 4, 0x23, 0x28],
                    6 => vec![1, 1, 1, 2, 4, 0x23, 0x28, 0],
                    _ => {
                        let len = self.rng.range(1..=10) * 4;
                        self.rng.bytes(len)
                    }
                };
                (category, hook, packets::with_tcp_options(&base, &options))
            }
            Category::Fragment => {
                let (_, hook, mut frame) = self.base();
                let offset = self.rng.range(1..=0x1fff) as u16;
                let field = match self.rng.below(3) {
                    0 => 0x2000,
                    1 => offset,
                    _ => 0x2000 | offset,
                };
                frame[IP_FRAG].copy_from_slice(&field.to_be_bytes());
                packets::refresh_ipv4_checksum(&mut frame);
                (category, hook, frame)
            }
            Category::BadIhl => {
                let (_, hook, mut frame) = self.base();
                frame[ETH_HLEN] = 0x40 | self.rng.below(5) as u8;
                packets::refresh_ipv4_checksum(&mut frame);
                (category, hook, frame)
            }
            Category::BadVersion => {
                let (_, hook, mut frame) = self.base();
                let version = self.rng.pick(&[0u8, 1, 5, 6, 7, 15]);
                frame[ETH_HLEN] = version << 4 | (frame[ETH_HLEN] & 0x0f);
                packets::refresh_ipv4_checksum(&mut frame);
                (category, hook, frame)
            }
            Category::BadTotalLength => {
                let (_, hook, mut frame) = self.base();
                let ip_len = frame.len() - ETH_HLEN;
                let total_len = match self.rng.below(3) {
                    0 => self.rng.below(20),
                    1 => self.rng.range(20..=ip_len),
                    _ => self.rng.range(ip_len + 1..=65535),
                } as u16;
                frame[IP_TOT_LEN].copy_from_slice(&total_len.to_be_bytes());
                packets::refresh_ipv4_checksum(&mut frame);
                (category, hook, frame)
            }
            Category::Truncated => {
                let (_, hook, mut frame) = self.base();
                let len = self.rng.range(MIN_FRAME..=frame.len().max(MIN_FRAME));
                frame.truncate(len);
                (category, hook, frame)
            }
            Category::ByteFlips => {
                let (_, hook, mut frame) = self.base();
                let span = frame.len().min(ETH_HLEN + 60 + 40);
                for _ in 0..self.rng.range(1..=6) {
                    let at = self.rng.range(12..=span - 1);
                    frame[at] ^= if self.rng.chance(50) {
                        1 << self.rng.below(8)
                    } else {
                        self.rng.byte()
                    };
                }
                if self.rng.chance(50) {
                    packets::refresh_ipv4_checksum(&mut frame);
                }
                (category, hook, frame)
            }
            Category::Padded => {
                let (_, hook, mut frame) = self.base();
                let len = self.rng.range(1..=46);
                let padding = if self.rng.chance(50) {
                    vec![0; len]
                } else {
                    self.rng.bytes(len)
                };
                frame.extend_from_slice(&padding);
                (category, hook, frame)
            }
            Category::NotIpv4 => {
                let (_, hook, mut frame) = self.base();
                let random = self.rng.next_u64() as u16;
                let ether_type = self.rng.pick(&[0x86dd, 0x0806, 0x8100, 0x88a8, random]);
                frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
                (category, hook, frame)
            }
            Category::RandomBytes => {
                let len = self.rng.range(MIN_FRAME..=300);
                let mut frame = self.rng.bytes(len);
                frame[12..14].copy_from_slice(&[0x08, 0x00]);
                if self.rng.chance(70) {
                    frame[ETH_HLEN] = 0x45;
                    let random = self.rng.byte();
                    frame[ETH_HLEN + 9] =
                        self.rng
                            .pick(&[IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMP, random]);
                    let to = self.rng.pick(&[NODE, LB_IP, EXTERNAL_IP, CLUSTER_IP]);
                    frame[IP_DST].copy_from_slice(&to.octets());
                }
                let hook = if self.rng.chance(20) {
                    Hook::Egress
                } else {
                    Hook::Ingress
                };
                (category, hook, frame)
            }
            Category::EgressStray => {
                let (_, _, frame) = self.base();
                (category, Hook::Egress, frame)
            }
        }
    }

    /// An unmutated packet to mutate.
    fn base(&mut self) -> (Category, Hook, Vec<u8>) {
        let category = self.rng.pick(&BASES);
        let (category, hook, mut frame) = self.build(category);
        // Room for options and the 60-byte maximum header.
        frame.truncate(MAX_FRAME - 40);
        (category, hook, frame)
    }

    fn client_port(&mut self) -> u16 {
        match self.rng.below(20) {
            0 => 0,
            1 => 65535,
            2 => 80,
            _ => self.rng.range(1024..=65535) as u16,
        }
    }

    fn client(&mut self) -> Endpoint {
        let ip = match self.rng.below(10) {
            0..=4 => CLIENT,
            5..=7 => self.rng.pick(&OTHER_CLIENTS),
            _ => self.rng.ip(),
        };
        endpoint(ip, self.client_port())
    }

    fn payload(&mut self) -> Vec<u8> {
        let len = match self.rng.below(10) {
            0..=5 => 0,
            6..=8 => self.rng.range(1..=64),
            _ => self.rng.range(65..=1300),
        };
        self.rng.bytes(len)
    }

    fn tcp(&mut self, from: Endpoint, to: Endpoint) -> Vec<u8> {
        let flags = if self.rng.chance(10) {
            self.rng.byte()
        } else {
            self.rng.pick(&TCP_FLAGS)
        };
        let payload = self.payload();
        packets::tcp(from, to, flags, &payload)
    }

    fn udp(&mut self, from: Endpoint, to: Endpoint) -> Vec<u8> {
        let payload = self.payload();
        let mut frame = packets::udp(from, to, &payload);
        if self.rng.chance(10) {
            // No checksum: must stay none through a rewrite.
            let csum = l4_csum(IPPROTO_UDP, ETH_HLEN + 20);
            frame[csum].fill(0);
        }
        frame
    }

    fn packet_of(&mut self, tuple: Tuple) -> Vec<u8> {
        if tuple.protocol == IPPROTO_TCP {
            self.tcp(tuple.src, tuple.dst)
        } else {
            self.udp(tuple.src, tuple.dst)
        }
    }

    fn flow(&mut self) -> Option<Flow> {
        (!self.flows.is_empty()).then(|| self.rng.pick(self.flows))
    }

    /// A remembered flow on `path`, if one is found in a few tries.
    fn flow_on(&mut self, path: impl Fn(Path) -> bool) -> Option<Flow> {
        (0..16)
            .filter_map(|_| self.flow())
            .find(|flow| path(flow.path))
    }

    fn not_a_frontend(&mut self) -> Vec<u8> {
        let from = self.client();
        for _ in 0..16 {
            let (random_ip, random_port) = (self.rng.ip(), self.rng.next_u64() as u16);
            let ip = self.rng.pick(&[
                NODE,
                LB_IP,
                EXTERNAL_IP,
                CLUSTER_IP,
                PEER,
                LOCAL_POD,
                REMOTE_POD,
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                random_ip,
            ]);
            let port = self.rng.pick(&[
                0,
                65535,
                79,
                81,
                NODE_PORT - 1,
                REMOTE_NODE_PORT + 1,
                EMPTY_NODE_PORT - 1,
                DROP_NODE_PORT + 1,
                POD_PORT,
                NODE_PORT,
                80,
                random_port,
            ]);
            let protocol = self.rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
            let tuple = Tuple::new(from, endpoint(ip, port), protocol);
            if !is_frontend_or_tunnel(&tuple) {
                return self.packet_of(tuple);
            }
        }
        self.tcp(from, endpoint(NODE, 1))
    }

    /// An ICMP error about a packet `sent` (frontend -> client, as this
    /// node sent it), from a router on the way.
    fn icmp_about(&mut self, sent: Tuple) -> Vec<u8> {
        let quoted = self.packet_of(sent);
        let (icmp_type, code) = self.rng.pick(&[
            (ICMP_DEST_UNREACHABLE, 3),
            (ICMP_DEST_UNREACHABLE, 4),
            (ICMP_DEST_UNREACHABLE, 1),
            (ICMP_DEST_UNREACHABLE, 13),
            (ICMP_TIME_EXCEEDED, 0),
            (ICMP_TIME_EXCEEDED, 1),
        ]);
        let (random_ip, random_mtu) = (self.rng.ip(), self.rng.next_u64() as u16);
        let router = self
            .rng
            .pick(&[CLIENT, Ipv4Addr::new(198, 18, 0, 1), random_ip]);
        let mtu = self.rng.pick(&[0, 576, 1400, 1450, random_mtu]);
        packets::icmp_error(router, sent.src.ip, icmp_type, code, mtu, &quoted)
    }

    fn icmp_unrelated(&mut self) -> Vec<u8> {
        let frontend = self
            .rng
            .pick(&[(NODE, LOCAL_NODE_PORT), (NODE, NODE_PORT), (LB_IP, 80)]);
        let client = self.client();
        let protocol = self.rng.pick(&[IPPROTO_TCP, IPPROTO_UDP]);
        let sent = Tuple::new(endpoint(frontend.0, frontend.1), client, protocol);
        match self.rng.below(6) {
            // About a flow that never was.
            0 => self.icmp_about(sent),
            // The wrong way round: about a packet to the frontend.
            1 => self.icmp_about(sent.reversed()),
            // To another address than the one it quotes.
            2 => {
                let mut frame = self.icmp_about(sent);
                frame[IP_DST].copy_from_slice(&PEER.octets());
                packets::refresh_ipv4_checksum(&mut frame);
                frame
            }
            // The quote cut before its ports.
            3 => {
                let mut frame = self.icmp_about(sent);
                frame.truncate(ETH_HLEN + 20 + ICMP_HLEN + 20);
                frame
            }
            // Echo request and reply to a frontend.
            4 => {
                let mut icmp = vec![self.rng.pick(&[0, 8]), 0, 0, 0];
                let len = self.rng.range(4..=60);
                icmp.extend(self.rng.bytes(len));
                let checksum = packets::fold(packets::sum(&icmp, 0));
                icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
                let mut ip =
                    packets::ipv4_header(client.ip, frontend.0, IPPROTO_ICMP, icmp.len(), &[]);
                ip.extend_from_slice(&icmp);
                packets::ethernet(&ip)
            }
            // A quote with IPv4 options.
            _ => {
                let quoted = packets::with_ipv4_options(&self.packet_of(sent), &[1, 1, 1, 0]);
                packets::icmp_error(
                    Ipv4Addr::new(198, 18, 0, 1),
                    sent.src.ip,
                    ICMP_DEST_UNREACHABLE,
                    4,
                    1400,
                    &quoted,
                )
            }
        }
    }

    fn vxlan_from_peer(&mut self) -> Vec<u8> {
        let peer = if self.rng.chance(90) { PEER } else { NODE };
        let client = self.client();
        let inner = match self.rng.below(5) {
            0 | 1 => self.tcp(client, endpoint(LOCAL_POD, POD_PORT)),
            2 => self.udp(client, endpoint(LOCAL_POD, POD_PORT)),
            3 => {
                let to = endpoint(self.rng.ip(), self.client_port());
                self.tcp(client, to)
            }
            _ => {
                let sent = Tuple::new(endpoint(LOCAL_POD, POD_PORT), client, IPPROTO_TCP);
                self.icmp_about(sent)
            }
        };
        packets::vxlan(peer, NODE, TUNNEL_PORT, VNI, &inner)
    }

    fn vxlan_garbage(&mut self) -> Vec<u8> {
        let client = self.client();
        let inner = match self.rng.below(4) {
            0 => {
                let len = self.rng.range(0..=120);
                self.rng.bytes(len)
            }
            1 => {
                let mut inner = self.tcp(client, endpoint(LOCAL_POD, POD_PORT));
                let len = self.rng.range(0..=inner.len());
                inner.truncate(len);
                inner
            }
            2 => {
                let mut inner = self.udp(client, endpoint(LOCAL_POD, POD_PORT));
                inner[ETH_HLEN] = self.rng.pick(&[0x60, 0x44, 0x4f, 0x00]);
                inner
            }
            _ => {
                let mut inner = self.tcp(client, endpoint(LOCAL_POD, POD_PORT));
                inner[12..14].copy_from_slice(&[0x08, 0x06]);
                inner
            }
        };
        packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &inner)
    }

    fn vxlan_stranger(&mut self) -> Vec<u8> {
        let client = self.client();
        let inner = self.tcp(client, endpoint(LOCAL_POD, POD_PORT));
        match self.rng.below(5) {
            0 => {
                let random = self.rng.ip();
                let from = self.rng.pick(&[CLIENT, LOCAL_POD, random]);
                packets::vxlan(from, NODE, TUNNEL_PORT, VNI, &inner)
            }
            1 => {
                let vni = VNI ^ self.rng.range(1..=0xff_ffff) as u32;
                packets::vxlan(PEER, NODE, TUNNEL_PORT, vni & 0xff_ffff, &inner)
            }
            2 => {
                let mut frame = packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &inner);
                // Without the "VNI valid" flag.
                frame[ETH_HLEN + 20 + 8] = 0;
                frame
            }
            3 => packets::vxlan(PEER, NODE, TUNNEL_PORT + 1, VNI, &inner),
            _ => {
                let to = self.rng.pick(&[LB_IP, PEER, EXTERNAL_IP]);
                packets::vxlan(PEER, to, TUNNEL_PORT, VNI, &inner)
            }
        }
    }
}

/// Whether `tuple` goes to a frontend of the standard configuration or to
/// the tunnel port (for generation; the checks use [`Model::frontend`]).
fn is_frontend_or_tunnel(tuple: &Tuple) -> bool {
    let frontends: &[(Ipv4Addr, u16)] = if tuple.protocol == IPPROTO_TCP {
        &TCP_FRONTENDS
    } else {
        &UDP_FRONTENDS
    };
    frontends.contains(&(tuple.dst.ip, tuple.dst.port))
        || (tuple.protocol == IPPROTO_UDP && tuple.dst.port == TUNNEL_PORT)
}
