//! How the interface programs behave (CONFIG), and the PORTS bitmap.

use core::mem::size_of;

use crate::service::{IPPROTO_TCP, IPPROTO_UDP};

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
    /// The MSS that TCP SYNs and SYN-ACKs of tunnelled flows are lowered
    /// to: [`TUNNEL_MSS_CLAMP_OFF`], [`TUNNEL_MSS_CLAMP_AUTO`] (the
    /// interface's MTU minus the encapsulation and the IPv4 and TCP
    /// headers) or the MSS itself (host order). Agents before this field
    /// wrote 0 here: off.
    pub tunnel_mss_clamp: u16,
}

pub const TUNNEL_MSS_CLAMP_OFF: u16 = 0;
pub const TUNNEL_MSS_CLAMP_AUTO: u16 = u16::MAX;
const _: () = assert!(size_of::<ConfigValue>() == 20);

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
