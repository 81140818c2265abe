//! Services: frontends (SERVICES), their backend slots (BACKENDS), the
//! slots' members (MEMBERS) and allowed source ranges (SOURCE_RANGES).

use core::mem::size_of;

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
    /// The node that hosts the backend (for tunnelling external traffic);
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

/// An LPM-trie key of SOURCE_RANGES: `prefix_len` counts bits of
/// `service_id_be` (always all 32) and then of `source_be`. The one service
/// id in network order: an LPM trie compares its key from the first byte,
/// so the id and the address must both be big-endian for the prefix to run
/// through the id into the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRangeKey {
    pub service_id_be: u32,
    pub source_be: u32,
}
const _: () = assert!(size_of::<SourceRangeKey>() == 8);
