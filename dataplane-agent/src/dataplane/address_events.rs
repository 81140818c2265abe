//! Wakes the agent when an IPv4 address comes or goes on any interface of
//! this network namespace (rtnetlink's RTMGRP_IPV4_IFADDR group), so
//! nodePorts answer on a new address at once, as kube-proxy's do, instead
//! of at the next resync. The messages are not parsed: any of them means
//! "re-read the addresses", which `getifaddrs` does whole.

use anyhow::{Context as _, Result};
use netlink_sys::{AsyncSocket as _, AsyncSocketExt as _, SocketAddr, TokioSocket, protocols};

/// `RTMGRP_IPV4_IFADDR` from linux/rtnetlink.h (a multicast group bit).
const RTMGRP_IPV4_IFADDR: u32 = 0x10;

/// A subscription to address changes.
pub struct AddressEvents {
    socket: TokioSocket,
    buffer: Vec<u8>,
}

impl AddressEvents {
    pub fn subscribe() -> Result<Self> {
        let mut socket =
            TokioSocket::new(protocols::NETLINK_ROUTE).context("opening a NETLINK_ROUTE socket")?;
        socket
            .socket_mut()
            .bind(&SocketAddr::new(0, RTMGRP_IPV4_IFADDR))
            .context("subscribing to IPv4 address changes")?;
        Ok(Self {
            socket,
            buffer: Vec::with_capacity(16 * 1024),
        })
    }

    /// Waits for the next change. A burst of changes that overflowed the
    /// socket (ENOBUFS) is a change too: the caller re-reads everything.
    pub async fn changed(&mut self) -> Result<()> {
        self.buffer.clear();
        match self.socket.recv(&mut self.buffer).await {
            Ok(()) => Ok(()),
            Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => Ok(()),
            Err(error) => Err(error).context("reading address changes"),
        }
    }
}
