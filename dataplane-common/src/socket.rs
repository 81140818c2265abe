//! State of the socket programs: session affinity and the reverse
//! translation for `getpeername()`/`recvmsg()`.

use core::mem::size_of;

use crate::service::BackendValue;

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
    /// The network namespace cookie (host order), or the IPv4 address in
    /// network order (as the `_be` fields) in the low 32 bits.
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
