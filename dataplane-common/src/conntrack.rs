//! Flows of the interface programs (CONNTRACK), and the flow ABI: how one
//! direction's entry is derived from the other's.

use core::mem::size_of;

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
