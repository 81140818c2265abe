//! Types shared by the BPF programs and the agent.
//!
//! Every map key and value is `#[repr(C)]`, padded explicitly and checked for
//! size at compile time, so both sides of the map can never drift apart.
//! Fields that hold network-byte-order data end in `_be`: their in-memory
//! bytes are the bytes on the wire (as in `struct bpf_sock_addr`).
#![no_std]

mod config;
mod conntrack;
mod maglev;
mod service;
mod socket;
mod stats;

pub use config::*;
pub use conntrack::*;
pub use maglev::*;
pub use service::*;
pub use socket::*;
pub use stats::*;

/// The layout of the pinned maps. Bump it in the change that alters any
/// pinned map's key, value, type or meaning (or adds or removes one): the
/// agent then pins into a new directory and carries the state of the
/// previous layout over (dataplane-agent's `dataplane/upgrade.rs` must
/// learn to read the old entries).
/// Version 2: SERVICES, BACKENDS and MEMBERS hold four and two times
/// more entries than in version 1 (same keys and values).
pub const PIN_LAYOUT_VERSION: u32 = 2;

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
    pub const POD_CIDRS: &str = "POD_CIDRS";
    pub const ALL: [&str; 13] = [
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
        POD_CIDRS,
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
/// possibly lower, limits before writing. SERVICES, BACKENDS and MEMBERS
/// allocate entries as they are used (BPF_F_NO_PREALLOC), so a capacity
/// costs kernel memory only when filled: 100,000 Services with one
/// frontend each and 10 endpoints fit, with room for a whole second
/// generation of backends during an update (half of BACKENDS).
pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
pub const BACKENDS_MAX_ENTRIES: u32 = 2_097_152;
pub const SOCK_REV_MAX_ENTRIES: u32 = 262_144;
pub const AFFINITY_MAX_ENTRIES: u32 = 262_144;
pub const CONNTRACK_MAX_ENTRIES: u32 = 524_288;
pub const NODE_IPS_MAX_ENTRIES: u32 = 256;

/// NODE_IPS values. Any value marks an address of this node, where the
/// tunnel ends (peers dial the one their Node object names);
/// [`NODE_IP_NO_NODE_PORTS`] marks one `--nodeport-addresses` leaves out.
/// Agents from before that flag wrote [`NODE_IP_PRESENT`] for every
/// address, which reads the same here: programs and agents of either
/// version read each other's values right, through an upgrade and a
/// rollback alike.
pub const NODE_IP_PRESENT: u32 = 1;
pub const NODE_IP_NO_NODE_PORTS: u32 = 2;

/// Whether a NODE_IPS value lets nodePorts answer on its address.
#[inline(always)]
pub const fn node_ip_serves_node_ports(value: u32) -> bool {
    value & NODE_IP_NO_NODE_PORTS == 0
}
pub const TUNNEL_PEERS_MAX_ENTRIES: u32 = 16_384;
/// Pod CIDRs over all nodes (a node usually has one per address family).
pub const POD_CIDRS_MAX_ENTRIES: u32 = 16_384;
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 65_536;

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
