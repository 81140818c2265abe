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
    pub const ALL: [&str; 6] = [SERVICES, BACKENDS, SOCK_REV, STATS, MEMBERS, AFFINITY];
}

/// Names of the BPF programs in the object file.
pub mod program_names {
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
}

/// Map capacities compiled into the object. The agent enforces its own,
/// possibly lower, limits before writing.
pub const SERVICES_MAX_ENTRIES: u32 = 65_536;
pub const BACKENDS_MAX_ENTRIES: u32 = 1_048_576;
pub const SOCK_REV_MAX_ENTRIES: u32 = 262_144;
pub const AFFINITY_MAX_ENTRIES: u32 = 262_144;

/// `ServiceValue::flags`: sessionAffinity ClientIP, for
/// `affinity_timeout_s` seconds since the client's last new connection.
pub const SERVICE_FLAG_AFFINITY: u32 = 1;

/// IANA protocol numbers as stored in [`ServiceKey::protocol`].
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

/// `ServiceKey::scope` for a frontend reachable from anywhere (ClusterIP).
pub const SCOPE_ANY: u8 = 0;

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

/// sessionAffinity state of one client for one Service frontend. The client
/// is identified by its network namespace cookie: at connect() time the
/// source address is not chosen yet, and a pod is its network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub service_id: u32,
    pub _pad: u32,
    pub netns_cookie: u64,
}
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
}

impl Stat {
    pub const COUNT: u32 = 5;
    pub const ALL: [Stat; Self::COUNT as usize] = [
        Stat::SockTranslated,
        Stat::SockRefusedNoEndpoints,
        Stat::SockBackendMissing,
        Stat::SockRevUpdateFailed,
        Stat::SockAffinityHit,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Stat::SockTranslated => "sock_translated",
            Stat::SockRefusedNoEndpoints => "sock_refused_no_endpoints",
            Stat::SockBackendMissing => "sock_backend_missing",
            Stat::SockRevUpdateFailed => "sock_rev_update_failed",
            Stat::SockAffinityHit => "sock_affinity_hit",
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
}
