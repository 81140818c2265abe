//! Types shared by the BPF programs and the agent.
//!
//! Every map key and value is `#[repr(C)]`, padded explicitly and checked for
//! size at compile time, so both sides of the map can never drift apart.
//! Fields that hold network-byte-order data end in `_be`: their in-memory
//! bytes are the bytes on the wire (as in `struct bpf_sock_addr`).
#![no_std]

use core::mem::size_of;

/// Names of the pinned maps, as the programs declare them and as they appear
/// under the agent's bpffs directory.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const SOCK_REV: &str = "SOCK_REV";
    pub const STATS: &str = "STATS";
    pub const MEMBERS: &str = "MEMBERS";
    pub const AFFINITY: &str = "AFFINITY";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const NODE_IPS: &str = "NODE_IPS";
    pub const CONFIG: &str = "CONFIG";
    pub const SOURCE_RANGES: &str = "SOURCE_RANGES";
    pub const TUNNEL_PEERS: &str = "TUNNEL_PEERS";
    pub const PORTS: &str = "PORTS";
    pub const ALL: [&str; 12] = [
        SERVICES,
        BACKENDS,
        SOCK_REV,
        STATS,
        MEMBERS,
        AFFINITY,
        CONNTRACK,
        NODE_IPS,
        CONFIG,
        SOURCE_RANGES,
        TUNNEL_PEERS,
        PORTS,
    ];
}

/// Names of the BPF programs in the object file.
pub mod program_names {
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    pub const TC_INGRESS: &str = "tc_ingress";
    pub const TC_EGRESS: &str = "tc_egress";
    /// A TC program that does nothing: never attached; the floor that
    /// program benchmarks measure `tc_ingress`/`tc_egress` against.
    pub const TC_NOOP: &str = "tc_noop";
}

/// Map capacities compiled into the object. The agent enforces its own,
/// possibly lower, limits before writing.
pub const SERVICES_MAX_ENTRIES: u32 = 65_536;
pub const BACKENDS_MAX_ENTRIES: u32 = 1_048_576;
pub const SOCK_REV_MAX_ENTRIES: u32 = 262_144;
pub const AFFINITY_MAX_ENTRIES: u32 = 262_144;
pub const CONNTRACK_MAX_ENTRIES: u32 = 524_288;
pub const NODE_IPS_MAX_ENTRIES: u32 = 256;
pub const TUNNEL_PEERS_MAX_ENTRIES: u32 = 16_384;
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 65_536;

/// `ServiceValue::flags`: sessionAffinity ClientIP, for
/// `affinity_timeout_s` seconds since the client's last new connection.
pub const SERVICE_FLAG_AFFINITY: u32 = 1;
/// `loadBalancerSourceRanges`: only sources in SOURCE_RANGES under this
/// frontend's id may connect; others are dropped.
pub const SERVICE_FLAG_SOURCE_RANGES: u32 = 2;
/// `externalTrafficPolicy: Local` with no endpoint on this node while the
/// Service has endpoints elsewhere: drop (the load balancer's health check
/// steers clients away) instead of rejecting.
pub const SERVICE_FLAG_DROP_WITHOUT_BACKENDS: u32 = 4;

/// `BackendValue::flags`: the backend runs on another node whose address is
/// `node_ip_be`; external traffic reaches it through the tunnel (or SNAT).
/// Without it the backend is reached by DNAT and the node's own routing.
pub const BACKEND_FLAG_REMOTE: u16 = 1;

/// IANA protocol numbers as stored in [`ServiceKey::protocol`].
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// `ServiceKey::scope`: which traffic a frontend entry is for. The same
/// address can have different backends for traffic from inside and from
/// outside the cluster (externalTrafficPolicy), hence separate entries.
///
/// Traffic that starts on this node (socket LB): ClusterIPs, and the
/// in-cluster view of externalIPs and load-balancer IPs.
pub const SCOPE_CLUSTER: u8 = 0;
/// Traffic arriving on a node interface for an externalIP or LB IP.
pub const SCOPE_EXTERNAL: u8 = 1;
/// Traffic arriving on a node interface for a node IP and a nodePort; the
/// key's address is 0 (any of the node's addresses, in NODE_IPS).
pub const SCOPE_NODEPORT: u8 = 2;
/// Traffic that starts on this node for one of its own addresses and a
/// nodePort (socket LB); address 0 as for [`SCOPE_NODEPORT`].
pub const SCOPE_NODEPORT_LOCAL: u8 = 3;

/// A Service frontend: one (virtual IP, port, protocol).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub vip_be: u32,
    pub port_be: u16,
    pub protocol: u8,
    pub scope: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 8);

/// What the datapath needs to pick a backend for a frontend.
///
/// The backends of a frontend live in BACKENDS under
/// `(service_id, generation, 0..backend_count)`. An update writes a complete
/// new generation, then flips `generation` and `backend_count` here in one
/// map update, then deletes the old generation: a lookup never sees a half
/// written backend set and never picks a backend that was removed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    pub service_id: u32,
    /// 0 means "no usable endpoint": connections are refused.
    pub backend_count: u16,
    pub generation: u16,
    pub flags: u32,
    pub affinity_timeout_s: u32,
}
const _: () = assert!(size_of::<ServiceValue>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub service_id: u32,
    pub generation: u16,
    pub index: u16,
}
const _: () = assert!(size_of::<BackendKey>() == 8);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BackendValue {
    pub ip_be: u32,
    /// The node that hosts the backend (for tunnelling north-south traffic);
    /// 0 when unknown.
    pub node_ip_be: u32,
    pub port_be: u16,
    pub flags: u16,
}
const _: () = assert!(size_of::<BackendValue>() == 12);

/// "This backend is in this generation of this Service": lets the datapath
/// check in one lookup that a remembered (affine) backend is still eligible.
/// Written and deleted together with the generation's BACKENDS slots.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemberKey {
    pub service_id: u32,
    pub generation: u16,
    pub port_be: u16,
    pub ip_be: u32,
}
const _: () = assert!(size_of::<MemberKey>() == 12);

/// sessionAffinity state of one client for one Service frontend. Socket LB
/// identifies a client by its network namespace cookie (at connect() time
/// the source address is not chosen yet, and a pod is its network
/// namespace); the node interfaces by its IPv4 source address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    /// [`AFFINITY_CLIENT_NETNS`] or [`AFFINITY_CLIENT_IPV4`].
    pub client_kind: u32,
    pub client: u64,
}

/// `AffinityKey::client_kind`.
pub const AFFINITY_CLIENT_NETNS: u32 = 0;
pub const AFFINITY_CLIENT_IPV4: u32 = 1;
const _: () = assert!(size_of::<AffinityKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    pub backend: BackendValue,
    pub _pad: u32,
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) of the last connection.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<AffinityValue>() == 24);

/// A translated socket and the backend it talks to. Keyed by the backend
/// as well as the cookie because one unconnected UDP socket may send to
/// several Services (kube-proxy's DNAT is per flow, not per socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub backend_ip_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SockRevKey>() == 16);

/// The frontend the socket originally addressed, so that `getpeername()` and
/// `recvfrom()` report the Service address rather than the backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SockRevValue {
    pub vip_be: u32,
    pub port_be: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<SockRevValue>() == 8);

/// PORTS: a bitmap that lets the interface programs skip every packet that
/// cannot concern a Service after one array lookup (most of a node's
/// traffic), one bit per (kind, protocol, port): kind
/// [`PORT_KIND_FRONTEND`] is a frontend's port (destination of inbound
/// packets), [`PORT_KIND_BACKEND`] a backend's port (source of the replies
/// the egress program translates).
pub const PORT_KIND_FRONTEND: u8 = 0;
pub const PORT_KIND_BACKEND: u8 = 1;
/// 2 kinds x 2 protocols (TCP, UDP) x 65,536 ports, 64 per word.
pub const PORTS_WORDS: u32 = 2 * 2 * 65_536 / 64;

/// The PORTS word and bit of a (kind, protocol, port); `None` for
/// protocols other than TCP and UDP.
#[inline(always)]
pub fn port_bit(kind: u8, protocol: u8, port: u16) -> Option<(u32, u64)> {
    let protocol_index = match protocol {
        IPPROTO_TCP => 0,
        IPPROTO_UDP => 1,
        _ => return None,
    };
    let bit = ((u32::from(kind & 1) * 2 + protocol_index) << 16) | u32::from(port);
    Some((bit / 64, 1u64 << (bit % 64)))
}

/// `CtKey`/`CtValue` kinds of flow on the node interfaces.
/// Client -> frontend, as it arrives: translate to the backend.
pub const CT_FORWARD: u8 = 1;
/// Backend -> client (or -> this node in SNAT mode): translate back to the
/// frontend the client dialled.
pub const CT_REPLY: u8 = 2;
/// On the backend's node: backend -> client replies of a flow that arrived
/// through the tunnel go back through it to `tunnel_ip_be`.
pub const CT_TUNNEL_RETURN: u8 = 3;

/// `CtValue::flags`.
pub const CT_FLAG_FIN_SEEN: u8 = 1;
pub const CT_FLAG_RST_SEEN: u8 = 2;
/// The backend is on another node: the packet is tunnelled (or SNATed).
pub const CT_FLAG_REMOTE: u8 = 4;
/// SNAT mode: the source is rewritten to `snat_ip_be:snat_port_be`.
pub const CT_FLAG_SNAT: u8 = 8;

/// A flow on the node interfaces, as seen in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CtKey {
    pub src_be: u32,
    pub dst_be: u32,
    pub src_port_be: u16,
    pub dst_port_be: u16,
    pub protocol: u8,
    // Scalar padding, not a byte array: zeroing it is a store, not a
    // call to the compiler's byte-loop memset.
    pub _pad0: u8,
    pub _pad1: u16,
}
const _: () = assert!(size_of::<CtKey>() == 16);

/// What to do with the packets of one direction of a flow.
///
/// [`CT_FORWARD`]: rewrite the destination to `nat_ip_be:nat_port_be` (the
/// backend); with [`CT_FLAG_SNAT`] also the source to
/// `snat_ip_be:snat_port_be`; with [`CT_FLAG_REMOTE`] tunnel to
/// `tunnel_ip_be`. [`CT_REPLY`]: rewrite the source to `nat_ip_be:
/// nat_port_be` (the frontend), with [`CT_FLAG_SNAT`] also the destination
/// to `snat_ip_be:snat_port_be` (the client). [`CT_TUNNEL_RETURN`]:
/// encapsulate to `tunnel_ip_be`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub nat_ip_be: u32,
    pub snat_ip_be: u32,
    pub tunnel_ip_be: u32,
    pub nat_port_be: u16,
    pub snat_port_be: u16,
    pub kind: u8,
    pub flags: u8,
    pub _pad: u16,
    /// The frontend's id (for affinity, metrics and the sweep).
    pub service_id: u32,
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) of the last packet.
    pub last_seen_ns: u64,
}
const _: () = assert!(size_of::<CtValue>() == 32);

// The flow ABI: how the programs derive one direction's entry from the
// other's. The agent's conntrack sweep pairs entries with the same
// functions, so the two sides cannot drift apart.
impl CtKey {
    #[inline(always)]
    pub const fn new(
        src_be: u32,
        src_port_be: u16,
        dst_be: u32,
        dst_port_be: u16,
        protocol: u8,
    ) -> Self {
        Self {
            src_be,
            dst_be,
            src_port_be,
            dst_port_be,
            protocol,
            _pad0: 0,
            _pad1: 0,
        }
    }

    /// The key the replies of this flow travel under, once `forward` (the
    /// forward entry created for this key) translates it: from the
    /// backend, to the client, or to the SNAT address and port that stood
    /// in for the client.
    #[inline(always)]
    pub const fn reply_of(&self, forward: &CtValue) -> Self {
        let (dst_be, dst_port_be) = if forward.flags & CT_FLAG_SNAT != 0 {
            (forward.snat_ip_be, forward.snat_port_be)
        } else {
            (self.src_be, self.src_port_be)
        };
        Self::new(
            forward.nat_ip_be,
            forward.nat_port_be,
            dst_be,
            dst_port_be,
            self.protocol,
        )
    }
}

impl CtValue {
    /// The reply entry that goes with `forward`, created for the flow
    /// `forward_key`: replies must look as if they came from the address
    /// and port the client dialled, and (SNAT) go back to the client's own.
    #[inline(always)]
    pub const fn reply_of(forward_key: &CtKey, forward: &CtValue) -> Self {
        let snat = forward.flags & CT_FLAG_SNAT != 0;
        Self {
            nat_ip_be: forward_key.dst_be,
            nat_port_be: forward_key.dst_port_be,
            snat_ip_be: if snat { forward_key.src_be } else { 0 },
            snat_port_be: if snat { forward_key.src_port_be } else { 0 },
            tunnel_ip_be: 0,
            kind: CT_REPLY,
            flags: if snat { CT_FLAG_SNAT } else { 0 },
            ..*forward
        }
    }
}

/// `ConfigValue::external_mode`: how external traffic reaches a backend on
/// another node.
pub const EXTERNAL_MODE_TUNNEL: u32 = 1;
pub const EXTERNAL_MODE_SNAT: u32 = 2;

/// The single entry of CONFIG, written by the agent before it attaches the
/// interface programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConfigValue {
    pub external_mode: u32,
    /// This node's address on the node network: the tunnel's outer source
    /// and the SNAT address.
    pub node_ip_be: u32,
    /// VXLAN network identifier (host order).
    pub vni: u32,
    pub tunnel_port_be: u16,
    /// SNAT source ports are taken from `snat_port_min..=snat_port_max`
    /// (host order).
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<ConfigValue>() == 20);

/// An LPM-trie key of SOURCE_RANGES: `prefix_len` counts bits of
/// `service_id_be` (always all 32) and then of `source_be`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub service_id_be: u32,
    pub source_be: u32,
}
const _: () = assert!(size_of::<SourceRangeKey>() == 8);

/// Indexes into the per-CPU STATS array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// connect() or an unconnected sendmsg() to a frontend translated to a
    /// backend.
    SockTranslated = 0,
    /// connect() or sendmsg() to a frontend without usable endpoints, refused.
    SockRefusedNoEndpoints = 1,
    /// The chosen backend slot was missing: the maps were inconsistent.
    SockBackendMissing = 2,
    /// The reverse-translation map was full and an entry could not be stored.
    SockRevUpdateFailed = 3,
    /// A connection reused its client's affine backend.
    SockAffinityHit = 4,
    /// A new external flow was translated to a backend on this node.
    ExtNewLocal = 5,
    /// A new external flow was sent through the tunnel to another node.
    ExtNewTunnel = 6,
    /// A new external flow was SNATed to a backend on another node.
    ExtNewSnat = 7,
    /// A packet of a known external flow was translated.
    ExtEstablished = 8,
    /// A packet from the tunnel was decapsulated for a local backend.
    ExtDecapsulated = 9,
    /// External traffic to a frontend without endpoints was rejected
    /// (TCP RST or ICMP port unreachable).
    ExtRejected = 10,
    /// Dropped: externalTrafficPolicy Local and no endpoint on this node.
    ExtDropNoLocalEndpoint = 11,
    /// Dropped: the source is outside loadBalancerSourceRanges.
    ExtDropSourceRange = 12,
    /// A fragment or a packet with a truncated or malformed header addressed
    /// a frontend and was passed untranslated.
    ExtPassedMalformed = 13,
    /// The conntrack map refused an entry (the flow was not translated).
    ExtConntrackFull = 14,
    /// Encapsulation, redirect or a rewrite failed; the packet was dropped.
    ExtDropDatapathError = 15,
    /// An ICMP error about a translated flow was translated too.
    ExtIcmpTranslated = 16,
    /// No free SNAT source port was found; the packet was dropped.
    ExtSnatPortsExhausted = 17,
    /// A packet too big for the tunnel got ICMP "fragmentation needed".
    ExtTooBigForTunnel = 18,
    /// CONNTRACK entries written (two per new flow, one per tunnel-return).
    ExtConntrackCreated = 19,
    /// CONNTRACK entries the agent's sweep removed. Written by the agent,
    /// never by the programs: created - expired - present = evicted by the
    /// LRU under pressure.
    ConntrackExpired = 20,
    /// A new flow was refused: its reply direction is a live flow of
    /// another frontend (same client address and port, same backend).
    ExtConntrackClash = 21,
}

impl Stat {
    pub const COUNT: u32 = 22;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::SockTranslated,
        Stat::SockRefusedNoEndpoints,
        Stat::SockBackendMissing,
        Stat::SockRevUpdateFailed,
        Stat::SockAffinityHit,
        Stat::ExtNewLocal,
        Stat::ExtNewTunnel,
        Stat::ExtNewSnat,
        Stat::ExtEstablished,
        Stat::ExtDecapsulated,
        Stat::ExtRejected,
        Stat::ExtDropNoLocalEndpoint,
        Stat::ExtDropSourceRange,
        Stat::ExtPassedMalformed,
        Stat::ExtConntrackFull,
        Stat::ExtDropDatapathError,
        Stat::ExtIcmpTranslated,
        Stat::ExtSnatPortsExhausted,
        Stat::ExtTooBigForTunnel,
        Stat::ExtConntrackCreated,
        Stat::ConntrackExpired,
        Stat::ExtConntrackClash,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::SockTranslated => "sock_translated",
            Stat::SockRefusedNoEndpoints => "sock_refused_no_endpoints",
            Stat::SockBackendMissing => "sock_backend_missing",
            Stat::SockRevUpdateFailed => "sock_rev_update_failed",
            Stat::SockAffinityHit => "sock_affinity_hit",
            Stat::ExtNewLocal => "ext_new_local",
            Stat::ExtNewTunnel => "ext_new_tunnel",
            Stat::ExtNewSnat => "ext_new_snat",
            Stat::ExtEstablished => "ext_established",
            Stat::ExtDecapsulated => "ext_decapsulated",
            Stat::ExtRejected => "ext_rejected",
            Stat::ExtDropNoLocalEndpoint => "ext_drop_no_local_endpoint",
            Stat::ExtDropSourceRange => "ext_drop_source_range",
            Stat::ExtPassedMalformed => "ext_passed_malformed",
            Stat::ExtConntrackFull => "ext_conntrack_full",
            Stat::ExtDropDatapathError => "ext_drop_datapath_error",
            Stat::ExtIcmpTranslated => "ext_icmp_translated",
            Stat::ExtSnatPortsExhausted => "ext_snat_ports_exhausted",
            Stat::ExtTooBigForTunnel => "ext_too_big_for_tunnel",
            Stat::ExtConntrackCreated => "ext_conntrack_created",
            Stat::ConntrackExpired => "conntrack_expired",
            Stat::ExtConntrackClash => "ext_conntrack_clash",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)] plain integers with explicit
    // padding, so every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendKey {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for MemberKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for ConfigValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
}
