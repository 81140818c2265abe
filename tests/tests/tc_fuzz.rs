//! Packet fuzzing of the node-interface programs (issue #8): seeded streams
//! of generated and mutated packets through tc_ingress and tc_egress
//! (BPF_PROG_TEST_RUN, real maps, the harness' standard configuration), and
//! a fixed set of corner cases. Every outcome is checked against a model of
//! that configuration:
//!
//! 1. the verdict is pass, ok, drop or redirect;
//! 2. a packet that is none of ours (no frontend, no conntrack flow, not our
//!    tunnel, not an ICMP error about a translated flow) is passed
//!    untouched; fragments and malformed IPv4 headers are never changed;
//! 3. a new destination is a backend of the frontend the packet addressed
//!    (tunnelled: wrapped for that backend's node), never another
//!    Service's; only addresses, ports and checksums change;
//! 4. checksums that were right stay right; answers are always right.
//!
//! `DATAPLANE_FUZZ_PACKETS` (default [`DEFAULT_PACKETS`]) and
//! `DATAPLANE_FUZZ_SEED` (decimal or 0x-hex) choose the run; the seed and
//! per-category counts are printed at the end (`--nocapture`). The stream
//! is a function of the seed and of the backends the programs pick at
//! random (replies and ICMP errors quote the flows they translated).

// Test code: a failed unwrap is a failed test, with its location.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::Ipv4Addr,
    ops::{Range, RangeInclusive},
    time::Instant,
};

use dataplane_agent::model::{Backend, Frontend, FrontendEntry, Protocol, Scope};
use dataplane_common::{
    CT_FLAG_FIN_SEEN, CT_FLAG_RST_SEEN, CT_FLAG_SNAT, CT_FORWARD, CT_REPLY, CT_TUNNEL_RETURN,
    CtKey, CtValue,
};
use dataplane_testbed::{
    packets::{
        self, ETH_HLEN, Endpoint, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN,
        TCP_RST, TCP_SYN,
    },
    tc_harness::{
        Hook, Outcome, TcHarness, VERDICT_DROP, VERDICT_OK, VERDICT_PASS, VERDICT_REDIRECT,
        standard::*,
    },
};

/// Packets of the default run: about 10 s on a 2-core machine.
const DEFAULT_PACKETS: u64 = 600_000;
const DEFAULT_SEED: u64 = 0x0008_f022;
/// CONNTRACK (an LRU map) is emptied this often so it never evicts.
const CLEAR_EVERY: u64 = 50_000;
/// Failing packets shown per broken rule (all are counted).
const EXAMPLES_PER_RULE: usize = 3;
/// Frames BPF_PROG_TEST_RUN accepts: Ethernet + a 20-byte IPv4 header at
/// least, and well within a page.
const MIN_FRAME: usize = ETH_HLEN + 20;
const MAX_FRAME: usize = 1500;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet (tunnel.rs `OVERHEAD`); with
/// the outer Ethernet header in front, the inner Ethernet header of a
/// wrapped frame starts at the same offset.
const VXLAN_OVERHEAD: usize = 20 + 8 + 8 + ETH_HLEN;
/// The standard configuration's SNAT source ports (hairpin only, in tunnel
/// mode).
const SNAT_PORTS: RangeInclusive<u16> = 61000..=65535;
/// Flows remembered to generate their later packets, replies and errors.
const REMEMBERED_FLOWS: usize = 4096;

/// Field offsets in an Ethernet/IPv4 frame.
const IP_TOT_LEN: Range<usize> = ETH_HLEN + 2..ETH_HLEN + 4;
const IP_FRAG: Range<usize> = ETH_HLEN + 6..ETH_HLEN + 8;
const IP_CSUM: Range<usize> = ETH_HLEN + 10..ETH_HLEN + 12;
const IP_SRC: Range<usize> = ETH_HLEN + 12..ETH_HLEN + 16;
const IP_DST: Range<usize> = ETH_HLEN + 16..ETH_HLEN + 20;
const ICMP_HLEN: usize = 8;
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const VXLAN_FLAG_VNI: u8 = 0x08;

// ---------------------------------------------------------------------------
// A small seeded generator.

/// splitmix64: tiny, seedable, and good enough to choose packets.
struct Rng(u64);

impl Rng {
    /// Packet `index`'s own generator, so every packet of a run follows
    /// from the seed and its number.
    fn for_packet(seed: u64, index: u64) -> Self {
        let mut rng = Self(seed ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03));
        rng.next_u64();
        rng
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn range(&mut self, range: RangeInclusive<usize>) -> usize {
        range.start() + self.below(range.end() - range.start() + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    fn ip(&mut self) -> Ipv4Addr {
        Ipv4Addr::from(self.next_u64() as u32)
    }
}

// ---------------------------------------------------------------------------
// The model: what the standard configuration says about a packet.

/// A TCP/UDP packet's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Tuple {
    src: Endpoint,
    dst: Endpoint,
    protocol: u8,
}

impl Tuple {
    fn new(src: Endpoint, dst: Endpoint, protocol: u8) -> Self {
        Self { src, dst, protocol }
    }

    fn reversed(self) -> Self {
        Self::new(self.dst, self.src, self.protocol)
    }

    fn of_key(key: &CtKey) -> Self {
        Self::new(
            endpoint_of_map(key.src_be, key.src_port_be),
            endpoint_of_map(key.dst_be, key.dst_port_be),
            key.protocol,
        )
    }
}

fn endpoint(ip: Ipv4Addr, port: u16) -> Endpoint {
    Endpoint { ip, port }
}

/// An address and port as the maps hold them (network byte order).
fn endpoint_of_map(ip_be: u32, port_be: u16) -> Endpoint {
    endpoint(
        Ipv4Addr::from(ip_be.to_ne_bytes()),
        u16::from_be_bytes(port_be.to_ne_bytes()),
    )
}

fn be16(frame: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([frame[off], frame[off + 1]])
}

fn ip_at(frame: &[u8], off: usize) -> Ipv4Addr {
    Ipv4Addr::new(frame[off], frame[off + 1], frame[off + 2], frame[off + 3])
}

/// What the programs make of a frame (packet.rs `parse`, mirrored).
#[derive(Clone, Copy, Debug)]
enum View {
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

fn view_of(frame: &[u8]) -> View {
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
fn is_fragment(frame: &[u8]) -> bool {
    be16(frame, IP_FRAG.start) & 0x3fff != 0
}

/// Where a TCP/UDP packet's checksum lives.
fn l4_csum(protocol: u8, l4_off: usize) -> Range<usize> {
    let at = l4_off + if protocol == IPPROTO_TCP { 16 } else { 6 };
    at..at + 2
}

/// IPv4 header and TCP/UDP/ICMP checksums both right (the L4 one needs the
/// whole IPv4 payload in the frame).
fn checksums_ok(frame: &[u8]) -> bool {
    packets::ipv4_checksum_ok(frame) && packets::l4_checksum_ok(frame)
}

/// The first offset where `a` and `b` (of equal length) differ outside
/// `allowed`.
fn changed_outside(a: &[u8], b: &[u8], allowed: &[Range<usize>]) -> Option<usize> {
    (0..a.len()).find(|&i| a[i] != b[i] && !allowed.iter().any(|r| r.contains(&i)))
}

/// The flow (client -> frontend) an ICMP error at `icmp_off` is about, as
/// icmp.rs `translate_inbound` reads it: type 3 or 11, quoting a 20-byte
/// IPv4 header sent from the address the error goes to, with its ports.
fn quoted_flow(frame: &[u8], icmp_off: usize) -> Option<Tuple> {
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
struct Model {
    frontends: Vec<(Frontend, FrontendEntry)>,
    node_ips: Vec<Ipv4Addr>,
    /// TUNNEL_PEERS: every node of the cluster, this one included.
    peers: Vec<Ipv4Addr>,
}

impl Model {
    fn new(harness: &TcHarness) -> Self {
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
    fn frontend(&self, tuple: &Tuple) -> Option<&FrontendEntry> {
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
    fn backend(&self, tuple: &Tuple, at: Endpoint) -> Option<Backend> {
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
    fn rejects(&self, tuple: &Tuple) -> bool {
        self.frontend(tuple).is_some_and(|entry| {
            entry.backends.is_empty()
                && !entry.drop_without_backends
                && Self::admits(entry, tuple.src.ip)
        })
    }

    /// VXLAN the ingress program unwraps (tunnel.rs `is_ours`).
    fn is_our_vxlan(&self, frame: &[u8], view: &View) -> bool {
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

// ---------------------------------------------------------------------------
// Conntrack as the checks see it.

/// What a conntrack entry does to the packets of its tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracked {
    /// `closed`: a FIN or RST was seen (a SYN then opens a new flow).
    Forward {
        snat: bool,
        closed: bool,
    },
    /// Replies get the frontend as their source; SNATed ones go back to
    /// their client.
    Reply {
        frontend: Endpoint,
        client: Option<Endpoint>,
    },
    TunnelReturn {
        node: Ipv4Addr,
    },
}

impl Tracked {
    fn of_value(value: &CtValue) -> Option<Self> {
        let snat = value.flags & CT_FLAG_SNAT != 0;
        match value.kind {
            CT_FORWARD => Some(Self::Forward {
                snat,
                closed: value.flags & (CT_FLAG_FIN_SEEN | CT_FLAG_RST_SEEN) != 0,
            }),
            CT_REPLY => Some(Self::Reply {
                frontend: endpoint_of_map(value.nat_ip_be, value.nat_port_be),
                client: snat.then(|| endpoint_of_map(value.snat_ip_be, value.snat_port_be)),
            }),
            CT_TUNNEL_RETURN => Some(Self::TunnelReturn {
                node: Ipv4Addr::from(value.tunnel_ip_be.to_ne_bytes()),
            }),
            _ => None,
        }
    }
}

/// A flow the programs translated, remembered to generate its later
/// packets, its replies and ICMP errors about it.
#[derive(Clone, Copy, Debug)]
struct Flow {
    /// Client -> frontend.
    tuple: Tuple,
    backend: Endpoint,
    path: Path,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Local,
    Tunnel,
    /// Hairpin: the backend sees this node's address and port.
    Snat(Endpoint),
}

/// What a program did to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Effect {
    Untouched,
    Rewritten,
    Wrapped,
    Unwrapped,
    Answered,
}

const EFFECTS: [Effect; 5] = [
    Effect::Untouched,
    Effect::Rewritten,
    Effect::Wrapped,
    Effect::Unwrapped,
    Effect::Answered,
];

/// The model, the conntrack entries the programs made (a shadow built from
/// the translations seen, with the real map as the fallback before a
/// packet is called a failure), and the flows remembered.
struct Checker {
    model: Model,
    shadow: HashMap<Tuple, Tracked>,
    /// How often the shadow missed and the real map was read.
    conntrack_reads: u64,
    flows: Vec<Flow>,
    /// Flows another node tunnelled to a pod here (client -> pod).
    tunnelled_in: Vec<Tuple>,
    remembered: usize,
}

/// A broken invariant: the rule (failures are grouped by it) and the
/// particulars of this packet.
#[derive(Debug)]
struct Violation {
    rule: &'static str,
    detail: String,
}

fn broken(rule: &'static str) -> Violation {
    Violation {
        rule,
        detail: String::new(),
    }
}

fn broken_as(rule: &'static str, detail: String) -> Violation {
    Violation { rule, detail }
}

type Verdict<T> = Result<T, Violation>;

impl Checker {
    fn new(harness: &TcHarness) -> Self {
        Self {
            model: Model::new(harness),
            shadow: HashMap::new(),
            conntrack_reads: 0,
            flows: Vec::new(),
            tunnelled_in: Vec::new(),
            remembered: 0,
        }
    }

    /// After CONNTRACK was emptied.
    fn forget(&mut self) {
        self.shadow.clear();
        self.flows.clear();
        self.tunnelled_in.clear();
    }

    /// The conntrack entry of `tuple`. Only packets to a frontend create
    /// an entry under their own tuple, so reading the real map after the
    /// run tells what it held before for every other packet.
    fn tracked(&mut self, harness: &TcHarness, tuple: &Tuple) -> Option<Tracked> {
        if let Some(tracked) = self.shadow.get(tuple) {
            return Some(*tracked);
        }
        self.conntrack_reads += 1;
        let entries = harness.conntrack().expect("reading CONNTRACK");
        entries
            .iter()
            .find(|(key, _)| Tuple::of_key(key) == *tuple)
            .and_then(|(_, value)| Tracked::of_value(value))
    }

    fn remember(&mut self, flow: Flow) {
        if self.flows.len() < REMEMBERED_FLOWS {
            self.flows.push(flow);
        } else {
            self.flows[self.remembered % REMEMBERED_FLOWS] = flow;
        }
        self.remembered += 1;
    }

    /// Checks one outcome; on success, learns the entries it made.
    fn check(
        &mut self,
        harness: &TcHarness,
        hook: Hook,
        input: &[u8],
        out: &Outcome,
    ) -> Verdict<Effect> {
        if ![VERDICT_PASS, VERDICT_OK, VERDICT_DROP, VERDICT_REDIRECT].contains(&out.verdict) {
            return Err(broken_as(
                "1: verdict none of pass, ok, drop, redirect",
                format!("verdict {}", out.verdict),
            ));
        }
        let view = view_of(input);
        let changed = out.packet != input;
        if !changed && out.verdict == VERDICT_PASS {
            return Ok(Effect::Untouched);
        }
        let vxlan = hook == Hook::Ingress && self.model.is_our_vxlan(input, &view);
        if !self.may_act(harness, hook, input, &view, vxlan) {
            let rule = match (changed, view) {
                (false, _) => "2: did not pass a packet that is none of ours",
                (true, View::NotIpv4) => "2: changed a malformed IPv4 header (or not IPv4)",
                (true, _) if is_fragment(input) => "2: changed a fragment",
                (true, _) => "2: changed a packet that is none of ours",
            };
            return Err(broken_as(rule, format!("{view:?}")));
        }
        if !changed {
            return Ok(Effect::Untouched);
        }
        let output = &out.packet[..];
        if vxlan {
            return self.check_unwrapped(harness, input, &view, output, out.verdict);
        }
        if is_answer(input, &view, output) {
            return self.check_answer(hook, input, &view, output);
        }
        if output.len() == input.len() + VXLAN_OVERHEAD
            && packets::parse(output).is_some_and(|p| {
                p.protocol == IPPROTO_UDP && p.ports.is_some_and(|(_, dst)| dst == TUNNEL_PORT)
            })
        {
            return self.check_wrapped(harness, hook, input, &view, output);
        }
        self.check_rewritten(harness, hook, input, &view, output)
    }

    /// Invariant 2: whether the program may change or drop the packet.
    fn may_act(
        &mut self,
        harness: &TcHarness,
        hook: Hook,
        input: &[u8],
        view: &View,
        vxlan: bool,
    ) -> bool {
        match (*view, hook) {
            (View::Ports { tuple, .. }, Hook::Ingress) => {
                vxlan
                    || self.model.frontend(&tuple).is_some()
                    || matches!(
                        self.tracked(harness, &tuple),
                        Some(
                            Tracked::Forward { .. }
                                | Tracked::Reply {
                                    client: Some(_),
                                    ..
                                }
                        )
                    )
            }
            (View::Ports { tuple, .. }, Hook::Egress) => matches!(
                self.tracked(harness, &tuple),
                Some(Tracked::Reply { client: None, .. } | Tracked::TunnelReturn { .. })
            ),
            (
                View::Icmp {
                    icmp_off,
                    fragment: false,
                },
                Hook::Ingress,
            ) => quoted_flow(input, icmp_off).is_some_and(|flow| {
                matches!(
                    self.tracked(harness, &flow),
                    Some(Tracked::Forward { snat: false, .. })
                )
            }),
            _ => false,
        }
    }

    /// Translated in place: DNAT (and hairpin SNAT) on ingress, the
    /// frontend as the source of a reply on egress, an ICMP error's
    /// destination and quote on ingress.
    fn check_rewritten(
        &mut self,
        harness: &TcHarness,
        hook: Hook,
        input: &[u8],
        view: &View,
        output: &[u8],
    ) -> Verdict<Effect> {
        if output.len() != input.len() {
            return Err(broken_as(
                "3: rewritten to another length",
                format!("{} -> {} bytes", input.len(), output.len()),
            ));
        }
        match (*view, hook) {
            (View::Ports { tuple, l4_off }, _) => {
                let mut allowed = vec![
                    IP_CSUM,
                    IP_SRC,
                    l4_off..l4_off + 2,
                    l4_csum(tuple.protocol, l4_off),
                ];
                if hook == Hook::Ingress {
                    allowed.extend([IP_DST, l4_off + 2..l4_off + 4]);
                }
                if let Some(at) = changed_outside(input, output, &allowed) {
                    return Err(broken_as(
                        "3: changed a byte that is no address, port or checksum",
                        format!("byte {at}"),
                    ));
                }
                let new = Tuple::new(
                    endpoint(ip_at(output, IP_SRC.start), be16(output, l4_off)),
                    endpoint(ip_at(output, IP_DST.start), be16(output, l4_off + 2)),
                    tuple.protocol,
                );
                if hook == Hook::Ingress {
                    let flags = tcp_flags(input, &tuple, l4_off);
                    self.check_inbound(harness, &tuple, &new, None, flags)?;
                } else {
                    self.check_reply_source(harness, &tuple, &new)?;
                }
            }
            (View::Icmp { icmp_off, .. }, Hook::Ingress) => {
                self.check_icmp(harness, input, output, icmp_off, None)?;
            }
            _ => return Err(broken("2: changed a packet that is none of ours")),
        }
        if checksums_ok(input) && !checksums_ok(output) {
            return Err(broken("4: checksums right before a rewrite, wrong after"));
        }
        Ok(Effect::Rewritten)
    }

    /// Invariant 3 for an inbound TCP/UDP packet rewritten from `old` to
    /// `new`, in place (`tunnel` None) or wrapped for `tunnel`. Learns the
    /// entries a new flow makes (tc.rs `new_flow`, `new_snat_flow`).
    fn check_inbound(
        &mut self,
        harness: &TcHarness,
        old: &Tuple,
        new: &Tuple,
        tunnel: Option<Ipv4Addr>,
        tcp_flags: u8,
    ) -> Verdict<()> {
        let snat = new.src != old.src;
        if new.dst == old.dst {
            return Err(broken(if snat {
                "3: source rewritten, destination kept"
            } else {
                "3: checksum bytes changed without a translation"
            }));
        }
        if let Some(backend) = self.model.backend(old, new.dst) {
            if snat {
                // Hairpin (a backend reaching its own Service from outside)
                // is the one SNAT of tunnel mode, and is routed, not
                // tunnelled.
                let hairpin = backend.ip == old.src.ip;
                if tunnel.is_some()
                    || !hairpin
                    || new.src.ip != NODE
                    || !SNAT_PORTS.contains(&new.src.port)
                {
                    return Err(broken_as(
                        "3: source rewritten for a flow that is no hairpin",
                        format!("to {}:{}", new.src.ip, new.src.port),
                    ));
                }
            } else if backend.remote_node != tunnel {
                return Err(broken_as(
                    "3: backend reached the wrong way",
                    format!(
                        "backend {}:{} of node {:?} reached through {tunnel:?}",
                        backend.ip, backend.port, backend.remote_node
                    ),
                ));
            }
            self.learn_forward(old, new, tunnel, tcp_flags);
            return Ok(());
        }
        // A reply of a hairpin flow, back to its client from the frontend.
        if tunnel.is_none()
            && let Some(Tracked::Reply {
                frontend,
                client: Some(client),
            }) = self.tracked(harness, old)
            && new.dst == client
            && new.src == frontend
        {
            return Ok(());
        }
        Err(broken_as(
            "3: destination rewritten to no backend of the frontend addressed",
            format!(
                "{}:{} -> {}:{} rewritten to {}:{} -> {}:{}",
                old.src.ip,
                old.src.port,
                old.dst.ip,
                old.dst.port,
                new.src.ip,
                new.src.port,
                new.dst.ip,
                new.dst.port
            ),
        ))
    }

    /// A packet of a known flow refreshes its entry (a FIN or RST marks it
    /// closed); anything else to a frontend, or a SYN reopening a closed
    /// tuple, is a new flow: both entries written anew (conntrack.rs).
    fn learn_forward(&mut self, old: &Tuple, new: &Tuple, tunnel: Option<Ipv4Addr>, flags: u8) {
        let reopens = old.protocol == IPPROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if let Some(Tracked::Forward { closed, .. }) = self.shadow.get_mut(old)
            && !(reopens && *closed)
        {
            *closed |= flags & (TCP_FIN | TCP_RST) != 0;
            return;
        }
        let snat = new.src != old.src;
        self.shadow.insert(
            *old,
            Tracked::Forward {
                snat,
                closed: false,
            },
        );
        self.shadow.insert(
            new.reversed(),
            Tracked::Reply {
                frontend: old.dst,
                client: snat.then_some(old.src),
            },
        );
        self.remember(Flow {
            tuple: *old,
            backend: new.dst,
            path: match (tunnel, snat) {
                (Some(_), _) => Path::Tunnel,
                (None, true) => Path::Snat(new.src),
                (None, false) => Path::Local,
            },
        });
    }

    /// A reply of a local backend leaves from the frontend its client
    /// dialled.
    fn check_reply_source(&mut self, harness: &TcHarness, old: &Tuple, new: &Tuple) -> Verdict<()> {
        if new.src == old.src {
            return Err(broken("3: checksum bytes changed without a translation"));
        }
        match self.tracked(harness, old) {
            Some(Tracked::Reply {
                frontend,
                client: None,
            }) if new.src == frontend && self.model.frontend(&new.reversed()).is_some() => Ok(()),
            tracked => Err(broken_as(
                "3: reply source rewritten to another than the frontend dialled",
                format!("to {}:{}, entry {tracked:?}", new.src.ip, new.src.port),
            )),
        }
    }

    /// An ICMP error about a translated flow goes to the flow's backend,
    /// quoting the packet as the backend sent it.
    fn check_icmp(
        &mut self,
        harness: &TcHarness,
        input: &[u8],
        output: &[u8],
        icmp_off: usize,
        tunnel: Option<Ipv4Addr>,
    ) -> Verdict<()> {
        let quoted = icmp_off + ICMP_HLEN;
        let allowed = [
            IP_CSUM,
            IP_DST,
            icmp_off + 2..icmp_off + 4,
            quoted + 10..quoted + 16,
            quoted + 20..quoted + 22,
        ];
        if let Some(at) = changed_outside(input, output, &allowed) {
            return Err(broken_as(
                "3: changed an ICMP byte that is no address, port or checksum",
                format!("byte {at}"),
            ));
        }
        let flow = quoted_flow(input, icmp_off)
            .ok_or_else(|| broken("2: translated an ICMP error about no flow"))?;
        if !matches!(
            self.tracked(harness, &flow),
            Some(Tracked::Forward { snat: false, .. })
        ) {
            return Err(broken(
                "2: translated an ICMP error about a flow without DNAT",
            ));
        }
        let backend_at = endpoint(ip_at(output, quoted + 12), be16(output, quoted + 20));
        let backend = self.model.backend(&flow, backend_at).ok_or_else(|| {
            broken_as(
                "3: ICMP quote rewritten to no backend of the flow's frontend",
                format!("{}:{}", backend_at.ip, backend_at.port),
            )
        })?;
        let to = ip_at(output, IP_DST.start);
        if to != backend.ip || backend.remote_node != tunnel {
            return Err(broken_as(
                "3: ICMP error sent elsewhere than to the backend quoted",
                format!(
                    "to {to} through {tunnel:?}; the backend is {} of node {:?}",
                    backend.ip, backend.remote_node
                ),
            ));
        }
        let quoted_header_ok =
            |frame: &[u8]| packets::fold(packets::sum(&frame[quoted..quoted + 20], 0)) == 0;
        if quoted_header_ok(input) && !quoted_header_ok(output) {
            return Err(broken("4: quoted IPv4 header checksum broken"));
        }
        Ok(())
    }

    /// Wrapped in VXLAN: for a remote backend (ingress) or back to the node
    /// a tunnelled flow came from (egress).
    fn check_wrapped(
        &mut self,
        harness: &TcHarness,
        hook: Hook,
        input: &[u8],
        view: &View,
        output: &[u8],
    ) -> Verdict<Effect> {
        let outer = packets::parse(output).ok_or_else(|| broken("3: unparsable tunnel header"))?;
        let vxlan = ETH_HLEN + 20 + 8;
        if outer.src != NODE
            || outer.header_len != 20
            || outer.total_len != output.len() - ETH_HLEN
            || output[vxlan] != VXLAN_FLAG_VNI
            || u32::from_be_bytes(output[vxlan + 4..vxlan + 8].try_into().unwrap()) >> 8 != VNI
            || output[VXLAN_OVERHEAD + 12..VXLAN_OVERHEAD + 14] != [0x08, 0x00]
        {
            return Err(broken("3: malformed tunnel headers"));
        }
        if !packets::ipv4_checksum_ok(output) {
            return Err(broken("4: outer IPv4 checksum wrong"));
        }
        // The inner packet behind the input's Ethernet header, so that the
        // input's offsets apply.
        let mut inner = input[..ETH_HLEN].to_vec();
        inner.extend_from_slice(&output[VXLAN_OVERHEAD + ETH_HLEN..]);
        match (*view, hook) {
            (View::Ports { tuple, l4_off }, Hook::Ingress) => {
                let allowed = [
                    IP_CSUM,
                    IP_DST,
                    l4_off + 2..l4_off + 4,
                    l4_csum(tuple.protocol, l4_off),
                ];
                if let Some(at) = changed_outside(input, &inner, &allowed) {
                    return Err(broken_as(
                        "3: changed a byte that is no address, port or checksum",
                        format!("inner byte {at}"),
                    ));
                }
                let new = Tuple::new(
                    tuple.src,
                    endpoint(ip_at(&inner, IP_DST.start), be16(&inner, l4_off + 2)),
                    tuple.protocol,
                );
                let flags = tcp_flags(input, &tuple, l4_off);
                self.check_inbound(harness, &tuple, &new, Some(outer.dst), flags)?;
            }
            (View::Icmp { icmp_off, .. }, Hook::Ingress) => {
                self.check_icmp(harness, input, &inner, icmp_off, Some(outer.dst))?;
            }
            (View::Ports { tuple, .. }, Hook::Egress) => {
                if inner != input {
                    return Err(broken("3: a reply changed inside the tunnel"));
                }
                match self.tracked(harness, &tuple) {
                    Some(Tracked::TunnelReturn { node }) if node == outer.dst => {}
                    tracked => {
                        return Err(broken_as(
                            "3: reply wrapped for another node than its flow came from",
                            format!("for {}, entry {tracked:?}", outer.dst),
                        ));
                    }
                }
            }
            _ => return Err(broken("2: wrapped a packet that is none of ours")),
        }
        if checksums_ok(input) && !checksums_ok(&inner) {
            return Err(broken(
                "4: inner checksums right before wrapping, wrong after",
            ));
        }
        Ok(Effect::Wrapped)
    }

    /// Our VXLAN from a peer: the inner packet, delivered as it is, or
    /// (a reply of a flow this node tunnelled) from the frontend.
    fn check_unwrapped(
        &mut self,
        harness: &TcHarness,
        input: &[u8],
        view: &View,
        output: &[u8],
        verdict: i32,
    ) -> Verdict<Effect> {
        let View::Ports {
            tuple: outer,
            l4_off,
        } = *view
        else {
            unreachable!("VXLAN is UDP");
        };
        let inner_ip = (l4_off + 8 + 8 + ETH_HLEN).min(input.len());
        let mut expected = input[..ETH_HLEN].to_vec();
        expected.extend_from_slice(&input[inner_ip..]);
        if output.len() != expected.len() {
            return Err(broken_as(
                "3: unwrapped to another length than the inner packet's",
                format!(
                    "{} bytes; Ethernet + the inner packet are {}",
                    output.len(),
                    expected.len()
                ),
            ));
        }
        match view_of(&expected) {
            View::Ports {
                tuple: inner,
                l4_off: inner_l4,
            } => {
                let allowed = [
                    IP_CSUM,
                    IP_SRC,
                    inner_l4..inner_l4 + 2,
                    l4_csum(inner.protocol, inner_l4),
                ];
                if let Some(at) = changed_outside(&expected, output, &allowed) {
                    return Err(broken_as(
                        "3: changed a byte that is no address, port or checksum",
                        format!("unwrapped byte {at}"),
                    ));
                }
                let source = endpoint(ip_at(output, IP_SRC.start), be16(output, inner_l4));
                if source != inner.src {
                    match self.tracked(harness, &inner) {
                        Some(Tracked::Reply { frontend, .. }) if frontend == source => {}
                        tracked => {
                            return Err(broken_as(
                                "3: unwrapped reply's source rewritten to another than the \
                                 frontend dialled",
                                format!("to {}:{}, entry {tracked:?}", source.ip, source.port),
                            ));
                        }
                    }
                } else if output != expected {
                    return Err(broken("3: checksum bytes changed without a translation"));
                } else if verdict != VERDICT_DROP {
                    // tc.rs `from_tunnel`: the way back for the backend's
                    // replies (unless the tuple is a live local flow's:
                    // then the tunnelled packet is refused).
                    self.shadow.insert(
                        inner.reversed(),
                        Tracked::TunnelReturn { node: outer.src.ip },
                    );
                    if self.tunnelled_in.len() < REMEMBERED_FLOWS {
                        self.tunnelled_in.push(inner);
                    }
                }
            }
            _ => {
                if output != expected {
                    return Err(broken("3: unwrapped packet differs from the inner one"));
                }
            }
        }
        if checksums_ok(&expected) && !checksums_ok(output) {
            return Err(broken(
                "4: inner checksums right before unwrapping, wrong after",
            ));
        }
        Ok(Effect::Unwrapped)
    }

    /// A TCP RST or ICMP port unreachable for a frontend without endpoints.
    fn check_answer(
        &self,
        hook: Hook,
        input: &[u8],
        view: &View,
        output: &[u8],
    ) -> Verdict<Effect> {
        if !checksums_ok(output) {
            return Err(broken("4: answer with wrong checksums"));
        }
        let (View::Ports { tuple, l4_off }, Hook::Ingress) = (*view, hook) else {
            return Err(broken("2: answered a packet that is none of ours"));
        };
        if !self.model.rejects(&tuple) {
            return Err(broken(
                "3: answered a packet of a frontend with endpoints, or of none",
            ));
        }
        if output[ETH_HLEN + 9] == IPPROTO_TCP {
            if output[ETH_HLEN + 20 + 13] & TCP_RST == 0 {
                return Err(broken("3: answered with a TCP segment that is no reset"));
            }
            if input[l4_off + 13] & TCP_RST != 0 {
                return Err(broken("3: answered a reset"));
            }
        }
        Ok(Effect::Answered)
    }
}

/// The TCP flags of a TCP packet, 0 for UDP.
fn tcp_flags(frame: &[u8], tuple: &Tuple, l4_off: usize) -> u8 {
    if tuple.protocol == IPPROTO_TCP {
        frame[l4_off + 13]
    } else {
        0
    }
}

/// Whether `output` answers `input` back to its source: a TCP RST from the
/// port it addressed or an ICMP destination unreachable quoting it.
fn is_answer(input: &[u8], view: &View, output: &[u8]) -> bool {
    let (View::Ports { tuple, .. }, Some(answer)) = (*view, packets::parse(output)) else {
        return false;
    };
    if answer.src != tuple.dst.ip || answer.dst != tuple.src.ip || answer.header_len != 20 {
        return false;
    }
    match answer.protocol {
        IPPROTO_TCP => {
            output.len() == ETH_HLEN + 40
                && tuple.protocol == IPPROTO_TCP
                && answer.ports == Some((tuple.dst.port, tuple.src.port))
        }
        IPPROTO_ICMP => {
            output.len() == ETH_HLEN + 20 + ICMP_HLEN + 28
                && output[ETH_HLEN + 20] == ICMP_DEST_UNREACHABLE
                && output[ETH_HLEN + 28..] == input[ETH_HLEN..ETH_HLEN + 28]
        }
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// Generation.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Category {
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
const MIX: [(Category, usize); 26] = [
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
const OTHER_CLIENTS: [Ipv4Addr; 4] = [
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
struct Generator<'a> {
    rng: Rng,
    flows: &'a [Flow],
    tunnelled_in: &'a [Tuple],
}

impl Generator<'_> {
    fn generate(&mut self) -> (Category, Hook, Vec<u8>) {
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

// ---------------------------------------------------------------------------
// Running.

/// A failed check, with what it takes to look at it again.
struct Failure {
    what: String,
    hook: Hook,
    input: Vec<u8>,
    outcome: Outcome,
    detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  {} ({:?}) {}", self.what, self.hook, self.detail)?;
        writeln!(f, "  in      {}", hex(&self.input))?;
        writeln!(f, "  verdict {}", self.outcome.verdict)?;
        writeln!(f, "  out     {}", hex(&self.outcome.packet))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Runs `frame`; `None` when BPF_PROG_TEST_RUN refuses the frame itself
/// (EINVAL).
fn run(harness: &mut TcHarness, hook: Hook, frame: &[u8]) -> Option<Outcome> {
    match harness.run(hook, frame) {
        Ok(outcome) => Some(outcome),
        Err(err)
            if err
                .chain()
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.raw_os_error() == Some(libc::EINVAL)) =>
        {
            None
        }
        Err(err) => panic!("running {hook:?} on {}: {err:#}", hex(frame)),
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    let Ok(value) = std::env::var(name) else {
        return default;
    };
    let value = value.trim().replace('_', "");
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("{name}={value} is not a number"))
}

/// Packets, effects and drops of one category.
#[derive(Default)]
struct Tally {
    packets: u64,
    effects: BTreeMap<Effect, u64>,
    dropped: u64,
    /// Frames BPF_PROG_TEST_RUN refused (not run).
    refused: u64,
    failed: u64,
}

impl Tally {
    fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        for (effect, count) in &other.effects {
            *self.effects.entry(*effect).or_default() += count;
        }
        self.dropped += other.dropped;
        self.refused += other.refused;
        self.failed += other.failed;
    }

    fn write_row(&self, out: &mut String) {
        let effects = EFFECTS.map(|effect| self.effects.get(&effect).copied().unwrap_or(0));
        for count in [self.packets].into_iter().chain(effects).chain([
            self.dropped,
            self.refused,
            self.failed,
        ]) {
            let _ = write!(out, " {count:>9}");
        }
    }
}

#[test]
fn random_packets_keep_the_invariants() {
    let packets = env_number("DATAPLANE_FUZZ_PACKETS", DEFAULT_PACKETS);
    let seed = env_number("DATAPLANE_FUZZ_SEED", DEFAULT_SEED);
    let mut harness = TcHarness::standard().unwrap();
    let mut checker = Checker::new(&harness);
    let mut tallies: BTreeMap<(Category, &str), Tally> = BTreeMap::new();
    let mut failures: BTreeMap<&str, (u64, Vec<Failure>)> = BTreeMap::new();
    let started = Instant::now();
    for index in 0..packets {
        if index > 0 && index % CLEAR_EVERY == 0 {
            harness.clear_conntrack().unwrap();
            checker.forget();
        }
        let (category, hook, frame) = Generator {
            rng: Rng::for_packet(seed, index),
            flows: &checker.flows,
            tunnelled_in: &checker.tunnelled_in,
        }
        .generate();
        let hook_name = if hook == Hook::Ingress {
            "ingress"
        } else {
            "egress"
        };
        let tally = tallies.entry((category, hook_name)).or_default();
        tally.packets += 1;
        let Some(outcome) = run(&mut harness, hook, &frame) else {
            tally.refused += 1;
            continue;
        };
        tally.dropped += u64::from(outcome.verdict == VERDICT_DROP);
        match checker.check(&harness, hook, &frame, &outcome) {
            Ok(effect) => *tally.effects.entry(effect).or_default() += 1,
            Err(violation) => {
                tally.failed += 1;
                let (count, examples) = failures.entry(violation.rule).or_default();
                *count += 1;
                if examples.len() < EXAMPLES_PER_RULE {
                    examples.push(Failure {
                        what: format!("seed {seed:#x} packet {index} {category:?}"),
                        hook,
                        input: frame,
                        outcome,
                        detail: violation.detail,
                    });
                }
            }
        }
    }
    let elapsed = started.elapsed();

    let columns = [
        "packets",
        "untouched",
        "rewritten",
        "wrapped",
        "unwrapped",
        "answered",
        "dropped",
        "refused",
        "failed",
    ];
    let mut report = format!(
        "tc fuzz: seed {seed:#x}, {packets} packets in {:.1} s ({} conntrack reads)\n{:<16} \
         {:<8}",
        elapsed.as_secs_f64(),
        checker.conntrack_reads,
        "category",
        "hook",
    );
    for column in columns {
        let _ = write!(report, " {column:>9}");
    }
    let mut total = Tally::default();
    for ((category, hook), tally) in &tallies {
        let _ = write!(report, "\n{:<16} {hook:<8}", format!("{category:?}"));
        tally.write_row(&mut report);
        total.add(tally);
    }
    let _ = write!(report, "\n{:<16} {:<8}", "all", "");
    total.write_row(&mut report);
    eprintln!("{report}");

    let mut broken = String::new();
    for (rule, (count, examples)) in &failures {
        let _ = writeln!(broken, "invariant {rule}: {count} packets, for example");
        for example in examples {
            let _ = write!(broken, "{example}");
        }
    }
    assert!(failures.is_empty(), "broken invariants:\n{broken}");
    assert!(
        total.refused * 100 <= packets,
        "{} of {packets} packets refused by BPF_PROG_TEST_RUN",
        total.refused
    );
}

// ---------------------------------------------------------------------------
// Corner cases.

/// Runs named packets in order through one harness, checking each against
/// the invariants and the effect expected.
struct Corners {
    harness: TcHarness,
    checker: Checker,
    failures: Vec<Failure>,
}

impl Corners {
    fn new() -> Self {
        let harness = TcHarness::standard().unwrap();
        let checker = Checker::new(&harness);
        Self {
            harness,
            checker,
            failures: Vec::new(),
        }
    }

    fn expect(&mut self, what: &str, hook: Hook, frame: &[u8], effects: &[Effect]) -> Outcome {
        let outcome = run(&mut self.harness, hook, frame)
            .unwrap_or_else(|| panic!("{what}: refused by BPF_PROG_TEST_RUN"));
        let detail = match self.checker.check(&self.harness, hook, frame, &outcome) {
            Ok(effect) if effects.contains(&effect) => None,
            Ok(effect) => Some(format!("{effect:?}, expected {effects:?}")),
            Err(violation) => Some(format!(
                "invariant {}: {}",
                violation.rule, violation.detail
            )),
        };
        if let Some(detail) = detail {
            self.failures.push(Failure {
                what: what.to_owned(),
                hook,
                input: frame.to_vec(),
                outcome: outcome.clone(),
                detail,
            });
        }
        outcome
    }
}

fn client(port: u16) -> Endpoint {
    endpoint(CLIENT, port)
}

fn node(port: u16) -> Endpoint {
    endpoint(NODE, port)
}

fn pod(ip: Ipv4Addr) -> Endpoint {
    endpoint(ip, POD_PORT)
}

#[test]
fn corner_cases_keep_the_invariants() {
    use Effect::*;
    let mut c = Corners::new();
    let ingress = Hook::Ingress;
    let egress = Hook::Egress;
    let router = Ipv4Addr::new(198, 18, 0, 1);

    // Frontends.
    let local_syn = packets::tcp(client(40000), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    c.expect("SYN to a local nodePort", ingress, &local_syn, &[Rewritten]);
    let local_reply = packets::tcp(pod(LOCAL_POD), client(40000), TCP_SYN | TCP_ACK, b"");
    c.expect("its reply from the pod", egress, &local_reply, &[Rewritten]);
    let local_ack = packets::tcp(client(40000), node(LOCAL_NODE_PORT), TCP_ACK, b"data");
    c.expect("the flow's next segment", ingress, &local_ack, &[Rewritten]);
    let remote_syn = packets::tcp(client(40001), node(REMOTE_NODE_PORT), TCP_SYN, b"");
    c.expect("SYN to a remote nodePort", ingress, &remote_syn, &[Wrapped]);
    let remote_reply = packets::tcp(pod(REMOTE_POD), client(40001), TCP_SYN | TCP_ACK, b"");
    c.expect(
        "the remote pod's reply through the tunnel",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &remote_reply),
        &[Unwrapped],
    );
    c.expect(
        "SYN to the nodePort without endpoints",
        ingress,
        &packets::tcp(client(40002), node(EMPTY_NODE_PORT), TCP_SYN, b""),
        &[Answered],
    );
    c.expect(
        "UDP to the nodePort without endpoints",
        ingress,
        &packets::udp(client(40003), node(EMPTY_NODE_PORT), b"x"),
        &[Answered],
    );
    c.expect(
        "RST to the nodePort without endpoints (never answered)",
        ingress,
        &packets::tcp(client(40004), node(EMPTY_NODE_PORT), TCP_RST, b""),
        &[Untouched],
    );
    c.expect(
        "SYN to the Local-policy nodePort without a local endpoint",
        ingress,
        &packets::tcp(client(40005), node(DROP_NODE_PORT), TCP_SYN, b""),
        &[Untouched],
    );
    let lb = endpoint(LB_IP, 80);
    c.expect(
        "LB IP from the admitted client",
        ingress,
        &packets::tcp(client(40006), lb, TCP_SYN, b""),
        &[Rewritten, Wrapped],
    );
    c.expect(
        "LB IP from another source",
        ingress,
        &packets::tcp(endpoint(OTHER_CLIENTS[0], 40007), lb, TCP_SYN, b""),
        &[Untouched],
    );
    c.expect(
        "externalIP, UDP",
        ingress,
        &packets::udp(client(40008), endpoint(EXTERNAL_IP, 80), b"q"),
        &[Rewritten],
    );
    c.expect(
        "ClusterIP from outside",
        ingress,
        &packets::tcp(client(40009), endpoint(CLUSTER_IP, 80), TCP_SYN, b""),
        &[Rewritten, Wrapped],
    );
    let mut no_checksum = packets::udp(client(40010), node(NODE_PORT), b"none");
    no_checksum[l4_csum(IPPROTO_UDP, ETH_HLEN + 20)].fill(0);
    let out = c.expect(
        "UDP without a checksum to a nodePort",
        ingress,
        &no_checksum,
        &[Rewritten, Wrapped],
    );
    let inner = if out.packet.len() == no_checksum.len() {
        &out.packet[..]
    } else {
        &out.packet[VXLAN_OVERHEAD..]
    };
    assert_eq!(
        inner[l4_csum(IPPROTO_UDP, ETH_HLEN + 20)],
        [0, 0],
        "no UDP checksum stays none"
    );

    // Not frontends.
    for (what, frame) in [
        (
            "UDP to a TCP-only nodePort",
            packets::udp(client(40011), node(LOCAL_NODE_PORT), b""),
        ),
        (
            "TCP to the UDP-only externalIP",
            packets::tcp(client(40012), endpoint(EXTERNAL_IP, 80), TCP_SYN, b""),
        ),
        (
            "port 0 on the node",
            packets::tcp(client(40013), node(0), TCP_SYN, b""),
        ),
        (
            "port 65535 on the node",
            packets::udp(client(40014), node(65535), b""),
        ),
        (
            "a nodePort on another address",
            packets::tcp(client(40015), endpoint(PEER, NODE_PORT), TCP_SYN, b""),
        ),
        (
            "port 81 of the LB IP",
            packets::tcp(client(40016), endpoint(LB_IP, 81), TCP_SYN, b""),
        ),
    ] {
        c.expect(what, ingress, &frame, &[Untouched]);
    }
    c.expect(
        "a pod's packet of no flow",
        egress,
        &packets::tcp(pod(LOCAL_POD), client(40017), TCP_ACK, b""),
        &[Untouched],
    );

    // ICMP errors.
    let sent_local = packets::tcp(node(LOCAL_NODE_PORT), client(40000), TCP_ACK, b"");
    let frag_needed = packets::icmp_error(router, NODE, 3, 4, 1400, &sent_local);
    c.expect(
        "frag needed about the local flow",
        ingress,
        &frag_needed,
        &[Rewritten],
    );
    let sent_remote = packets::tcp(node(REMOTE_NODE_PORT), client(40001), TCP_ACK, b"");
    c.expect(
        "time exceeded about the remote flow",
        ingress,
        &packets::icmp_error(router, NODE, 11, 0, 0, &sent_remote),
        &[Wrapped],
    );
    let sent_nowhere = packets::tcp(node(LOCAL_NODE_PORT), client(49999), TCP_ACK, b"");
    c.expect(
        "port unreachable about no flow",
        ingress,
        &packets::icmp_error(router, NODE, 3, 3, 0, &sent_nowhere),
        &[Untouched],
    );
    let mut icmp_fragment = frag_needed.clone();
    icmp_fragment[IP_FRAG].copy_from_slice(&0x2000u16.to_be_bytes());
    packets::refresh_ipv4_checksum(&mut icmp_fragment);
    c.expect(
        "first fragment of an error about the local flow",
        ingress,
        &icmp_fragment,
        &[Untouched],
    );
    let mut icmp_later = frag_needed.clone();
    icmp_later[IP_FRAG].copy_from_slice(&0x0010u16.to_be_bytes());
    packets::refresh_ipv4_checksum(&mut icmp_later);
    c.expect(
        "later fragment that reads like an error about the local flow",
        ingress,
        &icmp_later,
        &[Untouched],
    );

    // The tunnel.
    let tunnelled = packets::tcp(client(40020), pod(LOCAL_POD), TCP_SYN, b"");
    c.expect(
        "VXLAN from the peer to a local pod",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &tunnelled),
        &[Unwrapped],
    );
    c.expect(
        "the local pod's reply into the tunnel",
        egress,
        &packets::tcp(pod(LOCAL_POD), client(40020), TCP_SYN | TCP_ACK, b""),
        &[Wrapped],
    );
    c.expect(
        "VXLAN from a stranger",
        ingress,
        &packets::vxlan(CLIENT, NODE, TUNNEL_PORT, VNI, &tunnelled),
        &[Untouched],
    );
    c.expect(
        "VXLAN with another VNI",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI + 1, &tunnelled),
        &[Untouched],
    );
    c.expect(
        "VXLAN with garbage inside",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &[0xa5; 40]),
        &[Unwrapped],
    );
    c.expect(
        "VXLAN with a truncated inner packet",
        ingress,
        &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &tunnelled[..40]),
        &[Unwrapped],
    );
    let tunnelled_udp = packets::udp(client(40021), pod(LOCAL_POD), b"opt");
    // Our tunnel never sends outer IPv4 options: such a packet is not ours
    // and goes to the stack as it came.
    c.expect(
        "VXLAN with IPv4 options on the outer header",
        ingress,
        &packets::with_ipv4_options(
            &packets::vxlan(PEER, NODE, TUNNEL_PORT, VNI, &tunnelled_udp),
            &[1, 1, 1, 0],
        ),
        &[Untouched],
    );

    // Hairpin.
    let hairpin = packets::tcp(
        endpoint(LOCAL_POD, 40030),
        node(LOCAL_NODE_PORT),
        TCP_SYN,
        b"",
    );
    let out = c.expect(
        "a local pod through its own nodePort",
        ingress,
        &hairpin,
        &[Rewritten],
    );
    if let Some(snat) = packets::parse(&out.packet).and_then(|p| p.ports) {
        let reply = packets::tcp(pod(LOCAL_POD), node(snat.0), TCP_SYN | TCP_ACK, b"");
        c.expect("its SNATed reply", ingress, &reply, &[Rewritten]);
    }

    // IPv4 headers.
    let options = packets::with_ipv4_options(
        &packets::tcp(client(40040), node(LOCAL_NODE_PORT), TCP_SYN, b""),
        &[7, 7, 4, 0, 0, 0, 0, 0],
    );
    c.expect("SYN with IPv4 options", ingress, &options, &[Rewritten]);
    let longest = packets::with_ipv4_options(
        &packets::udp(client(40041), endpoint(EXTERNAL_IP, 80), b""),
        &[1; 40],
    );
    c.expect(
        "UDP with a 60-byte IPv4 header",
        ingress,
        &longest,
        &[Rewritten],
    );
    let base = packets::tcp(client(40042), node(LOCAL_NODE_PORT), TCP_SYN, b"abcdefgh");
    let mutated = |change: &dyn Fn(&mut Vec<u8>)| {
        let mut frame = base.clone();
        change(&mut frame);
        packets::refresh_ipv4_checksum(&mut frame);
        frame
    };
    for (what, frame, effects) in [
        (
            "first fragment",
            mutated(&|f| f[IP_FRAG].copy_from_slice(&0x2000u16.to_be_bytes())),
            &[Untouched][..],
        ),
        (
            "later fragment",
            mutated(&|f| f[IP_FRAG].copy_from_slice(&0x0003u16.to_be_bytes())),
            &[Untouched],
        ),
        ("IHL 4", mutated(&|f| f[ETH_HLEN] = 0x44), &[Untouched]),
        ("IHL 0", mutated(&|f| f[ETH_HLEN] = 0x40), &[Untouched]),
        ("version 6", mutated(&|f| f[ETH_HLEN] = 0x65), &[Untouched]),
        (
            "total length below the header",
            mutated(&|f| f[IP_TOT_LEN].copy_from_slice(&19u16.to_be_bytes())),
            &[Untouched],
        ),
        (
            "total length below the TCP header",
            mutated(&|f| f[IP_TOT_LEN].copy_from_slice(&39u16.to_be_bytes())),
            &[Untouched],
        ),
        (
            "total length beyond the frame",
            mutated(&|f| f[IP_TOT_LEN].copy_from_slice(&1400u16.to_be_bytes())),
            &[Rewritten],
        ),
        (
            "total length short of the frame",
            mutated(&|f| f[IP_TOT_LEN].copy_from_slice(&40u16.to_be_bytes())),
            &[Rewritten],
        ),
        ("cut to 34 bytes", base[..MIN_FRAME].to_vec(), &[Untouched]),
        ("cut inside TCP", base[..50].to_vec(), &[Untouched]),
        (
            "padded after the packet",
            [&base[..], &[0u8; 18]].concat(),
            &[Rewritten],
        ),
        (
            "ARP ether type",
            mutated(&|f| f[12..14].copy_from_slice(&[0x08, 0x06])),
            &[Untouched],
        ),
        ("IPIP", mutated(&|f| f[ETH_HLEN + 9] = 4), &[Untouched]),
    ] {
        // Each a new flow: nothing remembered of the one before.
        c.harness.clear_conntrack().unwrap();
        c.checker.forget();
        c.expect(what, ingress, &frame, effects);
    }

    assert!(
        c.failures.is_empty(),
        "{} corner cases failed:\n{}",
        c.failures.len(),
        c.failures
            .iter()
            .map(ToString::to_string)
            .collect::<String>()
    );
}

/// The checks themselves: outcomes a broken program could produce are
/// caught, each by the rule it breaks (so a silent fuzz run means
/// something).
#[test]
fn the_checks_catch_broken_outcomes() {
    let harness = TcHarness::standard().unwrap();
    let mut checker = Checker::new(&harness);
    let outcome = |verdict, packet: &[u8]| Outcome {
        verdict,
        packet: packet.to_vec(),
    };
    let local_syn = packets::tcp(client(41000), node(LOCAL_NODE_PORT), TCP_SYN, b"");
    let to_local = packets::tcp(client(41000), pod(LOCAL_POD), TCP_SYN, b"");
    let to_remote = packets::tcp(client(41000), pod(REMOTE_POD), TCP_SYN, b"");
    let mut bad_checksum = to_local.clone();
    bad_checksum[IP_CSUM.start] ^= 0x01;
    let mut more_changed = to_local.clone();
    more_changed[ETH_HLEN + 8] = 1; // TTL
    packets::refresh_ipv4_checksum(&mut more_changed);
    let stranger = packets::tcp(client(41001), node(81), TCP_SYN, b"");
    let stranger_translated = packets::tcp(client(41001), pod(LOCAL_POD), TCP_SYN, b"");
    let mut fragment = local_syn.clone();
    fragment[IP_FRAG].copy_from_slice(&0x2000u16.to_be_bytes());
    packets::refresh_ipv4_checksum(&mut fragment);
    let mut fragment_translated = to_local.clone();
    fragment_translated[IP_FRAG].copy_from_slice(&0x2000u16.to_be_bytes());
    packets::refresh_ipv4_checksum(&mut fragment_translated);
    let remote_syn = packets::tcp(client(41002), node(REMOTE_NODE_PORT), TCP_SYN, b"");
    let remote_inner = packets::tcp(client(41002), pod(REMOTE_POD), TCP_SYN, b"");
    let reply = packets::tcp(pod(LOCAL_POD), client(41003), TCP_ACK, b"");
    let reply_translated = packets::tcp(node(LOCAL_NODE_PORT), client(41003), TCP_ACK, b"");
    let cases: [(&str, Hook, &[u8], Outcome, &str); 9] = [
        (
            "an unknown verdict",
            Hook::Ingress,
            &local_syn,
            outcome(1, &to_local),
            "1:",
        ),
        (
            "another Service's backend",
            Hook::Ingress,
            &local_syn,
            outcome(VERDICT_PASS, &to_remote),
            "3: destination",
        ),
        (
            "a broken checksum",
            Hook::Ingress,
            &local_syn,
            outcome(VERDICT_PASS, &bad_checksum),
            "4:",
        ),
        (
            "a changed TTL",
            Hook::Ingress,
            &local_syn,
            outcome(VERDICT_PASS, &more_changed),
            "3: changed a byte",
        ),
        (
            "a stranger translated",
            Hook::Ingress,
            &stranger,
            outcome(VERDICT_PASS, &stranger_translated),
            "2: changed a packet",
        ),
        (
            "a stranger dropped",
            Hook::Ingress,
            &stranger,
            outcome(VERDICT_DROP, &stranger),
            "2: did not pass",
        ),
        (
            "a fragment translated",
            Hook::Ingress,
            &fragment,
            outcome(VERDICT_PASS, &fragment_translated),
            "2: changed a fragment",
        ),
        (
            "a remote backend's flow wrapped for a stranger",
            Hook::Ingress,
            &remote_syn,
            outcome(
                VERDICT_REDIRECT,
                &packets::vxlan(NODE, CLIENT, TUNNEL_PORT, VNI, &remote_inner),
            ),
            "3: backend reached the wrong way",
        ),
        (
            "a reply of no flow translated",
            Hook::Egress,
            &reply,
            outcome(VERDICT_PASS, &reply_translated),
            "2: changed a packet",
        ),
    ];
    for (what, hook, input, broken, rule) in cases {
        match checker.check(&harness, hook, input, &broken) {
            Err(violation) => assert!(
                violation.rule.starts_with(rule),
                "{what}: caught as {violation:?}, not {rule}"
            ),
            Ok(effect) => panic!("{what}: passed as {effect:?}"),
        }
    }
    // And the right outcomes pass.
    let right = checker.check(
        &harness,
        Hook::Ingress,
        &local_syn,
        &outcome(VERDICT_PASS, &to_local),
    );
    assert_eq!(right.unwrap(), Effect::Rewritten);
    let wrapped = packets::vxlan(NODE, PEER, TUNNEL_PORT, VNI, &remote_inner);
    let right = checker.check(
        &harness,
        Hook::Ingress,
        &remote_syn,
        &outcome(VERDICT_DROP, &wrapped),
    );
    assert_eq!(right.unwrap(), Effect::Wrapped);
}
