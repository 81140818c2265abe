//! The interface programs (TC ingress and egress on the node interfaces):
//! external traffic to nodePorts, load-balancer IPs, externalIPs and
//! ClusterIPs reached from outside, with the client's source address kept
//! whenever the operator did not choose SNAT.
//!
//! Ingress: known flow -> its conntrack entry decides; new flow to a
//! frontend -> pick a backend, record both directions, then DNAT (backend
//! here), DNAT + VXLAN to the backend's node (`tunnel`), or DNAT + SNAT
//! (`snat`). VXLAN from another node is unwrapped: either replies of a flow
//! we tunnelled (translate back, send to the client) or a flow another node
//! tunnelled to a backend here (deliver, remember the way back).
//! Egress: replies of local backends are translated back; replies of
//! tunnelled flows are wrapped and sent back to the node they came from.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::bpf_get_prandom_u32,
    programs::TcContext,
};
use dataplane_common::{
    AFFINITY_CLIENT_IPV4, BACKEND_FLAG_REMOTE, BackendValue, CT_FLAG_REMOTE, CT_FLAG_SNAT,
    CT_FORWARD, CT_REPLY, CT_TUNNEL_RETURN, ConfigValue, CtKey, CtValue, EXTERNAL_MODE_SNAT,
    IPPROTO_UDP, PORT_KIND_BACKEND, PORT_KIND_FRONTEND, SCOPE_CLUSTER, SCOPE_EXTERNAL,
    SCOPE_NODEPORT, SERVICE_FLAG_DROP_WITHOUT_BACKENDS, SERVICE_FLAG_SOURCE_RANGES, ServiceKey,
    ServiceValue, SourceRangeKey, Stat, node_ip_serves_node_ports,
};

use aya_ebpf::maps::lpm_trie::Key as LpmKey;

use crate::{
    conntrack,
    icmp::{self, Translated},
    lb,
    maps::{CONFIG, NODE_IPS, POD_CIDRS, SOURCE_RANGES, count, port_in_use},
    mss,
    nat::{self, RewriteFailed},
    packet::{self, Flow, Ipv4, Packet, TCP_DATA_OFFSET, TCP_MIN_HLEN, UDP_HLEN},
    reject, route, tunnel,
};

/// Not ours, or translated in place: let the next program or the stack
/// have it (TCX_NEXT; "pass" at the end of the chain).
const PASS: i32 = TC_ACT_UNSPEC;
const DROP: i32 = TC_ACT_SHOT;
/// SNAT source ports: a few random tries before giving up on the packet
/// (the client retransmits and tries again).
const SNAT_PORT_TRIES: u32 = 4;
/// All 32 bits of the frontend id precede the source prefix in the trie key.
const SOURCE_RANGE_ID_BITS: u32 = 32;

#[inline(always)]
fn config() -> Option<ConfigValue> {
    CONFIG.get(0).copied().filter(|c| c.external_mode != 0)
}

/// TC ingress on a node interface.
pub fn ingress(ctx: &TcContext) -> i32 {
    let Some(config) = config() else {
        return PASS;
    };
    match packet::parse(ctx) {
        Packet::Ports(ip, flow) => {
            if flow.protocol == IPPROTO_UDP && flow.dst_port_be == config.tunnel_port_be {
                if tunnel::is_ours(ctx, &ip, &flow, &config) {
                    return from_tunnel(ctx, flow.src_be);
                }
                return PASS;
            }
            if flow.protocol == IPPROTO_UDP
                && port_in_use(PORT_KIND_BACKEND, flow.protocol, flow.dst_port_be)
            {
                conntrack::end_flow_replaced_by_direct(&flow);
            }
            if !may_be_inbound(&config, &flow) {
                return PASS;
            }
            inbound(ctx, &config, &ip, &flow)
        }
        Packet::Icmp(ip) => match icmp::translate_inbound(ctx, &ip) {
            Translated::NotOurs | Translated::Local => PASS,
            Translated::Remote(node_be) => to_tunnel(ctx, &config, node_be),
            Translated::Failed => {
                count(Stat::ExtDropDatapathError);
                DROP
            }
        },
        Packet::Unusable => {
            count(Stat::ExtPassedMalformed);
            PASS
        }
        Packet::Other | Packet::OtherIpv4 => PASS,
    }
}

/// TC egress on a node interface.
pub fn egress(ctx: &TcContext) -> i32 {
    let Some(config) = config() else {
        return PASS;
    };
    let Packet::Ports(ip, flow) = packet::parse(ctx) else {
        return PASS;
    };
    // Only replies from a backend's port can need translating.
    if !port_in_use(PORT_KIND_BACKEND, flow.protocol, flow.src_port_be) {
        return PASS;
    }
    let Some(entry) = conntrack::lookup(&conntrack::key_of(&flow)) else {
        return PASS;
    };
    // SAFETY: copied out of the map value at once.
    let value: CtValue = unsafe { *entry };
    match value.kind {
        CT_REPLY if value.flags & CT_FLAG_SNAT == 0 => {
            if conntrack::is_stale_reply(&flow, &value) {
                // A new connection on the tuple of a flow that has ended
                // (say, the same client and port straight to the pod):
                // not ours to translate.
                conntrack::forget(&conntrack::key_of(&flow));
                return PASS;
            }
            conntrack::refresh(entry, &flow);
            count(Stat::ExtEstablished);
            match nat::set_source(ctx, &flow, value.nat_ip_be, value.nat_port_be) {
                Ok(()) => PASS,
                Err(_) => datapath_error(),
            }
        }
        CT_TUNNEL_RETURN => {
            conntrack::refresh(entry, &flow);
            count(Stat::ExtEstablished);
            if let Err(mtu) = tunnel::fits(ctx, headers_len(ctx, &ip, &flow)) {
                // The backend's reply is too big for the tunnel: tell the
                // backend (it is local), as a router on the path would.
                count(Stat::ExtTooBigForTunnel);
                return match reject::icmp_unreachable(
                    ctx,
                    &ip,
                    reject::ICMP_FRAG_NEEDED,
                    mtu,
                    config.node_ip_be,
                ) {
                    Ok(()) => route::forward(ctx, config.node_ip_be, flow.src_be),
                    Err(_) => DROP,
                };
            }
            // The backend's SYN-ACK: the client's segments must fit the
            // tunnel from node to node.
            if clamp_mss(ctx, &config, &flow).is_err() {
                return datapath_error();
            }
            to_tunnel(ctx, &config, value.tunnel_ip_be)
        }
        _ => PASS,
    }
}

/// Lowers the MSS of a tunnelled TCP flow's SYN or SYN-ACK (see `mss`).
#[inline(always)]
fn clamp_mss(ctx: &TcContext, config: &ConfigValue, flow: &Flow) -> Result<(), RewriteFailed> {
    if !flow.is_tcp() {
        return Ok(());
    }
    mss::clamp(ctx, flow, || tunnel::mss_clamp(ctx, config))
}

/// Whether an inbound TCP/UDP packet can concern us at all: it goes to a
/// frontend's port, or to an SNAT port (a reply of an SNATed flow). One
/// array lookup, so the rest of the node's traffic pays nearly nothing.
#[inline(always)]
fn may_be_inbound(config: &ConfigValue, flow: &Flow) -> bool {
    let port = u16::from_be(flow.dst_port_be);
    port_in_use(PORT_KIND_FRONTEND, flow.protocol, flow.dst_port_be)
        || (config.snat_port_min..=config.snat_port_max).contains(&port)
}

/// A TCP/UDP packet arriving from outside.
#[inline(always)]
fn inbound(ctx: &TcContext, config: &ConfigValue, ip: &Ipv4, flow: &Flow) -> i32 {
    let key = conntrack::key_of(flow);
    if let Some(entry) = conntrack::lookup(&key)
        && !conntrack::reopens(entry, flow)
    {
        // SAFETY: copied out of the map value at once.
        let value: CtValue = unsafe { *entry };
        if value.kind == CT_FORWARD {
            conntrack::refresh(entry, flow);
            count(Stat::ExtEstablished);
            return to_backend(ctx, config, ip, flow, &value);
        }
        if value.kind == CT_REPLY && value.flags & CT_FLAG_SNAT != 0 {
            conntrack::refresh(entry, flow);
            count(Stat::ExtEstablished);
            return snat_reply_to_client(ctx, flow, &value);
        }
    }
    let Some(service) = find_frontend(flow) else {
        return PASS;
    };
    new_flow(ctx, config, ip, flow, &service)
}

/// The frontend a packet from outside addresses: an externalIP or LB IP,
/// a nodePort on one of this node's addresses, or a ClusterIP routed here.
#[inline(always)]
fn find_frontend(flow: &Flow) -> Option<ServiceValue> {
    let mut key = ServiceKey {
        vip_be: flow.dst_be,
        port_be: flow.dst_port_be,
        protocol: flow.protocol,
        scope: SCOPE_EXTERNAL,
    };
    if let Some(service) = lb::frontend(&key) {
        return Some(service);
    }
    // SAFETY: the value is copied out at once.
    if unsafe { NODE_IPS.get(flow.dst_be) }.is_some_and(|use_of| node_ip_serves_node_ports(*use_of))
    {
        let node_port = ServiceKey {
            vip_be: 0,
            scope: SCOPE_NODEPORT,
            ..key
        };
        if let Some(service) = lb::frontend(&node_port) {
            return Some(service);
        }
    }
    key.scope = SCOPE_CLUSTER;
    lb::frontend(&key)
}

#[inline(always)]
fn new_flow(
    ctx: &TcContext,
    config: &ConfigValue,
    ip: &Ipv4,
    flow: &Flow,
    service: &ServiceValue,
) -> i32 {
    if service.flags & SERVICE_FLAG_SOURCE_RANGES != 0
        && !source_allowed(service.service_id, flow.src_be)
    {
        count(Stat::ExtDropSourceRange);
        return DROP;
    }
    let Some(backend) = lb::select(service, AFFINITY_CLIENT_IPV4, u64::from(flow.src_be)) else {
        return no_backend(ctx, ip, flow, service);
    };
    let remote = backend.flags & BACKEND_FLAG_REMOTE != 0 && backend.node_ip_be != 0;
    // Hairpin: a client on the backend's own node (the backend itself, or
    // the node's address: host processes and masqueraded pods) must see
    // the answer come from this node, so this node stands in as the source
    // (kube-proxy masquerades such traffic too). Tunnelled, the backend
    // would answer the client directly on their node. A pod with an
    // address of its own, on any node, is answered through this node too:
    // the backend's reply to it may leave by the CNI's own overlay, which
    // no program of ours sees, and reach it from an address it never
    // dialled.
    let hairpin = backend.ip_be == flow.src_be
        || (remote && (backend.node_ip_be == flow.src_be || is_pod(flow.src_be)));
    if (remote && config.external_mode == EXTERNAL_MODE_SNAT) || hairpin {
        return new_snat_flow(ctx, config, ip, flow, service, &backend);
    }
    let now = conntrack::now_ns();
    let forward = CtValue {
        nat_ip_be: backend.ip_be,
        snat_ip_be: 0,
        tunnel_ip_be: if remote { backend.node_ip_be } else { 0 },
        nat_port_be: backend.port_be,
        snat_port_be: 0,
        kind: CT_FORWARD,
        flags: if remote { CT_FLAG_REMOTE } else { 0 },
        _pad: 0,
        service_id: service.service_id,
        last_seen_ns: now,
    };
    let forward_key = conntrack::key_of(flow);
    let reply_key = forward_key.reply_of(&forward);
    let reply = CtValue::reply_of(&forward_key, &forward);
    if conntrack::clashes(&reply_key, &reply) {
        // The client uses the same address and port towards another
        // frontend that picked the same backend, and that flow is alive:
        // its replies would be taken over. Refuse the new flow instead
        // (the client retries, possibly to another backend).
        count(Stat::ExtConntrackClash);
        return DROP;
    }
    if conntrack::create(&forward_key, &forward, &reply_key, &reply).is_err() {
        return DROP;
    }
    count(if remote {
        Stat::ExtNewTunnel
    } else {
        Stat::ExtNewLocal
    });
    to_backend(ctx, config, ip, flow, &forward)
}

/// A frontend without a usable backend: drop for externalTrafficPolicy
/// Local without a local endpoint (the load balancer's health check moves
/// clients elsewhere), otherwise reject as kube-proxy does.
#[inline(always)]
fn no_backend(ctx: &TcContext, ip: &Ipv4, flow: &Flow, service: &ServiceValue) -> i32 {
    if service.flags & SERVICE_FLAG_DROP_WITHOUT_BACKENDS != 0 {
        count(Stat::ExtDropNoLocalEndpoint);
        return DROP;
    }
    count(Stat::ExtRejected);
    let answered = if flow.is_tcp() {
        reject::tcp_reset(ctx, ip, flow)
    } else {
        reject::icmp_unreachable(ctx, ip, reject::ICMP_PORT_UNREACHABLE, 0, flow.dst_be)
    };
    match answered {
        Ok(()) => reject::bounce(ctx),
        Err(_) => DROP,
    }
}

/// Sends a packet of a known flow (forward direction) to its backend.
#[inline(always)]
fn to_backend(
    ctx: &TcContext,
    config: &ConfigValue,
    ip: &Ipv4,
    flow: &Flow,
    value: &CtValue,
) -> i32 {
    let remote = value.flags & CT_FLAG_REMOTE != 0;
    let snat = value.flags & CT_FLAG_SNAT != 0;
    if remote
        && !snat
        && let Err(mtu) = tunnel::fits(ctx, headers_len(ctx, ip, flow))
    {
        // Too big once wrapped: tell the client, quoting its packet as it
        // sent it (before any rewrite), from the address it dialled.
        count(Stat::ExtTooBigForTunnel);
        return match reject::icmp_unreachable(ctx, ip, reject::ICMP_FRAG_NEEDED, mtu, flow.dst_be) {
            Ok(()) => reject::bounce(ctx),
            Err(_) => DROP,
        };
    }
    if nat::set_destination(ctx, flow, value.nat_ip_be, value.nat_port_be).is_err() {
        return datapath_error();
    }
    if snat {
        if nat::set_source(ctx, flow, value.snat_ip_be, value.snat_port_be).is_err() {
            return datapath_error();
        }
        // The source is now this node: the stack would drop it as a
        // martian, so route it ourselves.
        return route::forward(ctx, value.snat_ip_be, value.nat_ip_be);
    }
    if remote {
        // The client's SYN: the backend's segments must fit the tunnel
        // back. Rewritten after the DNAT so the checksum update sees the
        // packet as it now is.
        if clamp_mss(ctx, config, flow).is_err() {
            return datapath_error();
        }
        return to_tunnel(ctx, config, value.tunnel_ip_be);
    }
    PASS
}

/// Wraps the packet for `node_be` and sends it there.
#[inline(always)]
fn to_tunnel(ctx: &TcContext, config: &ConfigValue, node_be: u32) -> i32 {
    if tunnel::encapsulate(ctx, config, node_be).is_err() {
        return datapath_error();
    }
    route::forward(ctx, config.node_ip_be, node_be)
}

/// A VXLAN packet from another node, from `node_be`.
#[inline(always)]
fn from_tunnel(ctx: &TcContext, node_be: u32) -> i32 {
    if tunnel::decapsulate(ctx).is_err() {
        return datapath_error();
    }
    let inner = match packet::parse(ctx) {
        Packet::Ports(_, inner) => inner,
        // An ICMP error about a flow tunnelled here, translated by the node
        // that received it: the stack delivers it to the backend.
        Packet::Icmp(_) => {
            count(Stat::ExtDecapsulated);
            return PASS;
        }
        _ => {
            // Only TCP, UDP and ICMP of our own flows travel the tunnel.
            count(Stat::ExtPassedMalformed);
            return DROP;
        }
    };
    let key = conntrack::key_of(&inner);
    if let Some(entry) = conntrack::lookup(&key) {
        // SAFETY: copied out of the map value at once.
        let value: CtValue = unsafe { *entry };
        if value.kind == CT_REPLY {
            // A reply of a flow we tunnelled: back to the frontend's
            // address, then to the client.
            conntrack::refresh(entry, &inner);
            count(Stat::ExtEstablished);
            if nat::set_source(ctx, &inner, value.nat_ip_be, value.nat_port_be).is_err() {
                return datapath_error();
            }
            return route::forward(ctx, value.nat_ip_be, inner.dst_be);
        }
    }
    // Another node sends a client's flow to a backend here: deliver it with
    // the client's address, and send the backend's replies back the same
    // way (the egress program looks this entry up).
    let return_key: CtKey = CtKey::new(
        inner.dst_be,
        inner.dst_port_be,
        inner.src_be,
        inner.src_port_be,
        inner.protocol,
    );
    let refreshed = match conntrack::lookup(&return_key) {
        Some(entry) => {
            // SAFETY: copied out of the map value at once.
            let existing: CtValue = unsafe { *entry };
            if existing.kind == CT_TUNNEL_RETURN && existing.tunnel_ip_be == node_be {
                conntrack::refresh(entry, &inner);
                true
            } else if conntrack::is_live(&existing) {
                // The tuple is a live flow of this node's own (the same
                // client port straight to a nodePort here, or tunnelled
                // from another node): its replies must not change path.
                count(Stat::ExtConntrackClash);
                return DROP;
            } else {
                false
            }
        }
        None => false,
    };
    if !refreshed {
        let value = CtValue {
            nat_ip_be: 0,
            snat_ip_be: 0,
            tunnel_ip_be: node_be,
            nat_port_be: 0,
            snat_port_be: 0,
            kind: CT_TUNNEL_RETURN,
            flags: 0,
            _pad: 0,
            service_id: 0,
            last_seen_ns: conntrack::now_ns(),
        };
        if conntrack::put(&return_key, &value).is_err() {
            return DROP;
        }
    }
    count(Stat::ExtDecapsulated);
    PASS
}

/// SNAT mode with a backend on another node, or hairpin: the source
/// becomes this node and a free port, so the replies return here without a
/// tunnel.
#[inline(always)]
fn new_snat_flow(
    ctx: &TcContext,
    config: &ConfigValue,
    ip: &Ipv4,
    flow: &Flow,
    service: &ServiceValue,
    backend: &BackendValue,
) -> i32 {
    let Some(port_be) = free_snat_port(config, backend, flow.protocol) else {
        count(Stat::ExtSnatPortsExhausted);
        return DROP;
    };
    let now = conntrack::now_ns();
    let forward = CtValue {
        nat_ip_be: backend.ip_be,
        snat_ip_be: config.node_ip_be,
        tunnel_ip_be: backend.node_ip_be,
        nat_port_be: backend.port_be,
        snat_port_be: port_be,
        kind: CT_FORWARD,
        flags: CT_FLAG_REMOTE | CT_FLAG_SNAT,
        _pad: 0,
        service_id: service.service_id,
        last_seen_ns: now,
    };
    let forward_key = conntrack::key_of(flow);
    let reply_key = forward_key.reply_of(&forward);
    let reply = CtValue::reply_of(&forward_key, &forward);
    if conntrack::create(&forward_key, &forward, &reply_key, &reply).is_err() {
        return DROP;
    }
    count(Stat::ExtNewSnat);
    to_backend(ctx, config, ip, flow, &forward)
}

/// A source port whose reply tuple is not in use, tried at random within
/// the configured range.
#[inline(always)]
fn free_snat_port(config: &ConfigValue, backend: &BackendValue, protocol: u8) -> Option<u16> {
    let span = u32::from(config.snat_port_max.saturating_sub(config.snat_port_min)) + 1;
    for _ in 0..SNAT_PORT_TRIES {
        // SAFETY: helper without preconditions.
        let offset = unsafe { bpf_get_prandom_u32() } % span;
        let port_be = (config.snat_port_min.wrapping_add(offset as u16)).to_be();
        // The reply key an SNAT flow with this port would take.
        let reply_key = CtKey::new(
            backend.ip_be,
            backend.port_be,
            config.node_ip_be,
            port_be,
            protocol,
        );
        if conntrack::lookup(&reply_key).is_none() {
            return Some(port_be);
        }
    }
    None
}

/// A reply of an SNATed flow: from the frontend, to the client.
#[inline(always)]
fn snat_reply_to_client(ctx: &TcContext, flow: &Flow, value: &CtValue) -> i32 {
    if nat::set_source(ctx, flow, value.nat_ip_be, value.nat_port_be).is_err()
        || nat::set_destination(ctx, flow, value.snat_ip_be, value.snat_port_be).is_err()
    {
        return datapath_error();
    }
    route::forward(ctx, value.nat_ip_be, value.snat_ip_be)
}

/// Whether `address_be` is in a node's pod CIDR.
#[inline(always)]
fn is_pod(address_be: u32) -> bool {
    POD_CIDRS.get(LpmKey::new(32, address_be)).is_some()
}

#[inline(always)]
fn source_allowed(service_id: u32, source_be: u32) -> bool {
    let key = LpmKey::new(
        SOURCE_RANGE_ID_BITS + 32,
        SourceRangeKey {
            service_id_be: service_id.to_be(),
            source_be,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// IPv4 + TCP/UDP header length of a packet (for GSO segment sizes).
#[inline(always)]
fn headers_len(ctx: &TcContext, ip: &Ipv4, flow: &Flow) -> u32 {
    let l4 = if flow.is_tcp() {
        ctx.load::<u8>(flow.l4_off + TCP_DATA_OFFSET)
            .map_or(TCP_MIN_HLEN as u32, |offset| u32::from(offset >> 4) * 4)
    } else {
        UDP_HLEN as u32
    };
    ip.header_len as u32 + l4
}

#[inline(always)]
fn datapath_error() -> i32 {
    count(Stat::ExtDropDatapathError);
    DROP
}
