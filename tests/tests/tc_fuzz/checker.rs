//! The invariants, held against each outcome with the conntrack entries the
//! programs made, so that a broken one is reported by the rule it breaks.

use std::{collections::HashMap, net::Ipv4Addr, ops::RangeInclusive};

use dataplane_common::{
    CT_FLAG_FIN_SEEN, CT_FLAG_RST_SEEN, CT_FLAG_SNAT, CT_FORWARD, CT_REPLY, CT_TUNNEL_RETURN,
    CtValue,
};
use dataplane_testbed::{
    packets::{
        self, ETH_HLEN, Endpoint, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN,
        TCP_RST, TCP_SYN,
    },
    tc_harness::{
        Hook, Outcome, TcHarness, VERDICT_DROP, VERDICT_OK, VERDICT_PASS, VERDICT_REDIRECT,
        standard::{NODE, TUNNEL_PORT, VNI},
    },
};

use crate::{
    ICMP_DEST_UNREACHABLE, ICMP_HLEN, IP_CSUM, IP_DST, IP_SRC, VXLAN_FLAG_VNI, VXLAN_OVERHEAD,
    model::{
        Model, Tuple, View, be16, changed_outside, checksums_ok, endpoint, endpoint_of_map, ip_at,
        is_fragment, l4_csum, mss_rewrite, quoted_flow, view_of,
    },
};

/// The standard configuration's SNAT source ports (hairpin only, in tunnel
/// mode).
const SNAT_PORTS: RangeInclusive<u16> = 61000..=65535;
/// Flows remembered to generate their later packets, replies and errors.
const REMEMBERED_FLOWS: usize = 4096;

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
pub(super) struct Flow {
    /// Client -> frontend.
    pub(super) tuple: Tuple,
    pub(super) backend: Endpoint,
    pub(super) path: Path,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Path {
    Local,
    Tunnel,
    /// Hairpin: the backend sees this node's address and port.
    Snat(Endpoint),
}

/// What a program did to a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Effect {
    Untouched,
    Rewritten,
    Wrapped,
    Unwrapped,
    Answered,
}

pub(super) const EFFECTS: [Effect; 5] = [
    Effect::Untouched,
    Effect::Rewritten,
    Effect::Wrapped,
    Effect::Unwrapped,
    Effect::Answered,
];

/// The model, the conntrack entries the programs made (a shadow built from
/// the translations seen, with the real map as the fallback before a
/// packet is called a failure), and the flows remembered.
pub(super) struct Checker {
    model: Model,
    shadow: HashMap<Tuple, Tracked>,
    /// How often the shadow missed and the real map was read.
    pub(super) conntrack_reads: u64,
    pub(super) flows: Vec<Flow>,
    /// Flows another node tunnelled to a pod here (client -> pod).
    pub(super) tunnelled_in: Vec<Tuple>,
    remembered: usize,
}

/// A broken invariant: the rule (failures are grouped by it) and the
/// particulars of this packet.
#[derive(Debug)]
pub(super) struct Violation {
    pub(super) rule: &'static str,
    pub(super) detail: String,
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
    pub(super) fn new(harness: &TcHarness) -> Self {
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
    pub(super) fn forget(&mut self) {
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
    pub(super) fn check(
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
        if hook == Hook::Ingress
            && let View::Ports { tuple, .. } = view
            && !self.model.is_our_vxlan(input, &view)
        {
            self.end_flow_replaced_by_direct(&tuple);
        }
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

    /// A UDP packet from outside on the reversed tuple of a reply entry
    /// (the client now talks to the backend directly) ends the translated
    /// flow (conntrack.rs `end_flow_replaced_by_direct`).
    fn end_flow_replaced_by_direct(&mut self, tuple: &Tuple) {
        if tuple.protocol != IPPROTO_UDP {
            return;
        }
        let reply = tuple.reversed();
        match self.shadow.get(&reply) {
            Some(Tracked::Reply {
                frontend,
                client: None,
            }) => {
                let forward = Tuple::new(tuple.src, *frontend, tuple.protocol);
                self.shadow.remove(&forward);
                self.shadow.remove(&reply);
            }
            Some(Tracked::TunnelReturn { .. }) => {
                self.shadow.remove(&reply);
            }
            _ => {}
        }
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
                let mss = clamped_mss(&tuple, input, &inner, l4_off)?;
                let allowed = [
                    IP_CSUM,
                    IP_DST,
                    l4_off + 2..l4_off + 4,
                    l4_csum(tuple.protocol, l4_off),
                    mss,
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
            (View::Ports { tuple, l4_off }, Hook::Egress) => {
                let mss = clamped_mss(&tuple, input, &inner, l4_off)?;
                let checksum = if mss.is_empty() {
                    0..0
                } else {
                    l4_csum(tuple.protocol, l4_off)
                };
                if inner.len() != input.len()
                    || changed_outside(input, &inner, &[mss, checksum]).is_some()
                {
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

/// The MSS bytes of a tunnelled TCP SYN or SYN-ACK, checked: lowered to
/// the clamp where mss.rs lowers it, and the range that may change (empty
/// when none may).
fn clamped_mss(
    tuple: &Tuple,
    input: &[u8],
    inner: &[u8],
    l4_off: usize,
) -> Verdict<std::ops::Range<usize>> {
    if tuple.protocol != IPPROTO_TCP {
        return Ok(0..0);
    }
    match mss_rewrite(input, l4_off) {
        Some((at, value)) if inner.get(at.clone()) == Some(&value[..]) => Ok(at),
        Some((at, _)) => Err(broken_as(
            "3: a tunnelled SYN's MSS is not clamped",
            format!("bytes {at:?}"),
        )),
        None => Ok(0..0),
    }
}
