//! The model's types as the maps hold them, and back, with their byte
//! order (SOURCE_RANGES' LPM keys are built beside the trie, in maps.rs).

use std::net::Ipv4Addr;

use dataplane_common::{BACKEND_FLAG_REMOTE, BackendKey, BackendValue, MemberKey, ServiceKey};

use crate::model::{Backend, Frontend, Protocol, Scope};

/// The MEMBERS key of a backend slot.
pub fn member_key(slot: &BackendKey, backend: &BackendValue) -> MemberKey {
    MemberKey {
        service_id: slot.service_id,
        generation: slot.generation,
        port_be: backend.port_be,
        ip_be: backend.ip_be,
    }
}

pub fn service_key(frontend: &Frontend) -> ServiceKey {
    ServiceKey {
        vip_be: ipv4_be(frontend.ip),
        port_be: frontend.port.to_be(),
        protocol: frontend.protocol.number(),
        scope: frontend.scope.number(),
    }
}

pub fn frontend_of(key: &ServiceKey) -> Option<Frontend> {
    Some(Frontend {
        ip: ipv4_of_be(key.vip_be),
        port: u16::from_be(key.port_be),
        protocol: Protocol::from_number(key.protocol)?,
        scope: Scope::from_number(key.scope)?,
    })
}

pub fn backend_value(backend: &Backend) -> BackendValue {
    BackendValue {
        ip_be: ipv4_be(backend.ip),
        node_ip_be: backend.remote_node.map_or(0, ipv4_be),
        port_be: backend.port.to_be(),
        flags: if backend.remote_node.is_some() {
            BACKEND_FLAG_REMOTE
        } else {
            0
        },
    }
}

pub fn backend_of(value: &BackendValue) -> Backend {
    Backend {
        ip: ipv4_of_be(value.ip_be),
        port: u16::from_be(value.port_be),
        remote_node: (value.flags & BACKEND_FLAG_REMOTE != 0).then(|| ipv4_of_be(value.node_ip_be)),
    }
}

/// The address as the kernel stores it in `user_ip4`: the wire bytes in
/// memory order.
pub fn ipv4_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

pub fn ipv4_of_be(ip_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(ip_be.to_ne_bytes())
}
