//! This node's IPv4 addresses on the interfaces the node-interface
//! programs serve: where nodePorts answer and tunnels end.

use std::{collections::BTreeSet, ffi::CStr, net::Ipv4Addr};

use anyhow::{Result, bail};

/// The IPv4 addresses of `interfaces`, per `getifaddrs(3)`.
pub fn ipv4_addresses(interfaces: &[String]) -> Result<BTreeSet<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        bail!(
            "listing interface addresses: {}",
            std::io::Error::last_os_error()
        );
    }
    let mut out = BTreeSet::new();
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned.
        let entry = unsafe { &*cursor };
        cursor = entry.ifa_next;
        if entry.ifa_addr.is_null() || entry.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { CStr::from_ptr(entry.ifa_name) }.to_string_lossy();
        // SAFETY: ifa_addr is non-null and points to a sockaddr.
        let family = i32::from(unsafe { (*entry.ifa_addr).sa_family });
        if family != libc::AF_INET || !interfaces.iter().any(|i| *i == name) {
            continue;
        }
        // SAFETY: an AF_INET sockaddr is a sockaddr_in.
        let address = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
        out.insert(Ipv4Addr::from(u32::from_be(address.sin_addr.s_addr)));
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}
